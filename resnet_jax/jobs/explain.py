"""Which training images made each mistake: TracIn proponents and opponents of a prediction.

For a test image z' predicted as class c (the newest checkpoint's argmax) and a training image z
with the label y it was trained with, write g_t(z) = grad L(z, y; theta_t) and g_t(z') =
grad L(z', c; theta_t) at the saved checkpoints theta_t (eta_t the learning rate of epoch t;
`trajectory.load`). A gradient step of size eta on z changes the test loss at c by about
-eta <g(z), g(z')>, so a positive inner product means that training on z lowered the loss of the
*predicted* class on z' (for an error: pushed towards the mistake). The influence (`kind`):

    raw      TracIn, sum_t eta_t <g_t(z), g_t(z')>;
    cosine   sum_t eta_t cos(g_t(z), g_t(z')): the direction only, at every checkpoint;
    relatif  raw / sqrt(sum_t eta_t ||g_t(z)||^2): raw TracIn over the square root of the training
             image's own TracIn self-influence (RelatIF, Barshan et al. 2020, with the identity in
             place of the inverse Hessian).
    fisher   (1/T) sum_t g_t(z')^T (F_t + lambda_t I)^-1 g_t(z), F_t = Phi_t^T Phi_t / N the empirical
             Fisher of the N projected training gradients Phi_t (N, k), lambda_t = FISHER_DAMPING
             trace(F_t) / k: the influence function in the projected space (as LoGra, Choe et al. 2024;
             TRAK, Park et al. 2023, is the same form on the margin's gradients), averaged over the
             checkpoints as TRAK averages over models; `proj` only.

Raw TracIn favours training images of large gradient norm (on the embedded digits one training
image was the top raw proponent of 35 of 40 errors); both normalisations remove that (docs/guides/explain.md).
The *proponents* of a prediction are the K training images of largest influence, its *opponents*
the K of smallest (most negative): those that pushed away from it. Every kind has the sign of
the inner products.

Two ways to the gradients (`method`):
    proj  all parameters through the seeded random projection R of `grads.GradFn` (k columns,
          E[<Rg, Rg'>] = <g, g'>), computed on the device without forming the full gradient; the
          training set's projections are stored once per checkpoint (`save_store`, (N, k) float32
          each) and every test image is attributed by one matrix product per checkpoint, over
          chunks of training rows (`chunk`), keeping a running top-K (memory O(M chunk + M K)).
    fc    the fc layer in closed form (`trajectory.fc_inner`): exact, forward passes only.

`explain` returns the attribution; `run_explain` writes explain.csv, explain.json and one figure
per explained image (the image, its Grad-CAM for the predicted class, true -> predicted, then its
proponents and opponents with their labels) under figures/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time

import numpy as np

from resnet_jax.jobs import audit, trajectory
from resnet_jax.core import checkpoint, data, files
from resnet_jax.core.data.spec import IMAGE_EXTENSIONS
from resnet_jax.training import labels as label_edits
from resnet_jax.constants import INFLUENCES
from resnet_jax.errors import UserError

METHODS = ("proj", "fc")
FISHER_DAMPING = 0.1  # lambda_t of `fisher` as a fraction of the mean eigenvalue of F_t
EXPLAIN_FORMAT = "resnet-jax-explain/1"
STORE_FORMAT = "resnet-jax-explain-store/1"
ITEM_KEYS = ("rank", "train_id", "train_label", "influence", "train_flipped")


def open_data(ckpt_dir: str, train_spec: str | None, test_spec: str | None, meta: dict):
    """Returns (training view with the labels the model was trained with and without removed images,
    flipped (N,) bool or None when no noise was injected, test data set); raises UserError when
    their classes differ from each other or from the checkpoint's."""
    train_ds = audit.open_training_data(ckpt_dir, train_spec, meta)
    record = meta.get("label_edits")
    given, flipped, _ = label_edits.given_labels(train_ds, record)
    if not (record or {}).get("noise", {}).get("rate"):
        flipped = None
    removed = set((record or {}).get("removed", []))
    keep = np.asarray([i for i, image_id in enumerate(train_ds.ids) if image_id not in removed], np.int64)
    view = label_edits.LabelView(train_ds, keep, given[keep])
    spec = test_spec
    if spec is None:
        kind, arg, _ = data.parse_spec(meta["data"])
        spec = kind if arg is None else f"{kind}:{arg}"
    seed = (meta.get("train_config") or {}).get("seed", 0)
    test_ds = data.load_for_checkpoint(spec, meta, default_split="test", seed=seed)
    if tuple(test_ds.class_names) != tuple(view.class_names):
        raise UserError(f"the classes of {test_ds.spec} ({', '.join(test_ds.class_names[:4])}, ...) differ from those "
                        f"of the training data {view.spec} ({', '.join(view.class_names[:4])}, ...): pass test data "
                        f"with the training data's classes")
    return view, (None if flipped is None else flipped[keep]), test_ds


