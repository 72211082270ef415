"""Extract per-example gradients, probabilities and features of a data set into a store.

A store is a directory::

    manifest.json     what was run ("run": the fields that identify it), N, D, shapes, versions, and
                      "complete": true only once every array below is in place
    gw.npy            (N, D) float32 per-example gradients (D = k with a projection); not written for
                      fc gradients without projection unless `save_gw`: those are kept as their exact
                      factors fm, logits and the labels of the loss (labels.npy for label source
                      "true", preds.npy for "predicted"): manifest "gw" is "factors" (readers use the
                      factors, exact in float64, also when gw.npy was saved) or "rows";
                      `analysis.Representations` reads either
    p.npy             (N, C) float32 softmax probabilities
    logits.npy        (N, C) float32
    fm.npy            (N, d) float32 pooled layer4 features (the fc input)
    labels.npy        (N,) int32 the data set's labels
    preds.npy         (N,) int32 argmax of the logits
    ids.json          the N example ids, in row order
    shards/           while running: shards/00000.npz, ... one per batch of `batch_size` rows (fewer
                      when a batch's gradients would exceed HOST_BUDGET_FLOATS)

Rows are the data set's examples in their unshuffled order (the first `limit`, or this process's
slice, see `grads.process_shard`). Shard i holds rows [i*R, (i+1)*R), R = manifest["shards"]["rows"]; every file is
written to a temporary name and renamed (atomic), so a shard or array that exists is whole.

Feeding the device: a background thread reads, decodes and transfers the next batch while the
current one computes, and another writes the finished shards (`prefetch.py`).

Resuming: the manifest (complete: false) is written with the first shard (a run that fails before
its first shard leaves nothing). A later run with the same arguments
reads it, checks that it describes the same run, keeps the leading run of valid shards and
continues from the first missing one (`Dataset.batches(start=...)`); the computation of one shard
depends only on its rows, so the final arrays are byte-identical to an uninterrupted run. The arrays
are assembled from the shards at the end, the manifest is then marked complete (last) and the
shards removed. A store that holds another run (a different model, checkpoint, data, subset,
label source, projection, limit, batch size, ...) is refused, naming the differing field, except an
unfinished one whose data or checkpoint step changed (the user fixed the data): it starts afresh; a
complete identical store is left as it is (`force=True` rebuilds either).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from importlib import metadata
from typing import Any

import numpy as np

from resnet_jax.core import files
from resnet_jax.errors import UserError
from resnet_jax.core.prefetch import BackgroundWriter, prefetch

STORE_FORMAT = "resnet-jax-store/1"
ARRAYS = ("gw", "p", "logits", "fm", "labels", "preds")
# Fields of an unfinished store that the user fixes by changing the data or retraining: the same command
# then starts the store afresh instead of refusing it.
RESTARTABLE = ("data_size", "data_digest", "checkpoint_step")
HOST_BUDGET_FLOATS = 1 << 28  # gradient floats one shard may hold in host memory (1 GiB of float32)


class _Stop(Exception):
    """Raised by the `stop_after_shards` test hook (simulates a killed run)."""


def _versions() -> dict:
    import flax
    import jax

    try:
        own = metadata.version("resnet-jax")
    except metadata.PackageNotFoundError:
        own = "unknown"
    return {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__, "resnet-jax": own}


def _digest(ids, labels) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    h.update(np.asarray(labels, np.int64).tobytes())
    return h.hexdigest()


def _check_args(grad_params, label_source, project_dim, batch_size, limit, process):
    from resnet_jax.core import grads

    if label_source not in grads.LABEL_SOURCES:
        raise UserError(f"unknown label source {label_source!r}: choose one of {', '.join(grads.LABEL_SOURCES)}")
    if project_dim is not None and (isinstance(project_dim, bool) or not isinstance(project_dim, (int, np.integer))
                                    or project_dim < 1):
        raise UserError(f"projection dimension must be a positive integer, got {project_dim!r}: "
                        f"pass e.g. --project-dim 1024, or none for the full gradient")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise UserError(f"limit must be a positive integer (the first N images), got {limit!r}")
    if process is not None:
        i, c = process
        if int(c) < 1 or not 0 <= int(i) < int(c):
            raise UserError(f"process {i} of {c} is not valid: pass (index, count) with 0 <= index < count")
    if not isinstance(grad_params, str) or not grad_params.strip():
        raise UserError(f"empty gradient parameter subset {grad_params!r}: pass fc, layer4, all or a glob")


def _open_data(data_spec, split, meta, data_seed):
    from resnet_jax.core import data

    if hasattr(data_spec, "batches") and hasattr(data_spec, "ids"):
        if hasattr(data_spec, "num_classes"):
            data.check_classes(data_spec, meta)
        return data_spec  # an already loaded Dataset
    return data.load_for_checkpoint(data_spec, meta, split=split, seed=data_seed)


def _first_difference(old: dict, new: dict) -> str | None:
    for key in list(new) + [k for k in old if k not in new]:  # the user's arguments before the digests
        if old.get(key) != new.get(key):
            return key
    return None


def _shard_path(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, "shards", f"{i:05d}.npz")


def _valid_shard(path: str, rows: int, dim: int | None) -> bool:
    """Whether a shard holds `rows` rows (and gw rows of `dim` columns unless dim is None)."""
    try:
        with np.load(path) as z:
            return len(z["fm"]) == rows and len(z["ids"]) == rows and (dim is None or z["gw"].shape == (rows, dim))
    except Exception:  # unreadable: recompute it
        return False


def run_extract(ckpt_dir: str, data_spec, out_dir: str, grad_params: str = "fc", label_source: str = "true",
                project_dim: int | None = None, seed: int = 0, batch_size: int | None = 64, limit: int | None = None,
                progress: bool = True, *, force: bool = False, split: str | None = None,
                process: tuple[int, int] | None = None, projection: str = "rademacher",
                max_grad_floats: int | None = None, method: str = "auto", stop_after_shards: int | None = None,
                data_seed: int = 0, save_gw: bool = False, loaded=None, precision: str = "fp32",
                log=print) -> dict:
    """Extracts into the store `out_dir` (see the module docstring) and returns its manifest.

    `data_spec` is a data spec ("digits:test", "folder:PATH", "tfds:NAME:SPLIT") or a loaded
    `data.Dataset`. `process=(index, count)` extracts only that process's slice (multi-host).
    `stop_after_shards` (tests) stops with an exception after writing that many shards. `data_seed`
    is the seed of seeded sources (digits placement and noise); `seed` is the projection's.
    `save_gw` also writes the explicit fc gradient rows when they are kept as factors; `loaded` is
    the already restored `checkpoint.Checkpoint` of `ckpt_dir` (else it is restored here).
    `batch_size=None` chooses it from the device's free memory (`prefetch.auto_batch_size`), or
    takes the batch size of the run stored in `out_dir` when resuming; `precision` is "fp32" or
    "bf16" (`precision.py`).
    """
    from resnet_jax.core import checkpoint, grads, models, params, precision as precisions
    from resnet_jax.core.prefetch import auto_batch_size
    from resnet_jax.core.projection import Projection

    precisions.check(precision)
    _check_args(grad_params, label_source, project_dim, 1 if batch_size is None else batch_size, limit, process)
    ckpt = checkpoint.load(ckpt_dir) if loaded is None else loaded
    meta = ckpt.meta
    ds = _open_data(data_spec, split, meta, data_seed)
    model = precisions.with_precision(models.create(meta["model"], meta["num_classes"], meta.get("stem", "standard")),
                                      precision)

    def build_step():
        return grads.build(model, ckpt.variables, params=grad_params, label_source=label_source,
                           project_dim=project_dim, seed=seed, projection=projection,
                           max_grad_floats=max_grad_floats, method=method)

    fn = None
    man_path = os.path.join(out_dir, "manifest.json")
    if batch_size is None and not force and files.is_ours(out_dir, "manifest.json", STORE_FORMAT):
        batch_size = files.read_json(man_path).get("run", {}).get("batch_size")  # resume with the store's own
    if batch_size is None:
        fn = build_step()
        size = int(meta["image_size"])
        batch_size = auto_batch_size(model, size, 4 * fn.grad_floats_per_example((size, size, 3)))
    batch_size = int(batch_size)
    lay = params.layout(ckpt.variables["params"], grad_params)

    n_all = len(ds)
    lo, hi = 0, n_all
    if process is not None:
        r = grads.process_shard(n_all, int(process[0]), int(process[1]))
        lo, hi = r.start, r.stop
    if limit is not None:
        hi = min(hi, lo + int(limit))
    n = hi - lo
    if n < 1:
        raise UserError(f"no images to extract from {getattr(ds, 'spec', data_spec)} (size {n_all}): "
                        f"check the data spec, limit and process slice")
    ids = [str(i) for i in ds.ids[lo:hi]]
    labels = np.asarray(ds.labels[lo:hi], np.int32)
    C = int(meta["num_classes"])
    if label_source == "true" and (labels.min() < 0 or labels.max() >= C):
        raise UserError(f"{getattr(ds, 'spec', data_spec)} has label {int(labels.max() if labels.max() >= C else labels.min())}"
                        f" but the model has {C} classes: use label source 'predicted' or data with the model's classes")
    proj = None if project_dim is None else Projection(int(project_dim), int(seed), projection)
    dim = lay.dim if proj is None else proj.dim
    factors = proj is None and set(lay.paths) == {"fc/kernel", "fc/bias"}
    arrays = [a for a in ARRAYS if a != "gw" or save_gw or not factors]
    run = {
        "model": meta["model"], "num_classes": int(meta["num_classes"]), "stem": meta.get("stem", "standard"),
        "image_size": int(meta["image_size"]), "normalization": meta.get("normalization", "none"),
        "checkpoint": os.path.abspath(ckpt_dir), "checkpoint_step": int(ckpt.step),
        "data": str(getattr(ds, "spec", data_spec)), "split": getattr(ds, "split", split),
        "data_seed": int(data_seed),
        "grad_params": grad_params, "label_source": label_source,
        "projection": None if proj is None else proj.to_json(),
        "limit": None if limit is None else int(limit), "batch_size": batch_size,
        "process": None if process is None else [int(process[0]), int(process[1])],
        "method": method, "max_grad_floats": None if max_grad_floats is None else int(max_grad_floats),
        "precision": precision,
        "data_size": int(n_all), "data_digest": _digest(ids, labels),
        "grad_paths_digest": hashlib.sha256("\n".join(lay.paths).encode()).hexdigest(),
    }
    if save_gw:
        run["save_gw"] = True
    shard_dir = os.path.join(out_dir, "shards")
    # Rows per shard (and per loaded batch): batch_size, fewer when a batch's gradients would not fit
    # HOST_BUDGET_FLOATS (e.g. params=all without projection). Fixed by the arguments.
    rows_per_shard = max(1, min(batch_size, HOST_BUDGET_FLOATS // max(1, dim)))
    n_shards = -(-n // rows_per_shard)

    ours = files.is_ours(out_dir, "manifest.json", STORE_FORMAT)
    if ours is False:
        raise UserError(f"{out_dir} is not empty and holds no extract store (manifest.json): "
                        f"choose a new or empty output directory")
    if ours:
        old = files.read_json(man_path)
        if force:
            _clear(out_dir)
        else:
            diff = _first_difference(old.get("run", {}), run)
            if diff is not None and not old.get("complete") and (diff in RESTARTABLE or not _has_shards(out_dir)):
                log(f"store {out_dir} holds an unfinished run whose {diff} differs: starting it afresh")
                _clear(out_dir)
            elif diff is not None:
                raise UserError(f"store {out_dir} holds a different run: {diff} is {old['run'].get(diff)!r} there "
                                f"but {run.get(diff)!r} now; pass another --out (or --force to overwrite it)")
            if old.get("complete"):
                log(f"store {out_dir} is already complete ({old['n']} rows): nothing to do (force rebuilds it)")
                return old
    if "gw" in arrays:  # the shards and the assembled gw.npy each hold N x D float32 for a moment
        files.check_out_dir(out_dir, "--out", 2 * 4 * n * dim)
    manifest = {
        "format": STORE_FORMAT, "complete": False, "run": run, "n": n, "dim": dim, "grad_dim": lay.dim,
        "layout": lay.to_json(), "class_names": [str(c) for c in getattr(ds, "class_names", meta["class_names"])],
        "model_class_names": [str(c) for c in meta.get("class_names", [])],
        "shards": {"count": n_shards, "rows": rows_per_shard}, "versions": _versions(),
        "rows": [lo, hi], "gw": "factors" if factors else "rows",
    }

    # Resume after the leading run of valid shards.
    done = 0
    while done < n_shards and os.path.exists(_shard_path(out_dir, done)) and _valid_shard(
            _shard_path(out_dir, done), min(rows_per_shard, n - done * rows_per_shard),
            dim if "gw" in arrays else None):
        done += 1
    if os.path.isdir(shard_dir):
        for name in os.listdir(shard_dir):  # leftovers of a killed write
            if ".tmp-" in name:
                os.remove(os.path.join(shard_dir, name))

    t0 = time.time()
    if done < n_shards:
        from tqdm.auto import tqdm

        fn = fn or build_step()
        bar = tqdm(total=n, initial=done * rows_per_shard, unit="img", disable=not progress,
                   desc=f"extract {grad_params}", dynamic_ncols=True)

        def place(item):  # on the prefetch thread: read, decode, check, transfer
            shard, batch = item
            rows = min(rows_per_shard, n - shard * rows_per_shard)
            bids = [str(i) for i in batch.ids[:rows]]
            first = shard * rows_per_shard
            if bids != ids[first:first + rows]:
                raise UserError(f"the data set returned ids {bids[:2]}... at row {first}, expected "
                                f"{ids[first:first + 2]}...: its order is not deterministic")
            blabels = np.asarray(batch.labels, np.int32)[:rows]
            return shard, bids, blabels, fn.put(np.asarray(batch.images)[:rows], blabels)

        written, next_shard = 0, done
        batches = zip(range(done, n_shards), ds.batches(rows_per_shard, start=lo + done * rows_per_shard))
        try:
            with BackgroundWriter() as writer, contextlib.closing(prefetch(batches, place)) as placed:
                def finish(shard, bids, blabels, launched):  # collect a shard, hand it to the writer
                    nonlocal written, next_shard
                    out = fn.collect(launched, bids)
                    values = {"gw": out["gw"], "p": out["probs"], "logits": out["logits"], "fm": out["fm"],
                              "labels": blabels, "preds": out["preds"].astype(np.int32)}
                    values = {**{a: values[a] for a in arrays}, "ids": np.asarray(bids)}
                    if not os.path.exists(man_path):  # the store appears with its first shard, not before
                        os.makedirs(shard_dir, exist_ok=True)
                        files.write_json(man_path, manifest, sort_keys=True)
                    writer.submit(files.write_atomic, _shard_path(out_dir, shard), lambda f: np.savez(f, **values))
                    next_shard = shard + 1
                    written += 1
                    bar.update(len(bids))
                    if stop_after_shards is not None and written >= stop_after_shards and next_shard < n_shards:
                        raise _Stop(f"stopped after {written} shard(s) (test hook)")

                pending = None
                for shard, bids, blabels, batch in placed:
                    launched = fn.launch(batch)  # the device computes this shard while the last is collected
                    if pending is not None:
                        finish(*pending)
                    pending = (shard, bids, blabels, launched)
                if pending is not None:
                    finish(*pending)
        finally:
            bar.close()
        if next_shard < n_shards:
            raise UserError(f"the data set ended after {next_shard * rows_per_shard} of {n} rows: it changed while "
                            f"extracting; run again with a fresh output directory")

    _assemble(out_dir, arrays, n, n_shards, rows_per_shard, ids)
    manifest.update({"complete": True, "shapes": _shapes(out_dir, arrays), "seconds": round(time.time() - t0, 3),
                     "files": [f"{a}.npy" for a in arrays] + ["ids.json"]})
    files.write_json(man_path, manifest, sort_keys=True)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return manifest


def _has_shards(out_dir: str) -> bool:
    shard_dir = os.path.join(out_dir, "shards")
    return os.path.isdir(shard_dir) and any(n.endswith(".npz") for n in os.listdir(shard_dir))


def _clear(out_dir: str) -> None:
    for name in [f"{a}.npy" for a in ARRAYS] + ["ids.json", "manifest.json"]:
        p = os.path.join(out_dir, name)
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(os.path.join(out_dir, "shards"), ignore_errors=True)


def _assemble(out_dir: str, arrays, n: int, n_shards: int, rows_per_shard: int, ids: list[str]) -> None:
    first = np.load(_shard_path(out_dir, 0))
    for name in arrays:
        a0 = first[name]
        path = os.path.join(out_dir, f"{name}.npy")
        tmp = f"{path}.tmp-{os.getpid()}"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=a0.dtype, shape=(n,) + a0.shape[1:])
        for i in range(n_shards):
            with np.load(_shard_path(out_dir, i)) as z:
                out[i * rows_per_shard:i * rows_per_shard + len(z[name])] = z[name]
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    first.close()
    files.write_json(os.path.join(out_dir, "ids.json"), ids)


def _shapes(out_dir: str, arrays) -> dict:
    shapes = {}
    for name in arrays:
        a = np.load(os.path.join(out_dir, f"{name}.npy"), mmap_mode="r")
        shapes[name] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    return shapes


def load_store(out_dir: str, mmap: bool = True) -> dict[str, Any]:
    """Returns {"gw", "p", "logits", "fm", "labels", "preds": arrays, "ids": list, "manifest": dict};
    "gw" is None when the store keeps the fc gradients as factors (manifest "gw": "factors"): read GW
    through `analysis.Representations.from_store`."""
    man_path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(man_path):
        raise UserError(f"{out_dir} is not an extract store (no manifest.json): run 'resnet-jax extract' first")
    manifest = files.read_json(man_path)
    if manifest.get("format") != STORE_FORMAT:
        raise UserError(f"{out_dir}/manifest.json is not an extract store's: point to a store written by extract")
    if not manifest.get("complete"):
        raise UserError(f"store {out_dir} is incomplete: run extract again to finish it")
    listed = set(manifest.get("files", []))
    out: dict[str, Any] = {name: files.load_npy(os.path.join(out_dir, f"{name}.npy"), mmap, "'resnet-jax extract'")
                           if f"{name}.npy" in listed or os.path.exists(os.path.join(out_dir, f"{name}.npy"))
                           else None for name in ARRAYS}
    out["ids"] = files.read_json(os.path.join(out_dir, "ids.json"))
    out["manifest"] = manifest
    return out
