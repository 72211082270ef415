"""Writing results safely: atomic files, replacing a finished directory, "is this directory ours"."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile

import numpy as np

from .errors import UserError


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
    with open(path) as f:
        return json.load(f)


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
    """Returns a table cell: floats with `digits` decimals, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)
