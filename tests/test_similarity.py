import itertools

import numpy as np
import pytest

from metrics import similarity
from metrics.similarity import (
    benchmark_similarity,
    fc_gradient_cosine_summary,
    fc_gradient_deltas,
    fc_gradient_gram,
    fc_gradients,
    pairwise_cosine_summary,
)


def brute_force_summary(X, labels):
    """Reference: explicit loops over unordered pairs of the N x N cosine matrix."""
    X = np.asarray(X, dtype=np.float64)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos = unit @ unit.T
    intra, inter, per_class = [], [], {}
    for i, j in itertools.combinations(range(len(labels)), 2):
        if labels[i] == labels[j]:
            intra.append(cos[i, j])
            per_class.setdefault(int(labels[i]), []).append(cos[i, j])
        else:
            inter.append(cos[i, j])
    per_class_mean = {int(c): (float(np.mean(per_class[c])) if c in per_class else None) for c in np.unique(labels)}
    return np.mean(intra), np.mean(inter), per_class_mean, len(intra), len(inter)


def assert_matches_brute_force(summary, X, labels, rtol=1e-10, atol=1e-12):
    intra, inter, per_class, n_intra, n_inter = brute_force_summary(X, labels)
    np.testing.assert_allclose(summary.intra, intra, rtol=rtol, atol=atol)
    np.testing.assert_allclose(summary.inter, inter, rtol=rtol, atol=atol)
    np.testing.assert_allclose(summary.gap, intra - inter, rtol=rtol, atol=atol)
    assert summary.n_intra_pairs == n_intra
    assert summary.n_inter_pairs == n_inter
    assert summary.per_class.keys() == per_class.keys()
    for c, expected in per_class.items():
        if expected is None:
            assert summary.per_class[c] is None
        else:
            np.testing.assert_allclose(summary.per_class[c], expected, rtol=rtol, atol=atol)
    assert summary.classes_without_pairs == [c for c, v in per_class.items() if v is None]


def make_data(rng, n=40, d=6):
    # Classes 3, 7, 10 share a mean direction each; class 42 has a single member.
    labels = np.concatenate([rng.choice([3, 7, 10], size=n - 1), [42]])
    rng.shuffle(labels)
    means = {c: rng.normal(size=d) for c in (3, 7, 10, 42)}
    X = np.stack([means[c] + rng.normal(size=d) for c in labels])
    return X, labels


def test_pairwise_matches_brute_force():
    X, labels = make_data(np.random.default_rng(0))
    summary = pairwise_cosine_summary(X, labels)
    assert_matches_brute_force(summary, X, labels)
    assert summary.classes_without_pairs == [42]
    assert summary.per_class[42] is None


def test_pairwise_float32_integer_input_and_many_chunks(monkeypatch):
    monkeypatch.setattr(similarity, "_CHUNK_ROWS", 7)
    rng = np.random.default_rng(1)
    X, labels = make_data(rng, n=50, d=5)
    X32 = X.astype(np.float32)
    assert_matches_brute_force(pairwise_cosine_summary(X32, labels), X32, labels, rtol=1e-5, atol=1e-6)
    X_int = rng.integers(-5, 6, size=(30, 4))
    X_int[np.abs(X_int).sum(axis=1) == 0, 0] = 1
    labels_int = rng.integers(0, 3, size=30)
    assert_matches_brute_force(pairwise_cosine_summary(X_int, labels_int), X_int, labels_int)