def _inner(te: dict, tr: dict, method: str, test_labels, train_labels, rows: slice):
    """Returns (<g(z'), g(z)> (M, n), ||g(z')||^2 (M,), ||g(z)||^2 (n,)) at one checkpoint, float64."""
    if method == "proj":
        a, b = np.asarray(te["gw"], np.float64), np.asarray(tr["gw"][rows], np.float64)
        return a @ b.T, np.sum(a * a, axis=1), np.sum(b * b, axis=1)
    y = np.asarray(train_labels)[rows]
    logits, features = tr["logits"][rows], tr["features"][rows]
    return (trajectory.fc_inner(te["logits"], te["features"], test_labels, logits, features, y),
            trajectory.fc_sq_norms(te["logits"], te["features"], test_labels),
            trajectory.fc_sq_norms(logits, features, y))


def check_kind(kind: str, method: str) -> None:
    """Raises UserError for an unknown influence kind, or `fisher` without the projected gradients."""
    if kind not in INFLUENCES:
        raise UserError(f"unknown influence {kind!r}: choose one of {', '.join(INFLUENCES)}")
    if kind == "fisher" and method != "proj":
        raise UserError("--influence fisher needs the projected gradients of the training set: use --method proj")


def fisher_preconditioned(test_outs: list[dict], train_outs: list[dict], chunk: int = 4096,
                          damping: float = FISHER_DAMPING) -> list[np.ndarray]:
    """Returns per checkpoint g(z') (F + lambda I)^-1 (M, k) float64: F = Phi^T Phi / N accumulated over
    chunks of `chunk` training rows of "gw" (N, k), lambda = damping trace(F) / k (module docstring)."""
    out = []
    for te, tr in zip(test_outs, train_outs):
        n, k = tr["gw"].shape
        gram = np.zeros((k, k))
        for start in range(0, n, chunk):
            b = np.asarray(tr["gw"][start:start + chunk], np.float64)
            gram += b.T @ b
        fisher = gram / n
        lam = max(damping * np.trace(fisher) / k, np.finfo(np.float64).tiny)
        out.append(np.linalg.solve(fisher + lam * np.eye(k), np.asarray(te["gw"], np.float64).T).T)
    return out


def influence(test_outs: list[dict], train_outs: list[dict], rates, method: str, test_labels, train_labels,
              rows: slice = slice(None), kind: str = "raw", preconditioned: list | None = None) -> np.ndarray:
    """Returns the influence (M, n) float64 of the training rows `rows` on the M test images, of
    `kind` raw, cosine, relatif or fisher (module docstring): `proj` from the projections "gw" (at the
    labels they were computed with), `fc` in closed form from "logits" and "features" at
    test_labels (M,) and train_labels (N,). `fisher` uses `preconditioned` (`fisher_preconditioned`
    over every training row), computed here when None."""
    check_kind(kind, method)
    if kind == "fisher":
        if preconditioned is None:
            preconditioned = fisher_preconditioned(test_outs, train_outs)
        return sum(p @ np.asarray(tr["gw"][rows], np.float64).T for p, tr in zip(preconditioned, train_outs)) \
            / len(preconditioned)
    total, self_influence = 0.0, 0.0
    for eta, te, tr in zip(rates, test_outs, train_outs):
        inner, sq_test, sq_train = _inner(te, tr, method, test_labels, train_labels, rows)
        if kind == "cosine":
            inner = inner / np.maximum(np.sqrt(np.outer(sq_test, sq_train)), 1e-300)
        total = total + eta * inner
        self_influence = self_influence + eta * sq_train
    if kind == "relatif":
        total = total / np.maximum(np.sqrt(self_influence), 1e-300)[None, :]
    return np.asarray(total)


