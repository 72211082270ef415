"""explain: TracIn proponents and opponents of test predictions.

Checked against independent computations, on a tiny model trained until it has learned a
constructed mistake (a training copy of one test picture, labelled with another class, makes
the model misclassify that test picture):
* influence scores (raw, cosine, relatif; projected and fc closed form) against a per-sample
  jax.grad loop over the checkpoints, the projection through `projection.projection_matrix`;
* the projected influence against the exact one, its error within what the dimension predicts;
* the running top-K against a full sort, the proponent summary against hand counts;
* the sign convention: the flipped duplicate is THE top proponent of the error it causes;
* the command end to end and its bad input: one line, exit code 2, nothing written;
* the counterfactual bench's removal sets and table against hand counts (no training here).
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from scipy.stats import spearmanr

from helpers import assert_one_line_error, make_folder, per_sample_grads, run_cli
from resnet_jax.metrics.attribution import (RunningTop, proponent_summary, removal_correlation,
                                            removal_correlation_null)
from resnet_jax.benchmarks import audit as audit_bench, explain as explain_bench
from resnet_jax.core import checkpoint, data, models, params, projection
from resnet_jax.jobs import explain, trajectory
from resnet_jax.training import labels
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError
from resnet_jax.core.losses import cross_entropy

SIZE = 24  # small stem: layer4 maps 3x3
STEPS, EVERY, RATE = 30, 10, 1e-3  # full-batch Adam steps, a checkpoint every EVERY steps, its learning rate
SUBSET = "layer4_1/bn2,fc"
K = 64  # projection dimension of the pipeline checks
ODD = "odd.png"  # the constructed picture: test/circle/odd.png, and train/square/odd.png (flipped label)


def _odd_picture(size=SIZE, seed=5):
    """A circle drawn dark on a bright background: unlike every other picture of the folder."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    shape = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < 25
    img = 1.0 - (rng.random((size, size, 3)) * 0.2 + shape[..., None] * 0.8)
    return Image.fromarray((img * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A ResNet-18 (small stem, 24 px) trained on 3 x 5 shapes plus a copy of the test circle odd.png
    labelled square, until it classifies every training image as labelled: STEPS full-batch Adam steps
    in inference mode (BatchNorm on its running statistics, as every analysis runs the model; a few
    steps of batch training leave those statistics unsettled), a checkpoint with its learning rate
    every EVERY steps. Returns (folder, run directory)."""
    root = tmp_path_factory.mktemp("duplicate")
    make_folder(root / "train", per_class=5, seed=0)
    make_folder(root / "test", per_class=2, seed=1)
    for where in ("test/circle", "train/square"):
        _odd_picture().save(root / where / ODD)
    ds = data.load(f"folder:{root}", image_size=SIZE, default_split="train")
    model = models.create("resnet18", ds.num_classes, "small")
    variables = random_variables(model, SIZE, seed=0)
    images, y = jnp.asarray(ds.take(np.arange(len(ds))).images), jnp.asarray(ds.labels)
    tx = optax.adam(RATE)

    @jax.jit
    def step(p, state):
        loss = lambda q: cross_entropy(models.apply(model, {"params": q, "batch_stats": variables["batch_stats"]},
                                                    images)[0], y).mean()
        updates, state = tx.update(jax.grad(loss)(p), state)
        return optax.apply_updates(p, updates), state

    p, state = variables["params"], tx.init(variables["params"])
    meta = checkpoint.make_meta("resnet18", ds.num_classes, ds.class_names, "small", SIZE, "none", data=ds.spec)
    out, history = str(root / "run"), []
    for t in range(1, STEPS + 1):
        p, state = step(p, state)
        if t % EVERY == 0:
            history.append({"epoch": t // EVERY, "learning_rate": RATE})
            checkpoint.save(out, t // EVERY, {"params": p, "batch_stats": variables["batch_stats"]},
                            dict(meta, history=list(history)), keep=None)
    return str(root), out


@pytest.fixture(scope="module")
def outputs(learned):
    """The trajectory, the training and test views (predicted labels), and per checkpoint the fc
    outputs and the SUBSET projections (k = K, seed 3) of both."""
    root, out = learned
    traj = trajectory.load(out)
    train_view, _, test_ds = explain.open_data(out, None, None, traj.meta)
    with jax.default_matmul_precision("float32"):
        test_fwd, _ = trajectory.checkpoint_outputs(traj, test_ds, test_ds.labels, batch_size=8, progress=False)
        pred = np.argmax(test_fwd[-1]["logits"], axis=1).astype(np.int32)
        test_view = labels.LabelView(test_ds, np.arange(len(test_ds)), pred)
        kwargs = {"project_params": SUBSET, "project_dim": K, "seed": 3, "batch_size": 8, "progress": False}
        train_proj, _ = trajectory.checkpoint_outputs(traj, train_view, train_view.labels, **kwargs)
        test_proj, _ = trajectory.checkpoint_outputs(traj, test_view, pred, **kwargs)
    fc = lambda outs: [{"logits": o["logits"], "features": o["features"]} for o in outs]
    return {"traj": traj, "train": train_view, "test": test_view, "pred": pred,
            "fc": (fc(test_proj), fc(train_proj)), "proj": (test_proj, train_proj)}


def _kinds(inner, sq_test, sq_train, rates):
    """raw, cosine and relatif from per-checkpoint inner products (T, M, N) and squared norms."""
    raw = sum(eta * g for eta, g in zip(rates, inner))
    cosine = sum(eta * g / np.sqrt(np.outer(a, b)) for eta, g, a, b in zip(rates, inner, sq_test, sq_train))
    relatif = raw / np.sqrt(sum(eta * b for eta, b in zip(rates, sq_train)))[None]
    return {"raw": raw, "cosine": cosine, "relatif": relatif}


def _fisher(a, b):
    """fisher from the projected test (M, k) and training (N, k) gradients per checkpoint, through the
    eigendecomposition of F = b^T b / N: mean_t a V diag(1 / (w + lambda)) V^T b^T."""
    total = 0.0
    for x, y in zip(a, b):
        w, v = np.linalg.eigh(y.T @ y / len(y))
        lam = explain.FISHER_DAMPING * np.sum(w) / len(w)
        total = total + (x @ v) @ ((v.T @ y.T) / (w + lam)[:, None])
    return total / len(a)


@pytest.fixture(scope="module")
def exact(learned, outputs):
    """Per-sample jax.grad loop over SUBSET at every checkpoint, 5 training and 3 test images (odd.png
    among them): the gradients, and the influences of every kind on fc and through the projection."""
    traj, train_view, test_view = outputs["traj"], outputs["train"], outputs["test"]
    tr = np.r_[np.arange(4), [train_view.ids.index(next(i for i in train_view.ids if i.endswith(ODD)))]]
    te = np.r_[[test_view.ids.index(next(i for i in test_view.ids if i.endswith(ODD)))], [0, 4]]
    ckpts = [checkpoint.load(traj.directory, s) for s in traj.steps]
    lay = params.layout(ckpts[0].variables["params"], SUBSET)
    fc = [i for p, s, o in lay.entries if p.startswith("fc/") for i in range(o, o + int(np.prod(s)))]
    xs, xt = train_view.take(tr).images, test_view.take(te).images
    with jax.default_matmul_precision("float32"):
        gs = [per_sample_grads(c.model, c.variables, xs, train_view.labels[tr], lay.paths) for c in ckpts]
        gt = [per_sample_grads(c.model, c.variables, xt, outputs["pred"][te], lay.paths) for c in ckpts]
    proj = projection.projection_matrix(lay, projection.Projection(K, 3)).astype(np.float64)
    want = {}
    for name, cols in (("fc", lambda g: g[:, fc]), ("proj", lambda g: g @ proj)):
        a, b = [cols(g) for g in gt], [cols(g) for g in gs]
        want[name] = _kinds([x @ y.T for x, y in zip(a, b)], [np.sum(x * x, 1) for x in a],
                            [np.sum(y * y, 1) for y in b], traj.learning_rates)
    want["proj"]["fisher"] = _fisher([g @ proj for g in gt], [g @ proj for g in gs])
    return {"train_rows": tr, "test_rows": te, "gs": gs, "gt": gt, "layout": lay, "want": want}


def _select(outs, rows):
    return [{k: np.asarray(v)[rows] for k, v in o.items()} for o in outs]


def test_influence_matches_a_per_sample_grad_loop(outputs, exact):
    traj, pred = outputs["traj"], outputs["pred"]
    y = outputs["train"].labels[exact["train_rows"]]
    for method in ("fc", "proj"):
        te, tr = outputs[method]
        te, tr = _select(te, exact["test_rows"]), _select(tr, exact["train_rows"])
        for kind, want in exact["want"][method].items():
            got = explain.influence(te, tr, traj.learning_rates, method, pred[exact["test_rows"]], y, kind=kind)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=f"{method} {kind}")
    # chunked top-K over every training image equals a full sort of the same scores
    te, tr = outputs["proj"]
    full = explain.influence(te, tr, traj.learning_rates, "proj", pred, outputs["train"].labels, kind="relatif")
    (pro, pro_s), (opp, _) = explain.top_influences(te, tr, traj.learning_rates, "proj", pred, outputs["train"].labels,
                                                    3, chunk=4, kind="relatif")
    np.testing.assert_array_equal(pro, np.argsort(-full, axis=1, kind="stable")[:, :3])
    np.testing.assert_array_equal(opp, np.argsort(full, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(pro_s, np.take_along_axis(full, pro, 1))
    # fisher: the Gram accumulated over chunks of 4 rows, the scores over chunks of 4, as one full product
    full = explain.influence(te, tr, traj.learning_rates, "proj", pred, outputs["train"].labels, kind="fisher")
    (pro, pro_s), _ = explain.top_influences(te, tr, traj.learning_rates, "proj", pred, outputs["train"].labels, 3,
                                             chunk=4, kind="fisher")
    np.testing.assert_array_equal(pro, np.argsort(-full, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(pro_s, np.take_along_axis(full, pro, 1), rtol=1e-9)


def test_projected_influence_within_what_the_dimension_predicts(outputs, exact):
    """Dense JL: the sd of <Rg, Rg'> - <g, g'> is sqrt((|g|^2 |g'|^2 + <g, g'>^2) / k); the Kronecker
    projection (k1 x k2 blocks) raises the variance of rank-one gradients by up to k1 + k2 (`projection`:
    a squared norm's relative variance (2/k1 + 2/k2) / r against 2/k); the same R at every checkpoint
    correlates their errors, so the sds add (sum_t eta_t sd_t)."""
    rates, lay = outputs["traj"].learning_rates, exact["layout"]
    exact_raw = sum(eta * a @ b.T for eta, a, b in zip(rates, exact["gt"], exact["gs"]))
    k1, k2 = projection.DEFAULT_KRON
    rms = {}
    for k in (256, 1024):
        sd = sum(eta * np.sqrt((np.outer(np.sum(a * a, 1), np.sum(b * b, 1)) + (a @ b.T) ** 2) / k * (k1 + k2))
                 for eta, a, b in zip(rates, exact["gt"], exact["gs"]))
        diff = []
        for seed in range(3):
            proj = projection.projection_matrix(lay, projection.Projection(k, seed)).astype(np.float64)
            diff.append(sum(eta * (a @ proj) @ (b @ proj).T for eta, a, b in zip(rates, exact["gt"], exact["gs"]))
                        - exact_raw)
        assert np.sqrt(np.mean(np.square(np.asarray(diff) / sd))) < 1.0, k  # in units of the predicted sd
        rms[k] = np.sqrt(np.mean(np.square(diff)))
    assert rms[1024] < 0.75 * rms[256]  # predicted: half


def test_checkpoint_digest_follows_the_weights_not_the_path(learned, tmp_path):
    _, run = learned
    shutil.copytree(run, tmp_path / "copy")
    steps = checkpoint.steps(run)
    first, last = checkpoint.load(run, steps[0]), checkpoint.load(run, steps[-1])
    assert checkpoint.digest(checkpoint.load(str(tmp_path / "copy"), steps[-1])) == checkpoint.digest(last)
    assert checkpoint.digest(first) != checkpoint.digest(last)
    params_ = jax.tree.map(np.array, last.variables["params"])
    params_["fc"]["bias"][0] += 1e-6  # one weight moved by 1e-6
    moved = checkpoint.Checkpoint(last.step, {**last.variables, "params": params_}, None, last.meta)
    assert checkpoint.digest(moved) != checkpoint.digest(last)


def test_running_top_and_summary_against_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 37)).round(1)  # ties
    top = RunningTop(5, 4)
    for start in range(0, 37, 10):
        top.add(scores[:, start:start + 10], start)
    np.testing.assert_array_equal(top.largest()[0], np.argsort(-scores, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(top.smallest()[0], np.argsort(scores, axis=1, kind="stable")[:, :4])
    s = proponent_summary(np.asarray([[1, 1], [0, 2]]), np.asarray([1, 2]), np.asarray([0, 1, 1, 2]),
                          np.asarray([[True, False], [False, False]]), np.asarray([[True, False], [False, False]]),
                          np.asarray([True, False, False, False]))
    assert s["carry_predicted_label"] == 0.75 and s["carry_predicted_label_chance"] == (0.5 + 0.25) / 2
    assert s["look_alike"] == 0.25 and s["look_alike_chance"] == 0.5
    assert s["carry_flipped_label"] == 0.25 and s["carry_flipped_label_chance"] == 0.25


def test_the_flipped_duplicate_is_the_top_proponent_of_its_error(outputs):
    """The model has learned the constructed case: the test circle odd.png is predicted square, and
    its training copy labelled square is the largest positive influence on that prediction for every
    kind (fc exact and projected), and not an opponent. For cosine and relatif this follows from
    Cauchy-Schwarz once the copy's gradients equal the test image's (the test-side loss at the
    predicted label); a flipped sign would make the copy the top opponent, a test-side loss at the
    true label would not give it the largest score."""
    traj, train_view, test_view, pred = outputs["traj"], outputs["train"], outputs["test"], outputs["pred"]
    names = traj.meta["class_names"]
    m = next(i for i, image_id in enumerate(test_view.ids) if image_id.endswith(ODD))
    dup = next(j for j, image_id in enumerate(train_view.ids) if image_id.endswith(ODD))
    assert names[pred[m]] == "square" and names[train_view.labels[dup]] == "square"
    for method in ("fc", "proj"):
        te, tr = outputs[method]
        for kind in explain.INFLUENCES:
            args = (_select(te, [m]), tr, traj.learning_rates, method, pred[[m]], train_view.labels, 5)
            if kind == "fisher" and method == "fc":
                with pytest.raises(UserError, match="--method proj"):
                    explain.top_influences(*args, kind=kind)
                continue
            (pro, pro_s), (opp, _) = explain.top_influences(*args, kind=kind)
            assert pro[0, 0] == dup and pro_s[0, 0] > 0 and dup not in opp[0], (method, kind, pro, opp)


def test_error_figures_pad_every_gradcam_call_to_one_shape(learned, tmp_path, monkeypatch):
    """The figures compute Grad-CAM in calls of FIGURE_BATCH images, the last one padded, so that one
    compile serves them all; every figure gets the map of its own image, as one unpadded call gives."""
    from resnet_jax.core import gradcam

    result = explain.explain(learned[1], errors_only=False, top=2, method="fc", progress=False)
    n = result["explained"].size
    ckpt = checkpoint.load(learned[1])
    want = gradcam.gradcam(ckpt.model, ckpt.variables, result["test"].take(result["explained"]).images,
                           result["predicted"])
    shapes, drawn = [], {}
    real = gradcam.gradcam
    monkeypatch.setattr(gradcam, "gradcam", lambda m, v, x, y: shapes.append(x.shape[0]) or real(m, v, x, y))
    monkeypatch.setattr(explain, "_one_figure", lambda res, m, image, cam, path, shown: drawn.setdefault(m, cam))
    monkeypatch.setattr(explain, "FIGURE_BATCH", 3)
    assert n > 3 and n % 3
    explain.error_figures(result, str(tmp_path))
    assert shapes == [3] * -(-n // 3) and sorted(drawn) == list(range(n))
    np.testing.assert_allclose(np.stack([drawn[m] for m in range(n)]), want, atol=1e-5)


def test_each_checkpoint_is_restored_once(learned, tmp_path, monkeypatch):
    """explain and its figures restore every checkpoint of the trajectory once, not T + 1 times."""
    restored = []
    real = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda d, step=None, **kw: restored.append(step) or real(d, step, **kw))
    result = explain.explain(learned[1], errors_only=False, top=2, method="fc", progress=False)
    monkeypatch.setattr(explain, "_one_figure", lambda res, m, image, cam, path, shown: path)
    explain.error_figures(result, str(tmp_path))
    steps = list(result["trajectory"].steps)
    assert len(steps) > 1 and sorted(restored) == sorted(steps)


def test_api_explanation_holds_the_jobs_arrays(learned):
    import resnet_jax as rj

    got = rj.explain(learned[1], errors_only=False, top=2, method="fc", progress=False)
    want = explain.explain(learned[1], errors_only=False, top=2, method="fc", progress=False)
    assert isinstance(got, rj.Explanation) and isinstance(got.proponents, rj.Proponents)
    assert np.array_equal(got.explained, want["explained"]) and np.array_equal(got.predicted, want["predicted"])
    assert np.array_equal(got.proponents.indices, want["proponents"])
    np.testing.assert_allclose(got.proponents.scores, want["proponent_scores"])
    assert got.train_ids == tuple(want["train"].ids) and len(got.test_ids) == got.explained.size
    assert got.steps == tuple(want["trajectory"].steps) and got.method == "fc"


def test_cli_explains_and_refuses_bad_input(learned, tmp_path, capsys):
    root, run = learned
    out = str(tmp_path / "explain")
    base = ["explain", "--ckpt", run, "--method", "fc", "--quiet"]
    code, stdout, err = run_cli(base + ["--top", "3", "--out", out], capsys)
    assert code == 0, err
    summary = json.load(open(os.path.join(out, "explain.json")))
    test_ds = data.load(f"folder:{root}", image_size=SIZE, default_split="test")
    pred = audit_bench.predict_probs(run, test_ds, np.arange(len(test_ds))).argmax(1)
    errors = np.flatnonzero(pred != test_ds.labels)
    assert summary["explained"] == summary["errors"] == errors.size > 0 and summary["influence"] == "relatif"
    assert [it["test_id"] for it in summary["images"]] == [test_ds.ids[i] for i in errors]
    odd = next(it for it in summary["images"] if it["test_id"].endswith(ODD))
    assert odd["proponents"][0]["train_id"].endswith(ODD) and odd["predicted_label"] == "square"
    assert len(open(os.path.join(out, "explain.csv")).read().splitlines()) == 1 + errors.size * 2 * 3
    assert len(os.listdir(os.path.join(out, "figures"))) == errors.size
    assert os.path.isfile(os.path.join(out, "train-store", "store.json")) and not summary["reused_store"]
    # a copy of the run (another path, the same weights) reuses the store: keyed by content
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    code, stdout, err = run_cli(["explain", "--ckpt", copy, "--method", "fc", "--quiet", "--top", "3", "--out", out],
                                capsys)
    again = json.load(open(os.path.join(out, "explain.json")))
    assert code == 0 and again["reused_store"] and again["images"] == summary["images"], err
    # one checkpoint: still works, says so
    code, stdout, err = run_cli(base + ["--steps", str(STEPS // EVERY), "--out", out], capsys)
    assert code == 0 and "single-checkpoint approximation" in stdout, err
    # no errors to explain: the training images the model classifies correctly
    train_ds = data.load(f"folder:{root}", image_size=SIZE, default_split="train")
    right = np.flatnonzero(audit_bench.predict_probs(run, train_ds, np.arange(len(train_ds))).argmax(1)
                           == train_ds.labels)
    clean = tmp_path / "clean"
    for i in right:
        os.makedirs(clean / train_ds.class_names[train_ds.labels[i]], exist_ok=True)
        shutil.copy(os.path.join(root, train_ds.ids[i]), clean / train_ds.class_names[train_ds.labels[i]])
    code, stdout, err = run_cli(base + ["--test", f"folder:{clean}:all", "--out", str(tmp_path / "none")], capsys)
    assert code == 0 and "no errors to explain" in stdout, err
    assert not os.path.exists(tmp_path / "none")
    # bad input
    other = make_folder(tmp_path / "other", classes=("a", "b", "c"), per_class=2)
    code, _, err = run_cli(base + ["--test", f"folder:{other}:all", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "classes", "differ")
    two = make_folder(tmp_path / "two", classes=("circle", "square"), per_class=2)
    code, _, err = run_cli(base + ["--test", f"folder:{two}:all", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "2 classes")
    code, _, err = run_cli(base + ["--top", "1000", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "--top 1000", "training images")
    code, _, err = run_cli(base + ["--influence", "bogus", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "--influence")
    assert not os.path.exists(tmp_path / "x")


def test_bench_removal_sets_and_table_against_hand_counts():
    from resnet_jax.metrics.attribution import spread

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 4)) * 3
    y = rng.integers(0, 4, 50).astype(np.int32)
    pro = np.asarray([[3, 7, 9], [7, 1, 2]])
    result = {"proponents": pro, "train_labels": y, "train_outputs": [{"logits": logits}]}
    sets = explain_bench.removal_sets(result, 2, seed=4)
    np.testing.assert_array_equal(sets["proponents"], [1, 3, 7])
    loss = np.log(np.exp(logits).sum(1)) - logits[np.arange(50), y]
    np.testing.assert_array_equal(sets["high-loss"], np.sort(np.argsort(-loss)[:3]))
    assert sets["random"].size == 3 and np.unique(sets["random"]).size == 3 and sets["reorder"].size == 1
    np.testing.assert_array_equal(sets["random"], explain_bench.removal_sets(result, 2, seed=4)["random"])
    runs = [{"seed": s, "k": 10, "arm": arm, "removed": 5, "errors": 20, "fixed": f, "new_errors": 1, "accuracy": 0.9}
            for s, fixed in enumerate([(8, 4), (6, 2), (10, 3)]) for arm, f in zip(("proponents", "random"), fixed)]
    runs += [{"seed": s, "k": None, "arm": "reorder", "removed": 1, "errors": 20, "fixed": f, "new_errors": 2,
              "accuracy": 0.9} for s, f in enumerate((1, 3, 2))]
    rows = explain_bench.table(runs, spread)
    assert [(r["K"], r["removed"].split()[0]) for r in rows] == [(10, "proponents"), (10, "random"), ("-", "one")]
    assert rows[0]["fixed (mean)"] == 8 and rows[0]["fixed (std)"] == pytest.approx(np.std([8, 6, 10], ddof=1))
    assert rows[0]["x random"] == pytest.approx(8 / 3) and rows[0]["fixed per seed"] == "8 / 6 / 10"
    assert rows[0]["fixed share (mean)"] == pytest.approx(np.mean([8 / 20, 6 / 20, 10 / 20]))
    assert rows[2]["fixed (mean)"] == 2 and rows[2]["x random"] is None
    partial = explain_bench.table([r for r in runs if r["arm"] == "proponents" or r["seed"] == 1], spread)
    assert partial[0]["fixed (mean)"] == 8 and partial[0]["x random"] == pytest.approx(6 / 2)  # seed 1 only
    assert rows[0]["fixed beyond the floor (mean)"] is None  # no fixed_ids recorded
    # Beyond the floor: fixes the same seed's reorder run did not also make, counted by hand.
    ids = {(0, "proponents"): [1, 2, 3], (0, "random"): [3, 4], (0, "reorder"): [3],
           (1, "proponents"): [5, 6], (1, "random"): [5], (1, "reorder"): [7]}
    runs = [dict(r, fixed_ids=ids[r["seed"], r["arm"]]) for r in runs if r["seed"] < 2]
    rows = explain_bench.table(runs, spread)
    assert rows[0]["fixed beyond the floor (mean)"] == pytest.approx(np.mean([2, 2]))  # {1,2} and {5,6}
    assert rows[1]["fixed beyond the floor (mean)"] == pytest.approx(np.mean([1, 1]))  # {4} and {5}
    assert rows[0]["x random beyond the floor"] == pytest.approx(4 / 2)
    assert rows[2]["fixed beyond the floor (mean)"] == 0 and rows[2]["x random beyond the floor"] is None
    # A second kind removes 7 images: compared with the random run of 7 images of its seed, not with that of 5.
    extra = [dict(r, influence="fisher", removed=7, fixed=f, fixed_ids=list(range(f)))
             for r, f in zip([r for r in runs if r["arm"] == "proponents"], (4, 9))]
    extra += [dict(r, influence="fisher", removed=7, fixed=2, fixed_ids=[9, 10])
              for r in runs if r["arm"] == "random" and r["seed"] == 0]
    rows = explain_bench.table(runs + extra, spread)
    fisher = [r for r in rows if r["removed"].endswith("[fisher]")]
    assert [r["removed"] for r in fisher] == ["proponents [fisher]", "random (same count) [fisher]"]
    assert fisher[0]["seeds"] == 2 and fisher[0]["x random"] == pytest.approx(4 / 2)  # seed 1 has no 7-image draw
    assert fisher[0]["fixed beyond the floor (mean)"] == pytest.approx(np.mean([3, 8]))  # {0,1,2}, {0..8} - {7}
    assert fisher[0]["x random beyond the floor"] == pytest.approx(3 / 2)
    assert rows[0]["x random"] == pytest.approx((8 + 6) / (4 + 2))  # the first kind still against its own draws


def test_removal_correlation_against_hand_ranks():
    """Spearman over three retrainings: predicted change = the summed scores of the removed images."""

    scores = np.asarray([[1.0, 2.0, 3.0, -1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -1.0]])
    removals = [[0], [1, 2], [3]]  # predicted for rows 0 and 2: 1, 5, -1 (ranks 2, 3, 1); row 1: constant
    actual = np.asarray([[0.1, 0.5, 0.3], [0.3, 0.4, 0.1], [-0.2, 0.6, 0.2]])  # columns: test images
    out = removal_correlation(scores, removals, actual)
    # row 0: actual ranks 2, 3, 1 -> rho 1; row 2: ranks 3, 1, 2, d = (-1, 2, -1) -> 1 - 6 * 6 / (3 * 8) = -0.5
    np.testing.assert_allclose(out["per_image"], [1.0, np.nan, -0.5])
    assert out["mean"] == pytest.approx(0.25) and out["runs"] == 3
    with pytest.raises(ValueError, match="shape"):
        removal_correlation(scores, removals[:2], actual)
    # against scipy's spearmanr on larger random cases with ties
    rng = np.random.default_rng(0)
    big = rng.integers(0, 4, size=(9, 40)).astype(float)
    runs = [rng.choice(40, 20, replace=False) for _ in range(15)]
    measured = np.round(rng.normal(size=(15, 9)), 1)
    predicted = np.stack([big[:, r].sum(1) for r in runs])
    np.testing.assert_allclose(removal_correlation(big, runs, measured)["per_image"],
                               [spearmanr(predicted[:, m], measured[:, m])[0] for m in range(9)], atol=1e-12)
    changes = {0: list(zip(removals, actual)), 1: list(zip(removals[:2], actual[:2]))}  # seed 1: too few runs
    got = explain_bench.correlations({0: {"raw": scores}, 1: {"raw": scores}}, changes)
    assert got["raw"]["mean"] == pytest.approx(0.25) and list(got["raw"]["per_seed"]) == [0]


def test_removal_correlation_null_of_shuffled_scores():
    """Scores whose removed sums are exactly the measured changes correlate 1; shuffled over the
    training images they correlate about 0, with the spread of a mean of M Spearman correlations
    over R runs (about 1 / sqrt((R - 1) M))."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(30, 50))
    removals = [rng.choice(50, 25, replace=False) for _ in range(12)]
    actual = np.stack([scores[:, r].sum(1) for r in removals])  # (R, M)
    assert removal_correlation(scores, removals, actual)["mean"] == pytest.approx(1.0)
    null = removal_correlation_null(scores, removals, actual, draws=300, seed=1)
    expected_std = 1 / np.sqrt(11 * 30)
    assert null["draws"] == 300 and abs(null["mean"]) < 3 * expected_std / np.sqrt(300) + 0.01
    assert 0.7 * expected_std < null["std"] < 1.3 * expected_std
    assert removal_correlation_null(scores, removals, actual, draws=300, seed=1) == null  # seeded
    got = explain_bench.correlations({0: {"raw": scores}}, {0: list(zip(removals, actual))}, null=True)
    default = removal_correlation_null(scores, removals, actual)
    assert got["raw"]["per_seed"][0] == pytest.approx(default["mean"])
    assert got["raw"]["std"][0] == pytest.approx(default["std"])


@pytest.mark.parametrize("args, fragment", [(["--seeds", "0,x"], "--seeds"), (["--top", "0"], "--top"),
                                            (["--arms", "proponents,bogus"], "unknown arm 'bogus'"),
                                            (["--influence", "relatif,bogus"], "--influence"),
                                            (["--influence", "relatif,relatif"], "--influence"),
                                            (["--influence", "fisher", "--method", "fc"], "--method proj"),
                                            (["--removal", "bogus"], "--removal"), (["--lds", "2"], "--lds")])
def test_bench_explain_bad_options(args, fragment, tmp_path, capsys):
    out = str(tmp_path / "b")
    code, _, err = run_cli(["bench", "explain", *args, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, err, fragment)
    assert not os.path.exists(out)


def test_half_subsets_are_seeded_halves():
    halves = [explain_bench.half_subset(1257, seed, j) for seed in (0, 1) for j in range(3)]
    for h in halves:
        assert h.size == 628 and np.all(np.diff(h) > 0) and h[0] >= 0 and h[-1] < 1257
    assert len({h.tobytes() for h in halves}) == len(halves)  # every seed and j its own draw
    np.testing.assert_array_equal(halves[4], explain_bench.half_subset(1257, 1, 1))
    # over many draws every training image is removed about half the time
    counts = np.bincount(np.concatenate([explain_bench.half_subset(101, 0, j) for j in range(400)]), minlength=101)
    assert abs(counts.mean() / 400 - 50 / 101) < 1e-12 and counts.min() > 150 and counts.max() < 250


def test_cli_influence_choices_are_the_explain_kinds():
    from resnet_jax.cli import bench as cli_bench, explain as cli_explain

    kind = next(p for p in cli_explain.explain_cmd.params if p.name == "kind")
    assert tuple(kind.type.choices) == explain.INFLUENCES and kind.default == explain.INFLUENCES[0]
    removal = next(p for p in cli_bench.bench_explain_cmd.params if p.name == "removal")
    assert tuple(removal.type.choices) == explain_bench.REMOVALS and removal.default == explain_bench.REMOVALS[0]


def test_figure_names_drop_the_image_extension():
    from resnet_jax.jobs.explain import _safe

    assert _safe("cat/x 1.png") + ".png" == "cat_x_1.png"
    assert _safe("digits:test:00007") == "digits_test_00007"
