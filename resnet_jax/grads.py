"""Per-example gradients of the cross-entropy loss with respect to the weights (and the input).

The model runs in eval mode (BatchNorm with its running statistics), so the examples of a batch do
not interact and the gradient of example n's loss depends on example n alone.

Loss and labels
    loss_n = -log softmax(logits_n)[y_n], with y_n the given label (`label_source="true"`) or
    the model's own prediction argmax(logits_n) (`label_source="predicted"`).

Parameter subsets (`params=`)
    Parameters are named by their '/'-joined paths: `conv1/kernel`, `bn1/scale`,
    `layer4_1/conv2/kernel`, `fc/kernel`, `fc/bias`, ... A subset is one of the named ones
    `fc` (the "gradient weights" GW, default), `stem` (conv1, bn1), `layer1` ... `layer4` (all blocks
    of that stage), `all`; or a glob over the paths (`layer4_*/conv2/*`; `*` also matches '/'); or
    a module prefix (`layer4_1/conv2`); or a regular expression `re:<regex>` (full match); several
    may be joined with commas. The gradient is taken only with respect to the selected leaves.

Row layout (unprojected), D = number of selected parameters
    Leaves are ordered by module path (tuple order of the path components, which is jax's
    tree order), and inside one module weights (`kernel`, `scale`) come before `bias`. Each leaf
    is flattened row-major in its Flax shape and the leaves are concatenated. For `fc` this is the
    fc kernel gradient (d, C) row-major, then the bias gradient (C): D = d*C + C.
    `Layout.entries` gives (path, shape, offset) of every block.

Methods (`method=`)
    "closed"  only fc leaves: exact from the forward pass alone, delta = softmax(logits) - onehot(y),
              kernel gradient = h (x) delta (h = pooled features), bias gradient = delta.
    "vmap"    the reference: jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0)) over the
              selected leaves (the frozen ones are closed over), one example per vmapped lane.
    "taps"    one batched backward pass: every Conv/Dense/BatchNorm owning a selected leaf gets a zero
              tensor added to its output (a Flax method interceptor), jax.vjp of the summed loss with
              respect to those zeros gives every example's output cotangent g, and the layer input x is
              recorded; the per-example weight gradient is then sum_p x_patch(p) (x) g(p) (one batched
              matmul over the kh*kw strided windows of the padded input: the forward's FLOPs), and
              BatchNorm's is sum_p g*xhat and sum_p g. The activation backward skips every weight-
              gradient convolution. With a projection the per-example gradient is never formed.
              Finiteness is checked on x and g (and the logits and images), not on the B x D rows.
    "auto"    closed for fc-only subsets, else taps when every selected leaf belongs to a supported
              module (2-D Conv without groups/mask, models.PointwiseConv, Dense, BatchNorm on the last axis),
              else vmap.

Random projection (`project_dim=k`, `seed`, `projection="rademacher"|"gaussian"`, `kron=(k1, k2)`)
    gw_n = sum over selected leaves l of vec(g_{n,l}) @ R_l, with R_l a (D_l, k) matrix that depends
    only on (seed, path of l, shape of l, k, k1, k2, distribution): its factors (below) are drawn
    with jax.random (threefry) from key_l = fold_in(jax.random.key(seed), crc32(path) & 0x7fffffff),
    once per `build` in one jitted call, and replicated. Entries are +-1 (Rademacher, the default)
    or N(0, 1), all scaled by 1/sqrt(k), so E[R R^T] = I: squared norms and inner products are
    preserved in expectation (Johnson-Lindenstrauss). Nothing depends on the device count.
    Rank <= 1 leaves use M (m, k) floats of factors, rank >= 2 leaves (f + o) * k / 8 (kron 8x8).
      * leaves of rank <= 1 (biases, BatchNorm scales), size m: R_l = M / sqrt(k), M = draw(key_l, (m, k)).
      * leaves of rank >= 2, viewed as (f, o) = (prod(shape[:-1]), shape[-1]) (a conv kernel's
        (kh*kw*cin, cout), a dense kernel's (d, C)): kA, kB = split(key_l); A = draw(kA, (f, r*k1)),
        B = draw(kB, (o, r*k2)), r = ceil(k / (k1*k2)); R_l is the first k columns of
        [A_1 (x) B_1 | ... | A_r (x) B_r] / sqrt(k), where A_j = A[:, j*k1:(j+1)*k1],
        B_j = B[:, j*k2:(j+1)*k2] and (x) is numpy's kron (row index i*o + c, column a*k2 + b).
        Output column j*k1*k2 + a*k2 + b therefore is sum_p (x_patch(p) . A[:, j*k1+a]) *
        (g(p) . B[:, j*k2+b]) / sqrt(k): a convolution of the layer input with A (k/k2 channels)
        and a matmul of the cotangent with B, so neither the per-example gradient nor R is formed.
        For fc this is the Kronecker projection (h A_j) (x) (delta B_j). Larger k1, k2 make the
        projection cheaper and noisier: for a rank-one gradient the relative variance of a squared
        norm is about (2/k1 + 2/k2) / r (dense JL: 2/k); gradients of convolutions are sums over
        many positions and fare better. Default kron=(8, 8): at k=1024, r=16 blocks.
    `projection_matrix(layout, ...)` builds the explicit (D, k) matrix (small sizes only, for checks).

Memory
    A step holds at most `max_grad_floats` (default 2 GiB of float32 = 512 Mi floats) per-example
    gradient floats per device: micro-batch = max(1, budget // floats per example), where floats
    per example is D (unprojected, or the vmap path) or the size of the projected intermediates.

Data parallelism
    `build` makes a 1-D Mesh over the process's local devices with the axis "batch". Images and
    labels are placed with NamedSharding(mesh, P("batch")), variables replicated (P()), and the step
    runs under jax.shard_map (each device computes its own examples; see `_jitted` for why not the
    SPMD partitioner). A batch is padded (repeating its last example) to a multiple of the device
    count and the padding dropped.

Multi-host
    Every process works alone on its own slice of the data set; nothing is exchanged between hosts:

        # on each of P hosts (e.g. under SLURM / a TPU pod launcher):
        import jax; jax.distributed.initialize()      # coordinator, process_count, process_id from env
        from resnet_jax import grads, extract
        rows = grads.process_shard(N, jax.process_index(), jax.process_count())
        extract.run_extract(ckpt, data, f"store-{jax.process_index():05d}",
                            process=(jax.process_index(), jax.process_count()))

    `process_shard` splits N examples into contiguous, nearly equal ranges; concatenating the stores
    in process order gives the rows of a single-process run.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import statistics
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import models
from .errors import UserError

LABEL_SOURCES = ("true", "predicted")
METHODS = ("auto", "closed", "vmap", "taps")
PROJECTIONS = ("rademacher", "gaussian")
NAMED_SUBSETS = ("fc", "stem", "layer1", "layer2", "layer3", "layer4", "all")
DEFAULT_MAX_GRAD_FLOATS = (2 << 30) // 4  # 2 GiB of float32 per device
DEFAULT_KRON = (8, 8)
_WEIGHT_NAMES = ("kernel", "scale", "embedding")


# ---------------------------------------------------------------------------------------------
# Parameter paths, subsets and layout

def _path_tuple(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _order_key(path: tuple[str, ...]):
    return (path[:-1], 0 if path[-1] in _WEIGHT_NAMES else 1, path[-1])


def param_paths(params) -> list[str]:
    """Returns every parameter path ('/'-joined) in the documented row order."""
    paths = [_path_tuple(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return ["/".join(p) for p in sorted(paths, key=_order_key)]


def _match(pattern: str, paths: list[str]) -> list[str]:
    if pattern == "all":
        return list(paths)
    if pattern == "stem":
        return [p for p in paths if p.split("/")[0] in ("conv1", "bn1")]
    if re.fullmatch(r"layer\d+", pattern):
        return [p for p in paths if p.split("/")[0].startswith(pattern + "_")]
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise UserError(f"bad parameter regex {pattern[3:]!r}: {e}; fix the pattern after 're:'") from None
        return [p for p in paths if rx.fullmatch(p)]
    hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern) or p.startswith(pattern.rstrip("/") + "/")]
    return hits


def select_paths(params, pattern: str = "fc") -> list[str]:
    """Returns the selected parameter paths, in row order; UserError if a pattern matches nothing."""
    paths = param_paths(params)
    if not isinstance(pattern, str) or not pattern.strip():
        raise UserError(f"empty parameter subset {pattern!r}: pass fc, layer4, all or a glob like 'layer4_*/conv2/*'")
    chosen: set[str] = set()
    for part in (s.strip() for s in pattern.split(",")):
        if not part:
            continue
        hits = _match(part, paths)
        if not hits:
            examples = ", ".join(_examples(paths))
            raise UserError(f"parameter pattern {part!r} matches no parameter: use one of "
                            f"{', '.join(NAMED_SUBSETS)}, a glob or 're:<regex>' over paths such as {examples}")
        chosen.update(hits)
    return [p for p in paths if p in chosen]


def _examples(paths: list[str]) -> list[str]:
    picks = [paths[0]] if paths else []
    for want in ("layer1_0/bn1/scale", "layer4_1/conv2/kernel", "fc/kernel", "fc/bias"):
        if want in paths:
            picks.append(want)
    return picks or paths[:4]


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def split_params(params, paths: Sequence[str]):
    """Returns (selected, frozen): two nested dicts that together hold every leaf of `params`."""
    chosen = set(paths)
    sel: dict = {}
    fro: dict = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(params):
        t = _path_tuple(p)
        d = sel if "/".join(t) in chosen else fro
        for k in t[:-1]:
            d = d.setdefault(k, {})
        d[t[-1]] = leaf
    return sel, fro


def merge_params(a, b):
    """Returns the union of two nested dicts of leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_params(out[k], v) if k in out and isinstance(v, dict) else v
    return out


