"""Find the likely mislabeled training images of a run from its saved checkpoints.

Every image z with given label y (the label the model was trained with: with injected noise, the
flipped one) gets a score per method, higher = more suspect:

    tracin       TracIn self-influence on the fc layer, sum_t eta_t ||grad_fc L(z; theta_t)||^2, in
                 closed form from a forward pass per checkpoint (`trajectory.fc_sq_norms`): exact.
    tracin-proj  the same over all parameters (`--project-params`), sum_t eta_t ||R grad L(z; theta_t)||^2
                 with R the seeded random projection of `grads.GradFn` (k = `project_dim` columns;
                 E ||R g||^2 = ||g||^2): one forward and backward pass per image and checkpoint.
    loss         the cross-entropy at the last checkpoint.
    margin       minus the margin z_y - max_{c != y} z_c of the logits at the last checkpoint.
    aum          minus the area under the margin (Pleiss et al., 2020): the margin averaged over the
                 checkpoints.

The suggested label is the last checkpoint's prediction, which is also the class whose fc
self-influence at that checkpoint would be smallest ((||h||^2 + 1) ||p - onehot(c)||^2 is least at
c = argmax p). Over a whole trajectory the least-self-influence class is argmax_c sum_t eta_t
(||h_t||^2 + 1) p_t[c], a vote that the early, near-chance checkpoints of a short run dominate (on
the embedded digits it restored the true label of 19% of the flipped images, the last prediction
86%: docs/guides/audit.md). `run_audit` writes audit.csv, audit.json, suspects.png and, when the checkpoint
records injected noise, the detection table (AUROC, average precision, recall at 5/10/15/20%).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from resnet_jax.core import data, files
from resnet_jax.training import labels as label_edits
from resnet_jax.jobs import trajectory
from resnet_jax.core.outputs import label_loss, softmax64
from resnet_jax.constants import AUDIT_DEFAULT_METHODS
from resnet_jax.errors import UserError

METHODS = ("margin", "loss", "aum", "tracin", "tracin-proj")
DEFAULT_METHODS = AUDIT_DEFAULT_METHODS  # the first ranks: best measured (docs/guides/audit.md)
TRACIN_METHODS = ("tracin", "tracin-proj")
AUDIT_FORMAT = "resnet-jax-audit/1"


def parse_methods(text) -> list[str]:
    """Returns the method names of a comma-separated list (or sequence), checked, in order."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UserError(f"unknown audit method {bad[0] if bad else text!r}: choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def margins(logits, labels) -> np.ndarray:
    """Returns z_y - max_{c != y} z_c (N,) of logits (N, C) at labels (N,), float64."""
    z = np.asarray(logits, np.float64)
    rows = np.arange(z.shape[0])
    given = z[rows, labels]
    others = z.copy()
    others[rows, labels] = -np.inf
    return given - others.max(axis=1)


def suggested_labels(outputs: list[dict]) -> np.ndarray:
    """Returns the last checkpoint's prediction (N,): the label of least fc self-influence there."""
    return np.argmax(outputs[-1]["logits"], axis=1).astype(np.int32)


def scores(outputs: list[dict], rates, labels, methods, projected: list[dict] | None = None) -> dict:
    """Returns {method: scores (N,) float64} (higher = more suspect) from per-checkpoint outputs
    {"logits", "features"} (and `projected` {"gw"} for tracin-proj) at the given labels (N,)."""
    labels = np.asarray(labels)
    result = {}
    for method in methods:
        if method == "tracin":
            result[method] = sum(eta * trajectory.fc_sq_norms(o["logits"], o["features"], labels)
                                 for eta, o in zip(rates, outputs))
        elif method == "tracin-proj":
            result[method] = sum(eta * np.sum(np.asarray(o["gw"], np.float64) ** 2, axis=1)
                                 for eta, o in zip(rates, projected))
        elif method == "loss":
            result[method] = label_loss(softmax64(outputs[-1]["logits"]), labels)
        elif method == "margin":
            result[method] = -margins(outputs[-1]["logits"], labels)
        elif method == "aum":
            result[method] = -np.mean([margins(o["logits"], labels) for o in outputs], axis=0)
    return result


