"""Gradient-alignment training loss: same-class input gradients pulled into line.

For a batch of images x_n with labels y_n the loss is

    L_total = L_cls + lambda_align * L_grad + lambda_mi * L_MI

L_cls
    Mean softmax cross-entropy with train-mode BatchNorm (batch statistics), exactly as plain
    training; the updated running statistics are returned.

Input gradients g_n = d CE(f(x_n), y_n) / d x_n
    Computed INSIDE the loss, so the training step's `jax.grad` differentiates through them (double
    backprop). This forward pass uses **eval-mode BatchNorm with the current running statistics**
    (the `batch_stats` passed in, not the ones being updated): with batch statistics, image n's
    gradient would depend on every other image of the batch (and a one-image vmapped lane would
    normalise by its own statistics), so the gradients would not be the per-example quantities the
    loss is about. The price is that early in training the running statistics lag the batch
    statistics (they start at mean 0, variance 1), so the gradients aligned are those of the
    eval-mode network the checkpoint will be evaluated with.

Second order (`second_order=`)
    "reverse": g = vmap(grad(one-image loss)) and the step differentiates it by plain autodiff
    (reverse over reverse). "forward" (default): in eval mode the examples are independent, so
    g = grad_X L_sum(theta, X) with L_sum the summed loss; it carries a custom VJP: for a cotangent V
    of g, the cotangents of (theta, batch_stats, X) are D_X[grad_(theta, bs, X) L_sum][V] (mixed
    partial derivatives commute), one `jax.jvp` of the full gradient along V (forward over reverse,
    as a Hessian-vector product). Same values (tested against the reverse mode and finite
    differences); it stores no activations for the backward pass, so the aligned step is cheaper than
    with "reverse" (`benchmarks.speed.bench_train` measures both; numbers in docs/guides/accelerators.md).
    The custom VJP supports reverse-mode differentiation only: use "reverse" to push `jax.jvp`
    through the loss.

L_grad (cosine alignment)
    Pairs P = {(i, j): i < j, y_i = y_j} of the batch (a label mask; no data-dependent shapes).
    L_grad = mean over P of (1 - cos(g_i, g_j)), with cos = <g_i, g_j> / (|g_i| |g_j|) computed on
    u_n = g_n / sqrt(max(|g_n|^2, 1e-12)) (a zero gradient has cosine 0 with everything, and the
    derivative stays finite). A batch without a same-class pair gives L_grad = 0 and
    aux["n_pairs"] = 0 (nothing is divided by zero); `balanced_batches` makes batches that have pairs.

L_MI (Gaussian mutual-information estimate, negated)
    The unit gradients u_n (directions, so the term is scale-free like the cosine and not dominated
    by the few examples with large loss) are projected to k = `project_dim` dimensions,
    z_n = R^T vec(u_n), with R a fixed (D, k) Rademacher matrix / sqrt(k) given by `seed` (the same
    for every step; hashed, see `projection`, so no random-number code is compiled into the step). For each pair (i, j) in P, X = z_i (first
    member) and Y = z_j (second member). With Sigma the (2k x 2k) sample covariance of [X, Y] over
    the pairs (mean removed, divided by the number of pairs), the estimate is

        I = 1/2 ln( |S_X| |S_Y| / |S| ),   S = shrink(Sigma),  S_X, S_Y its diagonal k x k blocks,

    with log-determinants from `slogdet` of the unit-diagonal form D^-1/2 S D^-1/2 (I is unchanged by
    that rescaling, and the logs stay O(1)). Shrinkage (Ledoit-Wolf style, fixed coefficient
    a = `shrinkage`, default 0.1, not the data-driven LW coefficient):
        S = (1 - a) Sigma + a T,  T = diag(t_X I_k, t_Y I_k),  t_X = max(tr Sigma_X / k, floor), t_Y likewise,
    i.e. each block is pulled towards its own scaled identity and the cross-covariance is damped by
    (1 - a). S is positive definite (a > 0), and since S_X, S_Y are the blocks of S, Fischer's
    inequality gives I >= 0. L_MI = -I: minimising the total loss raises the information shared by
    same-class gradients.

    Limits: the formula is the mutual information of jointly Gaussian vectors, so it only sees
    linear (second-order) dependence between the projected gradients and says nothing about the
    full-dimensional gradients beyond the k random directions. It needs clearly more pairs than the
    2k dimensions (a 32-image batch with 4 images of 8 classes has 48 pairs; k = 8 gives 16
    dimensions); with few pairs the plug-in estimate is biased upwards (sample correlations are
    spuriously large), which shrinkage counteracts at the cost of a downward bias of about
    -k/2 ln(1 - (1 - a)^2 rho^2) instead of -k/2 ln(1 - rho^2) for per-dimension correlation rho.
    With fewer than two pairs the covariance is zero, S = a * floor * I and I = 0 (finite gradient). Treat the value as
    a training signal, not a calibrated measurement.

Batches with pairs
    `balanced_batches(labels, batch_size, per_class, seed, epoch)` returns index batches holding
    `per_class` images of each of batch_size // per_class distinct classes.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.core import models
from resnet_jax.errors import UserError
from resnet_jax.core.losses import cross_entropy
from resnet_jax.core.params import model_key

SECOND_ORDER = ("forward", "reverse")
_TINY_NORM2 = 1e-12      # floor of a squared gradient norm in the cosine (bounds 1/|g| in double backprop)
_SCALE_FLOOR = 1e-12     # floor of the shrinkage target's per-dimension variance


# ---------------------------------------------------------------------------------------------
# Pieces of the loss (public so they can be tested and reused on their own)

def pair_mask(labels):
    """(N, N) float mask of the same-class pairs i < j."""
    labels = jnp.asarray(labels)
    same = labels[:, None] == labels[None, :]
    upper = jnp.triu(jnp.ones(same.shape, bool), k=1)
    return (same & upper).astype(jnp.float32)


def _summed_loss(model, params, batch_stats, images, labels):
    logits, _ = models.apply(model, {"params": params, "batch_stats": batch_stats}, images)
    return jnp.sum(cross_entropy(logits, labels))


def _input_grads_reverse(model, params, batch_stats, images, labels):
    variables = {"params": params, "batch_stats": batch_stats}

    def one(image, label):
        logits, _ = models.apply(model, variables, image[None])
        return cross_entropy(logits[0], label)

    return jax.vmap(jax.grad(one))(images, labels)


_FORWARD_CACHE: dict = {}


def _input_grads_forward(model):
    """The batched input gradient with a custom VJP computed forward-over-reverse (cached per model)."""
    key = model_key(model)
    fn = _FORWARD_CACHE.get(key)
    if fn is not None:
        return fn
    loss = partial(_summed_loss, model)

    @jax.custom_vjp
    def grads(params, batch_stats, images, labels):
        return jax.grad(loss, argnums=2)(params, batch_stats, images, labels)

    def fwd(params, batch_stats, images, labels):
        return grads(params, batch_stats, images, labels), (params, batch_stats, images, labels)

    def bwd(res, v):
        params, batch_stats, images, labels = res
        full = lambda x: jax.grad(loss, argnums=(0, 1, 2))(params, batch_stats, x, labels)
        _, (gp, gb, gx) = jax.jvp(full, (images,), (v,))
        return gp, gb, gx, None

    grads.defvjp(fwd, bwd)
    _FORWARD_CACHE[key] = grads
    return grads


def input_gradients(model, params, batch_stats, images, labels, second_order: str = "forward"):
    """(N, H, W, C): each image's cross-entropy gradient w.r.t. itself, eval-mode BatchNorm;
    differentiable w.r.t. params, batch_stats and images (see "Second order" in the module docstring).

    second_order="reverse": `vmap(grad)` of a one-image apply, differentiated by plain autodiff
    (reverse over reverse). "forward" (default): the same values as the gradient of the summed loss
    (eval mode: examples independent) with a custom VJP computed forward-over-reverse; faster, but
    reverse mode only (no `jax.jvp` through it).
    """
    if second_order == "reverse":
        return _input_grads_reverse(model, params, batch_stats, images, labels)
    if second_order == "forward":
        return _input_grads_forward(model)(params, batch_stats, images, jnp.asarray(labels, jnp.int32))
    raise UserError(f"unknown second_order {second_order!r}: choose one of {', '.join(SECOND_ORDER)}")


def unit_rows(g):
    """(N, D) rows of g (N, ...) divided by their norms (a zero row stays zero)."""
    g = g.reshape(g.shape[0], -1)
    return g * jax.lax.rsqrt(jnp.maximum(jnp.sum(g * g, axis=1, keepdims=True), _TINY_NORM2))


def alignment_loss(grads, labels):
    """(L_grad, n_pairs): mean of 1 - cos over same-class pairs i < j of grads (N, ...); 0 without pairs."""
    u = unit_rows(grads)
    mask = pair_mask(labels)
    n_pairs = jnp.sum(mask)
    cos = u @ u.T
    l_grad = jnp.sum(mask * (1.0 - cos)) / jnp.maximum(n_pairs, 1.0)
    return l_grad, n_pairs


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 arrays (numpy or jax; arithmetic wraps mod 2^32)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def projection(dim: int, project_dim: int, seed: int = 0, dtype=jnp.float32):
    """The fixed (dim, k) Rademacher matrix / sqrt(k) used for L_MI, computed inside jit without
    random-number code: R[d, j] = (1 - 2 * top bit of fmix32((d*k + j) xor s)) / sqrt(k), with
    s = fmix32(seed xor 0x9E3779B9) and fmix32 MurmurHash3's finaliser (indices mod 2^32)."""
    s = _fmix32(np.array([int(seed) & 0xFFFFFFFF], np.uint32) ^ np.uint32(0x9E3779B9))[0]
    idx = jnp.arange(dim * project_dim, dtype=jnp.uint32).reshape(dim, project_dim)
    bit = (_fmix32(idx ^ jnp.uint32(s)) >> 31).astype(jnp.int32)
    return ((1 - 2 * bit).astype(jnp.float32) / math.sqrt(project_dim)).astype(dtype)


