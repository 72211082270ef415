"""The stable cross-entropy and its gradient delta = softmax - onehot at large logit margins, against
a 60-digit decimal reference, finite differences of the gradient (second order), the closed form of
the fc gradient under vmap(grad) of the whole network, and an extraction of converted weights."""
from __future__ import annotations

import decimal
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import float64, make_folder, run_cli
from resnet_jax.core import weights as convert, grads, losses, models
from resnet_jax.jobs import extract
from resnet_jax.benchmarks.speed import random_variables

MARGINS = [0, 10, 20, 40, 80]


def exact(z, y):
    """(loss, delta) of one row of logits in 60-digit decimal arithmetic, rounded to float64."""
    decimal.getcontext().prec = 60
    e = [decimal.Decimal(float(v)).exp() for v in z]
    total = sum(e)
    delta = [float(v / total - (1 if c == y else 0)) for c, v in enumerate(e)]
    return float(total.ln() - decimal.Decimal(float(z[y]))), np.array(delta)


def confident_logits(margin, dtype, n=4, c=7, seed=0):
    """(n, c) logits whose label's logit leads the largest other one by `margin`, and the labels."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, c)) * 3).astype(dtype)
    labels = np.arange(n) % c
    z[np.arange(n), labels] = z.max(axis=1) + dtype(margin)
    return z, labels


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_exact_at_large_margins(margin, dtype):
    with float64():
        z, labels = confident_logits(margin, dtype)
        ref = [exact(row, y) for row, y in zip(z, labels)]
        ref_loss = np.array([r[0] for r in ref])
        ref_delta = np.stack([r[1] for r in ref])
        rows = np.arange(len(labels))
        autodiff = np.asarray(jax.vmap(jax.grad(losses.cross_entropy))(jnp.asarray(z), jnp.asarray(labels)),
                              np.float64)
        direct = np.asarray(losses.stable_delta(jnp.asarray(z), jnp.asarray(labels)), np.float64)
        loss = np.asarray(losses.cross_entropy(jnp.asarray(z), jnp.asarray(labels)), np.float64)
    assert autodiff.dtype == direct.dtype
    for got in (autodiff, direct):
        assert np.all(cosine(got, ref_delta) >= 0.9999)
        np.testing.assert_allclose(got[rows, labels], ref_delta[rows, labels], rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=0)  # no rounding to 0 either


def test_second_order_matches_finite_differences():
    """Forward-over-reverse (Hessian-vector products) and reverse-over-reverse (the alignment loss's
    double backprop) of the custom derivative, against central differences of the gradient in float64."""
    with float64():
        z, labels = confident_logits(40.0, np.float64)
        z[1] = np.random.default_rng(1).normal(size=z.shape[1])  # one row at a small margin too
        v = np.random.default_rng(2).normal(size=z.shape)
        grad = jax.grad(lambda x: jnp.sum(losses.cross_entropy(x, labels)))
        hvp = np.asarray(jax.jvp(grad, (jnp.asarray(z),), (jnp.asarray(v),))[1])
        rev = np.asarray(jax.grad(lambda x: jnp.vdot(grad(x), v))(jnp.asarray(z)))
        h = 1e-6
        fd = (np.asarray(grad(z + h * v)) - np.asarray(grad(z - h * v))) / (2 * h)
    scale = np.abs(fd).max(axis=1, keepdims=True)
    assert np.all(scale > 0)
    np.testing.assert_allclose(hvp / scale, fd / scale, atol=1e-6)
    np.testing.assert_allclose(rev / scale, fd / scale, atol=1e-6)  # the Hessian is symmetric


def test_vmap_grad_of_all_parameters_matches_closed_form_at_margin_40():
    c, size = 5, 72
    model = models.create("resnet18", num_classes=c)
    variables = random_variables(model, size)
    images = np.random.default_rng(3).normal(size=(3, size, size, 3)).astype(np.float32)
    logits0 = np.asarray(models.apply(model, variables, images)[0])
    labels = np.array([0, 0, 2], np.int32)
    # the fc bias puts class 0 ahead by >= 45 for every image: rows 0-1 confident and right, row 2 wrong
    bias = np.zeros(c, np.float32)
    bias[0] = 45.0 + float(np.max(logits0) - np.min(logits0))
    variables = jax.tree_util.tree_map(lambda x: x, variables)
    variables["params"]["fc"]["bias"] = variables["params"]["fc"]["bias"] + bias
    logits = np.asarray(models.apply(model, variables, images)[0], np.float64)
    margin = logits[:, 0] - np.sort(logits, axis=1)[:, -2]
    assert np.all(margin > 40)
    g = jax.jit(jax.vmap(jax.grad(lambda p, x, y: losses.example_loss(model, p, variables["batch_stats"], x, y)),
                         in_axes=(None, 0, 0)))(variables["params"], images, labels)
    autodiff = np.concatenate([np.asarray(g["fc"]["kernel"]).reshape(3, -1), np.asarray(g["fc"]["bias"])], axis=1)
    closed = grads.compute(model, variables, images, labels, params="fc")
    h = closed["fm"].astype(np.float64)
    ref = np.stack([exact(row, y)[1] for row, y in zip(closed["logits"], labels)])
    by_hand = np.concatenate([(h[:, :, None] * ref[:, None, :]).reshape(3, -1), ref], axis=1)
    # The closed form uses the same logits as the reference: 1e-5. vmap(grad) runs its own forward pass,
    # whose float32 logits (about 60) differ from those by rounding (~1e-5), which moves every
    # e^(z_c - z_y) by as much relative: 1e-4 (the old p_y - 1 gave a relative error of 1 in the bias).
    for got, tol in ((closed["gw"], 1e-5), (autodiff, 1e-4)):
        err = np.abs(got - by_hand) / np.abs(by_hand).max(axis=1, keepdims=True)
        assert err.max() < tol
        np.testing.assert_allclose(got[:, -c:][[0, 1], [0, 0]], ref[[0, 1], [0, 0]], rtol=tol)
        assert np.all(cosine(got, by_hand) >= 0.9999)
    # the other parameters' gradients are not all zero (the backward pass ran at this margin)
    assert np.abs(np.asarray(g["layer4_1"]["conv2"]["kernel"][0])).max() > 0


def test_extract_of_converted_weights_stores_exact_gradients_at_large_margins(tmp_path, capsys):
    """Weights built here (random convolutions, a small fc weight and an fc bias that put class 0 ahead by
    about 60) are written
    as .safetensors, converted and extracted; the stored fc gradients equal the exact ones within 1e-5."""
    classes = ("circle", "cross", "square")
    folder = make_folder(tmp_path / "data", classes=classes, per_class=4, size=24)
    rng = np.random.default_rng(0)
    state = {}
    for key, shape in convert.torchvision_keys("resnet18", len(classes)):
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(0, np.int64)
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight")) or ".weight" in key and "bn" in key:
            state[key] = np.ones(shape, np.float32)
        elif key.endswith(("running_mean", ".bias")) and key != "fc.bias":
            state[key] = np.zeros(shape, np.float32)
        elif key == "fc.bias":
            state[key] = np.array([60.0, 0.0, 0.0], np.float32)
        else:  # conv weights He-scaled; the fc weight small, so that the bias decides the margin
            scale = np.sqrt(2.0 / np.prod(shape[1:])) * (1e-3 if key == "fc.weight" else 1.0)
            state[key] = (rng.normal(size=shape) * scale).astype(np.float32)
    src = tmp_path / "weights.safetensors"
    save_file(state, str(src))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(sorted(classes)) + "\n")
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    code, _, err = run_cli(["convert", str(src), "--model", "resnet18", "--out", str(ckpt), "--image-size", "72",
                            "--class-names", str(names)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["extract", "--ckpt", str(ckpt), "--data", f"folder:{folder}:train", "--out", str(store),
                            "--save-gw"], capsys)
    assert code == 0, err
    s = extract.load_store(str(store))
    z = np.asarray(s["logits"], np.float64)
    margin = np.sort(z, axis=1)[:, -1] - np.sort(z, axis=1)[:, -2]
    labels = np.asarray(s["labels"])
    confident = (z.argmax(axis=1) == labels) & (margin > 40)
    assert confident.sum() >= 2, (margin, labels)
    ref = np.stack([exact(row, y)[1] for row, y in zip(z, labels)])
    h = np.asarray(s["fm"], np.float64)
    want = np.concatenate([(h[:, :, None] * ref[:, None, :]).reshape(len(h), -1), ref], axis=1)
    got = np.asarray(s["gw"], np.float64)
    err = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    assert err.max() <= 1e-5, err
    c = len(classes)
    rows = np.flatnonzero(confident)
    np.testing.assert_allclose(got[rows, -c + labels[rows]], ref[rows, labels[rows]], rtol=1e-5)
