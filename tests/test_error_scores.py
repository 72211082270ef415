"""Misclassification-detection scores against independent computations (explicit gradients, scipy's
Mahalanobis, brute-force neighbours, scikit-learn's AUROC)."""
import numpy as np
import pytest
import scipy.spatial.distance
from sklearn.metrics import roc_auc_score, roc_curve

from resnet_jax.metrics import error_scores as es


def _data(n=60, d=5, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, c)) * 2, rng.integers(0, c, n)


def test_softmax_scores_match_their_definitions():
    _, z, _ = _data()
    s = es.softmax_scores(z)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    for i in range(len(z)):
        q = sorted(p[i])
        assert s["msp"][i] == pytest.approx(-q[-1])
        assert s["margin"][i] == pytest.approx(-(q[-1] - q[-2]))
        assert s["entropy"][i] == pytest.approx(-sum(x * np.log(x) for x in p[i]))


def test_fc_gradient_scores_match_explicit_gradients():
    h, z, _ = _data()
    s = es.fc_gradient_scores(h, z)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    c = z.shape[1]
    for i in range(len(z)):
        a = np.append(h[i], 1.0)
        g_pred = np.outer(a, p[i] - np.eye(c)[z[i].argmax()])  # d CE(pred label) / d [W; b]
        g_kl = np.outer(a, p[i] - 1.0 / c)  # d KL(u || p) / d [W; b]
        assert s["grad_norm_pred_fc"][i] == pytest.approx(np.linalg.norm(g_pred))
        assert s["gradnorm"][i] == pytest.approx(-np.abs(g_kl).sum())


def test_fc_gradient_norm_exact_at_huge_margins():
    z = np.array([[80.0, 0.0, 0.0]])
    s = es.fc_gradient_scores(np.zeros((1, 2)), z)
    assert s["grad_norm_pred_fc"][0] == pytest.approx(np.sqrt(2) * np.exp(-80.0), rel=1e-9)


def test_mahalanobis_against_scipy():
    rng = np.random.default_rng(1)
    train, y = rng.normal(size=(200, 4)), rng.integers(0, 3, 200)
    train += y[:, None]
    test = rng.normal(size=(15, 4))
    means, prec = es.shared_covariance_precision(train, y, 3)
    cov = sum(np.cov(train[y == c].T, bias=True) * np.sum(y == c) for c in range(3)) / len(train)
    vi = np.linalg.inv(cov)
    brute = [min(scipy.spatial.distance.mahalanobis(x, train[y == c].mean(0), vi) ** 2 for c in range(3))
             for x in test]
    np.testing.assert_allclose(es.mahalanobis_scores(test, means, prec), brute, rtol=1e-8)


def test_knn_against_brute_force():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(50, 3)), rng.normal(size=(7, 3))
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    for k in (1, 4):
        brute = [sorted(np.linalg.norm(unit(train) - unit(test)[i], axis=1))[k - 1] for i in range(7)]
        np.testing.assert_allclose(es.knn_scores(test, train, k=k, chunk=3), brute, atol=1e-7)
    with pytest.raises(ValueError, match="k must be"):
        es.knn_scores(test, train, k=51)


def test_centroids_are_training_means_and_kron_cosines_match_explicit_rows():
    rng = np.random.default_rng(3)
    ta, tb, ty = rng.normal(size=(30, 3)), rng.normal(size=(30, 4)), rng.integers(0, 4, 30)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
    rows = np.einsum("nm,nc->nmc", ta, tb).reshape(30, -1)
    cent = es.class_centroids(rows, ty, 4)
    for c in range(4):
        u = rows[ty == c] / np.linalg.norm(rows[ty == c], axis=1, keepdims=True)
        np.testing.assert_allclose(cent[c], u.mean(0) / np.linalg.norm(u.mean(0)))
    explicit = es.centroid_cosines(np.einsum("nm,nc->nmc", a, b).reshape(5, -1), cent)
    np.testing.assert_allclose(es.kron_centroid_cosines(ta, tb, ty, a, b, 4), explicit, atol=1e-12)
    missing = es.class_centroids(rows, np.zeros(30, int), 2)
    assert np.isnan(missing[1]).all() and np.isneginf(es.centroid_cosines(rows[:2], missing)[:, 1]).all()


def test_detection_row_against_sklearn():
    rng = np.random.default_rng(4)
    err = rng.random(300) < 0.2
    score = rng.normal(size=300) + err
    row = es.detection_row(err, score)
    assert row["auroc"] == pytest.approx(roc_auc_score(err, score))
    thresholds = np.sort(np.unique(score))[::-1]  # brute force: flag score >= t, the first t reaching 95%
    for t in thresholds:
        if np.mean(score[err] >= t) >= 0.95:
            assert row["fpr95"] == pytest.approx(np.mean(score[~err] >= t))
            break
    assert np.isnan(es.detection_row(np.zeros(5, bool), np.arange(5.0))["auroc"])
    fpr, tpr, _ = roc_curve(err, score)
    assert 0 <= row["fpr95"] <= 1 and fpr[-1] == 1 and tpr[-1] == 1


def test_rank_auroc_and_paired_bootstrap():
    rng = np.random.default_rng(5)
    err = rng.random(200) < 0.3
    good, weak = rng.normal(size=200) + 2 * err, np.round(rng.normal(size=200) + 0.3 * err, 1)  # ties
    np.testing.assert_allclose(es.auroc_ranks(err, np.stack([good, weak])),
                               [roc_auc_score(err, good), roc_auc_score(err, weak)])
    d = es.paired_auroc_difference(err, good, weak, n_boot=300)
    assert d["difference"] == pytest.approx(roc_auc_score(err, good) - roc_auc_score(err, weak))
    assert 0 < d["low"] < d["difference"] < d["high"]
    same = es.paired_auroc_difference(err, good, good, n_boot=50)
    assert same["low"] == same["high"] == same["difference"] == 0
