"""The one-command device check (`bin/device-check [--smoke] OUTDIR`) and its measurements.

On a machine whose Python has JAX for its accelerator (and torch/torchvision for the PyTorch
side), one run does, in this order, each step in its own process so that JAX and PyTorch never
hold the accelerator's memory at the same time:

1. `tests`: the test suite's tests marked `device` (pyproject.toml), on the accelerator, with
   float32 matrix products (JAX_DEFAULT_MATMUL_PRECISION=highest: the tests compare with 1e-5
   tolerances that TF32 would break);
2. `ours`: our throughputs for every model, in fp32 and bf16 (`ROWS`, samples/s, median of
   `steps` timed calls after a compile-and-warm-up call, `block_until_ready`, inputs on device);
3. `torch`: the same work in PyTorch with the same models, sizes and batches (`torch_compare`,
   or another script with its arguments: `--torch-script PATH`);
4. `parity`: logits and per-example fc gradients of a torchvision ResNet-18 with random weights,
   converted with `core.weights.from_state_dict`, against PyTorch (`torch_compare.parity`) on the same device;

then writes OUTDIR/device-check.md and OUTDIR/device-check.json: one table with every row, the
PyTorch row it is compared with and the ratio ours / PyTorch, the targets of the accelerator
work, the parity line and the test result. Both files are rewritten after every step, so a run
cut short still leaves what it measured. Without torch or torchvision the PyTorch columns and
the parity line say that they were skipped and why; everything else still runs.

`--smoke` runs the same steps with tiny sizes on whatever device there is (the CPU here): one
model at 72 px, batches of 2-4, one timed call, a few marked tests, bf16 for three rows only, and
steps 1 and 2 side by side (their timings mean nothing there; the compiles are the cost).

`python -m resnet_jax.benchmarks.device_check feed CKPT` measures the fed device (docs/guides/accelerators.md):
`extract`'s wall time against the time of its gradient steps alone.
`python -m resnet_jax.benchmarks.device_check accuracy CKPT` measures bf16 against fp32 (`precision.accuracy`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (row, what it measures, batch key, the torch_compare.py row it is compared with)
ROWS = (
    ("forward", "forward only", "batch", "forward"),
    ("fwd_bwd", "batched forward+backward (mean loss, all parameters)", "batch", "batch_fwd_bwd"),
    ("fc", "per-example fc gradients (closed form)", "batch", "vmap_grad_fc_only"),
    ("all_vmap", "per-example all-parameter gradients, vmap(grad)", "vmap_batch", "vmap_grad_all_params"),
    ("all_taps", "per-example all-parameter gradients, taps", "vmap_batch", "vmap_grad_all_params"),
    ("projected_all", "projected all-parameter gradients (k = 1024)", "batch", "vmap_grad_all_params"),
    ("gradcam", "batched Grad-CAM, layer4", "batch", "gradcam_batched"),
    ("train_step", "training step (AdamW, train-mode BatchNorm)", "batch", "batch_fwd_bwd"),
)
PRECISIONS = ("fp32", "bf16")
# The accelerator targets of the device check (issue 15): (row, compared with, at least).
TARGETS = (
    ("fc", "ours:forward", 0.9),
    ("fc", "torch:vmap_grad_fc_only", 2.0),
    ("all_best", "torch:vmap_grad_all_params", 2.0),
    ("projected_all", "ours:fwd_bwd", 0.5),
    ("gradcam", "torch:gradcam_batched", 2.0),
)

FULL = {"models": {"resnet18": {"batch": 256, "vmap_batch": 64}, "resnet50": {"batch": 256, "vmap_batch": 32}},
        "size": 224, "project_dim": 1024, "steps": 5, "loop_n": 32, "test_timeout": 150, "budget": 330}
SMOKE = {"models": {"resnet18": {"batch": 4, "vmap_batch": 2}},
         "size": 72, "project_dim": 64, "steps": 1, "loop_n": 2, "test_timeout": 120, "budget": 240,
         # bf16's per-example and training rows are compiled by tests/test_precision.py; here they
         # would double the smoke run's compile time
         "rows": {"bf16": ["forward", "fc", "gradcam"]},
         "tests": ["tests/test_gradcam.py::test_layer4_closed_form",
                   "tests/test_models.py::test_intermediate_shapes_224"]}


def log(*args) -> None:
    print(*args, flush=True)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it (a reader never sees half)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- our throughputs

def _row_callable(row: str, model, variables, size: int, batch: int, project_dim: int):
    """Returns a blocking callable computing one batch of `row` (`bench.step_callable`)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from resnet_jax.benchmarks import speed as bench
    from resnet_jax.core import grads

    mesh = grads.make_mesh()
    x, y = bench.random_batch(batch, size, model.num_classes, seed=1, sharding=NamedSharding(mesh, P("batch")))
    var_d = jax.device_put(variables, NamedSharding(mesh, P()))
    return bench.step_callable(row, model, var_d, x, y, project_dim=project_dim)[0]


