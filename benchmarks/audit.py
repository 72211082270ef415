"""`resnet-jax bench audit`: our label-error detection beside cleanlab's, on the same noisy run.

One run with injected label noise is trained once and audited (`audit.run_audit`). cleanlab
(confident learning, Northcutt et al. 2021) needs out-of-sample predicted probabilities: K models
(K = 5 by default), each trained with the same recipe on the same noisy labels without one of K
stratified folds (scikit-learn's StratifiedKFold, as cleanlab's own cross-validation), predict
the fold they did not see. cleanlab's label-quality score (`cleanlab.rank.get_label_quality_scores`,
self-confidence) ranks the images (score = 1 - quality); `cleanlab.filter.find_label_issues` gives
its set of issues. Both rankings are scored against the known flips.

With `retrain`, the top `fraction` of the images by our ranking and by cleanlab's are removed (or
relabelled: ours with the suggested label, cleanlab's with the argmax of its probabilities), the
model is retrained with the same seed and recipe, and the held-out accuracy of the noisy, the two
cleaned and the clean (noise-free) runs is reported side by side.

cleanlab is AGPL-3.0 and an optional extra (`pip install -e '.[cleanlab]'`); it is imported here
only, inside `cleanlab_scores`. Every training run resumes from its directory under `out_dir`.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from resnet_jax.jobs import audit
from resnet_jax.core import checkpoint, data, files
from resnet_jax.training import labels as label_edits, train
from resnet_jax.core.outputs import softmax64
from resnet_jax.errors import UserError

ACTIONS = ("remove", "relabel")


def cleanlab_scores(given, pred_probs) -> tuple[np.ndarray, np.ndarray]:
    """Returns (score (N,) = 1 - cleanlab's self-confidence label quality, issues (N,) bool from
    cleanlab.filter.find_label_issues) for the given labels (N,) and out-of-sample probabilities (N, C)."""
    find_label_issues, get_label_quality_scores = _import_cleanlab()
    given = np.asarray(given, np.int64)
    quality = get_label_quality_scores(given, pred_probs, method="self_confidence")
    issues = find_label_issues(given, pred_probs, n_jobs=1)  # no fork: JAX is multithreaded
    return 1.0 - np.asarray(quality, np.float64), np.asarray(issues, bool)


def _import_cleanlab():
    """Returns (cleanlab.filter.find_label_issues, cleanlab.rank.get_label_quality_scores)."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise UserError("the audit benchmark needs cleanlab: pip install -e '.[cleanlab]'") from None
    return find_label_issues, get_label_quality_scores


def predict_probs(ckpt_dir: str, ds, indices, batch_size: int = 128) -> np.ndarray:
    """Returns the softmax probabilities (len(indices), C) of the newest checkpoint on ds[indices]."""
    ckpt = checkpoint.load(ckpt_dir)
    step = train.make_eval_step(ckpt.model)
    indices = np.asarray(indices)
    parts = [np.asarray(step(ckpt.variables, ds.take(indices[i:i + batch_size]).images))
             for i in range(0, indices.size, batch_size)]
    return softmax64(np.concatenate(parts))


def held_out_accuracy(ckpt_dir: str, config: train.TrainConfig) -> float:
    """Returns the accuracy of the newest checkpoint on the held-out split of config.data."""
    ckpt = checkpoint.load(ckpt_dir)
    kind, arg, _ = data.parse_spec(config.data)
    test_set = data.load_for_checkpoint(kind if arg is None else f"{kind}:{arg}", ckpt.meta, default_split="test",
                                        seed=config.seed)
    return train.evaluate(ckpt.model, ckpt.variables, test_set)


def _fit(config, out_dir, edits, keep_epochs, log) -> float:
    """Trains (or finishes) one run; returns its training wall time in seconds (`training_seconds`)."""
    train.fit(config, out_dir, progress=False, log=lambda s: log(f"  {os.path.basename(out_dir)}: {s}"),
              held_out=False, label_edits=edits, keep_epochs=keep_epochs)
    return training_seconds(checkpoint.load_meta(out_dir)["history"])


def training_seconds(history: list[dict]) -> float:
    """Returns the wall time of a run from its epoch records, whose "seconds" count from the start
    of each training session (a resumed run starts counting again): the sum of each session's last."""
    marks = [h["seconds"] for h in history]
    return float(sum(a for a, b in zip(marks, marks[1:] + [0.0]) if b < a))