def top_influences(test_outs, train_outs, rates, method, test_labels, train_labels, top: int, chunk: int = 4096,
                   kind: str = "raw"):
    """Returns ((proponents (M, K), scores), (opponents (M, K), scores)): the training indices of
    largest and smallest influence, computed over chunks of `chunk` training rows."""
    from resnet_jax.metrics.attribution import RunningTop

    check_kind(kind, method)
    pre = fisher_preconditioned(test_outs, train_outs, chunk) if kind == "fisher" else None
    n = len(train_labels)
    best = RunningTop(len(test_labels), top)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        best.add(influence(test_outs, train_outs, rates, method, test_labels, train_labels, rows, kind, pre), start)
    return best.largest(), best.smallest()


def nearest(test_features, train_features, top: int, chunk: int = 4096) -> np.ndarray:
    """Returns the indices (M, K) of the K training images of largest cosine similarity of the
    pooled features (M, d) and (N, d)."""
    from resnet_jax.metrics.attribution import RunningTop

    a = np.asarray(test_features, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    best = RunningTop(a.shape[0], top)
    for start in range(0, train_features.shape[0], chunk):
        b = np.asarray(train_features[start:start + chunk], np.float64)
        best.add(a @ (b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)).T, start)
    return best.largest()[0]


def _store_key(traj, ckpts, train_view, method, project_params, project_dim, seed) -> dict:
    """What the stored training outputs depend on: the checkpoints' contents (not their path, so a copied
    run reuses its store), the data and labels, the method and projection."""
    ids = hashlib.sha256("\n".join(train_view.ids).encode()).hexdigest()
    labels = hashlib.sha256(np.asarray(train_view.labels, np.int32).tobytes()).hexdigest()
    proj = method == "proj"
    return {"format": STORE_FORMAT, "checkpoints_sha256": [checkpoint.digest(c) for c in ckpts],
            "steps": traj.steps, "method": method, "project_params": project_params if proj else None,
            "project_dim": project_dim if proj else None, "seed": seed if proj else None,
            "data": train_view.spec, "ids_sha256": ids, "labels_sha256": labels}


def load_store(store: str | None, key: dict):
    """Returns the stored per-checkpoint training outputs (memory-mapped) when `store` holds them
    for `key`, else None."""
    if not store or files.is_ours(store, "store.json", STORE_FORMAT) is not True:
        return None
    if files.read_json(os.path.join(store, "store.json")) != key:
        return None
    names = ("logits", "features") + (("gw",) if key["method"] == "proj" else ())
    return [{name: files.load_npy(os.path.join(store, f"{name}-{step:06d}.npy"), mmap=True, made_by="explain")
             for name in names} for step in key["steps"]]


def save_store(store: str, key: dict, outputs: list[dict]) -> None:
    """Writes the per-checkpoint training outputs ({name}-{step}.npy) and store.json last."""
    os.makedirs(store, exist_ok=True)
    for step, out in zip(key["steps"], outputs):
        for name, value in out.items():
            np.save(os.path.join(store, f"{name}-{step:06d}.npy"), np.asarray(value, np.float32))
    files.write_json(os.path.join(store, "store.json"), key)


