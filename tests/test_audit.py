"""Label noise, TracIn self-influence and the audit, against independent computations:

* noise injection: deterministic from its seed, exactly the asked fraction, recorded and read back;
* scores: a per-sample `jax.grad` loop over the checkpoints (full parameter tree, fc leaves or a
  small subset flattened by hand; the projection through `projection.projection_matrix`), the loss and
  margin from that loop's logits, the suggested label by trying every class;
* ranking metrics: AUROC by counting pairs, average precision by its definition, recall@k by a loop;
* bad input through the CLI: one line, exit code 2, nothing written.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_one_line_error, make_folder, run_cli
from resnet_jax.metrics import detection
from resnet_jax.jobs import audit, trajectory
from resnet_jax.core import checkpoint, data, models, params, projection
from resnet_jax.training import labels, train
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError

SIZE = 24  # small stem: layer4 maps 3x3


# ----------------------------------------------------------------------------- noise


def test_noise_is_deterministic_exact_and_flips_to_other_classes():
    y = np.random.default_rng(0).integers(0, 10, 500)
    a, fa = labels.inject_noise(y, 10, 0.2, seed=3)
    b, fb = labels.inject_noise(y, 10, 0.2, seed=3)
    c, _ = labels.inject_noise(y, 10, 0.2, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(a, c)
    assert fa.size == 100 and np.all(np.diff(fa) > 0)
    assert np.all(a[fa] != y[fa]) and np.array_equal(np.flatnonzero(a != y), fa)
    assert len(np.unique((a[fa] - y[fa]) % 10)) == 9  # symmetric: every other class occurs
    p, fp = labels.inject_noise(y, 10, 0.2, seed=3, kind="pairs")
    np.testing.assert_array_equal(p[fp], (y[fp] + 1) % 10)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"\[0, 1\)"):
            labels.inject_noise(y, 10, bad)


def test_noise_recorded_read_back_and_batched(tiny_folder):
    ds = data.load(f"folder:{tiny_folder}", image_size=SIZE, default_split="train")
    edits = labels.LabelEdits(noise_rate=0.25, noise_seed=1)
    view, record = labels.apply(ds, edits)
    noisy, flipped = labels.inject_noise(ds.labels, ds.num_classes, 0.25, seed=1)
    np.testing.assert_array_equal(view.labels, noisy)
    assert record["noise"]["ids"] == [ds.ids[i] for i in flipped]
    assert record["noise"]["original"] == np.asarray(ds.labels)[flipped].tolist()
    given, mask, original = labels.given_labels(ds, json.loads(json.dumps(record)))
    np.testing.assert_array_equal(given, noisy)
    np.testing.assert_array_equal(np.flatnonzero(mask), flipped)
    np.testing.assert_array_equal(original, ds.labels)
    by_id = dict(zip(ds.ids, noisy))
    seen = [(i, int(l)) for b in view.batches(4, shuffle=True, seed=2) for i, l in zip(b.ids, b.labels)]
    assert sorted(i for i, _ in seen) == sorted(ds.ids) and all(by_id[i] == l for i, l in seen)
    # the same shuffled order as the unedited data set
    assert [i for b in view.batches(4, shuffle=True, seed=2) for i in b.ids] == \
           [i for b in ds.batches(4, shuffle=True, seed=2) for i in b.ids]
    # removing and relabelling keep the same noise
    gone = tuple(ds.ids[:3])
    view2, record2 = labels.apply(ds, labels.LabelEdits(noise_rate=0.25, noise_seed=1, remove=gone,
                                                        relabel=((ds.ids[5], 2),)))
    assert record2["noise"] == record["noise"] and len(view2) == len(ds) - 3
    assert not set(gone) & set(view2.ids)
    assert view2.take([2]).labels[0] == 2 and view2.ids[2] == ds.ids[5]
    # masking keeps every image (and so every shuffled batch) and names the masked ones
    view3, record3 = labels.apply(ds, labels.LabelEdits(mask=(ds.ids[4], ds.ids[0])))
    assert list(view3.ids) == list(ds.ids) and record3 == {"noise": record3["noise"], "masked": sorted(ds.ids[i] for i in (0, 4))}
    np.testing.assert_array_equal(np.flatnonzero(labels.masked_rows(view3, record3)), [0, 4])
    assert labels.masked_rows(view2, record2) is None
    with pytest.raises(UserError, match="not in"):
        labels.apply(ds, labels.LabelEdits(mask=("nope",)))
    held_out = data.load(f"folder:{tiny_folder}", image_size=SIZE, default_split="test")
    with pytest.raises(UserError, match="held-out split"):
        labels.apply(held_out, edits)


# ----------------------------------------------------------------------------- ranking metrics


def test_detection_metrics_against_definitions():
    rng = np.random.default_rng(0)
    is_error = rng.random(300) < 0.15
    scores = np.round(rng.normal(size=300) + 1.5 * is_error, 1)  # rounded: ties
    row = detection.detection_row(scores, is_error)
    pos, neg = scores[is_error], scores[~is_error]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert row["auroc"] == pytest.approx(pairs / (pos.size * neg.size), abs=1e-12)
    distinct = scores + 1e-6 * rng.random(300)  # no ties: AP = mean precision at each error's rank
    order = np.argsort(-distinct)
    hits = np.cumsum(is_error[order])
    ap = np.mean([hits[r] / (r + 1) for r in range(300) if is_error[order][r]])
    assert detection.detection_row(distinct, is_error)["ap"] == pytest.approx(ap, abs=1e-12)
    for f in (0.05, 0.1, 0.15, 0.2):
        top = sorted(range(300), key=lambda i: (-scores[i], i))[:int(np.ceil(f * 300))]
        assert row[f"recall@{round(100 * f)}%"] == pytest.approx(is_error[top].sum() / is_error.sum())
    with pytest.raises(ValueError, match="NaN"):
        detection.detection_row(np.full(300, np.nan), is_error)


# ----------------------------------------------------------------------------- scores vs a jax.grad loop


@pytest.fixture(scope="module")
def trajectory_case(tiny_folder, tmp_path_factory):
    """Three checkpoints of random weights (3 classes, 24 px, small stem) with learning rates, and 6 images."""
    model = models.create("resnet18", 3, "small")
    ds = data.load(f"folder:{tiny_folder}", image_size=SIZE, default_split="train")
    meta = checkpoint.make_meta("resnet18", 3, ds.class_names, "small", SIZE, "none", data=ds.spec)
    rates = [1e-3, 5e-4, 2e-4]
    out = str(tmp_path_factory.mktemp("traj") / "run")
    history = []
    for step, eta in enumerate(rates, start=1):
        history.append({"epoch": step, "learning_rate": eta, "test_accuracy": None})
        checkpoint.save(out, step, random_variables(model, SIZE, seed=step), dict(meta, history=list(history)),
                        keep=None)
    view = labels.LabelView(ds, np.arange(6), np.asarray([0, 1, 2, 2, 1, 0], np.int32))
    return model, out, rates, view


def _grad_fn(model):
    """jit(grad) of the one-image loss w.r.t. the whole parameter tree, with the logits as aux."""
    def loss(variables, image, label):
        logits, _ = models.apply(model, variables, image[None])
        return -jax.nn.log_softmax(logits[0])[label], logits[0]
    return jax.jit(jax.grad(loss, has_aux=True))


def _loop(grad, variables, images, y, leaves):
    """Per-sample loop: (flat gradients (N, D) over `leaves` in their order, logits (N, C))."""
    rows, logits = [], []
    for image, label in zip(images, y):
        g, z = grad(variables, jnp.asarray(image), int(label))
        flat = []
        for path in leaves:
            leaf = g["params"]
            for part in path.split("/"):
                leaf = leaf[part]
            flat.append(np.asarray(leaf, np.float64).ravel())
        rows.append(np.concatenate(flat))
        logits.append(np.asarray(z, np.float64))
    return np.asarray(rows), np.asarray(logits)


def test_scores_match_a_per_sample_grad_loop(trajectory_case):
    model, out, rates, view = trajectory_case
    traj = trajectory.load(out)
    assert traj.steps == [1, 2, 3] and traj.learning_rate_source == "recorded"
    np.testing.assert_allclose(traj.learning_rates, rates)
    y = view.labels
    subset = "layer4_1/bn2,fc"
    k = 32
    with jax.default_matmul_precision("float32"):
        outputs, _ = trajectory.checkpoint_outputs(traj, view, y, batch_size=4, progress=False)
        projected, _ = trajectory.checkpoint_outputs(traj, view, y, project_params=subset, project_dim=k, seed=5,
                                                     batch_size=4, progress=False)
        got = audit.scores(outputs, traj.learning_rates, y, audit.METHODS, projected)
        images = view.take(np.arange(len(view))).images
        ckpts = [checkpoint.load(out, s) for s in traj.steps]
        lay = params.layout(ckpts[0].variables["params"], subset)
        proj_matrix = projection.projection_matrix(lay, projection.Projection(k, 5)).astype(np.float64)
        fc = [p for p in lay.paths if p.startswith("fc/")]
        grad = _grad_fn(model)
        want_fc, want_proj, margins, losses, per_class = 0, 0, [], None, np.zeros((len(y), 3))
        for eta, ckpt in zip(rates, ckpts):
            g, logits = _loop(grad, ckpt.variables, images, y, list(lay.paths))
            g_fc = g[:, [i for p, s, o in lay.entries if p in fc for i in range(o, o + int(np.prod(s)))]]
            want_fc = want_fc + eta * np.sum(g_fc ** 2, axis=1)
            want_proj = want_proj + eta * np.sum((g @ proj_matrix) ** 2, axis=1)
            rows = np.arange(len(y))
            others = np.where(np.eye(3, dtype=bool)[y], -np.inf, logits)
            margins.append(logits[rows, y] - others.max(axis=1))
            losses = -(logits[rows, y] - np.log(np.exp(logits).sum(axis=1)))
        for c in range(3):  # fc self-influence at the last checkpoint had every image label c
            gc, _ = _loop(grad, ckpts[-1].variables, images, np.full(len(y), c), fc)
            per_class[:, c] = np.sum(gc ** 2, axis=1)
    np.testing.assert_allclose(got["tracin"], want_fc, rtol=1e-4)
    np.testing.assert_allclose(got["tracin-proj"], want_proj, rtol=1e-3)
    np.testing.assert_allclose(got["loss"], losses, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["margin"], -margins[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["aum"], -np.mean(margins, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(audit.suggested_labels(outputs), per_class.argmin(axis=1))
    np.testing.assert_array_equal(audit.suggested_labels(outputs), logits.argmax(axis=1))


# ----------------------------------------------------------------------------- the CLI


def test_masking_needs_the_plain_loss(tiny_folder, tmp_path):
    ds = data.load(f"folder:{tiny_folder}", image_size=SIZE, default_split="train")
    config = train.TrainConfig(data=f"folder:{tiny_folder}", image_size=SIZE, stem="small", epochs=1, batch_size=4,
                               validation_fraction=0.0, grad_align=1.0)
    with pytest.raises(UserError, match="masked images need the plain cross-entropy"):
        train.fit(config, str(tmp_path / "run"), progress=False, label_edits=labels.LabelEdits(mask=(ds.ids[0],)))
    assert not (tmp_path / "run").exists()


def test_train_with_noise_then_audit(tiny_folder, tmp_path, capsys):
    run = str(tmp_path / "noisy")
    code, _, err = run_cli(["train", "--data", f"folder:{tiny_folder}", "--image-size", str(SIZE), "--stem", "small",
                            "--epochs", "2", "--batch-size", "8", "--label-noise", "0.25", "--noise-seed", "2",
                            "--out", run, "--quiet"], capsys)
    assert code == 0, err
    assert checkpoint.steps(run) == [1, 2]  # all kept by default with --label-noise
    meta = checkpoint.load_meta(run)
    ds = data.load(f"folder:{tiny_folder}", image_size=SIZE, default_split="train")
    noisy, flipped = labels.inject_noise(ds.labels, 3, 0.25, seed=2)
    assert meta["label_edits"]["noise"]["ids"] == [ds.ids[i] for i in flipped]
    assert all(h["learning_rate"] > 0 for h in meta["history"])
    out = str(tmp_path / "audit")
    code, stdout, err = run_cli(["audit", "--ckpt", run, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    summary = json.load(open(os.path.join(out, "audit.json")))
    assert [r["method"] for r in summary["detection"]] == list(audit.DEFAULT_METHODS)
    rows = sorted(summary["rows"], key=lambda r: r["index"])
    assert [r["given_label"] for r in rows] == [ds.class_names[c] for c in noisy]
    assert [r["flipped"] for r in rows] == [i in set(flipped) for i in range(len(ds))]
    scores = np.asarray([r["tracin"] for r in rows])
    assert summary["detection"][3]["auroc"] == pytest.approx(
        detection.detection_row(scores, np.isin(np.arange(len(ds)), flipped))["auroc"], abs=1e-9)
    assert [r["rank"] for r in summary["rows"]] == list(range(1, len(ds) + 1))
    assert os.path.getsize(os.path.join(out, "suspects.png")) > 1000
    with open(os.path.join(out, "audit.csv")) as f:
        assert f.readline().strip().split(",")[:5] == ["rank", "index", "id", "given_label", "suggested_label"]
    assert "auroc" in stdout


def test_audit_bad_input(tiny_ckpt, tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "a")
    code, _, err = run_cli(["audit", "--ckpt", tiny_ckpt, "--out", out], capsys)
    assert_one_line_error(code, err, "single checkpoint", "TracIn needs a trajectory", "--method loss,margin")
    assert not os.path.exists(out)
    other = make_folder(tmp_path / "other", classes=("a", "b", "c"), per_class=3)
    code, _, err = run_cli(["audit", "--ckpt", tiny_ckpt, "--method", "loss", "--data", f"folder:{other}",
                            "--out", out], capsys)
    assert_one_line_error(code, err, "differ from the checkpoint's")
    two = make_folder(tmp_path / "two", classes=("circle", "square"), per_class=3)
    code, _, err = run_cli(["audit", "--ckpt", tiny_ckpt, "--method", "loss", "--data", f"folder:{two}",
                            "--out", out], capsys)
    assert_one_line_error(code, err, "2 classes")
    code, _, err = run_cli(["audit", "--ckpt", tiny_ckpt, "--method", "tracin,bogus", "--out", out], capsys)
    assert_one_line_error(code, err, "unknown audit method 'bogus'")
    code, _, err = run_cli(["audit", "--ckpt", tiny_ckpt, "--steps", "7", "--out", out], capsys)
    assert_one_line_error(code, err, "no checkpoint of step 7")
    assert not os.path.exists(out)
    code, _, err = run_cli(["audit", "--ckpt", tiny_ckpt, "--method", "loss,margin", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert json.load(open(os.path.join(out, "audit.json")))["detection"] is None  # no recorded noise


@pytest.mark.parametrize("args, fragment", [
    (["--label-noise", "1.0"], "[0, 1)"),
    (["--label-noise", "-0.2"], "[0, 1)"),
    (["--label-noise", "0.1", "--data", "digits:test"], "held-out split"),
    (["--label-noise", "0.1", "--keep-epochs", "0,x"], "--keep-epochs"),
])
def test_train_bad_noise_options(args, fragment, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, _, err = run_cli(["train", *args, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, err, fragment)
    assert not os.path.exists(out)


def test_bench_against_cleanlab_out_of_sample(tiny_folder, tmp_path):
    """The bench's cleanlab row from K fold models that never saw their fold, recomputed here."""
    from scipy.special import softmax
    from sklearn.model_selection import StratifiedKFold

    from resnet_jax.benchmarks import audit as audit_bench
    from resnet_jax.training import train

    out = str(tmp_path / "bench")
    spec = f"folder:{tiny_folder}"
    result = audit_bench.run(out, data_spec=spec, epochs=2, batch_size=8, image_size=SIZE, stem="small", noise=0.25,
                             folds=2, methods="tracin,loss", retrain=True, fraction=0.2, progress=False,
                             log=lambda s: None)
    ds = data.load_for_checkpoint(spec, checkpoint.load_meta(os.path.join(out, "noisy")), default_split="train")
    given, flipped = labels.inject_noise(ds.labels, 3, 0.25)
    is_error = np.isin(np.arange(len(ds)), flipped)
    probs = np.zeros((len(ds), 3))
    for k, (_, held) in enumerate(StratifiedKFold(2, shuffle=True, random_state=0).split(given, given)):
        run = os.path.join(out, f"fold{k + 1}of2")
        assert sorted(checkpoint.load_meta(run)["label_edits"]["removed"]) == sorted(ds.ids[i] for i in held)
        ckpt = checkpoint.load(run)
        logits = train.make_eval_step(ckpt.model)(ckpt.variables, ds.take(held).images)
        probs[held] = softmax(np.asarray(logits, np.float64), axis=1)
    self_confidence = probs[np.arange(len(ds)), given]
    rows = {r["method"]: r for r in result["detection"]}
    theirs = rows["cleanlab (2-fold, self-confidence)"]
    assert theirs["auroc"] == pytest.approx(detection.detection_row(1 - self_confidence, is_error)["auroc"], abs=1e-6)
    assert theirs["models trained"] == 2 and rows["ours: tracin"]["models trained"] == 1
    ckpt = checkpoint.load(os.path.join(out, "noisy"))  # cleanlab's rule on the noisy run's own probabilities
    own = softmax(np.asarray(train.make_eval_step(ckpt.model)(ckpt.variables, ds.take(np.arange(len(ds))).images), np.float64), axis=1)
    in_sample = rows["cleanlab (in-sample probabilities, self-confidence)"]
    assert in_sample["auroc"] == pytest.approx(
        detection.detection_row(1 - own[np.arange(len(ds)), given], is_error)["auroc"], abs=1e-6)
    assert result["memorised"] == pytest.approx(np.mean(own.argmax(1)[flipped] == given[flipped]))
    assert theirs["auroc_low"] <= theirs["auroc"] <= theirs["auroc_high"]
    assert result["n_flipped"] == flipped.size
    summary = json.load(open(os.path.join(out, "audit", "audit.json")))
    top = {r["id"] for r in summary["rows"][:int(np.ceil(0.2 * len(ds)))]}
    assert set(checkpoint.load_meta(os.path.join(out, "remove-ours"))["label_edits"]["removed"]) == top
    accuracy = {r["run"]: r["held-out accuracy"] for r in result["retrain"]}
    assert list(accuracy) == ["noisy", "cleaned by ours (tracin)", "cleaned by cleanlab", "clean (no noise)"]
    assert all(0 <= a <= 1 for a in accuracy.values())


