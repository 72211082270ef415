"""Cluster per-image representations and score the clusters against the true classes.

Host side of the Tables 2/3 reproduction: a representation (GW, P or FM) is
reduced by PCA -- from the explicit (N, D) matrix, or exactly from its (N, N)
Gram matrix -- clustered by KMeans or a Gaussian mixture, and scored with ARI,
NMI, silhouette and Hungarian-matched accuracy. numpy, scipy and scikit-learn
only.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import sklearn
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.mixture import GaussianMixture

from .validate import as_labels, as_matrix, check_int

METHODS = ("kmeans", "gmm")

# Relative tolerance (to max |G|) for the symmetry check of a Gram matrix; a
# float32 Gram computed on an accelerator is symmetric only to rounding.
_GRAM_SYMMETRY_RTOL = 1e-4
# GMM covariance floor, relative to the mean per-dimension variance of Z.
_GMM_REG_COVAR = 1e-6
# Largest Gram matrix reduced by a dense eigendecomposition (a float64 copy); larger ones by ARPACK.
_EXACT_GRAM_MAX = 4096
_GRAM_CHECK_ROWS = 1024  # rows per block of the symmetry check
# Memory (MiB) scikit-learn's chunked pairwise distances may use (silhouette).
_WORKING_MEMORY_MB = 256


def _check_n_clusters(n_clusters, n):
    check_int(n_clusters, "n_clusters", 2)
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
    X = as_matrix(X, "X")
    check_int(n_components, "n_components", 1)
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


def reduce_gram(G, n_components=32, seed=0):
    """Exact PCA scores from a Gram matrix G[i, j] = <x_i, x_j> (linear-kernel PCA).

    Centres G as H G H with H = I - 11^T / N, takes its top-k eigenpairs and returns
    (Z, info): Z (N, k) = eigvecs * sqrt(eigvals), which equals the PCA scores of the
    explicit rows x_i up to the sign of each component (the sign is fixed so that each
    column's largest-magnitude score is positive); k = min(n_components, N - 1).
    Components beyond the rank of the data have eigenvalue 0 and all-zero scores.
    info = {"method": "gram_pca", "n_components": k, "input_shape": (N, N),
    "explained_variance_ratio": (k,) eigenvalue / trace of the centred G}.
    Up to _EXACT_GRAM_MAX rows: a float64 copy of G and LAPACK's eigh (O(N^3)). Above: no
    copy of G; ARPACK (scipy eigsh, start vector seeded by `seed`) on the centred operator,
    O(N^2) memory and time per iteration, the same eigenpairs to rounding.
    """
    G = as_matrix(G, "G")
    n = G.shape[0]
    if G.shape[1] != n:
        raise ValueError(f"G must be a square Gram matrix (N, N), got shape {G.shape}")
    check_int(n_components, "n_components", 1)
    scale, asym = 0.0, 0.0
    for lo in range(0, n, _GRAM_CHECK_ROWS):  # by blocks of rows: no N x N temporaries
        block = G[lo:lo + _GRAM_CHECK_ROWS]
        scale = max(scale, float(np.abs(block).max()))
        asym = max(asym, float(np.abs(block - G[:, lo:lo + _GRAM_CHECK_ROWS].T).max()))
    if asym > _GRAM_SYMMETRY_RTOL * scale:
        raise ValueError(f"G is not symmetric (max |G - G.T| = {asym:.3g}, max |G| = {scale:.3g}); pass X @ X.T")
    k = min(n_components, n - 1)

    if n <= _EXACT_GRAM_MAX:
        Gc = np.array(G, dtype=np.float64)
        Gc += Gc.T
        Gc *= 0.5
        means = Gc.mean(axis=0)
        Gc -= means[None, :]
        Gc -= means[:, None]
        Gc += means.mean()
        total = float(np.trace(Gc))
        eigvals, eigvecs = scipy.linalg.eigh(Gc, subset_by_index=[n - k, n - 1], overwrite_a=True,
                                             check_finite=False)
    else:
        means = G.mean(axis=0, dtype=np.float64)
        grand = float(means.mean())
        total = float(np.trace(G)) - n * grand

        def centred(v):  # H G H v for a symmetric G
            v = v.reshape(n, -1)
            s = v.sum(axis=0)
            return G @ v - np.outer(np.ones(n), means @ v) - np.outer(means, s) + grand * np.outer(np.ones(n), s)

        op = scipy.sparse.linalg.LinearOperator((n, n), matvec=centred, matmat=centred, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n)
        eigvals, eigvecs = scipy.sparse.linalg.eigsh(op, k=k, which="LA", v0=v0)
        order = np.argsort(eigvals)
        eigvals, eigvecs = eigvals[order], eigvecs[:, order]
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
    Z = as_matrix(Z, "Z")
    _check_n_clusters(n_clusters, Z.shape[0])
    check_int(n_init, "n_init", 1)
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
    labels_true = as_labels(labels_true, "labels_true")
    labels_pred = as_labels(labels_pred, "labels_pred", labels_true.shape[0])
    if labels_true.shape[0] == 0:
        raise ValueError("labels_true is empty; pass at least one label")
    *_, rows, cols, counts = _match(labels_true, labels_pred)
    return float(counts[rows, cols].sum() / labels_true.shape[0])


def align_clusters(labels_true, labels_pred):
    """Relabel clusters by their Hungarian-matched class (e.g. to colour them like the classes).

    labels_true: (N,) non-negative integer classes. Returns (N,) int64: a cluster matched
    to class c gets label c; unmatched clusters get max(labels_true) + 1, + 2, ...
    """
    labels_true = as_labels(labels_true, "labels_true")
    labels_pred = as_labels(labels_pred, "labels_pred", labels_true.shape[0])
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
    Z = as_matrix(Z, "Z")
    n = Z.shape[0]
    labels_true = as_labels(labels_true, "labels_true", n)
    labels_pred = as_labels(labels_pred, "labels_pred", n)
    check_int(silhouette_max_points, "silhouette_max_points", 2)

    subset = np.arange(n)
    if n > silhouette_max_points:
        subset = np.sort(np.random.default_rng(seed).choice(n, silhouette_max_points, replace=False))
    n_labels = len(np.unique(labels_pred[subset]))
    silhouette = None
    if 2 <= n_labels <= len(subset) - 1:
        with sklearn.config_context(working_memory=_WORKING_MEMORY_MB):
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
    X = as_matrix(X, "gram" if gram else "X")
    n = X.shape[0]
    labels_true = as_labels(labels_true, "labels_true", n)
    methods = tuple(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods!r}")
    if n_clusters is None:
        n_clusters = len(np.unique(labels_true))
    _check_n_clusters(n_clusters, n)
    check_int(n_init, "n_init", 1)

    if gram:
        Z, info = reduce_gram(X, n_components, seed)
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
