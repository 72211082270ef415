"""The analyses the command line runs: composes the device side (checkpoints, data, Grad-CAM,
per-example gradients) with the host side (`metrics`, `clustering`) on host arrays.

Representations of each image, as in the draft:
- GW: the per-example gradient of the loss with respect to the fc weights (kernel and bias);
- P: the softmax probabilities; FM: the pooled layer4 features (the fc input).
For an fc store without projection GW is used through the Kronecker identity
<g_i, g_j> = (h_i.h_j + 1)(delta_i.delta_j) with delta = softmax(logits) - onehot(label) in float64,
which is exact and never forms the N x (d*C + C) matrix; otherwise the stored rows are used.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import tempfile

import numpy as np

from .errors import UserError

GRADCAM_FORMAT = "resnet-jax-gradcam/1"
FIGURE_CLASSES = 10  # image grids show at most this many classes (one row each)
TABLE1_COLUMNS = ("Cos_Sim_GW", "Cos_Sim_P", "Cos_Sim_FM", "Grad_Cam_CC", "Grad_Cam_KLD", "Grad_Cam_SIM",
                  "Grad_Cam_SSIM", "Grad_Cam_AUC")
INTER_COLUMNS = ("Inter_GW", "Inter_P", "Inter_FM", "Gap_GW", "Gap_P", "Gap_FM")
CAM_COLUMN_METRIC = {"Grad_Cam_CC": "cc", "Grad_Cam_KLD": "kld", "Grad_Cam_SIM": "sim", "Grad_Cam_SSIM": "ssim",
                     "Grad_Cam_AUC": "auc_judd"}


# ----------------------------------------------------------------------------- files

def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temporary file in the same directory, then rename)."""
    _write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict], columns) -> None:
    """Writes rows (dicts) as CSV with the given columns, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k), 6) for k in columns})
    _write_text(path, buf.getvalue())


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns, digits: int = 4, header=None) -> str:
    """Returns a markdown table of rows (dicts) over columns; None prints as '-'."""
    header = list(header or columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def replace_dir(tmp_dir: str, out_dir: str) -> None:
    """Moves a finished temporary directory into place, replacing an older out_dir."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


# ----------------------------------------------------------------------------- Grad-CAM

