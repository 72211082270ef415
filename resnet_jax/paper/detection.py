"""Can a representation tell which predictions are wrong? The detection table and the centroid rule.

Host side. From the held-out store (features, logits, predictions), the training images' store (their
features, logits and true labels: the class centroids, the shared covariance, the neighbours), and
optionally a store of projected all-parameter gradients at the predicted label and the predicted-class
Grad-CAM maps, every score of `metrics.error_scores` is computed without the held-out labels and scored
against the held-out errors: AUROC, AUPR (errors positive), FPR at 95% TPR, and the paired bootstrap
interval of its AUROC difference from the maximum softmax probability (the baseline).

The centroid rule ("Learning from misclassifications" made a classifier): give each held-out image the
class of its nearest training centroid in FM, P or GW (predicted-label gradients against the
training images' true-label gradient centroids), and count the errors it fixes and the correct
predictions it breaks, beside a chance rule that changes as many predictions at random.
"""
from __future__ import annotations

import numpy as np

BASELINE = "msp"
# (key, name in the tables); the order of the table. The baselines first.
SCORES = (("msp", "max softmax probability (baseline)"), ("margin", "softmax margin (baseline)"),
          ("entropy", "softmax entropy"), ("grad_norm_pred_fc", "fc gradient norm, predicted label"),
          ("gradnorm", "GradNorm (fc, KL to uniform)"),
          ("grad_dir_pred_fc", "fc gradient direction vs training centroid"),
          ("grad_norm_pred_all", "all-parameter gradient norm, predicted label (projected)"),
          ("fm_centroid_cosine", "FM cosine distance to training centroid"),
          ("fm_mahalanobis", "FM Mahalanobis (shared covariance)"),
          ("fm_knn", "FM k-NN distance to training images"),
          ("cam_entropy", "Grad-CAM entropy (predicted class)"))
SCORE_NAMES = dict(SCORES)
N_BOOT = 1000


def _a(fm):
    return np.concatenate([fm, np.ones((len(fm), 1))], axis=1)


def _centroid_similarities(rep, train, num_classes: int) -> dict:
    """{space: (N, C) cosines of the held-out images with the training images' class centroids}."""
    from resnet_jax.metrics import error_scores as es, similarity

    out = {"FM": es.centroid_cosines(rep.fm, es.class_centroids(train.fm, train.labels, num_classes)),
           "P": es.centroid_cosines(rep.p, es.class_centroids(train.p, train.labels, num_classes))}
    train_delta = similarity.fc_gradient_deltas(train.logits, train.labels, direction=True)
    delta = similarity.fc_gradient_deltas(rep.logits, rep.preds, direction=True)
    out["GW_pred"] = es.kron_centroid_cosines(_a(train.fm), train_delta, train.labels, _a(rep.fm), delta,
                                              num_classes)
    return out


def cam_entropy(cams) -> np.ndarray:
    """(N,) entropy of each map scaled to sum to 1 (negative values clipped; a map that is zero
    everywhere is spread evenly, the largest entropy)."""
    m = np.clip(np.asarray(cams, np.float64).reshape(len(cams), -1), 0, None)
    total = m.sum(axis=1, keepdims=True)
    q = np.where(total > 0, m / np.where(total > 0, total, 1.0), 1.0 / m.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(q > 0, q * np.log(q), 0.0), axis=1)


def scores(rep, train, projected_rows=None, pred_cams=None, similarities=None) -> dict:
    """{score key: (N,) score, higher = more likely wrong} of the held-out `rep` (analysis.Representations),
    with the training images' `train`; `projected_rows` (N, k) projected predicted-label gradients of all
    parameters and `pred_cams` (N, H, W) predicted-class maps add their scores."""
    from resnet_jax.metrics import error_scores as es

    num_classes = rep.logits.shape[1]
    out = dict(es.softmax_scores(rep.logits))
    out.update(es.fc_gradient_scores(rep.fm, rep.logits))
    if projected_rows is not None:
        out["grad_norm_pred_all"] = np.linalg.norm(np.asarray(projected_rows, np.float64), axis=1)
    if train is not None:  # the scores that need the training images
        sims = similarities if similarities else _centroid_similarities(rep, train, num_classes)
        rows = np.arange(len(rep.preds))
        out["grad_dir_pred_fc"] = 1.0 - sims["GW_pred"][rows, rep.preds]
        out["fm_centroid_cosine"] = 1.0 - sims["FM"][rows, rep.preds]
        means, precision = es.shared_covariance_precision(train.fm, train.labels, num_classes)
        out["fm_mahalanobis"] = es.mahalanobis_scores(rep.fm, means, precision)
        out["fm_knn"] = es.knn_scores(rep.fm, train.fm, k=min(es.KNN_K, len(train.fm)))
    if pred_cams is not None:
        out["cam_entropy"] = cam_entropy(pred_cams)
    return {k: np.nan_to_num(out[k], posinf=np.finfo(np.float64).max) for k, _ in SCORES if k in out}


def report(rep, train, projected_rows=None, pred_cams=None, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Returns {"n", "errors", "rows": [one per score: method, key, auroc, aupr, fpr95, delta_auroc,
    delta_low, delta_high], "centroid_rule": {space: clustering.misclassified.centroid_rule}, "knn_k"}."""
    from resnet_jax.clustering import misclassified
    from resnet_jax.metrics import error_scores as es

    is_error = rep.labels != rep.preds
    sims = {} if train is None else _centroid_similarities(rep, train, rep.logits.shape[1])
    rows = rate(is_error, scores(rep, train, projected_rows, pred_cams, similarities=sims), seed, n_boot)
    return {"n": int(len(is_error)), "errors": int(is_error.sum()), "rows": rows, "knn_k": es.KNN_K,
            "centroid_rule": {space: misclassified.centroid_rule(S, rep.labels, rep.preds)
                              for space, S in sims.items()}}


def rate(is_error, table: dict, seed: int = 0, n_boot: int = N_BOOT) -> list[dict]:
    """Rows of the detection table for the scores of `scores` (the BASELINE among them): AUROC, AUPR,
    FPR at 95% TPR, and each other score's paired bootstrap AUROC difference from the baseline."""
    from resnet_jax.metrics import error_scores as es

    rows = []
    for key, score in table.items():
        row = {"method": SCORE_NAMES[key], "key": key, **es.detection_row(is_error, score)}
        if key != BASELINE:
            d = es.paired_auroc_difference(is_error, score, table[BASELINE], n_boot=n_boot, seed=seed)
            row.update(delta_auroc=d["difference"], delta_low=d["low"], delta_high=d["high"])
        rows.append(row)
    return rows
