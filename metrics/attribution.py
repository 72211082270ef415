"""Host-side statistics of training-data attribution: running top-K over chunks of scores, the
summary of what the top proponents of the errors have in common, and spreads over seeds."""
from __future__ import annotations

import numpy as np


class RunningTop:
    """The K largest (and K smallest) scores per row over column chunks, with their column indices.

    `add(scores (M, n), offset)` merges the columns offset..offset+n; `largest()` and `smallest()`
    return (indices (M, K) int64, scores (M, K) float64), largest first / smallest first; ties go
    to the lower column index."""

    def __init__(self, rows: int, k: int):
        self.k = int(k)
        self._hi = (np.empty((rows, 0), np.int64), np.empty((rows, 0)))
        self._lo = (np.empty((rows, 0), np.int64), np.empty((rows, 0)))

    @staticmethod
    def _merge(kept, scores, offset, k, sign):
        idx = np.concatenate([kept[0], np.broadcast_to(np.arange(offset, offset + scores.shape[1]), scores.shape)], 1)
        val = np.concatenate([kept[1], np.asarray(scores, np.float64)], 1)
        order = np.lexsort((idx, -sign * val), axis=1)[:, :k]  # by score, then by index
        return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)

    def add(self, scores, offset: int) -> None:
        self._hi = self._merge(self._hi, scores, offset, self.k, 1.0)
        self._lo = self._merge(self._lo, scores, offset, self.k, -1.0)

    def largest(self):
        return self._hi

    def smallest(self):
        return self._lo


def proponent_summary(proponent_labels, predicted, train_labels, lookalike, proponent_flipped=None,
                      flipped=None) -> dict:
    """Returns how often the top proponents (M, K) of M explained images carry the predicted label,
    carry a flipped label, and look alike (`lookalike` (M, K) bool: among the test image's K nearest
    training images), each beside its chance level over the training set (labels (N,), flipped (N,))."""
    proponent_labels = np.asarray(proponent_labels)
    predicted = np.asarray(predicted)
    train_labels = np.asarray(train_labels)
    k = proponent_labels.shape[1]
    out = {"explained": int(proponent_labels.shape[0]), "top": int(k),
           "carry_predicted_label": float(np.mean(proponent_labels == predicted[:, None])),
           "carry_predicted_label_chance": float(np.mean([np.mean(train_labels == p) for p in predicted])),
           "look_alike": float(np.mean(lookalike)),
           "look_alike_chance": float(k / train_labels.size)}
    if proponent_flipped is not None and flipped is not None:
        out["carry_flipped_label"] = float(np.mean(proponent_flipped))
        out["carry_flipped_label_chance"] = float(np.mean(flipped))
    return out


def spread(values) -> dict:
    """Returns {"mean", "std" (sample, ddof=1; 0 for one value), "min", "max", "n"} of the values."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def removal_correlation(scores, removals, loss_change) -> dict:
    """Returns how well influence scores predict what retraining without images did: per test image, the
    Spearman correlation over the R retrainings between the predicted change of its loss (the sum of the
    scores (M, N) of the removed training images: removing a proponent raises the loss of the prediction)
    and the measured change `loss_change` (R, M); {"mean" over the test images with a defined correlation,
    "per_image" (M,) with NaN where either side is constant, "runs": R}."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    predicted = np.stack([scores[:, np.asarray(r, np.int64)].sum(1) for r in removals])  # (R, M)
    actual = np.asarray(loss_change, np.float64)
    if predicted.shape != actual.shape:
        raise ValueError(f"loss_change has shape {actual.shape}, the removals and scores give {predicted.shape}")
    # Spearman's rho per test image: Pearson's correlation of the (tie-averaged) ranks over the runs
    a, b = (rankdata(x, axis=0) for x in (predicted, actual))
    a, b = a - a.mean(0), b - b.mean(0)
    defined_here = (np.ptp(predicted, axis=0) > 0) & (np.ptp(actual, axis=0) > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(defined_here, (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0)), np.nan)
    defined = rho[~np.isnan(rho)]
    return {"mean": float(defined.mean()) if defined.size else None, "per_image": rho, "runs": int(actual.shape[0])}


def removal_correlation_null(scores, removals, loss_change, draws: int = 200, seed: int = 0) -> dict:
    """Returns the baseline of `removal_correlation` for scores that know nothing: its mean over the test
    images recomputed `draws` times with each test image's scores (M, N) shuffled over the training
    images (numpy default_rng(seed).permuted along axis 1); {"mean", "std" of those means, "draws"}."""
    rng = np.random.default_rng(seed)
    scores = np.asarray(scores, np.float64)
    means = [removal_correlation(rng.permuted(scores, axis=1), removals, loss_change)["mean"] for _ in range(draws)]
    means = np.asarray([m for m in means if m is not None], np.float64)
    return {"mean": float(means.mean()) if means.size else None,
            "std": float(means.std(ddof=1)) if means.size > 1 else None, "draws": int(draws)}