@dataclass(frozen=True)
class Layout:
    """The unprojected row layout: `entries` = ((path, shape, offset), ...), `dim` = D."""

    entries: tuple

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(e[0] for e in self.entries)

    @property
    def dim(self) -> int:
        if not self.entries:
            return 0
        path, shape, off = self.entries[-1]
        return off + math.prod(shape)

    def to_json(self) -> list:
        return [{"path": p, "shape": list(s), "offset": o} for p, s, o in self.entries]


def layout(params, pattern: str = "fc") -> Layout:
    """Returns the Layout of the rows for subset `pattern` of `params` (arrays or shape structs)."""
    entries, off = [], 0
    for path in select_paths(params, pattern):
        shape = tuple(_get(params, path).shape)
        entries.append((path, shape, off))
        off += math.prod(shape)
    return Layout(tuple(entries))


# ---------------------------------------------------------------------------------------------
# Loss and reference gradients

def cross_entropy(logits, labels):
    """Per-example -log softmax(logits)[label]; logits (..., C), labels (...)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def example_loss(model, params, batch_stats, image, label):
    """The loss of one example (image (H, W, 3), scalar label), eval-mode BatchNorm."""
    logits, _ = models.apply(model, {"params": params, "batch_stats": batch_stats}, image[None])
    return cross_entropy(logits[0], label)


def loss_fn(model):
    """Returns the pure `loss(params, batch_stats, image, label)` of one example for `model`."""
    return partial(example_loss, model)


def per_example_grads(model, variables, images, labels, params: str = "fc") -> dict:
    """Reference: {path: (B, *shape)} by vmap(grad) of the one-example loss w.r.t. the subset."""
    paths = select_paths(variables["params"], params)
    sel, fro = split_params(variables["params"], paths)

    def loss(s, f, bs, image, label):
        return example_loss(model, merge_params(s, f), bs, image, label)

    g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0)))(
        sel, fro, variables["batch_stats"], jnp.asarray(images), jnp.asarray(labels))
    return {p: _get(g, p) for p in paths}


def flatten(grads: dict, lay: Layout):
    """(B, D) rows from {path: (B, *shape)} in the layout's order."""
    return jnp.concatenate([grads[p].reshape(grads[p].shape[0], -1) for p, _, _ in lay.entries], axis=1)


