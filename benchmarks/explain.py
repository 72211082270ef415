"""`resnet-jax bench explain`: the counterfactual check of the proponents (remove and retrain).

Per seed: train one run (every epoch kept), find its held-out errors and attribute each of them
(`explain.explain`) with every influence kind asked for (`kinds`, the first the baseline's). Then,
for each K, remove from the training set
    proponents   the union of every error's top-K proponents (n images), per kind,
    random       n images drawn uniformly (numpy default_rng([seed, K])), per distinct n,
    high-loss    the n images of highest training loss at the newest checkpoint (n of the first kind),
and once per seed
    reorder      one random training image (default_rng([seed, 0])): nothing of consequence is
                 removed, but every epoch's batches change; the noise floor of retraining,
retrain with the same seed and recipe (`removal="retrain"`: without the images, so every epoch's
batches change; `removal="mask"`: the images stay in their batches with zero weight in the loss,
so the batches are those of the base run and `reorder` measures the floor of masking one random
image), and count how many of the original errors the retrained
model now classifies correctly ("fixed"), the new errors and the held-out accuracy. Every
retraining also measures how each error's loss at its predicted label changed; per influence kind
(all of them, whichever chose the removals), "removal_correlation" is the mean Spearman correlation
over a seed's retrainings between that change and the one the scores predict (the sum of the
removed images' influences), averaged over the errors and then the seeds: a small-sample relative
of the linear datamodeling score, on these removals instead of random half-subsets. With `lds` = R > 0
every seed then also retrains R times without a random half of the training set (seedS/half{j},
numpy default_rng([seed, 2, j])), and "linear_datamodeling_score" is the same correlation over those R
runs alone: the linear datamodeling score of Park et al. (2023) on the errors, with the loss at the
predicted label as the model output (a removal set and its complement give the same ranks), with
"linear_datamodeling_null" beside it: the same score for shuffled scores (its baseline). The order is
priority first: all base runs, then per K (in the order given) and arm, every seed, so that a run
cut short has the first K of every seed, then the half-subsets. Every run resumes from its directory under `out_dir`
(and each base run's training store, `seedS/train-store`); bench-explain.json is rewritten
after every retraining. A run's directory is seedS/k{K}-{arm}, with -{kind} added for kinds other than
relatif (high-loss: the first kind, whose count it takes), and seedS/reorder; with
`removal="mask"` every retraining's directory ends in -masked.
"""
from __future__ import annotations

import os
import time

import numpy as np

from resnet_jax.benchmarks import audit as audit_bench
from resnet_jax.core import checkpoint, data, files
from resnet_jax.jobs import explain
from resnet_jax.training import labels as label_edits, train
from resnet_jax.core.outputs import label_loss, softmax64
from resnet_jax.constants import EXPLAIN_REMOVALS, INFLUENCES
from resnet_jax.errors import UserError

ARMS = ("proponents", "random", "reorder", "high-loss")
REMOVALS = EXPLAIN_REMOVALS
BENCH_FORMAT = "resnet-jax-bench-explain/1"