def run(out_dir: str, *, model: str = "resnet18", data_spec: str = "digits", epochs: int = 6, batch_size: int = 64,
        image_size: int | None = None, stem: str = "standard",
        noise: float = 0.1, noise_seed: int = 0, noise_kind: str = "symmetric", seed: int = 0, folds: int = 5,
        methods=("margin", "loss", "aum", "tracin", "tracin-proj"), project_dim: int = 1024, retrain: bool = False,
        fraction: float = 0.1, action: str = "remove", progress: bool = True, log=print) -> dict:
    """Runs the benchmark; returns the summary also written to out_dir/bench-audit.json. Our
    cleaning (with `retrain`) uses the first of `methods`."""
    methods = audit.parse_methods(methods)
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if not 0 < noise < 1:
        raise UserError(f"--label-noise must be in (0, 1) for the benchmark, got {noise}")
    if not 0 < fraction < 1:
        raise UserError(f"--fraction must be in (0, 1), got {fraction}")
    if action not in ACTIONS:
        raise UserError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
    _import_cleanlab()  # fail early without it
    os.makedirs(out_dir, exist_ok=True)
    # Every arm trains the same fixed number of epochs on the whole training split as rendered: no
    # validation slice, no redrawn images.
    config = train.TrainConfig(model=model, data=data_spec, epochs=epochs, batch_size=batch_size, seed=seed,
                               augment_shift=4, image_size=image_size, stem=stem, validation_fraction=0.0,
                               redraw=False)
    noisy_edits = label_edits.LabelEdits(noise_rate=noise, noise_seed=noise_seed, noise_kind=noise_kind)
    timings = {}

    log(f"noisy run: {model}, {epochs} epochs, {noise:.0%} {noise_kind} noise")
    noisy_dir = os.path.join(out_dir, "noisy")
    timings["train_noisy"] = _fit(config, noisy_dir, noisy_edits, "all", log)
    history = checkpoint.load_meta(noisy_dir)["history"]
    epoch_seconds = float(np.median(np.diff([0.0] + [h["seconds"] for h in history])))

    log("audit of the noisy run")
    summary = audit.run_audit(noisy_dir, os.path.join(out_dir, "audit"), None, methods, project_dim=project_dim,
                              seed=seed, progress=progress, log=log)
    meta = checkpoint.load_meta(noisy_dir)
    ds = audit.open_training_data(noisy_dir, None, meta)
    given, flipped, original = label_edits.given_labels(ds, meta.get("label_edits"))
    ours = {m: np.asarray([r[m] for r in sorted(summary["rows"], key=lambda r: r["index"])]) for m in methods}
    suggested = np.asarray([ds.class_names.index(r["suggested_label"])
                            for r in sorted(summary["rows"], key=lambda r: r["index"])])

    from sklearn.model_selection import StratifiedKFold

    log(f"{folds}-fold out-of-sample probabilities for cleanlab")
    pred_probs = np.zeros((len(ds), ds.num_classes))
    fold_seconds = 0.0
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(ds)), given)
    for k, (_, held) in enumerate(split):
        edits = label_edits.LabelEdits(noise_rate=noise, noise_seed=noise_seed, noise_kind=noise_kind,
                                       remove=tuple(ds.ids[i] for i in held))
        fold_dir = os.path.join(out_dir, f"fold{k + 1}of{folds}")
        fold_seconds += _fit(config, fold_dir, edits, str(epochs), log)
        started = time.perf_counter()
        pred_probs[held] = predict_probs(fold_dir, ds, held)
        fold_seconds += time.perf_counter() - started
    started = time.perf_counter()
    theirs, issues = cleanlab_scores(given, pred_probs)
    timings["cleanlab_total"] = fold_seconds + time.perf_counter() - started
    # the scoring rule apart from the cross-validation: cleanlab on the noisy run's own (in-sample) probabilities
    started = time.perf_counter()
    in_sample = predict_probs(noisy_dir, ds, np.arange(len(ds)))
    theirs_in_sample, _ = cleanlab_scores(given, in_sample)
    in_sample_seconds = time.perf_counter() - started

    from resnet_jax.metrics.detection import detection_row

    fc_seconds = summary["seconds"]["load"] + summary["seconds"]["forward"]
    rows = []
    for m in methods:
        scoring = summary["seconds"]["projected"] + fc_seconds if m == "tracin-proj" else fc_seconds
        rows.append({"method": f"ours: {m}", **detection_row(ours[m], flipped), "models trained": 1,
                     "training s": round(timings["train_noisy"], 1), "scoring s": round(scoring, 1)})
    rows.append({"method": f"cleanlab ({folds}-fold, self-confidence)", **detection_row(theirs, flipped),
                 "models trained": folds, "training s": round(fold_seconds, 1),
                 "scoring s": round(timings["cleanlab_total"] - fold_seconds, 1)})
    rows.append({"method": "cleanlab (in-sample probabilities, self-confidence)",
                 **detection_row(theirs_in_sample, flipped), "models trained": 1,
                 "training s": round(timings["train_noisy"], 1), "scoring s": round(in_sample_seconds, 1)})
    scored = {**{f"ours: {m}": ours[m] for m in methods}, "cleanlab": theirs, "cleanlab in-sample": theirs_in_sample}
    intervals = bootstrap_intervals(scored, flipped, seed=seed)
    for row, name in zip(rows, scored):
        row.update(intervals[name])
    found = issues & flipped
    out = {"config": {"model": model, "data": data_spec, "epochs": epochs, "batch_size": batch_size, "noise": noise,
                      "noise_seed": noise_seed, "noise_kind": noise_kind, "seed": seed, "folds": folds,
                      "project_dim": project_dim},
           "n": len(ds), "n_flipped": int(flipped.sum()), "epoch_seconds": round(epoch_seconds, 1),
           "audit_seconds": summary["seconds"], "detection": rows,
           "find_label_issues": {"flagged": int(issues.sum()), "precision": float(found.sum() / max(1, issues.sum())),
                                 "recall": float(found.sum() / flipped.sum())},
           "suggestions": summary["suggestions"],
           "memorised": float(np.mean(in_sample.argmax(1)[flipped] == given[flipped])),
           "versus_cleanlab": {m: paired_difference(flipped, ours[m], theirs, seed) for m in methods},
           "cleanlab_suggestion_restores_original": float(np.mean(pred_probs.argmax(1)[flipped]
                                                                  == original[flipped]))}
    files.write_json(os.path.join(out_dir, "bench-audit.json"), out)
    if retrain:
        out["retrain"] = _retrain(out_dir, config, ds, noisy_edits, ours[methods[0]], suggested, theirs,
                                  pred_probs.argmax(1), methods[0], fraction, action, timings["train_noisy"], log)
        files.write_json(os.path.join(out_dir, "bench-audit.json"), out)
    return out