def explain(ckpt_dir: str, train_spec: str | None = None, test_spec: str | None = None, *, errors_only: bool = True,
            top: int = 10, method: str = "proj", kind: str = INFLUENCES[0], project_params: str = "all",
            project_dim: int = 1024, seed: int = 0, batch_size: int = 64, steps=None, store: str | None = None,
            chunk: int = 4096, progress: bool = True) -> dict:
    """Attributes the chosen test images (the misclassified ones, or all); returns {"explained" (M,)
    test indices, "true", "predicted" (M,), "proponents", "proponent_scores", "opponents",
    "opponent_scores" (M, K), "nearest" (M, K), "train", "train_labels" (N,), "flipped", "test",
    "test_predicted" (T,), "trajectory", "train_outputs", "test_outputs" (per checkpoint, of the
    explained images), "reused_store", "seconds", "method", "kind"}."""
    if method not in METHODS:
        raise UserError(f"unknown attribution method {method!r}: choose one of {', '.join(METHODS)}")
    check_kind(kind, method)
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    if method == "proj" and project_dim < 1:
        raise UserError(f"--project-dim must be at least 1, got {project_dim}")
    traj = trajectory.load(ckpt_dir, steps)
    train_view, flipped, test_ds = open_data(ckpt_dir, train_spec, test_spec, traj.meta)
    if top > len(train_view):
        raise UserError(f"--top {top} is more than the {len(train_view)} training images: pass at most {len(train_view)}")
    seconds = {}
    started = time.perf_counter()
    ckpts = trajectory.load_checkpoints(traj)
    # which images are errors: the newest checkpoint's forward (--method fc scores every checkpoint's)
    forward_traj = traj if method == "fc" else dataclasses.replace(traj, steps=traj.steps[-1:],
                                                                   learning_rates=traj.learning_rates[-1:])
    test_fwd, _ = trajectory.checkpoint_outputs(forward_traj, test_ds, test_ds.labels, batch_size=batch_size,
                                                progress=progress, checkpoints=ckpts[-len(forward_traj.steps):])
    test_pred = np.argmax(test_fwd[-1]["logits"], axis=1).astype(np.int32)
    true = np.asarray(test_ds.labels, np.int32)
    chosen = np.flatnonzero(test_pred != true) if errors_only else np.arange(len(test_ds))
    seconds["test_forward"] = time.perf_counter() - started
    result = {"explained": chosen, "true": true[chosen], "predicted": test_pred[chosen], "train": train_view,
              "train_labels": np.asarray(train_view.labels, np.int32), "flipped": flipped, "test": test_ds,
              "test_predicted": test_pred, "trajectory": traj, "seconds": seconds, "method": method, "kind": kind,
              "checkpoints": ckpts}  # restored once: the figures reuse the newest
    if chosen.size == 0:
        return result
    key = _store_key(traj, ckpts, train_view, method, project_params, project_dim, seed)
    train_outs = load_store(store, key)
    result["reused_store"] = train_outs is not None
    started = time.perf_counter()
    kwargs = {"project_params": project_params, "project_dim": project_dim, "seed": seed} if method == "proj" else {}
    if train_outs is None:
        train_outs, _ = trajectory.checkpoint_outputs(traj, train_view, train_view.labels, batch_size=batch_size,
                                                      progress=progress, checkpoints=ckpts, **kwargs)
    seconds["train_gradients" if method == "proj" else "train_forward"] = time.perf_counter() - started
    started = time.perf_counter()
    if method == "proj":
        view = label_edits.LabelView(test_ds, chosen, test_pred[chosen])
        test_outs, _ = trajectory.checkpoint_outputs(traj, view, test_pred[chosen], batch_size=batch_size,
                                                     progress=progress, checkpoints=ckpts, **kwargs)
    else:
        test_outs = [{k: v[chosen] for k, v in out.items()} for out in test_fwd]
    seconds["test_gradients" if method == "proj" else "test_select"] = time.perf_counter() - started
    started = time.perf_counter()
    (pro, pro_s), (opp, opp_s) = top_influences(test_outs, train_outs, traj.learning_rates, method, test_pred[chosen],
                                                result["train_labels"], top, chunk, kind)
    result.update(proponents=pro, proponent_scores=pro_s, opponents=opp, opponent_scores=opp_s,
                  nearest=nearest(test_outs[-1]["features"], train_outs[-1]["features"], top, chunk),
                  train_outputs=train_outs, test_outputs=test_outs, store_key=key)
    seconds["attribution"] = time.perf_counter() - started
    return result


