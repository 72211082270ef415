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
