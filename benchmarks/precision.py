"""What bf16 costs against fp32 on the same images and weights (`bin/device-check accuracy`)."""
from __future__ import annotations

import numpy as np

from resnet_jax.core import gradcam, grads
from resnet_jax.core.precision import PRECISIONS, with_precision
from resnet_jax.metrics import saliency


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