def input_grads(model, variables, images, labels=None, label_source: str = "true"):
    """(B, H, W, 3): the gradient of each example's loss with respect to its own image (a batched
    backward pass of the summed loss: examples do not interact in eval mode)."""
    fn = GradFn(model, variables, params="fc", label_source=label_source, input_grad=True)
    return fn(images, labels)["input_grad"]


def _check_label_source(label_source):
    if label_source not in LABEL_SOURCES:
        raise UserError(f"unknown label source {label_source!r}: choose one of {', '.join(LABEL_SOURCES)}")


# ---------------------------------------------------------------------------------------------
# Projections

@dataclass(frozen=True)
class Projection:
    """A seeded random projection to `dim` columns (see the module docstring)."""

    dim: int
    seed: int = 0
    kind: str = "rademacher"
    kron: tuple = DEFAULT_KRON

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise UserError(f"projection dimension must be a positive integer, got {self.dim!r}: "
                            f"pass e.g. --project-dim 1024 (or none for the full gradient)")
        if self.kind not in PROJECTIONS:
            raise UserError(f"unknown projection {self.kind!r}: choose one of {', '.join(PROJECTIONS)}")
        k1, k2 = self.kron
        if int(k1) < 1 or int(k2) < 1:
            raise UserError(f"kron factors must be positive, got {self.kron}: pass e.g. (8, 8)")

    @property
    def blocks(self) -> int:
        k1, k2 = self.kron
        return -(-self.dim // (k1 * k2))

    def to_json(self) -> dict:
        return {"dim": int(self.dim), "seed": int(self.seed), "kind": self.kind, "kron": list(self.kron)}


def _leaf_key(seed, path: str):
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _draw(key, shape, kind):
    if kind == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    return jax.random.rademacher(key, shape).astype(jnp.float32)


def leaf_factors(proj: Projection, path: str, shape) -> tuple:
    """The projection factors of one leaf (traceable): (M,) with M (m, k) for rank <= 1, else (A, B)
    with A (f, r*k1), B (o, r*k2). The 1/sqrt(k) scale is not included."""
    key = _leaf_key(proj.seed, path)
    if len(shape) <= 1:
        return (_draw(key, (math.prod(shape), proj.dim), proj.kind),)
    f, o = math.prod(shape[:-1]), shape[-1]
    k1, k2 = proj.kron
    ka, kb = jax.random.split(key)
    return (_draw(ka, (f, proj.blocks * k1), proj.kind), _draw(kb, (o, proj.blocks * k2), proj.kind))


def make_factors(proj: Projection, lay: Layout) -> dict:
    """{path: leaf_factors} for every leaf of the layout, generated by one jitted call (once per
    GradFn: drawing them inside every step would cost more than the projection on CPUs)."""
    entries = tuple((p, tuple(s)) for p, s, _ in lay.entries)
    return jax.jit(lambda: {p: leaf_factors(proj, p, s) for p, s in entries})()


def projection_matrix(lay: Layout, proj: Projection) -> np.ndarray:
    """The explicit (D, k) matrix R with gw = g @ R (small layouts only: tests and checks)."""
    k1, k2 = proj.kron
    blocks = []
    for path, shape, _ in lay.entries:
        fac = leaf_factors(proj, path, shape)
        if len(fac) == 1:
            blocks.append(np.asarray(fac[0]))
        else:
            a, b = np.asarray(fac[0]), np.asarray(fac[1])
            cols = [np.kron(a[:, j * k1:(j + 1) * k1], b[:, j * k2:(j + 1) * k2]) for j in range(proj.blocks)]
            blocks.append(np.concatenate(cols, axis=1)[:, :proj.dim])
    return np.concatenate(blocks, axis=0) / np.sqrt(proj.dim)


def _project_pair(xa, gb, proj: Projection):
    """sum over positions of outer products, per block: xa (B, ..., r*k1), gb (B, ..., r*k2) -> (B, k)."""
    k1, k2 = proj.kron
    r = proj.blocks
    n = xa.shape[0]
    xa = xa.reshape(n, -1, r, k1)
    gb = gb.reshape(n, -1, r, k2)
    out = jnp.einsum("npra,nprb->nrab", xa, gb, preferred_element_type=jnp.float32).reshape(n, r * k1 * k2)
    return out[:, :proj.dim]


def project_leaf(g, fac, proj: Projection):
    """Projects full per-example leaf gradients g (B, *shape) with the leaf's factors -> (B, k), unscaled."""
    n = g.shape[0]
    if len(fac) == 1:
        return g.reshape(n, -1) @ fac[0]
    a, b = fac
    k1, k2 = proj.kron
    r = proj.blocks
    g = g.reshape(n, a.shape[0], b.shape[0])
    t = jnp.einsum("nfo,fra->nora", g, a.reshape(a.shape[0], r, k1))
    out = jnp.einsum("nora,orb->nrab", t, b.reshape(b.shape[0], r, k2)).reshape(n, r * k1 * k2)
    return out[:, :proj.dim]


# ---------------------------------------------------------------------------------------------
# Taps: per-layer inputs and output cotangents from one batched backward pass

@dataclass(frozen=True)
class _Tap:
    kind: str  # "conv" | "dense" | "bn"
    conf: tuple  # hashable settings
    out_shape: tuple  # per-example output shape
    in_shape: tuple  # per-example input shape


def _canon(v, nd, default):
    if v is None:
        return (default,) * nd
    if isinstance(v, int):
        return (v,) * nd
    return tuple(int(x) for x in v)


def _conv_conf(m: nn.Conv, nd: int):
    if m.feature_group_count != 1 or m.mask is not None or nd != 2:
        return None
    if m.input_dilation not in (None, 1) and tuple(_canon(m.input_dilation, nd, 1)) != (1,) * nd:
        return None
    pad = m.padding
    if isinstance(pad, str):
        if pad not in ("SAME", "VALID"):
            return None
    elif isinstance(pad, int):
        pad = ((pad, pad),) * nd
    else:
        pad = tuple((p, p) if isinstance(p, int) else tuple(int(q) for q in p) for p in pad)
        if len(pad) != nd:
            return None
    return (tuple(m.kernel_size), _canon(m.strides, nd, 1), pad, _canon(m.kernel_dilation, nd, 1), bool(m.use_bias))


def _tap_of(module, x):
    if type(module) is models.PointwiseConv:
        return ("conv", ((1, 1), (module.strides,) * 2, "VALID", (1, 1), False))
    if type(module) is nn.Conv:
        conf = _conv_conf(module, x.ndim - 2)
        return None if conf is None else ("conv", conf)
    if type(module) is nn.Dense:
        return ("dense", (bool(module.use_bias),))
    if type(module) is nn.BatchNorm:
        if module.axis not in (-1, x.ndim - 1):
            return None
        return ("bn", (float(module.epsilon), bool(module.use_scale), bool(module.use_bias)))
    return None


def _tapped_apply(model, variables, images, modules, eps=None):
    """models.apply with interceptors on `modules` (paths): returns logits, inter, {module: input},
    {module: (kind, conf) or None}, {module: output shape}. `eps` (dict) is added to their outputs."""
    inputs, kinds, shapes, calls = {}, {}, {}, {}

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = "/".join(ctx.module.path)
        if name not in modules:
            return next_fun(*args, **kwargs)
        x = args[0]
        calls[name] = calls.get(name, 0) + 1
        kind = _tap_of(ctx.module, x)
        if kind is not None and kind[0] == "bn":
            ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
            ura = ctx.module.use_running_average if ura is None else ura
            if not ura or kwargs.get("mask") is not None:
                kind = None
        kinds[name] = kind
        inputs[name] = x
        y = next_fun(*args, **kwargs)
        shapes[name] = tuple(y.shape)
        if eps is not None:
            y = y + eps[name].astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        logits, inter = models.apply(model, variables, images)
    for name, c in calls.items():
        if c != 1:
            kinds[name] = None  # shared modules: not supported
    return logits, inter, inputs, kinds, shapes


def _probe(model, variables, image_shape, modules):
    """Static per-module tap descriptions (shape-only trace)."""
    out = {}

    def f(v, x):
        _, _, inputs, kinds, shapes = _tapped_apply(model, v, x, modules)
        out.update({m: (kinds.get(m), shapes.get(m), tuple(inputs[m].shape) if m in inputs else None)
                    for m in modules})
        return 0

    jax.eval_shape(f, variables, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))
    taps = {}
    for m, (kind, oshape, ishape) in out.items():
        taps[m] = None if kind is None or oshape is None else _Tap(kind[0], kind[1], oshape[1:], ishape[1:])
    return taps


