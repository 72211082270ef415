"""`resnet-jax bench explain`: the counterfactual check of the proponents (remove and retrain).

Per seed: train one run (every epoch kept), find its held-out errors and attribute each of them
(`explain.explain`). Then, for each K, remove from the training set
    proponents   the union of every error's top-K proponents (n images),
    random       n images drawn uniformly (numpy default_rng([seed, K])),
    high-loss    the n images of highest training loss at the newest checkpoint,
and once per seed
    reorder      one random training image (default_rng([seed, 0])): nothing of consequence is
                 removed, but every epoch's batches change; the noise floor of retraining,
retrain with the same seed and recipe, and count how many of the original errors the retrained
model now classifies correctly ("fixed"), the new errors and the held-out accuracy. The order is
priority first: all base runs, then per K (in the order given) and arm, every seed, so that a run
cut short has the first K of every seed. Every run resumes from its directory under `out_dir`
(and each base run's training store, `seedS/train-store`); bench-explain.json is rewritten
after every retraining.
"""
from __future__ import annotations

import os
import time

import numpy as np

from . import audit_bench, checkpoint, data, explain, files, labels as label_edits, train
from .analysis import softmax64
from .errors import UserError

ARMS = ("proponents", "random", "reorder", "high-loss")
BENCH_FORMAT = "resnet-jax-bench-explain/1"