def run_explain(ckpt_dir: str, out_dir: str, train_spec: str | None = None, test_spec: str | None = None, *,
                errors_only: bool = True, top: int = 10, method: str = "proj", kind: str = INFLUENCES[0],
                project_params: str = "all", project_dim: int = 1024, seed: int = 0, batch_size: int = 64,
                steps=None, shown: int = 6, progress: bool = True, log=print) -> dict | None:
    """Explains the test images and writes explain.csv, explain.json, figures/ and the training
    store (train-store/, reused by the next run into the same `out_dir`); returns the summary of
    explain.json (None when there is nothing to explain: nothing is written then)."""
    from resnet_jax.metrics.attribution import proponent_summary

    files.check_ours(out_dir, "explain.json", EXPLAIN_FORMAT)
    started = time.perf_counter()
    store = os.path.join(out_dir, "train-store")
    result = explain(ckpt_dir, train_spec, test_spec, errors_only=errors_only, top=top, method=method, kind=kind,
                     project_params=project_params, project_dim=project_dim, seed=seed, batch_size=batch_size,
                     steps=audit.parse_steps(steps), store=store, progress=progress)
    traj = result["trajectory"]
    if len(traj.steps) == 1:
        log(f"note: {ckpt_dir} holds one checkpoint (step {traj.steps[0]}): the single-checkpoint approximation "
            f"eta <g_z, g_z'> at the final weights, not a sum over the training trajectory")
    if traj.learning_rate_source == "uniform":
        log(f"note: {ckpt_dir} records no learning rates (trained before they were recorded): eta_t = 1")
    if result["explained"].size == 0:
        log(f"no errors to explain: every one of the {len(result['test'])} images of {result['test'].spec} is "
            f"classified correctly (pass --all to explain correct predictions)")
        return None
    names = traj.meta["class_names"]
    train, test = result["train"], result["test"]
    y_train, flipped = result["train_labels"], result["flipped"]
    rows, items = [], []
    for m, i in enumerate(result["explained"]):
        item = {"test_index": int(i), "test_id": test.ids[i], "true_label": names[result["true"][m]],
                "predicted_label": names[result["predicted"][m]], "proponents": [], "opponents": []}
        for role, idx, score in (("proponent", result["proponents"][m], result["proponent_scores"][m]),
                                 ("opponent", result["opponents"][m], result["opponent_scores"][m])):
            for rank, (j, s) in enumerate(zip(idx, score), start=1):
                row = {"test_id": test.ids[i], "true_label": item["true_label"],
                       "predicted_label": item["predicted_label"], "kind": role, "rank": rank,
                       "train_index": int(j), "train_id": train.ids[j], "train_label": names[y_train[j]],
                       "influence": float(s)}
                if flipped is not None:
                    row["train_flipped"] = bool(flipped[j])
                rows.append(row)
                item[f"{role}s"].append({k: v for k, v in row.items() if k in ITEM_KEYS})
        items.append(item)
    lookalike = np.asarray([np.isin(p, q) for p, q in zip(result["proponents"], result["nearest"])])
    summary_stats = proponent_summary(y_train[result["proponents"]], result["predicted"], y_train, lookalike,
                                      None if flipped is None else flipped[result["proponents"]], flipped)
    summary = {"format": EXPLAIN_FORMAT, "checkpoint": os.path.abspath(ckpt_dir), "train": train.spec,
               "test": test.spec, "n_train": len(train), "n_test": len(test),
               "errors": int(np.sum(result["test_predicted"] != np.asarray(test.labels))),
               "explained": len(items), "errors_only": errors_only, "top": top, "method": method,
               "influence": kind,
               "definition": "g_t(z) = grad L(train image, its training label; theta_t), g_t(z') = grad L(test "
                             "image, predicted label; theta_t); raw = sum_t eta_t <g_t(z), g_t(z')>, cosine = "
                             "sum_t eta_t cos(g_t(z), g_t(z')), relatif = raw / sqrt(sum_t eta_t ||g_t(z)||^2), fisher = "
                             f"mean_t g_t(z')^T (F_t + lambda_t I)^-1 g_t(z) (F_t = Phi_t^T Phi_t / N, lambda_t = "
                             f"{FISHER_DAMPING} trace(F_t) / k); "
                             "proponents: largest, opponents: smallest (most negative)",
               "trajectory": {"steps": traj.steps, "learning_rates": traj.learning_rates.tolist(),
                              "learning_rate_source": traj.learning_rate_source,
                              "single_checkpoint_approximation": len(traj.steps) == 1},
               "projection": ({"params": project_params, "dim": project_dim, "seed": seed}
                              if method == "proj" else None),
               "reused_store": result["reused_store"], "summary": summary_stats,
               "seconds": {k: round(v, 2) for k, v in result["seconds"].items()}, "images": items}
    tmp = tempfile.mkdtemp(prefix=".tmp-explain-", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        if result["reused_store"]:
            os.rename(store, os.path.join(tmp, "train-store"))
        else:
            save_store(os.path.join(tmp, "train-store"), result["store_key"], result["train_outputs"])
        files.write_csv(os.path.join(tmp, "explain.csv"), rows, list(rows[0]))
        started_fig = time.perf_counter()
        error_figures(result, os.path.join(tmp, "figures"), shown)
        summary["seconds"]["figures"] = round(time.perf_counter() - started_fig, 2)
        summary["seconds"]["total"] = round(time.perf_counter() - started, 2)
        files.write_json(os.path.join(tmp, "explain.json"), summary)
        files.replace_dir(tmp, out_dir)
    except BaseException:
        if os.path.isdir(os.path.join(tmp, "train-store")) and result["reused_store"]:
            os.rename(os.path.join(tmp, "train-store"), store)  # give the reused store back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


FIGURE_BATCH = 32  # error images per Grad-CAM call of the figures (all calls padded to this size)


def error_figures(result: dict, fig_dir: str, shown: int = 6) -> list[str]:
    """Writes one PNG per explained image to fig_dir (its Grad-CAM for the predicted class at the
    newest checkpoint, then its first `shown` proponents and opponents); returns the paths."""
    from resnet_jax.core import gradcam
    from resnet_jax.core.grads import pad_rows

    os.makedirs(fig_dir, exist_ok=True)
    test = result["test"]
    ckpt = result["checkpoints"][-1]  # restored by `explain`
    paths, chunk, n = [], FIGURE_BATCH, result["explained"].size
    for start in range(0, n, chunk):
        part = result["explained"][start:start + chunk]
        images, labels = test.take(part).images, result["predicted"][start:start + chunk]
        size = chunk if n > chunk else part.size  # one compiled shape: a short last chunk repeats its last image
        cams = gradcam.gradcam(ckpt.model, ckpt.variables, pad_rows(images, size), pad_rows(labels, size))[:part.size]
        for m, (i, image, cam) in enumerate(zip(part, images, cams), start=start):
            path = os.path.join(fig_dir, f"{m + 1:04d}-{_safe(test.ids[i])}.png")
            paths.append(_one_figure(result, m, image, cam, path, shown))
    return paths


def _safe(text: str) -> str:
    """A file-name stem from an image id: its image extension dropped (no ".png.png"), odd characters as "_"."""
    stem, ext = os.path.splitext(str(text))
    text = stem if ext.lower() in IMAGE_EXTENSIONS else str(text)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:60]


