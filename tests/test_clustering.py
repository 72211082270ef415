"""Tests for clustering.cluster and clustering.misclassified (host side, no JAX)."""

import ast
import itertools
import pathlib

import numpy as np
import pytest
from sklearn.decomposition import PCA

import resnet_jax.clustering as clustering
from resnet_jax.clustering.cluster import (align_clusters, cluster, cluster_and_score, hungarian_accuracy,
                                           reduce_gram, reduce_pca, scores)
from resnet_jax.clustering.misclassified import (centroid_report, confusion_pairs, kron_centroid_report,
                                                 most_confident_wrong)


def blobs(n_per=25, k=4, dim=6, seed=0):
    """Well separated Gaussian blobs: X (k * n_per, dim) with centres 20 * e_c and spread 0.1; y (k * n_per,)."""
    rng = np.random.default_rng(seed)
    centres = 20.0 * np.eye(k, dim)
    y = np.repeat(np.arange(k), n_per)
    X = centres[y] + 0.1 * rng.standard_normal((k * n_per, dim))
    return X, y


def fc_gradients(n=40, d=7, c=3, seed=0):
    """Features h, softmax deltas and the explicit fc-layer gradients g_i = [vec(h_i delta_i^T), delta_i]."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d))
    logits = rng.standard_normal((n, c))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, c, n)
    delta = probs - np.eye(c)[y]
    g = np.concatenate([(h[:, :, None] * delta[:, None, :]).reshape(n, d * c), delta], axis=1)
    return h, delta, g


def brute_force_accuracy(labels_true, labels_pred):
    classes, clusters = np.unique(labels_true), np.unique(labels_pred)
    size = max(len(classes), len(clusters))
    counts = np.zeros((size, size), dtype=int)
    for i, t in enumerate(classes):
        for j, q in enumerate(clusters):
            counts[i, j] = np.sum((labels_true == t) & (labels_pred == q))
    best = max(sum(counts[i, perm[i]] for i in range(size)) for perm in itertools.permutations(range(size)))
    return best / len(labels_true)


# ---------------------------------------------------------------- reductions


def test_reduce_pca_dimension_rule_and_variance():
    rng = np.random.default_rng(0)
    Z, info = reduce_pca(rng.standard_normal((5, 100)), n_components=32)
    assert Z.shape == (5, 4) and info["n_components"] == 4 and info["method"] == "pca"
    assert info["explained_variance_ratio"].sum() == pytest.approx(1.0)
    Z, info = reduce_pca(rng.standard_normal((50, 3)), n_components=32)
    assert Z.shape == (50, 3) and info["input_shape"] == (50, 3)
    Z, _ = reduce_pca(rng.standard_normal((50, 10)), n_components=2)
    assert Z.shape == (50, 2)


def test_reduce_gram_matches_explicit_pca_of_fc_gradients():
    h, delta, g = fc_gradients()
    gram = (h @ h.T + 1.0) * (delta @ delta.T)
    np.testing.assert_allclose(gram, g @ g.T, rtol=1e-12, atol=1e-12)  # the Gram identity for the fc layer

    Z, info = reduce_gram(gram, n_components=10)
    pca = PCA(n_components=10, svd_solver="full").fit(g)
    expected = pca.transform(g)
    assert Z.shape == (40, 10) and info["method"] == "gram_pca"
    signs = np.sign(np.sum(Z * expected, axis=0))
    np.testing.assert_allclose(Z * signs, expected, atol=1e-9)
    np.testing.assert_allclose(info["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-9)
    # deterministic sign: largest-magnitude score of each component is positive
    assert np.all(Z[np.abs(Z).argmax(axis=0), np.arange(10)] > 0)


def test_reduce_gram_large_path_matches_the_dense_one(monkeypatch):
    """Above _EXACT_GRAM_MAX rows reduce_gram uses ARPACK on the centred operator (no copy of G):
    the same scores as scikit-learn's PCA of the explicit rows."""
    from resnet_jax.clustering import cluster as module

    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 20)) @ np.diag(np.linspace(3, 0.1, 20)) + 2.0
    monkeypatch.setattr(module, "_EXACT_GRAM_MAX", 100)
    Z, info = reduce_gram(X @ X.T, n_components=8)
    pca = PCA(n_components=8, svd_solver="full").fit(X)
    expected = pca.transform(X)
    np.testing.assert_allclose(Z * np.sign(np.sum(Z * expected, axis=0)), expected, atol=1e-8)
    np.testing.assert_allclose(info["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-8)


def test_reduce_gram_rank_deficient_and_size_rule():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((12, 2))
    Z, info = reduce_gram(X @ X.T, n_components=32)
    assert Z.shape == (12, 11)
    np.testing.assert_allclose(Z[:, 2:], 0.0, atol=1e-6)
    assert info["explained_variance_ratio"][:2].sum() == pytest.approx(1.0)


def test_reduce_gram_rejects_non_gram():
    with pytest.raises(ValueError, match="square"):
        reduce_gram(np.ones((3, 4)))
    with pytest.raises(ValueError, match="not symmetric"):
        reduce_gram(np.arange(9.0).reshape(3, 3))


# ---------------------------------------------------------------- clustering


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_separated_blobs_are_recovered(method):
    X, y = blobs()
    labels = cluster(X, 4, method, seed=0)
    assert labels.shape == y.shape and labels.dtype == np.int64
    result = scores(y, labels, X)
    assert result["ari"] == pytest.approx(1.0)
    assert result["nmi"] == pytest.approx(1.0)
    assert result["accuracy"] == 1.0
    assert result["silhouette"] > 0.95


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_cluster_is_deterministic_for_a_seed(method):
    X = np.random.default_rng(3).standard_normal((120, 5))  # no structure: the outcome depends on the init
    first = cluster(X, 5, method, seed=7, n_init=2)
    np.testing.assert_array_equal(first, cluster(X, 5, method, seed=7, n_init=2))


def test_gmm_is_scale_invariant():
    # two clusters with the same mean and different spreads: only the covariances tell them apart,
    # so an absolute covariance floor (1e-6) would swamp the small cluster once the data is scaled down
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.standard_normal((100, 2)), 10 * rng.standard_normal((100, 2))])
    y = np.repeat([0, 1], 100)
    labels = cluster(X, 2, "gmm", n_init=2)
    assert hungarian_accuracy(y, labels) > 0.85
    np.testing.assert_array_equal(cluster(X * 1e-4, 2, "gmm", n_init=2), labels)


