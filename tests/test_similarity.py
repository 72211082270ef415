import decimal
import itertools

import numpy as np
import pytest

from resnet_jax.metrics import similarity
from resnet_jax.metrics.similarity import (benchmark_similarity, fc_gradient_cosine_summary, fc_gradient_deltas,
                                           fc_gradient_gram, fc_gradients, pairwise_cosine_summary)


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
    logits = rng.normal(size=(n, c)) * 2
    labels = rng.integers(0, c, size=n)
    labels[0], labels[1:] = c - 1, np.where(labels[1:] == c - 1, 0, labels[1:])  # class c-1 has one member
    return features, logits, labels


def explicit_gradients(features, logits, labels):
    rows = []
    for h, p, y in zip(features, softmax(logits), labels, strict=True):
        delta = p - np.eye(len(p))[y]
        rows.append(np.concatenate([np.outer(h, delta).ravel(), delta]))
    return np.array(rows)


def test_fc_gradient_deltas():
    logits = np.random.default_rng(2).normal(size=(5, 4))
    probs = softmax(logits)
    labels = np.array([0, 3, 1, 1, 2])
    expected = probs.copy()
    for i, y in enumerate(labels):
        expected[i, y] = probs[i, y] - 1
    np.testing.assert_allclose(fc_gradient_deltas(logits, labels), expected, rtol=0, atol=1e-15)
    others = 1 - probs[np.arange(5), labels]  # sum of the other probabilities (small margins: no cancellation)
    np.testing.assert_allclose(fc_gradient_deltas(logits, labels, direction=True), expected / others[:, None],
                               rtol=1e-12)


def exact_delta(z, y, digits=60):
    """Reference delta = softmax(z) - onehot(y) of one row in `digits`-digit decimal arithmetic."""
    decimal.getcontext().prec = digits
    e = [decimal.Decimal(float(v)).exp() for v in z]
    total = sum(e)
    p = [v / total for v in e]
    return [float(v - (1 if c == y else 0)) for c, v in enumerate(p)]


