"""The gradient-alignment loss against independent references.

* a linear model, whose input gradients have the closed form W (softmax - onehot), with L_grad and
  L_MI recomputed here in numpy (pairs, cosines, projection recipe, shrunk Gaussian MI);
* d(loss)/d(params) of the double-backprop terms against central finite differences in float64 on
  a tiny conv/BatchNorm/tanh/dense model;
* the Gaussian MI estimator against -k/2 ln(1 - rho^2) for jointly Gaussian data;
* the balanced sampler's batch composition, coverage and determinism;
* the training step `train.fit` builds: traced for ResNet-18, run for the tiny model.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import float64
from resnet_jax.training import align, train
from resnet_jax.core import models
from resnet_jax.errors import UserError


class Tiny(nn.Module):
    """conv 3x3/2 -> BatchNorm -> tanh -> dense, with the ResNet's (logits, intermediates) interface."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(2, 2), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = jnp.tanh(x)
        logits = nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))
        return logits, {"logits": logits}


class Linear(nn.Module):
    """logits = vec(x) @ W + b; an unused batch_stats entry so train mode has something to return."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        self.variable("batch_stats", "unused", lambda: jnp.zeros((), jnp.float32))
        logits = nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))
        return logits, {"logits": logits}


@pytest.fixture
def x64():
    with float64():
        yield


def linear_setup(num_classes, n, size=4, seed=0):
    rs = np.random.default_rng(seed)
    d = size * size * 3
    W = rs.normal(size=(d, num_classes)).astype(np.float32) / np.sqrt(d) * 3
    b = rs.normal(size=num_classes).astype(np.float32)
    variables = {"params": {"fc": {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}},
                 "batch_stats": {"unused": jnp.zeros((), jnp.float32)}}
    images = rs.normal(size=(n, size, size, 3)).astype(np.float32)
    return Linear(num_classes), variables, images, W, b


def run_loss(loss_fn, variables, images, labels):
    loss, (stats, logits, aux) = jax.jit(loss_fn)(variables["params"], variables["batch_stats"],
                                                  jnp.asarray(images), jnp.asarray(labels, jnp.int32),
                                                  jax.random.key(0))
    return float(loss), {k: float(v) for k, v in aux.items()}


# ---------------------------------------------------------------------------------------------
# numpy references

def np_fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def np_projection(dim, k, seed):
    s = np_fmix32(np.array([seed], np.uint32) ^ np.uint32(0x9E3779B9))[0]
    idx = np.arange(dim * k, dtype=np.uint32).reshape(dim, k)
    return (1.0 - 2.0 * (np_fmix32(idx ^ s) >> np.uint32(31))) / np.sqrt(k)


def np_gaussian_mi(x, y, a):
    z = np.concatenate([x, y], 1).astype(np.float64)
    k = x.shape[1]
    sigma = np.cov(z.T, bias=True)
    t = np.concatenate([np.full(k, np.trace(sigma[:k, :k]) / k), np.full(y.shape[1], np.trace(sigma[k:, k:]) / y.shape[1])])
    s = (1 - a) * sigma + a * np.diag(t)
    ld = lambda m: np.linalg.slogdet(m)[1]
    return 0.5 * (ld(s[:k, :k]) + ld(s[k:, k:]) - ld(s))


# ---------------------------------------------------------------------------------------------
# the loss on a linear model, against numpy

def test_linear_model_against_numpy_reference():
    model, variables, images, W, b = linear_setup(3, 12, seed=1)
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 2, 1, 1, 0, 2])
    k = 4
    loss, aux = run_loss(align.make_aligned_loss(model, 0.7, 0.3, project_dim=k, seed=5), variables, images, labels)
    x = images.reshape(len(images), -1).astype(np.float64)
    logits = x @ W + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(3)[labels]) @ W.T                       # d CE / d x, closed form
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12) if labels[i] == labels[j]]
    l_cls = -np.mean(np.log(p[np.arange(12), labels]))
    l_grad = np.mean([1 - u[i] @ u[j] for i, j in pairs])
    z = u @ np_projection(x.shape[1], k, 5)
    mi = np_gaussian_mi(z[[i for i, _ in pairs]], z[[j for _, j in pairs]], 0.1)
    assert aux["n_pairs"] == len(pairs) == 4 * 3 / 2 + 5 * 4 / 2 + 3 * 2 / 2
    np.testing.assert_allclose([aux["l_cls"], aux["l_grad"], aux["l_mi"]], [l_cls, l_grad, -mi], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(loss, l_cls + 0.7 * l_grad - 0.3 * mi, rtol=2e-4)
    assert mi > 0


def test_zero_alignment_loss_for_parallel_gradients():
    # identical images of one class: identical gradients
    model, variables, images, _, _ = linear_setup(3, 5)
    same = np.repeat(images[:1], 5, axis=0)
    _, aux = run_loss(align.make_aligned_loss(model, 1.0, 0.0), variables, same, np.full(5, 2))
    assert aux["n_pairs"] == 10 and abs(aux["l_grad"]) < 1e-6 and aux["l_mi"] == 0.0
    # two classes, linear: every class-0 gradient is p_1 (W_1 - W_0), a positive multiple of one vector
    model2, variables2, images2, _, _ = linear_setup(2, 6, seed=2)
    _, aux2 = run_loss(align.make_aligned_loss(model2, 1.0, 0.0), variables2, images2, np.array([0, 0, 0, 1, 1, 1]))
    assert aux2["n_pairs"] == 6 and abs(aux2["l_grad"]) < 1e-6


def test_no_same_class_pair_gives_zero_and_finite_gradient():
    model, variables, images, _, _ = linear_setup(3, 3)
    loss_fn = align.make_aligned_loss(model, 1.0, 1.0)
    labels = jnp.array([0, 1, 2])
    (loss, (_, _, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], variables["batch_stats"], jnp.asarray(images), labels, None)
    assert float(aux["n_pairs"]) == 0 and float(aux["l_grad"]) == 0.0 and float(aux["l_mi"]) == 0.0
    assert float(loss) == pytest.approx(float(aux["l_cls"]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    # and the same gradient as plain cross-entropy
    plain = jax.jit(jax.grad(lambda p: align.make_aligned_loss(model, 0.0, 0.0)(
        p, variables["batch_stats"], jnp.asarray(images), labels)[0]))(variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# double backprop against finite differences

def test_parameter_gradient_matches_finite_differences(x64):
    model = Tiny()
    rs = np.random.default_rng(0)
    f64 = lambda shape, s: jnp.asarray(s * rs.normal(size=shape), jnp.float64)
    params = {"conv1": {"kernel": f64((3, 3, 3, 4), 0.4), "bias": f64((4,), 0.1)},
              "bn1": {"scale": jnp.asarray(rs.uniform(0.5, 1.5, 4)), "bias": f64((4,), 0.1)},
              "fc": {"kernel": f64((36, 3), 0.5), "bias": f64((3,), 0.1)}}
    stats = {"bn1": {"mean": f64((4,), 0.1), "var": jnp.asarray(rs.uniform(0.5, 1.5, 4))}}
    images = f64((8, 6, 6, 3), 1.0)
    labels = jnp.array([0, 0, 1, 1, 1, 2, 2, 0])
    direction = jax.tree_util.tree_map(lambda p: jnp.asarray(rs.normal(size=p.shape)), params)
    def terms_of(second_order):
        loss_fn = align.make_aligned_loss(model, 0.8, 0.5, project_dim=4, second_order=second_order)

        def terms(p):
            loss, (_, _, aux) = loss_fn(p, stats, images, labels)
            return {"l_grad": aux["l_grad"], "l_mi": aux["l_mi"], "loss": loss}
        return terms

    values = jax.jit(terms_of("forward"))
    eps = 1e-5
    plus = values(jax.tree_util.tree_map(lambda p, d: p + eps * d, params, direction))
    minus = values(jax.tree_util.tree_map(lambda p, d: p - eps * d, params, direction))
    for second_order in align.SECOND_ORDER:
        # reverse mode through the input gradients, as in the training step
        grads = jax.jit(jax.jacrev(terms_of(second_order)))(params)
        for name in ("l_grad", "l_mi", "loss"):
            analytic = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree_util.tree_leaves(grads[name]),
                                                               jax.tree_util.tree_leaves(direction)))
            numeric = (float(plus[name]) - float(minus[name])) / (2 * eps)
            assert abs(analytic) > 1e-3, name
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, err_msg=f"{second_order} {name}")


def test_input_gradients_modes_agree_and_are_differentiable_wrt_images():
    model, variables, images, W, b = linear_setup(3, 4, seed=3)
    labels = jnp.array([0, 1, 1, 2])
    x = jnp.asarray(images)
    p, bs = variables["params"], variables["batch_stats"]
    fwd = jax.jit(lambda x: align.input_gradients(model, p, bs, x, labels, "forward"))(x)
    rev = jax.jit(lambda x: align.input_gradients(model, p, bs, x, labels, "reverse"))(x)
    np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-7)
    # cotangent w.r.t. the images (the custom VJP's Hessian-vector part) against reverse-over-reverse
    obj = lambda mode: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(align.input_gradients(model, p, bs, x, labels,
                                                                                         mode)))))
    np.testing.assert_allclose(obj("forward")(x), obj("reverse")(x), rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError):
        align.input_gradients(model, p, bs, x, labels, "sideways")


# ---------------------------------------------------------------------------------------------
# the estimator and the projection

@pytest.mark.parametrize("rho", [0.0, 0.6, 0.9])
def test_gaussian_mi_closed_form(rho):
    k, n = 4, 40000
    rs = np.random.default_rng(int(rho * 10))
    x = rs.normal(size=(n, k))
    y = rho * x + np.sqrt(1 - rho ** 2) * rs.normal(size=(n, k))
    exact = -k / 2 * np.log(1 - rho ** 2)
    mi = jax.jit(align.gaussian_mi, static_argnames="shrinkage")
    got = float(mi(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), shrinkage=1e-6))
    assert abs(got - exact) < 0.02 + 0.01 * exact, (got, exact)
    # fixed shrinkage a damps the cross-covariance: about -k/2 ln(1 - (1 - a)^2 rho^2)
    shrunk = float(mi(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), shrinkage=0.1))
    assert abs(shrunk - (-k / 2 * np.log(1 - 0.81 * rho ** 2))) < 0.02 + 0.01 * exact
    assert shrunk >= -1e-6 and (rho == 0 or shrunk < got)


def test_gaussian_mi_weights_scale_and_degenerate_cases():
    rs = np.random.default_rng(0)
    x, y = rs.normal(size=(50, 3)), rs.normal(size=(50, 3))
    y[:, 0] += x[:, 0]
    w = (rs.random(50) < 0.6).astype(np.float32)
    mi = jax.jit(align.gaussian_mi)
    # zero-weight rows are ignored: the weighted estimate is the numpy estimate on the other rows
    np.testing.assert_allclose(float(mi(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))),
                               np_gaussian_mi(x[w > 0], y[w > 0], 0.1), rtol=1e-5)
    whole = float(mi(jnp.asarray(x), jnp.asarray(y), jnp.ones(50)))
    np.testing.assert_allclose(whole, np_gaussian_mi(x, y, 0.1), rtol=1e-5)
    np.testing.assert_allclose(float(mi(jnp.asarray(x * 1e-3), jnp.asarray(y * 50.0), jnp.ones(50))), whole, rtol=1e-4)
    # no rows / one row / constant rows: zero, with a finite gradient
    mi_and_grad = jax.jit(jax.value_and_grad(align.gaussian_mi))
    for weights in (np.zeros(50), np.eye(50)[3]):
        val, grad = mi_and_grad(jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights))
        assert abs(float(val)) < 1e-6 and bool(jnp.all(jnp.isfinite(grad)))
    val, grad = mi_and_grad(jnp.zeros((50, 3)), jnp.asarray(y), jnp.ones(50))
    assert abs(float(val)) < 1e-6 and bool(jnp.all(jnp.isfinite(grad)))


def test_projection_recipe():
    R = np.asarray(align.projection(500, 8, seed=3))
    np.testing.assert_array_equal(R, np_projection(500, 8, 3).astype(np.float32))
    np.testing.assert_allclose(np.abs(R), 1 / np.sqrt(8), rtol=1e-7)
    assert abs(R.mean() * np.sqrt(8)) < 0.05 and (np.asarray(align.projection(500, 8, seed=4)) != R).mean() > 0.4


def test_validation():
    for bad in ((-1.0, 0.0), (0.0, -0.5), (float("nan"), 0.0)):
        with pytest.raises(UserError):
            align.make_aligned_loss(Tiny(), *bad)
    with pytest.raises(UserError):
        align.make_aligned_loss(Tiny(), 1.0, 1.0, project_dim=0)
    with pytest.raises(UserError):
        align.make_aligned_loss(Tiny(), 1.0, 1.0, shrinkage=0.0)


# ---------------------------------------------------------------------------------------------
# balanced batches

def test_balanced_batches_properties():
    sizes = [13, 9, 6, 5, 3, 1]                      # imbalanced; one class smaller than per_class
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])[np.random.default_rng(0).permutation(37)]
    batches = align.balanced_batches(labels, batch_size=8, per_class=2, seed=1, epoch=0)
    seen = np.zeros(len(labels), int)
    for b in batches:
        assert b.dtype == np.int64 and len(b) == 8
        classes, counts = np.unique(labels[b], return_counts=True)
        assert len(classes) == 4 and set(counts) == {2}
        np.add.at(seen, b, 1)
    assert seen.min() >= 1                           # every example at least once
    groups = [int(np.ceil(s / 2)) for s in sizes]    # the fewest batches possible: max(ceil(G / m), max groups)
    assert len(batches) == max(int(np.ceil(sum(groups) / 4)), max(groups)) == 7
    assert sum(len(b) for b in batches) <= 2 * len(labels)
    again = align.balanced_batches(labels, 8, 2, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again)) and len(again) == len(batches)
    other = align.balanced_batches(labels, 8, 2, seed=1, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    # balanced data: exactly one pass
    even = np.repeat(np.arange(8), 12)
    bb = align.balanced_batches(even, 16, 4, seed=0, epoch=3)
    assert len(bb) == 6 and np.array_equal(np.sort(np.concatenate(bb)), np.arange(96))


def test_balanced_batches_validation():
    labels = np.repeat(np.arange(4), 5)
    for kwargs in (dict(batch_size=8, per_class=1), dict(batch_size=6, per_class=4), dict(batch_size=10, per_class=4),
                   dict(batch_size=20, per_class=2)):
        with pytest.raises(UserError):
            align.balanced_batches(labels, seed=0, epoch=0, **kwargs)


# ---------------------------------------------------------------------------------------------
# the CLI-facing path: one ResNet-18 training step with the aligned loss

def test_resnet_train_step_traces():
    """The ResNet-18 training step with the aligned loss, traced (not compiled: the double-backprop
    compile takes ~20 s on a CPU; `bench.bench_train` runs it)."""
    model = models.create("resnet18", num_classes=4, stem="small")
    shapes = models.variable_shapes(model, 24)
    tx = optax.adamw(1e-3)
    step = train.make_train_step(model, tx, align.make_aligned_loss(model, 1.0, 0.1, project_dim=4))
    out = jax.eval_shape(step, shapes["params"], shapes["batch_stats"], jax.eval_shape(tx.init, shapes["params"]),
                         jax.ShapeDtypeStruct((8, 24, 24, 3), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32),
                         jax.random.key(0))
    params, stats, _, metrics = out
    assert set(metrics) == {"loss", "accuracy", "l_cls", "l_grad", "l_mi", "n_pairs"}
    assert all(m.shape == () for m in metrics.values())
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes["params"])
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(shapes["batch_stats"])


def test_tiny_train_step_runs_and_learns():
    model = Tiny()
    rs = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rs.normal(size=s.shape), jnp.float32),
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32)))
    stats = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])       # positive running variances
    tx = optax.adam(3e-2)
    step = train.make_train_step(model, tx, align.make_aligned_loss(model, 1.0, 0.1, project_dim=4))
    images = jnp.asarray(rs.normal(size=(12, 6, 6, 3)), jnp.float32)
    labels = jnp.asarray(np.repeat(np.arange(3), 4))
    params, opt = variables["params"], tx.init(variables["params"])
    first = None
    for _ in range(15):
        params, stats, opt, metrics = step(params, stats, opt, images, labels, jax.random.key(0))
        first = first or {k: float(v) for k, v in metrics.items()}
    assert first["n_pairs"] == 18 and float(metrics["n_pairs"]) == 18
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < first["loss"]


def test_zero_weight_masks_an_image_out_of_the_loss_not_the_batch():
    """make_train_step's weights (the masked removal of `bench explain --removal mask`): the loss is the
    mean over the unmasked images (checked against a numpy cross-entropy of the train-mode logits), a
    masked image's label changes nothing, its pixels still do (BatchNorm statistics), and weights of
    one equal the plain mean."""
    model = Tiny()
    rs = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rs.normal(size=s.shape), jnp.float32),
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32)))
    stats = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
    tx = optax.sgd(0.1)
    step = train.make_train_step(model, tx)
    images = np.asarray(rs.normal(size=(12, 6, 6, 3)), np.float32)
    labels = np.repeat(np.arange(3), 4).astype(np.int32)
    weights = np.ones(12, np.float32)
    weights[[1, 7]] = 0

    def run(x, y, *w):
        copy = jax.tree_util.tree_map(jnp.array, (variables["params"], stats))  # the step donates its inputs
        params, _, _, metrics = step(copy[0], copy[1], tx.init(copy[0]), jnp.asarray(x), jnp.asarray(y),
                                     jax.random.key(0), *map(jnp.asarray, w))
        return params, float(metrics["loss"])

    masked, loss = run(images, labels, weights)
    logits, _, _ = models.apply(model, {"params": variables["params"], "batch_stats": stats}, jnp.asarray(images),
                                train=True)
    z = np.asarray(logits, np.float64)
    per_image = np.log(np.exp(z).sum(1)) - z[np.arange(12), labels]
    assert loss == pytest.approx(per_image[weights > 0].mean(), rel=1e-5)
    relabelled = labels.copy()
    relabelled[[1, 7]] = (labels[[1, 7]] + 1) % 3
    same = run(images, relabelled, weights)[0]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), masked, same)
    moved = images.copy()
    moved[1] += 1.0  # a masked image still enters its batch's BatchNorm statistics
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), masked,
                                  run(moved, labels, weights)[0])
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-4
    plain, ones = run(images, labels)[0], run(images, labels, np.ones(12, np.float32))[0]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), plain, ones)
