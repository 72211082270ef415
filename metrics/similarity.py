"""Intra- vs inter-class cosine similarity of representations and of fc-layer gradients.

All summaries are exact and avoid the N x N similarity matrix: with unit rows u_i and
s_c the sum of a class's unit rows, the sum of cos(u_i, u_j) over ordered pairs i != j
of that class is ||s_c||^2 - n_c. The inter-class sum is the same identity applied to
all rows minus the intra-class sums. Host-side only (numpy / scipy).
"""

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.special

from .validate import as_labels, as_real_matrix

_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class CosineSummary:
    """Mean pairwise cosine similarities, pooled over unordered pairs i != j.

    intra: mean over all same-class pairs (pooled over classes: a class of n_c members weighs
        n_c (n_c - 1) / 2 pairs, so about n_c^2).
    intra_class_mean: the mean of the per-class means (every class with a pair weighs the same).
    inter: mean over all different-class pairs.
    gap: intra - inter.
    per_class: {class: mean over that class's pairs}, None for a class with one member.
    n_intra_pairs, n_inter_pairs: numbers of unordered pairs behind intra and inter.
    classes_without_pairs: classes with a single member (sorted), excluded from intra.
    """

    intra: float
    intra_class_mean: float
    inter: float
    gap: float
    per_class: dict[int, float | None]
    n_intra_pairs: int
    n_inter_pairs: int
    classes_without_pairs: list[int]


def pairwise_cosine_summary(X, labels):
    """Summarise cosine similarity of the rows of X within and across classes.

    X: (N, D) real array; labels: (N,) integer class labels. Returns a CosineSummary,
    computed in O(N * D) time without forming the N x N matrix. Raises ValueError for
    non-finite values, zero rows (cosine undefined), a single class, or no class with
    two members.
    """
    X = as_real_matrix(X, "X")
    classes, inverse, counts = _class_index(labels, X.shape[0])
    norms = _row_norms(X)
    _check_norms(norms, "X", "rows of X are all zero; cosine similarity is undefined for them, drop them first")
    work_dtype = np.result_type(X.dtype, np.float32)
    sums = np.zeros((len(classes), X.shape[1]))
    for start in range(0, X.shape[0], _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, X.shape[0])
        scale = scipy.sparse.csr_matrix(
            ((1.0 / norms[start:stop]).astype(work_dtype), (inverse[start:stop], np.arange(stop - start))),
            shape=(len(classes), stop - start),
        )
        sums += scale @ X[start:stop].astype(work_dtype, copy=False)
    return _summary(classes, counts, np.einsum("kd,kd->k", sums, sums), float(np.sum(sums.sum(axis=0) ** 2)))


def fc_gradient_deltas(logits, labels, direction=False):
    """Return delta = softmax(logits) - onehot(labels), shape (N, C) float64, exact at any margin.

    This is d(cross-entropy)/d(logits) per example, formed as delta_c = p_c (c != y) and
    delta_y = -sum_{c != y} p_c (never p_y - 1, which rounds to 0 once p_y rounds to 1).
    With direction=True returns delta / sum_{c != y} p_c instead: the softmax of the other
    logits with -1 at y, which has the direction of delta, norm in [1, sqrt(2)] and no
    underflow at any margin (the cosine analyses use it). logits: (N, C); labels: (N,)
    integers in [0, C).
    """
    logits = as_real_matrix(logits, "logits")
    if not np.isfinite(logits).all():
        raise ValueError("logits contains NaN or Inf; check the model outputs")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes (N, C), got shape {logits.shape}")
    labels = as_labels(labels, logits.shape[0], "labels")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) to index the {logits.shape[1]} classes of logits")
    z = logits.astype(np.float64)
    rows = np.arange(z.shape[0])
    others = z.copy()
    others[rows, labels] = -np.inf
    lse_others = scipy.special.logsumexp(others, axis=1)
    delta = np.exp(others - lse_others[:, None])  # softmax over c != y, 0 at y
    delta[rows, labels] = -1.0
    if not direction:
        # sum_{c != y} p_c = 1 - p_y = sigmoid(logsumexp_{c != y} z_c - z_y), without cancellation
        delta *= scipy.special.expit(lse_others - z[rows, labels])[:, None]
    return delta