def test_cluster_rejects_bad_input():
    X, _ = blobs(n_per=2, k=2)
    with pytest.raises(ValueError, match=r"n_clusters=5.*N=4"):
        cluster(X, 5, "kmeans")
    with pytest.raises(ValueError, match="n_clusters"):
        cluster(X, 1, "kmeans")
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster(X, 2, "dbscan")
    X[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster(X, 2, "kmeans")


# ---------------------------------------------------------------- scoring


def test_permuted_labels_score_zero_and_renamed_labels_score_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 3000)
    Z = rng.standard_normal((3000, 1))
    shuffled = rng.permutation(y)
    result = scores(y, shuffled, Z, silhouette_max_points=500)
    assert abs(result["ari"]) < 0.01
    assert result["nmi"] < 0.01
    renamed = np.array([3, 0, 4, 1, 2])[y]
    result = scores(y, renamed, Z, silhouette_max_points=500)
    assert result["ari"] == pytest.approx(1.0) and result["accuracy"] == 1.0


def test_hungarian_accuracy_matches_brute_force():
    rng = np.random.default_rng(0)
    for k_true, k_pred in [(3, 3), (4, 4), (3, 5), (5, 2), (4, 1)]:
        for _ in range(5):
            y = rng.integers(0, k_true, 40)
            q = rng.integers(0, k_pred, 40) + 10  # cluster ids need not look like class ids
            assert hungarian_accuracy(y, q) == pytest.approx(brute_force_accuracy(y, q))


