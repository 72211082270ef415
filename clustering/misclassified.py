"""Learning from misclassifications: where misclassified images sit relative to the classes.

Host side, numpy only: nearest class centroid of each misclassified image in a
representation (e.g. GW, FM), the most frequent confusions, and the most
confidently wrong images.
"""

from __future__ import annotations

import numpy as np

from .validate import as_labels, as_matrix, check_int


def centroid_report(X, y, p):
    """Nearest class centroid (cosine) of each misclassified image in the representation X (N, D).

    Rows of X are unit-normalised; the centroid of class c is the mean unit row of the
    correctly classified images of c (y == p == c), and a misclassified image's nearest
    centroid is the one of highest cosine similarity (ties: lowest class). Zero rows
    have no direction: they enter no centroid and are not scored.

    Policy for missing centroids: a class with no correctly classified image (or whose
    unit rows average to zero) has no centroid and is skipped; a misclassified image
    whose true or predicted class lacks a centroid is not scored, since the
    true-versus-predicted comparison would be one-sided.

    Returns a dict:
      n_misclassified: images with y != p;
      n_scored: misclassified images scored (see the policy);
      n_nearest_true, n_nearest_pred: scored images whose nearest centroid is their
        true / predicted class;
      frac_nearest_true, frac_nearest_pred: those counts / n_scored, None when
        n_scored == 0 (e.g. no misclassified images);
      classes_without_centroid: sorted list of classes in y or p lacking a centroid;
      misclassified: (M,) int64 indices of the misclassified images;
      nearest: (M,) int64 nearest-centroid class per misclassified image, -1 if not scored.
    """
    X = as_matrix(X, "X")
    y = as_labels(y, "y", X.shape[0], classes=True)
    p = as_labels(p, "p", X.shape[0], classes=True)
    norms = np.linalg.norm(X, axis=1)
    U = X / np.where(norms > 0, norms, 1.0)[:, None]
    return _nearest_centroids(y, p, norms > 0, lambda members: U[members].sum(axis=0),
                              lambda rows, centroids: U[rows] @ np.stack(centroids).T)


def kron_centroid_report(A, B, y, p):
    """centroid_report of the rows x_i = kron(A_i, B_i) (N, m * C), without forming them.

    A (N, m), B (N, C): e.g. A = [features, 1] and B = softmax - onehot(label) give the fc-layer
    gradients (in another order of their coordinates, which cosines do not see). A class's summed
    unit rows are the (m, C) matrix sum_j a_j b_j^T / (|a_j| |b_j|), and an image's cosine with a
    centroid S is a_i^T S b_i / (|a_i| |b_i| |S|). Returns the same dict as centroid_report.
    """
    A = as_matrix(A, "A")
    B = as_matrix(B, "B")
    if len(B) != len(A):
        raise ValueError(f"A has {len(A)} rows but B has {len(B)}; pass one row per image to both")
    y = as_labels(y, "y", A.shape[0], classes=True)
    p = as_labels(p, "p", A.shape[0], classes=True)
    norm_a, norm_b = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=1)
    nonzero = (norm_a > 0) & (norm_b > 0)
    Au = A / np.where(norm_a > 0, norm_a, 1.0)[:, None]
    Bu = B / np.where(norm_b > 0, norm_b, 1.0)[:, None]
    return _nearest_centroids(y, p, nonzero, lambda members: Au[members].T @ Bu[members],
                              lambda rows, centroids: np.stack(
                                  [np.sum((Au[rows] @ S) * Bu[rows], axis=1) for S in centroids], axis=1))