def _conv_kernel_grad(x, g, ksize, strides, pad, dil):
    """Per-example 2-D conv kernel gradients (B, kh, kw, cin, cout): for each kernel offset (i, j) the
    strided window of the padded input that offset saw, contracted with the output cotangent over
    the positions (a batched matmul; exactly the forward's FLOPs, unlike im2col patches)."""
    n, H, W, cin = x.shape
    _, Ho, Wo, _ = g.shape
    if isinstance(pad, str):
        eff = [(k - 1) * d + 1 for k, d in zip(ksize, dil)]
        pad = jax.lax.padtype_to_pads((H, W), eff, strides, pad)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (pad[0][0], pad[0][1], 0), (pad[1][0], pad[1][1], 0),
                                                 (0, 0, 0)])
    wins = []
    for i in range(ksize[0]):
        for j in range(ksize[1]):
            h0, w0 = i * dil[0], j * dil[1]
            wins.append(jax.lax.slice(xp, (0, h0, w0, 0), (n, h0 + (Ho - 1) * strides[0] + 1,
                                                           w0 + (Wo - 1) * strides[1] + 1, cin),
                                      (1, strides[0], strides[1], 1)))
    xs = wins[0][:, None] if len(wins) == 1 else jnp.stack(wins, axis=1)  # (B, kh*kw, Ho, Wo, cin)
    w = jnp.einsum("nshwc,nhwo->nsco", xs, g,  # written once, already in (kh, kw, cin, cout) order
                   preferred_element_type=jnp.float32)  # float32 sums over positions (bf16 compute)
    return w.reshape(n, ksize[0], ksize[1], cin, g.shape[-1])


def _leaf_grad(tap: _Tap, leaf: str, x, g, bstats):
    """Full per-example gradient (B, *leaf shape) of one leaf from the module's input x and output
    cotangent g."""
    n = x.shape[0]
    if tap.kind == "conv":
        ksize, strides, pad, dil, _ = tap.conf
        if leaf == "bias":
            return g.sum(axis=(1, 2))
        return _conv_kernel_grad(x, g, ksize, strides, pad, dil)
    if tap.kind == "dense":
        if leaf == "bias":
            return g.reshape(n, -1, g.shape[-1]).sum(1)
        return jnp.einsum("npi,npo->nio", x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1]),
                          preferred_element_type=jnp.float32)
    # BatchNorm in eval mode
    eps = tap.conf[0]
    gg = g.reshape(n, -1, g.shape[-1]).astype(jnp.float32)
    if leaf == "bias":
        return gg.sum(1)
    xhat = (x.reshape(n, -1, x.shape[-1]).astype(jnp.float32) - bstats["mean"]) * jax.lax.rsqrt(bstats["var"] + eps)
    return (gg * xhat).sum(1)


