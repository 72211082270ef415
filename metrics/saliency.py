"""Saliency-map metrics of the MIT saliency benchmark (Bylinskii et al., 2018).

Follows the benchmark's MATLAB code (cvzoya/saliency, code_forMetrics) unless noted.
Every metric takes the prediction first and the reference second, both 2-D maps of the
same shape (no resizing), and returns a float. `score_batch` applies one metric to
(N, H, W) stacks.

Policies:
- A metric that min-max scales or z-scores a map raises UndefinedMetricError (a
  ValueError) when that map is constant; MATLAB would return NaN.
- nss, auc_judd and auc_borji binarise the reference into fixations: pixels above 0.5
  after min-max scaling (so 0/1 or boolean maps work as they are), or above `threshold`
  when given. No fixations raises UndefinedMetricError.
"""

import functools

import numpy as np
import scipy.integrate
from skimage.metrics import structural_similarity

EPS = np.finfo(np.float64).eps  # MATLAB eps = 2^-52, used by the benchmark's KLD


class UndefinedMetricError(ValueError):
    """The metric is undefined for these maps (constant map, no fixations)."""


def cc(pred, ref):
    """Pearson linear correlation coefficient between the two maps, in [-1, 1]."""
    pred, ref = _check_pair(pred, ref)
    _require_not_constant(pred, "pred", "cc")
    _require_not_constant(ref, "ref", "cc")
    a = pred - pred.mean()
    b = ref - ref.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def kld(pred, ref):
    """KL divergence KL(ref || pred) of the sum-normalised maps, >= 0 (0 for identical maps).

    As in the benchmark: sum(R * log(eps + R / (P + eps))) with eps = 2^-52, so a zero
    prediction where ref > 0 gives a large finite value. Maps must be non-negative with a
    positive sum.
    """
    pred, ref = _check_pair(pred, ref)
    p = _as_distribution(pred, "pred")
    r = _as_distribution(ref, "ref")
    return float(np.sum(r * np.log(EPS + r / (p + EPS))))


def sim(pred, ref):
    """Similarity (histogram intersection) of the two maps, in [0, 1] (1 for identical maps).

    As in the benchmark, each map is min-max scaled to [0, 1] and then sum-normalised
    before summing the element-wise minima.
    """
    pred, ref = _check_pair(pred, ref)
    p = _minmax(pred, "pred", "sim")
    r = _minmax(ref, "ref", "sim")
    return float(np.minimum(p / p.sum(), r / r.sum()).sum())


def ssim(pred, ref):
    """Structural similarity (skimage) of the min-max scaled maps with data_range=1, in [-1, 1].

    Uses skimage's defaults (uniform window, sample covariance) with win_size = 7, or the
    largest odd number <= the smaller side for maps under 7 pixels; maps need sides >= 3.
    """
    pred, ref = _check_pair(pred, ref)
    side = min(pred.shape)
    if side < 3:
        raise ValueError(f"ssim needs maps of at least 3x3 pixels, got {pred.shape}; upsample the maps first")
    win_size = min(7, side if side % 2 else side - 1)
    return float(
        structural_similarity(
            _minmax(pred, "pred", "ssim"), _minmax(ref, "ref", "ssim"), data_range=1.0, win_size=win_size
        )
    )


def nss(pred, fixations, threshold=None):
    """Normalized scanpath saliency: mean of the z-scored prediction at the fixations.

    As in the benchmark the z-score uses the sample standard deviation (ddof=1).
    `fixations` is binarised as described in the module docstring.
    """
    pred, fixations = _check_pair(pred, fixations)
    _require_not_constant(pred, "pred", "nss")
    mask = _fixation_mask(fixations, threshold, "nss")
    return float(np.mean((pred[mask] - pred.mean()) / pred.std(ddof=1)))


