"""The fed device: `extract`'s wall time against the time of its gradient steps alone.

`python -m resnet_jax.benchmarks.device_check feed CKPT` runs it: a ratio near 1 means the input
pipeline keeps the accelerator busy (docs/guides/accelerators.md)."""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time


def fed_device(ckpt_dir: str, data_spec: str = "digits", repeats: int = 3, **extract_kw) -> dict:
    """Wall time of `extract.run_extract` (compiled step cached in-process, store rebuilt each time)
    against the time of its gradient steps alone (the same compiled step on the same batches, already
    on the device, results left there). Runs interleaved `repeats` times; returns the medians and ratios."""
    import jax

    from resnet_jax.core import checkpoint, data, grads, precision
    from resnet_jax.jobs import extract

    prec = extract_kw.get("precision", "fp32")
    ckpt = checkpoint.load(ckpt_dir)
    ds = data.load_for_checkpoint(data_spec, ckpt.meta)
    model = precision.with_precision(ckpt.model, prec)
    fn = grads.build(model, ckpt.variables, params=extract_kw.get("grad_params", "fc"),
                     project_dim=extract_kw.get("project_dim"))
    batch_size = extract_kw.get("batch_size") or 64
    placed = [fn.put(b.images, b.labels) for b in ds.batches(batch_size)]
    step, _ = fn.device_step((ds.image_size, ds.image_size, 3))

    def steps_alone():
        t = time.perf_counter()
        outs = [step(xs, ys) for p in placed for xs, ys, _, _ in p.chunks]
        jax.block_until_ready(outs)
        return time.perf_counter() - t

    tmp = tempfile.mkdtemp(prefix="feed-")
    walls, loads, alone = [], [], []
    try:
        for i in range(repeats + 1):  # the first round compiles
            out = os.path.join(tmp, f"store{i}")
            t = time.perf_counter()
            checkpoint.load(ckpt_dir)
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            manifest = extract.run_extract(ckpt_dir, data_spec, out, progress=False, batch_size=batch_size,
                                           **extract_kw)
            wall = time.perf_counter() - t
            shutil.rmtree(out, ignore_errors=True)
            a = steps_alone()
            if i:
                walls.append(wall)
                loads.append(load_s)
                alone.append(a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall, load, a = statistics.median(walls), statistics.median(loads), statistics.median(alone)
    return {"images": manifest["n"], "grad_params": manifest["run"]["grad_params"], "precision": prec,
            "batch_size": batch_size, "repeats": repeats, "extract_wall_s": wall, "checkpoint_load_s": load,
            "steps_alone_s": a, "ratio": wall / a, "ratio_without_checkpoint_load": (wall - load) / a,
            "device": jax.devices()[0].device_kind, "walls": walls, "alone": alone,
            "images_per_s": manifest["n"] / wall, "n_batches": len(placed)}