def fc_gradients(features, deltas):
    """Return the explicit per-example fc-layer gradients, shape (N, d*C + C).

    For logits = h @ W + b with W of shape (d, C), row i is concat(vec(h_i outer delta_i)
    in row-major (d, C) order, delta_i), i.e. (dL/dW, dL/db) flattened; deltas (N, C) from
    fc_gradient_deltas. Memory O(N*d*C): meant for tests and small N.
    """
    features, deltas = _features_and_deltas(features, deltas)
    n, d = features.shape
    weight = np.einsum("nd,nc->ndc", features, deltas).reshape(n, d * deltas.shape[1])
    return np.concatenate([weight, deltas], axis=1)


def fc_gradient_gram(features, deltas):
    """Return the (N, N) float64 Gram matrix of the fc-layer gradients of fc_gradients.

    Entry (i, j) is <g_i, g_j> = (h_i . h_j + 1) * (delta_i . delta_j), without forming g.
    """
    features, deltas = _features_and_deltas(features, deltas)
    features = features.astype(np.float64, copy=False)
    deltas = deltas.astype(np.float64, copy=False)
    return (features @ features.T + 1.0) * (deltas @ deltas.T)


def fc_gradient_cosine_summary(features, deltas, labels):
    """Cosine summary of the fc-layer gradients, grouped by `labels`.

    Same result as pairwise_cosine_summary(fc_gradients(features, deltas), labels) but
    computed from per-class sums of the (d+1, C) matrices [h_i; 1] delta_i^T / ||g_i||, in
    O(N*d*C) time and O(d*C) extra memory. features: (N, d); deltas: (N, C), e.g.
    fc_gradient_deltas(logits, gradient_labels, direction=True) (cosines depend only on the
    direction of each delta); labels: (N,) grouping labels. Raises ValueError for a zero
    row of deltas (a delta that underflowed: build it with direction=True).
    """
    features, delta = _features_and_deltas(features, deltas)
    classes, inverse, counts = _class_index(labels, features.shape[0])
    delta_norms = _row_norms(delta)
    _check_norms(delta_norms, "deltas", "rows of deltas are zero; build them with fc_gradient_deltas(..., direction=True)")
    # ||g_i|| = sqrt(||h_i||^2 + 1) * ||delta_i||; fold the whole scale into delta.
    coef = 1.0 / (np.sqrt(_row_norms(features) ** 2 + 1.0) * delta_norms)
    total_weight = np.zeros((features.shape[1], delta.shape[1]))
    total_bias = np.zeros(delta.shape[1])
    class_sq = np.empty(len(classes))
    for k, members in enumerate(np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])):
        weight = np.zeros_like(total_weight)
        bias = np.zeros_like(total_bias)
        for start in range(0, len(members), _CHUNK_ROWS):
            rows = members[start : start + _CHUNK_ROWS]
            scaled = delta[rows] * coef[rows, None]
            weight += features[rows].T @ scaled
            bias += scaled.sum(axis=0)
        class_sq[k] = np.sum(weight**2) + np.sum(bias**2)
        total_weight += weight
        total_bias += bias
    return _summary(classes, counts, class_sq, float(np.sum(total_weight**2) + np.sum(total_bias**2)))