def open_training_data(ckpt_dir: str, data_spec: str | None, meta: dict):
    """Returns the data set to audit: `data_spec` (default: the checkpoint's training data), fed as
    the checkpoint expects; raises UserError when its classes differ from the checkpoint's."""
    spec = data_spec or meta.get("data")
    if spec is None:
        raise UserError(f"{ckpt_dir} does not record its training data: pass --data")
    seed = (meta.get("train_config") or {}).get("seed", 0)
    ds = data.load_for_checkpoint(spec, meta, default_split="train", seed=seed)
    if meta.get("data") and tuple(ds.class_names) != tuple(meta["class_names"]):
        raise UserError(f"the classes of {ds.spec} ({', '.join(ds.class_names[:5])}, ...) differ from the "
                        f"checkpoint's ({', '.join(meta['class_names'][:5])}, ...): pass the data it was trained on")
    return ds


def audit(ckpt_dir: str, data_spec: str | None = None, methods=DEFAULT_METHODS, *, project_params: str = "all",
          project_dim: int = 1024, seed: int = 0, batch_size: int = 64, steps=None, progress: bool = True) -> dict:
    """Scores every image of the data; returns {"ids", "given", "suggested", "scores": {method: (N,)},
    "flipped" (N,) bool or None, "original" (N,) or None, "trajectory", "seconds", "dataset", "meta"}."""
    methods = parse_methods(methods)
    if project_dim < 1:
        raise UserError(f"--project-dim must be at least 1, got {project_dim}")
    traj = trajectory.load(ckpt_dir, steps)
    if len(traj.steps) < 2 and steps is not None and any(m in TRACIN_METHODS for m in methods):
        raise UserError(f"--steps names a single checkpoint ({traj.steps[0]}): TracIn sums over a trajectory of "
                        f"several; name two or more, or use --method loss,margin")
    if len(traj.steps) < 2 and any(m in TRACIN_METHODS for m in methods):
        raise UserError(f"{ckpt_dir} holds a single checkpoint (step {traj.steps[0]}): TracIn needs a trajectory of "
                        f"checkpoints (train with --keep-epochs all, the default with --label-noise), or audit "
                        f"with the loss-based scores: --method loss,margin")
    ds = open_training_data(ckpt_dir, data_spec, traj.meta)
    given, flipped, original = label_edits.given_labels(ds, traj.meta.get("label_edits"))
    started = time.perf_counter()
    ckpts = trajectory.load_checkpoints(traj)  # once, for the forward and the projected pass
    loaded = time.perf_counter() - started
    outputs, seconds = trajectory.checkpoint_outputs(traj, ds, given, batch_size=batch_size, progress=progress,
                                                     checkpoints=ckpts)
    seconds["load"] = loaded
    projected = None
    if "tracin-proj" in methods:
        projected, more = trajectory.checkpoint_outputs(traj, ds, given, project_params=project_params,
                                                        project_dim=project_dim, seed=seed, batch_size=batch_size,
                                                        progress=progress, checkpoints=ckpts)
        seconds["projected"] = more["projected"]
    started = time.perf_counter()
    result = {"ids": list(ds.ids), "given": given, "suggested": suggested_labels(outputs),
              "scores": scores(outputs, traj.learning_rates, given, methods, projected),
              "flipped": flipped, "original": original, "trajectory": traj, "dataset": ds, "meta": traj.meta}
    seconds["scoring"] = time.perf_counter() - started
    result["seconds"] = seconds
    return result


def detection(result: dict) -> list[dict] | None:
    """Returns the detection table rows (one per method) when the flips are known, else None."""
    from resnet_jax.metrics.detection import detection_table

    if result["flipped"] is None:
        return None
    return detection_table(result["scores"], result["flipped"])


def parse_steps(text) -> list[int] | None:
    """Returns the checkpoint steps of "all" (None) or a comma-separated list such as "4,5,6"."""
    if text is None or str(text).strip() == "all":
        return None
    try:
        steps = sorted({int(s) for s in str(text).split(",")})
    except ValueError:
        steps = [0]
    if steps[0] < 1:
        raise UserError(f"--steps takes 'all' or comma-separated checkpoint steps such as 4,5,6, got {text!r}")
    return steps


