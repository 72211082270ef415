"""`resnet-jax bench audit --grid`: the audit benchmark replicated over noise seeds, kinds, rates and schedules.

Every regime (noise kind, noise rate, training epochs) is run with every seed (the noise draw and the
training seed both take it: fresh seeds, not one model's noise redrawn) by `audit.run` in its own
directory `<kind>-<rate>-e<epochs>-s<seed>/`; a finished cell is read back from its bench-audit.json,
so the grid stops and resumes at any point and may be run in the background over days. Cells run in
the order given (seeds innermost), so the first regimes are complete before the next starts.

The comparison is fixed in advance: our PRIMARY ranking (the margin, the audit's default) against
cleanlab's K-fold self-confidence. Per regime: each method's AUROC and AP as mean ± standard deviation
over the finished seeds, the per-seed paired bootstrap interval of AUROC(ours) - AUROC(cleanlab), the
share of the flipped images the noisy run ends up predicting as their wrong label (what the schedule
memorised, measured), and the cost ratio (our training and scoring seconds over cleanlab's).
"""
from __future__ import annotations

import os

import numpy as np

from resnet_jax.benchmarks import audit
from resnet_jax.core import files
from resnet_jax.errors import UserError
from resnet_jax.paper.replicate import Spread

PRIMARY = "margin"
KINDS = ("symmetric", "pairs")
RATES = (0.1, 0.3)
EPOCHS = (6, 24)  # the audit's schedule, and a long one that gives the network time to memorise the flips


def cell_dir(out_dir: str, kind: str, rate: float, epochs: int, seed: int) -> str:
    return os.path.join(out_dir, f"{kind}-{rate:g}-e{epochs}-s{seed}")


def _finished(path: str, config: dict) -> dict | None:
    json_path = os.path.join(path, "bench-audit.json")
    if not os.path.exists(json_path):
        return None
    result = files.read_json(json_path)
    same = all(result["config"].get(k) == v for k, v in config.items())
    return result if same and "versus_cleanlab" in result else None


def run(out_dir: str, seeds=(0, 1, 2), kinds=KINDS, rates=RATES, epochs=EPOCHS, folds: int = 5,
        model: str = "resnet18", data_spec: str = "digits", methods=("margin", "loss", "aum", "tracin"),
        max_cells: int | None = None, progress: bool = False, log=print, **bench_options) -> dict:
    """Runs (or resumes) the grid; `max_cells` stops after that many newly computed cells; `bench_options`
    (batch_size, image_size, stem) pass on to `audit.run`. Returns
    {"cells": [...], "regimes": [...]}, also written to out_dir/bench-audit-grid.json."""
    if PRIMARY not in methods:
        raise UserError(f"--method must include {PRIMARY}, the ranking the grid compares with cleanlab")
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown noise kind {kind!r}: choose from {', '.join(KINDS)}")
    os.makedirs(out_dir, exist_ok=True)
    cells, computed = [], 0
    plan = [(e, k, r, s) for e in epochs for k in kinds for r in rates for s in seeds]
    for i, (ep, kind, rate, seed) in enumerate(plan):
        path = cell_dir(out_dir, kind, rate, ep, seed)
        config = {"model": model, "data": data_spec, "epochs": ep, "noise": rate, "noise_seed": seed,
                  "noise_kind": kind, "seed": seed, "folds": folds}
        result = _finished(path, config)
        if result is None:
            if max_cells is not None and computed >= max_cells:
                log(f"stopping after {computed} new cells ({len(plan) - i} of {len(plan)} left): run again to resume")
                break
            log(f"[{i + 1}/{len(plan)}] {os.path.basename(path)}")
            result = audit.run(path, model=model, data_spec=data_spec, epochs=ep, noise=rate, noise_seed=seed,
                               noise_kind=kind, seed=seed, folds=folds, methods=methods, progress=progress,
                               log=lambda s: log("  " + s), **bench_options)
            computed += 1
        cells.append({"kind": kind, "rate": rate, "epochs": ep, "seed": seed, "result": result})
        out = {"cells": [_cell_summary(c) for c in cells], "regimes": regimes(cells)}
        files.write_json(os.path.join(out_dir, "bench-audit-grid.json"), out)
    return {"cells": [_cell_summary(c) for c in cells], "regimes": regimes(cells)}


def _rows(result: dict) -> dict:
    return {r["method"]: r for r in result["detection"]}


def _cell_summary(cell: dict) -> dict:
    res = cell["result"]
    return {k: cell[k] for k in ("kind", "rate", "epochs", "seed")} | {
        "n": res["n"], "n_flipped": res["n_flipped"], "memorised": res.get("memorised"),
        "detection": res["detection"], "versus_cleanlab": res["versus_cleanlab"][PRIMARY]}


def regimes(cells: list[dict]) -> list[dict]:
    """One row per regime over its finished seeds (see the module docstring)."""
    groups = {}
    for c in cells:
        groups.setdefault((c["kind"], c["rate"], c["epochs"]), []).append(c["result"])
    out = []
    for (kind, rate, ep), results in groups.items():
        rows = [_rows(r) for r in results]
        methods = [m for m in rows[0] if all(m in r for r in rows)]
        cl = next(m for m in methods if m.startswith("cleanlab (") and "fold" in m)
        ours = f"ours: {PRIMARY}"
        diffs = [r["versus_cleanlab"][PRIMARY] for r in results]
        d = Spread.of([x["difference"] for x in diffs])
        cost = [(r[ours]["training s"] + r[ours]["scoring s"]) / (r[cl]["training s"] + r[cl]["scoring s"])
                for r in rows]
        row = {"noise": kind, "rate": rate, "epochs": ep, "seeds": len(results),
               "memorised": Spread.of([r.get("memorised", np.nan) for r in results])}
        for m in methods:
            row[f"{m} AUROC"] = Spread.of([r[m]["auroc"] for r in rows])
            row[f"{m} AP"] = Spread.of([r[m]["ap"] for r in rows])
        row["AUROC ours - cleanlab"] = d
        row["per-seed CIs"] = "; ".join(f"[{x['low']:+.3f}, {x['high']:+.3f}]" for x in diffs)
        below = [x["high"] < 0 for x in diffs]
        row["ours vs cleanlab"] = ("below (every seed's CI under 0)" if all(below) else
                                   "above (every seed's CI over 0)" if all(x["low"] > 0 for x in diffs) else
                                   "within the CI" if not any(below) else
                                   f"below on {sum(below)} of {len(below)} seeds")
        row["cost ours / cleanlab"] = Spread.of(cost)
        out.append(row)
    return out
