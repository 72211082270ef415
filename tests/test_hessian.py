"""Second-order tools against explicit Hessians.

* `hvp` against `jax.hessian` (dense matrix) times v on a tiny conv/BatchNorm/dense model written
  here, w.r.t. its parameters and w.r.t. its inputs, in float64;
* `top_eigenvalue` (Lanczos: the largest eigenvalue; power: the largest magnitude) against
  `np.linalg.eigvalsh` of the explicit Hessian, and on quadratics with known spectra (a dominant
  negative eigenvalue included);
* `hutchinson_trace` within 3 standard errors of the exact trace, and exact for a diagonal Hessian;
* `curvature_report` per group against the explicit Hessian of that group's mean loss, chunking
  invariance, an empty group; a ResNet-18 smoke test of the CLI-facing call.
"""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from helpers import float64
from resnet_jax.benchmarks import speed as bench
from resnet_jax.training import hessian
from resnet_jax.core import models
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError

C = 3


class Tiny(nn.Module):
    """conv 3x3/2 -> BatchNorm -> tanh -> dense: the ResNet's (logits, intermediates) interface."""

    num_classes: int = C

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(2, 2), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = jnp.tanh(x)
        pooled = x.reshape(x.shape[0], -1)
        logits = nn.Dense(self.num_classes, name="fc")(pooled)
        return logits, {"pooled": pooled, "logits": logits}


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for the whole module (explicit Hessians to 1e-9), restored afterwards."""
    with float64():
        yield


@functools.lru_cache(maxsize=None)
def tiny_setup(n=6, size=6, seed=0, dtype=np.float64):
    model = Tiny()
    rs = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    # drawn in numpy (no compiled initialisers); running statistics non-trivial so eval-mode
    # BatchNorm is not the identity
    draw = lambda shape, scale: jnp.asarray(scale * rs.normal(size=shape), dtype)
    variables = {"params": {"conv1": {"kernel": draw((3, 3, 3, 4), 0.4), "bias": draw((4,), 0.1)},
                            "bn1": {"scale": jnp.asarray(rs.uniform(0.5, 1.5, 4), dtype), "bias": draw((4,), 0.1)},
                            "fc": {"kernel": draw(shapes["params"]["fc"]["kernel"].shape, 0.5),
                                   "bias": draw((C,), 0.1)}},
                 "batch_stats": {"bn1": {"mean": draw((4,), 0.1), "var": jnp.asarray(rs.uniform(0.5, 1.5, 4), dtype)}}}
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(dict(shapes))
    images = jnp.asarray(rs.normal(size=(n, size, size, 3)), dtype)
    labels = jnp.asarray(rs.integers(0, C, n), jnp.int32)
    return model, variables, images, labels


def explicit_hessian(f, x):
    flat, unravel = ravel_pytree(x)
    H = jax.jit(lambda f, p: jax.hessian(lambda q: f(unravel(q)))(p))(f, flat)
    return np.asarray(H), flat, unravel


@pytest.fixture(scope="module")
def tiny_all():
    """(f, x, H) of the tiny model's mean loss w.r.t. all its parameters."""
    model, variables, images, labels = tiny_setup()
    f, x = hessian.params_loss(model, variables, images, labels, "all")
    return f, x, explicit_hessian(f, x)[0]


def test_hvp_pytree_closed_form():
    x = {"a": jnp.arange(1.0, 4.0), "b": {"c": jnp.array([[0.5, -2.0]])}}
    f = lambda t: jnp.sum(t["a"] ** 4) + jnp.sum(t["a"][0] * t["b"]["c"] ** 2)
    v = {"a": jnp.array([1.0, -1.0, 2.0]), "b": {"c": jnp.array([[3.0, 1.0]])}}
    h = hessian.hvp(f, x, v)
    a, c = np.arange(1.0, 4.0), np.array([0.5, -2.0])
    want_a = 12 * a ** 2 * np.array([1.0, -1.0, 2.0]) + np.array([2 * c @ np.array([3.0, 1.0]), 0, 0])
    want_c = 2 * a[0] * np.array([3.0, 1.0]) + 2 * c * 1.0
    np.testing.assert_allclose(h["a"], want_a, rtol=1e-6)
    np.testing.assert_allclose(h["b"]["c"][0], want_c, rtol=1e-6)


