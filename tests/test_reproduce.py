"""`resnet-jax reproduce --quick` end to end: files, recomputable scores, identical second run, bad input."""
import json
import os

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from helpers import run_cli


HELD_OUT = {"opened": 0, "reads": 0}  # the first run's openings of the held-out split and reads of its images


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce") / "results")
    from resnet_jax.cli import main
    from resnet_jax.core.data import digits

    opened, read = digits.DigitsSource.__init__, digits.DigitsSource.read

    def counting_init(self, split, *args, **kwargs):
        HELD_OUT["opened"] += split == "test"
        opened(self, split, *args, **kwargs)

    def counting_read(self, idx, *args, **kwargs):
        HELD_OUT["reads"] += self.split == "test"
        return read(self, idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digits.DigitsSource, "__init__", counting_init)
        mp.setattr(digits.DigitsSource, "read", counting_read)
        try:
            main(["reproduce", "--quick", "--out", out, "--quiet"])
        except SystemExit as e:
            assert not e.code
    return out


def test_held_out_split_is_opened_and_decoded_once_per_model(quick_results):
    # one opening checks the split before anything is written, one feeds the model (training does
    # not open it); its images are decoded once, for extract, Grad-CAM and the figures together
    assert HELD_OUT == {"opened": 2, "reads": 1}


def test_quick_writes_every_output(quick_results):
    for name in ("tables.md", "results.json", "config.json", "table1_similarity.csv", "table2_kmeans.csv",
                 "table3_gmm.csv", "accuracy.csv", "figures/samples.png", "figures/resnet18_pca.png",
                 "figures/resnet18_gradcam.png"):
        assert os.path.getsize(os.path.join(quick_results, name)) > 0, name
    text = open(os.path.join(quick_results, "tables.md")).read()
    for heading in ("Table 1", "Grad-CAM agreement with its baselines", "Table 2: clustering using KMeans",
                    "Table 3: clustering using GMM", "Learning from misclassifications", "predicted-label",
                    "Predictions themselves (argmax P)", "What holds by construction"):
        assert heading in text


def test_scores_recompute_from_saved_cluster_labels(quick_results):
    results = json.load(open(os.path.join(quick_results, "results.json")))
    res = results["models"]["resnet18"]
    labels = np.load(os.path.join(res["store"], "labels.npy"))
    assert res["n"] == len(labels) == 200
    for space in ("GW", "P", "FM", "GW_pred"):
        for method in ("kmeans", "gmm"):
            pred = np.asarray(res["clustering"][space]["labels"][method])
            scores = res["clustering"][space]["scores"][method]
            assert scores["ari"] == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-12)
            assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred), abs=1e-12)
    preds = np.load(os.path.join(res["store"], "preds.npy"))
    assert res["accuracy"] == pytest.approx(np.mean(preds == labels))
    assert res["predictions"]["ari"] == pytest.approx(adjusted_rand_score(labels, preds), abs=1e-12)
    assert res["predictions"]["nmi"] == pytest.approx(normalized_mutual_info_score(labels, preds), abs=1e-12)
    # Cos_Sim pooling: per-class means where the classes are imbalanced (largest / smallest > 1.5)
    counts = np.bincount(labels)
    counts = counts[counts > 1]
    imbalanced = counts.max() > 1.5 * counts.min()
    assert res["table1"]["Intra_pooling"] == ("per-class mean" if imbalanced else "pooled pairs")
    P = np.load(os.path.join(res["store"], "p.npy")).astype(np.float64)
    U = P / np.linalg.norm(P, axis=1, keepdims=True)
    cos = U @ U.T
    per_class = [cos[np.ix_(labels == c, labels == c)][~np.eye(n, dtype=bool)].mean()
                 for c, n in zip(*np.unique(labels, return_counts=True)) if n > 1]
    pooled = np.mean([cos[i, j] for i in range(len(labels)) for j in range(len(labels))
                      if i != j and labels[i] == labels[j]])
    assert res["table1"]["Cos_Sim_P"] == pytest.approx(np.mean(per_class) if imbalanced else pooled, rel=1e-6)
    # the Grad-CAM baseline: different-class pairs, and the gap of the means
    cons = res["gradcam"]["consistency"]
    assert cons["different"]["pairs"] > 0
    for metric, stats in cons["metrics"].items():
        assert cons["gap"][metric] == pytest.approx(stats["mean"] - cons["different"]["metrics"][metric]["mean"])


