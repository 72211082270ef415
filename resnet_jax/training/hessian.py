"""Second-order analysis: Hessian-vector products, top eigenvalue, Hutchinson trace, curvature report.

Hessian-vector product
    `hvp(f, x, v) = jax.jvp(jax.grad(f), (x,), (v,))[1]` (forward-over-reverse): H v without forming
    H, for any pytree x (a parameter dict, an image batch). It costs about one gradient plus its
    forward-mode derivative (`benchmarks.speed.bench_hvp` measures it; numbers in
    docs/guides/accelerators.md).

Losses
    `params_loss(model, variables, images, labels, params=...)` returns (f, x0): f(selected params) is
    the mean cross-entropy of the batch with eval-mode BatchNorm (running statistics), the other
    parameters frozen; x0 the current values of the selected subset (names as in `grads`: `fc`,
    `layer4`, `all`, globs such as `layer4_*/conv2/*`, comma-joined). `input_loss(model, variables,
    images, labels)` returns (f, images) with f(images) the same mean loss as a function of the
    inputs. Both return `jax.tree_util.Partial`s, so the batch travels as a jit argument, not as an
    embedded constant; any plain Python function of one pytree works as f too.

Top eigenvalue (`top_eigenvalue`, method="lanczos", default)
    Lanczos on v -> H v from a Gaussian start vector (numpy `default_rng([seed, 0x5EED5])`), with
    full re-orthogonalisation (classical Gram-Schmidt, twice) against the stored basis: after j steps
    the tridiagonal T_j (alpha, beta) has Ritz values theta; the returned eigenvalue is the ALGEBRAIC largest one (for a loss Hessian the
    sharpness; a more negative eigenvalue does not hide it), and info["min_eigenvalue"] the smallest.
    The residual of the top Ritz pair is |H y - theta y| = beta_j |s_j| (s the eigenvector of T_j,
    s_j its last entry, y the Ritz vector): it stops when that is at most `tol` * |theta|, when the
    Krylov space is invariant (beta = 0: exact), or after `n_iter` matvecs. Extreme eigenvalues
    converge much faster than with power iteration (Chebyshev-like), and nearly equal eigenvalues of
    opposite signs (common off the minimum, e.g. for misclassified images) do not stall it. Memory:
    the basis holds up to `n_iter` copies of x (n_iter x 47 MB for all of ResNet-18's parameters).
    method="power": power iteration (three vectors of memory) converges to the eigenvalue of largest
    MAGNITUDE (negative if that one is), at rate |lambda_2 / lambda_1| per iteration, and stalls when
    two eigenvalues have nearly equal magnitudes; it stops when the Rayleigh quotient changes by at
    most `tol` (relative) between iterations; info["residual"] = |H v - lambda v| / |lambda|.
    info always holds `converged`, `iterations` (matvecs), `residual` (relative), `history` (the
    estimate after each matvec), `eigenvector` (unit pytree like x), `method`.

Trace (`hutchinson_trace`)
    Hutchinson's estimator tr H = E[z^T H z] with Rademacher probes z (entries +-1, one per parameter),
    `n_samples` independent probes, probe s drawn on the host by numpy `default_rng([seed, s])` (leaf by
    leaf in tree order; no compiled random-number code); returns (mean, standard error =
    sample std (ddof 1) / sqrt(n)). For Rademacher probes the variance of one sample is
    2 sum_{i != j} H_ij^2, so the error is small when H is nearly diagonal.

Curvature report (`curvature_report`)
    Splits the images into correctly classified and misclassified ones (eval-mode argmax against the
    labels) and, for each group separately, takes the Hessian of the group's mean loss w.r.t. the
    chosen parameter subset: top eigenvalue (`method`, Lanczos by default) and trace (Hutchinson,
    with its standard error), plus the count and mean loss. The group's loss is summed over fixed-size chunks
    (`batch_size`, zero-weight padding) so the activation memory does not grow with the group (its
    images stay on the device). Cost per group: (Lanczos iterations + `n_samples`) HVPs over the
    group. An empty group is reported with count 0 and `empty: true` (values None).
    The top eigenvalue of a group's mean-loss Hessian shrinks as the group grows (averaging cancels
    directions), so the two groups' values are confounded by their sizes; `draws` > 0 also reports
    "equal_size": for d = 0..draws-1, m = the smaller group's size images drawn from each group
    without replacement (numpy `default_rng([seed, 1000 + d])`, correct group first), the top
    eigenvalue of each group's m-image subsample, with the mean and standard deviation over the draws
    (the smaller group is the same in every draw, so its spread is 0). The trace is a mean over
    images and needs no such matching.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.tree_util import Partial

from resnet_jax.core import models
from resnet_jax.errors import UserError
from resnet_jax.core.losses import cross_entropy
from resnet_jax.core.params import merge_params, model_key, select_paths, split_params

EIGEN_METHODS = ("lanczos", "power")
PROBE_STREAM = 0x5EED5  # stream of the eigen solvers' start vector: default_rng([seed, PROBE_STREAM])

# Pytree vector maths: optax.tree_utils (vdot, norm, add_scale, scale, add, size), jitted once.
_vdot_jit = jax.jit(otu.tree_vdot)
_norm_jit = jax.jit(otu.tree_norm)
_axpy_jit = jax.jit(lambda alpha, x, y: otu.tree_add_scale(y, alpha, x))  # alpha * x + y
_add_jit = jax.jit(otu.tree_add)


# ---------------------------------------------------------------------------------------------
# Hessian-vector products and losses


def hvp(f, x, v):
    """H(x) v for scalar f of the pytree x, by forward-over-reverse differentiation."""
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


def as_partial(f):
    return f if isinstance(f, Partial) else Partial(f)


hvp_jit = jax.jit(lambda f, x, v: hvp(f, x, v))
grad_jit = jax.jit(lambda f, x: jax.grad(f)(x))


def _weighted_params_loss(model, frozen, batch_stats, images, labels, weights, selected):
    logits, _ = models.apply(model, {"params": merge_params(selected, frozen), "batch_stats": batch_stats}, images)
    return jnp.sum(weights * cross_entropy(logits, labels))


def _weighted_input_loss(model, variables, labels, weights, images):
    logits, _ = models.apply(model, variables, images)
    return jnp.sum(weights * cross_entropy(logits, labels))


_LOSS_CACHE: dict = {}


def _loss_of(kind: str, model):
    """The (cached) functools.partial of a loss for `model`: equal model configurations share it, so
    jitted HVPs of their `Partial`s hit the compilation cache across calls."""
    key = (kind, model_key(model))
    fn = _LOSS_CACHE.get(key)
    if fn is None:
        base = _weighted_params_loss if kind == "params" else _weighted_input_loss
        fn = _LOSS_CACHE[key] = partial(base, model)
    return fn


def _mean_weights(n, like):
    return jnp.full((n,), 1.0 / max(n, 1), jnp.promote_types(jnp.result_type(like), jnp.float32))


def params_loss(model, variables, images, labels, params: str = "all"):
    """(f, x0): f(selected) = mean eval-mode cross-entropy of the batch, x0 = the selected params."""
    sel, fro = split_params(variables["params"], select_paths(variables["params"], params))
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    f = Partial(_loss_of("params", model), fro, variables["batch_stats"], images, labels,
                _mean_weights(len(labels), images))
    return f, sel


def input_loss(model, variables, images, labels):
    """(f, images): f(images) = mean eval-mode cross-entropy as a function of the input batch."""
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    return Partial(_loss_of("input", model), variables, labels, _mean_weights(len(labels), images)), images


# ---------------------------------------------------------------------------------------------
# Power iteration and Hutchinson on a matvec


@jax.jit
def _rayleigh(v, w):
    """Given unit v and w = H v: (lambda, |w|, relative residual, w / |w|)."""
    lam = otu.tree_vdot(v, w)
    wn = otu.tree_norm(w)
    res = otu.tree_norm(otu.tree_add_scale(w, -lam, v)) / jnp.maximum(jnp.abs(lam), 1e-30)
    nxt = jax.tree_util.tree_map(lambda u: u / jnp.maximum(wn, 1e-30), w)
    return lam, wn, res, nxt


def probe_vector(rng: np.random.Generator, like, kind: str = "rademacher"):
    """A pytree like `like` of +-1 (Rademacher) or N(0, 1) entries drawn on the host by `rng`
    (leaf by leaf in tree order), in each leaf's dtype. Host draws need no compilation."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out = []
    for x in leaves:
        shape, dtype = np.shape(x), jnp.result_type(x)
        if kind == "rademacher":
            a = rng.integers(0, 2, size=shape, dtype=np.int8) * np.int8(2) - np.int8(1)
        else:
            a = rng.standard_normal(size=shape)
        out.append(jnp.asarray(a, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_counts(n_iter=None, n_samples=None):
    if n_iter is not None and int(n_iter) < 1:
        raise UserError(f"n_iter must be at least 1, got {n_iter}")
    if n_samples is not None and int(n_samples) < 2:
        raise UserError(f"n_samples must be at least 2 (the standard error needs two probes), got {n_samples}")


def power_iteration(matvec, like, n_iter: int = 20, seed: int = 0, tol: float = 1e-3):
    """Dominant eigenvalue of the symmetric operator `matvec` on pytrees shaped like `like`.

    Returns (eigenvalue, info) with info = {"converged", "iterations", "residual", "history",
    "eigenvector"}; see the module docstring.
    """
    check_counts(n_iter=n_iter)
    v = probe_vector(np.random.default_rng([int(seed), PROBE_STREAM]), like, kind="normal")
    v = _scaled(v, 1.0 / _norm_jit(v))
    history, converged, lam, res, it = [], False, 0.0, float("inf"), 0
    for it in range(1, int(n_iter) + 1):
        lam_a, wn, res_a, nxt = _rayleigh(v, matvec(v))
        lam, res = float(lam_a), float(res_a)
        history.append(lam)
        if float(wn) == 0.0:        # H v = 0 (e.g. a zero Hessian): eigenvalue 0, nothing to iterate
            converged, res = True, 0.0
            break
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            converged = True
            break
        v = nxt
    return lam, {"converged": converged, "iterations": it, "residual": res, "history": history, "eigenvector": v,
                 "method": "power"}


@jax.jit
def _orthogonalize(w, v):
    """w - <w, v> v for unit v."""
    return otu.tree_add_scale(w, -otu.tree_vdot(w, v), v)


@jax.jit
def _scaled(w, c):
    return otu.tree_scale(c, w)


def lanczos(matvec, like, n_iter: int = 20, seed: int = 0, tol: float = 1e-3):
    """Largest (algebraic) eigenvalue of the symmetric operator `matvec` by Lanczos with full
    re-orthogonalisation. Returns (eigenvalue, info); see the module docstring."""
    check_counts(n_iter=n_iter)
    v = probe_vector(np.random.default_rng([int(seed), PROBE_STREAM]), like, kind="normal")
    v = _scaled(v, 1.0 / _norm_jit(v))
    basis, alphas, betas, history = [v], [], [], []
    converged, theta, theta_min, res, s_top = False, 0.0, 0.0, float("inf"), np.ones(1)
    for it in range(1, int(n_iter) + 1):
        w = matvec(v)
        if len(basis) > 1:
            w = _axpy_jit(-betas[-1], basis[-2], w)
        alphas.append(float(_vdot_jit(w, v)))
        for _ in range(2):                     # "twice is enough"
            for u in basis:
                w = _orthogonalize(w, u)
        beta = float(_norm_jit(w))
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(T)
        theta, theta_min, s_top = float(evals[-1]), float(evals[0]), evecs[:, -1]
        res = beta * abs(float(s_top[-1])) / max(abs(theta), 1e-30)
        history.append(theta)
        scale = max(abs(theta), abs(theta_min), 1e-30)
        if beta <= 1e-10 * scale or res <= tol:
            converged = True
            break
        if it == int(n_iter):
            break
        betas.append(beta)
        v = _scaled(w, 1.0 / beta)
        basis.append(v)
    y = None
    for c, u in zip(s_top, basis):
        y = _scaled(u, float(c)) if y is None else _axpy_jit(float(c), u, y)
    return theta, {"converged": converged, "iterations": it, "residual": res, "history": history,
                   "eigenvector": y, "min_eigenvalue": theta_min, "method": "lanczos"}


def hutchinson(matvec, like, n_samples: int = 100, seed: int = 0):
    """(estimate, standard error, samples) of the trace of `matvec` with Rademacher probes."""
    check_counts(n_samples=n_samples)
    samples = []
    for s in range(int(n_samples)):
        z = probe_vector(np.random.default_rng([int(seed), s]), like)
        samples.append(float(_vdot_jit(z, matvec(z))))
    samples = np.asarray(samples, np.float64)
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(len(samples))), samples


def _eigen_method(method):
    if method not in EIGEN_METHODS:
        raise UserError(f"unknown eigenvalue method {method!r}: choose one of {', '.join(EIGEN_METHODS)}")
    return lanczos if method == "lanczos" else power_iteration


def top_eigenvalue(f, x, n_iter: int = 20, seed: int = 0, tol: float = 1e-3, method: str = "lanczos"):
    """Top eigenvalue of the Hessian of f at x: (eigenvalue, info). Lanczos: the largest one;
    power: the largest in magnitude (see the module docstring)."""
    solver = _eigen_method(method)
    f = as_partial(f)
    return solver(lambda v: hvp_jit(f, x, v), x, n_iter, seed, tol)


def hutchinson_trace(f, x, n_samples: int = 100, seed: int = 0):
    """(estimate, standard error) of the trace of the Hessian of f at x (Rademacher probes)."""
    f = as_partial(f)
    est, se, _ = hutchinson(lambda v: hvp_jit(f, x, v), x, n_samples, seed)
    return est, se


# ---------------------------------------------------------------------------------------------
# Curvature of correctly classified vs misclassified images


def _eval_fn(model):
    """jit(variables, images, labels) -> (correct (N,), loss (N,)) with eval-mode BatchNorm, cached per model."""
    key = ("eval", model_key(model))
    fn = _LOSS_CACHE.get(key)
    if fn is None:
        def run(variables, images, labels):
            logits, _ = models.apply(model, variables, images)
            return jnp.argmax(logits, -1) == labels, cross_entropy(logits, labels)
        fn = _LOSS_CACHE[key] = jax.jit(run)
    return fn


def _chunks(idx: np.ndarray, size: int):
    """Yields (indices padded to `size`, weights 1/len(idx) on real entries, 0 on padding)."""
    n = len(idx)
    for s in range(0, n, size):
        part = idx[s:s + size]
        w = np.zeros(size, np.float64)
        w[:len(part)] = 1.0 / n
        yield np.concatenate([part, np.full(size - len(part), part[0])]), w


def curvature_report(model, variables, images, labels, params: str = "fc", n_iter: int = 20, n_samples: int = 30,
                     seed: int = 0, batch_size: int = 64, tol: float = 1e-3, method: str = "lanczos",
                     draws: int = 0) -> dict:
    """Hessian curvature of the mean loss w.r.t. `params`, for correct and misclassified images apart.

    Returns {"params", "n_params", "n_images", "method", "accuracy", "groups": {"correct": g, "misclassified": g},
    "equal_size": None or {"size", "draws", "correct": e, "misclassified": e}} with g = {"count", "empty", "loss",
    "top_eigenvalue", "eigen_converged", "eigen_iterations", "eigen_residual", "trace", "trace_stderr"} (values
    None for an empty group) and e = {"top_eigenvalues" (draws,), "mean", "std"} (see the module docstring;
    None without draws or with an empty group). JSON-serialisable.
    """
    check_counts(n_iter=n_iter, n_samples=n_samples)
    solver = _eigen_method(method)
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    models.validate_images(images)
    if len(images) != len(labels):
        raise UserError(f"{len(images)} images but {len(labels)} labels: pass one label per image")
    sel, fro = split_params(variables["params"], select_paths(variables["params"], params))
    bs = variables["batch_stats"]

    n = len(labels)
    correct = np.zeros(n, bool)
    losses = np.zeros(n, np.float64)
    if n:
        eval_fn = _eval_fn(model)
        step = min(int(batch_size), n)
        for idx, _ in _chunks(np.arange(n), step):   # padding repeats an image of the chunk: same values
            ok, ce = eval_fn(variables, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
            correct[idx] = np.asarray(ok)
            losses[idx] = np.asarray(ce)

    groups_idx = {"correct": np.flatnonzero(correct), "misclassified": np.flatnonzero(~correct)}
    chunk = min(int(batch_size), max([len(i) for i in groups_idx.values()] + [1]))
    loss_fn = _loss_of("params", model)
    report = {"params": params, "n_params": otu.tree_size(sel), "n_images": n, "method": method,
              "accuracy": float(correct.mean()) if n else None, "groups": {}}
    def matvec_of(idx):
        parts = [Partial(loss_fn, fro, bs, jnp.asarray(images[i]), jnp.asarray(labels[i]),
                         jnp.asarray(w, jnp.promote_types(images.dtype, jnp.float32)))
                 for i, w in _chunks(idx, chunk)]

        def matvec(v):
            out = None
            for f in parts:
                h = hvp_jit(f, sel, v)
                out = h if out is None else _add_jit(out, h)
            return out
        return matvec

    for name, idx in groups_idx.items():
        g = {"count": int(len(idx)), "empty": len(idx) == 0, "loss": None, "top_eigenvalue": None,
             "eigen_converged": None, "eigen_iterations": None, "eigen_residual": None,
             "trace": None, "trace_stderr": None}
        if len(idx):
            matvec = matvec_of(idx)
            lam, info = solver(matvec, sel, n_iter, seed, tol)
            tr, se, _ = hutchinson(matvec, sel, n_samples, seed)
            g.update(loss=float(losses[idx].mean()), top_eigenvalue=lam, eigen_converged=info["converged"],
                     eigen_iterations=info["iterations"], eigen_residual=info["residual"], trace=tr, trace_stderr=se)
        report["groups"][name] = g
    size = min(len(i) for i in groups_idx.values())
    report["equal_size"] = None
    if int(draws) > 0 and size > 0:
        eq = {"size": int(size), "draws": int(draws), "correct": [], "misclassified": []}
        for d in range(int(draws)):
            rng = np.random.default_rng([seed, 1000 + d])
            for name, idx in groups_idx.items():
                sub = np.sort(rng.choice(idx, size=size, replace=False))
                eq[name].append(solver(matvec_of(sub), sel, n_iter, seed, tol)[0])
        for name in groups_idx:
            values = eq[name]
            eq[name] = {"top_eigenvalues": values, "mean": float(np.mean(values)), "std": float(np.std(values))}
        report["equal_size"] = eq
    return report