def test_cli_default_methods_are_the_audit_defaults():
    from resnet_jax.cli import audit as cli_audit

    methods = next(p for p in cli_audit.audit_cmd.params if p.name == "methods")
    assert methods.default == ",".join(audit.DEFAULT_METHODS)


def test_bootstrap_intervals_against_a_loop():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from resnet_jax.benchmarks.audit import bootstrap_intervals

    rng = np.random.default_rng(0)
    err = rng.random(80) < 0.2
    a, b = rng.normal(size=80) + err, rng.normal(size=80)
    got = bootstrap_intervals({"a": a, "b": b}, err, n_boot=200, seed=3)
    draws, boot = np.random.default_rng(3), {"a": [], "b": []}
    aps = {"a": [], "b": []}
    while len(boot["a"]) < 200:
        idx = draws.integers(0, 80, 80)
        if 0 < err[idx].sum() < 80:
            for name, s in (("a", a), ("b", b)):
                boot[name].append(roc_auc_score(err[idx], s[idx]))
                aps[name].append(average_precision_score(err[idx], s[idx]))
    for name in ("a", "b"):
        assert got[name]["auroc_low"] == pytest.approx(np.quantile(boot[name], 0.025))
        assert got[name]["auroc_high"] == pytest.approx(np.quantile(boot[name], 0.975))
        assert got[name]["ap_high"] == pytest.approx(np.quantile(aps[name], 0.975))


