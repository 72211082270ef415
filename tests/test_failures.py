"""Every failure clean: one line, exit code 2 (1 for the unexpected), nothing half-written, a clean Ctrl-C.

Most cases fail before any compile; the store and checkpoint they break are copies of the session's
tiny ones (conftest.py)."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from PIL import Image

from helpers import make_folder, run_cli
from resnet_jax.core import files
from resnet_jax.cli import cli, failure_line


def snapshot(root):
    """Returns {relative path: (size, mtime_ns)} of everything under root (hidden files included)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size if not os.path.isdir(path) else 0, st.st_mtime_ns)
    return out


def assert_clean(code, err, want_code, word):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == want_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), err
    assert word.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def tiny_store(tiny_ckpt, tiny_folder, tmp_path_factory):
    """An fc store of the tiny checkpoint on its 30 images."""
    from resnet_jax.jobs import extract

    out = str(tmp_path_factory.mktemp("store") / "s")
    extract.run_extract(tiny_ckpt, f"folder:{tiny_folder}:all", out, batch_size=16, progress=False, log=lambda s: None)
    return out


def _cases(ckpt, folder, root):
    """(name, argv, exit code, word of the message): each must fail before any compute."""
    afile = os.path.join(root, "a-file")
    data = f"folder:{folder}:all"
    return [
        ("train --out FILE", ["train", "--data", data, "--out", afile], 2, "is a file"),
        ("extract --out FILE", ["extract", "--ckpt", ckpt, "--data", data, "--out", afile], 2, "is a file"),
        ("gradcam --out FILE", ["gradcam", "--ckpt", ckpt, "--data", data, "--out", afile], 2, "is a file"),
        ("convert --out FILE", ["convert", afile, "--model", "resnet18", "--out", afile], 2, "is a file"),
        ("reproduce --out FILE", ["reproduce", "--out", afile], 2, "is a file"),
        ("similarity --out FILE", ["similarity", "nostore", "--out", afile], 2, "is a file"),
        ("curvature --out FILE", ["curvature", "--ckpt", ckpt, "--out", afile], 2, "is a file"),
        ("learning rate -1", ["train", "--learning-rate", "-1", "--out", os.path.join(root, "t")], 2, "--learning-rate"),
        ("learning rate nan", ["train", "--learning-rate", "nan", "--out", os.path.join(root, "t")], 2, "finite"),
        ("grad-align nan", ["train", "--grad-align", "nan", "--out", os.path.join(root, "t")], 2, "--grad-align"),
        ("weight decay inf", ["train", "--weight-decay", "inf", "--out", os.path.join(root, "t")], 2, "finite"),
        ("seed overflow", ["train", "--seed", "99999999999999999999", "--out", os.path.join(root, "t")], 2, "--seed"),
        ("seed negative", ["extract", "--ckpt", ckpt, "--seed", "-1", "--out", os.path.join(root, "t")], 2, "--seed"),
        ("epochs 0", ["train", "--epochs", "0", "--out", os.path.join(root, "t")], 2, "--epochs"),
        ("image size 7", ["train", "--image-size", "7", "--out", os.path.join(root, "t")], 2, "--image-size"),
        ("image size 10000", ["train", "--image-size", "10000", "--out", os.path.join(root, "t")], 2, "--image-size"),
        ("convert image size 7", ["convert", afile, "--model", "resnet18", "--image-size", "7", "--out",
                                  os.path.join(root, "c")], 2, "--image-size"),
        ("bench batch 0", ["bench", "grads", "--batch", "0"], 2, "--batch"),
        ("bench size 0", ["bench", "gradcam", "--size", "0"], 2, "--size"),
        ("max pairs 0", ["gradcam", "--ckpt", ckpt, "--max-pairs", "0", "--out", os.path.join(root, "g")], 2,
         "--max-pairs"),
        ("project dim 0", ["extract", "--ckpt", ckpt, "--project-dim", "0", "--out", os.path.join(root, "s")], 2,
         "--project-dim"),
        ("limit 0", ["extract", "--ckpt", ckpt, "--limit", "0", "--out", os.path.join(root, "s")], 2, "--limit"),
        ("info FILE", ["info", afile], 2, "is a file"),
        ("info twice", ["info", ckpt, "--ckpt", ckpt], 2, "once"),
        ("info missing", ["info", "--ckpt", os.path.join(root, "nothing")], 2, "does not exist"),
        ("reproduce missing ckpt", ["reproduce", "--models", "resnet18", "--ckpt", "resnet18=" +
                                    os.path.join(root, "MISSING"), "--out", os.path.join(root, "r")], 2,
         "does not exist"),
        ("less than a batch", ["train", "--data", data, "--stem", "small", "--image-size", "24", "--batch-size", "64",
                               "--out", os.path.join(root, "t")], 2, "--batch-size"),
        ("unknown command", ["cluster"], 2, "No such command"),
    ]


