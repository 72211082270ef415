"""Grad-CAM / Grad-CAM++ against independent references.

* per-image autodiff: each image's own target logit differentiated with `jax.vjp` on a
  single-image apply, the map then built in float64 numpy (not the batched jit code path);
* the closed form at layer4: the head is global average pooling then Dense, so
  d logit_c / dA[i, j, k] = W_fc[k, c] / (h w) at every position;
* PyTorch's bilinear `align_corners=False` formula, re-implemented in numpy.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.core import gradcam as gc
from resnet_jax.core import models
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError

N, C, SIZE = 3, 7, 72  # resnet18 at 72 px: layer4 maps are 3x3, layer3 6x6


@pytest.fixture(scope="module", autouse=True)
def _float32_matmuls():
    # Full float32 convolutions/matmuls also on GPUs (TF32 would dwarf the tolerances).
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def setup():
    model = models.create("resnet18", num_classes=C)
    variables = random_variables(model, SIZE)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(N, SIZE, SIZE, 3)), jnp.float32)
    targets = np.array([2, 4, 6], np.int32)  # non-degenerate maps at layer3 and layer4
    return model, variables, images, targets


_REFERENCE = {}


def per_image_reference(model, variables, image, target, layer):
    """(A (h, w, K), g = d logit_target / dA) for ONE image, float64: a plain forward for A, and
    `jax.vjp` of the scalar target logit of a single-image apply for g."""
    if layer not in _REFERENCE:
        def fn(variables, image, target):
            x = image[None]
            _, inter = model.apply(variables, x, train=False)
            zeros = {s: jnp.zeros_like(inter[s]) for s in models.STAGES}

            def logit(p):
                out, _ = model.apply({**variables, "perturbations": {**zeros, layer: p}}, x, train=False)
                return out[0, target]

            value, pullback = jax.vjp(logit, zeros[layer])
            (grad,) = pullback(jnp.ones_like(value))
            return inter[layer][0], grad[0]

        _REFERENCE[layer] = jax.jit(fn)
    act, grad = _REFERENCE[layer](variables, image, target)
    return np.asarray(act, np.float64), np.asarray(grad, np.float64)


def torch_bilinear(img, out_h, out_w):
    """PyTorch F.interpolate(mode="bilinear", align_corners=False) of a 2-D array, in numpy."""
    def axis(out, size):
        src = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), size - 1)
        i1 = np.minimum(i0 + 1, size - 1)
        frac = src - i0
        return i0, i1, 1.0 - frac, frac

    r0, r1, wr0, wr1 = axis(out_h, img.shape[0])
    c0, c1, wc0, wc1 = axis(out_w, img.shape[1])
    rows = wr0[:, None] * img[r0] + wr1[:, None] * img[r1]
    return wc0[None, :] * rows[:, c0] + wc1[None, :] * rows[:, c1]


def gradcampp_weights_np(act, grad, eps=1e-6):
    g2, g3 = grad ** 2, grad ** 3
    alpha = g2 / (2 * g2 + act.sum(axis=(0, 1)) * g3 + eps)
    alpha = np.where(grad != 0, alpha, 0.0)
    return (alpha * np.maximum(grad, 0)).sum(axis=(0, 1))


def cam_np(act, weights, size):
    raw = np.maximum(act @ weights, 0.0)
    up = torch_bilinear(raw, size, size)
    span = up.max() - up.min()
    if span <= 1e-5 * np.abs(up).max() or span == 0:
        return raw, np.zeros_like(up), True
    return raw, (up - up.min()) / span, False


# ----------------------------------------------------------------------------- resize convention

def test_resize_matches_pytorch_bilinear():
    # A value PyTorch gives: F.interpolate([[0, 1]], size=(1, 4), bilinear) -> [0, .25, .75, 1].
    np.testing.assert_allclose(torch_bilinear(np.array([[0.0, 1.0]]), 1, 4), [[0, 0.25, 0.75, 1]])
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((3, 3), (72, 72)), ((6, 6), (72, 72)), ((5, 4), (13, 11)), ((1, 1), (8, 8))]:
        img = rng.normal(size=(h, w))
        ours = jax.image.resize(jnp.asarray(img, jnp.float32)[None], (1, oh, ow), "bilinear")[0]
        np.testing.assert_allclose(np.asarray(ours), torch_bilinear(img, oh, ow), atol=1e-5)


# ----------------------------------------------------------------------------- per-image autodiff

@pytest.mark.parametrize("layer", ["layer4", "layer3"])
@pytest.mark.device
def test_gradcam_matches_per_image_autodiff(setup, layer):
    model, variables, images, targets = setup
    out = gc.gradcam_with_outputs(model, variables, images, targets, layer=layer)
    assert out.cams.shape == (N, SIZE, SIZE) and out.cams.dtype == jnp.float32
    assert out.logits.shape == (N, C) and out.degenerate.shape == (N,)
    np.testing.assert_array_equal(out.targets, targets)
    for i in range(N):
        act, grad = per_image_reference(model, variables, images[i], targets[i], layer)
        weights = grad.mean(axis=(0, 1))
        raw, cam, degenerate = cam_np(act, weights, SIZE)
        assert not degenerate
        np.testing.assert_allclose(out.weights[i], weights, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(out.raw[i], raw, rtol=1e-4, atol=1e-5 * raw.max())
        np.testing.assert_allclose(out.cams[i], cam, atol=1e-5)
        assert not bool(out.degenerate[i])
        assert float(out.cams[i].min()) == 0.0 and float(out.cams[i].max()) == 1.0
    # The logits are the model's.
    np.testing.assert_allclose(out.logits, models.apply(model, variables, images)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.device
def test_gradcampp_matches_per_image_autodiff(setup):
    model, variables, images, targets = setup
    out = gc.gradcam_with_outputs(model, variables, images, targets, layer="layer3", method="gradcampp")
    plain = gc.gradcam(model, variables, images, targets, layer="layer3")
    for i in range(N):
        act, grad = per_image_reference(model, variables, images[i], targets[i], "layer3")
        assert np.ptp(grad[..., 0]) > 0 or np.ptp(grad[..., 1]) > 0  # spatially varying gradients
        weights = gradcampp_weights_np(act, grad)
        _, cam, degenerate = cam_np(act, weights, SIZE)
        assert not degenerate
        np.testing.assert_allclose(out.weights[i], weights, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(out.cams[i], cam, atol=1e-5)
        assert np.abs(np.asarray(out.cams[i]) - np.asarray(plain[i])).max() > 1e-3  # a different method


# ----------------------------------------------------------------------------- closed form at layer4

@pytest.mark.device
def test_layer4_closed_form(setup):
    model, variables, images, targets = setup
    out = gc.gradcam_with_outputs(model, variables, images, targets, layer="layer4")
    pp = gc.gradcam_with_outputs(model, variables, images, targets, layer="layer4", method="gradcampp")
    kernel = np.asarray(variables["params"]["fc"]["kernel"], np.float64)  # (K, C)
    _, inter = jax.jit(lambda v, x: models.apply(model, v, x))(variables, images)
    acts = np.asarray(inter["layer4"], np.float64)
    h, w = acts.shape[1:3]
    for i in range(N):
        alpha = kernel[:, targets[i]] / (h * w)  # d logit / dA is W_fc[k, c] / (h w) everywhere
        np.testing.assert_allclose(out.weights[i], alpha, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(out.cams[i], cam_np(acts[i], alpha, SIZE)[1], atol=1e-5)
        grad = np.broadcast_to(alpha, acts[i].shape)
        ppw = gradcampp_weights_np(acts[i], grad)
        np.testing.assert_allclose(pp.weights[i], ppw, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(pp.cams[i], cam_np(acts[i], ppw, SIZE)[1], atol=1e-5)


def test_backward_stops_at_the_layer(setup):
    """No gradient below the layer or for any parameter. ResNet-18 has 17 convolutions plus 3
    pointwise (1x1, matrix product) downsample convolutions and fc. For layer4 the Grad-CAM
    program has exactly the forward's 17 convolutions; for layer3 4 more (data gradients through
    layer4's 3x3 convolutions; weight gradients would add 4 again). No matrix product anywhere
    yields a kernel-shaped (Cin, Cout) or (Cout, Cin) array, which a weight gradient of a 1x1 convolution or of
    fc would."""
    model, variables, images, targets = setup
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0]).lower(variables, images).as_text()

    def convs(text):
        return len(re.findall(r"stablehlo\.convolution", text))

    def dot_results(text):
        return re.findall(r"stablehlo\.dot_general.*-> tensor<([0-9x]+)xf32>", text)

    kernel_shapes = {"x".join(map(str, shape)) for path, leaf in
                     jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                     if path[-1].key == "kernel" and (leaf.ndim == 2 or leaf.shape[:2] == (1, 1))
                     for shape in (leaf.shape[-2:], leaf.shape[:-3:-1])}  # either orientation
    assert f"512x{C}" in kernel_shapes and "256x512" in kernel_shapes
    t = jnp.asarray(targets)
    layer4 = gc.compiled(model, "layer4", "gradcam").lower(variables, images, t).as_text()
    layer3 = gc.compiled(model, "layer3", "gradcam").lower(variables, images, t).as_text()
    assert convs(forward) == 17 and len(dot_results(forward)) == 4
    assert convs(layer4) == 17
    assert convs(layer3) == 21
    for text in (forward, layer4, layer3):
        assert not kernel_shapes & set(dot_results(text))
    # layer3 adds one matrix product: the data gradient through layer4's downsample.
    assert len(dot_results(layer3)) == len(dot_results(layer4)) + 1


# ----------------------------------------------------------------------------- targets, degenerate maps

@pytest.mark.device
def test_predicted_and_true_targets(setup):
    model, variables, images, targets = setup
    pred = gc.gradcam_with_outputs(model, variables, images, None)
    predicted = np.argmax(np.asarray(pred.logits), axis=-1)
    np.testing.assert_array_equal(pred.targets, predicted)
    np.testing.assert_array_equal(gc.targets_for(pred.logits, label_source="predicted"), predicted)
    np.testing.assert_array_equal(gc.targets_for(pred.logits, targets, label_source="true"), targets)
    explicit = gc.gradcam(model, variables, images, gc.targets_for(pred.logits, label_source="predicted"))
    np.testing.assert_allclose(pred.cams, explicit, atol=1e-6)
    other = np.where(predicted == 6, 2, 6)  # classes with non-degenerate maps
    differs = gc.gradcam(model, variables, images, other)
    assert np.abs(np.asarray(differs) - np.asarray(explicit)).max(axis=(1, 2)).min() > 1e-3


def test_degenerate_maps(setup):
    model, variables, images, _ = setup
    # Class 0's fc column all negative: at layer4 cam = relu(sum_k W[k, 0] A_k / hw) with A >= 0
    # (post-ReLU), so class 0's map is zero everywhere.
    params = dict(variables["params"])
    kernel = jnp.asarray(params["fc"]["kernel"])
    params["fc"] = {**params["fc"], "kernel": kernel.at[:, 0].set(-jnp.abs(kernel[:, 0]) - 1e-3)}
    neg = {**variables, "params": params}
    targets = np.array([0, 2, 0], np.int32)
    out = gc.gradcam_with_outputs(model, neg, images, targets)
    np.testing.assert_array_equal(out.degenerate, [True, False, True])
    cams = np.asarray(out.cams)
    assert np.all(cams[[0, 2]] == 0) and np.all(np.asarray(out.raw)[[0, 2]] == 0)
    assert cams[1].min() == 0 and cams[1].max() == 1
    np.testing.assert_array_equal(np.asarray(gc.gradcam(model, neg, images, targets)).max(axis=(1, 2)), [0, 1, 0])
    # The scaling on its own: constant and non-finite maps are flagged and zeroed.
    maps = jnp.stack([jnp.full((4, 4), 3.0), jnp.arange(16.0).reshape(4, 4), jnp.full((4, 4), jnp.nan)])
    scaled, degenerate = gc._min_max(maps)
    np.testing.assert_array_equal(degenerate, [True, False, True])
    np.testing.assert_allclose(scaled[1], np.arange(16.0).reshape(4, 4) / 15, atol=1e-7)
    assert np.all(np.asarray(scaled)[[0, 2]] == 0)


# ----------------------------------------------------------------------------- errors, caching

def test_errors(setup):
    model, variables, images, targets = setup
    with pytest.raises(UserError, match="layer4") as err:
        gc.gradcam(model, variables, images, targets, layer="layer5")
    assert all(name in str(err.value) for name in models.STAGES)
    with pytest.raises(UserError, match="gradcampp"):
        gc.gradcam(model, variables, images, targets, method="scorecam")
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        gc.gradcam(model, variables, images[0], targets)
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        gc.gradcam(model, variables, images[..., :2], targets)
    for bad in ([1, 4, C], [1, -1, 2]):
        with pytest.raises(UserError, match="out of range"):
            gc.gradcam(model, variables, images, np.array(bad))
    with pytest.raises(UserError, match=r"shape \(3,\)"):
        gc.gradcam(model, variables, images, targets[:2])
    with pytest.raises(UserError, match="integer"):
        gc.gradcam(model, variables, images, targets.astype(np.float32))
    logits = np.zeros((N, C), np.float32)
    with pytest.raises(UserError, match="predicted"):
        gc.targets_for(logits, label_source="most-likely")
    with pytest.raises(UserError, match="labels"):
        gc.targets_for(logits, None, label_source="true")
    with pytest.raises(UserError, match="out of range"):
        gc.targets_for(logits, np.array([0, 1, C]), label_source="true")


def test_compiled_function_is_cached_per_model_layer_method():
    a = gc.compiled(models.create("resnet18", num_classes=C), "layer4", "gradcam")
    assert gc.compiled(models.create("resnet18", num_classes=C), "layer4", "gradcam") is a
    assert gc.compiled(models.create("resnet18", num_classes=C), "layer3", "gradcam") is not a
    assert gc.compiled(models.create("resnet18", num_classes=C), "layer4", "gradcampp") is not a
    assert gc.compiled(models.create("resnet18", num_classes=C + 1), "layer4", "gradcam") is not a