def auc_judd(pred, fixations, threshold=None, jitter=True, seed=0):
    """AUC-Judd: area under the ROC curve with thresholds at the saliency of each fixation.

    Returns a float in [0, 1]. Follows AUC_Judd.m: true positives are fixations at or
    above each threshold, false positives the non-fixated pixels at or above it, and the
    points are joined by the trapezoidal rule. With jitter (the benchmark's default),
    uniform noise in [0, 1e-7) breaks ties; unlike the MATLAB code it is added after
    min-max scaling, so its size does not depend on the map's units. `seed` seeds it.
    """
    pred, fixations = _check_pair(pred, fixations)
    saliency = _minmax(pred, "pred", "auc_judd")
    if jitter:
        saliency = _minmax(saliency + np.random.default_rng(seed).random(saliency.shape) / 1e7, "pred", "auc_judd")
    mask = _fixation_mask(fixations, threshold, "auc_judd")
    n_fix, n_pixels = int(mask.sum()), mask.size
    if n_fix == n_pixels:
        raise UndefinedMetricError("auc_judd is undefined: every pixel is a fixation, none is left as a negative")
    thresholds = np.sort(saliency[mask])[::-1]
    above = n_pixels - np.searchsorted(np.sort(saliency, axis=None), thresholds, side="left")
    rank = np.arange(1, n_fix + 1)
    tp = np.concatenate([[0.0], rank / n_fix, [1.0]])
    fp = np.concatenate([[0.0], (above - rank) / (n_pixels - n_fix), [1.0]])
    return float(scipy.integrate.trapezoid(tp, fp))


def auc_borji(pred, fixations, n_splits=100, step=0.1, seed=0, threshold=None):
    """AUC-Borji: ROC area of fixations vs uniformly sampled pixels, averaged over splits.

    Returns a float in [0, 1]. Follows AUC_Borji.m on the min-max scaled prediction: each
    split draws as many pixels as there are fixations, uniformly with replacement from the
    whole map, as np.random.default_rng(seed).integers(0, H * W, size=(n_fixations,
    n_splits)) (column s is split s, flat row-major indices), and sweeps thresholds
    0, step, 2 * step, ... up to the largest value involved, joined by the trapezoidal rule.
    """
    pred, fixations = _check_pair(pred, fixations)
    if int(n_splits) != n_splits or n_splits < 1:
        raise ValueError(f"n_splits must be a positive integer, got {n_splits}")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    saliency = _minmax(pred, "pred", "auc_borji").ravel()
    mask = _fixation_mask(fixations, threshold, "auc_borji").ravel()
    fixated = np.sort(saliency[mask])
    n_fix, n_splits = fixated.size, int(n_splits)
    rows = min(saliency.size, 1 << (n_fix - 1).bit_length())  # draws cached by power-of-two row counts
    drawn = _uniform_draws(int(seed), saliency.size, n_splits, rows)[:n_fix]  # the first n_fix rows of the draw
    # One threshold grid for all splits: thresholds above a split's maximum add (0, 0) points, which add no area.
    top = max(fixated[-1], saliency[drawn].max())
    grid = np.arange(int(np.floor(saliency.max() / step + 1e-9)) + 1) * step  # k * step ascending, up to the largest pixel
    thresholds = grid[: int(np.floor(top / step + 1e-9)) + 1][::-1]
    tp = np.concatenate([[0.0], (n_fix - np.searchsorted(fixated, thresholds, side="left")) / n_fix, [1.0]])
    # A pixel at level l lies at or above exactly the thresholds k * step with k < l, so the count of a
    # split's samples at or above threshold k is the number of its samples of level > k.
    level = np.searchsorted(grid, saliency, side="right")
    per_split = np.bincount((level[drawn] + (len(grid) + 1) * np.arange(n_splits)).ravel(),
                            minlength=(len(grid) + 1) * n_splits).reshape(n_splits, len(grid) + 1)
    at_or_above = np.cumsum(per_split[:, ::-1], axis=1)[:, ::-1]  # [s, l]: samples of level >= l
    # [t, s], thresholds descending; C order so that the sums below add in the same order as over the samples
    above = np.ascontiguousarray(at_or_above[:, 1:len(thresholds) + 1][:, ::-1].T) / n_fix
    fp = np.concatenate([np.zeros((1, n_splits)), above, np.ones((1, n_splits))])
    aucs = np.sum(np.diff(fp, axis=0) * ((tp[1:] + tp[:-1]) / 2)[:, None], axis=0)  # trapezoid per split
    return float(np.mean(aucs))