def bench_ours(config: dict, prec: str, deadline: float, record) -> None:
    """Measures every (model, row) of ROWS in precision `prec`; calls record(result) after each."""

    from resnet_jax.benchmarks import speed as bench
    from resnet_jax.core import models, precision

    for name, batches in config["models"].items():
        base = models.create(name, 1000)
        variables = bench.random_variables(base, config["size"])
        model = precision.with_precision(base, prec)
        for row, _, batch_key, _ in ROWS:
            if row not in config.get("rows", {}).get(prec, [row]):
                continue
            batch = batches[batch_key]
            res = {"model": name, "precision": prec, "row": row, "batch": batch}
            if time.time() > deadline:
                res["skipped"] = "the time budget of the check was spent"
                record(res)
                continue
            try:
                t0 = time.perf_counter()
                fn = _row_callable(row, model, variables, config["size"], batch, config["project_dim"])
                fn()
                res["compile_s"] = round(time.perf_counter() - t0, 2)
                times = []
                for _ in range(config["steps"]):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                res["samples_per_s"] = batch / statistics.median(times)
                log(f"ours  {name:9s} {prec} {row:14s} {res['samples_per_s']:10.1f} samples/s "
                    f"(batch {batch}, first call {res['compile_s']} s)")
            except Exception as e:  # out of memory and the like: report it, go on
                res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                log(f"ours  {name:9s} {prec} {row:14s} error {res['error']}")
            finally:
                fn = None  # frees the row's device buffers before the next row
            record(res)


# ----------------------------------------------------------------------------- PyTorch side

def torch_status() -> str | None:
    """None when torch and torchvision import, else why not (one line)."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built for another torch
        return f"torch/torchvision cannot be imported here ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    return None


# ----------------------------------------------------------------------------- the report

def _ratio(a, b):
    return None if a is None or not b else a / b


def build_table(ours: list, torch_results: dict, torch_skip: str | None) -> list[dict]:
    """One row per (model, row, precision): ours, the PyTorch row compared with, and the ratio."""
    table = []
    order = {row: i for i, (row, _, _, _) in enumerate(ROWS)}
    models_seen = list(dict.fromkeys(r["model"] for r in ours))
    for r in sorted(ours, key=lambda r: (models_seen.index(r["model"]), order[r["row"]], r["precision"] != "fp32")):
        ref = next(t for row, _, _, t in ROWS if row == r["row"])
        tr = torch_results.get(r["model"], {})
        theirs = tr.get(ref) if isinstance(tr.get(ref), (int, float)) else None
        note = r.get("error") or r.get("skipped") or ""
        if theirs is None:
            note = note or torch_skip or tr.get(f"{ref}_error") or "PyTorch row not measured"
        table.append({"model": r["model"], "work": next(w for row, w, _, _ in ROWS if row == r["row"]),
                      "row": r["row"], "precision": r["precision"], "batch": r["batch"],
                      "ours": r.get("samples_per_s"), "torch_row": ref, "torch": theirs,
                      "ratio": _ratio(r.get("samples_per_s"), theirs), "note": note})
    return table


def judge_targets(table: list[dict], on_accelerator: bool) -> list[dict]:
    """The TARGETS per model and precision: measured ratio, and met/missed (accelerators only)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in table):
        for prec in PRECISIONS:
            rows = {r["row"]: r for r in table if r["model"] == model and r["precision"] == prec}
            if not rows:
                continue
            best_all = max((rows[k] for k in ("all_vmap", "all_taps") if rows.get(k, {}).get("ours")),
                           key=lambda r: r["ours"], default=rows.get("all_vmap"))  # None: not measured
            if best_all:
                rows["all_best"] = best_all
            for row, against, at_least in TARGETS:
                side, ref = against.split(":")
                if row not in rows or (side == "ours" and ref not in rows):
                    continue  # a row this run does not measure (the smoke run's bf16)
                mine = rows[row].get("ours")
                if side == "ours":
                    other = rows.get(ref, {}).get("ours")
                else:
                    other = next((r["torch"] for r in rows.values() if r["torch_row"] == ref), None)
                value = _ratio(mine, other)
                status = ("not measured" if value is None else ("met" if value >= at_least else "missed")
                          if on_accelerator else "not judged (no accelerator)")
                label = f"{row} ({rows[row]['row']})" if row == "all_best" else row
                out.append({"model": model, "precision": prec, "target": f"{label} / {against} >= {at_least}",
                            "value": value, "status": status})
    return out


