import numpy as np
import pytest
import scipy.special
import scipy.stats
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score

from resnet_jax.metrics.saliency import (METRICS, UndefinedMetricError, auc_borji, auc_judd, cc, kld, nss,
                                         score_batch, sim, ssim)

EPS = 2.0**-52


def blob(shape, center, sigma):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))


def minmax(m):
    return (m - m.min()) / (m.max() - m.min())


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    return rng.random((24, 32)), rng.random((24, 32))


def test_identical_maps():
    m = blob((20, 30), (8, 12), 4) + 0.01
    assert cc(m, m) == pytest.approx(1.0)
    assert kld(m, m) == pytest.approx(0.0, abs=1e-12)
    assert sim(m, m) == pytest.approx(1.0)
    assert ssim(m, m) == pytest.approx(1.0)


def test_disjoint_maps():
    a = np.zeros((10, 10))
    b = np.zeros((10, 10))
    a[:3, :3] = 1.0
    b[6:, 6:] = 2.0
    assert sim(a, b) == 0.0
    assert cc(a, b) < 0
    # Closed form for two disjoint indicator maps with k1, k2 of n pixels set.
    k1, k2, n = 9, 16, 100
    assert cc(a, b) == pytest.approx(-np.sqrt(k1 * k2 / ((n - k1) * (n - k2))))


def test_constant_maps_are_undefined():
    const = np.full((8, 8), 0.3)
    other = np.random.default_rng(1).random((8, 8))
    for metric in (cc, sim, ssim, nss, auc_judd, auc_borji):
        with pytest.raises(UndefinedMetricError, match="constant"):
            metric(const, other)
    with pytest.raises(ValueError, match="ref map is constant"):
        cc(other, const)


def test_cc_matches_numpy_and_scipy(maps):
    pred, ref = maps
    pred = pred + 0.5 * ref  # correlated
    assert cc(pred, ref) == pytest.approx(np.corrcoef(pred.ravel(), ref.ravel())[0, 1], abs=1e-12)
    assert cc(pred, ref) == pytest.approx(scipy.stats.pearsonr(pred.ravel(), ref.ravel()).statistic, abs=1e-12)


def test_kld_matches_scipy(maps):
    pred, ref = maps
    pred, ref = pred + 0.1, ref + 0.1  # strictly positive: the eps terms are negligible
    p, r = pred / pred.sum(), ref / ref.sum()
    assert kld(pred, ref) == pytest.approx(scipy.special.rel_entr(r, p).sum(), rel=1e-9)
    assert kld(pred, ref) == pytest.approx(scipy.stats.entropy(ref.ravel(), pred.ravel()), rel=1e-9)
    assert kld(np.ones_like(ref), ref) == pytest.approx(scipy.stats.entropy(r.ravel(), np.full(r.size, 1 / r.size)))


def test_kld_epsilon_treatment():
    pred = np.array([[0.0, 1.0], [1.0, 2.0]])
    ref = np.array([[1.0, 0.0], [1.0, 2.0]])
    p, r = pred / 4, ref / 4
    # ref zero -> term 0 (as rel_entr); pred zero under ref mass -> r * log(eps + r / eps), finite.
    expected = r[0, 0] * np.log(EPS + r[0, 0] / EPS) + scipy.special.rel_entr(r[1], p[1]).sum()
    assert np.isfinite(kld(pred, ref))
    assert kld(pred, ref) == pytest.approx(expected, rel=1e-12)


def test_kld_errors():
    with pytest.raises(ValueError, match="non-negative"):
        kld(np.array([[1.0, -1.0]]), np.ones((1, 2)))
    with pytest.raises(UndefinedMetricError, match="all zero"):
        kld(np.ones((2, 2)), np.zeros((2, 2)))


def test_sim_by_hand():
    pred = np.array([[0.0, 1.0], [1.0, 2.0]])  # min-max [[0, .5], [.5, 1]], sum-normalised / 2
    ref = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert sim(pred, ref) == pytest.approx(0.5)
    assert sim(pred + 10, 3 * ref) == pytest.approx(0.5)  # min-max makes SIM offset and scale invariant


def test_ssim_matches_skimage(maps):
    pred, ref = maps
    expected = structural_similarity(minmax(pred), minmax(ref), data_range=1.0, win_size=7)
    assert ssim(pred * 40 + 3, ref) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape, win_size", [((5, 6), 5), ((4, 9), 3), ((3, 3), 3)])
