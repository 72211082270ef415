"""`resnet-jax curvature`: the curvature report of a checkpoint on a data set (a job over
`training.hessian`'s Hessian-vector products)."""
from __future__ import annotations

import numpy as np

from resnet_jax.core import checkpoint, data
from resnet_jax.errors import UserError
from resnet_jax.training.hessian import curvature_report


def curvature_of_checkpoint(ckpt_dir: str, data_spec: str, limit: int | None, params: str = "fc", n_iter: int = 20,
                            n_samples: int = 30, seed: int = 0, draws: int = 5):
    """`resnet-jax curvature`: curvature_report of the first `limit` images of `data_spec` fed to the
    checkpoint, with `draws` equal-size subsample draws. Returns (report, rows: one dict per group, then
    one per group's equal-size subsamples (top_eigenvalue: the mean over the draws), note: a description
    with the spread over the draws)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    ckpt = checkpoint.load(ckpt_dir)
    ds = data.load_for_checkpoint(data_spec, ckpt.meta, seed=seed)
    batch = ds.take(np.arange(min(len(ds), limit or len(ds))))
    report = curvature_report(ckpt.model, ckpt.variables, batch.images, batch.labels, params=params, n_iter=n_iter,
                              n_samples=n_samples, seed=seed, draws=draws)
    rows = [{"group": name, **{k: g.get(k) for k in ("count", "loss", "top_eigenvalue", "trace", "trace_stderr")}}
            for name, g in report["groups"].items()]
    note = (f"Hessian of the mean loss w.r.t. {report['params']} ({report['n_params']:,} parameters), "
            f"{report['n_images']} images of {ds.spec}, accuracy {report['accuracy']:.4f}. The top eigenvalue "
            f"shrinks as a group grows: compare the groups at equal size")
    eq = report["equal_size"]
    if eq:
        for name in ("correct", "misclassified"):
            rows.append({"group": f"{name}, {eq['size']}-image subsamples", "count": eq["size"],
                         "top_eigenvalue": eq[name]["mean"]})
        note += (f": {eq['draws']} draws of {eq['size']} images per group, top eigenvalue mean +- std: correct "
                 f"{eq['correct']['mean']:.4g} +- {eq['correct']['std']:.2g}, misclassified "
                 f"{eq['misclassified']['mean']:.4g} +- {eq['misclassified']['std']:.2g}")
    else:
        note += " (not possible here: a group is empty)"
    return report, rows, note