def test_align_clusters_maps_matched_clusters_to_classes():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    q = np.array([7, 7, 5, 5, 5, 9, 9])
    # 7 -> 0 (2 points), 5 -> 1 (2 points) and 9 -> 2 (2 points) beats 5 -> 2
    np.testing.assert_array_equal(align_clusters(y, q), [0, 0, 1, 1, 1, 2, 2])
    # more clusters than classes: the unmatched cluster gets a new id past the classes
    np.testing.assert_array_equal(align_clusters([0, 0, 0, 1, 1], [0, 0, 1, 2, 2]), [0, 0, 2, 1, 1])


def test_silhouette_is_of_the_clustered_space_and_none_when_undefined():
    from sklearn.metrics import silhouette_score

    X, y = blobs()
    q = cluster(X, 3, "kmeans")
    assert scores(y, q, X)["silhouette"] == pytest.approx(silhouette_score(X, q))
    assert scores(y, np.zeros_like(y), X)["silhouette"] is None
    assert 0.9 < scores(y, y, X, silhouette_max_points=30)["silhouette"] <= 1.0


def test_scores_rejects_length_mismatch():
    X, y = blobs()
    with pytest.raises(ValueError, match="labels_pred has 99 entries"):
        scores(y, y[:-1], X)


def test_cluster_and_score_features_and_gram():
    X, y = blobs(n_per=20, k=3, dim=40)
    result = cluster_and_score(X, y, name="FM", n_init=2)
    assert result["description"] == "PCA to 32 dims of FM (60 x 40)"
    assert result["Z"].shape == (60, 32)
    assert set(result["labels"]) == set(result["scores"]) == {"kmeans", "gmm"}
    assert all(s["accuracy"] == 1.0 for s in result["scores"].values())
    assert result["clusterers"]["gmm"] == (
        "GaussianMixture(n_components=3, covariance_type='diag', reg_covar=1e-06 * mean variance, n_init=2, "
        "random_state=0)")

    result = cluster_and_score(X @ X.T, y, name="GW", gram=True, methods=["kmeans"], n_components=8,
                               n_init=2)
    assert result["description"] == "exact PCA to 8 dims from the Gram matrix of GW (60 x 60)"
    assert list(result["scores"]) == ["kmeans"] and result["scores"]["kmeans"]["ari"] == pytest.approx(1.0)


def test_cluster_and_score_rejects_bad_input():
    X, y = blobs(n_per=2, k=2)
    with pytest.raises(ValueError, match="methods"):
        cluster_and_score(X, y, methods=["spectral"])
    with pytest.raises(ValueError, match=r"n_clusters=9.*N=4"):
        cluster_and_score(X, y, n_clusters=9)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_and_score(X, np.zeros(4, dtype=int))  # a single class: nothing to cluster into


def test_package_does_not_import_jax():
    imported = set()
    for source in pathlib.Path(clustering.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert "numpy" in imported and "sklearn" in imported  # the walk sees the imports
    assert not imported & {"jax", "flax", "resnet_jax", "torch", "tensorflow"}


# ---------------------------------------------------------------- misclassifications


def test_centroid_report_known_answer():
    e = np.eye(4)
    # correct images: class c points along e_c (scaled differently to exercise the normalisation)
    X = [2 * e[0], 5 * e[0], e[1], 3 * e[1], e[2]]
    y = [0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2]
    # misclassified: nearest true, nearest true, nearest pred, nearest neither
    X += [10 * e[0] + e[1], 0.1 * e[1] + 0.01 * e[2], e[2] + 0.2 * e[0], e[2] + 0.1 * e[1] + 0.1 * e[0]]
    y += [0, 1, 0, 0]
    p += [1, 2, 2, 1]
    report = centroid_report(np.array(X), np.array(y), np.array(p))
    assert report["n_misclassified"] == 4 and report["n_scored"] == 4
    assert report["n_nearest_true"] == 2 and report["n_nearest_pred"] == 1
    assert report["frac_nearest_true"] == 0.5 and report["frac_nearest_pred"] == 0.25
    np.testing.assert_array_equal(report["misclassified"], [5, 6, 7, 8])
    np.testing.assert_array_equal(report["nearest"], [0, 1, 2, 2])
    assert report["classes_without_centroid"] == []


def test_kron_centroid_report_equals_the_report_of_explicit_rows():
    rng = np.random.default_rng(5)
    n, m, c = 120, 7, 4
    y = rng.integers(0, c, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, c, n))
    A = rng.standard_normal((n, m)) + 2.0 * np.eye(c, m)[y]
    B = rng.standard_normal((n, c)) - 2.0 * np.eye(c)[p]
    A[3] = 0.0  # a zero row: not scored, in no centroid
    got = kron_centroid_report(A, B, y, p)
    want = centroid_report(np.einsum("nm,nc->nmc", A, B).reshape(n, m * c), y, p)
    assert got["n_scored"] > 10 and got["n_nearest_true"] > 0
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_centroid_report_is_cosine_invariant_to_row_scaling():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6))
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    a = centroid_report(X, y, p)
    b = centroid_report(X * rng.uniform(0.01, 100, (200, 1)), y, p)
    np.testing.assert_array_equal(a["nearest"], b["nearest"])
    assert a["n_nearest_true"] == b["n_nearest_true"] and a["n_scored"] == a["n_misclassified"] > 0