@functools.lru_cache(maxsize=8)
def _uniform_draws(seed: int, n_pixels: int, n_splits: int, rows: int) -> np.ndarray:
    """Returns np.random.default_rng(seed).integers(0, n_pixels, size=(rows, n_splits)), read-only.

    A draw of size (n, n_splits) is the first n rows of any larger one (the generator fills the
    array in order), so one draw serves every fixation count up to `rows`.
    """
    drawn = np.random.default_rng(seed).integers(0, n_pixels, size=(rows, n_splits))
    drawn.flags.writeable = False
    return drawn


METRICS = {"cc": cc, "kld": kld, "sim": sim, "ssim": ssim, "nss": nss, "auc_judd": auc_judd, "auc_borji": auc_borji}


def score_batch(metric, preds, refs, undefined="raise", **kwargs):
    """Apply METRICS[metric] to each pair of (N, H, W) stacks; returns a float64 array (N,).

    undefined="raise" (default) re-raises UndefinedMetricError naming the pair index;
    undefined="nan" stores NaN for such pairs instead, so np.isnan(scores).sum() counts
    them. Other errors (shapes, NaN inputs) always raise. kwargs go to the metric.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if undefined not in ("raise", "nan"):
        raise ValueError(f"undefined must be 'raise' or 'nan', got {undefined!r}")
    preds, refs = np.asarray(preds), np.asarray(refs)
    if preds.ndim != 3 or preds.shape != refs.shape:
        raise ValueError(f"preds and refs must both be (N, H, W) with equal shapes, got {preds.shape} and {refs.shape}")
    scores = np.empty(preds.shape[0])
    for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
        try:
            scores[i] = METRICS[metric](pred, ref, **kwargs)
        except UndefinedMetricError as err:
            if undefined == "raise":
                raise UndefinedMetricError(f"pair {i}: {err}") from err
            scores[i] = np.nan
    return scores


def _check_pair(pred, ref):
    """Return both maps as float64 after checking they are finite 2-D maps of one shape."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    for name, m in (("pred", pred), ("ref", ref)):
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"{name} must be a non-empty 2-D map (H, W), got shape {m.shape}")
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} != ref shape {ref.shape}; resize one map to the other's shape")
    pred, ref = pred.astype(np.float64), ref.astype(np.float64)
    for name, m in (("pred", pred), ("ref", ref)):
        if not np.isfinite(m).all():
            raise ValueError(f"{name} contains NaN or Inf; fix or mask the map first")
    return pred, ref


def _require_not_constant(m, name, metric):
    if m.max() == m.min():
        raise UndefinedMetricError(f"{metric} is undefined: {name} map is constant (all values {m.flat[0]:g})")


def _minmax(m, name, metric):
    _require_not_constant(m, name, metric)
    return (m - m.min()) / (m.max() - m.min())


def _as_distribution(m, name):
    if m.min() < 0:
        raise ValueError(f"kld needs non-negative maps, {name} has minimum {m.min():g}; shift or clip it first")
    total = m.sum()
    if total == 0:
        raise UndefinedMetricError(f"kld is undefined: {name} map is all zero and cannot be normalised")
    return m / total


def _fixation_mask(fixations, threshold, metric):
    """Boolean fixation map: min-max scaled > 0.5, or > threshold when given."""
    if threshold is None:
        if fixations.max() == fixations.min():
            raise UndefinedMetricError(
                f"{metric} is undefined: fixation map is constant, so it marks no fixations; "
                "pass threshold= to binarise it explicitly"
            )
        mask = fixations > fixations.min() + 0.5 * (fixations.max() - fixations.min())
    else:
        mask = fixations > threshold
    if not mask.any():
        raise UndefinedMetricError(f"{metric} is undefined: no fixations above threshold {threshold}")
    return mask