def run_audit(ckpt_dir: str, out_dir: str, data_spec: str | None = None, methods=DEFAULT_METHODS, *,
              project_params: str = "all", project_dim: int = 1024, seed: int = 0, batch_size: int = 64,
              top: int = 24, steps=None, progress: bool = True, log=print) -> dict:
    """Audits a run and writes audit.csv, audit.json and suspects.png to `out_dir` (replaced only
    when complete); returns the summary written to audit.json."""
    from resnet_jax.metrics.detection import ranking

    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    files.check_ours(out_dir, "audit.json", AUDIT_FORMAT)
    started = time.perf_counter()
    result = audit(ckpt_dir, data_spec, methods, project_params=project_params, project_dim=project_dim, seed=seed,
                   batch_size=batch_size, steps=parse_steps(steps), progress=progress)
    if result["trajectory"].learning_rate_source == "uniform":
        log(f"note: {ckpt_dir} records no learning rates (trained before they were recorded): eta_t = 1")
    methods = list(result["scores"])
    names = result["meta"]["class_names"]
    order = ranking(result["scores"][methods[0]])
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(1, order.size + 1)
    rows = []
    for i, image_id in enumerate(result["ids"]):
        row = {"rank": int(rank[i]), "index": i, "id": image_id, "given_label": names[result["given"][i]],
               "suggested_label": names[result["suggested"][i]]}
        if result["flipped"] is not None:
            row.update(flipped=bool(result["flipped"][i]), original_label=names[result["original"][i]])
        row.update({m: float(result["scores"][m][i]) for m in methods})
        rows.append(row)
    rows.sort(key=lambda r: r["rank"])
    table = detection(result)
    traj = result["trajectory"]
    summary = {"format": AUDIT_FORMAT, "checkpoint": os.path.abspath(ckpt_dir), "data": result["dataset"].spec,
               "n": len(rows), "methods": methods, "ranked_by": methods[0],
               "suggested_label_rule": "the last checkpoint's prediction (least fc self-influence there)",
               "trajectory": {"steps": traj.steps, "learning_rates": traj.learning_rates.tolist(),
                              "learning_rate_source": traj.learning_rate_source},
               "projection": ({"params": project_params, "dim": project_dim, "seed": seed}
                              if "tracin-proj" in methods else None),
               "detection": table, "suggestions": _suggestion_summary(result),
               "seconds": {k: round(v, 2) for k, v in result["seconds"].items()}, "rows": rows}
    tmp = tempfile.mkdtemp(prefix=".tmp-audit-", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        files.write_csv(os.path.join(tmp, "audit.csv"), rows, list(rows[0]))
        _suspects_figure(result, order[:min(top, order.size)], os.path.join(tmp, "suspects.png"), methods[0])
        summary["seconds"]["total"] = round(time.perf_counter() - started, 2)
        files.write_json(os.path.join(tmp, "audit.json"), summary)
        files.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _suggestion_summary(result: dict) -> dict:
    """Returns how often the suggested label differs from the given one and, with known flips, how
    often it restores the original label of a flipped image."""
    given, suggested = result["given"], result["suggested"]
    out = {"differs_from_given": int(np.sum(suggested != given))}
    if result["flipped"] is not None and result["flipped"].any():
        f = result["flipped"]
        out["restores_original_of_flipped"] = float(np.mean(suggested[f] == result["original"][f]))
    return out


def _suspects_figure(result: dict, indices, path: str, method: str) -> str:
    from resnet_jax import plots as figures

    names = result["meta"]["class_names"]
    batch = result["dataset"].take(indices)
    titles, colours = [], None
    for k, i in enumerate(indices):
        titles.append(f"#{k + 1} {result['ids'][i]}\n{names[result['given'][i]]} -> {names[result['suggested'][i]]}")
    note = ""
    if result["flipped"] is not None:
        colours = ["crimson" if result["flipped"][i] else "black" for i in indices]
        note = "; red: flipped on purpose"
    return figures.titled_grid(batch.images, titles, path, columns=8, title_colours=colours,
                               title=f"top suspects by {method} (given -> suggested label{note})")
