"""The paper's commands: `reproduce` (the draft end to end) and `curvature`."""
from __future__ import annotations

import os

import click

from resnet_jax.cli.options import (NON_NEGATIVE_FLOAT, POSITIVE, SEED, Int, check_out, stopping_options)
from resnet_jax.constants import MODEL_CHOICES
from resnet_jax.core import files
from resnet_jax.core.compile_cache import enable as setup_jax
from resnet_jax.errors import UserError

MODELS_DEFAULT = ",".join(MODEL_CHOICES)


@click.command("reproduce")
@click.option("--models", "models_text", default="resnet18,resnet34,resnet50,resnet101,resnet152", show_default=True,
              help="Comma-separated models.")
@click.option("--data", "data_spec", default="digits", show_default=True,
              help="Data spec: trained on its training split, analysed on its held-out split.")
@click.option("--ckpt", "ckpts", multiple=True, metavar="NAME=DIR",
              help="Use this checkpoint for model NAME instead of training (e.g. converted weights).")
@click.option("--out", "out_dir", default="results", show_default=True,
              help="Results directory (tables, figures, and the cached runs it resumes from).")
@click.option("--quick", is_flag=True, help="ResNet-18 only, 3 epochs, 200 held-out images (about 2 minutes).")
@click.option("--limit", type=POSITIVE, default=None, help="Analyse only the first N held-out images.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of training, data and samples.")
@click.option("--seeds", type=POSITIVE, default=1, show_default=True,
              help="Train and analyse every model with N seeds (--seed, --seed + 1, ...); every table cell is then "
                   "the mean ± standard deviation over them.")
@click.option("--force", is_flag=True, help="Replace results of another configuration in --out.")
@click.option("--grad-align", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="Also train each model with the gradient-alignment loss (this λ1) and compare side by side.")
@click.option("--grad-mi", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="λ2 (mutual information) of the aligned runs.")
@stopping_options("target_accuracy", "time_budget")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce_cmd(models_text, data_spec, ckpts, out_dir, quick, limit, seed, seeds, force, grad_align, grad_mi, stopping,
                  quiet):
    """Train, extract, Grad-CAM, Tables 1-3, the misclassification report and figures, for each model."""
    setup_jax()
    from resnet_jax.paper import reproduce

    models = reproduce.parse_models("resnet18" if quick and models_text == MODELS_DEFAULT else models_text)
    given = {}
    for item in ckpts:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UserError(f"--ckpt takes NAME=DIR, got {item!r}")
        given[name] = path
    check_out(out_dir)
    with files.locked(out_dir):
        results = reproduce.run(models, data_spec, given, out_dir, quick=quick, force=force, limit=limit,
                                seed=seed, seeds=seeds, grad_align=grad_align, grad_mi=grad_mi, progress=not quiet,
                                log=click.echo, **stopping)
    click.echo(f"wrote {out_dir}/tables.md, results.json, *.csv and {len(results['figures'])} figures "
               f"in {results['timings']['total_seconds']:.0f} s")


@click.command()
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory.")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec (default: held-out split).")
@click.option("--limit", type=POSITIVE, default=256, show_default=True, help="Images to use (the first N).")
@click.option("--params", "param_subset", default="fc", show_default=True,
              help="Parameters of the Hessian: fc, layer4, all or a path pattern.")
@click.option("--iterations", type=POSITIVE, default=20, show_default=True,
              help="Lanczos iterations for the top eigenvalue.")
@click.option("--probes", type=Int(2), default=30, show_default=True,
              help="Hutchinson probes for the trace (at least 2: its standard error needs two).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the probes.")
@click.option("--out", "out_dir", default=None, help="Also write the report as curvature.json into this directory.")
def curvature(ckpt_dir, data_spec, limit, param_subset, iterations, probes, seed, out_dir):
    """Top Hessian eigenvalue and trace of the loss, for correctly classified and misclassified images."""
    if out_dir:
        check_out(out_dir)
    setup_jax()
    from resnet_jax.jobs import curvature
    from resnet_jax.paper import tables

    report, rows, note = curvature.curvature_of_checkpoint(ckpt_dir, data_spec, limit, param_subset, iterations,
                                                         probes, seed)
    click.echo(tables.markdown_table(rows, ("group", "count", "loss", "top_eigenvalue", "trace", "trace_stderr")))
    click.echo(note)
    if out_dir:
        with files.locked(out_dir):
            os.makedirs(out_dir, exist_ok=True)
            files.write_json(os.path.join(out_dir, "curvature.json"), report)
        click.echo(f"wrote {out_dir}/curvature.json")

