"""bin/device-check --smoke end to end on the CPU; its table arithmetic; the package without tensorflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resnet_jax.benchmarks import device_check as dc
from test_data import run_hidden

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([os.path.join(ROOT, "bin", "device-check"), "--smoke", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "device-check.json").read_text())
    md = (out / "device-check.md").read_text()
    assert report["status"].startswith("passed") and report["smoke"]
    assert report["tests"]["exit_code"] == 0 and " passed" in report["tests"]["summary"]
    rows = {(r["model"], r["row"], r["precision"]): r for r in report["table"]}
    assert len(rows) == len(dc.ROWS) + len(dc.SMOKE["rows"]["bf16"])
    for (model, row, prec), r in rows.items():
        assert r["ours"] and r["ours"] > 0, r
        assert f"| {model} | {r['work']} | {prec} |" in md
    if dc.torch_status() is None:
        assert all(r["torch"] and r["ratio"] == pytest.approx(r["ours"] / r["torch"]) for r in rows.values())
        par = report["parity"]
        assert par["logits_rel_err"] <= 1e-4 and par["fc_grad_rel_err"] <= 1e-4
    else:  # no torch here: its rows and the parity say why they were skipped
        assert report["torch_skipped"] and "torch" in report["torch_skipped"]
        assert all(r["torch"] is None and report["torch_skipped"] in r["note"] for r in rows.values())
        assert report["parity"]["skipped"].startswith("skipped: torch")
        assert "PyTorch rows skipped" in md
    for t in report["targets"]:
        measured = "ours:" in t["target"] or dc.torch_status() is None
        assert t["status"] == ("not judged (no accelerator)" if measured else "not measured"), t


def test_table_and_targets_arithmetic():
    ours = [{"model": "m", "precision": "fp32", "row": row, "batch": 4, "samples_per_s": v}
            for row, v in (("forward", 100.0), ("fc", 95.0), ("all_vmap", 10.0), ("all_taps", 30.0),
                           ("projected_all", 20.0), ("fwd_bwd", 50.0), ("gradcam", 90.0))]
    torch = {"m": {"forward": 50.0, "vmap_grad_fc_only": 40.0, "vmap_grad_all_params": 12.0,
                   "batch_fwd_bwd": 25.0, "gradcam_batched": 60.0}}
    table = dc.build_table(ours, torch, None)
    by_row = {r["row"]: r for r in table}
    assert by_row["fc"]["torch_row"] == "vmap_grad_fc_only" and by_row["fc"]["ratio"] == pytest.approx(95 / 40)
    assert by_row["all_taps"]["ratio"] == pytest.approx(30 / 12)
    targets = {t["target"]: t for t in dc.judge_targets(table, on_accelerator=True)}
    assert targets["fc / ours:forward >= 0.9"]["value"] == pytest.approx(0.95)
    assert targets["fc / ours:forward >= 0.9"]["status"] == "met"
    assert targets["fc / torch:vmap_grad_fc_only >= 2.0"]["status"] == "met"  # 2.375
    best = targets["all_best (all_taps) / torch:vmap_grad_all_params >= 2.0"]
    assert best["value"] == pytest.approx(2.5) and best["status"] == "met"
    assert targets["projected_all / ours:fwd_bwd >= 0.5"]["value"] == pytest.approx(0.4)
    assert targets["projected_all / ours:fwd_bwd >= 0.5"]["status"] == "missed"
    assert targets["gradcam / torch:gradcam_batched >= 2.0"]["status"] == "missed"  # 1.5


def test_package_imports_and_extracts_without_tensorflow(tiny_ckpt, tiny_folder, tmp_path):
    proc = run_hidden(f"""
        from resnet_jax import cli
        from resnet_jax.benchmarks import device_check, speed
        from resnet_jax.core import gradcam, prefetch, precision
        from resnet_jax.jobs import cams, extract
        assert "tensorflow_datasets" not in sys.modules and "tensorflow" not in sys.modules
        m = extract.run_extract({tiny_ckpt!r}, "folder:{tiny_folder}", {str(tmp_path / "s")!r}, limit=5,
                                progress=False)
        assert "tensorflow" not in sys.modules
        print("ROWS", m["n"])
    """, ("tensorflow", "tensorflow_datasets"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ROWS 5" in proc.stdout


def test_an_external_torch_script_is_run_with_our_arguments(tmp_path):
    """`--torch-script PATH`: another comparison taking torch_compare's arguments; its rows fill the
    PyTorch columns (a stand-in script here, so no torch is needed)."""
    script = tmp_path / "other.py"
    script.write_text(
        "import argparse, json\n"
        "ap = argparse.ArgumentParser()\n"
        "for a in ('--models', '--size', '--batch', '--vmap-batch', '--loop-n', '--json'): ap.add_argument(a)\n"
        "a = ap.parse_args()\n"
        "rows = {'forward': float(a.batch) * 10, 'vmap_grad_fc_only': float(a.size)}\n"
        "json.dump({'torch': 'stand-in', a.models: rows}, open(a.json, 'w'))\n")
    config = {"models": {"resnet18": {"batch": 4, "vmap_batch": 2}}, "size": 72, "loop_n": 2}
    results, skip = dc.run_torch_compare(config, str(tmp_path), None, str(script))
    assert skip is None and results["resnet18"] == {"forward": 40.0, "vmap_grad_fc_only": 72.0}
    assert results["_meta"] == {"torch": "stand-in"}
    results, skip = dc.run_torch_compare(config, str(tmp_path), None, str(tmp_path / "missing.py"))
    assert results == {} and "is not there" in skip
    script.write_text("raise SystemExit(3)\n")
    results, _ = dc.run_torch_compare(config, str(tmp_path), None, str(script))
    assert all("failed (exit 3)" in v for v in results["resnet18"].values())