def test_hvp_matches_explicit_hessian(tiny_all):
    model, variables, images, labels = tiny_setup()
    rs = np.random.default_rng(1)
    f_in, x_in = hessian.input_loss(model, variables, images[:2], labels[:2])
    for f, x, H in (tiny_all, (f_in, x_in, explicit_hessian(f_in, x_in)[0])):
        flat, unravel = ravel_pytree(x)
        np.testing.assert_allclose(H, H.T, atol=1e-12)
        v = rs.normal(size=flat.shape)
        got_jit = ravel_pytree(hessian.hvp_jit(f, x, unravel(jnp.asarray(v))))[0]
        np.testing.assert_allclose(got_jit, H @ v, rtol=1e-9, atol=1e-12 * np.abs(H @ v).max())


def test_params_loss_is_the_mean_eval_loss_and_subsets():
    model, variables, images, labels = tiny_setup()
    f, sel = hessian.params_loss(model, variables, images, labels, "fc")
    assert set(sel) == {"fc"} and set(sel["fc"]) == {"kernel", "bias"}
    logits, _ = models.apply(model, variables, images)
    want = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[:, None], 1))
    np.testing.assert_allclose(float(f(sel)), want, rtol=1e-12)
    with pytest.raises(UserError):
        hessian.params_loss(model, variables, images, labels, "layer9")


def test_top_eigenvalue_matches_eigvalsh(tiny_all):
    f, x, H = tiny_all
    ev = np.linalg.eigvalsh(H)
    lam, info = hessian.top_eigenvalue(f, x, n_iter=100, seed=0, tol=1e-9)
    assert info["converged"] and info["method"] == "lanczos" and info["history"][-1] == lam
    assert info["iterations"] < 100 and info["residual"] <= 1e-9
    np.testing.assert_allclose(lam, ev[-1], rtol=1e-8)
    # the returned eigenvector is one: H y = lambda y
    y, unravel = ravel_pytree(info["eigenvector"])
    np.testing.assert_allclose(np.linalg.norm(y), 1.0, rtol=1e-8)
    np.testing.assert_allclose(H @ np.asarray(y), lam * np.asarray(y), atol=1e-6 * abs(lam))
    # few steps: not converged, the Ritz value still lies inside the spectrum
    lam2, info2 = hessian.top_eigenvalue(f, x, n_iter=3, seed=0, tol=1e-12)
    assert not info2["converged"] and info2["iterations"] == 3
    assert ev[0] - 1e-9 <= info2["min_eigenvalue"] <= lam2 <= ev[-1] + 1e-9


def test_top_eigenvalue_indefinite_near_tie():
    # -5.37 and +5.36: power iteration stalls on such a pair, Lanczos returns the largest (+5.36).
    q = np.linalg.qr(np.random.default_rng(3).normal(size=(40, 40)))[0]
    spectrum = np.concatenate([[-5.37, 5.36, 4.9], np.linspace(-3.2, 3.9, 37)])
    A = q @ np.diag(spectrum) @ q.T
    f = Partial(lambda A, x: 0.5 * x @ A @ x, jnp.asarray(A))
    lam, info = hessian.top_eigenvalue(f, jnp.zeros(40), n_iter=40, tol=1e-8)
    assert info["converged"]
    np.testing.assert_allclose([lam, info["min_eigenvalue"]], [5.36, -5.37], rtol=1e-7)
    lam_p, info_p = hessian.top_eigenvalue(f, jnp.zeros(40), n_iter=40, tol=1e-8, method="power")
    assert not info_p["converged"] and info_p["method"] == "power"