def benchmark_similarity(n=100_000, d=2048, n_brute=5_000, n_classes=100, seed=0):
    """Time pairwise_cosine_summary on (n, d) float32 data and against brute force on (n_brute, d).

    Returns a dict: n, d, n_brute, n_classes, fast_s (seconds on n rows), fast_small_s and
    brute_s (seconds on n_brute rows), speedup (brute_s / fast_small_s), max_abs_diff
    (largest |fast - brute| over intra and inter on n_brute rows).
    """
    if n_brute > n:
        raise ValueError(f"n_brute ({n_brute}) must not exceed n ({n}); lower n_brute")
    rng = np.random.default_rng(seed)
    X = rng.random((n, d), dtype=np.float32)
    labels = rng.integers(0, n_classes, size=n)
    start = time.perf_counter()
    pairwise_cosine_summary(X, labels)
    fast_s = time.perf_counter() - start
    small_X, small_labels = X[:n_brute], labels[:n_brute]
    start = time.perf_counter()
    fast = pairwise_cosine_summary(small_X, small_labels)
    fast_small_s = time.perf_counter() - start
    start = time.perf_counter()
    brute_intra, brute_inter = _brute_force_intra_inter(small_X, small_labels)
    brute_s = time.perf_counter() - start
    return {
        "n": n,
        "d": d,
        "n_brute": n_brute,
        "n_classes": n_classes,
        "fast_s": fast_s,
        "fast_small_s": fast_small_s,
        "brute_s": brute_s,
        "speedup": brute_s / fast_small_s,
        "max_abs_diff": max(abs(fast.intra - brute_intra), abs(fast.inter - brute_inter)),
    }


def _brute_force_intra_inter(X, labels):
    """(intra, inter) from the explicit N x N cosine matrix; reference for benchmark_similarity."""
    unit = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return float(cosine[same & off_diagonal].mean()), float(cosine[~same].mean())


def _summary(classes, counts, class_sq, total_sq):
    """Build a CosineSummary from ||class sum of unit vectors||^2 per class and for all rows."""
    n = int(counts.sum())
    ordered_pairs = counts * (counts - 1)
    intra_sums = class_sq - counts
    n_intra = int(ordered_pairs.sum())
    n_inter = n * (n - 1) - n_intra
    intra = float(intra_sums.sum() / n_intra)
    inter = float((total_sq - n - intra_sums.sum()) / n_inter)
    with_pairs = ordered_pairs > 0
    return CosineSummary(
        intra=intra,
        intra_class_mean=float(np.mean(intra_sums[with_pairs] / ordered_pairs[with_pairs])),
        inter=inter,
        gap=intra - inter,
        per_class={
            int(c): float(s / p) if p else None for c, s, p in zip(classes, intra_sums, ordered_pairs, strict=True)
        },
        n_intra_pairs=n_intra // 2,
        n_inter_pairs=n_inter // 2,
        classes_without_pairs=[int(c) for c in classes[counts < 2]],
    )


def _class_index(labels, n):
    """Return (classes, inverse, counts) for labels, checking that intra and inter are defined."""
    labels = as_labels(labels, n, "labels")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ValueError("labels contain fewer than two classes; inter-class similarity needs at least two")
    if counts.max() < 2:
        raise ValueError("no class has two or more examples; intra-class similarity needs a same-class pair")
    return classes, inverse, counts


def _row_norms(X):
    """Euclidean norms of the rows of X in float64, shape (N,); NaN/Inf rows stay non-finite."""
    return np.sqrt(np.einsum("nd,nd->n", X, X, dtype=np.float64))


def _check_norms(norms, name, zero_message):
    bad = int(np.count_nonzero(~np.isfinite(norms)))
    if bad:
        raise ValueError(f"{bad} rows of {name} contain NaN or Inf; remove or fix them first")
    zero = int(np.count_nonzero(norms == 0))
    if zero:
        raise ValueError(f"{zero} {zero_message}")


def _features_and_deltas(features, deltas):
    """Validate features (N, d) and deltas (N, C) and return them."""
    features = as_real_matrix(features, "features")
    if not np.isfinite(features).all():
        raise ValueError("features contains NaN or Inf; check the pooled activations")
    deltas = as_real_matrix(deltas, "deltas")
    if not np.isfinite(deltas).all():
        raise ValueError("deltas contains NaN or Inf; build them with fc_gradient_deltas from finite logits")
    if deltas.shape[0] != features.shape[0]:
        raise ValueError(
            f"features has {features.shape[0]} rows but deltas has {deltas.shape[0]}; pass one row per example to both"
        )
    return features, deltas
