"""How well Grad-CAM maps agree: with object masks (localisation) and across same-class images.

The draft reports Grad-CAM CC, KLD, SSIM/SIM and AUC without saying what the maps are compared
with. Two readings, both computed with the saliency metrics of `metrics.saliency`:
- localisation: each image's map (prediction) against its object mask (reference), where the
  data has masks;
- consistency: for pairs of images of the same class, one map (prediction) against the other
  (reference) — our reading of the draft; all pairs, or a seeded sample when there are more;
  with its baseline, the same scores over pairs of images of different classes, and the gap
  (same - different). A high same-class score alone does not show class-specific maps: maps that
  ignore the image (an untrained network) agree best, so only the gap speaks of the class, and
  only the localisation speaks of the object.
A pair that makes a metric undefined (a constant map, a mask with no object) is left out of that
metric's mean and counted in `undefined`. Each metric reports the mean, the median (KLD of min-max
scaled maps is dominated by a few pairs of mismatched support) and the standard deviation.
"""
from __future__ import annotations

import numpy as np

from .saliency import score_batch

TABLE_METRICS = ("cc", "kld", "sim", "ssim", "auc_judd")
ALL_METRICS = TABLE_METRICS + ("nss", "auc_borji")


def same_class_pairs(labels, max_pairs: int | None = 2000, seed: int = 0):
    """Returns (i, j, sampled): index arrays of same-class pairs i < j, at most `max_pairs` of them.

    With more pairs than `max_pairs` a seeded uniform sample (without replacement) is drawn.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    firsts, seconds = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        a, b = np.triu_indices(len(members), k=1)
        firsts.append(members[a])
        seconds.append(members[b])
    i = np.concatenate(firsts) if firsts else np.zeros(0, int)
    j = np.concatenate(seconds) if seconds else np.zeros(0, int)
    sampled = max_pairs is not None and len(i) > max_pairs
    if sampled:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False))
        i, j = i[keep], j[keep]
    return i, j, sampled


def different_class_pairs(labels, max_pairs: int | None = 2000, seed: int = 0):
    """Returns (i, j, sampled): index arrays of pairs i < j of different labels, at most `max_pairs`.

    With more pairs than `max_pairs` a seeded uniform sample (without replacement) is drawn.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    i, j = np.triu_indices(len(labels), k=1)
    keep = labels[i] != labels[j]
    i, j = i[keep], j[keep]
    sampled = max_pairs is not None and len(i) > max_pairs
    if sampled:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False))
        i, j = i[keep], j[keep]
    return i, j, sampled


def _summarise(preds, refs, metrics) -> dict:
    out = {}
    for name in metrics:
        scores = score_batch(name, preds, refs, undefined="nan")
        defined = scores[~np.isnan(scores)]
        out[name] = {"mean": float(defined.mean()) if len(defined) else None,
                     "median": float(np.median(defined)) if len(defined) else None,
                     "std": float(defined.std()) if len(defined) else None,
                     "n": int(len(defined)), "undefined": int(len(scores) - len(defined))}
    return out


def localisation(cams, masks, metrics=ALL_METRICS) -> dict:
    """Returns {metric: {"mean", "std", "n", "undefined"}} of each map (N, H, W) against its mask (N, H, W)."""
    cams, masks = np.asarray(cams, np.float64), np.asarray(masks, np.float64)
    if cams.shape != masks.shape:
        raise ValueError(f"Grad-CAM maps {cams.shape} and masks {masks.shape} differ in shape: "
                         f"compute the maps at the masks' image size")
    return _summarise(cams, masks, metrics)


def consistency(cams, labels, max_pairs: int | None = 2000, seed: int = 0, metrics=ALL_METRICS) -> dict:
    """Returns {"pairs", "sampled", "metrics": {metric: {...}}, "different": {"pairs", "sampled",
    "metrics"} or None, "gap": {metric: same-class mean - different-class mean}} over pairs of maps
    (N, H, W): same-class pairs and, as their baseline, different-class pairs (each at most
    `max_pairs`, seeded samples).

    A class with a single image contributes no pair; no same-class pair at all raises ValueError.
    """
    cams = np.asarray(cams, np.float64)
    labels = np.asarray(labels)
    if cams.ndim != 3 or len(cams) != len(labels):
        raise ValueError(f"need maps (N, H, W) and labels (N,), got {cams.shape} and {labels.shape}")
    i, j, sampled = same_class_pairs(labels, max_pairs, seed)
    if len(i) == 0:
        raise ValueError("no class has two images, so no same-class pair of Grad-CAM maps exists: use more images")
    same = _summarise(cams[i], cams[j], metrics)
    di, dj, dsampled = different_class_pairs(labels, max_pairs, seed)
    different = ({"pairs": int(len(di)), "sampled": bool(dsampled), "metrics": _summarise(cams[di], cams[dj], metrics)}
                 if len(di) else None)
    gap = {m: (same[m]["mean"] - different["metrics"][m]["mean"]
               if different and same[m]["mean"] is not None and different["metrics"][m]["mean"] is not None else None)
           for m in metrics}
    return {"pairs": int(len(i)), "sampled": bool(sampled), "metrics": same, "different": different, "gap": gap}