def test_cheap_failures_are_one_line_and_leave_nothing(capsys, tiny_ckpt, tiny_folder, tmp_path):
    root = str(tmp_path)
    with open(os.path.join(root, "a-file"), "w") as f:
        f.write("not a directory")
    ckpt_before = snapshot(tiny_ckpt)
    for name, argv, want_code, word in _cases(tiny_ckpt, tiny_folder, root):
        before = snapshot(root)
        code, _, err = run_cli(argv, capsys)
        assert_clean(code, err, want_code, word)
        assert snapshot(root) == before, name  # nothing written, nothing half-written
    assert snapshot(tiny_ckpt) == ckpt_before


def test_one_class_and_sixteen_bit_pngs(capsys, tmp_path):
    one = make_folder(tmp_path / "one", classes=("only",), per_class=12)
    code, _, err = run_cli(["train", "--data", f"folder:{one}", "--stem", "small", "--image-size", "24",
                            "--batch-size", "4", "--out", str(tmp_path / "t")], capsys)
    assert_clean(code, err, 2, "two")
    assert not (tmp_path / "t").exists()
    # A 16-bit greyscale PNG is scaled by 65535, not clipped at 255 (which made 98% of pixels white).
    from resnet_jax.core.data.images import rgb_array

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
        rgb = rgb_array(img, 32)
    np.testing.assert_allclose(rgb, np.repeat(ramp[..., None] / 65535.0, 3, axis=-1), atol=1e-6)


def test_damaged_checkpoints_are_named(capsys, tiny_ckpt, tiny_folder, tmp_path):
    step = sorted(n for n in os.listdir(tiny_ckpt) if n.isdigit())[-1]
    cases = {}
    for name in ("metadata", "no-state", "truncated", "meta-json"):
        cases[name] = str(tmp_path / name)
        shutil.copytree(tiny_ckpt, cases[name])
    with open(os.path.join(cases["metadata"], step, "state", "_METADATA"), "wb") as f:
        f.write(b"\xff\xfe garbage")
    shutil.rmtree(os.path.join(cases["no-state"], step, "state"))
    data_dir = os.path.join(cases["truncated"], step, "state", "ocdbt.process_0", "d")
    biggest = max((os.path.join(data_dir, n) for n in os.listdir(data_dir)), key=os.path.getsize)
    os.truncate(biggest, 100)
    with open(os.path.join(cases["meta-json"], step, "meta", "metadata"), "wb") as f:
        f.write(b"\xff{")
    for name, ckpt in cases.items():
        out = tmp_path / f"store-{name}"
        code, _, err = run_cli(["extract", "--ckpt", ckpt, "--data", f"folder:{tiny_folder}:all", "--out", str(out),
                                "--quiet"], capsys)
        assert_clean(code, err, 2, ckpt)
        assert not out.exists(), name


def test_damaged_stores_and_maps_are_named(capsys, tiny_store, tmp_path):
    for name, damage in (("manifest.json", lambda p: open(p, "w").write("{not json")),
                         ("p.npy", lambda p: os.truncate(p, 90)),
                         ("fm.npy", os.remove)):
        store = str(tmp_path / f"s-{name}")
        shutil.copytree(tiny_store, store)
        damage(os.path.join(store, name))
        code, _, err = run_cli(["similarity", store], capsys)
        assert_clean(code, err, 2, os.path.join(store, name))
    cams = tmp_path / "cams"
    cams.mkdir()
    (cams / "metrics.json").write_text("{}")
    code, _, err = run_cli(["similarity", tiny_store, "--cams", str(cams)], capsys)
    assert_clean(code, err, 2, str(cams / "cams.npy"))


