"""Is this prediction wrong? Scores computed from a model's outputs without the image's label.

Host side (numpy, scipy, scikit-learn; no JAX). Every score is an (N,) float64 array, higher = more
likely a misclassification, so every score is read the same way by `detection_row` (AUROC, AUPR with
the errors as positives, FPR at 95% TPR). The baselines are the maximum softmax probability
(Hendrycks & Gimpel, 2017) and the softmax margin. The others:

- entropy of the softmax;
- the predicted-label fc gradient: for the loss at the predicted label y^ the fc gradient is
  [h, 1] x (p - e_y^) (kernel and bias), so its norm is sqrt(|h|^2 + 1) |p - e_y^| exactly;
- GradNorm (Huang et al., 2021): the L1 norm of the fc gradient of KL(uniform || softmax), which is
  (|h|_1 + 1) |p - 1/C|_1; *high* GradNorm means confident, so the score is its negation;
- feature-space distances to the class centroids of the *training* images: the cosine distance to
  the predicted class's centroid, and the Mahalanobis distance to the nearest class mean with one
  covariance shared by the classes (Lee et al., 2018; pseudo-inverse where it is singular);
- the k-th nearest training neighbour's distance between unit-length features (Sun et al., 2022),
  k fixed at KNN_K before any score was seen;
- the fc gradient's direction: one minus its cosine with the predicted class's centroid of the
  training images' fc gradients (built with their true labels).

None of these sees the held-out label: a score that did (the loss, the true-label gradient) would
separate the errors by construction.
"""
from __future__ import annotations

import numpy as np
import scipy.special
import scipy.stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from .validate import as_labels, as_real_matrix

KNN_K = 10
DETECTION_TPR = 0.95


def _logits(logits) -> np.ndarray:
    z = as_real_matrix(logits, "logits").astype(np.float64)
    if z.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes (N, C), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits contains NaN or Inf; check the model outputs")
    return z


def _features(h, name, n=None) -> np.ndarray:
    h = as_real_matrix(h, name).astype(np.float64)
    if n is not None and len(h) != n:
        raise ValueError(f"{name} has {len(h)} rows for {n} images: pass one row per image")
    if not np.isfinite(h).all():
        raise ValueError(f"{name} contains NaN or Inf; check the model outputs")
    return h


def softmax_scores(logits) -> dict:
    """Returns {"msp", "margin", "entropy"}: minus the maximum softmax probability, minus the gap
    between the two largest probabilities, and the softmax entropy (nats)."""
    z = _logits(logits)
    logp = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(logp)
    top2 = np.sort(p, axis=1)[:, -2:]
    return {"msp": -top2[:, 1], "margin": -(top2[:, 1] - top2[:, 0]),
            "entropy": -np.sum(p * logp, axis=1)}


def fc_gradient_scores(features, logits) -> dict:
    """Returns {"grad_norm_pred_fc", "gradnorm"} (see the module docstring), exact from the factors."""
    z = _logits(logits)
    h = _features(features, "features", len(z))
    p = scipy.special.softmax(z, axis=1)
    pred = z.argmax(axis=1)
    delta = p.copy()
    rows = np.arange(len(z))
    delta[rows, pred] = -(p.sum(axis=1) - p[rows, pred])  # p_y^ - 1 without cancellation
    norm = np.sqrt((np.einsum("nd,nd->n", h, h) + 1.0) * np.einsum("nc,nc->n", delta, delta))
    gradnorm = (np.abs(h).sum(axis=1) + 1.0) * np.abs(p - 1.0 / z.shape[1]).sum(axis=1)
    return {"grad_norm_pred_fc": norm, "gradnorm": -gradnorm}


def class_centroids(X, labels, num_classes: int) -> np.ndarray:
    """Returns (num_classes, D) unit-length means of the unit-length rows of each class (the cosine
    centroids); a class without rows, or whose unit rows average to zero, gets a row of NaN."""
    X = _features(X, "X")
    labels = as_labels(labels, len(X), "labels")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    U = X / np.where(norms > 0, norms, 1.0)
    out = np.full((num_classes, X.shape[1]), np.nan)
    for c in range(num_classes):
        s = U[labels == c].sum(axis=0)
        length = np.linalg.norm(s)
        if length > 0:
            out[c] = s / length
    return out


def centroid_cosines(X, centroids) -> np.ndarray:
    """Returns (N, C) cosines of the rows of X with unit-length centroids (NaN rows: -inf)."""
    X = _features(X, "X")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    S = (X / np.where(norms > 0, norms, 1.0)) @ np.nan_to_num(np.asarray(centroids, np.float64)).T
    S[:, np.isnan(np.asarray(centroids)).any(axis=1)] = -np.inf
    return S


