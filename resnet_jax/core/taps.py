"""Per-layer inputs and output cotangents from one batched backward pass (method "taps").

Every Conv/Dense/BatchNorm owning a selected leaf gets a zero tensor added to its output (a Flax
method interceptor); jax.vjp of the summed loss with respect to those zeros gives every example's
output cotangent g, and the layer input x is recorded. The per-example weight gradient is then
sum_p x_patch(p) (x) g(p) (one batched matmul over the kh*kw strided windows of the padded input:
the forward's FLOPs), and BatchNorm's is sum_p g*xhat and sum_p g. With a projection the
per-example gradient is never formed (`leaf_proj`).
"""
from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.core import models
from resnet_jax.core.projection import Projection, project_leaf, project_pair


@dataclass(frozen=True)
class Tap:
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


def tapped_apply(model, variables, images, modules, eps=None):
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


def probe(model, variables, image_shape, modules):
    """Static per-module tap descriptions (shape-only trace)."""
    out = {}

    def f(v, x):
        _, _, inputs, kinds, shapes = tapped_apply(model, v, x, modules)
        out.update({m: (kinds.get(m), shapes.get(m), tuple(inputs[m].shape) if m in inputs else None)
                    for m in modules})
        return 0

    jax.eval_shape(f, variables, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))
    taps = {}
    for m, (kind, oshape, ishape) in out.items():
        taps[m] = None if kind is None or oshape is None else Tap(kind[0], kind[1], oshape[1:], ishape[1:])
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


def leaf_grad(tap: Tap, leaf: str, x, g, bstats):
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


def leaf_proj(tap: Tap, leaf: str, shape, x, g, bstats, fac, proj: Projection):
    """Projected per-example gradient (B, k), unscaled, without forming the full gradient."""
    if len(fac) == 1 or tap.kind == "bn":
        return project_leaf(leaf_grad(tap, leaf, x, g, bstats), fac, proj)
    a, b = fac
    if tap.kind == "conv":
        ksize, strides, pad, dil, _ = tap.conf
        kern = a.reshape(tuple(shape[:-1]) + (a.shape[-1],))  # (kh, kw, cin, r*k1)
        xa = jax.lax.conv_general_dilated(x, kern.astype(x.dtype), strides, pad, rhs_dilation=dil,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        xa = x @ a.astype(x.dtype)
    gb = g @ b.astype(g.dtype)
    return project_pair(xa, gb, proj)

