"""`resnet-jax reproduce`: the draft's tables and figures, end to end, for several models.

For each model: train on the data's training split (or reuse a cached checkpoint, or take a given
one), extract GW/P/FM of the held-out split, compute Grad-CAM maps, then Table 1 (cosine
similarity and Grad-CAM agreement), Tables 2 and 3 (KMeans and GMM against the true classes),
the predicted-label control rows, the misclassification report and the figures. Everything is
written under `out_dir`; intermediate results (checkpoints, stores, maps) are cached in
`out_dir/runs/<model>/` so a second run only recomputes the host-side analyses.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from . import pipeline
from .errors import UserError
from .models import MODEL_NAMES

# Training epochs and settings (batch size, peak learning rate, images per epoch) per model on the
# embedded default, sized so that `make reproduce` fits 15 minutes on a 2-core CPU (see the README's
# measurements): the deeper models get fewer steps of smaller batches, ResNet-101/152 one pass over
# 320 of the 1,257 training images (20 steps).
DEFAULT_EPOCHS = {"resnet18": 6, "resnet34": 3, "resnet50": 2, "resnet101": 1, "resnet152": 1}
DEFAULT_SETTINGS = {
    "resnet18": {"batch_size": 64, "learning_rate": 2e-3, "images_per_epoch": None},
    "resnet34": {"batch_size": 16, "learning_rate": 1e-3, "images_per_epoch": None},
    "resnet50": {"batch_size": 16, "learning_rate": 1e-3, "images_per_epoch": None},
    "resnet101": {"batch_size": 16, "learning_rate": 1e-3, "images_per_epoch": 320},
    "resnet152": {"batch_size": 16, "learning_rate": 1e-3, "images_per_epoch": 320},
}
QUICK = {"models": ("resnet18",), "epochs": 3, "limit": 200}
SPACES = ("GW", "P", "FM")
CONTROL = "GW_pred"
SPACE_NAMES = {"GW": "Gradient Weights", "P": "Final Predictions", "FM": "Feature Maps",
               "GW_pred": "Gradient Weights (predicted labels)"}
REPORT_SPACES = ("GW", "GW_pred", "FM", "P")


def parse_models(text: str) -> list[str]:
    """Returns the model names of a comma-separated list, refusing unknown ones."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown or not names:
        raise UserError(f"unknown model {', '.join(unknown) or '(none given)'} in --models: choose from "
                        f"{', '.join(MODEL_NAMES)}")
    if len(set(names)) != len(names):
        raise UserError(f"--models names a model twice: {text}")
    return names


def run(models: list[str], data_spec: str = "digits", ckpts: dict | None = None, out_dir: str = "results",
        quick: bool = False, force: bool = False, epochs: dict | None = None, limit: int | None = None,
        seed: int = 0, grad_align: float = 0.0, grad_mi: float = 0.0, progress: bool = True, log=print) -> dict:
    """Runs the whole job; returns the results dict that is also written to results.json.

    With `grad_align` (or `grad_mi`) > 0 every model is trained twice on the same data and seed,
    plainly and with the gradient-alignment loss, and the tables put the two side by side (the
    aligned run is named e.g. "resnet18+align").
    """
    from . import data

    ckpts = dict(ckpts or {})
    unknown = sorted(set(ckpts) - set(models))
    if unknown:
        raise UserError(f"--ckpt names {', '.join(unknown)}, which is not in --models")
    epochs = dict(DEFAULT_EPOCHS if not quick else {m: QUICK["epochs"] for m in MODEL_NAMES}, **(epochs or {}))
    if quick and limit is None:
        limit = QUICK["limit"]
    kind, arg, split = data.parse_spec(data_spec)
    base_spec = kind if arg is None else f"{kind}:{arg}"
    if grad_align < 0 or grad_mi < 0:
        raise UserError("--grad-align and --grad-mi must be >= 0")
    aligned = grad_align > 0 or grad_mi > 0
    if aligned and ckpts:
        raise UserError("--grad-align trains each model twice: it cannot be combined with --ckpt")
    config = {"models": models, "data": base_spec, "quick": quick, "seed": seed, "limit": limit,
              "grad_align": grad_align, "grad_mi": grad_mi,
              "epochs": {m: epochs[m] for m in models if m not in ckpts},
              "training": {m: DEFAULT_SETTINGS[m] for m in models if m not in ckpts},
              "checkpoints": {m: os.path.abspath(p) for m, p in ckpts.items()}}
    _check_heldout(base_spec, limit, seed)
    _prepare_out_dir(out_dir, config, force)
    started = time.perf_counter()
    results = {"config": config, "models": {}, "timings": {}}
    per_model = {}
    runs = [(m, m, 0.0, 0.0) for m in models]
    if aligned:
        runs = [r for m in models for r in ((m, m, 0.0, 0.0), (f"{m}+align", m, grad_align, grad_mi))]
    for i, (name, arch, lam1, lam2) in enumerate(runs):
        log(f"[{i + 1}/{len(runs)}] {name}")
        per_model[name] = _run_model(name, arch, base_spec, ckpts.get(name), epochs.get(arch), out_dir, limit, seed,
                                     lam1, lam2, progress, log)
        results["timings"][name] = per_model[name].pop("timings")
    results["models"] = per_model
    _figures_and_tables(results, out_dir, base_spec, seed, log)
    results["timings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    pipeline.write_json(os.path.join(out_dir, "results.json"), results)
    return results


def _check_heldout(base_spec: str, limit: int | None, seed: int) -> None:
    """Refuses held-out data that cannot be clustered into its classes: fewer images than classes, or
    a class without images."""
    from . import data

    ds = data.load(base_spec, default_split="test", seed=seed)
    labels = np.asarray(ds.labels[:limit] if limit is not None else ds.labels)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if len(labels) < ds.num_classes:
        raise UserError(f"{len(labels)} held-out images for {ds.num_classes} classes: clustering needs at least "
                        f"one image per class; raise --limit")
    missing = sorted(set(range(ds.num_classes)) - set(labels.tolist()))
    if missing:
        raise UserError(f"class {ds.class_names[missing[0]]!r} has no held-out image in {ds.spec}"
                        f"{'' if limit is None else f' (first {limit})'}: raise --limit or add images of it")


def _prepare_out_dir(out_dir: str, config: dict, force: bool) -> None:
    path = os.path.join(out_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(config)):
            if not force:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
                raise UserError(f"{out_dir} holds results of another configuration ({', '.join(diff)} differ): "
                                f"pass another --out, or --force to replace them")
            shutil.rmtree(out_dir)
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} exists and holds no reproduce results: pass another --out or remove it")
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    pipeline.write_json(path, config)