def kron_centroid_cosines(train_a, train_b, train_labels, a, b, num_classes: int) -> np.ndarray:
    """Returns (N, C) cosines of the rows kron(a_i, b_i) with the class centroids of the training rows
    kron(train_a_j, train_b_j), never forming the rows: a class's summed unit rows are the matrix
    S_c = sum_j a_j b_j^T / (|a_j| |b_j|) and a row's cosine with it is a_i^T S_c b_i / (|a_i| |b_i| |S_c|_F)."""
    def unit(M, name):
        M = _features(M, name)
        n = np.linalg.norm(M, axis=1, keepdims=True)
        return M / np.where(n > 0, n, 1.0)

    ta, tb, ua, ub = unit(train_a, "train_a"), unit(train_b, "train_b"), unit(a, "a"), unit(b, "b")
    train_labels = as_labels(train_labels, len(ta), "train_labels")
    out = np.full((len(ua), num_classes), -np.inf)
    for c in range(num_classes):
        members = train_labels == c
        S = ta[members].T @ tb[members]
        length = np.linalg.norm(S)
        if length > 0:
            out[:, c] = np.einsum("nm,mc,nc->n", ua, S, ub) / length
    return out


def shared_covariance_precision(train_features, train_labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (means (C, D), precision (D, D)): the class means of the training features and the
    pseudo-inverse of the covariance of their deviations from their class means, shared by the classes."""
    h = _features(train_features, "train_features")
    y = as_labels(train_labels, len(h), "train_labels")
    means = np.stack([h[y == c].mean(axis=0) if np.any(y == c) else np.full(h.shape[1], np.nan)
                      for c in range(num_classes)])
    dev = h - np.nan_to_num(means)[y]
    cov = dev.T @ dev / len(h)
    return means, np.linalg.pinv(cov, hermitian=True)


def mahalanobis_scores(features, means, precision) -> np.ndarray:
    """Returns (N,) the smallest squared Mahalanobis distance of each row to a class mean."""
    h = _features(features, "features")
    best = np.full(len(h), np.inf)
    for mu in np.asarray(means, np.float64):
        if np.isnan(mu).any():
            continue
        d = h - mu
        best = np.minimum(best, np.einsum("nd,de,ne->n", d, precision, d))
    return best


def knn_scores(features, train_features, k: int = KNN_K, chunk: int = 2048) -> np.ndarray:
    """Returns (N,) the Euclidean distance between unit-length features to the k-th nearest unit-length
    training feature (in chunks of `chunk` rows: memory N_chunk x N_train)."""
    h = _features(features, "features")
    t = _features(train_features, "train_features", None)
    if not 1 <= k <= len(t):
        raise ValueError(f"k must be in [1, {len(t)}] (the training images), got {k}")
    unit = lambda M: M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-300)  # noqa: E731
    h, t = unit(h), unit(t)
    out = np.empty(len(h))
    for lo in range(0, len(h), chunk):
        sims = h[lo:lo + chunk] @ t.T
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        out[lo:lo + chunk] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def fpr_at_tpr(is_error, score, tpr: float = DETECTION_TPR) -> float:
    """Returns the false-positive rate (correct images flagged) at the first threshold that flags at
    least `tpr` of the errors."""
    fpr, tprs, _ = roc_curve(is_error, score)
    return float(fpr[np.searchsorted(tprs, tpr - 1e-12, side="left")])


def _check(is_error, score):
    is_error = np.asarray(is_error).reshape(-1).astype(bool)
    score = np.asarray(score, np.float64).reshape(-1)
    if score.shape != is_error.shape:
        raise ValueError(f"{score.size} scores for {is_error.size} images: pass one score per image")
    if not np.isfinite(score).all():
        raise ValueError("scores hold NaN or Inf: check the detector's inputs")
    return is_error, score


def detection_row(is_error, score) -> dict:
    """Returns {"auroc", "aupr", "fpr95"} of one score against the errors (positives); NaN when the
    errors are all or none of the images."""
    is_error, score = _check(is_error, score)
    if not 0 < is_error.sum() < is_error.size:
        return {"auroc": float("nan"), "aupr": float("nan"), "fpr95": float("nan")}
    return {"auroc": float(roc_auc_score(is_error, score)),
            "aupr": float(average_precision_score(is_error, score)), "fpr95": fpr_at_tpr(is_error, score)}


def auroc_ranks(is_error, scores) -> np.ndarray:
    """AUROC of each row of scores (S, N) by the Mann-Whitney statistic on midranks (ties count 1/2),
    the quantity roc_auc_score computes; vectorised for the bootstrap."""
    is_error = np.asarray(is_error, bool)
    ranks = scipy.stats.rankdata(np.atleast_2d(scores), axis=1)
    n1, n0 = is_error.sum(), (~is_error).sum()
    return (ranks[:, is_error].sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def paired_auroc_difference(is_error, score, baseline, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict:
    """Returns {"difference", "low", "high"}: AUROC(score) - AUROC(baseline) on the images and its
    percentile bootstrap interval, the images resampled with replacement (the same resample for both
    scores: a paired comparison); resamples without an error or without a correct image are redrawn."""
    is_error, score = _check(is_error, score)
    _, baseline = _check(is_error, baseline)
    if not 0 < is_error.sum() < is_error.size:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < n_boot:
        idx = rng.integers(0, len(score), size=len(score))
        e = is_error[idx]
        if 0 < e.sum() < e.size:
            a = auroc_ranks(e, np.stack([score[idx], baseline[idx]]))
            diffs.append(a[0] - a[1])
    a = auroc_ranks(is_error, np.stack([score, baseline]))
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(a[0] - a[1]), "low": float(lo), "high": float(hi)}