def _unit(img):
    img = np.asarray(img, np.float64)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _one_figure(result, m, image, cam, path, shown) -> str:
    from resnet_jax import plots as figures

    names = result["trajectory"].meta["class_names"]
    shown = min(shown, result["proponents"].shape[1])
    flipped = result["flipped"]
    fig = figures.new_figure(1.3 * (shown + 2), 3.2)
    axes = fig.subplots(2, shown + 2, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(_unit(image))
    axes[0, 0].set_title(f"{result['test'].ids[result['explained'][m]]}\n{names[result['true'][m]]} -> "
                         f"{names[result['predicted'][m]]}", fontsize=7, color="crimson")
    axes[1, 0].imshow(_unit(image))
    axes[1, 0].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1, 0].set_title(f"Grad-CAM ({names[result['predicted'][m]]})", fontsize=7)
    for row, (role, idx, score) in enumerate((("proponent", result["proponents"][m], result["proponent_scores"][m]),
                                              ("opponent", result["opponents"][m], result["opponent_scores"][m]))):
        batch = result["train"].take(np.asarray(idx[:shown]))
        axes[row, 1].text(0.5, 0.5, f"{role}s", ha="center", va="center", fontsize=8, rotation=90)
        for col, (j, s, img) in enumerate(zip(idx[:shown], score[:shown], batch.images), start=2):
            axes[row, col].imshow(_unit(img))
            flip = flipped is not None and flipped[j]
            axes[row, col].set_title(f"{names[result['train_labels'][j]]}{' (flipped)' if flip else ''}\n{s:.3g}",
                                     fontsize=7, color="crimson" if flip else "black")
    fig.suptitle(f"{result['kind']} influence; top: proponents (pushed towards the prediction), bottom: opponents",
                 fontsize=7)
    return figures.save_png(fig, path)
