"""Grad-CAM agreement: pair enumeration and scores against direct metric calls."""
import itertools

import numpy as np
import pytest

from resnet_jax.metrics import agreement, saliency


def test_same_class_pairs_enumerate_all_pairs():
    labels = np.array([0, 1, 0, 2, 1, 0])
    i, j, sampled = agreement.same_class_pairs(labels, max_pairs=None)
    brute = {(a, b) for a, b in itertools.combinations(range(len(labels)), 2) if labels[a] == labels[b]}
    assert set(zip(i.tolist(), j.tolist())) == brute and not sampled


def test_same_class_pairs_sample_is_seeded_subset():
    labels = np.repeat(np.arange(3), 20)
    i, j, sampled = agreement.same_class_pairs(labels, max_pairs=50, seed=3)
    i2, j2, _ = agreement.same_class_pairs(labels, max_pairs=50, seed=3)
    assert sampled and len(i) == 50 and np.array_equal(i, i2) and np.array_equal(j, j2)
    assert np.all(labels[i] == labels[j]) and np.all(i < j)


def test_consistency_matches_direct_metric_calls():
    rng = np.random.default_rng(0)
    cams = rng.random((6, 9, 9))
    labels = np.array([0, 0, 1, 1, 1, 2])
    out = agreement.consistency(cams, labels, max_pairs=None, metrics=("cc", "sim", "kld"))
    pairs = [(0, 1), (2, 3), (2, 4), (3, 4)]
    assert out["pairs"] == 4
    others = [(a, b) for a, b in itertools.combinations(range(6), 2) if labels[a] != labels[b]]
    assert out["different"]["pairs"] == len(others) == 11 and not out["different"]["sampled"]
    for name in ("cc", "sim", "kld"):
        same = [saliency.METRICS[name](cams[a], cams[b]) for a, b in pairs]
        diff = [saliency.METRICS[name](cams[a], cams[b]) for a, b in others]
        assert out["metrics"][name]["mean"] == pytest.approx(np.mean(same), rel=1e-12)
        assert out["metrics"][name]["median"] == pytest.approx(np.median(same), rel=1e-12)
        assert out["different"]["metrics"][name]["mean"] == pytest.approx(np.mean(diff), rel=1e-12)
        assert out["gap"][name] == pytest.approx(np.mean(same) - np.mean(diff), rel=1e-9)


def test_different_class_pairs_and_the_baseline_of_image_blind_maps():
    labels = np.repeat(np.arange(3), 20)
    i, j, sampled = agreement.different_class_pairs(labels, max_pairs=50, seed=3)
    assert sampled and len(i) == 50 and np.all(labels[i] != labels[j]) and np.all(i < j)
    i, j, sampled = agreement.different_class_pairs(labels[:25], max_pairs=None)
    assert not sampled and len(i) == 20 * 5
    # maps that ignore the image agree perfectly within classes and across them: gap 0
    base = np.random.default_rng(2).random((8, 8))
    out = agreement.consistency(np.stack([base] * 6), np.array([0, 0, 1, 1, 2, 2]), metrics=("cc",))
    assert out["metrics"]["cc"]["mean"] == pytest.approx(1.0) and out["gap"]["cc"] == pytest.approx(0.0)


def test_identical_maps_are_perfectly_consistent_and_zero_maps_are_counted():
    base = np.random.default_rng(1).random((8, 8))
    cams = np.stack([base, base, base, np.zeros((8, 8))])
    out = agreement.consistency(cams, np.zeros(4, int), max_pairs=None, metrics=("cc",))
    assert out["metrics"]["cc"]["mean"] == pytest.approx(1.0)
    assert out["metrics"]["cc"]["n"] == 3 and out["metrics"]["cc"]["undefined"] == 3


def test_localisation_against_masks_and_errors():
    mask = np.zeros((8, 8))
    mask[2:5, 2:5] = 1
    cams = np.stack([mask, 1 - mask])
    out = agreement.localisation(cams, np.stack([mask, mask]), metrics=("cc", "auc_judd"))
    assert out["cc"]["mean"] == pytest.approx(0.0)  # +1 and -1
    with pytest.raises(ValueError, match="differ in shape"):
        agreement.localisation(cams, np.zeros((2, 7, 7)))
    with pytest.raises(ValueError, match="no class has two images"):
        agreement.consistency(cams, np.array([0, 1]))