def test_extract_that_fails_before_its_first_shard_leaves_nothing(capsys, tiny_ckpt, tmp_path):
    folder = make_folder(tmp_path / "data", per_class=4)
    with open(os.path.join(folder, "circle", "000.png"), "wb"):
        pass  # zero bytes
    out = tmp_path / "store"
    args = ["extract", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}:all", "--out", str(out), "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert_clean(code, err, 2, "000.png")
    assert not out.exists()
    os.remove(os.path.join(folder, "circle", "000.png"))  # the fix the message names
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert len(np.load(out / "labels.npy")) == 11


def test_unfinished_store_of_changed_data_restarts(capsys, tiny_ckpt, tmp_path):
    from resnet_jax.jobs import extract

    folder = make_folder(tmp_path / "data", per_class=4)
    out = str(tmp_path / "store")
    with pytest.raises(extract._Stop):
        extract.run_extract(tiny_ckpt, f"folder:{folder}:all", out, batch_size=4, progress=False,
                            stop_after_shards=1, log=lambda s: None)
    os.remove(os.path.join(folder, "square", "003.png"))  # the data changes (a bad file deleted)
    code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}:all", "--out", out,
                            "--batch-size", "4", "--quiet"], capsys)
    assert code == 0, err
    assert len(np.load(os.path.join(out, "labels.npy"))) == 11


def test_reproduce_leftover_configuration_does_not_block(tmp_path):
    from resnet_jax.paper import reproduce

    out = str(tmp_path / "r")
    reproduce._prepare_out_dir(out, {"checkpoints": {"resnet18": "/MISSING"}}, force=False)
    reproduce._prepare_out_dir(out, {"checkpoints": {}}, force=False)  # nothing else there: not another run
    assert files.read_json(os.path.join(out, "config.json")) == {"checkpoints": {}}
    os.makedirs(os.path.join(out, "runs", "resnet18"))
    with pytest.raises(ValueError, match="checkpoints"):
        reproduce._prepare_out_dir(out, {"checkpoints": {"resnet18": "/x"}}, force=False)


def test_lock_refuses_a_second_writer_and_takes_over_a_stale_one(capsys, tiny_ckpt, tmp_path):
    out = str(tmp_path / "store")
    with files.locked(out):
        assert open(files.lock_path(out)).read().strip() == str(os.getpid())
        code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--out", out], capsys)
        assert_clean(code, err, 2, f"pid {os.getpid()}")
    assert not os.path.exists(files.lock_path(out))
    # A lock file left by a dead process (no flock held) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(files.lock_path(out), "w") as f:
        f.write(dead.stdout)
    with files.locked(out):
        assert open(files.lock_path(out)).read().strip() == str(os.getpid())


def _tiny_tmpfs(path, size):
    """Mounts a tmpfs of `size` at path; returns False where mounting is not allowed."""
    os.makedirs(path)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_full_disk(capsys, tiny_store, tmp_path, monkeypatch):
    from resnet_jax.core import checkpoint

    disk = str(tmp_path / "disk")
    mounted = _tiny_tmpfs(disk, "1m")
    try:
        variables = {"params": {"w": np.random.default_rng(0).random((1024, 1024), np.float32)}, "batch_stats": {}}
        meta = checkpoint.make_meta("resnet18", 2, ["a", "b"], "small", 24, "none")
        if not mounted:  # a write that fails as a full disk would, after Orbax made its temporary step
            def full(self, step, *a, **k):
                os.makedirs(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp-1"))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.directory, str(step)))
            import orbax.checkpoint as ocp
            monkeypatch.setattr(ocp.CheckpointManager, "save", full)
        with pytest.raises((OSError, ValueError)) as caught:
            checkpoint.save(os.path.join(disk, "ckpt"), 1, variables, meta)
        line, code = failure_line(caught.value)
        assert code == 2 and line.startswith("error: ") and "\n" not in line
        assert [n for n in os.listdir(os.path.join(disk, "ckpt")) if "tmp" in n] == []  # no orbax tmp dir left
        # The CLI refuses an --out on a disk without room before computing anything (on the tmpfs: 1 MiB free).
        if mounted:
            code, _, err = run_cli(["similarity", tiny_store, "--out", os.path.join(disk, "t1")], capsys)
            assert_clean(code, err, 2, "free")
            assert not os.path.exists(os.path.join(disk, "t1"))
        # A write that runs out of room is one line naming the file and the fix.
        monkeypatch.setattr(files, "write_atomic", lambda path, write: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)))
        code, _, err = run_cli(["similarity", tiny_store, "--out", str(tmp_path / "t1")], capsys)
        assert_clean(code, err, 2, "disk is full")
        assert "table1.csv" in err
    finally:
        if mounted:
            subprocess.run(["umount", disk])