def run_gradcam(ckpt_dir: str, data_spec: str, out_dir: str, layer: str = "layer4", method: str = "gradcam",
                target: str = "true", limit: int | None = None, batch_size: int = 64, max_pairs: int = 2000,
                per_class: int = 4, seed: int = 0, progress: bool = True, precision: str = "fp32") -> dict:
    """Computes Grad-CAM maps of a data set and their agreement scores; returns the summary.

    Batches are read and transferred on a background thread while the previous one computes
    (`prefetch.prefetch`); `precision` "bf16" computes in bfloat16 (`precision.py`).

    Writes into out_dir (replaced whole, only once everything is computed): `cams.npy` (N, H, W)
    float32, `labels.npy`, `preds.npy`, `degenerate.npy`, `ids.json`, `metrics.json`, `metrics.csv`
    and `overlays.png` (a few images per class with their maps, for up to FIGURE_CLASSES classes).
    """
    from tqdm.auto import tqdm

    from clustering import figures
    from metrics import agreement

    import jax

    from . import checkpoint, data, gradcam, precision as precisions
    from .prefetch import prefetch

    if target not in gradcam.TARGETS:
        raise UserError(f"unknown target {target!r}: choose one of {', '.join(gradcam.TARGETS)}")
    _check_out_dir(out_dir, GRADCAM_FORMAT)
    ckpt = checkpoint.load(ckpt_dir)
    ds = data.load_for_checkpoint(data_spec, ckpt.meta, seed=seed)
    model = precisions.with_precision(ckpt.model, precision)
    n = len(ds) if limit is None else min(len(ds), int(limit))
    if n < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    cams, logits, degenerate, masks, shown = [], [], [], [], {}
    bar = tqdm(total=n, desc=f"Grad-CAM {ckpt.meta['model']}", unit="img", disable=not progress, leave=False)
    needed = itertools.islice(ds.batches(batch_size), -(-n // batch_size))
    batches = prefetch(needed, lambda b: (b, jax.device_put(b.images)))
    for batch, on_device in batches:
        take = min(len(batch.labels), n - sum(len(c) for c in cams))
        if take <= 0:
            break
        images, labels = batch.images[:take], batch.labels[:take]
        out = gradcam.gradcam_with_outputs(model, ckpt.variables, on_device[:take],
                                           labels if target == "true" else None, layer, method)
        cams.append(np.asarray(out.cams))
        logits.append(np.asarray(out.logits))
        degenerate.append(np.asarray(out.degenerate))
        if batch.masks is not None:
            masks.append(batch.masks[:take])
        offset = sum(len(c) for c in cams) - take
        for k, label in enumerate(labels):
            if int(label) not in shown and len(shown) >= FIGURE_CLASSES:
                continue
            if len(shown.setdefault(int(label), [])) < per_class:
                shown[int(label)].append((offset + k, images[k]))
        bar.update(take)
    batches.close()
    bar.close()
    cams, logits, degenerate = np.concatenate(cams), np.concatenate(logits), np.concatenate(degenerate)
    labels = np.asarray(ds.labels[:n], np.int32)
    preds = np.argmax(logits, -1).astype(np.int32)
    summary = {"format": GRADCAM_FORMAT, "checkpoint": os.path.abspath(ckpt_dir), "checkpoint_step": ckpt.step,
               "model": ckpt.meta["model"], "class_names": ckpt.meta["class_names"], "data": ds.spec, "n": int(n),
               "limit": limit, "layer": layer, "method": method, "target": target, "precision": precision,
               "accuracy": float(np.mean(preds == labels)), "degenerate_maps": int(degenerate.sum()),
               "consistency": agreement.consistency(cams, labels, max_pairs=max_pairs, seed=seed),
               "localisation": agreement.localisation(cams, np.concatenate(masks)) if masks else None}
    summary["compared_with"] = ("same-class pairs of maps" + (" and object masks" if masks else "")
                                + ("" if masks else " (the data has no object masks)"))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".", prefix=".tmp-gradcam-")
    try:
        np.save(os.path.join(tmp, "cams.npy"), cams.astype(np.float32))
        np.save(os.path.join(tmp, "labels.npy"), labels)
        np.save(os.path.join(tmp, "preds.npy"), preds)
        np.save(os.path.join(tmp, "degenerate.npy"), degenerate)
        write_json(os.path.join(tmp, "ids.json"), [str(i) for i in ds.ids[:n]])
        write_json(os.path.join(tmp, "metrics.json"), summary)
        write_csv(os.path.join(tmp, "metrics.csv"), cam_metric_rows(summary),
                  ("comparison", "metric", "mean", "std", "n", "undefined"))
        order = [i for c in sorted(shown) for i, _ in shown[c]]
        figures.image_grid(np.stack([img for c in sorted(shown) for _, img in shown[c]]), labels[order],
                           ckpt.meta["class_names"], os.path.join(tmp, "overlays.png"), per_class=per_class,
                           overlays=cams[order], title=f"{ckpt.meta['model']} {method} ({layer}, {target} class)")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def cam_metric_rows(summary: dict) -> list[dict]:
    """Returns one row per (comparison, metric) of a Grad-CAM summary."""
    rows = []
    parts = [("same-class pairs", summary["consistency"]["metrics"])]
    if summary.get("localisation"):
        parts.append(("object mask", summary["localisation"]))
    for comparison, metrics in parts:
        for name, stats in metrics.items():
            rows.append({"comparison": comparison, "metric": name, **stats})
    return rows


def _check_out_dir(out_dir: str, fmt: str) -> None:
    """Refuses an out_dir that holds something other than an earlier output of the same kind."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        manifest = os.path.join(out_dir, "metrics.json")
        try:
            with open(manifest) as f:
                ours = json.load(f).get("format") == fmt
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UserError(f"{out_dir} exists and holds something else: pass an empty or new --out directory")


def load_cams(cams_dir: str) -> dict:
    """Returns {"cams", "labels", "preds", "summary"} of a directory written by run_gradcam."""
    path = os.path.join(cams_dir, "metrics.json")
    if not os.path.exists(path):
        raise UserError(f"{cams_dir} holds no Grad-CAM results (no metrics.json): run 'resnet-jax gradcam' first")
    with open(path) as f:
        summary = json.load(f)
    return {"cams": np.load(os.path.join(cams_dir, "cams.npy"), mmap_mode="r"),
            "labels": np.load(os.path.join(cams_dir, "labels.npy")),
            "preds": np.load(os.path.join(cams_dir, "preds.npy")), "summary": summary}


# ----------------------------------------------------------------------------- representations

def softmax64(logits):
    """Returns softmax probabilities (N, C) computed in float64 (so 1 - p is not rounded to 0)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def representations(store: dict) -> dict:
    """Returns the store's representations and how GW is available.

    {"fm", "p", "labels", "preds", "gw_kind": "kronecker" | "explicit", "gw" (explicit rows or None),
     "probs64"}. "kronecker" means GW is the fc gradient, recoverable exactly from FM and the logits.
    """
    man = store["manifest"]
    run = man.get("run", man)
    kronecker = run.get("grad_params") == "fc" and run.get("projection") is None
    return {"fm": np.asarray(store["fm"], np.float64), "p": np.asarray(store["p"], np.float64),
            "labels": np.asarray(store["labels"]), "preds": np.asarray(store["preds"]),
            "probs64": softmax64(store["logits"]), "gw_kind": "kronecker" if kronecker else "explicit",
            "gw": None if kronecker else np.asarray(store["gw"], np.float64),
            "label_source": run.get("label_source", "true")}


def gw_gram(rep: dict, gradient_labels) -> np.ndarray:
    """Returns the Gram matrix (N, N) of the fc gradients built with `gradient_labels`."""
    from metrics import similarity

    return similarity.fc_gradient_gram(rep["fm"], rep["probs64"], gradient_labels)


def unit_rows(X) -> np.ndarray:
    """Returns the rows of X (N, D) scaled to unit length (the geometry of the cosine similarities)."""
    X = np.asarray(X, np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{int(np.sum(norms == 0))} rows are all zero: their direction is undefined")
    return X / norms


def unit_gram(G) -> np.ndarray:
    """Returns the Gram matrix (N, N) of the unit-length rows: G_ij / sqrt(G_ii G_jj)."""
    d = np.sqrt(np.diag(G))
    if np.any(d == 0):
        raise ValueError(f"{int(np.sum(d == 0))} rows are all zero: their direction is undefined")
    return G / np.outer(d, d)


def gw_rows(rep: dict, gradient_labels) -> np.ndarray:
    """Returns explicit GW rows (N, D): the store's, or the fc gradients built with gradient_labels."""
    from metrics import similarity

    if rep["gw_kind"] == "explicit":
        return rep["gw"]
    return similarity.fc_gradients(rep["fm"], rep["probs64"], gradient_labels)


def cosine_summaries(rep: dict) -> dict:
    """Returns {"GW", "GW_pred", "P", "FM": CosineSummary as dict} grouped by the true labels."""
    from dataclasses import asdict

    from metrics import similarity

    labels = rep["labels"]
    out = {"P": similarity.pairwise_cosine_summary(rep["p"], labels),
           "FM": similarity.pairwise_cosine_summary(rep["fm"], labels)}
    if rep["gw_kind"] == "kronecker":
        out["GW"] = similarity.fc_gradient_cosine_summary(rep["fm"], rep["probs64"], labels, labels)
        out["GW_pred"] = similarity.fc_gradient_cosine_summary(rep["fm"], rep["probs64"], labels, rep["preds"])
    else:
        out["GW"] = similarity.pairwise_cosine_summary(rep["gw"], labels)
    return {k: asdict(v) for k, v in out.items()}


def table1_row(name: str, store: dict, cams: dict | None) -> dict:
    """Returns one row of Table 1 (draft columns plus inter-class means and gaps) and its details."""
    rep = representations(store)
    summaries = cosine_summaries(rep)
    row = {"Model": name}
    for key in ("GW", "P", "FM"):
        row[f"Cos_Sim_{key}"] = summaries[key]["intra"]
        row[f"Inter_{key}"] = summaries[key]["inter"]
        row[f"Gap_{key}"] = summaries[key]["gap"]
    if "GW_pred" in summaries:
        row["Cos_Sim_GW_pred"] = summaries["GW_pred"]["intra"]
        row["Inter_GW_pred"] = summaries["GW_pred"]["inter"]
    if cams is not None:
        metrics = cams["summary"]["consistency"]["metrics"]
        for column, metric in CAM_COLUMN_METRIC.items():
            row[column] = metrics[metric]["mean"]
        loc = cams["summary"].get("localisation")
        if loc:
            for column, metric in CAM_COLUMN_METRIC.items():
                row["Mask_" + column[len("Grad_Cam_"):]] = loc[metric]["mean"]
    return {"row": row, "summaries": summaries, "gw_kind": rep["gw_kind"]}


def similarity_table(stores: list[str], cams_dirs: list[str] | None = None, names: list[str] | None = None):
    """Returns (rows, details) of Table 1 for extract stores and optional Grad-CAM directories."""
    from .extract import load_store

    if cams_dirs and len(cams_dirs) != len(stores):
        raise UserError(f"{len(stores)} stores but {len(cams_dirs)} --cams directories: pass one per store, "
                        f"in the same order")
    rows, details = [], []
    for k, path in enumerate(stores):
        store = load_store(path)
        cams = load_cams(cams_dirs[k]) if cams_dirs else None
        if cams is not None and len(cams["labels"]) != len(store["labels"]):
            raise UserError(f"{cams_dirs[k]} holds {len(cams['labels'])} maps but {path} holds "
                            f"{len(store['labels'])} images: compute both with the same data and --limit")
        name = names[k] if names else store["manifest"]["run"].get("model", os.path.basename(path.rstrip("/")))
        result = table1_row(name, store, cams)
        rows.append(result["row"])
        details.append(result)
    return rows, details