def _nearest_centroids(y, p, nonzero, class_sum, similarity):
    """The report of centroid_report from class_sum(members) (the sum of their unit rows, any shape)
    and similarity(rows, unit centroids) -> (len(rows), number of centroids) cosines."""
    correct = y == p
    classes = np.unique(np.concatenate([y, p]))
    source = np.flatnonzero(correct & nonzero)
    centroid_classes, centroids = [], []
    for c in classes:
        mean = class_sum(source[y[source] == c])
        length = np.linalg.norm(mean)
        if length > 0:
            centroid_classes.append(c)
            centroids.append(mean / length)
    centroid_classes = np.asarray(centroid_classes, dtype=np.int64)

    mis = np.flatnonzero(~correct)
    scored = nonzero[mis] & np.isin(y[mis], centroid_classes) & np.isin(p[mis], centroid_classes)
    nearest = np.full(len(mis), -1, dtype=np.int64)
    if scored.any():
        nearest[scored] = centroid_classes[similarity(mis[scored], centroids).argmax(axis=1)]
    n_scored = int(scored.sum())
    n_true = int(np.count_nonzero(scored & (nearest == y[mis])))
    n_pred = int(np.count_nonzero(scored & (nearest == p[mis])))
    return {
        "n_misclassified": len(mis),
        "n_scored": n_scored,
        "n_nearest_true": n_true,
        "n_nearest_pred": n_pred,
        "frac_nearest_true": n_true / n_scored if n_scored else None,
        "frac_nearest_pred": n_pred / n_scored if n_scored else None,
        "classes_without_centroid": [int(c) for c in np.setdiff1d(classes, centroid_classes)],
        "misclassified": mis.astype(np.int64),
        "nearest": nearest,
    }


def confusion_pairs(y, p, top=10):
    """The most frequent confusions; returns up to `top` (true, pred, count) tuples of ints.

    Only pairs with true != pred; sorted by count descending, then by (true, pred).
    top=None returns all pairs.
    """
    y = as_labels(y, "y", classes=True)
    p = as_labels(p, "p", y.shape[0], classes=True)
    if top is not None:
        check_int(top, "top", 1)
    wrong = y != p
    pairs, counts = np.unique(np.stack([y[wrong], p[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]


def most_confident_wrong(probs, y, top=10):
    """Indices of the misclassified images with the highest predicted-class probability.

    probs: (N, C) class probabilities; the prediction is the argmax. Returns (<= top,)
    int64 indices into probs, most confident first (ties: lower index first).
    """
    probs = as_matrix(probs, "probs")
    if probs.shape[1] < 2:
        raise ValueError(f"probs must have at least 2 classes (N, C), got shape {probs.shape}")
    y = as_labels(y, "y", probs.shape[0], classes=True)
    if y.size and y.max() >= probs.shape[1]:
        raise ValueError(f"y has class {y.max()} but probs has only {probs.shape[1]} classes")
    check_int(top, "top", 1)
    pred = probs.argmax(axis=1)
    confidence = probs[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != y)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:top].astype(np.int64)


def centroid_rule(similarities, y, p) -> dict:
    """What "predict the class of the nearest centroid" does to a model's predictions, fixes and breaks.

    similarities (N, C): each image's similarity to each class centroid (built from other images, e.g.
    the training images: -inf where a class has none); y (N,) true and p (N,) predicted classes. The
    rule's class is the argmax (ties: lowest class). Returns a dict of counts: n, errors (y != p),
    changed (rule != p), fixed (errors the rule gets right), broken (correct predictions the rule gets
    wrong), model_accuracy, rule_accuracy, and the chance baseline at the same change rate q =
    changed / n: a rule that changes each prediction with probability q to a uniformly drawn other
    class fixes q * errors / (C - 1) and breaks q * correct in expectation (chance_fixed,
    chance_broken, chance_accuracy).
    """
    S = np.asarray(similarities, np.float64)
    if S.ndim != 2 or S.shape[1] < 2:
        raise ValueError(f"similarities must be (N, C) with C >= 2, got shape {S.shape}")
    y = as_labels(y, "y", S.shape[0], classes=True)
    p = as_labels(p, "p", S.shape[0], classes=True)
    n, c = S.shape
    rule = S.argmax(axis=1)
    wrong = y != p
    changed = int(np.sum(rule != p))
    q = changed / n if n else 0.0
    errors, correct = int(wrong.sum()), int((~wrong).sum())
    chance_fixed, chance_broken = q * errors / (c - 1), q * correct
    return {"n": int(n), "errors": errors, "changed": changed,
            "fixed": int(np.sum(wrong & (rule == y))), "broken": int(np.sum(~wrong & (rule != y))),
            "model_accuracy": correct / n if n else None, "rule_accuracy": float(np.mean(rule == y)) if n else None,
            "chance_fixed": chance_fixed, "chance_broken": chance_broken,
            "chance_accuracy": (correct - chance_broken + chance_fixed) / n if n else None}
