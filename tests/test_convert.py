"""torchvision -> resnet-jax conversion: logit parity with torchvision (no torch needed) and errors.

Parity: `fixtures/torchvision_logits.npz` holds torchvision's eval-mode logits for weights and
images drawn from a fixed seed (see `fixtures/make_torchvision_fixture.py`). Here the same
weights are regenerated with numpy, written as .safetensors, converted and run through our model
in float32 with highest matmul precision. The check is max |ours - torchvision| / max |torchvision|
<= 1e-4 (the error relative to the largest logit, not elementwise).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from resnet_jax.core import checkpoint, weights as convert, models
from resnet_jax.errors import UserError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOLERANCE = 1e-4


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_torchvision_fixture", os.path.join(FIXTURES, "make_torchvision_fixture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def reference():
    with np.load(gen.FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", gen.MODELS)
def test_keys_match_torchvision(reference, name):
    want = [(k, tuple(s)) for k, s in json.loads(str(reference[f"{name}_keys"]))]
    assert convert.torchvision_keys(name, gen.NUM_CLASSES) == want


@pytest.mark.parametrize("name", gen.MODELS)
@pytest.mark.device
def test_logits_match_torchvision(reference, name, tmp_path):
    keys = convert.torchvision_keys(name, gen.NUM_CLASSES)
    state = gen.make_state_dict(keys, int(reference["seed"]))
    images = gen.make_images(int(reference["seed"]), int(reference["batch"]), int(reference["image_size"]))
    np.testing.assert_allclose(gen.checksums(state, [k for k, _ in keys]), reference[f"{name}_checksums"],
                               rtol=1e-6, atol=1e-6, err_msg="numpy's RNG changed: rerun make_torchvision_fixture.py")
    np.testing.assert_allclose(np.sum(images, dtype=np.float64), reference["images_checksum"], rtol=1e-9,
                               err_msg="numpy's RNG changed: rerun make_torchvision_fixture.py")
    src = tmp_path / f"{name}.safetensors"
    save_file(state, str(src))
    del state
    out = tmp_path / "ckpt"
    meta = convert.convert(str(src), name, str(out), image_size=int(reference["image_size"]))
    assert meta["source_format"] == "safetensors" and meta["source"] == str(src)
    assert meta["num_classes"] == gen.NUM_CLASSES and meta["class_names"][:2] == ["class_0", "class_1"]

    ckpt = checkpoint.load(str(out), expect={"model": name})
    assert ckpt.meta["normalization"] == "imagenet" and ckpt.step == 0
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(lambda v, x: models.apply(ckpt.model, v, x))(
            ckpt.variables, images.transpose(0, 2, 3, 1))
    logits = np.asarray(logits)
    want = reference[name]
    assert logits.dtype == np.float32 and logits.shape == want.shape
    assert np.all(np.isfinite(logits))
    err = float(np.max(np.abs(logits - want)) / np.max(np.abs(want)))
    print(f"{name}: max |logit| {np.max(np.abs(want)):.3g}, max relative error {err:.2e}")
    assert err <= TOLERANCE, f"{name}: max relative logit error {err:.2e} > {TOLERANCE}"


# ---- errors -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def r18_state():
    """A well-formed resnet18 state_dict (small random values; the shapes are what matter)."""
    return {k: np.full(s, 0.5, np.float32) if s else np.array(0, np.int64)
            for k, s in convert.torchvision_keys("resnet18")}


def test_from_state_dict_layout(r18_state):
    state = dict(r18_state)
    rng = np.random.default_rng(0)
    state["conv1.weight"] = rng.normal(size=(64, 3, 7, 7)).astype(np.float32)
    state["fc.weight"] = rng.normal(size=(1000, 512)).astype(np.float32)
    state["layer2.0.downsample.1.running_var"] = np.arange(128, dtype=np.float32)
    v = convert.from_state_dict(state, "resnet18")
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(v["batch_stats"]["layer2_0"]["downsample_bn"]["var"], np.arange(128))
    assert v["params"]["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert set(v["params"]["bn1"]) == {"scale", "bias"} and set(v["batch_stats"]["bn1"]) == {"mean", "var"}
    want = models.variable_shapes(models.create("resnet18"), 64)
    checkpoint.check_tree(v, want, "converted")
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(v))


def test_optional_num_batches_tracked_and_dataparallel_prefix(r18_state):
    state = {f"module.{k}": v for k, v in r18_state.items() if not k.endswith("num_batches_tracked")}
    v = convert.from_state_dict(state, "resnet18")
    assert v["params"]["fc"]["kernel"].shape == (512, 1000)


def test_num_classes_inferred(r18_state):
    state = dict(r18_state, **{"fc.weight": np.zeros((10, 512), np.float32), "fc.bias": np.zeros(10, np.float32)})
    assert convert.from_state_dict(state, "resnet18")["params"]["fc"]["kernel"].shape == (512, 10)
    with pytest.raises(UserError, match=r"fc\.weight has shape \(10, 512\).*\(1000, 512\)"):
        convert.from_state_dict(state, "resnet18", num_classes=1000)


def test_missing_key(r18_state):
    state = dict(r18_state)
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(UserError, match=r"layer3\.1\.bn2\.running_var"):
        convert.from_state_dict(state, "resnet18")


def test_extra_key(r18_state):
    state = dict(r18_state, **{"layer1.0.conv9.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(UserError, match=r"unexpected weight layer1\.0\.conv9\.weight"):
        convert.from_state_dict(state, "resnet18")


def test_shape_mismatch(r18_state):
    state = dict(r18_state, **{"layer2.1.conv1.weight": np.zeros((128, 128, 1, 1), np.float32)})
    with pytest.raises(UserError, match=r"layer2\.1\.conv1\.weight has shape \(128, 128, 1, 1\).*\(128, 128, 3, 3\)"):
        convert.from_state_dict(state, "resnet18")


def test_wrong_model_is_named(r18_state):
    with pytest.raises(UserError, match=r"look like resnet18, not resnet34"):
        convert.from_state_dict(r18_state, "resnet34")


def test_unknown_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"weights\.npz.*\.safetensors"):
        convert.read_weights(str(path))


def test_unreadable_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"broken\.safetensors"):
        convert.read_weights(str(path))
    with pytest.raises(UserError, match=r"absent\.safetensors does not exist"):
        convert.read_weights(str(tmp_path / "absent.safetensors"))


def test_pth_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "resnet18.pth"
    path.write_bytes(b"\x80\x02}q\x00.")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'resnet-jax\[torch\]'.*\.safetensors"):
        convert.read_weights(str(path))


def test_pth_with_torch(tmp_path, r18_state):
    torch = pytest.importorskip("torch")
    path = tmp_path / "resnet18.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in r18_state.items()}}, path)
    state = convert.read_weights(str(path))
    assert convert.from_state_dict(state, "resnet18")["params"]["fc"]["bias"].shape == (1000,)


def test_out_dir_with_checkpoint(tmp_path, r18_state):
    src = tmp_path / "r18.safetensors"
    save_file(r18_state, str(src))
    out = tmp_path / "ckpt"
    convert.convert(str(src), "resnet18", str(out), image_size=64)
    with pytest.raises(UserError, match=r"already holds a checkpoint.*overwrite"):
        convert.convert(str(src), "resnet18", str(out), image_size=64)
    names = [f"c{i}" for i in range(1000)]
    convert.convert(str(src), "resnet18", str(out), image_size=64, class_names=names, overwrite=True)
    assert checkpoint.load_meta(str(out))["class_names"] == names
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "r18.safetensors"]  # no temporary directories left


def test_failure_writes_nothing(tmp_path, r18_state):
    state = dict(r18_state)
    del state["fc.bias"]
    src = tmp_path / "bad.safetensors"
    save_file(state, str(src))
    with pytest.raises(UserError, match=r"fc\.bias"):
        convert.convert(str(src), "resnet18", str(tmp_path / "ckpt"))
    with pytest.raises(UserError, match=r"2 class names"):
        save_file(r18_state, str(src))
        convert.convert(str(src), "resnet18", str(tmp_path / "ckpt"), class_names=["a", "b"])
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