def test_top_eigenvalue_quadratics():
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))[0]
    for spectrum in ([5.0, 1.0, 0.5, -0.2, 0.1, 2.0], [-7.0, 3.0, 1.0, 0.0, 2.0, -1.0]):
        A = jnp.asarray(q @ np.diag(spectrum) @ q.T)
        f = lambda x: 0.5 * x @ A @ x
        lam, info = hessian.top_eigenvalue(f, jnp.zeros(6), n_iter=20, tol=1e-10)
        assert info["converged"] and info["iterations"] <= 6
        np.testing.assert_allclose([lam, info["min_eigenvalue"]], [max(spectrum), min(spectrum)], rtol=1e-8)
        # power iteration: the eigenvalue of largest magnitude, here -7 for the second spectrum
        lam_p, info_p = hessian.top_eigenvalue(f, jnp.zeros(6), n_iter=500, tol=1e-12, method="power")
        k = int(np.argmax(np.abs(spectrum)))
        assert info_p["converged"]
        np.testing.assert_allclose(lam_p, spectrum[k], rtol=1e-8)
        np.testing.assert_allclose(np.abs(np.asarray(info_p["eigenvector"]) @ q[:, k]), 1.0, atol=1e-6)
    for method in hessian.EIGEN_METHODS:             # zero Hessian
        lam, info = hessian.top_eigenvalue(lambda x: jnp.sum(x), jnp.ones(3), method=method)
        assert lam == 0.0 and info["converged"]
    with pytest.raises(UserError):
        hessian.top_eigenvalue(lambda x: jnp.sum(x), jnp.ones(3), n_iter=0)
    with pytest.raises(UserError):
        hessian.top_eigenvalue(lambda x: jnp.sum(x), jnp.ones(3), method="arnoldi")


def test_hutchinson_trace_within_three_standard_errors(tiny_all):
    f, x, H = tiny_all
    est, se = hessian.hutchinson_trace(f, x, n_samples=300, seed=0)
    assert se > 0
    assert abs(est - np.trace(H)) <= 3 * se, (est, se, np.trace(H))
    # the standard error is the Rademacher one: var(z^T H z) = 2 * sum_{i != j} H_ij^2
    off = 2 * (np.sum(H ** 2) - np.sum(np.diag(H) ** 2))
    assert 0.7 < se / np.sqrt(off / 300) < 1.3
    assert hessian.hutchinson_trace(f, x, n_samples=20, seed=3) == hessian.hutchinson_trace(f, x, n_samples=20, seed=3)


def test_hutchinson_exact_for_diagonal():
    d = {"w": jnp.array([1.0, -2.0, 3.5]), "b": jnp.array([[0.25]])}
    f = lambda t: 0.5 * (jnp.sum(d["w"] * t["w"] ** 2) + jnp.sum(d["b"] * t["b"] ** 2))
    x = jax.tree_util.tree_map(jnp.ones_like, d)
    est, se = hessian.hutchinson_trace(f, x, n_samples=5)
    assert est == pytest.approx(2.75) and se == 0.0
    with pytest.raises(UserError):
        hessian.hutchinson_trace(f, x, n_samples=1)


def test_curvature_report_groups_against_explicit():
    model, variables, images, labels = tiny_setup(n=9, seed=2)
    logits, _ = models.apply(model, variables, images)
    pred = np.asarray(jnp.argmax(logits, -1))
    labels = np.asarray(labels).copy()
    labels[:5] = pred[:5]                      # five correct ...
    labels[5:] = (pred[5:] + 1) % C            # ... four misclassified
    kw = dict(params="all", n_iter=100, n_samples=40, seed=0, tol=1e-9)
    rep = hessian.curvature_report(model, variables, images, labels, batch_size=2, **kw)
    json.dumps(rep)
    assert rep["n_images"] == 9 and rep["accuracy"] == pytest.approx(5 / 9)
    assert rep["n_params"] == ravel_pytree(variables["params"])[0].size
    # explicit Hessians of each group's mean loss: one weighted loss over all nine images, one compile
    f_all, x = hessian.params_loss(model, variables, images, labels, "all")
    for name, idx in (("correct", np.arange(5)), ("misclassified", np.arange(5, 9))):
        g = rep["groups"][name]
        assert g["count"] == len(idx) and not g["empty"]
        w = np.zeros(9)
        w[idx] = 1.0 / len(idx)
        f = Partial(f_all.func, *f_all.args[:-1], jnp.asarray(w))
        H, _, _ = explicit_hessian(f, x)
        np.testing.assert_allclose(g["top_eigenvalue"], np.linalg.eigvalsh(H)[-1], rtol=1e-8)
        assert g["eigen_converged"] and g["eigen_residual"] <= 1e-9
        assert abs(g["trace"] - np.trace(H)) <= 3 * g["trace_stderr"]
        # exactly Hutchinson with the documented probes: z_s from numpy default_rng([seed, s])
        zs = [ravel_pytree(hessian.probe_vector(np.random.default_rng([0, s]), x))[0] for s in range(kw["n_samples"])]
        q = np.array([z @ H @ z for z in np.asarray(zs)])
        np.testing.assert_allclose([g["trace"], g["trace_stderr"]], [q.mean(), q.std(ddof=1) / np.sqrt(len(q))],
                                   rtol=1e-9)
        np.testing.assert_allclose(g["loss"], float(f(x)), rtol=1e-10)