def _run_model(name, arch, base_spec, ckpt_dir, epochs, out_dir, limit, seed, grad_align, grad_mi, progress,
               log) -> dict:
    from . import checkpoint, extract, train

    run_dir = os.path.join(out_dir, "runs", name)
    timings = {}
    t = time.perf_counter()
    if ckpt_dir is None:
        ckpt_dir = os.path.join(run_dir, "checkpoint")
        config = train.TrainConfig(model=arch, data=base_spec, epochs=epochs, **DEFAULT_SETTINGS[arch], seed=seed,
                                   augment_shift=4, grad_align=grad_align, grad_mi=grad_mi)
        # held_out=False: the held-out accuracy comes from the store, whose pass runs the same images.
        train.fit(config, ckpt_dir, progress=progress, log=lambda s: log("  " + s), held_out=False)
    accuracy = checkpoint.load_meta(ckpt_dir).get("test_accuracy")
    timings["train"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    store_dir = os.path.join(run_dir, "store")
    extract.run_extract(ckpt_dir, base_spec, store_dir, limit=limit, data_seed=seed, progress=progress,
                        log=lambda s: log("  " + s))
    timings["extract"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    cams_dir = os.path.join(run_dir, "gradcam")
    cams = _cached_cams(cams_dir, ckpt_dir, limit)
    if cams is None:
        pipeline.run_gradcam(ckpt_dir, base_spec, cams_dir, limit=limit, seed=seed, progress=progress)
        cams = pipeline.load_cams(cams_dir)
    timings["gradcam"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    store = extract.load_store(store_dir)
    table1 = pipeline.table1_row(name, store, cams)
    rep = pipeline.representations(store)
    clusters, report = _cluster_and_report(rep, seed)
    timings["analysis"] = round(time.perf_counter() - t, 1)
    accuracy_heldout = float(np.mean(rep["labels"] == rep["preds"]))
    log(f"  held-out accuracy {accuracy_heldout:.4f}; Cos_Sim GW {table1['row']['Cos_Sim_GW']:.3f} "
        f"P {table1['row']['Cos_Sim_P']:.3f} FM {table1['row']['Cos_Sim_FM']:.3f}; KMeans ARI GW "
        f"{clusters['GW']['scores']['kmeans']['ari']:.2f} P {clusters['P']['scores']['kmeans']['ari']:.2f} "
        f"FM {clusters['FM']['scores']['kmeans']['ari']:.2f}")
    return {"checkpoint": os.path.abspath(ckpt_dir), "store": os.path.abspath(store_dir),
            "gradcam_dir": os.path.abspath(cams_dir), "checkpoint_test_accuracy": accuracy,
            "accuracy": accuracy_heldout, "n": int(len(rep["labels"])), "table1": table1["row"],
            "cosine": table1["summaries"], "gw_kind": table1["gw_kind"], "gradcam": cams["summary"],
            "clustering": clusters, "misclassified": report, "timings": timings}


def _cached_cams(cams_dir, ckpt_dir, limit):
    """Returns the Grad-CAM results in cams_dir if they were computed from this checkpoint step and limit."""
    from . import checkpoint

    try:
        cams = pipeline.load_cams(cams_dir)
    except UserError:
        return None
    summary = cams["summary"]
    same = (summary.get("checkpoint") == os.path.abspath(ckpt_dir)
            and summary.get("checkpoint_step") == checkpoint.latest_step(ckpt_dir)
            and summary.get("limit") == limit)
    return cams if same else None


def _cluster_and_report(rep: dict, seed: int):
    from clustering import cluster, misclassified

    labels, preds = rep["labels"], rep["preds"]
    unit = pipeline.unit_rows
    spaces = {"GW": (pipeline.unit_gram(pipeline.gw_gram(rep, labels)), True) if rep["gw_kind"] == "kronecker"
              else (unit(rep["gw"]), False), "P": (unit(rep["p"]), False), "FM": (unit(rep["fm"]), False)}
    if rep["gw_kind"] == "kronecker":
        spaces[CONTROL] = (pipeline.unit_gram(pipeline.gw_gram(rep, preds)), True)
    clusters = {}
    for space, (X, gram) in spaces.items():
        result = cluster.cluster_and_score(X, labels, name=f"unit-length {space}", gram=gram, seed=seed)
        clusters[space] = {"description": result["description"], "clusterers": result["clusterers"],
                           "scores": result["scores"], "labels": {m: v.tolist() for m, v in result["labels"].items()},
                           "coords2d": np.asarray(result["Z"][:, :2]).round(6).tolist()}
    report = {"n_misclassified": int(np.sum(labels != preds)),
              "confusion_pairs": misclassified.confusion_pairs(labels, preds, top=10),
              "most_confident_wrong": misclassified.most_confident_wrong(rep["probs64"], labels, top=8).tolist(),
              "nearest_centroid": {}}
    rows = {"GW": pipeline.gw_rows(rep, labels), "FM": rep["fm"], "P": rep["p"]}
    if rep["gw_kind"] == "kronecker":
        rows[CONTROL] = pipeline.gw_rows(rep, preds)
    for space, X in rows.items():
        r = misclassified.centroid_report(X, labels, preds)
        report["nearest_centroid"][space] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
    return clusters, report


def _figures_and_tables(results: dict, out_dir: str, base_spec: str, seed: int, log) -> None:
    from clustering import figures

    fig_dir = os.path.join(out_dir, "figures")
    models = list(results["models"])
    written = []
    for name, res in results["models"].items():
        cl = res["clustering"]
        spaces = [s for s in ("GW", "FM", "P") if s in cl]
        labels = np.asarray(pipeline.load_cams(res["gradcam_dir"])["labels"])
        path = figures.pca_grid({s: np.asarray(cl[s]["coords2d"]) for s in spaces}, labels,
                                {s: np.asarray(cl[s]["labels"]["kmeans"]) for s in spaces},
                                {s: np.asarray(cl[s]["labels"]["gmm"]) for s in spaces},
                                os.path.join(fig_dir, f"{name}_pca.png"), title=f"{name}: GW, FM, P (2-D PCA)",
                                class_names=res["gradcam"].get("class_names"))
        written.append(path)
        overlay = os.path.join(fig_dir, f"{name}_gradcam.png")
        shutil.copyfile(os.path.join(res["gradcam_dir"], "overlays.png"), overlay)
        written.append(overlay)
        wrong = res["misclassified"]["most_confident_wrong"]
        if wrong:
            written.append(_wrong_figure(res, wrong, os.path.join(fig_dir, f"{name}_misclassified.png"), seed))
    first = results["models"][models[0]]
    written.append(_samples_figure(first, base_spec, os.path.join(fig_dir, "samples.png"), seed))
    results["figures"] = [os.path.relpath(p, out_dir) for p in written]
    text = tables_markdown(results)
    pipeline._write_text(os.path.join(out_dir, "tables.md"), text)
    for name, rows, columns in table_csvs(results):
        pipeline.write_csv(os.path.join(out_dir, name), rows, columns)
    log(text)


def _open_for(res: dict, base_spec: str, seed: int):
    from . import checkpoint, data

    meta = checkpoint.load_meta(res["checkpoint"])
    return data.load_for_checkpoint(base_spec, meta, seed=seed), meta


def _wrong_figure(res, indices, path, seed):
    from clustering import figures

    ds, meta = _open_for(res, res["gradcam"]["data"], seed)
    batch = ds.take(indices)
    cams = pipeline.load_cams(res["gradcam_dir"])
    preds = np.asarray(cams["preds"])[indices]
    names = meta["class_names"]
    title = "most confidently wrong (row: true class; " + ", ".join(
        f"{names[t]}->{names[p]}" for t, p in zip(batch.labels, preds)) + ")"
    return figures.image_grid(batch.images, batch.labels, names, path, per_class=len(indices),
                              overlays=np.asarray(cams["cams"])[indices], title=title)


def _samples_figure(res, base_spec, path, seed):
    from clustering import figures

    ds, meta = _open_for(res, res["gradcam"]["data"], seed)
    labels = np.asarray(ds.labels)
    indices = [int(i) for c in range(min(ds.num_classes, pipeline.FIGURE_CLASSES))
               for i in np.flatnonzero(labels == c)[:6]]
    batch = ds.take(indices)
    return figures.image_grid(batch.images, batch.labels, meta["class_names"], path, per_class=6,
                              title=f"samples of {ds.spec}")


# ----------------------------------------------------------------------------- tables

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
    t1_columns = ["Model", *pipeline.TABLE1_COLUMNS, *pipeline.INTER_COLUMNS, "Cos_Sim_GW_pred", "Inter_GW_pred"]
    out = [("table1_similarity.csv", t1, t1_columns)]
    for method, fname in (("kmeans", "table2_kmeans.csv"), ("gmm", "table3_gmm.csv")):
        rows, columns, _ = _cluster_rows(results, method, (*SPACES, CONTROL))
        out.append((fname, rows, columns))
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
             "Grad-CAM columns compare the maps of pairs of same-class images (" +
             _pairs_note(results) + "); AUC is AUC-Judd with the second map binarised at half its range.", "",
             "## Table 2: clustering using KMeans", ""]
    rows, columns, header = _cluster_rows(results, "kmeans", SPACES)
    parts += [pipeline.markdown_table(rows, columns, 2, header), "", "## Table 3: clustering using GMM", ""]
    rows, columns, header = _cluster_rows(results, "gmm", SPACES)
    parts += [pipeline.markdown_table(rows, columns, 2, header), "",
              "Clustered spaces: " + _space_notes(results) + ".", "",
              "## Ours: separation (inter-class similarity) and the predicted-label control", "",
              pipeline.markdown_table(t1, ["Model", "Cos_Sim_GW", "Inter_GW", "Gap_GW", "Cos_Sim_GW_pred",
                                           "Inter_GW_pred", "Cos_Sim_P", "Inter_P", "Gap_P", "Cos_Sim_FM",
                                           "Inter_FM", "Gap_FM"]), "",
              "The true-label GW of the fc layer is (softmax - onehot(y)) x features: it carries the label by "
              "construction. The predicted-label rows (GW_pred) use argmax instead and show what the model "
              "itself knows.", ""]
    for method, title in (("kmeans", "KMeans"), ("gmm", "GMM")):
        rows, columns, header = _cluster_rows(results, method, ("GW", CONTROL))
        parts += [f"### {title}: true-label vs predicted-label GW", "",
                  pipeline.markdown_table(rows, columns, 2, header), ""]
    acc = _accuracy_rows(results)
    parts += ["## Ours: held-out accuracy and Hungarian-matched cluster accuracy", "",
              pipeline.markdown_table(acc, list(dict.fromkeys(k for r in acc for k in r)), 3), ""]
    loc = [res["table1"] for res in results["models"].values() if "Mask_CC" in res["table1"]]
    if loc:
        parts += ["## Ours: Grad-CAM localisation (map vs object mask)", "",
                  pipeline.markdown_table(loc, ["Model", "Mask_CC", "Mask_KLD", "Mask_SIM", "Mask_SSIM", "Mask_AUC"]),
                  ""]
    mis = _misclassified_rows(results)
    parts += ["## Learning from misclassifications", "",
              "For each misclassified held-out image: is its nearest class centroid (cosine, centroids of the "
              "correctly classified images) its true class or its predicted class?", "",
              pipeline.markdown_table(mis, list(mis[0]), 3) if mis else "No misclassified images.", ""]
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
    return pipeline.markdown_table(rows, ["Model", *pipeline.TABLE1_COLUMNS], 6,
                                   ["Model\\Matrices", *pipeline.TABLE1_COLUMNS])


def _pairs_note(results: dict) -> str:
    notes = {f"{c['pairs']} pairs{' (seeded sample)' if c['sampled'] else ''}"
             for c in (res["gradcam"]["consistency"] for res in results["models"].values())}
    return ", ".join(sorted(notes)) + " per model"


def _space_notes(results: dict) -> str:
    first = next(iter(results["models"].values()))["clustering"]
    return "; ".join(f"{s}: {first[s]['description']}" for s in first) + \
        "; silhouette is computed in that reduced space under the cluster labels"