def gaussian_mi(x, y, weights=None, shrinkage: float = 0.1):
    """Gaussian mutual-information estimate (nats) between rows of x (n, k) and y (n, m).

    I = 1/2 (ln|S_X| + ln|S_Y| - ln|S|), S = (1 - a) Sigma + a diag(t_X I, t_Y I) with Sigma the
    weighted sample covariance of [x, y] (weights (n,) >= 0, default 1; zero-weight rows are
    ignored) and a = shrinkage (see the module docstring). Differentiable; jit-friendly.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    k = x.shape[1]
    z = jnp.concatenate([x, y], axis=1)
    w = jnp.ones(z.shape[0], z.dtype) if weights is None else jnp.asarray(weights, z.dtype)
    total = jnp.maximum(jnp.sum(w), 1e-12)
    mean = jnp.sum(w[:, None] * z, axis=0) / total
    c = (z - mean) * jnp.sqrt(w)[:, None]
    sigma = c.T @ c / total
    d = sigma.shape[0]
    diag = jnp.diagonal(sigma)
    t_x = jnp.maximum(jnp.mean(diag[:k]), _SCALE_FLOOR)
    t_y = jnp.maximum(jnp.mean(diag[k:]), _SCALE_FLOOR)
    target = jnp.concatenate([jnp.full((k,), t_x), jnp.full((d - k,), t_y)]).astype(sigma.dtype)
    s = (1.0 - shrinkage) * sigma + shrinkage * jnp.diag(target)
    # I is invariant under S -> D S D for diagonal D: use the unit-diagonal (correlation) form, whose
    # log-determinants are O(1) (no cancellation of large logs; exactly 0 for S = c I)
    r = jax.lax.rsqrt(jnp.diagonal(s))
    s = r[:, None] * s * r[None, :]
    s = 0.5 * (s + s.T)
    ld = lambda m: jnp.linalg.slogdet(m)[1]
    return 0.5 * (ld(s[:k, :k]) + ld(s[k:, k:]) - ld(s))


def pair_mi(z, labels, shrinkage: float = 0.1):
    """Gaussian MI between first and second members of the same-class pairs of z (N, k)."""
    n = z.shape[0]
    i, j = np.triu_indices(n, k=1)               # static: all N(N-1)/2 candidate pairs
    labels = jnp.asarray(labels)
    w = (labels[i] == labels[j]).astype(z.dtype)
    return gaussian_mi(z[i], z[j], w, shrinkage)


# ---------------------------------------------------------------------------------------------
# The training loss

def make_aligned_loss(model, lambda_align: float, lambda_mi: float, project_dim: int = 8, seed: int = 0,
                      shrinkage: float = 0.1, second_order: str = "forward"):
    """Returns `loss_fn(params, batch_stats, images, labels, rng) -> (loss, (new_batch_stats, logits, aux))`
    for `train.make_train_step`, aux = {"l_cls", "l_grad", "l_mi", "n_pairs"} (scalars).

    loss = l_cls + lambda_align * l_grad + lambda_mi * l_mi (see the module docstring). With both
    lambdas 0 the input gradients are not computed and l_grad = l_mi = 0. `rng` is unused.
    `second_order` picks how the step differentiates the input gradients (`input_gradients`).
    """
    lambda_align, lambda_mi = float(lambda_align), float(lambda_mi)
    if not (lambda_align >= 0 and lambda_mi >= 0) or not (math.isfinite(lambda_align) and math.isfinite(lambda_mi)):
        raise UserError(f"gradient-alignment weights must be finite and >= 0, got --grad-align {lambda_align} "
                        f"and --grad-mi {lambda_mi}: pass 0 to switch a term off")
    if int(project_dim) < 1:
        raise UserError(f"project_dim must be at least 1, got {project_dim}: use 8-16")
    if not 0.0 < float(shrinkage) <= 1.0:
        raise UserError(f"shrinkage must be in (0, 1], got {shrinkage}: use about 0.1")
    if second_order not in SECOND_ORDER:
        raise UserError(f"unknown second_order {second_order!r}: choose one of {', '.join(SECOND_ORDER)}")
    project_dim, shrinkage = int(project_dim), float(shrinkage)
    need_grads = lambda_align > 0 or lambda_mi > 0

    def loss_fn(params, batch_stats, images, labels, rng=None):
        del rng
        labels = jnp.asarray(labels, jnp.int32)
        logits, _, new_stats = models.apply(model, {"params": params, "batch_stats": batch_stats}, images,
                                            train=True)
        l_cls = jnp.mean(cross_entropy(logits, labels))
        n_pairs = jnp.sum(pair_mask(labels))
        zero = jnp.zeros((), l_cls.dtype)
        l_grad = l_mi = zero
        if need_grads:
            g = input_gradients(model, params, batch_stats, images, labels, second_order)
            l_grad, n_pairs = alignment_loss(g, labels)
            l_grad = l_grad.astype(l_cls.dtype)
            if lambda_mi > 0:
                u = unit_rows(g)
                z = u @ projection(u.shape[1], project_dim, seed, u.dtype)
                l_mi = -pair_mi(z, labels, shrinkage).astype(l_cls.dtype)
        loss = l_cls + lambda_align * l_grad + lambda_mi * l_mi
        aux = {"l_cls": l_cls, "l_grad": l_grad, "l_mi": l_mi, "n_pairs": n_pairs}
        return loss, (new_stats, logits, aux)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Class-balanced batches

def balanced_batches(labels, batch_size: int, per_class: int, seed: int = 0, epoch: int = 0) -> list[np.ndarray]:
    """Returns index batches (each an int64 array of length `batch_size`) for one epoch.

    Every batch holds `per_class` images of each of m = batch_size // per_class distinct classes.
    Each class's examples are shuffled and cut into groups of `per_class`; a class's last short group
    is completed with other (random) examples of the same class, repeating when the class has fewer
    than `per_class` examples. Groups are then packed m at a time, each batch taking the m classes
    with the most groups left (random tie-break), so every example appears at least once per epoch;
    when fewer than m classes still have groups, the batch is completed with freshly drawn groups
    of other classes (re-used examples: a dominant class makes the others over-sampled).
    Batches are returned in random order. Deterministic given (labels, seed, epoch).
    """
    labels = np.asarray(labels).reshape(-1)
    batch_size, per_class = int(batch_size), int(per_class)
    if per_class < 2:
        raise UserError(f"per_class must be at least 2 (same-class pairs need two images), got {per_class}")
    if batch_size < 2 * per_class or batch_size % per_class:
        raise UserError(f"batch size {batch_size} must be a multiple of per_class {per_class} holding at least "
                        f"two classes: use e.g. --batch-size {max(2, batch_size // per_class) * per_class}")
    classes, inverse = np.unique(labels, return_inverse=True)
    m = batch_size // per_class
    if len(classes) < m:
        raise UserError(f"a batch of {batch_size} with {per_class} per class needs {m} classes but the data has "
                        f"{len(classes)}: lower the batch size or raise per_class")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0xA119])
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]

    def draw_group(c):
        idx = members[c]
        if len(idx) >= per_class:
            return rng.choice(idx, per_class, replace=False)
        return np.resize(rng.permutation(idx), per_class)

    groups: list[list[np.ndarray]] = []
    for c, idx in enumerate(members):
        perm = rng.permutation(idx)
        n_full = len(perm) // per_class
        gs = [perm[g * per_class:(g + 1) * per_class] for g in range(n_full)]
        rest = perm[n_full * per_class:]
        if len(rest):
            pool = perm[:n_full * per_class]
            if len(pool) >= per_class - len(rest):
                fill = rng.choice(pool, per_class - len(rest), replace=False)
            else:
                fill = np.resize(rng.permutation(perm), per_class - len(rest))
            gs.append(np.concatenate([rest, fill]))
        groups.append(gs)

    left = np.array([len(g) for g in groups])
    batches = []
    while left.sum() > 0:
        order = np.lexsort((rng.random(len(left)), -left))   # most groups left first, random ties
        chosen = [c for c in order[:m] if left[c] > 0]
        parts = []
        for c in chosen:
            left[c] -= 1
            parts.append(groups[c][left[c]])
        if len(chosen) < m:
            others = np.setdiff1d(np.arange(len(classes)), chosen)
            for c in rng.choice(others, m - len(chosen), replace=False):
                parts.append(draw_group(c))
        batches.append(np.concatenate(parts).astype(np.int64))
    return [batches[i] for i in rng.permutation(len(batches))]
