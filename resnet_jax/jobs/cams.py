"""The Grad-CAM store: `run_gradcam` computes a data set's maps and their agreement scores into a
directory, `load_cams` reads it back."""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import numpy as np

from resnet_jax.core import files
from resnet_jax.errors import UserError

GRADCAM_FORMAT = "resnet-jax-gradcam/1"
FIGURE_CLASSES = 10  # image grids show at most this many classes (one row each)


def run_gradcam(ckpt_dir: str, data_spec: str, out_dir: str, layer: str = "layer4", method: str = "gradcam",
                label_source: str = "true", limit: int | None = None, batch_size: int = 64, max_pairs: int = 2000,
                per_class: int = 4, seed: int = 0, progress: bool = True, loaded=None,
                precision: str = "fp32") -> dict:
    """Computes Grad-CAM maps of a data set and their agreement scores; returns the summary.

    Batches are read and transferred on a background thread while the previous one computes
    (`prefetch.prefetch`); `precision` "bf16" computes in bfloat16 (`precision.py`).

    Writes into out_dir (replaced whole, only once everything is computed): `cams.npy` (N, H, W)
    float32, `labels.npy`, `preds.npy`, `degenerate.npy`, `ids.json`, `metrics.json`, `metrics.csv`
    and `overlays.png` (a few images per class with their maps, for up to FIGURE_CLASSES classes).
    `data_spec` may be a loaded `data.Dataset`, `loaded` the restored checkpoint of `ckpt_dir`.
    """
    from tqdm.auto import tqdm

    from resnet_jax import plots as figures
    from resnet_jax.metrics import agreement

    import jax

    from resnet_jax.core import checkpoint, data, gradcam, grads, precision as precisions
    from resnet_jax.core.prefetch import prefetch

    grads.check_label_source(label_source)
    precisions.check(precision)
    files.check_ours(out_dir, "metrics.json", GRADCAM_FORMAT)
    ckpt = checkpoint.load(ckpt_dir) if loaded is None else loaded
    if isinstance(data_spec, data.Dataset):
        ds = data_spec
        data.check_classes(ds, ckpt.meta)
    else:
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
                                           labels if label_source == "true" else None, layer, method)
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
               "limit": limit, "layer": layer, "method": method, "label_source": label_source,
               "precision": precision,
               "accuracy": float(np.mean(preds == labels)), "degenerate_maps": int(degenerate.sum()),
               "consistency": agreement.consistency(cams, labels, max_pairs=max_pairs, seed=seed),
               "localisation": agreement.localisation(cams, np.concatenate(masks)) if masks else None}
    summary["compared_with"] = ("same-class pairs of maps, different-class pairs as their baseline" + (" and object masks" if masks else "")
                                + ("" if masks else " (the data has no object masks)"))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".", prefix=".tmp-gradcam-")
    try:
        np.save(os.path.join(tmp, "cams.npy"), cams.astype(np.float32))
        np.save(os.path.join(tmp, "labels.npy"), labels)
        np.save(os.path.join(tmp, "preds.npy"), preds)
        np.save(os.path.join(tmp, "degenerate.npy"), degenerate)
        files.write_json(os.path.join(tmp, "ids.json"), [str(i) for i in ds.ids[:n]])
        files.write_json(os.path.join(tmp, "metrics.json"), summary)
        files.write_csv(os.path.join(tmp, "metrics.csv"), cam_metric_rows(summary),
                  ("comparison", "metric", "mean", "median", "std", "n", "undefined"))
        order = [i for c in sorted(shown) for i, _ in shown[c]]
        figures.image_grid(np.stack([img for c in sorted(shown) for _, img in shown[c]]), labels[order],
                           ckpt.meta["class_names"], os.path.join(tmp, "overlays.png"), per_class=per_class,
                           overlays=cams[order], title=f"{ckpt.meta['model']} {method} ({layer}, {label_source} class)")
        files.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def cam_metric_rows(summary: dict) -> list[dict]:
    """Returns one row per (comparison, metric) of a Grad-CAM summary."""
    rows = []
    parts = [("same-class pairs", summary["consistency"]["metrics"])]
    if summary["consistency"].get("different"):
        parts.append(("different-class pairs", summary["consistency"]["different"]["metrics"]))
    if summary.get("localisation"):
        parts.append(("object mask", summary["localisation"]))
    for comparison, metrics in parts:
        for name, stats in metrics.items():
            rows.append({"comparison": comparison, "metric": name, **stats})
    return rows


def load_cams(cams_dir: str) -> dict:
    """Returns {"cams", "labels", "preds", "summary"} of a directory written by run_gradcam."""
    path = os.path.join(cams_dir, "metrics.json")
    if not os.path.exists(path):
        raise UserError(f"{cams_dir} holds no Grad-CAM results (no metrics.json): run 'resnet-jax gradcam' first")
    summary = files.read_json(path)
    made_by = "'resnet-jax gradcam'"
    return {"cams": files.load_npy(os.path.join(cams_dir, "cams.npy"), mmap=True, made_by=made_by),
            "labels": files.load_npy(os.path.join(cams_dir, "labels.npy"), made_by=made_by),
            "preds": files.load_npy(os.path.join(cams_dir, "preds.npy"), made_by=made_by), "summary": summary}