def held_out_probs(ckpt_dir: str, config: train.TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Returns (softmax (T, C) float64, true (T,)) of the newest checkpoint on the held-out split of config.data."""
    ckpt = checkpoint.load(ckpt_dir)
    kind, arg, _ = data.parse_spec(config.data)
    test_set = data.load_for_checkpoint(kind if arg is None else f"{kind}:{arg}", ckpt.meta, default_split="test",
                                        seed=config.seed)
    return audit_bench.predict_probs(ckpt_dir, test_set, np.arange(len(test_set))), np.asarray(test_set.labels)


def removal_sets(result: dict, k: int, seed: int, proponents: np.ndarray | None = None) -> dict:
    """Returns {arm: sorted training indices to remove} for the K of one attribution `result`, its
    proponents (M, >= K) or those given ("reorder" does not depend on K)."""
    chosen = np.unique((result["proponents"] if proponents is None else proponents)[:, :k])
    n_train = len(result["train_labels"])
    loss = label_loss(softmax64(result["train_outputs"][-1]["logits"]), result["train_labels"])
    return {"proponents": chosen,
            "random": np.sort(np.random.default_rng([seed, k]).choice(n_train, chosen.size, replace=False)),
            "reorder": np.random.default_rng([seed, 0]).choice(n_train, 1),
            "high-loss": np.sort(np.argsort(-loss, kind="stable")[:chosen.size])}


def half_subset(n_train: int, seed: int, j: int) -> np.ndarray:
    """Returns the sorted training indices removed by half-subset run j of a seed: n_train // 2 of them,
    drawn uniformly without replacement by default_rng([seed, 2, j])."""
    return np.sort(np.random.default_rng([seed, 2, j]).choice(n_train, n_train // 2, replace=False))


def _run_name(arm: str, k: int, kind: str, removal: str = REMOVALS[0]) -> str:
    """Returns the directory of one retraining under seedS/ (module docstring)."""
    name = arm if arm == "reorder" else f"k{k}-{arm}" + ("" if kind == INFLUENCES[0] else f"-{kind}")
    return name + ("-masked" if removal == "mask" else "")


def run(out_dir: str, *, seeds=(0, 1, 2), ks=(10, 20), model: str = "resnet18", data_spec: str = "digits",
        epochs: int = 6, batch_size: int = 64, method: str = "proj", kinds=(INFLUENCES[0],),
        project_dim: int = 1024, arms=ARMS, removal: str = REMOVALS[0], lds: int = 0, progress: bool = True,
        log=print) -> dict:
    """Runs the counterfactual check; returns the summary written to out_dir/bench-explain.json."""
    from resnet_jax.metrics.attribution import spread

    if not seeds or not ks or min(ks) < 1:
        raise UserError(f"--seeds and --top need at least one value each, K >= 1; got {seeds} and {ks}")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise UserError(f"unknown arm {bad[0] if bad else arms!r}: choose from {', '.join(ARMS)}")
    bad = [k for k in kinds if k not in INFLUENCES]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise UserError(f"--influence takes distinct kinds from {', '.join(INFLUENCES)}, got {', '.join(kinds)}")
    for kind in kinds:
        explain.check_kind(kind, method)
    if removal not in REMOVALS:
        raise UserError(f"unknown removal {removal!r}: choose one of {', '.join(REMOVALS)}")
    if lds != 0 and lds < 3:
        raise UserError(f"--lds needs at least 3 half-subset retrainings per seed for a rank correlation, got {lds}")
    files.check_ours(out_dir, "bench-explain.json", BENCH_FORMAT)
    os.makedirs(out_dir, exist_ok=True)
    summary = {"format": BENCH_FORMAT,
               "config": {"model": model, "data": data_spec, "epochs": epochs, "batch_size": batch_size,
                          "method": method, "influence": list(kinds), "project_dim": project_dim, "seeds": list(seeds),
                          "ks": list(ks), "arms": list(arms), "removal": removal, "lds": lds},
               "runs": [], "seeds": []}
    path = os.path.join(out_dir, "bench-explain.json")
    files.write_json(path, summary)  # first: marks the directory as ours, so that a run cut short resumes
    bases, base_loss, all_scores = {}, {}, {}
    changes = {seed: [] for seed in seeds}  # per seed: (removed indices, change of the errors' test loss) per run
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
        base_probs, true = held_out_probs(base_dir, config)
        pred = base_probs.argmax(1)
        errors = np.flatnonzero(pred != true)
        if errors.size == 0:
            raise UserError(f"the seed-{seed} run makes no held-out errors: nothing to explain; train fewer --epochs")
        log(f"seed {seed}: {errors.size} held-out errors; attributing them ({method}, {', '.join(kinds)})")
        started = time.perf_counter()
        store = os.path.join(out_dir, f"seed{seed}", "train-store")
        result = explain.explain(base_dir, errors_only=True, top=max(ks), method=method, kind=kinds[0],
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
        base_loss[seed] = label_loss(base_probs[errors], pred[errors])
        all_scores[seed] = {kind: explain.influence(result["test_outputs"], result["train_outputs"],
                                                    result["trajectory"].learning_rates, method, result["predicted"],
                                                    result["train_labels"], kind=kind)
                            for kind in INFLUENCES if kind != "fisher" or method == "proj"}
        # the other kinds' proponents from these scores: a stable sort ranks ties as top_influences does
        proponents = {kind: result["proponents"] if kind == kinds[0] else
                      np.argsort(-all_scores[seed][kind], axis=1, kind="stable")[:, :max(ks)] for kind in kinds}
        bases[seed] = (config, result, proponents, pred, true, errors)
        files.write_json(path, summary)
    for k in ks:
        for arm in arms:
            for kind in (kinds if arm in ("proponents", "random") else kinds[:1]):
                for seed in seeds:
                    if arm == "reorder" and k != ks[0]:
                        continue
                    config, result, proponents, pred, true, errors = bases[seed]
                    removed = removal_sets(result, k, seed, proponents[kind])[arm]
                    name = _run_name(arm, k, kind, removal)
                    if arm == "random" and kind != kinds[0] and removed.size == removal_sets(
                            result, k, seed, proponents[kinds[0]])[arm].size:
                        continue  # the same draw as the first kind's
                    record, change = _retrain(out_dir, seed, name, bases[seed], removed, removal, base_loss[seed],
                                              log, f"seed {seed}, K = {k}")
                    changes[seed].append((removed, change))
                    summary["runs"].append({"seed": seed, "k": None if arm == "reorder" else k, "arm": arm,
                                            "influence": kind if arm in ("proponents", "random") else None, **record})
                    summary["table"] = table(summary["runs"], spread)
                    summary["removal_correlation"] = correlations(all_scores, changes)
                    files.write_json(path, summary)
    halves = {seed: [] for seed in seeds}
    for j in range(lds):
        for seed in seeds:
            removed = half_subset(len(bases[seed][1]["train_labels"]), seed, j)
            name = f"half{j:02d}" + ("-masked" if removal == "mask" else "")
            record, change = _retrain(out_dir, seed, name, bases[seed], removed, removal, base_loss[seed], log,
                                      f"seed {seed}: half-subset {j + 1}/{lds}")
            halves[seed].append((removed, change))
            summary.setdefault("half_runs", []).append({"seed": seed, "half": j, **record,
                                                         "loss_change": [float(c) for c in change]})
            summary["linear_datamodeling_score"] = correlations(all_scores, halves)
            files.write_json(path, summary)
    if lds:
        summary["linear_datamodeling_null"] = correlations(all_scores, halves, null=True)
        files.write_json(path, summary)
    return summary


def _retrain(out_dir: str, seed: int, name: str, base: tuple, removed: np.ndarray, removal: str,
             base_loss: np.ndarray, log, what: str) -> tuple:
    """Retrains the base run's recipe without (or masking) the training images `removed` in
    out_dir/seed{seed}/{name}, logging `what` first; returns (the run's record: removed, errors, fixed,
    fixed_ids, new_errors, accuracy, training_s; the change of each error's loss at its predicted label (M,))."""
    config, result, _, pred, true, errors = base
    run_dir = os.path.join(out_dir, f"seed{seed}", name)
    log(f"{what}: retraining {'without' if removal == 'retrain' else 'masking'} {removed.size} images ({name})")
    ids = tuple(result["train"].ids[i] for i in removed)
    edits = label_edits.LabelEdits(**{"remove" if removal == "retrain" else "mask": ids})
    train.fit(config, run_dir, progress=False, log=lambda s: log(f"  {name}: {s}"), held_out=False,
              label_edits=edits, keep_epochs=str(config.epochs))
    probs, _ = held_out_probs(run_dir, config)
    now = probs.argmax(1)
    record = {"removed": int(removed.size), "errors": int(errors.size),
              "fixed": int(np.sum(now[errors] == true[errors])),
              "fixed_ids": [int(i) for i in errors[now[errors] == true[errors]]],
              "new_errors": int(np.sum((now != true) & (pred == true))), "accuracy": float(np.mean(now == true)),
              "training_s": round(audit_bench.training_seconds(checkpoint.load_meta(run_dir)["history"]), 1)}
    return record, label_loss(probs[errors], pred[errors]) - base_loss


def correlations(all_scores: dict, changes: dict, null: bool = False) -> dict:
    """Returns per influence kind the mean over seeds (and the per-seed values) of
    `metrics.attribution.removal_correlation` over that seed's retrainings, seeds with at least 3;
    `null`: of its baseline for shuffled scores instead (`removal_correlation_null`, the mean of its
    draws; "std" per seed beside "per_seed")."""
    from resnet_jax.metrics.attribution import removal_correlation, removal_correlation_null

    score = removal_correlation_null if null else removal_correlation
    out = {}
    for kind in next(iter(all_scores.values()), {}):
        got = {seed: score(all_scores[seed][kind], [r for r, _ in runs], [c for _, c in runs])
               for seed, runs in changes.items() if len(runs) >= 3 and seed in all_scores}
        per_seed = {seed: g["mean"] for seed, g in got.items()}
        values = [v for v in per_seed.values() if v is not None]
        out[kind] = {"mean": float(np.mean(values)) if values else None, "per_seed": per_seed,
                     "runs": {seed: len(changes[seed]) for seed in per_seed}}
        if null:
            out[kind]["std"] = {seed: g["std"] for seed, g in got.items()}
    return out


def table(runs: list[dict], spread) -> list[dict]:
    """Returns one row per (K, arm, influence kind) and one for reorder: errors fixed (mean, sample std
    over seeds, per-seed values, mean share of each seed's errors), images removed, new errors and
    accuracy (means), and the ratio of the fixed to those of the same seed's random run of the same K
    and size, summed over the seeds that have both (None without any). "beyond the floor" counts only
    the errors that the same seed's reorder run (one random image removed) left wrong: the fixes that
    retraining noise alone does not explain (None where a seed has no reorder run or a run no
    `fixed_ids`)."""
    floor = {r["seed"]: set(r["fixed_ids"]) for r in runs if r["arm"] == "reorder" and "fixed_ids" in r}

    def beyond(run):
        return len(set(run["fixed_ids"]) - floor[run["seed"]]) if "fixed_ids" in run and run["seed"] in floor else None

    rows = []
    for k in sorted({r["k"] for r in runs if r["k"] is not None}, reverse=True) + [None]:
        random = {(r["seed"], r["removed"]): r for r in runs if r["k"] == k and r["arm"] == "random"}
        for arm in ARMS:
            for kind in dict.fromkeys(r.get("influence") for r in runs if r["k"] == k and r["arm"] == arm):
                sel = [r for r in runs if r["k"] == k and r["arm"] == arm and r.get("influence") == kind]
                pairs = [(r, random[r["seed"], r["removed"]]) for r in sel if (r["seed"], r["removed"]) in random]
                counted = [(beyond(r), beyond(q)) for r, q in pairs if beyond(r) is not None and beyond(q) is not None]
                past = [beyond(r) for r in sel if beyond(r) is not None]
                fixed = spread([r["fixed"] for r in sel])
                label = {"proponents": "proponents", "reorder": "one random image (noise floor)"}.get(
                    arm, f"{arm} (same count)")
                rows.append({"K": "-" if k is None else k,
                             "removed": label if kind is None or arm == "high-loss" else f"{label} [{kind}]",
                             "seeds": fixed["n"], "images removed": float(np.mean([r["removed"] for r in sel])),
                             "errors": float(np.mean([r["errors"] for r in sel])), "fixed (mean)": fixed["mean"],
                             "fixed (std)": fixed["std"], "fixed per seed": " / ".join(str(r["fixed"]) for r in sel),
                             "fixed share (mean)": float(np.mean([r["fixed"] / r["errors"] for r in sel])),
                             "new errors (mean)": float(np.mean([r["new_errors"] for r in sel])),
                             "accuracy (mean)": float(np.mean([r["accuracy"] for r in sel])),
                             "x random": _ratio([(r["fixed"], q["fixed"]) for r, q in pairs]),
                             "fixed beyond the floor (mean)": float(np.mean(past)) if past else None,
                             "x random beyond the floor": _ratio(counted)})
    return rows


def _ratio(pairs: list[tuple[int, int]]) -> float | None:
    """Returns sum(ours) / sum(random) over the (ours, random) pairs (None without a pair, or if that sum is 0)."""
    denominator = sum(q for _, q in pairs)
    return sum(p for p, _ in pairs) / denominator if pairs and denominator > 0 else None
