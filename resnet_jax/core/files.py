"""Writing results safely: atomic files, replacing a finished directory, "is this directory ours"."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile

import numpy as np

from resnet_jax.errors import UserError


def write_atomic(path: str, write) -> None:
    """Calls write(f) on a temporary binary file beside `path`, syncs it and renames it to `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Writes text atomically."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path: str, obj, sort_keys: bool = False) -> None:
    """Writes JSON atomically (numpy scalars and arrays become numbers and lists)."""
    write_text(path, json.dumps(obj, indent=1, default=_json_default, sort_keys=sort_keys) + "\n")


def read_json(path: str):
    """Returns the parsed JSON of `path`; a file that is not JSON raises UserError naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise UserError(f"{path} is damaged (not valid JSON: {e}): delete it and run the command that "
                            f"wrote it again") from None


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def replace_dir(tmp_dir: str, out_dir: str) -> None:
    """Moves a finished temporary directory into place, replacing an older out_dir."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


def is_ours(out_dir: str, manifest: str, fmt: str | None = None) -> bool | None:
    """Returns None when out_dir is missing or empty (hidden files aside), True when it holds
    `manifest` (JSON) whose "format" is `fmt` (any readable manifest when fmt is None), else False."""
    if not os.path.isdir(out_dir) or not any(not e.startswith(".") for e in os.listdir(out_dir)):
        return None
    try:
        content = read_json(os.path.join(out_dir, manifest))
    except (OSError, ValueError):
        return False
    return fmt is None or (isinstance(content, dict) and content.get("format") == fmt)


def check_ours(out_dir: str, manifest: str, fmt: str | None = None) -> None:
    """Refuses (UserError) an out_dir that holds something other than an earlier output of this kind."""
    if is_ours(out_dir, manifest, fmt) is False:
        raise UserError(f"{out_dir} exists and holds something else: pass an empty or new --out directory")


def write_csv(path: str, rows: list[dict], columns) -> None:
    """Writes rows (dicts) as CSV with the given columns, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format_cell(row.get(k), 6) for k in columns})
    write_text(path, buf.getvalue())


def format_cell(value, digits: int = 4) -> str:
    """Returns a table cell: floats with `digits` decimals, None as "-", a number over seeds
    ({"mean", "std", ...}) as "mean ± std"."""
    if value is None:
        return "-"
    if isinstance(value, dict) and "mean" in value and "std" in value:  # a number over seeds
        if value["std"] != value["std"]:  # one finite value: no spread
            return format_cell(value["mean"], digits)
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def existing_ancestor(path: str) -> str:
    """Returns the nearest existing directory at or above `path`."""
    here = os.path.abspath(path)
    while not os.path.isdir(here):
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return here


def check_out_dir(out_dir: str, flag: str = "--out", min_free_bytes: int = 0) -> None:
    """Refuses (UserError) an output directory that is a file, cannot be created or written, or whose disk
    has less than `min_free_bytes` free; creates nothing."""
    path = os.path.abspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {out_dir} is a file, not a directory: pass a directory (new or from an earlier run)")
    base = existing_ancestor(path)
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out_dir}: cannot write in {base} (read-only or no permission): "
                        f"pass a writable location")
    free = shutil.disk_usage(base).free
    if free < min_free_bytes:
        raise UserError(f"{flag} {out_dir}: {free / 2**20:.0f} MiB free on its disk, about "
                        f"{min_free_bytes / 2**20:.0f} MiB needed: free space or pass another {flag}")


def lock_path(out_dir: str) -> str:
    """Returns the lock file of an output directory: a hidden file beside it (so that commands which replace
    the whole directory keep their lock)."""
    path = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


@contextlib.contextmanager
def locked(out_dir: str, flag: str = "--out"):
    """Holds an exclusive lock on `out_dir` for this process (flock on `lock_path`, holding our pid); a second
    writer gets a UserError naming the holder's pid. The kernel releases the lock of a dead process, so a
    stale lock file is taken over. The lock file is removed on release."""
    import fcntl

    path = lock_path(out_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{flag} {out_dir} is in use by another resnet-jax process (pid {holder}): wait for it "
                            f"to finish or pass another {flag}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not a file its last holder just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


def load_npy(path: str, mmap: bool = False, made_by: str = "the command that wrote it") -> np.ndarray:
    """Returns the array of a .npy file; a missing or damaged file raises UserError naming it and the fix."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: run {made_by} again")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
                        f"run {made_by} again") from None
