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

from resnet_jax.paper import analysis, detection, tables
from resnet_jax.core import files
from resnet_jax.errors import UserError
from resnet_jax.core.models import MODEL_NAMES

# Each model trains until its validation slice (a stratified 10% of the training split) reaches the
# target (0.95 on digits), stops improving for `patience` epochs, or hits its epoch cap, over which
# the learning rate warms up and decays (cosine). On digits every epoch renders the training glyphs
# afresh (new position and noise: the deep models otherwise memorise the noise of 1,131 images) and
# BatchNorm statistics are re-estimated before each validation (train.precise_batch_stats).
# ResNet-101/152 start every residual block's last BatchNorm scale at zero and train at twice the
# shared rate: with the shared recipe they stayed near chance for four epochs and needed caps of 16
# and 24 (ResNet-152 at a cap of 4: held-out 0.68 this way, 0.20 the shared way; see docs/guides/training.md).
# With an accelerator, where an epoch takes seconds, every cap is ACCELERATOR_EPOCHS and the target
# decides.
DEFAULT_EPOCHS = {"resnet18": 10, "resnet34": 8, "resnet50": 8, "resnet101": 10, "resnet152": 10}
ACCELERATOR_EPOCHS = 40
_DEEP = {"batch_size": 16, "learning_rate": 1e-3, "warmup_epochs": 0.5, "patience": 3}
_DEEPEST = dict(_DEEP, learning_rate=2e-3, zero_init_residual=True)
DEFAULT_SETTINGS = {
    "resnet18": {"batch_size": 64, "learning_rate": 2e-3, "warmup_epochs": 1.0, "patience": 3},
    "resnet34": _DEEP, "resnet50": _DEEP, "resnet101": _DEEPEST, "resnet152": _DEEPEST,
}
QUICK = {"models": ("resnet18",), "epochs": 3, "limit": 200}
PROJECT_DIM = 512  # projected all-parameter gradients of the detection scores (squared norms kept in expectation)


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
        seed: int = 0, grad_align: float = 0.0, grad_mi: float = 0.0, target_accuracy: float | None = None,
        time_budget: float | None = None, progress: bool = True, log=print, seeds: int = 1) -> dict:
    """Runs the whole job; returns the results dict that is also written to results.json.

    Each model trains until its validation slice (carved from the training split) reaches
    `target_accuracy` (default: 0.95 on digits), stops improving, or hits its epoch cap (`epochs`,
    default `DEFAULT_EPOCHS`) or `time_budget` seconds; the held-out split is only analysed.

    With `grad_align` (or `grad_mi`) > 0 every model is trained twice on the same data and seed,
    plainly and with the gradient-alignment loss, and the tables put the two side by side (the
    aligned run is named e.g. "resnet18+align").

    With `seeds` > 1 every model is trained and analysed with the seeds seed, seed + 1, ...,
    seed + seeds - 1 (training, the digits' rendering and the samples; cached as
    `runs/<model>-seed<s>/`), and every table cell is the mean ± standard deviation over them
    (`replicate.aggregate`; results.json keeps each seed's results under "runs"). The figures show
    the first seed.
    """
    from resnet_jax.core import checkpoint, data

    ckpts = dict(ckpts or {})
    unknown = sorted(set(ckpts) - set(models))
    if unknown:
        raise UserError(f"--ckpt names {', '.join(unknown)}, which is not in --models")
    epochs = dict(default_epochs() if not quick else {m: QUICK["epochs"] for m in MODEL_NAMES}, **(epochs or {}))
    if quick and limit is None:
        limit = QUICK["limit"]
    kind, arg, split = data.parse_spec(data_spec)
    base_spec = kind if arg is None else f"{kind}:{arg}"
    if grad_align < 0 or grad_mi < 0:
        raise UserError("--grad-align and --grad-mi must be >= 0")
    aligned = grad_align > 0 or grad_mi > 0
    if aligned and ckpts:
        raise UserError("--grad-align trains each model twice: it cannot be combined with --ckpt")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if seeds > 1 and ckpts:
        raise UserError("--seeds trains each model once per seed: it cannot be combined with --ckpt")
    config = {"models": models, "data": base_spec, "quick": quick, "seed": seed, "seeds": seeds, "limit": limit,
              "grad_align": grad_align, "grad_mi": grad_mi, "target_accuracy": target_accuracy,
              "time_budget": time_budget,
              "epochs": {m: epochs[m] for m in models if m not in ckpts},
              "training": {m: DEFAULT_SETTINGS[m] for m in models if m not in ckpts},
              "checkpoints": {m: os.path.abspath(p) for m, p in ckpts.items()}}
    for name, path in ckpts.items():  # every given checkpoint readable before anything is written
        checkpoint.load_meta(path)
    _check_heldout(base_spec, limit, seed)
    _prepare_out_dir(out_dir, config, force)
    started = time.perf_counter()
    results = {"config": config, "models": {}, "timings": {}}
    per_seed, loaded = {}, {}
    runs = [(m, m, 0.0, 0.0) for m in models]
    if aligned:
        runs = [r for m in models for r in ((m, m, 0.0, 0.0), (f"{m}+align", m, grad_align, grad_mi))]
    runs = [(name, arch, lam1, lam2, s) for name, arch, lam1, lam2 in runs for s in range(seed, seed + seeds)]
    for i, (name, arch, lam1, lam2, s) in enumerate(runs):
        key = name if seeds == 1 else f"{name}-seed{s}"
        log(f"[{i + 1}/{len(runs)}] {key}")
        training = {"epochs": epochs.get(arch), "target_accuracy": target_accuracy, "time_budget": time_budget,
                    "grad_align": lam1, "grad_mi": lam2}
        res, objects = _run_model(name, arch, base_spec, ckpts.get(name), training, out_dir, limit, s, progress,
                                  log, run_name=key)
        loaded.setdefault(name, objects)  # the figures show the first seed
        results["timings"][key] = res.pop("timings")
        per_seed.setdefault(name, {})[key] = res
    if seeds == 1:
        results["models"] = {name: next(iter(r.values())) for name, r in per_seed.items()}
    else:
        from resnet_jax.paper import replicate

        results["runs"] = per_seed
        results["models"] = {name: replicate.aggregate(list(r.values())) for name, r in per_seed.items()}
    _figures_and_tables(results, loaded, out_dir, log)
    results["timings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    files.write_json(os.path.join(out_dir, "results.json"), results)
    return results


def default_epochs() -> dict:
    """Returns the epoch cap per model: DEFAULT_EPOCHS on the CPU, ACCELERATOR_EPOCHS on a GPU or TPU."""
    import jax

    if jax.default_backend() == "cpu":
        return dict(DEFAULT_EPOCHS)
    return {m: ACCELERATOR_EPOCHS for m in MODEL_NAMES}


def _check_heldout(base_spec: str, limit: int | None, seed: int) -> None:
    """Refuses held-out data that cannot be clustered into its classes: fewer images than classes, or
    a class without images."""
    from resnet_jax.core import data

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


def _holds_work(out_dir: str) -> bool:
    """Whether out_dir holds more than a configuration (a run that failed before its first model wrote nothing)."""
    runs = os.path.join(out_dir, "runs")
    return os.path.exists(os.path.join(out_dir, "results.json")) or (os.path.isdir(runs) and bool(os.listdir(runs)))


def _prepare_out_dir(out_dir: str, config: dict, force: bool) -> None:
    path = os.path.join(out_dir, "config.json")
    ours = files.is_ours(out_dir, "config.json")
    if ours is False:
        raise UserError(f"{out_dir} exists and holds no reproduce results: pass another --out or remove it")
    if ours:
        old = files.read_json(path)
        if old != json.loads(json.dumps(config)):
            if not force and _holds_work(out_dir):
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
                raise UserError(f"{out_dir} holds results of another configuration ({', '.join(diff)} differ): "
                                f"pass another --out, or --force to replace them")
            shutil.rmtree(out_dir)
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    files.write_json(path, config)


def _run_model(name, arch, base_spec, ckpt_dir, training, out_dir, limit, seed, progress, log,
               run_name=None) -> tuple[dict, dict]:
    """Trains (or reuses) one model and computes its results; returns (results, loaded): `loaded`
    holds the objects the figures reuse ("ds" the held-out Dataset, "cams", "meta"). `training` holds
    the TrainConfig fields of the run (epochs, target_accuracy, time_budget, grad_align, grad_mi)."""
    from resnet_jax.jobs import cams as camstore, extract
    from resnet_jax.core import checkpoint, data
    from resnet_jax.training import train

    run_dir = os.path.join(out_dir, "runs", run_name or name)
    timings = {}
    t = time.perf_counter()
    if ckpt_dir is None:
        ckpt_dir = os.path.join(run_dir, "checkpoint")
        # Redrawn digits move the glyph anywhere on the canvas: no shift augmentation on top.
        shift = 0 if data.parse_spec(base_spec)[0] == "digits" else 4
        config = train.TrainConfig(model=arch, data=base_spec, **training, **DEFAULT_SETTINGS[arch], seed=seed,
                                   augment_shift=shift)
        stop = _finished_training(ckpt_dir, config)
        if stop is None:
            # held_out=False: the held-out accuracy comes from the store, whose pass runs the same images.
            stop = train.fit(config, ckpt_dir, progress=progress, log=lambda s: log("  " + s), held_out=False)["stop"]
        val = stop["validation_accuracy"]
        log(f"  training stopped ({stop['reason']}) at epoch {stop['epoch']}/{config.epochs}: validation accuracy "
            f"{'-' if val is None else f'{val:.4f}'}, target {stop['target_accuracy']}, {stop['seconds']:.0f} s")
    ckpt = checkpoint.load(ckpt_dir)
    # the held-out split, opened once and decoded once for extract, Grad-CAM and the figures
    ds = data.load_for_checkpoint(base_spec, ckpt.meta, seed=seed).cached()
    timings["train"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    store_dir = os.path.join(run_dir, "store")
    extract.run_extract(ckpt_dir, ds, store_dir, limit=limit, data_seed=seed, progress=progress, loaded=ckpt,
                        log=lambda s: log("  " + s))
    timings["extract"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    cams_dir = os.path.join(run_dir, "gradcam")
    cams = _cached_cams(cams_dir, ckpt_dir, ckpt.step, limit)
    if cams is None:
        camstore.run_gradcam(ckpt_dir, ds, cams_dir, limit=limit, seed=seed, progress=progress, loaded=ckpt)
        cams = camstore.load_cams(cams_dir)
    timings["gradcam"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    train_rep, projected, pred_cams = _detection_inputs(run_dir, ckpt_dir, ckpt, base_spec, ds, limit, seed,
                                                        progress, log)
    timings["detection_inputs"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    rep = analysis.Representations.from_store(extract.load_store(store_dir))
    table1 = analysis.table1_row(name, rep, cams)
    clusters = analysis.cluster_spaces(rep, seed)
    report = analysis.misclassification_report(rep)
    detected = detection.report(rep, train_rep, projected, pred_cams, seed=seed)
    timings["analysis"] = round(time.perf_counter() - t, 1)
    accuracy_heldout = float(np.mean(rep.labels == rep.preds))
    log(f"  held-out accuracy {accuracy_heldout:.4f}; Cos_Sim GW {table1['row']['Cos_Sim_GW']:.3f} "
        f"P {table1['row']['Cos_Sim_P']:.3f} FM {table1['row']['Cos_Sim_FM']:.3f}; KMeans ARI GW "
        f"{clusters['GW']['scores']['kmeans']['ari']:.2f} P {clusters['P']['scores']['kmeans']['ari']:.2f} "
        f"FM {clusters['FM']['scores']['kmeans']['ari']:.2f}")
    result = {"checkpoint": os.path.abspath(ckpt_dir), "store": os.path.abspath(store_dir),
              "gradcam_dir": os.path.abspath(cams_dir), "checkpoint_test_accuracy": ckpt.meta.get("test_accuracy"),
              "training_stop": ckpt.meta.get("stop"),
              "accuracy": accuracy_heldout, "n": int(len(rep.labels)), "table1": table1["row"],
              "cosine": table1["summaries"], "gw_kind": table1["gw_kind"], "gradcam": cams["summary"],
              "clustering": clusters, "predictions": analysis.prediction_scores(rep),
              "misclassified": report, "detection": detected, "timings": timings}
    return result, {"ds": ds, "cams": cams, "meta": ckpt.meta}


def _finished_training(ckpt_dir: str, config) -> dict | None:
    """Returns the stop record of a cached checkpoint that finished training with this configuration
    (so a warm run restores nothing to train), else None: `train.fit` then resumes or refuses it."""
    from resnet_jax.core import checkpoint
    from resnet_jax.training import train

    if checkpoint.latest_step(ckpt_dir) is None:
        return None
    meta = checkpoint.load_meta(ckpt_dir)
    stop = meta.get("stop")
    if stop is None or stop["reason"] == "time_budget" or meta.get("train_config") != train.recorded_config(config):
        return None
    return stop


def _detection_inputs(run_dir, ckpt_dir, ckpt, base_spec, ds, limit, seed, progress, log):
    """Returns (train, projected, pred_cams) for `detection.report`: the Representations of the training
    split (None when the data has none), the held-out images' projected all-parameter gradients at the
    predicted label (N, PROJECT_DIM) and their predicted-class Grad-CAM maps; each cached in run_dir."""
    from resnet_jax.jobs import cams as camstore, extract
    from resnet_jax.core import data

    sub = lambda s: log("  " + s)  # noqa: E731
    try:
        train_ds = data.load_for_checkpoint(base_spec, ckpt.meta, split="train", seed=seed)
    except UserError as e:
        log(f"  detection without the scores that need training images: {e}")
        train = None
    else:
        train_dir = os.path.join(run_dir, "train-store")
        extract.run_extract(ckpt_dir, train_ds, train_dir, data_seed=seed, progress=progress, loaded=ckpt, log=sub)
        train = analysis.Representations.from_store(extract.load_store(train_dir))
    proj_dir = os.path.join(run_dir, "store-pred-all")
    extract.run_extract(ckpt_dir, ds, proj_dir, grad_params="all", label_source="predicted",
                        project_dim=PROJECT_DIM, seed=seed, limit=limit, data_seed=seed, progress=progress,
                        loaded=ckpt, log=sub)
    projected = np.asarray(extract.load_store(proj_dir)["gw"])
    cams_dir = os.path.join(run_dir, "gradcam-pred")
    cams = _cached_cams(cams_dir, ckpt_dir, ckpt.step, limit, label_source="predicted")
    if cams is None:
        camstore.run_gradcam(ckpt_dir, ds, cams_dir, label_source="predicted", limit=limit, seed=seed,
                             progress=progress, loaded=ckpt)
        cams = camstore.load_cams(cams_dir)
    return train, projected, np.asarray(cams["cams"])


def _cached_cams(cams_dir, ckpt_dir, step, limit, label_source="true"):
    """Returns the Grad-CAM results in cams_dir if they were computed from this checkpoint step, limit
    and label source."""
    from resnet_jax.jobs import cams as camstore

    try:
        cams = camstore.load_cams(cams_dir)
    except UserError:
        return None
    summary = cams["summary"]
    same = (summary.get("checkpoint") == os.path.abspath(ckpt_dir) and summary.get("checkpoint_step") == step
            and summary.get("limit") == limit and summary.get("label_source", "true") == label_source
            and bool(summary["consistency"].get("different")))
    return cams if same else None


def _figures_and_tables(results: dict, loaded: dict, out_dir: str, log) -> None:
    from resnet_jax import plots as figures

    fig_dir = os.path.join(out_dir, "figures")
    models = list(results["models"])
    written = []
    for name, res in results["models"].items():
        cl = res["clustering"]
        spaces = [s for s in ("GW", "FM", "P") if s in cl]
        labels = np.asarray(loaded[name]["cams"]["labels"])
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
            written.append(_wrong_figure(loaded[name], wrong, os.path.join(fig_dir, f"{name}_misclassified.png")))
    written.append(_samples_figure(loaded[models[0]], os.path.join(fig_dir, "samples.png")))
    results["figures"] = [os.path.relpath(p, out_dir) for p in written]
    text = tables.tables_markdown(results)
    files.write_text(os.path.join(out_dir, "tables.md"), text)
    for name, rows, columns in tables.table_csvs(results):
        files.write_csv(os.path.join(out_dir, name), rows, columns)
    log(text)


def _wrong_figure(loaded, indices, path):
    from resnet_jax import plots as figures

    batch = loaded["ds"].take(indices)
    cams = loaded["cams"]
    preds = np.asarray(cams["preds"])[indices]
    names = loaded["meta"]["class_names"]
    title = "most confidently wrong (row: true class; " + ", ".join(
        f"{names[t]}->{names[p]}" for t, p in zip(batch.labels, preds)) + ")"
    return figures.image_grid(batch.images, batch.labels, names, path, per_class=len(indices),
                              overlays=np.asarray(cams["cams"])[indices], title=title)


def _samples_figure(loaded, path):
    from resnet_jax import plots as figures

    from resnet_jax.jobs.cams import FIGURE_CLASSES

    ds = loaded["ds"]
    labels = np.asarray(ds.labels)
    indices = [int(i) for c in range(min(ds.num_classes, FIGURE_CLASSES)) for i in np.flatnonzero(labels == c)[:6]]
    batch = ds.take(indices)
    return figures.image_grid(batch.images, batch.labels, loaded["meta"]["class_names"], path, per_class=6,
                              title=f"samples of {ds.spec}")
