"""The public API (`import resnet_jax as rj`), checked against independent computations: a
per-sample jax.grad loop, the closed form of the fc gradient, torchvision's stored logits, scipy's
log-softmax, numpy inner products and scikit-learn's cosine similarity."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy.special import log_softmax, softmax
from sklearn.metrics.pairwise import cosine_similarity

import resnet_jax as rj
from helpers import per_sample_grads
from resnet_jax import api
from resnet_jax._names import NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
LABELS = np.array([0, 1, 2, 0, 1])


@pytest.fixture(scope="module")
def model():
    return rj.create_model("resnet18", 3, image_size=24, stem="small", seed=1)


def test_all_lists_the_api_and_every_name_is_documented():
    assert rj.__all__ == list(NAMES) == api.__all__
    reference = open(os.path.join(ROOT, "docs", "api.md")).read()
    for name in rj.__all__:
        value = getattr(rj, name)
        assert f"resnet_jax.api.{name}" in reference, f"{name} is missing from docs/api.md"
        if callable(value):
            assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    assert "resnet_jax.api.MODEL_NAMES" in reference
    with pytest.raises(AttributeError):
        rj.no_such_name


def test_import_lists_names_without_jax():
    code = "import sys, resnet_jax as rj; print(len(rj.__all__), 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.split() == [str(len(NAMES)), "False"]


def test_preprocess_accepts_uint8_and_unit_floats_only(model):
    a = model.preprocess(IMAGES)
    b = model.preprocess(IMAGES.astype(np.float32) / 255.0)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    imagenet = rj.Model(model.module, model.variables, "resnet18", model.class_names, 24, "imagenet", "small")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(imagenet.preprocess(IMAGES), (IMAGES / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    for bad in (IMAGES[..., :1], IMAGES.astype(np.float32), IMAGES.astype(np.int64)):
        with pytest.raises(rj.UserError):
            model.preprocess(bad)


def test_fc_gradients_match_the_closed_form(model):
    g = rj.per_example_grads(model, IMAGES, LABELS, batch_size=2)  # three batches, the last one short
    assert g.paths == ("fc/kernel", "fc/bias") and g.gw.shape == (5, 512 * 3 + 3)
    p = softmax(np.asarray(g.logits, np.float64), axis=1)
    delta = p - np.eye(3)[LABELS]
    closed = np.concatenate([(g.features[:, :, None] * delta[:, None, :]).reshape(5, -1), delta], axis=1)
    np.testing.assert_allclose(g.gw, closed, atol=1e-5)
    np.testing.assert_allclose(g.loss, -log_softmax(np.asarray(g.logits, np.float64), axis=1)[np.arange(5), LABELS],
                               rtol=1e-5)
    np.testing.assert_allclose(model.logits(IMAGES), g.logits, atol=1e-4)
    np.testing.assert_allclose(model.features(IMAGES), g.features, atol=1e-4)
    predicted = rj.per_example_grads(model, IMAGES, label_source="predicted")
    assert np.array_equal(predicted.labels, np.argmax(g.logits, axis=1))


def test_subset_gradients_match_a_per_sample_loop(model):
    g = rj.per_example_grads(model, IMAGES, LABELS, params="layer4_1/conv2/kernel")
    x = model.preprocess(IMAGES)
    loop = per_sample_grads(model.module, model.variables, x, LABELS, list(g.paths))
    np.testing.assert_allclose(g.gw, loop, rtol=1e-4, atol=1e-6 * np.abs(loop).max())
    projected = rj.per_example_grads(model, IMAGES, LABELS, params="layer4_1/conv2/kernel", project_dim=64)
    assert projected.gw.shape == (5, 64) and np.isfinite(projected.gw).all()
    # a random projection roughly keeps norms (Johnson-Lindenstrauss): within a factor of 2 here
    ratio = np.linalg.norm(projected.gw, axis=1) / np.linalg.norm(g.gw, axis=1)
    assert np.all((ratio > 0.5) & (ratio < 2.0))


def test_gradient_errors_are_user_errors(model):
    with pytest.raises(rj.UserError, match="labels"):
        rj.per_example_grads(model, IMAGES)
    with pytest.raises(rj.UserError, match="one label per image"):
        rj.per_example_grads(model, IMAGES, LABELS[:3])
    with pytest.raises(rj.UserError, match="no images"):
        rj.per_example_grads(model, IMAGES[:0], LABELS[:0])


def test_gradcam_front_door(model):
    from resnet_jax.core import gradcam

    x = model.preprocess(IMAGES)
    with rj.GradCAM(model, layer="layer3", batch_size=2) as cam:
        maps = cam(IMAGES, LABELS)
    assert maps.shape == (5, 24, 24) and maps.min() >= 0.0 and maps.max() <= 1.0
    np.testing.assert_allclose(maps, gradcam.gradcam(model.module, model.variables, x, LABELS, layer="layer3"),
                               atol=1e-5)
    pp = rj.GradCAMPlusPlus(model, layer="layer3")(IMAGES, LABELS)
    np.testing.assert_allclose(pp, gradcam.gradcam(model.module, model.variables, x, LABELS, layer="layer3",
                                                   method="gradcampp"), atol=1e-5)
    with pytest.raises(rj.UserError):
        rj.GradCAM(model, layer="layer9")
    with pytest.raises(rj.UserError, match="one class per image"):
        rj.GradCAM(model)(IMAGES, LABELS[:2])


def test_label_issues_from_logits():
    logits = RNG.normal(size=(3, 40, 4)) * 3
    labels = RNG.integers(0, 4, 40)
    features = RNG.normal(size=(3, 40, 6))
    got = rj.label_issues(logits, labels, features=features, learning_rates=[0.1, 0.2, 0.3])
    assert got.methods == ("margin", "loss", "aum", "tracin")
    np.testing.assert_allclose(got.scores["loss"], -log_softmax(logits[-1], axis=1)[np.arange(40), labels])
    others = logits.copy()
    others[:, np.arange(40), labels] = -np.inf
    margin = logits[:, np.arange(40), labels] - others.max(axis=2)  # the label's logit minus the best other's
    np.testing.assert_allclose(got.scores["margin"], -margin[-1])
    np.testing.assert_allclose(got.scores["aum"], -margin.mean(0))
    assert np.array_equal(got.ranking, np.argsort(-got.scores["margin"], kind="stable"))
    p = softmax(logits, axis=2)
    # fc self-influence in closed form: ||p - onehot||^2 (||h||^2 + 1), weighted by the rates
    delta = p - np.eye(4)[labels][None]
    tracin = sum(eta * (delta[t] ** 2).sum(1) * ((features[t] ** 2).sum(1) + 1) for t, eta in enumerate([.1, .2, .3]))
    np.testing.assert_allclose(got.scores["tracin"], tracin, rtol=1e-10)
    assert np.array_equal(got.suggested, np.argmax(logits[-1], axis=1))
    one = rj.label_issues(logits[-1], labels)
    assert one.methods == ("margin", "loss")
    with pytest.raises(rj.UserError, match="one label per image"):
        rj.label_issues(logits, labels[:3])
    with pytest.raises(rj.UserError, match="labels must be in"):
        rj.label_issues(logits[-1], labels + 4)


def test_influence_and_top_proponents_from_arrays():
    test = [RNG.normal(size=(4, 7)) for _ in range(2)]
    train = [RNG.normal(size=(30, 7)) for _ in range(2)]
    rates = [0.5, 0.25]
    raw = rj.influence(test, train, learning_rates=rates)
    np.testing.assert_allclose(raw, 0.5 * test[0] @ train[0].T + 0.25 * test[1] @ train[1].T)
    cos = rj.influence(test, train, kind="cosine", learning_rates=rates)
    np.testing.assert_allclose(cos, 0.5 * cosine_similarity(test[0], train[0])
                               + 0.25 * cosine_similarity(test[1], train[1]), atol=1e-12)
    top = rj.top_proponents(test, train, k=5, learning_rates=rates, chunk=7)  # several chunks
    expect = np.argsort(-raw, axis=1, kind="stable")[:, :5]
    assert np.array_equal(top.indices, expect)
    np.testing.assert_allclose(top.scores, np.take_along_axis(raw, expect, 1))
    assert np.array_equal(top.opponents, np.argsort(raw, axis=1, kind="stable")[:, :5])
    single = rj.influence(test[0], train[0])
    np.testing.assert_allclose(single, test[0] @ train[0].T)
    with pytest.raises(rj.UserError, match="columns"):
        rj.influence(test[0], train[0][:, :3])
    with pytest.raises(rj.UserError, match="k must be"):
        rj.top_proponents(test[0], train[0], k=31)


def test_dataset_from_arrays():
    ds = rj.dataset_from_arrays(IMAGES, LABELS, class_names=["a", "b", "c"])
    assert len(ds) == 5 and ds.class_names == ("a", "b", "c") and ds.image_size == 24
    batches = list(ds.batches(2))
    assert [len(b.labels) for b in batches] == [2, 2, 1]
    np.testing.assert_allclose(np.concatenate([b.images for b in batches]), IMAGES / 255.0, atol=1e-7)
    assert np.array_equal(ds.take([4, 0]).labels, LABELS[[4, 0]])
    for args in ((IMAGES[:, :20], LABELS), (IMAGES, LABELS[:2]), (IMAGES, LABELS + 5)):
        with pytest.raises(rj.UserError):
            rj.dataset_from_arrays(*args, class_names=["a", "b", "c"])


def test_cached_dataset_reads_the_same_examples():
    ds = rj.load_data("digits", image_size=24)
    cached = ds.cached()
    assert cached is not ds and len(cached) == len(ds) and cached.ids == ds.ids and cached.spec == ds.spec
    idx = [0, 7, len(ds) - 1]
    a, b = ds.take(idx), cached.take(idx)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert ds.cached(max_bytes=10) is ds


def _generator():
    spec = importlib.util.spec_from_file_location("make_fixture", os.path.join(ROOT, "tests", "fixtures",
                                                                               "make_torchvision_fixture.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_model_from_torchvision_weights_matches_torchvision(tmp_path):
    from safetensors.numpy import save_file

    gen = _generator()
    fixture = np.load(gen.FIXTURE)
    keys = [(k, tuple(s)) for k, s in json.loads(str(fixture["resnet18_keys"]))]
    path = str(tmp_path / "resnet18.safetensors")
    save_file(gen.make_state_dict(keys), path)
    model = rj.load_model(path)
    assert (model.name, model.num_classes, model.normalization) == ("resnet18", 1000, "imagenet")
    images = gen.make_images().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    with jax.default_matmul_precision("highest"):
        ours = model.logits(images, preprocess=False)
    ref = fixture["resnet18"]
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-4
    with pytest.raises(rj.UserError, match="class names"):
        rj.load_model(path, class_names=["a", "b"])
    with pytest.raises(rj.UserError, match="no such file"):
        rj.load_model(str(tmp_path / "missing.pth"))


def test_load_model_from_a_checkpoint(tiny_ckpt):
    model = rj.load_model(tiny_ckpt)
    assert model.name == "resnet18" and model.stem == "small" and model.num_classes == 3
    g = rj.per_example_grads(model, IMAGES, LABELS)
    assert g.gw.shape == (5, 512 * 3 + 3) and np.isfinite(g.gw).all()


def test_error_scores_from_arrays():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    logits, features = rng.normal(size=(40, 3)) * 3, np.abs(rng.normal(size=(40, 4)))
    labels = rng.integers(0, 3, 40)
    tr_f, tr_z, tr_y = np.abs(rng.normal(size=(30, 4))), rng.normal(size=(30, 3)), np.arange(30) % 3
    got = rj.error_scores(logits, features, train_features=tr_f, train_logits=tr_z, train_labels=tr_y,
                          labels=labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(got.scores["msp"], -p.max(1))
    assert {"fm_mahalanobis", "fm_knn", "grad_norm_pred_fc", "grad_dir_pred_fc"} <= set(got.scores)
    wrong = logits.argmax(1) != labels
    rows = {r["key"]: r for r in got.table}
    assert rows["entropy"]["auroc"] == pytest.approx(roc_auc_score(wrong, got.scores["entropy"]))
    only = rj.error_scores(logits)
    assert set(only.scores) == {"msp", "margin", "entropy"} and only.table is None
    with pytest.raises(rj.UserError, match="together"):
        rj.error_scores(logits, features, train_features=tr_f)
