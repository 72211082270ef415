"""Ranking metrics for label-error detection (host side: numpy and scikit-learn, no JAX).

A detector gives every image a score, higher = more likely mislabeled; with known flips
(`is_error`, boolean (N,)) a ranking is scored by AUROC, average precision and the recall among
the top-ranked fraction of the data (what a person finds after inspecting that fraction).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

DEFAULT_FRACTIONS = (0.05, 0.10, 0.15, 0.20)


def _check(scores, is_error) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).reshape(-1)
    is_error = np.asarray(is_error).reshape(-1)
    if scores.shape != is_error.shape:
        raise ValueError(f"{scores.size} scores for {is_error.size} labels: pass one score per image")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or Inf: check the detector's inputs")
    return scores, is_error.astype(bool)


def ranking(scores) -> np.ndarray:
    """Returns the image indices (N,) from most to least suspect (ties: lower index first)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    return np.lexsort((np.arange(scores.size), -scores))


def recall_at(scores, is_error, fraction: float) -> float:
    """Returns the fraction of the errors among the ceil(fraction * N) top-ranked images."""
    scores, is_error = _check(scores, is_error)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = int(is_error.sum())
    if total == 0:
        return float("nan")
    top = ranking(scores)[:math.ceil(fraction * scores.size)]
    return float(is_error[top].sum() / total)


def detection_row(scores, is_error, fractions=DEFAULT_FRACTIONS) -> dict:
    """Returns {"auroc", "ap", "recall@5%", ...} of one score vector against the known errors;
    AUROC and AP are NaN when the errors are all or none of the images."""
    scores, is_error = _check(scores, is_error)
    both = 0 < is_error.sum() < is_error.size
    row = {"auroc": float(roc_auc_score(is_error, scores)) if both else float("nan"),
           "ap": float(average_precision_score(is_error, scores)) if both else float("nan")}
    for f in fractions:
        row[f"recall@{round(100 * f):d}%"] = recall_at(scores, is_error, f)
    return row


def detection_table(scores: dict, is_error, fractions=DEFAULT_FRACTIONS) -> list[dict]:
    """Returns one `detection_row` per named score vector, as [{"method": name, ...}]."""
    return [{"method": name, **detection_row(s, is_error, fractions)} for name, s in scores.items()]