def test_ssim_small_maps(shape, win_size):
    rng = np.random.default_rng(2)
    pred, ref = rng.random(shape), rng.random(shape)
    expected = structural_similarity(minmax(pred), minmax(ref), data_range=1.0, win_size=win_size)
    assert ssim(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_ssim_too_small():
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim(np.eye(2), np.eye(2)[::-1])


def test_nss_by_hand():
    pred = np.arange(6.0).reshape(2, 3)  # mean 2.5, sample std sqrt(3.5)
    fixations = np.zeros((2, 3), dtype=bool)
    fixations[1, 2] = fixations[1, 0] = True  # values 5 and 3
    assert nss(pred, fixations) == pytest.approx(1.5 / np.sqrt(3.5))
    # A continuous reference is binarised at the middle of its range, or at an explicit threshold.
    density = np.array([[0.0, 0.1, 0.2], [0.9, 0.3, 1.0]])
    assert nss(pred, density) == pytest.approx(1.5 / np.sqrt(3.5))
    at_values_3_4_5 = np.mean([0.5, 1.5, 2.5]) / np.sqrt(3.5)
    assert nss(pred, density, threshold=0.25) == pytest.approx(at_values_3_4_5)


def test_fixation_errors():
    pred = np.random.default_rng(3).random((4, 4))
    with pytest.raises(UndefinedMetricError, match="marks no fixations"):
        nss(pred, np.zeros((4, 4)))
    with pytest.raises(UndefinedMetricError, match="no fixations above threshold 2"):
        auc_borji(pred, pred, threshold=2)
    with pytest.raises(UndefinedMetricError, match="every pixel is a fixation"):
        auc_judd(pred, np.ones((4, 4)), threshold=0.5)


def auc_judd_matlab(saliency, fixations):
    """Line-by-line transliteration of AUC_Judd.m (without jitter)."""
    S = minmax(saliency).ravel()
    F = fixations.ravel()
    Sth = S[F > 0]
    n_fix, n_pix = len(Sth), len(S)
    tp, fp = np.zeros(n_fix + 2), np.zeros(n_fix + 2)
    tp[-1] = fp[-1] = 1
    for i, thresh in enumerate(np.sort(Sth)[::-1], start=1):
        above = np.sum(S >= thresh)
        tp[i] = i / n_fix
        fp[i] = (above - i) / (n_pix - n_fix)
    return np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2)


def test_auc_judd_matches_matlab_loop_and_sklearn():
    rng = np.random.default_rng(4)
    for _ in range(3):
        pred = rng.random((20, 30))
        fixations = rng.random((20, 30)) < 0.05
        score = auc_judd(pred, fixations, jitter=False)
        assert score == pytest.approx(auc_judd_matlab(pred, fixations), abs=1e-12)
        # Without ties, the trapezoids between fixation thresholds exceed the exact ROC area
        # by fp(lowest fixation) / (2 * n_fix).
        S = minmax(pred)
        fp_last = np.sum((S >= S[fixations].min()) & ~fixations) / np.sum(~fixations)
        expected = roc_auc_score(fixations.ravel(), S.ravel()) + fp_last / (2 * fixations.sum())
        assert score == pytest.approx(expected, abs=1e-12)


def test_auc_judd_perfect_and_jitter():
    rng = np.random.default_rng(5)
    fixations = np.zeros((10, 10), dtype=bool)
    fixations[2, 3] = fixations[7, 7] = fixations[5, 1] = True
    pred = rng.random((10, 10)) * 0.5 + fixations  # fixations strictly above all others
    assert auc_judd(pred, fixations) == pytest.approx(1.0)
    assert roc_auc_score(fixations.ravel(), pred.ravel()) == 1.0
    # Jitter only breaks ties: values 1e-2 apart keep their order.
    spaced = rng.permutation(100).reshape(10, 10) / 100
    assert auc_judd(spaced, fixations) == pytest.approx(auc_judd(spaced, fixations, jitter=False), abs=1e-6)


def auc_borji_matlab(saliency, fixations, n_splits, step, seed):
    """Transliteration of AUC_Borji.m with the documented random draws."""
    S = minmax(saliency).ravel()
    Sth = S[fixations.ravel() > 0]
    n_fix = len(Sth)
    randfix = S[np.random.default_rng(seed).integers(0, len(S), size=(n_fix, n_splits))]
    aucs = []
    for s in range(n_splits):
        curfix = randfix[:, s]
        top = max(Sth.max(), curfix.max())
        threshes = (np.arange(int(np.floor(top / step + 1e-9)) + 1) * step)[::-1]
        tp, fp = np.zeros(len(threshes) + 2), np.zeros(len(threshes) + 2)
        tp[-1] = fp[-1] = 1
        for i, thresh in enumerate(threshes, start=1):
            tp[i] = np.sum(Sth >= thresh) / n_fix
            fp[i] = np.sum(curfix >= thresh) / n_fix
        aucs.append(np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2))
    return np.mean(aucs)


