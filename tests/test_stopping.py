"""Training to a target: the validation slice, the stopping rule, and resuming towards the same target."""
import os

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli


def _colour_folder(root, per_class=24, size=24, seed=0):
    """Writes PATH/{red,blue}/*.png: noise plus a red or a blue tint (separable by mean colour)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red", "blue")):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(per_class):
            img = rng.random((size, size, 3)) * 0.5
            img[..., 0 if c == 0 else 2] += 0.5
            Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(root, name, f"{k:03d}.png"))
    return str(root)


def _original_index(image_id: str) -> int:
    return int(image_id.rsplit(":", 1)[1])


def test_validation_slice_is_stratified_and_disjoint_from_the_held_out_split():
    from resnet_jax.core import data
    from resnet_jax.training import train

    train_set = data.load("digits", default_split="train")
    test_set = data.load("digits", default_split="test")
    train_idx, val_idx = train.validation_split(train_set.labels, 0.1, seed=0)
    assert len(val_idx) == round(0.1 * len(train_set))
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == len(train_set)
    # The same images of sklearn's digits must never be in both the validation slice and the held-out split.
    val_images = {_original_index(train_set.ids[i]) for i in val_idx}
    held_out_images = {_original_index(i) for i in test_set.ids}
    assert val_images.isdisjoint(held_out_images)
    counts = np.bincount(train_set.labels[val_idx], minlength=10)
    expected = 0.1 * np.bincount(train_set.labels, minlength=10)
    assert np.all(np.abs(counts - expected) <= 1)
    np.testing.assert_array_equal(train.validation_split(train_set.labels, 0.1, seed=0)[1], val_idx)


@pytest.mark.parametrize("option, value", [("--target-accuracy", "1.5"), ("--validation-fraction", "1"),
                                           ("--patience", "0"), ("--time-budget", "-5"), ("--max-epochs", "0")])
def test_out_of_range_stopping_options(capsys, tmp_path, option, value):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", "digits", "--out", str(out), "--quiet", option, value], capsys)
    assert_one_line_error(code, err, option)
    assert not out.exists()


def test_stopping_rule_on_histories():
    from resnet_jax.training import train

    config = train.TrainConfig(epochs=6, patience=2, time_budget=100.0)
    history = lambda accs: [{"epoch": i + 1, "validation_accuracy": a, "seconds": 10.0 * (i + 1)}
                            for i, a in enumerate(accs)]
    assert train._stopping(config, history([0.5, 0.96]), 0.95, 20.0, 2)["reason"] == "target"
    assert train._stopping(config, history([0.5, 0.7, 0.6, 0.7]), 0.95, 40.0, 4)["reason"] == "plateau"
    assert train._stopping(config, history([0.5, 0.7, 0.6]), 0.95, 30.0, 3) is None
    assert train._stopping(config, history([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), 0.95, 60.0, 6)["reason"] == "max_epochs"
    # 3 epochs in 60 s: a fourth would end at 80 s, inside 100 s; 4 epochs in 90 s: a fifth would end past it.
    assert train._stopping(config, history([0.1, 0.2, 0.3]), 0.95, 60.0, 3) is None
    assert train._stopping(config, history([0.1, 0.2, 0.3, 0.4]), 0.95, 90.0, 4)["reason"] == "time_budget"


def test_training_stops_at_the_target_and_resumes_after_a_kill(tmp_path):
    """Epoch 1 is one step at learning rate 0 (warm-up), so it cannot reach the target; the run is killed
    during epoch 2, rerun, and must continue from epoch 1's checkpoint to the target, well before the cap."""
    import jax

    from resnet_jax.core import checkpoint, data, models
    from resnet_jax.training import train

    folder = _colour_folder(tmp_path / "colours")
    out = str(tmp_path / "run")
    config = train.TrainConfig(model="resnet18", data=f"folder:{folder}", epochs=40, batch_size=8,
                               images_per_epoch=8, stem="small", image_size=24, target_accuracy=0.9,
                               validation_fraction=0.25, patience=None, augment_shift=0)

    class Killed(Exception):
        pass

    def kill_in_epoch_2(line):
        if " epoch 2/" in line:
            raise Killed

    with pytest.raises(Killed):
        train.fit(config, out, progress=False, log=kill_in_epoch_2, held_out=False)
    assert checkpoint.latest_step(out) == 1
    assert checkpoint.load_meta(out)["stop"] is None

    result = train.fit(config, out, progress=False, log=lambda s: None, held_out=False)
    stop = result["stop"]
    assert stop["reason"] == "target" and stop["target_accuracy"] == 0.9
    assert 2 <= stop["epoch"] < config.epochs
    assert [h["epoch"] for h in result["history"]] == list(range(1, stop["epoch"] + 1))
    meta = checkpoint.load_meta(out)
    assert meta["stop"] == stop and checkpoint.latest_step(out) == stop["epoch"]
    # One optimiser step per epoch, counted across the kill: the resumed run continued, it did not restart.
    tx = train.make_optimizer(config, 1)
    model = models.create("resnet18", 2, "small")
    abstract = jax.eval_shape(tx.init, models.variable_shapes(model, 24)["params"])
    ckpt = checkpoint.load(out, opt_state_target=abstract)
    counts = [int(c) for c in jax.tree_util.tree_leaves(ckpt.opt_state) if c.ndim == 0]
    assert counts and all(c == stop["epoch"] for c in counts)
    # The recorded accuracy is the checkpoint's on the validation slice, a stratified quarter of the
    # training split, recomputed here with a plain forward pass.
    train_set = data.load(f"folder:{folder}", default_split="train", image_size=24)
    val_idx = train.validation_split(train_set.labels, 0.25, seed=0)[1]
    batch = train_set.take(val_idx)
    logits = models.apply(model, ckpt.variables, batch.images)[0]
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == batch.labels))
    assert accuracy == pytest.approx(stop["validation_accuracy"]) and accuracy >= 0.9
    held_out = {i for i in data.load(f"folder:{folder}", default_split="test", image_size=24).ids}
    assert held_out.isdisjoint(batch.ids)
    # A third run finds the stop record and trains nothing.
    again = train.fit(config, out, progress=False, log=lambda s: None, held_out=False)
    assert again["history"] == result["history"] and checkpoint.latest_step(out) == stop["epoch"]


