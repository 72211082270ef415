"""Mixed precision (bf16 compute, float32 parameters) against float32 references."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from helpers import run_cli
from resnet_jax.benchmarks import precision as precision_bench
from resnet_jax.core import checkpoint, gradcam, grads, models, precision
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError

C, SIZE, B = 6, 72, 4
MODEL = models.create("resnet18", C)
VARIABLES = random_variables(MODEL, SIZE)
IMAGES = np.random.default_rng(2).normal(size=(B, SIZE, SIZE, 3)).astype(np.float32)
LABELS = np.array([0, 2, 4, 5], np.int32)


def test_bf16_computes_in_bfloat16_with_float32_parameters():
    net = precision.with_precision(MODEL, "bf16")
    assert precision.with_precision(MODEL, "fp32") is MODEL and net.dtype == jnp.bfloat16
    shapes = models.variable_shapes(net, SIZE)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
    logits, inter = jax.eval_shape(lambda v, x: models.apply(net, v, x), VARIABLES, IMAGES)
    assert logits.dtype == jnp.float32 and inter["pooled"].dtype == jnp.float32
    assert inter["layer3"].dtype == jnp.bfloat16
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        precision.check("fp16")


def test_bf16_fc_gradients_against_the_float32_closed_form():
    with jax.default_matmul_precision("float32"):
        ref_logits, inter = models.apply(MODEL, VARIABLES, IMAGES)
    h = np.asarray(inter["pooled"], np.float64)
    z = np.asarray(ref_logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = p - np.eye(C)[LABELS]
    want = np.concatenate([(h[:, :, None] * delta[:, None, :]).reshape(B, -1), delta], axis=1)
    got = grads.compute(precision.with_precision(MODEL, "bf16"), VARIABLES, IMAGES, LABELS, params="fc")["gw"]
    assert got.dtype == np.float32
    cos = np.diag(cosine_similarity(got, want))
    assert cos.min() > 0.99, cos
    assert np.abs(got - want).max() > 1e-6  # bf16 was in fact used (fp32 agrees to about 1e-7)


def test_accuracy_report_against_independent_cosines():
    report = precision_bench.accuracy(MODEL, VARIABLES, IMAGES, LABELS, project_dim=64)
    fc32 = grads.compute(MODEL, VARIABLES, IMAGES, LABELS, params="fc")["gw"]
    fc16 = grads.compute(precision.with_precision(MODEL, "bf16"), VARIABLES, IMAGES, LABELS, params="fc")["gw"]
    want = np.diag(cosine_similarity(fc32.astype(np.float64), fc16.astype(np.float64)))
    assert report["fc_cosine"]["mean"] == pytest.approx(want.mean(), abs=1e-9)
    assert report["fc_cosine"]["min"] == pytest.approx(want.min(), abs=1e-9)
    assert report["n"] == B and 0.95 < report["projected_all_cosine"]["mean"] <= 1.0 + 1e-9
    assert -1 <= report["gradcam_cc"]["min"] <= report["gradcam_cc"]["mean"] <= 1
    np.testing.assert_allclose(precision_bench.row_cosines(np.zeros((1, 3)), np.zeros((1, 3))), [1.0])


def test_bf16_gradcam_close_to_fp32():
    cam32 = gradcam.gradcam(MODEL, VARIABLES, IMAGES, LABELS)
    cam16 = gradcam.gradcam(precision.with_precision(MODEL, "bf16"), VARIABLES, IMAGES, LABELS)
    assert cam16.dtype == np.float32 and cam16.shape == cam32.shape
    zero = cam32.reshape(B, -1).max(1) == 0  # degenerate maps (all zero): no correlation to take
    np.testing.assert_array_equal(zero, cam16.reshape(B, -1).max(1) == 0)
    assert (~zero).sum() >= 2
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(cam32[~zero], cam16[~zero])]
    assert min(cc) > 0.9, cc


def test_cli_train_extract_gradcam_with_bf16(tiny_folder, tmp_path, capsys):
    """`--precision bf16` end to end: float32 checkpoint, precision recorded, results near fp32."""
    ckpt = str(tmp_path / "ck")
    code, out, err = run_cli(["train", "--model", "resnet18", "--data", f"folder:{tiny_folder}", "--epochs", "1",
                              "--batch-size", "8", "--stem", "small", "--image-size", "24", "--precision", "bf16",
                              "--out", ckpt, "--quiet"], capsys)
    assert code == 0, err
    loaded = checkpoint.load(ckpt)
    assert loaded.meta["precision"] == "bf16" and "precision" not in loaded.meta["train_config"]
    assert {np.asarray(v).dtype for v in jax.tree_util.tree_leaves(loaded.variables)} == {np.dtype(np.float32)}
    stores = {}
    for prec in ("fp32", "bf16"):
        out_dir = str(tmp_path / f"store-{prec}")
        code, _, err = run_cli(["extract", "--ckpt", ckpt, "--data", f"folder:{tiny_folder}", "--out", out_dir,
                                "--precision", prec, "--save-gw", "--quiet"], capsys)
        assert code == 0, err
        with open(os.path.join(out_dir, "manifest.json")) as f:
            assert json.load(f)["run"]["precision"] == prec
        stores[prec] = np.load(os.path.join(out_dir, "gw.npy"))
    a, b = stores["fp32"].astype(np.float64), stores["bf16"].astype(np.float64)
    zero = np.linalg.norm(a, axis=1) == 0  # saturated softmax: no gradient in either precision
    np.testing.assert_array_equal(zero, np.linalg.norm(b, axis=1) == 0)
    assert (~zero).sum() >= 2
    assert np.diag(cosine_similarity(a[~zero], b[~zero])).min() > 0.99 and not np.array_equal(a, b)
    cams = str(tmp_path / "cams")
    code, out, err = run_cli(["gradcam", "--ckpt", ckpt, "--data", f"folder:{tiny_folder}", "--out", cams,
                              "--precision", "bf16", "--quiet"], capsys)
    assert code == 0, err
    with open(os.path.join(cams, "metrics.json")) as f:
        assert json.load(f)["precision"] == "bf16"
    code, _, err = run_cli(["extract", "--ckpt", ckpt, "--out", str(tmp_path / "x"), "--precision", "fp8"], capsys)
    assert code == 2 and "fp8" in err