def test_curvature_equal_size_draws_against_explicit():
    """The equal-size comparison: each draw's subsample of the larger group, rebuilt here from the
    documented seeds, against the explicit Hessian of that subsample's mean loss."""
    model, variables, images, labels = tiny_setup(n=7, seed=3)
    pred = np.asarray(jnp.argmax(models.apply(model, variables, images)[0], -1))
    labels = pred.copy()
    labels[5:] = (pred[5:] + 1) % C            # five correct, two misclassified
    rep = hessian.curvature_report(model, variables, images, labels, params="fc", n_iter=50, n_samples=2,
                                   tol=1e-10, draws=3, batch_size=2)
    json.dumps(rep)
    eq = rep["equal_size"]
    assert eq["size"] == 2 and eq["draws"] == 3
    f_all, x = hessian.params_loss(model, variables, images, labels, "fc")
    groups = {"correct": np.arange(5), "misclassified": np.arange(5, 7)}
    want = {"correct": [], "misclassified": []}
    for d in range(3):
        rng = np.random.default_rng([0, 1000 + d])
        for name, idx in groups.items():
            w = np.zeros(7)
            w[rng.choice(idx, size=2, replace=False)] = 0.5
            H, _, _ = explicit_hessian(Partial(f_all.func, *f_all.args[:-1], jnp.asarray(w)), x)
            want[name].append(np.linalg.eigvalsh(H)[-1])
    for name in groups:
        np.testing.assert_allclose(eq[name]["top_eigenvalues"], want[name], rtol=1e-6)
        assert eq[name]["mean"] == pytest.approx(np.mean(want[name]), rel=1e-6)
        assert eq[name]["std"] == pytest.approx(np.std(want[name]), rel=1e-5, abs=1e-12)
    assert eq["misclassified"]["std"] == pytest.approx(0.0, abs=1e-9)  # the smaller group, whole every time
    assert len(set(np.round(want["correct"], 8))) > 1                   # the draws differ


def test_curvature_report_empty_group_and_validation():
    model, variables, images, _ = tiny_setup(n=4, dtype=np.float32)   # float32 model under x64 too
    pred = np.asarray(jnp.argmax(models.apply(model, variables, images)[0], -1))
    rep = hessian.curvature_report(model, variables, images, pred, params="fc", n_iter=3, n_samples=2)
    assert rep["groups"]["misclassified"] == {
        "count": 0, "empty": True, "loss": None, "top_eigenvalue": None, "eigen_converged": None,
        "eigen_iterations": None, "eigen_residual": None, "trace": None, "trace_stderr": None}
    assert rep["groups"]["correct"]["count"] == 4 and np.isfinite(rep["groups"]["correct"]["trace"])
    assert rep["accuracy"] == 1.0
    with pytest.raises(UserError):
        hessian.curvature_report(model, variables, images, pred[:3])
    with pytest.raises(UserError):
        hessian.curvature_report(model, variables, images, pred, params="nope")


def test_curvature_report_resnet_smoke():
    model = models.create("resnet18", num_classes=5, stem="small")
    variables = random_variables(model, 24)     # drawn in numpy: no compiled init
    rs = np.random.default_rng(0)
    images = rs.normal(size=(5, 24, 24, 3)).astype(np.float32)
    labels = rs.integers(0, 5, 5)
    rep = hessian.curvature_report(model, variables, images, labels, params="fc", n_iter=3, n_samples=2,
                                   batch_size=4)
    assert rep["n_params"] == 512 * 5 + 5
    assert sum(g["count"] for g in rep["groups"].values()) == 5
    for g in rep["groups"].values():
        if not g["empty"]:
            assert np.isfinite(g["top_eigenvalue"]) and np.isfinite(g["trace"]) and g["trace"] >= 0


def test_bench_hvp_on_given_function():
    x = jnp.ones(50)
    out = bench.bench_hvp(lambda t: jnp.sum(jnp.sin(t) ** 2), x, n_iter=2)
    assert out["grad_s"] > 0 and out["hvp_s"] > 0 and out["ratio"] == pytest.approx(out["hvp_s"] / out["grad_s"])