def test_unexpected_errors_are_one_line_with_exit_1(capsys, monkeypatch):
    from resnet_jax import cli as cli_module
    from resnet_jax.core import files

    monkeypatch.setattr(files, "check_out_dir", lambda *a, **k: 1 / 0)
    code, _, err = run_cli(["similarity", "x", "--out", "y"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "ZeroDivisionError" in lines[0] and "RESNET_JAX_DEBUG" in lines[0]
    monkeypatch.setenv("RESNET_JAX_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli_module.main(["similarity", "x", "--out", "y"])


def test_every_option_has_help_and_no_phantom_command(capsys):
    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        else:
            for param in command.params:
                if isinstance(param, click.Option):
                    yield " ".join(path), param
    missing = [f"{cmd} {p.opts[0]}" for cmd, p in walk(cli, []) if not (p.help or "").strip()]
    assert missing == []
    assert len(list(walk(cli, []))) > 80
    code, out, _ = run_cli(["--help"], capsys)
    named = set(re.findall(r"`([a-z-]+)`", cli.help or ""))  # every command the top-level help names exists
    assert code == 0 and len(named) >= 5 and named <= set(cli.commands), named - set(cli.commands)


def test_sigint_during_the_first_compile_exits_130(tiny_ckpt, tiny_folder, tmp_path):
    """Ctrl-C while XLA compiles: exit 130 and one line, no segfault (the teardown raced the compiler)."""
    env = dict(os.environ, RESNET_JAX_CACHE=str(tmp_path / "cache"), JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu")
    out = tmp_path / "store"
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "resnet-jax"), "extract", "--ckpt",
                             tiny_ckpt, "--data", f"folder:{tiny_folder}:all", "--grad-params", "all",
                             "--project-dim", "256", "--out", str(out), "--quiet"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            # a suite started in the background (`cmd &`) inherits SIGINT ignored, and so would the
                            # command: give it the default disposition, as a terminal's Ctrl-C finds it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = []
    for line in proc.stderr:  # the per-example step's compile starts after its MLIR conversion
        log.append(line)
        if "MLIR module conversion jit(_step)" in line:
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code == 130, (code, "".join(log[-3:]), rest[-2000:])
    assert "interrupted" in rest and "Traceback" not in rest
    assert not out.exists()


def test_symlink_loop_resume_field_and_read_only_out(capsys, tiny_ckpt, tiny_folder, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "data", per_class=3)
    os.symlink("loop-b.png", os.path.join(folder, "circle", "loop-a.png"))
    os.symlink("loop-a.png", os.path.join(folder, "circle", "loop-b.png"))
    out = tmp_path / "store"
    code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}:all", "--out", str(out),
                            "--quiet"], capsys)
    assert_clean(code, err, 2, "loop")
    assert not out.exists()
    # A refused resume names the one field that differs, not the whole configuration.
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(tiny_ckpt, ckpt)
    code, _, err = run_cli(["train", "--data", f"folder:{tiny_folder}", "--stem", "small", "--image-size", "24",
                            "--epochs", "1", "--batch-size", "8", "--learning-rate", "0.5", "--quiet", "--out", ckpt],
                           capsys)
    assert_clean(code, err, 2, "learning_rate=0.002, not 0.5")
    assert "{" not in err
    # A read-only --out (a read-only tmpfs where it can be mounted, else os.access saying so).
    ro = str(tmp_path / "ro")
    if _tiny_tmpfs(ro, "1m") and subprocess.run(["mount", "-o", "remount,ro", ro]).returncode == 0:
        unmount = True
    else:
        unmount = False
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(ro) else real_access(p, mode))
    try:
        code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--out", os.path.join(ro, "s")], capsys)
        assert_clean(code, err, 2, "read-only")
        assert os.listdir(ro) == []
    finally:
        if unmount:
            subprocess.run(["umount", ro])