def held_out_predictions(ckpt_dir: str, config: train.TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Returns (predicted (T,), true (T,)) of the newest checkpoint on the held-out split of config.data."""
    ckpt = checkpoint.load(ckpt_dir)
    kind, arg, _ = data.parse_spec(config.data)
    test_set = data.load_for_checkpoint(kind if arg is None else f"{kind}:{arg}", ckpt.meta, default_split="test",
                                        seed=config.seed)
    probs = audit_bench.predict_probs(ckpt_dir, test_set, np.arange(len(test_set)))
    return probs.argmax(1), np.asarray(test_set.labels)


def removal_sets(result: dict, k: int, seed: int) -> dict:
    """Returns {arm: sorted training indices to remove} for the K of one attribution `result`
    ("reorder" does not depend on K)."""
    chosen = np.unique(result["proponents"][:, :k])
    n_train = len(result["train_labels"])
    p = softmax64(result["train_outputs"][-1]["logits"])
    loss = -np.log(np.maximum(p[np.arange(n_train), result["train_labels"]], 1e-300))
    return {"proponents": chosen,
            "random": np.sort(np.random.default_rng([seed, k]).choice(n_train, chosen.size, replace=False)),
            "reorder": np.random.default_rng([seed, 0]).choice(n_train, 1),
            "high-loss": np.sort(np.argsort(-loss, kind="stable")[:chosen.size])}


def run(out_dir: str, *, seeds=(0, 1, 2), ks=(10, 20), model: str = "resnet18", data_spec: str = "digits",
        epochs: int = 6, batch_size: int = 64, method: str = "proj", kind: str = explain.INFLUENCES[0],
        project_dim: int = 1024, arms=ARMS, progress: bool = True, log=print) -> dict:
    """Runs the counterfactual check; returns the summary written to out_dir/bench-explain.json."""
    from metrics.attribution import spread

    if not seeds or not ks or min(ks) < 1:
        raise UserError(f"--seeds and --top need at least one value each, K >= 1; got {seeds} and {ks}")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise UserError(f"unknown arm {bad[0] if bad else arms!r}: choose from {', '.join(ARMS)}")
    if kind not in explain.INFLUENCES:
        raise UserError(f"unknown influence {kind!r}: choose one of {', '.join(explain.INFLUENCES)}")
    files.check_ours(out_dir, "bench-explain.json", BENCH_FORMAT)
    os.makedirs(out_dir, exist_ok=True)
    summary = {"format": BENCH_FORMAT,
               "config": {"model": model, "data": data_spec, "epochs": epochs, "batch_size": batch_size,
                          "method": method, "influence": kind, "project_dim": project_dim, "seeds": list(seeds),
                          "ks": list(ks), "arms": list(arms)},
               "runs": [], "seeds": []}
    path = os.path.join(out_dir, "bench-explain.json")
    files.write_json(path, summary)  # first: marks the directory as ours, so that a run cut short resumes
    bases = {}
    for seed in seeds:
        # The measured recipe: a fixed number of epochs on every training image as rendered (no validation
        # slice, no redrawn digits), so that the removed images are the ones the model saw.
        config = train.TrainConfig(model=model, data=data_spec, epochs=epochs, batch_size=batch_size, seed=seed,
                                   augment_shift=4, validation_fraction=0.0, redraw=False)
        base_dir = os.path.join(out_dir, f"seed{seed}", "base")
        log(f"seed {seed}: training {model} for {epochs} epochs")
        train.fit(config, base_dir, progress=False, log=lambda s: log(f"  base: {s}"), held_out=False,
                  keep_epochs="all")
        epoch_seconds = audit_bench.training_seconds(checkpoint.load_meta(base_dir)["history"]) / epochs
        pred, true = held_out_predictions(base_dir, config)
        errors = np.flatnonzero(pred != true)
        if errors.size == 0:
            raise UserError(f"the seed-{seed} run makes no held-out errors: nothing to explain; train fewer --epochs")
        log(f"seed {seed}: {errors.size} held-out errors; attributing them ({method}, {kind})")
        started = time.perf_counter()
        store = os.path.join(out_dir, f"seed{seed}", "train-store")
        result = explain.explain(base_dir, errors_only=True, top=max(ks), method=method, kind=kind,
                                 project_dim=project_dim, seed=seed, store=store, progress=progress)
        if not result["reused_store"]:
            explain.save_store(store, result["store_key"], result["train_outputs"])
        attribution_seconds = time.perf_counter() - started  # with a reused store: the test side only
        np.testing.assert_array_equal(result["explained"], errors)
        summary["seeds"].append({"seed": seed, "errors": int(errors.size), "epoch_seconds": round(epoch_seconds, 1),
                                 "attribution_seconds": round(attribution_seconds, 1),
                                 "reused_store": result["reused_store"],
                                 "attribution_epochs": round(attribution_seconds / epoch_seconds, 2),
                                 "base_accuracy": float(np.mean(pred == true)),
                                 "attribution_parts": {k: round(v, 1) for k, v in result["seconds"].items()}})
        bases[seed] = (config, result, pred, true, errors)
        files.write_json(path, summary)
    for k in ks:
        for arm in arms:
            for seed in seeds:
                if arm == "reorder" and k != ks[0]:
                    continue
                config, result, pred, true, errors = bases[seed]
                removed = removal_sets(result, k, seed)[arm]
                run_dir = os.path.join(out_dir, f"seed{seed}", arm if arm == "reorder" else f"k{k}-{arm}")
                log(f"seed {seed}, K = {k}: retraining without {removed.size} images ({arm})")
                ids = result["train"].ids
                edits = label_edits.LabelEdits(remove=tuple(ids[i] for i in removed))
                train.fit(config, run_dir, progress=False, log=lambda s: log(f"  {arm}: {s}"), held_out=False,
                          label_edits=edits, keep_epochs=str(config.epochs))
                now, _ = held_out_predictions(run_dir, config)
                summary["runs"].append({"seed": seed, "k": None if arm == "reorder" else k, "arm": arm,
                                        "removed": int(removed.size), "errors": int(errors.size),
                                        "fixed": int(np.sum(now[errors] == true[errors])),
                                        "fixed_ids": [int(i) for i in errors[now[errors] == true[errors]]],
                                        "new_errors": int(np.sum((now != true) & (pred == true))),
                                        "accuracy": float(np.mean(now == true)),
                                        "training_s": round(audit_bench.training_seconds(
                                            checkpoint.load_meta(run_dir)["history"]), 1)})
                summary["table"] = table(summary["runs"], spread)
                files.write_json(path, summary)
    return summary


def table(runs: list[dict], spread) -> list[dict]:
    """Returns one row per (K, arm) and one for reorder: errors fixed (mean, sample std over seeds,
    per-seed values, mean share of each seed's errors), images removed, new errors and accuracy
    (means), and the ratio of the mean fixed to the random arm's mean fixed at the same K, over the
    seeds that have both (None without any). "beyond the floor" counts only the errors that the
    same seed's reorder run (one random image removed) left wrong: the fixes that retraining noise
    alone does not explain (None where a seed has no reorder run or a run no `fixed_ids`)."""
    floor = {r["seed"]: set(r["fixed_ids"]) for r in runs if r["arm"] == "reorder" and "fixed_ids" in r}

    def beyond(run):
        return len(set(run["fixed_ids"]) - floor[run["seed"]]) if "fixed_ids" in run and run["seed"] in floor else None

    rows = []
    for k in sorted({r["k"] for r in runs if r["k"] is not None}, reverse=True) + [None]:
        random_fixed = {r["seed"]: r["fixed"] for r in runs if r["k"] == k and r["arm"] == "random"}
        random_beyond = {r["seed"]: beyond(r) for r in runs if r["k"] == k and r["arm"] == "random"
                         and beyond(r) is not None}
        for arm in ARMS:
            sel = [r for r in runs if r["k"] == k and r["arm"] == arm]
            if not sel:
                continue
            fixed = spread([r["fixed"] for r in sel])
            counted = {r["seed"]: beyond(r) for r in sel if beyond(r) is not None}
            rows.append({"K": "-" if k is None else k,
                         "removed": {"proponents": "proponents", "reorder": "one random image (noise floor)"}.get(
                             arm, f"{arm} (same count)"),
                         "seeds": fixed["n"], "images removed": float(np.mean([r["removed"] for r in sel])),
                         "errors": float(np.mean([r["errors"] for r in sel])), "fixed (mean)": fixed["mean"],
                         "fixed (std)": fixed["std"], "fixed per seed": " / ".join(str(r["fixed"]) for r in sel),
                         "fixed share (mean)": float(np.mean([r["fixed"] / r["errors"] for r in sel])),
                         "new errors (mean)": float(np.mean([r["new_errors"] for r in sel])),
                         "accuracy (mean)": float(np.mean([r["accuracy"] for r in sel])),
                         "x random": _ratio({r["seed"]: r["fixed"] for r in sel}, random_fixed),
                         "fixed beyond the floor (mean)": float(np.mean(list(counted.values()))) if counted else None,
                         "x random beyond the floor": _ratio(counted, random_beyond)})
    return rows


def _ratio(per_seed: dict, random_per_seed: dict) -> float | None:
    """Returns the sum of `per_seed` over the seeds that both dicts have / the sum of `random_per_seed` over
    them (None without a common seed, or if that sum is 0)."""
    both = [s for s in per_seed if s in random_per_seed]
    denominator = sum(random_per_seed[s] for s in both)
    return sum(per_seed[s] for s in both) / denominator if both and denominator > 0 else None
