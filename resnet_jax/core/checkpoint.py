"""Orbax checkpoints: params, batch statistics, optimiser state and metadata.

A checkpoint directory is an Orbax `CheckpointManager` root with one sub-directory per step
(the epoch). Orbax writes each step to a temporary directory and renames it when complete, so a
step that exists is whole; `load` takes the latest one. The metadata (JSON) says how to rebuild
the model and feed it: model, num_classes, class_names, stem, image_size, normalization, ...
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from resnet_jax.core import models
from resnet_jax.errors import UserError

FORMAT = "resnet-jax/1"
META_KEYS = ("model", "num_classes", "class_names", "stem", "image_size", "normalization")


@dataclass
class Checkpoint:
    """A restored checkpoint: `variables` = {"params", "batch_stats"}, `opt_state` or None."""

    step: int
    variables: dict
    opt_state: Any
    meta: dict

    @property
    def model(self) -> models.ResNet:
        return models.create(self.meta["model"], self.meta["num_classes"], self.meta["stem"])


def _manager(directory: str, create: bool = False, keep: int | None = None):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    handlers = {"state": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def make_meta(model: str, num_classes: int, class_names, stem: str, image_size: int,
              normalization: str, **extra) -> dict:
    """Returns the metadata dict stored beside the weights."""
    meta = {"format": FORMAT, "model": model, "num_classes": int(num_classes),
            "class_names": [str(c) for c in class_names], "stem": stem, "image_size": int(image_size),
            "normalization": normalization}
    meta.update(extra)
    return meta


def save(directory: str, step: int, variables: dict, meta: dict, opt_state=None, keep: int = 2) -> None:
    """Writes step `step` atomically; keeps the newest `keep` steps (None: all of them)."""
    import orbax.checkpoint as ocp

    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    items = {"state": ocp.args.StandardSave({"params": variables["params"], "batch_stats": variables["batch_stats"]}),
             "meta": ocp.args.JsonSave(dict(meta, step=int(step)))}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    try:
        mgr = _manager(directory, create=True, keep=keep)
        mgr.save(step, args=ocp.args.Composite(**items))
        mgr.wait_until_finished()
        mgr.close()
    except BaseException as e:
        _remove_partial_steps(directory)
        if isinstance(e, OSError) or not isinstance(e, Exception):
            raise
        raise UserError(f"cannot write checkpoint step {step} in {directory} ({_one_line(e)}): check that its "
                        f"disk has free space and is writable, then run again") from e


def _remove_partial_steps(directory: str) -> None:
    """Removes the temporary directories of an interrupted Orbax save (complete steps stay)."""
    import shutil

    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if "orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def latest_step(directory: str) -> int | None:
    """Returns the newest complete step in `directory`, or None if there is none."""
    if not os.path.isdir(directory):
        return None
    try:
        mgr = _manager(directory)
        step = mgr.latest_step()
        mgr.close()
    except Exception as e:
        raise _damaged(directory, None, e) from None
    return step


def steps(directory: str) -> list[int]:
    """Returns the complete steps in `directory`, ascending (empty when there is none)."""
    if not os.path.isdir(directory):
        return []
    mgr = _manager(directory)
    found = sorted(int(s) for s in mgr.all_steps())
    mgr.close()
    return found


def delete_steps(directory: str, doomed) -> None:
    """Deletes the given steps of `directory`."""
    mgr = _manager(directory)
    for step in doomed:
        mgr.delete(step)
    mgr.close()


def load_meta(directory: str, step: int | None = None) -> dict:
    """Returns the metadata of `step` (default: the latest)."""
    mgr = _open(directory)
    try:
        return _read_meta(mgr, directory, _require_step(mgr, directory, step))
    finally:
        mgr.close()


def _open(directory: str):
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"checkpoint {directory} is a file: pass the checkpoint directory (from 'resnet-jax train' "
                        f"or 'resnet-jax convert')")
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint directory {directory} does not exist: train a model with "
                        f"'resnet-jax train' or import weights with 'resnet-jax convert'")
    try:
        return _manager(directory)
    except Exception as e:
        raise _damaged(directory, None, e) from None


def _damaged(directory: str, step, e: BaseException) -> UserError:
    """Returns the UserError of a checkpoint Orbax cannot read, naming the directory, step and cause."""
    where = directory if step is None else os.path.join(directory, str(step))
    return UserError(f"cannot read checkpoint {where} ({_one_line(e)}): it is damaged or not a checkpoint; "
                     f"pass a directory written by 'resnet-jax train' or 'resnet-jax convert', or write it again")


def _read_meta(mgr, directory: str, step: int) -> dict:
    import orbax.checkpoint as ocp

    try:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # corrupt or foreign directory
        raise UserError(f"cannot read checkpoint metadata in {directory} (step {step}): {type(e).__name__}; "
                        f"pass a directory written by 'resnet-jax train' or 'resnet-jax convert'") from None


def _require_step(mgr, directory: str, step: int | None) -> int:
    try:
        latest = mgr.latest_step()
    except Exception as e:
        raise _damaged(directory, None, e) from None
    if latest is None:
        raise UserError(f"{directory} holds no complete checkpoint: pass a directory written by "
                        f"'resnet-jax train' or 'resnet-jax convert'")
    return latest if step is None else step


def load(directory: str, step: int | None = None, opt_state_target=None, expect: dict | None = None) -> Checkpoint:
    """Restores a checkpoint (default: the latest step) and checks it against its model.

    `expect` (e.g. {"model": "resnet18", "num_classes": 10}) names fields that must match.
    `opt_state_target` (an abstract or concrete optimiser state) restores the optimiser state
    with its structure; without it the optimiser state is not read.
    """
    import orbax.checkpoint as ocp

    mgr = _open(directory)
    try:
        step = _require_step(mgr, directory, step)
        meta = _read_meta(mgr, directory, step)
        for key, want in (expect or {}).items():
            if want is not None and meta.get(key) != want:
                raise UserError(f"checkpoint {directory} is for {key.replace('_', ' ')} {meta.get(key)!r}, not {want!r}: "
                                f"pass a checkpoint of the right {key} or retrain")
        model = models.create(meta["model"], meta["num_classes"], meta["stem"])
        shapes = models.variable_shapes(model, meta["image_size"])
        target = {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
        items = {"state": ocp.args.StandardRestore(jax.tree.map(_abstract, target))}
        if opt_state_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(jax.tree.map(_abstract, opt_state_target))
        try:
            stored = mgr.item_metadata(step)["state"]
        except Exception as e:
            raise _damaged(directory, step, e) from None
        if stored is None:
            raise _damaged(directory, step, FileNotFoundError("no state/ in this step"))
        check_tree(stored, target, directory)
        try:
            restored = mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise _damaged(directory, step, e) from None
    finally:
        mgr.close()
    return Checkpoint(step=step, variables=dict(restored["state"]), opt_state=restored.get("opt_state"), meta=meta)


def _abstract(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def check_tree(stored, target, source: str) -> None:
    """Raises UserError naming the first missing, extra or mis-shaped key of `stored`."""
    want = {_key(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(
        {k: target[k] for k in ("params", "batch_stats")})}
    have = {_key(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(
        {k: stored[k] for k in ("params", "batch_stats") if k in stored})}
    for key in sorted(want):
        if key not in have:
            raise UserError(f"{source}: missing weight {key}: the checkpoint is for another model")
        if have[key] != want[key]:
            raise UserError(f"{source}: weight {key} has shape {have[key]}, the model needs {want[key]}: "
                            f"the checkpoint is for another model or class count")
    extra = sorted(set(have) - set(want))
    if extra:
        raise UserError(f"{source}: unexpected weight {extra[0]}: the checkpoint is for another model")


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def digest(ckpt: Checkpoint) -> str:
    """Returns the SHA-256 (hex) of what the checkpoint is: its metadata fields META_KEYS and every
    variable's path, dtype, shape and bytes. Copies of a run (another path) give the same digest."""
    h = hashlib.sha256(repr([ckpt.meta.get(k) for k in META_KEYS]).encode())
    for path, leaf in sorted((_key(p), v) for p, v in jax.tree_util.tree_leaves_with_path(ckpt.variables)):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{path}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def to_numpy(tree):
    """Returns the pytree with every leaf as a host numpy array."""
    return jax.tree.map(np.asarray, tree)