def test_failure_lines_name_the_file_and_the_fix():
    line, code = failure_line(OSError(errno.ELOOP, "Too many levels of symbolic links", "/d/x.png"))
    assert (line, code) == ("error: /d/x.png: a symbolic link loop: remove or fix the link", 2)
    line, code = failure_line(PermissionError(errno.EACCES, "Permission denied", "/out/a"))
    assert code == 2 and "/out/a" in line and "permission" in line
    assert failure_line(MemoryError()) == ("error: out of memory: lower --batch-size, --image-size or --limit", 2)
    line, code = failure_line(KeyError("state"))
    assert code == 1 and line.startswith("internal error: KeyError")


def test_convert_refuses_nan_weights_and_makes_normal_directories(capsys, tmp_path):
    from safetensors.numpy import save_file

    from resnet_jax.core import weights as convert

    state = {k: np.full(s, 0.5, np.float32) if s else np.array(0, np.int64) for k, s in convert.torchvision_keys("resnet18")}
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"].copy()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = np.nan
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    code, _, err = run_cli(["convert", str(bad), "--model", "resnet18", "--image-size", "64", "--out",
                            str(tmp_path / "ckpt")], capsys)
    assert_clean(code, err, 2, "NaN")
    assert sorted(os.listdir(tmp_path)) == ["nan.safetensors"]
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = 0.5
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    code, _, err = run_cli(["convert", str(good), "--model", "resnet18", "--image-size", "64", "--out",
                            str(tmp_path / "ckpt")], capsys)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o777 & ~umask


def test_nan_loss_without_a_checkpoint_says_so(capsys, tiny_folder, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from resnet_jax.training import train

    monkeypatch.setattr(train, "cross_entropy", lambda logits, labels: jnp.full(labels.shape, jnp.nan))
    out = tmp_path / "t"
    code, _, err = run_cli(["train", "--data", f"folder:{tiny_folder}", "--stem", "small", "--image-size", "24",
                            "--epochs", "1", "--batch-size", "8", "--quiet", "--out", str(out)], capsys)
    assert_clean(code, err, 2, "no checkpoint was written")
    assert "last good" not in err and not out.exists()


def test_extract_estimates_its_disk_space_and_train_decodes_first(capsys, tiny_ckpt, tiny_folder, tmp_path,
                                                                   monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, 100 << 20))  # 100 MiB free
    out = tmp_path / "store"
    # all parameters without projection: 30 x 11.2 M floats, about 2.7 GB with its shards
    code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", f"folder:{tiny_folder}:all", "--grad-params",
                            "all", "--out", str(out), "--quiet"], capsys)
    assert_clean(code, err, 2, "MiB needed")
    assert not out.exists()
    monkeypatch.setattr(shutil, "disk_usage", real)
    # train decodes every file before its first compile: a fake image fails in milliseconds, nothing written.
    folder = make_folder(tmp_path / "data", per_class=6)
    with open(os.path.join(folder, "cross", "005.png"), "wb") as f:
        f.write(b"not a png")
    start = time.perf_counter()
    code, _, err = run_cli(["train", "--data", f"folder:{folder}", "--stem", "small", "--image-size", "24",
                            "--batch-size", "4", "--quiet", "--out", str(tmp_path / "t")], capsys)
    assert_clean(code, err, 2, "005.png")
    assert time.perf_counter() - start < 5 and not (tmp_path / "t").exists()