def _leaf_proj(tap: _Tap, leaf: str, shape, x, g, bstats, fac, proj: Projection):
    """Projected per-example gradient (B, k), unscaled, without forming the full gradient."""
    if len(fac) == 1 or tap.kind == "bn":
        return project_leaf(_leaf_grad(tap, leaf, x, g, bstats), fac, proj)
    a, b = fac
    if tap.kind == "conv":
        ksize, strides, pad, dil, _ = tap.conf
        kern = a.reshape(tuple(shape[:-1]) + (a.shape[-1],))  # (kh, kw, cin, r*k1)
        xa = jax.lax.conv_general_dilated(x, kern.astype(x.dtype), strides, pad, rhs_dilation=dil,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        xa = x @ a.astype(x.dtype)
    gb = g @ b.astype(g.dtype)
    return _project_pair(xa, gb, proj)


# ---------------------------------------------------------------------------------------------
# The step function

def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def model_key(model) -> tuple:
    """A hashable description of a Flax module's configuration (lists become tuples)."""
    fields = [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
    return (type(model).__module__, type(model).__qualname__) + tuple(
        (f, _freeze(getattr(model, f))) for f in fields)


@dataclass(frozen=True)
class _Config:
    model: Any = field(compare=False, hash=False)
    key: tuple
    paths: tuple
    label_source: str
    proj: Projection | None
    method: str
    input_grad: bool
    taps: tuple  # ((module, _Tap), ...) for method "taps"


def _leaf_owner(path: str) -> tuple[str, str]:
    mod, _, leaf = path.rpartition("/")
    return mod, leaf


def _step(cfg: _Config, sel, fro, batch_stats, factors, images, labels):
    model = cfg.model
    params = merge_params(sel, fro)
    variables = {"params": params, "batch_stats": batch_stats}
    taps = dict(cfg.taps)
    out = {}

    if cfg.method == "taps":
        modules = tuple(taps)
        eps = {m: jnp.zeros((images.shape[0],) + taps[m].out_shape, jnp.float32) for m in modules}

        def f(e):
            logits, inter, inputs, _, _ = _tapped_apply(model, variables, images, modules, e)
            y = jnp.argmax(logits, -1) if cfg.label_source == "predicted" else labels
            y = jax.lax.stop_gradient(y)
            return jnp.sum(cross_entropy(logits, y)), (logits, inter["pooled"], inputs, y)

        _, vjp, (logits, pooled, inputs, y) = jax.vjp(f, eps, has_aux=True)
        cots = vjp(jnp.ones((), jnp.float32))[0]
        # Finite layer inputs and output cotangents give finite gradients (sums of their products,
        # barring float32 overflow): checking them is far cheaper than reading B x D gradients.
        factors_finite = jnp.ones((images.shape[0],), bool)
        for m in modules:
            for a in (inputs[m], cots[m]):
                factors_finite = factors_finite & jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
        rows = []
        for path in cfg.paths:
            mod, leaf = _leaf_owner(path)
            tap = taps[mod]
            bs = _get(batch_stats, mod) if tap.kind == "bn" else None
            if cfg.proj is None:
                rows.append(_leaf_grad(tap, leaf, inputs[mod], cots[mod], bs).reshape(images.shape[0], -1))
            else:
                shape = _get(params, path).shape
                fac = factors[path]
                rows.append(_leaf_proj(tap, leaf, shape, inputs[mod], cots[mod], bs, fac, cfg.proj))
    else:
        factors_finite = None
        logits, inter = models.apply(model, variables, images)
        pooled = inter["pooled"]
        y = jnp.argmax(logits, -1) if cfg.label_source == "predicted" else labels
        y = jax.lax.stop_gradient(y)
        grads = {}
        if cfg.method == "closed":
            delta = jax.nn.softmax(logits, -1) - jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
            # h (x) delta is finite when h and the logits are (no need to read B x D floats again)
            factors_finite = jnp.all(jnp.isfinite(pooled), axis=1)
            for path in cfg.paths:
                grads[path] = delta if path.endswith("/bias") else None
        else:
            def loss(s, f_, bs, image, label):
                return example_loss(model, merge_params(s, f_), bs, image, label)
            g = jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0))(sel, fro, batch_stats, images, y)
            grads = {p: _get(g, p) for p in cfg.paths}
        rows = []
        for path in cfg.paths:
            n = images.shape[0]
            if cfg.method == "closed" and path.endswith("/kernel"):
                if cfg.proj is None:
                    rows.append((pooled[:, :, None] * delta[:, None, :]).reshape(n, -1))
                else:
                    fac = factors[path]
                    rows.append(_project_pair(pooled @ fac[0], delta @ fac[1], cfg.proj))
                continue
            gl = grads[path]
            if cfg.proj is None:
                rows.append(gl.reshape(n, -1))
            else:
                rows.append(project_leaf(gl, factors[path], cfg.proj))

    if cfg.proj is None:
        # One (B, D_l) part per leaf, put side by side on the host: a device-side concatenate would
        # copy the largest array of the step once more (memory-bound on CPUs).
        parts = tuple(r.astype(jnp.float32) for r in rows)
    else:
        parts = ((sum(rows[1:], rows[0]) / jnp.sqrt(jnp.float32(cfg.proj.dim))).astype(jnp.float32),)
    out["gw"] = parts
    out["logits"] = logits
    out["probs"] = jax.nn.softmax(logits, -1)
    out["fm"] = pooled
    out["preds"] = jnp.argmax(logits, -1).astype(jnp.int32)
    out["labels"] = y.astype(jnp.int32)
    out["loss"] = cross_entropy(logits, y)
    # Images too: XLA's CPU max (relu, max-pool) may turn a NaN input into finite garbage.
    finite = jnp.all(jnp.isfinite(logits), axis=1) & jnp.all(jnp.isfinite(images.reshape(images.shape[0], -1)), 1)
    if factors_finite is not None and cfg.proj is None:
        finite = finite & factors_finite
    else:
        for part in parts:
            finite = finite & jnp.all(jnp.isfinite(part), axis=1)
    out["finite"] = finite
    if cfg.input_grad:
        def total(x):
            lg, _ = models.apply(model, variables, x)
            return jnp.sum(cross_entropy(lg, y))
        ig = jax.grad(total)(images)
        out["input_grad"] = ig
        out["finite"] = out["finite"] & jnp.all(jnp.isfinite(ig.reshape(ig.shape[0], -1)), axis=1)
    return out


