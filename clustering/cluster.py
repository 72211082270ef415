"""Cluster per-image representations and score the clusters against the true classes.

Host side of the Tables 2/3 reproduction: a representation (GW, P or FM) is
reduced by PCA -- from the explicit (N, D) matrix, or exactly from its (N, N)
Gram matrix -- clustered by KMeans or a Gaussian mixture, and scored with ARI,
NMI, silhouette and Hungarian-matched accuracy. numpy, scipy and scikit-learn
only.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.linalg
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.mixture import GaussianMixture

METHODS = ("kmeans", "gmm")

# Relative tolerance (to max |G|) for the symmetry check of a Gram matrix; a
# float32 Gram computed on an accelerator is symmetric only to rounding.
_GRAM_SYMMETRY_RTOL = 1e-4
# GMM covariance floor, relative to the mean per-dimension variance of Z.
_GMM_REG_COVAR = 1e-6


def _as_matrix(X, name):
    """X as a finite real floating (N, D) array with N >= 2 (integers become float64)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {X.shape}; flatten each example to one row")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"{name} has shape {X.shape}; need at least 2 rows and 1 column")
    if X.dtype == bool or not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise ValueError(f"{name} has dtype {X.dtype}; pass a real numeric array")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    bad = np.count_nonzero(~np.isfinite(X))
    if bad:
        raise ValueError(f"{name} has {bad} NaN/inf entries; drop or repair those examples first")
    return X


