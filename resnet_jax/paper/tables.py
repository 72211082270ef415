"""The tables of `reproduce` and `similarity`: markdown and CSV from the results dict."""
from __future__ import annotations

from resnet_jax.paper.analysis import CONTROL
from resnet_jax.paper.replicate import is_spread, mean
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


IDENTITIES = (
    ("Cos_Sim_GW <= Cos_Sim_FM1",
     "for fc gradients cos(GW_i, GW_j) = cos([h_i,1], [h_j,1]) x cos(delta_i, delta_j) exactly (delta = softmax - "
     "onehot(label)), and |cos(delta_i, delta_j)| <= 1, so GW's cosine is at most [FM,1]'s pair by pair and so is "
     "every mean over pairs; a ranking with GW's same-class cosine above FM's (the draft's GW 0.83-0.97 over FM "
     "0.81-0.84) is impossible unless the +1 of [FM,1] lifts its cosine above FM's, which needs features of "
     "small norm (compare Cos_Sim_FM1 with Cos_Sim_FM)"),
    ("GW with true labels clusters by class",
     "delta's -onehot(label) part carries at least half of |delta|^2, so cos(delta_i, delta_j) >= 1/2 for any two "
     "images with the same label, for any network, trained or not: kmeans_acc_GW near 1.000, and a misclassified "
     "image's GW lying nearest its true class's centroid, are expected whatever the network learned"),
    ("GW_pred embeds argmax(P)",
     "with predicted labels the same argument groups the images by their prediction: kmeans_acc_GW_pred equals "
     "the held-out accuracy up to the clusters' errors; compare its clustering with 'Predictions themselves', "
     "and a misclassified image's GW_pred lying nearest its predicted class is expected"),
    ("FM's cosines are high",
     "pooled features after a ReLU are non-negative, so every FM cosine is >= 0 and the inter-class FM cosine is "
     "already high (Inter_FM): only Gap_FM says that FM separates the classes"),
    ("Cos_Sim_P tracks accuracy",
     "a trained network's P is near one-hot, so a same-class pair has a cosine near 1 when both are predicted "
     "right and near 0 otherwise: Cos_Sim_P is close to the fraction of same-class pairs predicted right"),
    ("P's silhouette",
     "confident probabilities sit near the simplex vertices, well separated clusters by construction, so P's "
     "silhouette is high (near 0.9) and its clustering restates the predictions"),
    ("P rows of the centroid tables",
     "P's nearest centroid is essentially its largest entry's vertex, so 'nearest = predicted class' in P and the "
     "P row of the centroid rule restate the prediction"),
    ("Detection scores without the label",
     "every detection score is computed without the held-out label; the loss or the true-label gradient would "
     "separate the errors by construction and are left out. The fc gradient norm at the predicted label is "
     "sqrt(|h|^2 + 1) |p - e_pred|: a function of the softmax and the feature norm, close to the softmax "
     "baselines by construction"),
)


def identities_markdown() -> str:
    """Returns the list of the rows that hold by construction, each with its reason."""
    return "\n".join(f"- **{title}**: {reason}." for title, reason in IDENTITIES)


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
    t1_columns = ["Model", *TABLE1_COLUMNS, *INTER_COLUMNS, "Cos_Sim_GW_pred", "Inter_GW_pred", "Cos_Sim_FM1", "Intra_pooling"]
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
    det = detection_rows(results)
    if det:
        out.append(("detection.csv", det, list(DETECTION_COLUMNS)))
        out.append(("centroid_rule.csv", rule_rows(results), list(RULE_COLUMNS)))
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
                                           "Inter_FM", "Gap_FM", "Cos_Sim_FM1"]), "",
              "Cos_Sim_FM1: the same-class cosine of [FM, 1], the bound of Cos_Sim_GW (see 'What holds by "
              "construction' below).", ""]
    for method, title in (("kmeans", "KMeans"), ("gmm", "GMM")):
        rows, columns, header = _cluster_rows(results, method, ("GW", CONTROL))
        parts += [f"### {title}: true-label vs predicted-label GW, and the predictions themselves", "",
                  markdown_table(rows + _prediction_rows(results), columns, 2, header), ""]
    acc = _accuracy_rows(results)
    parts += ["## Ours: held-out accuracy and Hungarian-matched cluster accuracy", "",
              markdown_table(acc, list(dict.fromkeys(k for r in acc for k in r)), 3), ""]
    parts += detection_markdown(results)
    mis = _misclassified_rows(results)
    parts += ["## Learning from misclassifications", "",
              "The draft's question, asked its way: for each misclassified held-out image, is its nearest class "
              "centroid (cosine, centroids of the correctly classified held-out images, so it needs their labels) "
              "its true class or its predicted class? The centroid rule above asks it without held-out labels. "
              "For GW (true class) and "
              "GW_pred (predicted class) the answer is fixed by construction (see 'What holds by construction'); FM and P are the "
              "informative rows.", "",
              markdown_table(mis, list(mis[0]), 3) if mis else "No misclassified images.", ""]
    for name, res in results["models"].items():
        pairs = res["misclassified"]["confusion_pairs"][:5]
        if pairs:
            names = res["gradcam"].get("class_names") or None
            text = ", ".join(f"{_cls(names, t)}->{_cls(names, p)} ({c})" for t, p, c in pairs)
            parts.append(f"- {name} most frequent confusions (true->predicted): {text}")
    parts += ["", "## What holds by construction", "",
              "Rows whose values follow from the definitions, for any network, with the reason:", "",
              identities_markdown(), ""]
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


