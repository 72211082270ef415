"""Grad-CAM and Grad-CAM++ class activation maps for the ResNets of `models.py`.

A map explains one class (the *target*) of one image at one stage output (the *layer*:
`stem`, `layer1` ... `layer4`). With A the layer's output (N, h, w, K) and g = d logit_target / dA
(the raw, pre-softmax logit, as in Selvaraju et al. 2017 and pytorch-grad-cam):

  * Grad-CAM:   w_k = mean_ij g_ijk
  * Grad-CAM++: w_k = sum_ij a_ijk relu(g_ijk) with the closed form of Chattopadhay et al. 2018,
                see `_gradcampp_weights`;

then cam = relu(sum_k w_k A_k) (h, w), upsampled bilinearly to the input size and min-max scaled
to [0, 1] per image.

Conventions
-----------
* Upsampling is `jax.image.resize(..., "bilinear")`: half-pixel centres with edge clamping, which
  for upsampling equals PyTorch's `F.interpolate(mode="bilinear", align_corners=False)`
  (`tests/test_gradcam.py` checks this against an independent implementation of PyTorch's
  formula). Stage maps are never larger than the input, so there is no antialiased downsampling.
* Scaling is done after upsampling, so every non-degenerate map has min exactly 0 and max 1.
  pytorch-grad-cam scales before its cv2 resize; the maps differ by the interpolation overshoot
  only (none, for bilinear) and agree in shape.
* A map whose upsampled values are constant up to float rounding (relative range <= 1e-5: e.g. all
  zero after the ReLU because every channel weight is negative, a 1x1 stage map, or non-finite
  values) is *degenerate*: it is returned as all zeros and flagged in `CamOutputs.degenerate`, so
  callers can report it. A map from `gradcam` is degenerate exactly when its maximum is 0.
* Eval mode (running BatchNorm statistics) always.

Cost: the gradient is taken with respect to the zero `perturbations` entry of the chosen stage
only, never with respect to parameters, so the backward pass runs from the logits down to that
stage and stops there (XLA removes everything else). For `layer4` it is only the transpose of the
Dense head and the global average pool: Grad-CAM costs about one forward pass. See
`bench.bench_gradcam`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.core import models
from resnet_jax.errors import UserError
from resnet_jax.core.grads import LABEL_SOURCES

LAYERS = models.STAGES
METHODS = ("gradcam", "gradcampp")

# Grad-CAM++ denominator epsilon, as in pytorch-grad-cam.
GRADCAMPP_EPS = 1e-6
# A map whose range is at most this fraction of its largest magnitude is degenerate.
DEGENERATE_RTOL = 1e-5


class CamOutputs(NamedTuple):
    """What `gradcam_with_outputs` returns (N = batch size; cams and degenerate numpy, the rest jax arrays)."""

    cams: Any        # (N, H, W) float32 in [0, 1], min-max scaled; all zeros where degenerate
    degenerate: Any  # (N,) bool: the map was constant (or non-finite) before scaling
    logits: Any      # (N, C) float32: the model's logits from the same forward pass
    targets: Any     # (N,) int32: the explained classes (the predicted ones if targets=None)
    weights: Any     # (N, K) float32: the channel weights w_k
    raw: Any         # (N, h, w) float32: relu(sum_k w_k A_k) at the layer's resolution, unscaled


# ----------------------------------------------------------------------------- validation

def check_layer_and_method(layer: str, method: str) -> None:
    if layer not in LAYERS:
        raise UserError(f"unknown Grad-CAM layer {layer!r}: choose one of {', '.join(LAYERS)}")
    if method not in METHODS:
        raise UserError(f"unknown Grad-CAM method {method!r}: choose one of {', '.join(METHODS)}")


def _check_targets(targets, n: int, num_classes: int, what: str = "targets") -> np.ndarray:
    t = np.asarray(targets)
    if t.ndim != 1 or t.shape[0] != n:
        raise UserError(f"{what} must have shape ({n},), one class per image, got {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise UserError(f"{what} must be integer class indices, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)]
        raise UserError(f"{what} out of range: {bad[:5].tolist()} but the model has {num_classes} classes "
                        f"(valid: 0..{num_classes - 1})")
    return t.astype(np.int32)


def targets_for(logits, labels=None, label_source: str = "true"):
    """Returns the classes to explain, (N,) int32: the `labels` ("true") or argmax `logits` ("predicted"),
    the same gradient labels as `grads`."""
    if label_source not in LABEL_SOURCES:
        raise UserError(f"unknown label source {label_source!r}: choose one of {', '.join(LABEL_SOURCES)}")
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise UserError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if label_source == "predicted":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if labels is None:
        raise UserError("label source 'true' needs the labels: pass them, or use label source 'predicted'")
    return jnp.asarray(_check_targets(labels, logits.shape[0], logits.shape[1], what="labels"))


# ----------------------------------------------------------------------------- the maps

def _gradcampp_weights(acts, grads):
    """Grad-CAM++ channel weights (N, K) from A and g (N, h, w, K).

    Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
    Networks", WACV 2018 (arXiv:1710.11063), eq. 19 with exp(score) closed form, exactly as
    pytorch-grad-cam's `GradCAMPlusPlus.get_cam_weights`
    (github.com/jacobgil/pytorch-grad-cam, pytorch_grad_cam/grad_cam_plusplus.py):

        a_ijk = g_ijk^2 / (2 g_ijk^2 + (sum_ab A_abk) g_ijk^3 + eps),   eps = 1e-6
        a_ijk = 0 where g_ijk == 0
        w_k   = sum_ij a_ijk relu(g_ijk)
    """
    g2 = grads * grads
    g3 = g2 * grads
    sum_acts = jnp.sum(acts, axis=(1, 2), keepdims=True)
    alpha = g2 / (2.0 * g2 + sum_acts * g3 + GRADCAMPP_EPS)
    alpha = jnp.where(grads != 0, alpha, 0.0)  # as pytorch-grad-cam (already 0 there, as eps > 0)
    return jnp.sum(alpha * jax.nn.relu(grads), axis=(1, 2))


def _min_max(maps):
    """Per-map min-max scaling of (N, H, W) to [0, 1] in numpy; returns (scaled float32, degenerate (N,)).

    Done on the host: inside a compiled program XLA may recompute the maps separately for the
    reductions and for the scaling, with other rounding, and the maximum would not always scale
    to exactly 1.
    """
    maps = np.asarray(maps, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        lo = maps.min(axis=(1, 2))
        hi = maps.max(axis=(1, 2))
        span = hi - lo
        scale = np.maximum(np.abs(hi), np.abs(lo))
        # `not (span > tol)` is also True for NaN/inf maps, which are then flagged and zeroed.
        degenerate = ~(span > DEGENERATE_RTOL * scale)
        safe = np.where(degenerate, np.float32(1), span)
        scaled = (maps - lo[:, None, None]) / safe[:, None, None]
    scaled = np.where(degenerate[:, None, None], np.float32(0), np.clip(scaled, 0, 1)).astype(np.float32)
    return scaled, degenerate


def _cam_outputs(model, layer: str, method: str, variables, images, targets):
    """The traced computation (jit it with model, layer and method fixed); returns (maps upsampled to
    the input size (N, H, W), unscaled; logits; targets; weights; raw)."""
    base = {k: v for k, v in variables.items() if k != "perturbations"}
    # Once a `perturbations` collection is present, every `Module.perturb` call needs its entry:
    # the other stages get constant zeros (XLA folds the additions away), only `layer`'s entry is
    # differentiated.
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[1], base, images)
    others = {s: jnp.zeros(shapes[s].shape, shapes[s].dtype) for s in LAYERS if s != layer}
    pert = jnp.zeros(shapes[layer].shape, shapes[layer].dtype)

    def logits_of(p):
        logits, inter = model.apply({**base, "perturbations": {**others, layer: p}}, images, train=False)
        return logits, inter[layer]

    # Differentiating only with respect to the perturbation: nothing below `layer` (and no
    # parameter) gets a cotangent, so the backward pass ends at `layer`.
    logits, vjp_fn, acts = jax.vjp(logits_of, pert, has_aux=True)  # logits are float32
    # A negative target means "the predicted class" (one compiled function serves both cases).
    targets = jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets).astype(jnp.int32)
    # The cotangent one_hot(targets) is the gradient of sum_n logits[n, targets[n]]. In eval mode
    # the images of a batch are independent (no batch statistics, no cross-image op), so the
    # gradient of that sum with respect to image n's activation is the gradient of image n's own
    # target logit: one backward pass gives all the per-image gradients.
    cot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    (grads,) = vjp_fn(cot)
    acts = acts.astype(jnp.float32)
    grads = grads.astype(jnp.float32)

    if method == "gradcam":
        weights = jnp.mean(grads, axis=(1, 2))
    else:
        weights = _gradcampp_weights(acts, grads)
    raw = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", acts, weights, precision=jax.lax.Precision.HIGHEST))
    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    up = jax.image.resize(raw, (n, height, width), method="bilinear")
    return up, logits, targets, weights, raw


# Compiled functions per (model, layer, method). Flax modules with list attributes (our
# `stage_sizes`) are unhashable, so this is a small list searched with `==` (dataclass equality).
_CACHE: list[tuple[Any, str, str, Any]] = []
_CACHE_SIZE = 16


def compiled(model, layer: str, method: str):
    for m, l, meth, fn in _CACHE:
        if l == layer and meth == method and (m is model or m == model):
            return fn
    fn = jax.jit(partial(_cam_outputs, model, layer, method))
    _CACHE.append((model, layer, method, fn))
    del _CACHE[:-_CACHE_SIZE]
    return fn


def gradcam_with_outputs(model, variables, images, targets=None, layer: str = "layer4",
                         method: str = "gradcam") -> CamOutputs:
    """Batched, jit-compiled Grad-CAM (`method="gradcam"`) or Grad-CAM++ (`"gradcampp"`).

    `images` (N, H, W, 3) float; `targets` (N,) int class indices to explain, or None for each
    image's predicted class (argmax of the logits of the same forward pass). Returns `CamOutputs`
    with the maps (N, H, W) in [0, 1], the `degenerate` flags, the logits (N, C) and more.
    Raises UserError for an unknown layer or method, images not (N, H, W, 3), or bad targets.
    """
    check_layer_and_method(layer, method)
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    models.validate_images(images)
    if targets is None:
        targets = np.full((images.shape[0],), -1, np.int32)
    else:
        targets = _check_targets(targets, images.shape[0], model.num_classes)
    up, logits, targets, weights, raw = compiled(model, layer, method)(variables, jnp.asarray(images),
                                                                       jnp.asarray(targets))
    cams, degenerate = _min_max(up)
    return CamOutputs(cams, degenerate, logits, targets, weights, raw)


def gradcam(model, variables, images, targets=None, layer: str = "layer4", method: str = "gradcam"):
    """Returns the class activation maps (N, H, W) float32 in [0, 1]; see `gradcam_with_outputs`.

    Degenerate (constant) maps are all zeros, i.e. exactly the maps whose maximum is 0.
    """
    return gradcam_with_outputs(model, variables, images, targets, layer, method).cams