def _retrain(out_dir, config, ds, noisy_edits, ours, suggested, theirs, their_labels, method, fraction, action,
             noisy_seconds, log) -> list[dict]:
    """Retrains without (or with relabelled) top `fraction` suspects; returns the accuracy rows."""
    count = math.ceil(fraction * len(ds))
    runs = [("noisy", os.path.join(out_dir, "noisy"), noisy_edits, len(ds))]
    for name, score, relabel in ((f"cleaned by ours ({method})", ours, suggested),
                                 ("cleaned by cleanlab", theirs, their_labels)):
        top = ranking_top(score, count)
        if action == "remove":
            edits = label_edits.LabelEdits(**_noise_kwargs(noisy_edits), remove=tuple(ds.ids[i] for i in top))
            kept = len(ds) - count
        else:
            edits = label_edits.LabelEdits(**_noise_kwargs(noisy_edits),
                                           relabel=tuple((ds.ids[i], int(relabel[i])) for i in top))
            kept = len(ds)
        runs.append((name, os.path.join(out_dir, f"{action}-{'ours' if 'ours' in name else 'cleanlab'}"), edits, kept))
    runs.append(("clean (no noise)", os.path.join(out_dir, "clean"), None, len(ds)))
    rows = []
    for name, run_dir, edits, n_train in runs:
        log(f"retrain: {name}")
        seconds = _fit(config, run_dir, edits, str(config.epochs) if name != "noisy" else "all", log)
        rows.append({"run": name, "training images": n_train, "held-out accuracy": held_out_accuracy(run_dir, config),
                     "training s": round(noisy_seconds if name == "noisy" else seconds, 1)})
    noisy, clean = rows[0]["held-out accuracy"], rows[-1]["held-out accuracy"]
    for row in rows:
        row["gap recovered"] = (row["held-out accuracy"] - noisy) / (clean - noisy) if clean != noisy else float("nan")
    return rows


def ranking_top(scores, count: int) -> np.ndarray:
    """Returns the indices of the `count` most suspect images."""
    from resnet_jax.metrics.detection import ranking

    return ranking(scores)[:count]


def _noise_kwargs(edits: label_edits.LabelEdits) -> dict:
    return {"noise_rate": edits.noise_rate, "noise_seed": edits.noise_seed, "noise_kind": edits.noise_kind}


def bootstrap_intervals(scores: dict, is_error, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Returns {name: {"auroc_low", "auroc_high", "ap_low", "ap_high"}}: percentile bootstrap intervals of
    each ranking's AUROC and average precision, the images resampled with replacement (the same resamples
    for every ranking); resamples without a flip or without a clean image are redrawn."""
    from sklearn.metrics import average_precision_score

    from resnet_jax.metrics.error_scores import auroc_ranks

    is_error = np.asarray(is_error, bool)
    names = list(scores)
    S = np.stack([np.asarray(scores[n], np.float64) for n in names])
    rng = np.random.default_rng(seed)
    aurocs, aps = [], []
    while len(aurocs) < n_boot:
        idx = rng.integers(0, is_error.size, is_error.size)
        e = is_error[idx]
        if 0 < e.sum() < e.size:
            aurocs.append(auroc_ranks(e, S[:, idx]))
            aps.append([average_precision_score(e, S[k, idx]) for k in range(len(names))])
    q = [(1 - level) / 2, (1 + level) / 2]
    a, p = np.quantile(np.asarray(aurocs), q, axis=0), np.quantile(np.asarray(aps), q, axis=0)
    return {n: {"auroc_low": float(a[0, k]), "auroc_high": float(a[1, k]), "ap_low": float(p[0, k]),
                "ap_high": float(p[1, k])} for k, n in enumerate(names)}


def paired_difference(is_error, ours, theirs, seed: int = 0) -> dict:
    """AUROC(ours) - AUROC(cleanlab's) with its paired bootstrap interval (`error_scores.paired_auroc_difference`)."""
    from resnet_jax.metrics.error_scores import paired_auroc_difference

    return paired_auroc_difference(is_error, ours, theirs, seed=seed)
