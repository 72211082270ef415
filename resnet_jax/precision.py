"""Mixed precision: `fp32` (the default) or `bf16` compute for extract, gradcam and train.

`bf16` runs the convolutions, matrix products and activations of the network in bfloat16 while
the parameters stay float32 (Flax's `param_dtype`), so training updates, optimiser state and
gradients with respect to the parameters are float32. What is float32 under bf16 as well:
the logits and pooled features (`models.ResNet` casts them), the loss and softmax, BatchNorm's
statistics (Flax reduces them in float32), the closed-form fc gradient (float32 products of the
float32 features and softmax), the sums over positions of the projected gradients
(`projection.project_pair` accumulates in float32), and Grad-CAM's channel weights and maps.

`accuracy(...)` measures what bf16 costs against fp32 on the same images and weights.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .errors import UserError

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def check(precision: str) -> str:
    """Returns `precision` if it is one of PRECISIONS, else raises UserError."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision: str):
    """The compute dtype of `precision` (jnp.float32 or jnp.bfloat16)."""
    return _DTYPES[check(precision)]


def with_precision(model, precision: str):
    """Returns the (unbound) Flax module `model` computing in `precision`'s dtype, float32 parameters."""
    dtype = compute_dtype(precision)
    return model if model.dtype == dtype else model.clone(dtype=dtype)


def row_cosines(a, b) -> np.ndarray:
    """(N,) cosine similarity of matching rows of a and b (N, D); 1.0 where both rows are zero."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("nd,nd->n", a, b)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))


def accuracy(model, variables, images, labels, *, project_dim: int = 1024, layer: str = "layer4",
             seed: int = 0) -> dict:
    """bf16 against fp32 on the same images: returns {"fc_cosine", "projected_all_cosine",
    "gradcam_cc", "prediction_agreement"} each as {"mean", "min"} over the images (agreement: a
    fraction), plus "n". Cosines are per image between the fp32 and bf16 gradients (fc closed form;
    all parameters projected to `project_dim`), CC is the Pearson correlation of the two Grad-CAM maps.
    """
    from metrics import saliency

    from . import gradcam, grads

    rows: dict = {}
    for precision in PRECISIONS:
        net = with_precision(model, precision)
        fc = grads.compute(net, variables, images, labels, params="fc")
        proj = grads.compute(net, variables, images, labels, params="all", project_dim=project_dim, seed=seed)
        cams = gradcam.gradcam(net, variables, images, labels, layer=layer)
        rows[precision] = (fc["gw"], proj["gw"], cams, fc["preds"])
    (fc32, pr32, cam32, pred32), (fc16, pr16, cam16, pred16) = rows["fp32"], rows["bf16"]
    cc = saliency.score_batch("cc", cam16, cam32, undefined="nan")  # NaN where a map is constant

    def summary(v):
        v = np.asarray(v, np.float64)
        return {"mean": float(np.nanmean(v)), "min": float(np.nanmin(v))}

    return {"n": int(len(images)), "fc_cosine": summary(row_cosines(fc32, fc16)),
            "projected_all_cosine": summary(row_cosines(pr32, pr16)), "gradcam_cc": summary(cc),
            "prediction_agreement": float(np.mean(pred32 == pred16))}