DETECTION_COLUMNS = ("Model", "Score", "AUROC", "AUPR", "FPR@95%TPR", "AUROC - MSP", "95% CI", "Beats MSP")
RULE_COLUMNS = ("Model", "Centroids in", "Errors", "Fixed", "Broken", "Changed", "Model accuracy", "Rule accuracy",
                "Chance fixed", "Chance broken", "Chance accuracy")


def verdict(row: dict) -> str:
    """Whether a score's AUROC beats the baseline's: over seeds, by more than the seed standard deviation
    of the difference; on one seed, with the paired bootstrap interval above 0."""
    d = row.get("delta_auroc")
    if d is None:
        return "baseline"
    if is_spread(d) and d["n"] > 1:
        m, sd = d["mean"], d["std"]
        return "yes (beyond the seed SD)" if m - sd > 0 else "no: below" if m + sd < 0 else "no: within the seed SD"
    d, low, high = mean(d), mean(row["delta_low"]), mean(row["delta_high"])
    return "yes (CI above 0)" if low > 0 else "no: below (CI below 0)" if high < 0 else "no: tie (CI spans 0)"


def detection_rows(results: dict) -> list[dict]:
    rows = []
    for name, res in results["models"].items():
        for r in (res.get("detection") or {}).get("rows", []):
            ci = "-" if "delta_low" not in r or is_spread(r["delta_auroc"]) else \
                f"[{r['delta_low']:+.3f}, {r['delta_high']:+.3f}]"
            rows.append({"Model": name, "Score": r["method"], "AUROC": r["auroc"], "AUPR": r["aupr"],
                         "FPR@95%TPR": r["fpr95"], "AUROC - MSP": r.get("delta_auroc"), "95% CI": ci,
                         "Beats MSP": verdict(r), "key": r["key"]})
    return rows


def rule_rows(results: dict) -> list[dict]:
    rows = []
    for name, res in results["models"].items():
        for space, r in (res.get("detection") or {}).get("centroid_rule", {}).items():
            rows.append({"Model": name, "Centroids in": SPACE_NAMES.get(space, space), "Errors": r["errors"],
                         "Fixed": r["fixed"], "Broken": r["broken"], "Changed": r["changed"],
                         "Model accuracy": r["model_accuracy"], "Rule accuracy": r["rule_accuracy"],
                         "Chance fixed": r["chance_fixed"], "Chance broken": r["chance_broken"],
                         "Chance accuracy": r["chance_accuracy"]})
    return rows


def detection_summary(rows: list[dict]) -> str:
    """One sentence: which scores beat the baseline on every model, on some, on none."""
    models = {r["Model"] for r in rows}
    wins = {}
    for r in rows:
        if r["Beats MSP"] != "baseline" and "(baseline)" not in r["Score"]:
            wins.setdefault(r["Score"], set())
            if r["Beats MSP"].startswith("yes"):
                wins[r["Score"]].add(r["Model"])
    every = [s for s, m in wins.items() if m == models]
    some = [f"{s} ({len(m)} of {len(models)})" for s, m in wins.items() if m and m != models]
    none = [s for s, m in wins.items() if not m]
    return (f"Beats the maximum softmax probability on every model: {', '.join(every) or 'none'}. "
            f"On some models: {', '.join(some) or 'none'}. On no model: {', '.join(none) or 'none'}.")


def detection_markdown(results: dict) -> list[str]:
    rows = detection_rows(results)
    if not rows:
        return []
    seeds = results["config"].get("seeds", 1)
    spread = (f"over {seeds} seeds (mean ± standard deviation; 'beats' when the mean difference exceeds its seed "
              f"standard deviation)" if seeds > 1 else "on one seed ('beats' when the paired bootstrap 95% "
              "interval of the AUROC difference, images resampled, lies above 0)")
    k = next(iter(results["models"].values()))["detection"].get("knn_k")
    return ["## Can a representation tell which predictions are wrong?", "",
            "Misclassification detection on the held-out images: each score ranks the images without their labels "
            "(higher = more likely wrong), scored against the model's errors (the positives): AUROC, AUPR and the "
            "share of correct images flagged when 95% of the errors are. Centroids, covariance and neighbours "
            f"come from the training images (k = {k} for k-NN, fixed in advance); results {spread}.", "",
            markdown_table(rows, DETECTION_COLUMNS, 3), "", detection_summary(rows), "",
            "### The centroid rule: nearest training centroid as the prediction", "",
            "Each held-out image gets the class of its nearest training-image centroid (cosine). Fixed: errors it "
            "turns right; broken: correct predictions it turns wrong; chance: a rule that changes as many "
            "predictions to random other classes.", "",
            markdown_table(rule_rows(results), RULE_COLUMNS, 3), ""]
