"""Results over seeds: the aggregate of per-seed results against numpy's mean and sample SD."""
import numpy as np
import pytest

from resnet_jax.core.files import format_cell
from resnet_jax.paper import replicate


def test_aggregate_numbers_lists_and_rows():
    seeds = [{"a": 0.5, "n": 10, "name": "x", "coords": [1.0, 2.0], "rows": [{"auroc": 0.7, "m": "msp"}],
              "flag": True, "none": None},
             {"a": 0.7, "n": 10, "name": "y", "coords": [3.0, 4.0], "rows": [{"auroc": 0.9, "m": "msp"}],
              "flag": False, "none": None, "extra": 1}]
    out = replicate.aggregate(seeds)
    assert out["a"]["mean"] == pytest.approx(0.6) and out["a"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert out["a"]["values"] == [0.5, 0.7] and out["a"]["n"] == 2
    assert out["n"] == 10 and out["name"] == "x" and out["coords"] == [1.0, 2.0] and out["flag"] is True
    assert out["rows"][0]["auroc"]["mean"] == pytest.approx(0.8) and out["rows"][0]["m"] == "msp"
    assert "extra" not in out and out["none"] is None
    assert replicate.aggregate([{"a": 1.0}]) == {"a": 1.0}


def test_spread_ignores_nan_and_formats():
    s = replicate.Spread.of([0.2, float("nan"), 0.4])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.3)
    assert format_cell(s, 2) == f"0.30 ± {np.std([0.2, 0.4], ddof=1):.2f}"
    assert format_cell(replicate.Spread.of([0.25]), 2) == "0.25"