@pytest.mark.parametrize("step", [0.1, 0.03])
def test_auc_borji_matches_matlab_loop(step):
    rng = np.random.default_rng(6)
    pred = blob((16, 20), (5, 6), 3) + 0.3 * rng.random((16, 20))
    fixations = rng.random((16, 20)) < 0.04
    expected = auc_borji_matlab(pred, fixations, n_splits=20, step=step, seed=3)
    assert auc_borji(pred, fixations, n_splits=20, step=step, seed=3) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("order", [1, -1])
def test_auc_borji_matches_matlab_loop_for_every_fixation_count(order):
    # The draws are cached per map size and sliced to the fixation count: counts across the cache's
    # row boundaries (powers of two), met in rising and in falling order, with values on the grid.
    rng = np.random.default_rng(8)
    pred = np.round(rng.random((9, 11)) ** 2, 1)  # many pixels exactly at a threshold k * 0.1
    ranks = rng.permutation(99).reshape(9, 11)
    for n_fix in [1, 2, 3, 4, 5, 31, 32, 33, 64, 65, 98][::order]:
        fixations = ranks < n_fix
        expected = auc_borji_matlab(pred, fixations, n_splits=7, step=0.1, seed=1)
        assert auc_borji(pred, fixations, n_splits=7, step=0.1, seed=1) == pytest.approx(expected, abs=1e-12), n_fix


def test_auc_borji_binary_prediction_closed_form():
    # pred == fixation map: tp = 1 at every threshold > 0, fp = share of samples on fixations,
    # so each split's area is 1 - fp / 2.
    rng = np.random.default_rng(7)
    fixations = rng.random((12, 12)) < 0.2
    n_fix = int(fixations.sum())
    draws = np.random.default_rng(0).integers(0, 144, size=(n_fix, 100))
    on_fix = fixations.ravel()[draws].mean(axis=0)
    assert auc_borji(fixations.astype(float), fixations) == pytest.approx(np.mean(1 - on_fix / 2), abs=1e-12)


def test_auc_borji_argument_errors(maps):
    pred, ref = maps
    with pytest.raises(ValueError, match="n_splits"):
        auc_borji(pred, ref, n_splits=0)
    with pytest.raises(ValueError, match="step"):
        auc_borji(pred, ref, step=0)


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(4, 5\) != ref shape \(5, 4\)"):
        cc(np.ones((4, 5)), np.ones((5, 4)))
    bad = np.ones((3, 3))
    bad[1, 1] = np.nan
    for metric in METRICS.values():
        with pytest.raises(ValueError, match="pred contains NaN"):
            metric(bad, np.eye(3))
    with pytest.raises(ValueError, match="2-D"):
        sim(np.ones((2, 3, 3)), np.ones((2, 3, 3)))


def test_score_batch():
    rng = np.random.default_rng(8)
    preds, refs = rng.random((4, 9, 9)), rng.random((4, 9, 9))
    expected = [np.corrcoef(p.ravel(), r.ravel())[0, 1] for p, r in zip(preds, refs, strict=True)]
    np.testing.assert_allclose(score_batch("cc", preds, refs), expected, atol=1e-12)
    np.testing.assert_allclose(
        score_batch("nss", preds, refs, threshold=0.9),
        [np.mean(minmax_z(p)[r > 0.9]) for p, r in zip(preds, refs, strict=True)],
        atol=1e-12,
    )
    preds[1] = 0.5
    with pytest.raises(UndefinedMetricError, match="pair 1: cc is undefined"):
        score_batch("cc", preds, refs)
    scores = score_batch("cc", preds, refs, undefined="nan")
    assert np.isnan(scores).sum() == 1 and np.isnan(scores[1])
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        score_batch("auc", preds, refs)
    with pytest.raises(ValueError, match=r"\(4, 9, 9\) and \(3, 9, 9\)"):
        score_batch("cc", preds, refs[:3])


def minmax_z(m):
    return (m - m.mean()) / m.std(ddof=1)
