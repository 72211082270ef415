"""Results over several training seeds: every number as its mean and standard deviation.

`aggregate` walks the per-seed results of one model in parallel (the same nested dicts and lists) and
replaces each number that differs between seeds by a `Spread` {"mean", "std", "n", "values"}
(std: the sample standard deviation, ddof = 1); numbers equal in every seed stay as they are, and
strings, flags, None and lists of numbers (cluster labels, 2-D coordinates, image indices) are taken
from the first seed, which the figures also show. Tables print a Spread as "mean ± std".
"""
from __future__ import annotations

import numbers

import numpy as np


class Spread(dict):
    """{"mean", "std", "n", "values"} of one number over seeds; a dict, so results.json holds it as is."""

    @classmethod
    def of(cls, values) -> "Spread":
        v = np.asarray(values, np.float64)
        finite = v[np.isfinite(v)]
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
        return cls(mean=float(np.mean(finite)) if len(finite) else float("nan"), std=std, n=int(len(finite)),
                   values=[float(x) for x in v])


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def aggregate(results: list):
    """Returns the per-seed `results` (a list of equally shaped values) merged as described above."""
    first = results[0]
    if len(results) == 1:
        return first
    if isinstance(first, dict) and all(isinstance(r, dict) for r in results):
        return {k: aggregate([r[k] for r in results]) for k in first if all(k in r for r in results)}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in results):
        if first and all(isinstance(x, dict) for r in results for x in r):  # e.g. rows of a table
            return [aggregate([r[i] for r in results]) for i in range(len(first))]
        return first
    if all(_number(r) for r in results):
        if all(r == first for r in results):
            return first
        return Spread.of(results)
    return first


def is_spread(value) -> bool:
    return isinstance(value, dict) and "mean" in value and "std" in value


def mean(value):
    """The number itself, or a Spread's mean (None stays None)."""
    return value["mean"] if is_spread(value) else value