@pytest.mark.parametrize("margin", [0, 10, 20, 40, 80, 200, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fc_gradient_direction_exact_at_any_margin(margin, dtype):
    # Row 0: the label's logit leads the others by `margin`; rows 1-2: random others around it.
    rng = np.random.default_rng(margin)
    z = rng.normal(size=(3, 6)).astype(dtype)
    labels = np.array([2, 0, 5])
    z[np.arange(3), labels] = z.max(axis=1) + dtype(margin)
    reference = np.array([exact_delta(row, y) for row, y in zip(z, labels)])  # float64, 0 where it underflows
    direction = fc_gradient_deltas(z, labels, direction=True)
    # exact direction in decimal too: the other probabilities divided by their sum, -1 at y
    decimal.getcontext().prec = 60
    for row, y, got in zip(z, labels, direction):
        e = [decimal.Decimal(float(v)).exp() for c, v in enumerate(row) if c != y]
        want = [float(v / sum(e)) for v in e]
        np.testing.assert_allclose(np.delete(got, y), want, rtol=1e-12)
        assert got[y] == -1.0
    if margin <= 80:
        delta = fc_gradient_deltas(z, labels)
        cos = np.sum(delta * reference, axis=1) / np.linalg.norm(delta, axis=1) / np.linalg.norm(reference, axis=1)
        assert np.all(cos >= 0.9999)
        rows = np.arange(3)
        np.testing.assert_allclose(delta[rows, labels], reference[rows, labels], rtol=1e-5)
    # the cosine analyses never call such a gradient zero
    summary = fc_gradient_cosine_summary(np.ones((3, 2)), direction, np.array([0, 0, 1]))
    assert np.isfinite(summary.intra)


def test_intra_class_mean_is_the_mean_of_per_class_brute_force_means():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(40, 5))
    labels = np.array([0] * 30 + [1] * 6 + [2] * 3 + [3])  # imbalanced, class 3 without a pair
    summary = pairwise_cosine_summary(X, labels)
    per_class = brute_force_summary(X, labels)[2]
    assert summary.intra_class_mean == pytest.approx(np.mean([per_class[c] for c in (0, 1, 2)]), rel=1e-12)
    assert summary.intra != pytest.approx(summary.intra_class_mean, rel=1e-3)  # pooling weighs class 0 most


def test_same_prediction_gives_delta_cosine_at_least_one_half():
    """GW_pred by construction: deltas built with the argmax label share their -onehot part."""
    logits = np.random.default_rng(12).normal(size=(300, 6)) * 4
    predicted = logits.argmax(axis=1)
    delta = fc_gradient_deltas(logits, predicted)
    unit = delta / np.linalg.norm(delta, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = predicted[:, None] == predicted[None, :]
    assert cos[same].min() >= 0.5 - 1e-12
    assert cos[~same].max() < 0.5  # across predictions it can be lower, and here it is


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
    delta = fc_gradient_deltas((h @ W + b)[None], [y])
    np.testing.assert_allclose(fc_gradients(h[None], delta)[0], numeric, atol=1e-8)


def test_fc_gradients_and_gram_match_explicit():
    features, logits, labels = make_fc_data(np.random.default_rng(4))
    G = explicit_gradients(features, logits, labels)
    delta = fc_gradient_deltas(logits, labels)
    np.testing.assert_allclose(fc_gradients(features, delta), G, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fc_gradient_gram(features, delta), G @ G.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk_rows", [8192, 4])
def test_fc_gradient_cosine_summary_matches_explicit(monkeypatch, chunk_rows):
    monkeypatch.setattr(similarity, "_CHUNK_ROWS", chunk_rows)
    features, logits, labels = make_fc_data(np.random.default_rng(5))
    summary = fc_gradient_cosine_summary(features, fc_gradient_deltas(logits, labels, direction=True), labels)
    assert_matches_brute_force(summary, explicit_gradients(features, logits, labels), labels)
    assert summary.classes_without_pairs == [2]


def test_fc_gradient_cosine_summary_with_predicted_gradient_labels():
    features, logits, labels = make_fc_data(np.random.default_rng(6))
    predicted = logits.argmax(axis=1)
    features, logits = features.astype(np.float32), logits.astype(np.float32)
    summary = fc_gradient_cosine_summary(features, fc_gradient_deltas(logits, predicted, direction=True), labels)
    # Gradients built from the predicted labels, grouped by the true labels.
    G = explicit_gradients(features, logits, predicted)
    assert_matches_brute_force(summary, G, labels, rtol=1e-5, atol=1e-6)


def test_fc_errors():
    features, logits, labels = make_fc_data(np.random.default_rng(7), n=6)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        fc_gradient_deltas(logits, np.array([0, 1, 3, 0, 1, 2]))
    with pytest.raises(ValueError, match="logits contains NaN"):
        fc_gradient_deltas(np.full((2, 3), np.nan), np.array([0, 1]))
    delta = fc_gradient_deltas(logits, labels)
    with pytest.raises(ValueError, match="features has 5 rows but deltas has 6"):
        fc_gradient_cosine_summary(features[:5], delta, labels)
    bad = features.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fc_gradient_cosine_summary(bad, delta, labels)
    delta[3] = 0  # a delta that underflowed
    with pytest.raises(ValueError, match="1 rows of deltas are zero; build them with .*direction=True"):
        fc_gradient_cosine_summary(features, delta, labels)


def test_benchmark_similarity_small():
    result = benchmark_similarity(n=300, d=16, n_brute=120, n_classes=5, seed=1)
    assert {"fast_s", "fast_small_s", "brute_s", "speedup", "max_abs_diff"} <= result.keys()
    assert result["fast_s"] > 0 and result["brute_s"] > 0
    assert result["max_abs_diff"] < 1e-6  # float32 data
    with pytest.raises(ValueError, match="n_brute"):
        benchmark_similarity(n=10, d=2, n_brute=20)


def test_fc_gradient_cosine_factorises_and_is_bounded_by_fm1():
    """cos(GW_i, GW_j) = cos([h_i,1],[h_j,1]) cos(delta_i, delta_j) for explicit gradients, so GW's cosine
    never exceeds [FM,1]'s (the identity tables.IDENTITIES names)."""
    rng = np.random.default_rng(7)
    h = np.abs(rng.normal(size=(12, 6)))  # post-ReLU features
    z = rng.normal(size=(12, 4)) * 3
    y = rng.integers(0, 4, 12)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    a = np.concatenate([h, np.ones((12, 1))], axis=1)
    delta = p - np.eye(4)[y]
    g = np.stack([np.outer(a[i], delta[i]).ravel() for i in range(12)])
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    cos_g, cos_a, cos_d = unit(g) @ unit(g).T, unit(a) @ unit(a).T, unit(delta) @ unit(delta).T
    np.testing.assert_allclose(cos_g, cos_a * cos_d, atol=1e-12)
    assert np.all(cos_g <= cos_a + 1e-12)
    same = y[:, None] == y[None, :]
    assert np.all(cos_d[same] >= 0.5 - 1e-12)
