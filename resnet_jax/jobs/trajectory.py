"""Training trajectories: the saved checkpoints of one run, their learning rates, and what each
checkpoint computes for a set of images.

TracIn (Pruthi et al., 2020) approximates the influence of a training image z on an image z' by
sum_t eta_t <grad L(z; theta_t), grad L(z'; theta_t)> over checkpoints theta_t saved during
training, eta_t the learning rate in effect between them; z' = z gives the self-influence.
`load` lists a checkpoint directory's steps with eta_t (the mean learning rate of that epoch,
recorded by the trainer); `checkpoint_outputs` runs images through every checkpoint and returns,
per checkpoint, the logits, pooled features and (optionally) the projected per-example gradients
of all (or some) parameters from `grads.GradFn`. On the fc layer the gradient needs no backward
pass: with p = softmax(logits), h the pooled features and y the label, it is
(p - onehot(y)) (x) [h, 1], so <g_i, g_j> = (h_i.h_j + 1)(delta_i.delta_j) (`fc_inner`) and
||g||^2 = (||h||^2 + 1) ||p - onehot(y)||^2 (`fc_sq_norms`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from resnet_jax.core import checkpoint, grads, models
from resnet_jax.core.outputs import softmax64
from resnet_jax.errors import UserError


@dataclass
class Trajectory:
    """The checkpoints of one run: `steps` (T,) ascending, `learning_rates` (T,) eta_t,
    `learning_rate_source` "recorded" or "uniform" (older checkpoints lack the rates: eta_t = 1),
    `meta` the newest step's metadata."""

    directory: str
    steps: list[int]
    learning_rates: np.ndarray
    learning_rate_source: str
    meta: dict


def load(directory: str, steps=None) -> Trajectory:
    """Returns the trajectory of `directory` (all its steps, or the listed ones)."""
    found = checkpoint.steps(directory)
    if not found:
        checkpoint.load_meta(directory)  # raises the one-line error for a missing or empty directory
    if steps is not None:
        missing = sorted(set(steps) - set(found))
        if missing:
            raise UserError(f"{directory} has no checkpoint of step {missing[0]}: it holds steps "
                            f"{', '.join(map(str, found))}")
        found = sorted(set(steps))
    meta = checkpoint.load_meta(directory, found[-1])
    by_epoch = {h.get("epoch"): h.get("learning_rate") for h in meta.get("history", [])}
    rates = [by_epoch.get(s) for s in found]
    if all(r is not None for r in rates):
        return Trajectory(directory, found, np.asarray(rates, np.float64), "recorded", meta)
    return Trajectory(directory, found, np.ones(len(found)), "uniform", meta)


def load_checkpoints(traj: Trajectory) -> list:
    """Returns the checkpoints of `traj`, one per step (`checkpoint.load`)."""
    return [checkpoint.load(traj.directory, step) for step in traj.steps]


def checkpoint_outputs(traj: Trajectory, ds, labels, *, project_params: str | None = None, project_dim: int = 1024,
                       seed: int = 0, batch_size: int = 64, progress: bool = True,
                       checkpoints: list | None = None) -> tuple[list[dict], dict]:
    """Runs every image of `ds` (unshuffled order) through every checkpoint of `traj`.

    Returns (outputs, seconds): outputs[t] = {"logits": (N, C), "features": (N, d)} float32 and,
    with `project_params` (e.g. "all"), "gw": (N, project_dim), the seeded random projection
    (`grads.GradFn`, the same projection at every checkpoint) of the per-example gradient of the
    loss at `labels` (N,) with respect to those parameters; seconds = {"load", "forward" or
    "projected"}, the wall time of each part. `checkpoints`: those of `traj`, already loaded
    (`load_checkpoints`), for a caller that runs several sets of images.
    """
    from tqdm.auto import tqdm

    labels = np.asarray(labels, np.int32)
    if labels.shape != (len(ds),):
        raise UserError(f"{labels.shape[0]} labels for {len(ds)} images: pass one label per image")
    started = time.perf_counter()
    ckpts = load_checkpoints(traj) if checkpoints is None else checkpoints
    model = ckpts[0].model
    seconds = {"load": time.perf_counter() - started}
    started = time.perf_counter()
    if project_params is None:
        forward = models.forward_fn(model)
    else:
        fns = [grads.GradFn(model, c.variables, params=project_params, project_dim=project_dim, seed=seed)
               for c in ckpts]
    n = len(ds)
    outputs = [{} for _ in ckpts]
    bar = tqdm(total=n * len(ckpts), unit="img", disable=not progress, leave=False,
               desc="projected gradients" if project_params else "forward")
    stream = n > batch_size  # pad the last batch to the others' size: one compiled step for all
    offset = 0
    for batch in ds.batches(batch_size):
        rows = slice(offset, offset + len(batch.labels))
        for t, ckpt in enumerate(ckpts):
            if project_params is None:
                real = len(batch.labels)
                images = grads.pad_rows(batch.images, batch_size) if stream else batch.images
                logits, features = (np.asarray(a)[:real] for a in forward(ckpt.variables, images))
                got = {"logits": logits, "features": features}
            else:
                res = fns[t](batch.images, labels[rows], batch.ids, pad_to=batch_size if stream else None)
                got = {"logits": res["logits"], "features": res["fm"], "gw": res["gw"]}
            for key, value in got.items():
                if key not in outputs[t]:
                    outputs[t][key] = np.empty((n,) + value.shape[1:], np.float32)
                outputs[t][key][rows] = value
            bar.update(len(batch.labels))
        offset += len(batch.labels)
    bar.close()
    seconds["projected" if project_params else "forward"] = time.perf_counter() - started
    for t, out in enumerate(outputs):
        if not (np.isfinite(out["logits"]).all() and np.isfinite(out["features"]).all()):
            raise UserError(f"NaN or Inf in the outputs of checkpoint step {traj.steps[t]} of {traj.directory}: "
                            f"the weights are broken; audit an earlier run or retrain")
    return outputs, seconds


def fc_delta(logits, labels) -> np.ndarray:
    """Returns p - onehot(y) (N, C) in float64: the loss gradient with respect to the logits."""
    delta = softmax64(logits)
    delta[np.arange(delta.shape[0]), np.asarray(labels)] -= 1.0
    return delta


def fc_sq_norms(logits, features, labels) -> np.ndarray:
    """Returns ||grad of the loss w.r.t. fc kernel and bias||^2 (N,) in closed form, float64."""
    h = np.asarray(features, np.float64)
    delta = fc_delta(logits, labels)
    return (np.sum(h * h, axis=1) + 1.0) * np.sum(delta * delta, axis=1)


def fc_inner(logits_a, features_a, labels_a, logits_b, features_b, labels_b) -> np.ndarray:
    """Returns the fc gradient inner products <g_i, g_j> (Na, Nb) in closed form, float64."""
    ha, hb = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    return (ha @ hb.T + 1.0) * (fc_delta(logits_a, labels_a) @ fc_delta(logits_b, labels_b).T)