def test_redrawn_digits_keep_glyph_and_label_but_move_and_renoise():
    from resnet_jax.core import data
    from resnet_jax.errors import UserError

    ds = data.load("digits", default_split="train")
    idx = np.arange(12)
    canonical = ds.take(idx)
    np.testing.assert_array_equal(ds.take(idx, redraw=None).images, canonical.images)
    first, again, second = ds.take(idx, redraw=0), ds.take(idx, redraw=0), ds.take(idx, redraw=1)
    np.testing.assert_array_equal(first.images, again.images)  # a version is reproducible
    np.testing.assert_array_equal(first.labels, canonical.labels)
    for version in (first, second):
        assert not np.array_equal(version.images, canonical.images)
        # The same glyph: its pixels (the mask) are as many, only elsewhere or on other noise.
        np.testing.assert_array_equal(version.masks.sum(axis=(1, 2)), canonical.masks.sum(axis=(1, 2)))
    moved = [not np.array_equal(a, b) for a, b in zip(first.masks, canonical.masks)]
    assert sum(moved) >= 10
    with pytest.raises(UserError, match="cannot redraw"):
        data.load(f"folder:{_colour_folder_once()}", default_split="train", image_size=24).take([0], redraw=1)


_FOLDER = {}


def _colour_folder_once():
    import tempfile

    if "path" not in _FOLDER:
        _FOLDER["path"] = _colour_folder(tempfile.mkdtemp(), per_class=4, size=24)
    return _FOLDER["path"]


def test_precise_batch_stats_make_eval_mode_match_the_batch_it_measured():
    """With statistics re-estimated on one batch, eval-mode logits equal train-mode logits on that batch;
    over two batches they are the mean of the two single-batch estimates."""
    import jax

    from resnet_jax.core import models
    from resnet_jax.training import train

    model = models.create("resnet18", 3, "small")
    variables = models.init(model, jax.random.key(0), 24)
    rng = np.random.default_rng(0)
    a, b = (rng.random((8, 24, 24, 3), dtype=np.float32) for _ in range(2))
    stats_a = train.precise_batch_stats(model, variables, [a])
    train_mode = models.apply(model, variables, a, train=True)[0]
    eval_mode = models.apply(model, {"params": variables["params"], "batch_stats": stats_a}, a)[0]
    np.testing.assert_allclose(np.asarray(eval_mode), np.asarray(train_mode), atol=2e-4, rtol=2e-4)
    stats_b = train.precise_batch_stats(model, variables, [b])
    both = train.precise_batch_stats(model, variables, [a, b])
    for x, y, z in zip(*(jax.tree_util.tree_leaves(s) for s in (stats_a, stats_b, both))):
        np.testing.assert_allclose(np.asarray(z), (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-5, atol=1e-6)


def test_reproduce_caps_epochs_on_the_cpu_and_lets_the_target_decide_on_an_accelerator(monkeypatch):
    import jax

    from resnet_jax.paper import reproduce

    assert reproduce.default_epochs() == reproduce.DEFAULT_EPOCHS
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    caps = reproduce.default_epochs()
    assert set(caps) == set(reproduce.DEFAULT_EPOCHS)
    assert all(cap == reproduce.ACCELERATOR_EPOCHS > max(reproduce.DEFAULT_EPOCHS.values()) for cap in caps.values())