def test_centroid_report_skips_classes_without_correct_images():
    e = np.eye(3)
    X = np.array([e[0], e[1], e[0] + 0.1 * e[1], e[2], e[1] + 0.1 * e[0]])
    y = np.array([0, 1, 1, 2, 0])
    p = np.array([0, 1, 0, 0, 2])
    # class 2 is never correctly classified: images 3 (true 2) and 4 (pred 2) are not scored
    report = centroid_report(X, y, p)
    assert report["classes_without_centroid"] == [2]
    assert report["n_misclassified"] == 3 and report["n_scored"] == 1
    assert report["n_nearest_true"] == 0 and report["n_nearest_pred"] == 1 and report["frac_nearest_pred"] == 1.0
    np.testing.assert_array_equal(report["nearest"], [0, -1, -1])


def test_centroid_report_without_misclassifications():
    X, y = blobs(n_per=3, k=2)
    report = centroid_report(X, y, y)
    assert report["n_misclassified"] == report["n_scored"] == report["n_nearest_true"] == 0
    assert report["frac_nearest_true"] is None and report["frac_nearest_pred"] is None
    assert report["misclassified"].shape == report["nearest"].shape == (0,)


def test_centroid_report_rejects_bad_labels():
    X, y = blobs(n_per=3, k=2)
    with pytest.raises(ValueError, match="p has 5 entries"):
        centroid_report(X, y, y[:5])
    with pytest.raises(ValueError, match="integer"):
        centroid_report(X, y, y.astype(float))


def test_confusion_pairs():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 1, 0])
    p = np.array([1, 1, 2, 0, 0, 0, 1, 2, 1, 0])
    assert confusion_pairs(y, p) == [(0, 1, 2), (1, 0, 2), (0, 2, 1), (2, 0, 1), (2, 1, 1)]
    assert confusion_pairs(y, p, top=3) == [(0, 1, 2), (1, 0, 2), (0, 2, 1)]
    assert confusion_pairs(y, y) == []


def test_most_confident_wrong():
    probs = np.array([
        [0.9, 0.1, 0.0],   # correct
        [0.2, 0.7, 0.1],   # wrong, 0.7
        [0.1, 0.1, 0.8],   # wrong, 0.8
        [0.5, 0.4, 0.1],   # wrong, 0.5
        [0.0, 0.95, 0.05], # correct
        [0.1, 0.2, 0.7],   # wrong, 0.7 (tie with 1: lower index first)
    ])
    y = np.array([0, 0, 1, 2, 1, 0])
    np.testing.assert_array_equal(most_confident_wrong(probs, y, top=10), [2, 1, 5, 3])
    np.testing.assert_array_equal(most_confident_wrong(probs, y, top=2), [2, 1])
    with pytest.raises(ValueError, match="class 3"):
        most_confident_wrong(probs, np.array([0, 0, 1, 3, 1, 0]))