_JIT_CACHE: dict = {}


def _jitted(cfg: _Config, mesh: Mesh | None = None):
    """The compiled step for `cfg`, cached. On several devices the step runs under jax.shard_map:
    every device runs the one-device program on its slice of the batch (examples are independent,
    nothing is communicated). Left to the SPMD partitioner instead, XLA (jax 0.10, CPU) returns
    wrong per-example conv weight gradients (the batch-grouped convolutions of vmap(grad)) on every
    device but the first."""
    n = 1 if mesh is None else mesh.devices.size
    key = (cfg, None if n == 1 else tuple(d.id for d in mesh.devices.flat))
    fn = _JIT_CACHE.get(key)
    if fn is None:
        step = partial(_step, cfg)
        if n > 1 and hasattr(jax, "shard_map"):
            # check_vma=False: the variables are replicated, and with the check on, the transpose of
            # their implicit broadcast would psum every per-example gradient over the devices.
            specs = dict(mesh=mesh, in_specs=(P(), P(), P(), P(), P("batch"), P("batch")), out_specs=P("batch"))
            try:
                step = jax.shard_map(step, check_vma=False, **specs)
            except TypeError:  # an older spelling
                step = jax.shard_map(step, check_rep=False, **specs)
        fn = _JIT_CACHE[key] = jax.jit(step)
    return fn


# ---------------------------------------------------------------------------------------------
# build / compute

def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "batch" over `devices` (default: this process's local devices)."""
    devs = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devs), ("batch",))