def test_audit_grid_resumes_and_aggregates_over_seeds(tiny_folder, tmp_path):
    from resnet_jax.benchmarks import audit_grid

    out, logs = str(tmp_path / "grid"), []
    kwargs = dict(seeds=(0, 1), kinds=("symmetric",), rates=(0.25,), epochs=(2,), folds=2,
                  data_spec=f"folder:{tiny_folder}", methods=("margin", "loss"), batch_size=8, image_size=SIZE,
                  stem="small")
    first = audit_grid.run(out, max_cells=1, log=logs.append, **kwargs)
    assert len(first["cells"]) == 1 and any("run again to resume" in s for s in logs)
    result = audit_grid.run(out, log=logs.append, **kwargs)
    assert [c["seed"] for c in result["cells"]] == [0, 1]
    again = []
    audit_grid.run(out, log=again.append, **kwargs)
    assert again == []  # every cell read back, nothing trained
    (regime,) = result["regimes"]
    aurocs = [c["detection"][0]["auroc"] for c in result["cells"]]
    assert regime["ours: margin AUROC"]["mean"] == pytest.approx(np.mean(aurocs))
    assert regime["ours: margin AUROC"]["std"] == pytest.approx(np.std(aurocs, ddof=1))
    assert regime["seeds"] == 2 and regime["ours vs cleanlab"]
    assert os.path.exists(os.path.join(out, "bench-audit-grid.json"))