def _as_labels(labels, name, n=None):
    """labels as a 1-D array, of length n when n is given."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {labels.shape}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the data has {n} rows; pass one label per row")
    return labels


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_n_clusters(n_clusters, n):
    _check_int(n_clusters, "n_clusters", 2)
    if n_clusters > n:
        raise ValueError(f"n_clusters={n_clusters} is more than the number of points N={n}; "
                         "use fewer clusters or more points")


def reduce_pca(X, n_components=32, seed=0):
    """PCA of the rows of X (N, D).

    Returns (Z, info): Z (N, k) principal-component scores, k = min(n_components, N - 1, D);
    info = {"method": "pca", "n_components": k, "input_shape": (N, D),
    "explained_variance_ratio": (k,) fraction of the total variance per component}.
    Uses scikit-learn's "auto" solver: exact for small inputs, randomized (seeded by
    `seed`, so reproducible) for large ones.
    """
    X = _as_matrix(X, "X")
    _check_int(n_components, "n_components", 1)
    k = min(n_components, X.shape[0] - 1, X.shape[1])
    pca = PCA(n_components=k, random_state=seed)
    Z = pca.fit_transform(X)
    info = {
        "method": "pca",
        "n_components": k,
        "input_shape": X.shape,
        "explained_variance_ratio": pca.explained_variance_ratio_,
    }
    return Z, info


def reduce_gram(G, n_components=32):
    """Exact PCA scores from a Gram matrix G[i, j] = <x_i, x_j> (linear-kernel PCA).

    Centres G as H G H with H = I - 11^T / N, takes its top-k eigenpairs and returns
    (Z, info): Z (N, k) = eigvecs * sqrt(eigvals), which equals the PCA scores of the
    explicit rows x_i up to the sign of each component (the sign is fixed so that each
    column's largest-magnitude score is positive); k = min(n_components, N - 1).
    Components beyond the rank of the data have eigenvalue 0 and all-zero scores.
    info = {"method": "gram_pca", "n_components": k, "input_shape": (N, N),
    "explained_variance_ratio": (k,) eigenvalue / trace of the centred G}.
    Cost: a float64 copy of G (N^2 * 8 bytes) and an O(N^3) eigendecomposition, so
    for N much beyond 1e4 prefer reduce_pca on the explicit matrix when D allows.
    """
    G = _as_matrix(G, "G")
    n = G.shape[0]
    if G.shape[1] != n:
        raise ValueError(f"G must be a square Gram matrix (N, N), got shape {G.shape}")
    _check_int(n_components, "n_components", 1)
    scale = float(np.abs(G).max())
    asym = float(np.abs(G - G.T).max())
    if asym > _GRAM_SYMMETRY_RTOL * scale:
        raise ValueError(f"G is not symmetric (max |G - G.T| = {asym:.3g}, max |G| = {scale:.3g}); pass X @ X.T")
    k = min(n_components, n - 1)

    Gc = np.array(G, dtype=np.float64)
    Gc += Gc.T
    Gc *= 0.5
    means = Gc.mean(axis=0)
    Gc -= means[None, :]
    Gc -= means[:, None]
    Gc += means.mean()
    total = float(np.trace(Gc))

    eigvals, eigvecs = scipy.linalg.eigh(Gc, subset_by_index=[n - k, n - 1], overwrite_a=True, check_finite=False)
    eigvals = np.clip(eigvals[::-1], 0.0, None)
    Z = eigvecs[:, ::-1] * np.sqrt(eigvals)
    signs = np.sign(Z[np.abs(Z).argmax(axis=0), np.arange(k)])
    Z *= np.where(signs == 0, 1.0, signs)
    ratio = eigvals / total if total > 0 else np.zeros(k)
    info = {"method": "gram_pca", "n_components": k, "input_shape": G.shape, "explained_variance_ratio": ratio}
    return Z, info


def cluster(Z, n_clusters, method, seed=0, n_init=10):
    """Cluster the rows of Z (N, D); returns labels (N,) int64 in [0, n_clusters).

    method "kmeans": KMeans(n_clusters, n_init=n_init, random_state=seed).
    method "gmm": GaussianMixture(n_clusters, covariance_type="diag", n_init=n_init,
    random_state=seed) with reg_covar = 1e-6 * mean per-dimension variance of Z.
    Diagonal covariances because Z is PCA scores (decorrelated overall) and a full
    covariance needs D(D+1)/2 parameters per cluster (528 in 32-D), which a few hundred
    points per cluster cannot estimate: full fits go singular or collapse. reg_covar is
    relative so the covariance floor means the same for gradients (scores ~1e-3) and
    features (~1e2). A mixture may leave components empty, so fewer than n_clusters
    distinct labels can come back. Both methods are deterministic for a fixed seed.
    """
    Z = _as_matrix(Z, "Z")
    _check_n_clusters(n_clusters, Z.shape[0])
    _check_int(n_init, "n_init", 1)
    if method == "kmeans":
        model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    elif method == "gmm":
        reg = _GMM_REG_COVAR * max(float(Z.var(axis=0).mean()), np.finfo(np.float64).tiny)
        model = GaussianMixture(
            n_components=n_clusters, covariance_type="diag", reg_covar=reg, n_init=n_init, random_state=seed
        )
    else:
        raise ValueError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")
    return model.fit_predict(Z).astype(np.int64)


def _match(labels_true, labels_pred):
    """Hungarian matching of clusters to classes.

    Returns (classes, pred_idx, rows, cols, counts): the sorted distinct classes, each
    point's cluster index, matched (class index, cluster index) pairs and the
    (classes x clusters) contingency matrix.
    """
    classes, true_idx = np.unique(labels_true, return_inverse=True)
    pred_idx = np.unique(labels_pred, return_inverse=True)[1]
    counts = contingency_matrix(true_idx, pred_idx)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return classes, pred_idx, rows, cols, counts


def hungarian_accuracy(labels_true, labels_pred):
    """Accuracy after the one-to-one cluster-to-class matching that maximises it; returns a float.

    Found with scipy's linear_sum_assignment on the (classes x clusters) contingency
    matrix; when the counts differ, points in unmatched clusters (or of unmatched
    classes) count as wrong.
    """
    labels_true = _as_labels(labels_true, "labels_true")
    labels_pred = _as_labels(labels_pred, "labels_pred", labels_true.shape[0])
    if labels_true.shape[0] == 0:
        raise ValueError("labels_true is empty; pass at least one label")
    *_, rows, cols, counts = _match(labels_true, labels_pred)
    return float(counts[rows, cols].sum() / labels_true.shape[0])


def align_clusters(labels_true, labels_pred):
    """Relabel clusters by their Hungarian-matched class (e.g. to colour them like the classes).

    labels_true: (N,) non-negative integer classes. Returns (N,) int64: a cluster matched
    to class c gets label c; unmatched clusters get max(labels_true) + 1, + 2, ...
    """
    labels_true = _as_labels(labels_true, "labels_true")
    labels_pred = _as_labels(labels_pred, "labels_pred", labels_true.shape[0])
    if labels_true.shape[0] == 0:
        raise ValueError("labels_true is empty; pass at least one label")
    if not np.issubdtype(labels_true.dtype, np.integer) or labels_true.min() < 0:
        raise ValueError("labels_true must be non-negative integer class indices")
    classes, pred_idx, rows, cols, counts = _match(labels_true, labels_pred)
    new = np.full(counts.shape[1], -1, dtype=np.int64)
    new[cols] = classes[rows]
    unmatched = new < 0
    new[unmatched] = int(classes.max()) + 1 + np.arange(np.count_nonzero(unmatched))
    return new[pred_idx]


def scores(labels_true, labels_pred, Z, *, silhouette_max_points=10_000, seed=0):
    """Score a clustering of Z against the true classes; returns a dict of floats.

    ari, nmi: scikit-learn adjusted_rand_score / normalized_mutual_info_score.
    silhouette: scikit-learn silhouette_score (Euclidean) of Z -- the space that was
    clustered, e.g. the PCA scores -- under labels_pred; it measures how separated the
    clusters are, not agreement with the classes. Computed on a random subset of
    silhouette_max_points points (seeded) when N is larger, because the exact score is
    O(N^2). None where undefined: a single cluster, or every point its own cluster.
    accuracy: hungarian_accuracy(labels_true, labels_pred).
    """
    Z = _as_matrix(Z, "Z")
    n = Z.shape[0]
    labels_true = _as_labels(labels_true, "labels_true", n)
    labels_pred = _as_labels(labels_pred, "labels_pred", n)
    _check_int(silhouette_max_points, "silhouette_max_points", 2)

    subset = np.arange(n)
    if n > silhouette_max_points:
        subset = np.sort(np.random.default_rng(seed).choice(n, silhouette_max_points, replace=False))
    n_labels = len(np.unique(labels_pred[subset]))
    silhouette = None
    if 2 <= n_labels <= len(subset) - 1:
        silhouette = float(silhouette_score(Z[subset], labels_pred[subset]))
    return {
        "ari": float(adjusted_rand_score(labels_true, labels_pred)),
        "nmi": float(normalized_mutual_info_score(labels_true, labels_pred)),
        "silhouette": silhouette,
        "accuracy": hungarian_accuracy(labels_true, labels_pred),
    }


def cluster_and_score(
    X, labels_true, *, name="X", gram=False, n_clusters=None, methods=METHODS, n_components=32, seed=0, n_init=10
):
    """Reduce a representation by PCA, cluster it with each method and score it against labels_true.

    X: the representation (N, D), reduced with reduce_pca; or, with gram=True, its
    Gram matrix (N, N), reduced exactly with reduce_gram. name labels it in the
    description. n_clusters defaults to the number of distinct labels_true.
    Returns a dict:
      description: how the clustered space was made, e.g. "PCA to 32 dims of FM (1000 x 512)"
        or "exact PCA to 32 dims from the Gram matrix of GW (1000 x 1000)";
      clusterers: {method: one-line description of the clustering model};
      reduction: the reduction's info dict; Z: (N, k) clustered scores;
      labels: {method: (N,) int64}; scores: {method: scores(...) dict}.
    """
    X = _as_matrix(X, "gram" if gram else "X")
    n = X.shape[0]
    labels_true = _as_labels(labels_true, "labels_true", n)
    methods = tuple(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods!r}")
    if n_clusters is None:
        n_clusters = len(np.unique(labels_true))
    _check_n_clusters(n_clusters, n)
    _check_int(n_init, "n_init", 1)

    if gram:
        Z, info = reduce_gram(X, n_components)
        description = f"exact PCA to {info['n_components']} dims from the Gram matrix of {name} ({n} x {n})"
    else:
        Z, info = reduce_pca(X, n_components, seed)
        description = f"PCA to {info['n_components']} dims of {name} ({n} x {X.shape[1]})"
    clusterers = {
        "kmeans": f"KMeans(n_clusters={n_clusters}, n_init={n_init}, random_state={seed})",
        "gmm": f"GaussianMixture(n_components={n_clusters}, covariance_type='diag', "
               f"reg_covar={_GMM_REG_COVAR:g} * mean variance, n_init={n_init}, random_state={seed})",
    }
    labels = {m: cluster(Z, n_clusters, m, seed, n_init) for m in methods}
    return {
        "description": description,
        "clusterers": {m: clusterers[m] for m in methods},
        "reduction": info,
        "Z": Z,
        "labels": labels,
        "scores": {m: scores(labels_true, labels[m], Z, seed=seed) for m in methods},
    }