def test_second_run_reuses_cache_and_gives_identical_tables(quick_results, capsys):
    before = open(os.path.join(quick_results, "tables.md")).read()
    code, out, err = run_cli(["reproduce", "--quick", "--out", quick_results, "--quiet"], capsys)
    assert code == 0, err
    assert open(os.path.join(quick_results, "tables.md")).read() == before
    assert "already complete" in out


def test_other_configuration_is_refused(quick_results, capsys):
    code, _, err = run_cli(["reproduce", "--quick", "--seed", "1", "--out", quick_results], capsys)
    assert code == 2 and "another configuration" in err and "--force" in err


def test_unknown_model_in_list(capsys, tmp_path):
    code, _, err = run_cli(["reproduce", "--models", "resnet18,resnet99", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "resnet99" in err
    assert not (tmp_path / "r").exists()


def test_fewer_images_than_classes(capsys, tmp_path):
    code, _, err = run_cli(["reproduce", "--quick", "--limit", "5", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "5 held-out images for 10 classes" in err
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(["reproduce", "--quick", "--limit", "12", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "has no held-out image" in err
    assert not (tmp_path / "r").exists()


def _arrays(run, name):
    path = os.path.join(run, name)
    return {k: np.load(os.path.join(path, f"{k}.npy")) for k in ("fm", "logits", "labels")}


def test_detection_scores_against_independent_computations(quick_results):
    """Every detection score of the table recomputed from the stores with loops, scipy and scikit-learn."""
    import scipy.spatial.distance
    from sklearn.metrics import average_precision_score, roc_auc_score

    run = os.path.join(quick_results, "runs", "resnet18")
    test, train = _arrays(run, "store"), _arrays(run, "train-store")
    z, h, y = test["logits"].astype(np.float64), test["fm"].astype(np.float64), test["labels"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pred = z.argmax(1)
    err = pred != y
    th, ty, c = train["fm"].astype(np.float64), train["labels"], z.shape[1]
    cos = lambda u, v: u @ v / (np.linalg.norm(u) * np.linalg.norm(v))  # noqa: E731
    centroids = [np.mean([r / np.linalg.norm(r) for r in th[ty == k]], axis=0) for k in range(c)]
    cov = sum(np.cov(th[ty == k].T, bias=True) * np.sum(ty == k) for k in range(c)) / len(th)
    vi = np.linalg.pinv(cov, hermitian=True)
    means = [th[ty == k].mean(0) for k in range(c)]
    unit_train = th / np.linalg.norm(th, axis=1, keepdims=True)
    cams = np.load(os.path.join(run, "gradcam-pred", "cams.npy")).reshape(len(y), -1).astype(np.float64)
    proj = np.load(os.path.join(run, "store-pred-all", "gw.npy"))
    expected = {"msp": -p.max(1), "margin": -np.diff(np.sort(p, 1)[:, -2:], axis=1)[:, 0],
                "entropy": -np.sum(p * np.log(p), 1),
                "grad_norm_pred_fc": [np.linalg.norm(np.outer(np.append(h[i], 1), p[i] - np.eye(c)[pred[i]]))
                                      for i in range(len(y))],
                "grad_norm_pred_all": np.linalg.norm(proj, axis=1),
                "fm_centroid_cosine": [1 - cos(h[i], centroids[pred[i]]) for i in range(len(y))],
                "fm_mahalanobis": [min(scipy.spatial.distance.mahalanobis(h[i], m, vi) ** 2 for m in means)
                                   for i in range(len(y))],
                "fm_knn": [np.sort(np.linalg.norm(unit_train - h[i] / np.linalg.norm(h[i]), axis=1))[9]
                           for i in range(len(y))],
                "cam_entropy": [-sum(q * np.log(q) for q in m / m.sum() if q > 0) for m in np.clip(cams, 0, None)]}
    results = json.load(open(os.path.join(quick_results, "results.json")))
    rows = {r["key"]: r for r in results["models"]["resnet18"]["detection"]["rows"]}
    assert set(expected) <= set(rows)
    for key, score in expected.items():
        assert rows[key]["auroc"] == pytest.approx(roc_auc_score(err, score), abs=2e-3), key
        assert rows[key]["aupr"] == pytest.approx(average_precision_score(err, score), abs=2e-2), key
    assert results["models"]["resnet18"]["detection"]["errors"] == int(err.sum())


def test_centroid_rule_uses_training_centroids(quick_results):
    run = os.path.join(quick_results, "runs", "resnet18")
    test, train = _arrays(run, "store"), _arrays(run, "train-store")
    h, y, pred = test["fm"].astype(np.float64), test["labels"], test["logits"].argmax(1)
    th, ty = train["fm"].astype(np.float64), train["labels"]
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    centroids = unit(np.stack([unit(th[ty == k]).mean(0) for k in range(10)]))
    rule = (unit(h) @ centroids.T).argmax(1)
    results = json.load(open(os.path.join(quick_results, "results.json")))
    r = results["models"]["resnet18"]["detection"]["centroid_rule"]["FM"]
    assert r["fixed"] == int(np.sum((pred != y) & (rule == y)))
    assert r["broken"] == int(np.sum((pred == y) & (rule != y)))
    assert r["changed"] == int(np.sum(rule != pred))
    assert r["chance_fixed"] == pytest.approx(r["changed"] / len(y) * np.sum(pred != y) / 9)
    text = open(os.path.join(quick_results, "tables.md")).read()
    assert "Can a representation tell which predictions are wrong?" in text and "Beats the maximum softmax" in text
    assert os.path.getsize(os.path.join(quick_results, "detection.csv")) > 0


def test_gw_cosine_never_exceeds_fm1(quick_results):
    row = json.load(open(os.path.join(quick_results, "results.json")))["models"]["resnet18"]["table1"]
    assert row["Cos_Sim_GW"] <= row["Cos_Sim_FM1"]


def test_seeds_report_mean_and_spread(tmp_path):
    """Two seeds of a one-epoch run: each seed's results kept, every cell their mean ± sample SD."""
    from resnet_jax.paper import reproduce

    out = str(tmp_path / "r")
    results = reproduce.run(["resnet18"], out_dir=out, quick=True, limit=40, epochs={"resnet18": 1}, seeds=2,
                            progress=False, log=lambda s: None)
    runs = results["runs"]["resnet18"]
    assert sorted(runs) == ["resnet18-seed0", "resnet18-seed1"]
    assert os.path.isdir(os.path.join(out, "runs", "resnet18-seed1", "checkpoint"))
    values = [r["table1"]["Cos_Sim_FM"] for r in runs.values()]
    cell = results["models"]["resnet18"]["table1"]["Cos_Sim_FM"]
    assert cell["mean"] == pytest.approx(np.mean(values)) and cell["std"] == pytest.approx(np.std(values, ddof=1))
    aurocs = [r["detection"]["rows"][0]["auroc"] for r in runs.values()]
    assert results["models"]["resnet18"]["detection"]["rows"][0]["auroc"]["values"] == pytest.approx(aurocs)
    text = open(os.path.join(out, "tables.md")).read()
    assert f"{np.mean(values):.6f} ± {np.std(values, ddof=1):.6f}" in text
    assert "over 2 seeds" in text


def test_every_identity_is_in_the_docs():
    from resnet_jax.paper.tables import IDENTITIES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "guides", "reproduce.md")).read()
    for title, _ in IDENTITIES:
        assert f"**{title}**" in text, title
