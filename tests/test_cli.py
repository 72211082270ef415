"""The command line: bad input gives one line and exit code 2; the commands compose end to end."""
import json
import os

import numpy as np
import pytest

from helpers import assert_one_line_error, make_folder, run_cli


def test_models_prints_parameter_counts(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    for count in ("11,689,512", "21,797,672", "25,557,032", "44,549,160", "60,192,808"):
        assert count in out


def test_unknown_model(capsys, tmp_path):
    code, _, err = run_cli(["train", "--model", "resnet19", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "unknown model 'resnet19'", "resnet50")
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(["extract", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "s")], capsys)
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "s").exists()


def test_empty_folder_and_class_without_images(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["train", "--data", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err)
    root = make_folder(tmp_path / "data", per_class=2)
    os.makedirs(os.path.join(root, "zebra"))
    code, _, err = run_cli(["train", "--data", f"folder:{root}", "--image-size", "24", "--out",
                            str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "zebra")
    assert not (tmp_path / "o").exists()


def test_corrupt_image(capsys, tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    with open(os.path.join(root, "circle", "001.png"), "wb") as f:
        f.write(b"not a png")
    code, _, err = run_cli(["train", "--data", f"folder:{root}", "--image-size", "24", "--stem", "small",
                            "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert_one_line_error(code, err, "001.png")
    assert not (tmp_path / "o").exists()


def test_unknown_tfds_dataset(capsys, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    code, _, err = run_cli(["train", "--data", "tfds:no_such_dataset_xyz", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "no_such_dataset_xyz")


def test_checkpoint_of_another_class_count(capsys, tiny_ckpt, tmp_path):
    code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", "digits", "--out", str(tmp_path / "s")],
                           capsys)
    assert_one_line_error(code, err, "10 classes", "3")
    assert not (tmp_path / "s").exists()


def test_grad_params_matching_nothing(capsys, tiny_ckpt, tiny_folder, tmp_path):
    code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", f"folder:{tiny_folder}:test", "--out",
                            str(tmp_path / "s"), "--grad-params", "nothing_here*"], capsys)
    assert_one_line_error(code, err, "nothing_here")


def test_train_info_extract_gradcam_similarity(capsys, tiny_ckpt, tiny_folder, tmp_path):
    code, out, _ = run_cli(["info", tiny_ckpt], capsys)
    assert code == 0 and "resnet18" in out and "circle" in out
    spec = f"folder:{tiny_folder}:all"
    store = str(tmp_path / "store")
    code, out, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", spec, "--out", store, "--batch-size", "8",
                              "--save-gw", "--quiet"], capsys)
    assert code == 0, err
    gw = np.load(os.path.join(store, "gw.npy"))
    fm = np.load(os.path.join(store, "fm.npy"))
    assert gw.shape == (30, 512 * 3 + 3) and fm.shape == (30, 512)
    cams = str(tmp_path / "cams")
    code, out, err = run_cli(["gradcam", "--ckpt", tiny_ckpt, "--data", spec, "--out", cams, "--quiet"], capsys)
    assert code == 0, err
    assert np.load(os.path.join(cams, "cams.npy")).shape == (30, 24, 24)
    assert os.path.getsize(os.path.join(cams, "overlays.png")) > 1000
    code, out, err = run_cli(["similarity", store, "--cams", cams, "--out", str(tmp_path / "t1")], capsys)
    assert code == 0, err
    assert "Cos_Sim_GW" in out and "Grad_Cam_SSIM" in out and "resnet18" in out
    rows = json.load(open(tmp_path / "t1" / "table1.json"))["rows"]
    # Cos_Sim_P against a direct brute-force computation from the store.
    p = np.load(os.path.join(store, "p.npy")).astype(np.float64)
    labels = np.load(os.path.join(store, "labels.npy"))
    u = p / np.linalg.norm(p, axis=1, keepdims=True)
    sims = u @ u.T
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    assert rows[0]["Cos_Sim_P"] == pytest.approx(sims[same].mean(), rel=1e-5)
    # Cos_Sim_GW (Kronecker identity) against explicit fc gradients [h (x) delta, delta] built in float64,
    # which in turn match the extracted float32 rows.
    logits = np.load(os.path.join(store, "logits.npy")).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    delta = e / e.sum(axis=1, keepdims=True) - np.eye(3)[labels]
    g = np.concatenate([np.einsum("nd,nc->ndc", fm.astype(np.float64), delta).reshape(30, -1), delta], axis=1)
    np.testing.assert_allclose(gw, g, atol=1e-4 * np.abs(g).max())
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    assert rows[0]["Cos_Sim_GW"] == pytest.approx((g @ g.T)[same].mean(), rel=1e-5)
    # Mismatched stores and maps are refused.
    code, _, err = run_cli(["similarity", store, "--cams", cams, "--cams", cams], capsys)
    assert_one_line_error(code, err, "one per store")


def cos_sim_gw_closed_form(store, gradient_labels):
    """(intra, inter): mean same-class and different-class cosine of the explicit fc gradients
    [h (x) delta, delta], delta = softmax - onehot(gradient_labels), built in float64 from the store's
    rows and compared pair by pair."""
    fm = np.load(os.path.join(store, "fm.npy")).astype(np.float64)
    logits = np.load(os.path.join(store, "logits.npy")).astype(np.float64)
    labels = np.load(os.path.join(store, "labels.npy"))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    delta = e / e.sum(axis=1, keepdims=True) - np.eye(logits.shape[1])[gradient_labels]
    g = np.concatenate([np.einsum("nd,nc->ndc", fm, delta).reshape(len(fm), -1), delta], axis=1)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cos = g @ g.T
    same = labels[:, None] == labels[None]
    return cos[same & ~np.eye(len(labels), dtype=bool)].mean(), cos[~same].mean()


def test_similarity_honours_the_predicted_label_source(capsys, tiny_ckpt, tiny_folder, tmp_path):
    spec = f"folder:{tiny_folder}:all"
    store = str(tmp_path / "pred")
    code, _, err = run_cli(["extract", "--ckpt", tiny_ckpt, "--data", spec, "--out", store, "--label-source",
                            "predicted", "--quiet"], capsys)
    assert code == 0, err
    assert not os.path.exists(os.path.join(store, "gw.npy"))  # fc without projection: kept as factors
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    assert manifest["gw"] == "factors" and manifest["run"]["label_source"] == "predicted"
    code, _, err = run_cli(["similarity", store, "--out", str(tmp_path / "t1")], capsys)
    assert code == 0, err
    row = json.load(open(tmp_path / "t1" / "table1.json"))["rows"][0]
    labels, preds = (np.load(os.path.join(store, f"{a}.npy")) for a in ("labels", "preds"))
    intra, inter = cos_sim_gw_closed_form(store, preds)
    assert row["Cos_Sim_GW"] == pytest.approx(intra, rel=1e-5) and row["Inter_GW"] == pytest.approx(inter, rel=1e-5)
    # This barely trained model predicts one class for every image: only the true labels tell the
    # classes' gradients apart (the inter-class means differ; same-class pairs share a label either way).
    assert (labels != preds).any()
    assert abs(cos_sim_gw_closed_form(store, labels)[1] - inter) > 0.1


def test_train_resumes_and_refuses_other_runs(capsys, tiny_folder, tmp_path):
    from resnet_jax.core import checkpoint

    out = str(tmp_path / "run")
    args = ["train", "--data", f"folder:{tiny_folder}", "--image-size", "24", "--stem", "small", "--batch-size",
            "8", "--out", out, "--quiet"]
    code, _, err = run_cli(args + ["--epochs", "1"], capsys)
    assert code == 0, err
    assert checkpoint.latest_step(out) == 1
    code, _, err = run_cli(args + ["--epochs", "1", "--model", "resnet34"], capsys)
    assert_one_line_error(code, err, "resnet34")


def test_images_per_epoch_limits_the_steps(capsys, tiny_folder, tmp_path):
    """Two epochs of one 8-image batch each: the optimiser's step counters read 2 (a full epoch of
    the ~24 training images would be 3 steps)."""
    import jax

    from resnet_jax.core import checkpoint, models
    from resnet_jax.training import train

    out = str(tmp_path / "run")
    args = ["train", "--data", f"folder:{tiny_folder}", "--image-size", "24", "--stem", "small", "--batch-size",
            "8", "--quiet", "--epochs", "2"]
    code, _, err = run_cli(args + ["--out", out, "--images-per-epoch", "8"], capsys)
    assert code == 0, err
    tx = train.make_optimizer(train.TrainConfig(), 1)
    abstract = jax.eval_shape(tx.init, models.variable_shapes(models.create("resnet18", 3, "small"), 24)["params"])
    counts = [int(c) for c in jax.tree_util.tree_leaves(checkpoint.load(out, opt_state_target=abstract).opt_state)
              if c.ndim == 0]
    assert counts and all(c == 2 for c in counts)
    code, _, err = run_cli(args + ["--out", str(tmp_path / "small"), "--images-per-epoch", "4"], capsys)
    assert_one_line_error(code, err, "--images-per-epoch")
    assert not (tmp_path / "small").exists()


def test_curvature_reports_both_groups(capsys, tiny_ckpt, tiny_folder, tmp_path):
    out = str(tmp_path / "curv")
    code, text, err = run_cli(["curvature", "--ckpt", tiny_ckpt, "--data", f"folder:{tiny_folder}:all",
                               "--limit", "12", "--iterations", "5", "--probes", "4", "--out", out], capsys)
    assert code == 0, err
    report = json.load(open(os.path.join(out, "curvature.json")))
    groups = report["groups"]
    assert groups["correct"]["count"] + groups["misclassified"]["count"] == 12
    assert "correct" in text and "misclassified" in text
    smaller = min(groups["correct"]["count"], groups["misclassified"]["count"])
    eq = report["equal_size"]  # five equal-size draws by default
    assert (eq is None) == (smaller == 0)
    assert eq is None or (eq["size"] == smaller and len(eq["correct"]["top_eigenvalues"]) == 5
                          and f"{smaller}-image subsamples" in text and "compare the groups at equal size" in text)
    code, _, err = run_cli(["curvature", "--ckpt", tiny_ckpt, "--data", f"folder:{tiny_folder}:all", "--limit",
                            "0"], capsys)
    assert_one_line_error(code, err, "--limit")


def test_aligned_training_runs_and_logs_its_terms(capsys, tiny_folder, tmp_path):
    out = str(tmp_path / "aligned")
    code, text, err = run_cli(["train", "--data", f"folder:{tiny_folder}", "--image-size", "24", "--stem", "small",
                               "--batch-size", "8", "--epochs", "1", "--learning-rate", "1e-4", "--grad-align", "0.5",
                               "--grad-mi", "0.1",
                               "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "l_grad" in text and "l_mi" in text
    code, _, err = run_cli(["train", "--data", f"folder:{tiny_folder}", "--grad-align", "-1", "--out",
                            str(tmp_path / "neg")], capsys)
    assert_one_line_error(code, err, "--grad-align")
    assert not (tmp_path / "neg").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--coordinator", "127.0.0.1:1234"], "only with --distributed"),
    (["--num-processes", "2", "--process-id", "0"], "--num-processes, --process-id take effect only"),
    (["--distributed", "--coordinator", "notahost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--distributed", "--coordinator", "host:99999", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
])
def test_extract_process_options_checked_up_front(args, fragment, tmp_path, capsys):
    out = tmp_path / "store"
    code, _, err = run_cli(["extract", "--ckpt", str(tmp_path / "none"), "--out", str(out), *args], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not out.exists()


def test_train_refuses_an_extract_store_as_out(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text('{"format": "resnet-jax-store/1"}')
    before = sorted(os.listdir(store))
    code, _, err = run_cli(["train", "--out", str(store), "--epochs", "1"], capsys)
    assert code == 2 and "holds an extract store" in err and "another --out" in err
    assert sorted(os.listdir(store)) == before