def test_pairwise_closed_form_orthogonal_classes():
    # Class 0 rows along e0 (cos 1 within), class 1 along e1: intra 1, inter 0, scale-invariant.
    X = np.array([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
    summary = pairwise_cosine_summary(X, np.array([0, 0, 0, 1, 1]))
    assert summary.intra == pytest.approx(1.0)
    assert summary.inter == pytest.approx(0.0, abs=1e-12)
    assert summary.n_intra_pairs == 3 + 1
    assert summary.n_inter_pairs == 3 * 2


@pytest.mark.parametrize(
    "X, labels, match",
    [
        (np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), [0, 0, 1, 1], "2 rows of X are all zero"),
        (np.array([[1.0, np.nan], [1.0, 0.0], [1.0, 1.0]]), [0, 0, 1], "NaN or Inf"),
        (np.array([[1.0, np.inf], [1.0, 0.0], [1.0, 1.0]]), [0, 0, 1], "NaN or Inf"),
        (np.ones((3, 2)), [5, 5, 5], "fewer than two classes"),
        (np.ones((3, 2)), [0, 1, 2], "no class has two or more"),
        (np.ones((3, 2)), [0, 1], r"shape \(3,\)"),
        (np.ones((3, 2)), [0.0, 1.0, 1.0], "must be integers"),
        (np.ones(3), [0, 1, 1], "2-D"),
    ],
)
def test_pairwise_errors(X, labels, match):
    with pytest.raises(ValueError, match=match):
        pairwise_cosine_summary(X, np.asarray(labels))


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_fc_data(rng, n=30, d=4, c=3):
    features = np.maximum(rng.normal(size=(n, d)), 0)  # post-ReLU pooled features
    features[-1] = 0  # g = (0, delta) is still a valid direction
    probs = softmax(rng.normal(size=(n, c)) * 2)
    labels = rng.integers(0, c, size=n)
    labels[0], labels[1:] = c - 1, np.where(labels[1:] == c - 1, 0, labels[1:])  # class c-1 has one member
    return features, probs, labels


def explicit_gradients(features, probs, labels):
    rows = []
    for h, p, y in zip(features, probs, labels, strict=True):
        delta = p - np.eye(len(p))[y]
        rows.append(np.concatenate([np.outer(h, delta).ravel(), delta]))
    return np.array(rows)


def test_fc_gradient_deltas():
    probs = softmax(np.random.default_rng(2).normal(size=(5, 4)))
    labels = np.array([0, 3, 1, 1, 2])
    expected = probs.copy()
    for i, y in enumerate(labels):
        expected[i, y] = probs[i, y] - 1
    np.testing.assert_allclose(fc_gradient_deltas(probs, labels), expected, rtol=0, atol=1e-15)


def test_fc_gradients_match_finite_differences_of_cross_entropy():
    # logits = h @ W + b with W (d, C) as in Flax; loss = -log softmax(logits)[y].
    rng = np.random.default_rng(3)
    d, c = 3, 4
    h, W, b, y = rng.normal(size=d), rng.normal(size=(d, c)), rng.normal(size=c), 2

    def loss(params):
        W_, b_ = params[: d * c].reshape(d, c), params[d * c :]
        logits = h @ W_ + b_
        return np.log(np.exp(logits).sum()) - logits[y]

    params = np.concatenate([W.ravel(), b])
    step = 1e-6
    numeric = np.array(
        [(loss(params + step * e) - loss(params - step * e)) / (2 * step) for e in np.eye(len(params))]
    )
    probs = softmax((h @ W + b)[None])
    np.testing.assert_allclose(fc_gradients(h[None], probs, [y])[0], numeric, atol=1e-8)


def test_fc_gradients_and_gram_match_explicit():
    features, probs, labels = make_fc_data(np.random.default_rng(4))
    G = explicit_gradients(features, probs, labels)
    np.testing.assert_allclose(fc_gradients(features, probs, labels), G, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fc_gradient_gram(features, probs, labels), G @ G.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk_rows", [8192, 4])
def test_fc_gradient_cosine_summary_matches_explicit(monkeypatch, chunk_rows):
    monkeypatch.setattr(similarity, "_CHUNK_ROWS", chunk_rows)
    features, probs, labels = make_fc_data(np.random.default_rng(5))
    summary = fc_gradient_cosine_summary(features, probs, labels)
    assert_matches_brute_force(summary, explicit_gradients(features, probs, labels), labels)
    assert summary.classes_without_pairs == [2]


def test_fc_gradient_cosine_summary_with_predicted_gradient_labels():
    features, probs, labels = make_fc_data(np.random.default_rng(6))
    predicted = probs.argmax(axis=1)
    summary = fc_gradient_cosine_summary(features.astype(np.float32), probs.astype(np.float32), labels, predicted)
    # Gradients built from the predicted labels, grouped by the true labels.
    G = explicit_gradients(features.astype(np.float32), probs.astype(np.float32), predicted)
    assert_matches_brute_force(summary, G, labels, rtol=1e-5, atol=1e-6)


def test_fc_errors():
    features, probs, labels = make_fc_data(np.random.default_rng(7), n=6)
    logits = np.log(probs) + 3
    with pytest.raises(ValueError, match="not logits"):
        fc_gradient_deltas(logits, labels)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        fc_gradient_deltas(probs, np.array([0, 1, 3, 0, 1, 2]))
    with pytest.raises(ValueError, match="features has 5 rows but probs has 6"):
        fc_gradient_cosine_summary(features[:5], probs, labels)
    bad = features.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fc_gradient_cosine_summary(bad, probs, labels)
    one_hot = probs.copy()
    one_hot[3] = np.eye(3)[labels[3]]
    with pytest.raises(ValueError, match="1 examples have a zero gradient"):
        fc_gradient_cosine_summary(features, one_hot, labels)


def test_benchmark_similarity_small():
    result = benchmark_similarity(n=300, d=16, n_brute=120, n_classes=5, seed=1)
    assert {"fast_s", "fast_small_s", "brute_s", "speedup", "max_abs_diff"} <= result.keys()
    assert result["fast_s"] > 0 and result["brute_s"] > 0
    assert result["max_abs_diff"] < 1e-6  # float32 data
    with pytest.raises(ValueError, match="n_brute"):
        benchmark_similarity(n=10, d=2, n_brute=20)