def process_shard(n: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """The contiguous range of the n examples that process `process_index` of `process_count` handles."""
    i = jax.process_index() if process_index is None else int(process_index)
    c = jax.process_count() if process_count is None else int(process_count)
    if c < 1 or not 0 <= i < c:
        raise UserError(f"process index {i} is not in [0, {c}): pass an index below the process count")
    return range(n * i // c, n * (i + 1) // c)


class GradFn:
    """A compiled per-example gradient step: `fn(images, labels, ids=None) -> dict of numpy arrays`
    gw (B, D or k), logits (B, C), probs (B, C), fm (B, d), preds (B,), labels (B,) (the labels the
    loss used), loss (B,), and input_grad (B, H, W, 3) when asked for."""

    def __init__(self, model, variables, *, params="fc", label_source="true", project_dim=None, seed=0,
                 projection="rademacher", kron=DEFAULT_KRON, method="auto", max_grad_floats=None,
                 max_grad_bytes=None, devices=None, input_grad=False):
        _check_label_source(label_source)
        if method not in METHODS:
            raise UserError(f"unknown gradient method {method!r}: choose one of {', '.join(METHODS)}")
        self.model = model
        self.paths = tuple(select_paths(variables["params"], params))
        self.params_spec = params
        self.layout = layout(variables["params"], params)
        self.label_source = label_source
        self.proj = None if project_dim is None else Projection(project_dim, int(seed), projection, tuple(kron))
        self.seed = int(seed)
        self.requested_method = method
        self.input_grad = bool(input_grad)
        if max_grad_floats is None:
            max_grad_floats = DEFAULT_MAX_GRAD_FLOATS if max_grad_bytes is None else int(max_grad_bytes) // 4
        if int(max_grad_floats) < 1:
            raise UserError(f"gradient memory budget must be positive, got {max_grad_floats}")
        self.max_grad_floats = int(max_grad_floats)
        self.mesh = make_mesh(devices)
        self.n_devices = self.mesh.devices.size
        rep = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("batch"))
        sel, fro = split_params(variables["params"], self.paths)
        self._sel, self._fro, self._bs = jax.device_put((sel, fro, variables["batch_stats"]), rep)
        self._factors = {} if self.proj is None else jax.device_put(make_factors(self.proj, self.layout), rep)
        self._plans: dict = {}

    @property
    def dim(self) -> int:
        """Columns of gw: k with a projection, else D."""
        return self.layout.dim if self.proj is None else self.proj.dim

    def plan(self, image_shape) -> tuple[_Config, int]:
        """(config, micro-batch per device) for images of shape (H, W, 3)."""
        image_shape = tuple(int(s) for s in image_shape)
        if image_shape in self._plans:
            return self._plans[image_shape]
        method, taps = self.requested_method, ()
        fc_only = all(p.startswith("fc/") for p in self.paths) and self.model.__class__ is models.ResNet
        if method == "closed" and not fc_only:
            raise UserError("method 'closed' only covers fc parameters: use params=fc or method auto")
        if method == "auto" and fc_only:
            method = "closed"
        if method in ("auto", "taps"):
            modules = tuple(dict.fromkeys(_leaf_owner(p)[0] for p in self.paths))
            probe = _probe(self.model, {"params": merge_params(self._sel, self._fro), "batch_stats": self._bs},
                           image_shape, modules)
            bad = [m for m, t in probe.items() if t is None]
            if bad and method == "taps":
                raise UserError(f"method 'taps' does not support module {bad[0]}: use method vmap")
            method = "vmap" if bad else "taps"
            taps = tuple((m, probe[m]) for m in modules) if not bad else ()
        proj = None if self.proj is None else dataclasses.replace(self.proj, seed=0)  # seed: in the factors
        cfg = _Config(self.model, model_key(self.model), self.paths, self.label_source, proj, method, self.input_grad, taps)
        per_example = self._floats_per_example(cfg, image_shape)
        mb = max(1, self.max_grad_floats // max(1, per_example))
        self._plans[image_shape] = (cfg, mb)
        return cfg, mb

    def grad_floats_per_example(self, image_shape) -> int:
        """Per-example gradient floats one step holds for images of shape (H, W, 3) (memory planning)."""
        return self._floats_per_example(self.plan(image_shape)[0], tuple(image_shape))

    def _floats_per_example(self, cfg: _Config, image_shape) -> int:
        D = self.layout.dim
        if cfg.method == "vmap":
            return D + (self.proj.dim if self.proj else 0)
        if cfg.method == "closed":
            return D if self.proj is None else self.proj.dim * 2
        total, biggest = 0, 0
        for m, tap in cfg.taps:
            pos = math.prod(tap.out_shape[:-1]) if len(tap.out_shape) > 1 else 1
            if self.proj is None:
                if tap.kind == "conv":
                    biggest = max(biggest, pos * math.prod(tap.conf[0]) * tap.in_shape[-1])
            else:
                k1, k2 = self.proj.kron
                total += pos * self.proj.blocks * (k1 + k2) + self.proj.blocks * k1 * k2
        if self.proj is None:
            return D + biggest
        return total + self.proj.dim

    def __call__(self, images, labels=None, ids=None) -> dict:
        return self.collect(self.launch(self.put(images, labels, lazy=True)), ids)

    def put(self, images, labels=None, *, lazy: bool = False) -> "Placed":
        """Checks a batch and transfers it to the devices, in chunks of the step's size (the last
        padded by repeating its last example); `lazy` defers each chunk's transfer to its launch.
        Thread-safe: a prefetching thread can place the next batch while this one computes."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            models.validate_images(images)
        n = images.shape[0]
        if self.label_source == "true":
            if labels is None:
                raise UserError("label source 'true' needs labels: pass them or use label source 'predicted'")
            labels = np.asarray(labels, np.int32).reshape(-1)
            C = self.model.num_classes
            if labels.shape[0] != n:
                raise UserError(f"{labels.shape[0]} labels for {n} images: pass one label per image")
            if n and (labels.min() < 0 or labels.max() >= C):
                raise UserError(f"label {int(labels.max() if labels.max() >= C else labels.min())} is outside "
                                f"[0, {C}): the data's classes do not match the model's {C}")
        else:
            labels = np.zeros((n,), np.int32)
        cfg, mb = self.plan(images.shape[1:])
        nd = self.n_devices
        group = nd * mb
        chunks = max(1, -(-n // group))
        size = -(-n // chunks)
        size = -(-size // nd) * nd

        def chunk(start):
            x, y = images[start:start + size], labels[start:start + size]
            real = x.shape[0]
            if real < size:  # pad (repeating the last example) to the fixed chunk size
                x = np.concatenate([x, np.repeat(x[-1:], size - real, 0)])
                y = np.concatenate([y, np.repeat(y[-1:], size - real, 0)])
            return (jax.device_put(x, self._batch_sharding), jax.device_put(y, self._batch_sharding), start, real)

        starts = range(0, n, size)
        return Placed(n, cfg, (chunk(s) for s in starts) if lazy else [chunk(s) for s in starts])

    def launch(self, placed: "Placed") -> tuple:
        """Dispatches the steps of a placed batch (asynchronously) and returns them for `collect`:
        all at once when its chunks were placed eagerly, else one by one as `collect` goes."""
        fn = _jitted(placed.cfg, self.mesh)
        steps = ((fn(self._sel, self._fro, self._bs, self._factors, xs, ys), start, real)
                 for xs, ys, start, real in placed.chunks)
        return placed.n, (steps if isinstance(placed.chunks, Iterator) else list(steps))

    def collect(self, launched: tuple, ids=None) -> dict:
        """Waits for launched steps; returns the dict of numpy arrays of the class docstring."""
        n, steps = launched
        dims = [math.prod(shape) for _, shape, _ in self.layout.entries] if self.proj is None else [self.proj.dim]
        offsets = np.cumsum([0] + dims)
        out: dict = {"gw": np.empty((n, int(offsets[-1])), np.float32)}

        def collect(res, start, real):
            for k, v in res.items():
                if k == "gw":
                    for part, lo, hi in zip(v, offsets[:-1], offsets[1:]):
                        out["gw"][start:start + real, lo:hi] = np.asarray(part)[:real]
                else:
                    a = np.asarray(v)[:real]
                    if k not in out:
                        out[k] = np.empty((n,) + a.shape[1:], a.dtype)
                    out[k][start:start + real] = a

        pending = None
        for step in steps:  # (lazy launch: dispatches the next chunk before the last is collected)
            if pending is not None:
                collect(*pending)
            pending = step
        if pending is not None:
            collect(*pending)
        if n == 0:
            return {}
        finite = out.pop("finite")
        if not finite.all():
            bad = np.flatnonzero(~finite)
            names = [str(ids[i]) if ids is not None else f"#{i}" for i in bad[:10]]
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise UserError(f"NaN or Inf in the images, logits or gradients of {len(bad)} image(s): "
                            f"{', '.join(names)}{more}; check these images and the checkpoint's weights")
        return out


class Placed(NamedTuple):
    """A batch on the devices (`GradFn.put`): n examples, the step's configuration and its chunks
    (images, labels, first row, real rows)."""

    n: int
    cfg: Any
    chunks: Any


def build(model, variables, **kwargs) -> GradFn:
    """Returns a GradFn (see its docstring and `GradFn.__init__` for the options)."""
    return GradFn(model, variables, **kwargs)


def compute(model, variables, images, labels=None, *, params="fc", label_source="true", project_dim=None,
            seed=0, ids=None, **kwargs) -> dict:
    """One-shot `build(...)(images, labels, ids)`; the compiled step is cached per configuration."""
    fn = build(model, variables, params=params, label_source=label_source, project_dim=project_dim,
               seed=seed, **kwargs)
    return fn(images, labels, ids)


# ---------------------------------------------------------------------------------------------
# Benchmark

def _random_variables(model, image_size: int, seed: int = 0) -> dict:
    """Random weights and running statistics drawn in numpy (no compiled init)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = "/".join(_path_tuple(path)), leaf.shape
        if name.endswith("kernel"):
            fan_in = math.prod(shape[:-1])
            v = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith("scale") or name.endswith("var"):
            v = rng.uniform(0.5, 1.5, size=shape)
        else:
            v = 0.1 * rng.normal(size=shape)
        return np.asarray(v, np.float32)

    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(model, image_size))


def bench_grads(model_name: str = "resnet50", image_size: int = 224, batch: int = 32, vmap_batch: int = 8,
                loop_n: int = 8, project_dim: int = 1024, steps: int = 3, num_classes: int = 1000,
                stem: str = "standard", kron=DEFAULT_KRON, which: Sequence[str] | None = None,
                log=None) -> dict:
    """Samples/s of: forward only, batched forward+backward (mean loss, all params), per-example fc
    (closed form), per-example all by vmap(grad), per-example all by taps (unprojected), projected
    all (taps, `project_dim`), and a per-sample jax.grad loop; plus the ratios fc/forward,
    all_vmap/loop, projected_all/fwd_bwd. Random weights and inputs; each timing is the median of
    `steps` runs after a warm-up, on device (block_until_ready), without host transfers.
    `which` restricts the measurements (names as in the result's "samples_per_s")."""
    say = log or (lambda *_: None)
    model = models.create(model_name, num_classes, stem)
    variables = _random_variables(model, image_size)
    rng = np.random.default_rng(1)
    mesh = make_mesh()
    nd = mesh.devices.size
    batch = -(-batch // nd) * nd
    vmap_batch = -(-vmap_batch // nd) * nd
    shard = NamedSharding(mesh, P("batch"))
    rep = NamedSharding(mesh, P())
    var_d = jax.device_put(variables, rep)

    def inputs(n):
        x = rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32)
        y = rng.integers(0, num_classes, size=n).astype(np.int32)
        return jax.device_put(x, shard), jax.device_put(y, shard)

    x, y = inputs(batch)
    xv, yv = inputs(vmap_batch)

    want = set(which) if which else {"forward", "fwd_bwd", "fc", "all_vmap", "all_taps", "projected_all", "loop"}
    cases: list = []  # (name, blocking callable, samples per call)
    methods: dict = {}

    if "forward" in want:
        fwd = jax.jit(lambda v, a: models.apply(model, v, a)[0])
        cases.append(("forward", lambda: fwd(var_d, x).block_until_ready(), batch))
    if "fwd_bwd" in want:
        def mean_loss(p, bs, a, b):
            logits, _ = models.apply(model, {"params": p, "batch_stats": bs}, a)
            return jnp.mean(cross_entropy(logits, b))
        fb = jax.jit(jax.grad(mean_loss))
        cases.append(("fwd_bwd", lambda: jax.block_until_ready(fb(var_d["params"], var_d["batch_stats"], x, y)),
                      batch))

    def per_example(name, n, a, b, **kw):
        fn = GradFn(model, variables, max_grad_floats=1 << 40, **kw)
        cfg, _ = fn.plan(a.shape[1:])
        step = _jitted(cfg, fn.mesh)
        methods[name] = cfg.method
        cases.append((name, lambda: jax.block_until_ready(step(fn._sel, fn._fro, fn._bs, fn._factors, a, b)), n))

    if "fc" in want:
        per_example("fc", batch, x, y, params="fc")
    if "all_vmap" in want:
        per_example("all_vmap", vmap_batch, xv, yv, params="all", method="vmap")
    if "all_taps" in want:
        per_example("all_taps", vmap_batch, xv, yv, params="all", method="taps")
    if "projected_all" in want:
        per_example("projected_all", batch, x, y, params="all", project_dim=project_dim, kron=kron)
    if "loop" in want:
        one = jax.jit(jax.grad(partial(example_loss, model)))
        dev = jax.local_devices()[0]
        p1, b1 = jax.device_put((variables["params"], variables["batch_stats"]), dev)
        xh, yh = np.asarray(x), np.asarray(y)
        imgs = [jax.device_put(xh[i % batch], dev) for i in range(loop_n)]
        labs = [jax.device_put(yh[i % batch], dev) for i in range(loop_n)]

        def loop():
            for i in range(loop_n):
                g = one(p1, b1, imgs[i], labs[i])
            jax.block_until_ready(g)
        cases.append(("loop", loop, loop_n))

    # Warm up (compile) every case, then time them round-robin so that a change of the machine's
    # load (shared CPUs) hits all of them alike; report the median of each.
    for name, fn, _ in cases:
        t = time.perf_counter()
        fn()
        say(f"{name}: compiled and warmed up in {time.perf_counter() - t:.1f} s")
    times: dict = {name: [] for name, _, _ in cases}
    for _ in range(max(1, steps)):
        for name, fn, _ in cases:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rates: dict = {}
    for name, _, n in cases:
        sec = statistics.median(times[name])
        rates[name] = n / sec
        say(f"{name}: {rates[name]:.2f} samples/s ({sec * 1e3:.1f} ms for {n})")

    def ratio(a, b):
        return rates[a] / rates[b] if a in rates and b in rates else None

    result = {
        "config": {"model": model_name, "image_size": image_size, "batch": batch, "vmap_batch": vmap_batch,
                   "loop_n": loop_n, "project_dim": project_dim, "kron": list(kron), "steps": steps,
                   "num_classes": num_classes, "stem": stem, "devices": nd,
                   "device_kind": jax.local_devices()[0].device_kind,
                   "grad_dim_all": models.count_params(variables["params"])},
        "methods": methods,
        "samples_per_s": rates,
        "ratios": {"fc/forward": ratio("fc", "forward"), "all_vmap/loop": ratio("all_vmap", "loop"),
                   "all_taps/loop": ratio("all_taps", "loop"),
                   "projected_all/fwd_bwd": ratio("projected_all", "fwd_bwd")},
        "targets": {"fc/forward": 0.9, "all_vmap/loop": 5.0, "projected_all/fwd_bwd": 0.3},
    }
    return result
