"""The tables of `reproduce` and `similarity`: markdown and CSV from the results dict."""
from __future__ import annotations

from resnet_jax.paper.analysis import CONTROL
from resnet_jax.core.files import format_cell

TABLE1_COLUMNS = ("Cos_Sim_GW", "Cos_Sim_P", "Cos_Sim_FM", "Grad_Cam_CC", "Grad_Cam_KLD", "Grad_Cam_SIM",
                  "Grad_Cam_SSIM", "Grad_Cam_AUC")
INTER_COLUMNS = ("Inter_GW", "Inter_P", "Inter_FM", "Gap_GW", "Gap_P", "Gap_FM")
SPACES = ("GW", "P", "FM")
SPACE_NAMES = {"GW": "Gradient Weights", "P": "Final Predictions", "FM": "Feature Maps",
               "GW_pred": "Gradient Weights (predicted labels)"}
REPORT_SPACES = ("GW", "GW_pred", "FM", "P")


def markdown_table(rows: list[dict], columns, digits: int = 4, header=None) -> str:
    """Returns a markdown table of rows (dicts) over columns; None prints as '-'."""
    header = list(header or columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def _cluster_rows(results: dict, method: str, spaces) -> tuple[list[dict], list[str], list[str]]:
    columns, header = ["space"], ["Clustering by \\ Metric"]
    for name in results["models"]:
        for metric, title in (("ari", "ARI"), ("nmi", "NMI"), ("silhouette", "Silhouette")):
            columns.append(f"{name}_{metric}")
            header.append(f"{name} {title}")
    rows = []
    for space in spaces:
        row = {"space": SPACE_NAMES[space]}
        present = False
        for name, res in results["models"].items():
            if space in res["clustering"]:
                present = True
                for metric in ("ari", "nmi", "silhouette"):
                    row[f"{name}_{metric}"] = res["clustering"][space]["scores"][method][metric]
        if present:
            rows.append(row)
    return rows, columns, header


CAM_METRICS = (("CC", "cc"), ("KLD", "kld"), ("SIM", "sim"), ("SSIM", "ssim"), ("AUC", "auc_judd"))
CAM_ROW_COLUMNS = ("Model", *(f"{p}{m}" for m, _ in CAM_METRICS for p in ("Grad_Cam_", "Diff_", "CamGap_", "Mask_")),
                   "Grad_Cam_KLD_median", "Cam_pairs", "Cam_pairs_left_out")  # Table 1 row keys of the baselines
CAM_BASELINE_COLUMNS = ("Model", "Metric", "Same-class pairs", "Different-class pairs", "Gap (same - different)",
                        "Map vs object mask", "Same-class median", "Different-class median", "Pairs left out")


def _cam_baseline_rows(results: dict) -> list[dict]:
    """One row per (model, Grad-CAM metric): same-class mean, different-class mean, gap, mask localisation,
    medians, and the same-class pairs left out because the metric was undefined (a constant map)."""
    rows = []
    for name, res in results["models"].items():
        summary = res["gradcam"]
        cons, loc = summary["consistency"], summary.get("localisation")
        different = cons.get("different") or {"metrics": {}}
        for title, metric in CAM_METRICS:
            same, diff = cons["metrics"][metric], different["metrics"].get(metric, {})
            rows.append({"Model": name, "Metric": title, "Same-class pairs": same["mean"],
                         "Different-class pairs": diff.get("mean"), "Gap (same - different)": cons.get("gap", {}).get(metric),
                         "Map vs object mask": loc[metric]["mean"] if loc else None,
                         "Same-class median": same.get("median"), "Different-class median": diff.get("median"),
                         "Pairs left out": f"{same['undefined']} of {cons['pairs']}"})
    return rows


def _prediction_rows(results: dict) -> list[dict]:
    """The row "Predictions themselves" of the GW vs GW_pred clustering tables: ARI/NMI of argmax(P)."""
    row = {"space": "Predictions themselves (argmax P)"}
    for name, res in results["models"].items():
        if "predictions" in res:
            row[f"{name}_ari"] = res["predictions"]["ari"]
            row[f"{name}_nmi"] = res["predictions"]["nmi"]
    return [row]


BY_CONSTRUCTION = (
    "What holds by construction, for any network, trained or not: the fc gradient is [features, 1] x delta "
    "with delta = softmax - onehot(label), whose -onehot part carries at least half of ||delta||^2, so "
    "cos(delta_i, delta_j) >= 1/2 for any two images with the same gradient label (and the features' cosine, "
    "the other factor of the gradients' cosine, is positive after ReLU). (1) With true labels that label is "
    "the class: GW clustering by the true class, and a misclassified image's GW lying nearest its true class "
    "centroid, are expected whatever the network learned. (2) With predicted labels it is the prediction: "
    "GW_pred is an embedding of argmax(P), so compare its clustering with the row 'Predictions themselves', "
    "and a misclassified image's GW_pred lying nearest its predicted class centroid is expected. Neither "
    "says anything about what the network learned beyond its predictions.")


def _accuracy_rows(results: dict) -> list[dict]:
    rows = []
    for name, res in results["models"].items():
        row = {"Model": name, "Held-out accuracy": res["accuracy"], "N": res["n"],
               "Misclassified": res["misclassified"]["n_misclassified"]}
        for method in ("kmeans", "gmm"):
            for space in ("GW", "GW_pred", "P", "FM"):
                if space in res["clustering"]:
                    row[f"{method}_acc_{space}"] = res["clustering"][space]["scores"][method]["accuracy"]
        rows.append(row)
    return rows


def _misclassified_rows(results: dict) -> list[dict]:
    rows = []
    for name, res in results["models"].items():
        for space in REPORT_SPACES:
            r = res["misclassified"]["nearest_centroid"].get(space)
            if r is None:
                continue
            rows.append({"Model": name, "Representation": SPACE_NAMES[space], "Misclassified": r["n_misclassified"],
                         "Scored": r["n_scored"], "Nearest = true class": r["frac_nearest_true"],
                         "Nearest = predicted class": r["frac_nearest_pred"]})
    return rows


def table_csvs(results: dict):
    """Returns [(file name, rows, columns)] of every table, for CSV output."""
    t1 = [res["table1"] for res in results["models"].values()]
    t1_columns = ["Model", *TABLE1_COLUMNS, *INTER_COLUMNS, "Cos_Sim_GW_pred", "Inter_GW_pred", "Intra_pooling"]
    out = [("table1_similarity.csv", t1, t1_columns),
           ("gradcam_baselines.csv", _cam_baseline_rows(results), list(CAM_BASELINE_COLUMNS))]
    for method, fname in (("kmeans", "table2_kmeans.csv"), ("gmm", "table3_gmm.csv")):
        rows, columns, _ = _cluster_rows(results, method, (*SPACES, CONTROL))
        out.append((fname, rows + _prediction_rows(results), columns))
    acc = _accuracy_rows(results)
    out.append(("accuracy.csv", acc, list(dict.fromkeys(k for r in acc for k in r))))
    mis = _misclassified_rows(results)
    if mis:
        out.append(("misclassified.csv", mis, list(mis[0])))
    return out


def tables_markdown(results: dict) -> str:
    """Returns results/tables.md: the draft's three tables in its layout, then ours."""
    models = list(results["models"])
    t1 = [res["table1"] for res in results["models"].values()]
    parts = ["# Results", "",
             f"Data: `{results['config']['data']}` held-out split; models: {', '.join(models)}. "
             f"GW = per-example gradient of the loss w.r.t. the fc weights (true labels), P = softmax "
             f"probabilities, FM = pooled layer4 features.", "",
             "## Table 1: mean cosine similarity of same-class images, Grad-CAM agreement", "",
             markdown_table_1(t1), "",
             _pooling_note(results), "",
             "Grad-CAM columns compare the maps of pairs of same-class images (" +
             _pairs_note(results) + "); AUC is AUC-Judd with the second map binarised at half its range. "
             "Read them with their baselines below: a same-class score alone does not show class-specific "
             "maps.", "",
             "## Grad-CAM agreement with its baselines", "",
             markdown_table(_cam_baseline_rows(results), CAM_BASELINE_COLUMNS, 4), "",
             "Same-class pairs: Table 1's Grad-CAM columns. Different-class pairs: the same score over pairs of "
             "images of different classes (as many, seeded sample), the baseline; only the gap says that maps "
             "agree more within a class than across classes. Maps that ignore the image (an untrained network) "
             "score high on both and show a gap near 0. Map vs object mask: the map of each image against its "
             "object mask, the only column that measures whether the map points at the object ('-': the data "
             "has no masks). KLD (lower is more alike) of min-max scaled maps is dominated by pairs of "
             "mismatched support: its median is given beside the mean. Pairs left out: same-class pairs whose "
             "metric was undefined (a constant map), the most over the five metrics.", "",
             "## Table 2: clustering using KMeans", ""]
    rows, columns, header = _cluster_rows(results, "kmeans", SPACES)
    parts += [markdown_table(rows, columns, 2, header), "", "## Table 3: clustering using GMM", ""]
    rows, columns, header = _cluster_rows(results, "gmm", SPACES)
    parts += [markdown_table(rows, columns, 2, header), "",
              "Clustered spaces: " + _space_notes(results) + ".", "",
              "## Ours: separation (inter-class similarity) and the predicted-label control", "",
              markdown_table(t1, ["Model", "Cos_Sim_GW", "Inter_GW", "Gap_GW", "Cos_Sim_GW_pred",
                                           "Inter_GW_pred", "Cos_Sim_P", "Inter_P", "Gap_P", "Cos_Sim_FM",
                                           "Inter_FM", "Gap_FM"]), "",
              BY_CONSTRUCTION, ""]
    for method, title in (("kmeans", "KMeans"), ("gmm", "GMM")):
        rows, columns, header = _cluster_rows(results, method, ("GW", CONTROL))
        parts += [f"### {title}: true-label vs predicted-label GW, and the predictions themselves", "",
                  markdown_table(rows + _prediction_rows(results), columns, 2, header), ""]
    acc = _accuracy_rows(results)
    parts += ["## Ours: held-out accuracy and Hungarian-matched cluster accuracy", "",
              markdown_table(acc, list(dict.fromkeys(k for r in acc for k in r)), 3), ""]
    mis = _misclassified_rows(results)
    parts += ["## Learning from misclassifications", "",
              "For each misclassified held-out image: is its nearest class centroid (cosine, centroids of the "
              "correctly classified images) its true class or its predicted class? For GW (true class) and "
              "GW_pred (predicted class) the answer is fixed by construction (see above); FM and P are the "
              "informative rows.", "",
              markdown_table(mis, list(mis[0]), 3) if mis else "No misclassified images.", ""]
    for name, res in results["models"].items():
        pairs = res["misclassified"]["confusion_pairs"][:5]
        if pairs:
            names = res["gradcam"].get("class_names") or None
            text = ", ".join(f"{_cls(names, t)}->{_cls(names, p)} ({c})" for t, p, c in pairs)
            parts.append(f"- {name} most frequent confusions (true->predicted): {text}")
    parts.append("")
    return "\n".join(parts)


def _cls(names, k):
    return names[k] if names else str(k)


def markdown_table_1(rows: list[dict]) -> str:
    """Returns Table 1 in the draft's layout (our SIM column added)."""
    return markdown_table(rows, ["Model", *TABLE1_COLUMNS], 6,
                                   ["Model\\Matrices", *TABLE1_COLUMNS])


def _pooling_note(results: dict) -> str:
    pooling = {name: res["table1"].get("Intra_pooling", "pooled pairs") for name, res in results["models"].items()}
    kinds = set(pooling.values())
    if kinds == {"pooled pairs"}:
        return ("Cos_Sim columns: the mean over all same-class pairs, pooled (a class of n_c images weighs about "
                "n_c^2; the classes are balanced here).")
    return ("Cos_Sim columns: " + "; ".join(f"{n}: {p}" for n, p in pooling.items()) + " (per-class mean: the "
            "mean of each class's mean, used where the classes are imbalanced, largest / smallest above "
            "1.5; pooled pairs weigh a class of n_c images about n_c^2).")


def _pairs_note(results: dict) -> str:
    notes = {f"{c['pairs']} pairs{' (seeded sample)' if c['sampled'] else ''}"
             for c in (res["gradcam"]["consistency"] for res in results["models"].values())}
    return ", ".join(sorted(notes)) + " per model"


def _space_notes(results: dict) -> str:
    first = next(iter(results["models"].values()))["clustering"]
    return "; ".join(f"{s}: {first[s]['description']}" for s in first) + \
        "; silhouette is computed in that reduced space under the cluster labels"