def _fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def write_report(outdir: str, report: dict) -> None:
    """Writes device-check.json and device-check.md into outdir (complete files, replaced)."""
    write_text_atomic(os.path.join(outdir, "device-check.json"), json.dumps(report, indent=1, default=str))
    env = report["environment"]
    lines = [f"# Device check{' (smoke)' if report['smoke'] else ''}", "",
             f"{env.get('devices', '?')}; jax {env.get('jax')}, torch {env.get('torch') or '-'}; "
             f"{report['config']['size']} px; {report['status']}", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"**Tests** (`pytest -m device`): {tests['summary']} in {tests['seconds']:.0f} s", ""]
    par = report.get("parity")
    if par:
        if "skipped" in par or "error" in par:
            lines += [f"**Parity**: {par.get('skipped') or par.get('error')}", ""]
        else:
            ok = par["logits_rel_err"] <= par["tolerance"] and par["fc_grad_rel_err"] <= par["tolerance"]
            lines += [f"**Parity** ({par['model']} converted from torchvision, random weights, {par['size']} px, "
                      f"batch {par['batch']}, torch on {par['torch_device']}, JAX on {par['jax_device']}): max "
                      f"relative error of the logits {par['logits_rel_err']:.2e}, of the per-example fc gradients "
                      f"{par['fc_grad_rel_err']:.2e} (tolerance {par['tolerance']:.0e}: "
                      f"{'passed' if ok else 'FAILED'})", ""]
    if report.get("torch_skipped"):
        lines += [f"**PyTorch rows skipped**: {report['torch_skipped']}", ""]
    lines += ["| model | work | precision | batch | ours (samples/s) | PyTorch row (fp32) | PyTorch (samples/s) "
              "| ours / PyTorch | note |", "|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in report["table"]:
        lines.append(f"| {r['model']} | {r['work']} | {r['precision']} | {r['batch']} | {_fmt(r['ours'])} | "
                     f"{r['torch_row']} | {_fmt(r['torch'])} | {_fmt(r['ratio'], 2)} | {r['note']} |")
    lines += ["", "PyTorch rows come from `torch_compare.py` (fp32, eval-mode BatchNorm); the training step is "
              "compared with its batched forward+backward (no optimiser update).", ""]
    if report.get("targets"):
        lines += ["| model | precision | target | measured | status |", "|---|---|---|---:|---|"]
        lines += [f"| {t['model']} | {t['precision']} | {t['target']} | {_fmt(t['value'], 2)} | {t['status']} |"
                  for t in report["targets"]]
    write_text_atomic(os.path.join(outdir, "device-check.md"), "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the steps

class _Step:
    """A child process of the check: argv, timeout, env; after `_run_steps`, code (None: timed out),
    output and seconds."""

    def __init__(self, argv: list[str], timeout: float, env: dict | None = None):
        self.argv, self.timeout, self.env = argv, timeout, env
        self.code, self.output, self.seconds = None, "", 0.0


def _run_steps(steps: list[_Step], concurrently: bool = False) -> None:
    """Runs the steps one after another (timings that mean something), or all at once (the smoke
    run on the CPU, whose timings mean nothing and whose compiles are single-threaded)."""
    def start(step):
        step.t0 = time.time()
        step.out = tempfile.TemporaryFile("w+")
        step.proc = subprocess.Popen(step.argv, cwd=ROOT, env=step.env, stdout=step.out, stderr=subprocess.STDOUT,
                                     text=True)

    def finish(step):
        try:
            step.code = step.proc.wait(timeout=max(1.0, step.t0 + step.timeout - time.time()))
        except subprocess.TimeoutExpired:
            step.proc.kill()
            step.proc.wait()
        step.seconds = time.time() - step.t0
        step.out.seek(0)
        step.output = step.out.read()
        step.out.close()

    if concurrently:
        for step in steps:
            start(step)
        for step in steps:
            finish(step)
    else:
        for step in steps:
            start(step)
            finish(step)


def tests_step(config: dict, smoke: bool) -> _Step:
    """The `device`-marked tests, float32 matrix products."""
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device"]
    argv += config["tests"] if smoke else ["tests"]
    return _Step(argv, config["test_timeout"], env)


def tests_result(step: _Step) -> dict:
    """{"summary", "exit_code", "seconds", "failures"} of the tests step."""
    last = [line for line in step.output.strip().splitlines() if line.strip()][-1:] or ["no output"]
    summary = last[0].strip("= ") if step.code is not None else f"timed out after {step.timeout:.0f} s"
    failures = [line for line in step.output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"summary": summary, "exit_code": step.code, "seconds": step.seconds, "failures": failures[:20]}


def run_torch_compare(config: dict, outdir: str, skip: str | None,
                      script: str | None = None) -> tuple[dict, str | None]:
    """Runs the PyTorch comparison once per model (its own batches): `torch_compare` or `script`, a
    file taking the same arguments; returns ({model: rows}, skip reason)."""
    if skip:
        return {}, skip
    if script is not None and not os.path.isfile(script):
        return {}, f"{script} is not there"
    prog = [sys.executable, script] if script else [sys.executable, "-m", "resnet_jax.benchmarks.torch_compare"]
    label = os.path.basename(script) if script else "torch_compare"
    results = {}
    for name, b in config["models"].items():
        path = os.path.join(outdir, f"torch_{name}.json")
        argv = prog + ["--models", name, "--size", str(config["size"]), "--batch", str(b["batch"]),
                       "--vmap-batch", str(b["vmap_batch"]), "--loop-n", str(config["loop_n"]), "--json", path]
        step = _Step(argv, 300)
        _run_steps([step])
        log(step.output.rstrip())
        if step.code == 0 and os.path.exists(path):
            with open(path) as f:
                got = json.load(f)
            results[name] = got[name]
            results["_meta"] = {k: v for k, v in got.items() if not isinstance(v, dict)}
        else:
            results[name] = {f"{row}_error": f"{label} failed (exit {step.code})" for _, _, _, row in ROWS}
    return results, None


def _environment() -> dict:
    import jax

    env = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
           "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "processor": platform.processor()}
    try:
        import torch
        env["torch"] = torch.__version__
    except Exception:
        env["torch"] = None
    return env


def device_check(outdir: str, smoke: bool, torch_script: str | None = None) -> int:
    """Runs the four steps (module docstring); returns 0 when the tests and the parity passed."""
    os.makedirs(outdir, exist_ok=True)
    config = dict(SMOKE if smoke else FULL)
    started = time.time()
    report = {"smoke": smoke, "config": config, "environment": _environment(), "status": "running", "table": []}
    log(f"device check ({'smoke' if smoke else 'full'}): {report['environment']}")
    write_report(outdir, report)

    log("== 1. tests marked `device`; 2. our throughputs" + (" (side by side)" if smoke else ""))
    tests = tests_step(config, smoke)
    ours_paths = {prec: os.path.join(outdir, f"ours-{prec}.json") for prec in PRECISIONS}
    deadline = started + config["budget"]
    bench = [_Step([sys.executable, "-m", "resnet_jax.benchmarks.device_check", "ours", path, "--config", json.dumps(config),
                    "--precision", prec, "--deadline", str(deadline)], config["budget"] + 300)
             for prec, path in ours_paths.items()]
    _run_steps([tests] + bench, concurrently=smoke)
    report["tests"] = tests_result(tests)
    log(f"tests: {report['tests']['summary']} ({report['tests']['seconds']:.0f} s)")
    for line in report["tests"]["failures"]:
        log(f"  {line}")
    ours = []
    for step, path in zip(bench, ours_paths.values()):
        log(step.output.rstrip())
        if os.path.exists(path):
            with open(path) as f:
                ours += json.load(f)
    report["ours_exit_codes"] = [step.code for step in bench]
    skip = torch_status()
    report["table"] = build_table(ours, {}, skip)
    write_report(outdir, report)

    log(f"== 3. PyTorch ({torch_script or 'torch_compare'})")
    torch_results, skip = run_torch_compare(config, outdir, skip, torch_script)
    if skip:
        log(f"PyTorch rows skipped: {skip}")
    report["torch_skipped"] = skip
    report["torch"] = torch_results
    report["table"] = build_table(ours, torch_results, skip)
    write_report(outdir, report)

    log("== 4. parity with PyTorch")
    if skip:
        report["parity"] = {"skipped": f"skipped: {skip}"}
    else:
        par_path = os.path.join(outdir, "parity.json")
        argv = [sys.executable, "-m", "resnet_jax.benchmarks.device_check", "parity", par_path, "--size", str(config["size"])]
        step = _Step(argv, 300)
        _run_steps([step])
        log(step.output.rstrip())
        report["parity"] = (json.load(open(par_path)) if step.code == 0 and os.path.exists(par_path)
                            else {"error": f"parity failed (exit {step.code}): {step.output.strip().splitlines()[-1:]}"})
    on_accel = report["environment"]["backend"] != "cpu"
    report["targets"] = judge_targets(report["table"], on_accel)
    par = report["parity"]
    parity_ok = "skipped" in par or ("error" not in par and par["logits_rel_err"] <= par["tolerance"]
                                     and par["fc_grad_rel_err"] <= par["tolerance"])
    ok = (report["tests"]["exit_code"] == 0 and parity_ok and all(c == 0 for c in report["ours_exit_codes"])
          and all(r["ours"] for r in report["table"]))
    report["seconds"] = round(time.time() - started, 1)
    report["status"] = f"{'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s"
    write_report(outdir, report)
    log(f"device check {report['status']}: {os.path.join(outdir, 'device-check.md')}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bin/device-check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p_ours = sub.add_parser("ours", help=argparse.SUPPRESS)
    p_ours.add_argument("out")
    p_ours.add_argument("--config", required=True)
    p_ours.add_argument("--deadline", type=float, required=True)
    p_ours.add_argument("--precision", choices=PRECISIONS, required=True)
    p_par = sub.add_parser("parity", help=argparse.SUPPRESS)
    p_par.add_argument("out")
    p_par.add_argument("--size", type=int, default=224)
    p_feed = sub.add_parser("feed", help="extract's wall time against its gradient steps alone")
    p_feed.add_argument("ckpt")
    p_feed.add_argument("--data", default="digits")
    p_feed.add_argument("--grad-params", default="fc")
    p_feed.add_argument("--project-dim", type=int, default=None)
    p_feed.add_argument("--precision", default="fp32")
    p_feed.add_argument("--repeats", type=int, default=3)
    p_acc = sub.add_parser("accuracy", help="bf16 against fp32 on the same images")
    p_acc.add_argument("ckpt")
    p_acc.add_argument("--data", default="digits")
    p_acc.add_argument("--limit", type=int, default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("ours", "parity", "feed", "accuracy"):
        run = argparse.ArgumentParser(prog="bin/device-check",
                                      description="The device check: tests, our bench, PyTorch's, parity. "
                                                  "Also: bin/device-check feed|accuracy CKPT (see -h of each).")
        run.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU (tests run it)")
        run.add_argument("--torch-script", default=None,
                         help="a PyTorch comparison script taking torch_compare's arguments (default: ours)")
        run.add_argument("outdir", help="folder for device-check.md and device-check.json (e.g. $OUT)")
        a = run.parse_args(argv)
        return device_check(a.outdir, a.smoke, a.torch_script)
    a = parser.parse_args(argv)
    from resnet_jax.core.compile_cache import enable as _setup_jax

    _setup_jax()  # the persistent compilation cache, as the CLI's commands use it
    if a.command == "ours":
        config = json.loads(a.config)
        results: list = []

        def record(res):
            results.append(res)
            write_text_atomic(a.out, json.dumps(results, indent=1))
        bench_ours(config, a.precision, a.deadline, record)
        return 0
    if a.command == "parity":
        from resnet_jax.benchmarks.torch_compare import parity

        res = parity(a.size)
        log(f"parity: logits {res['logits_rel_err']:.2e}, fc gradients {res['fc_grad_rel_err']:.2e}")
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return 0
    if a.command == "feed":
        from resnet_jax.benchmarks.feed import fed_device

        res = fed_device(a.ckpt, a.data, repeats=a.repeats, grad_params=a.grad_params, project_dim=a.project_dim,
                         precision=a.precision)
        print(json.dumps(res, indent=1))
        return 0
    if a.command == "accuracy":
        import numpy as np

        from resnet_jax.benchmarks import precision
        from resnet_jax.core import checkpoint, data

        ckpt = checkpoint.load(a.ckpt)
        ds = data.load_for_checkpoint(a.data, ckpt.meta)
        batch = ds.take(np.arange(min(len(ds), a.limit or len(ds))))
        res = precision.accuracy(ckpt.model, ckpt.variables, batch.images, batch.labels)
        print(json.dumps(res, indent=1))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
