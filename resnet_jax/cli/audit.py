"""The `audit` command: likely label errors of a run."""
from __future__ import annotations


import click

from resnet_jax.cli.options import (POSITIVE, SEED)
from resnet_jax.core.compile_cache import enable as setup_jax

from resnet_jax.constants import AUDIT_DEFAULT_METHODS


@click.command("audit")
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory of a run with several saved epochs.")
@click.option("--data", "data_spec", default=None, help="Data spec (default: the checkpoint's training data).")
@click.option("--method", "methods", default=",".join(AUDIT_DEFAULT_METHODS), show_default=True,
              help="Comma-separated: margin, loss, aum (area under the margin), tracin (self-influence on fc, "
                   "closed form), tracin-proj (all parameters, projected). The first ranks audit.csv and the figure.")
@click.option("--out", "out_dir", default="audit", show_default=True, help="Output directory (replaced when complete).")
@click.option("--project-params", default="all", show_default=True, help="Parameters of tracin-proj.")
@click.option("--project-dim", default=1024, show_default=True, help="Projection dimension of tracin-proj.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the projection.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Images per step.")
@click.option("--top", default=24, show_default=True, help="Suspects shown in suspects.png.")
@click.option("--steps", default="all", show_default=True,
              help="Checkpoints of the trajectory: all, or steps such as 4,5,6 (the last one gives loss and margin).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def audit_cmd(ckpt_dir, data_spec, methods, out_dir, project_params, project_dim, seed, batch_size, top, steps, quiet):
    """Score every training image for "likely mislabeled" (TracIn self-influence, loss, margin, AUM)."""
    setup_jax()
    from resnet_jax.jobs import audit
    from resnet_jax.paper import tables

    summary = audit.run_audit(ckpt_dir, out_dir, data_spec, methods, project_params=project_params,
                              project_dim=project_dim, seed=seed, batch_size=batch_size, top=top, steps=steps,
                              progress=not quiet, log=click.echo)
    click.echo(tables.markdown_table(summary["rows"][:10], ["rank", "id", "given_label", "suggested_label",
                                                            *summary["methods"]]))
    if summary["detection"]:
        click.echo()
        click.echo(tables.markdown_table(summary["detection"], list(summary["detection"][0])))
    click.echo(f"audited {summary['n']} images of {summary['data']} over {len(summary['trajectory']['steps'])} "
               f"checkpoints in {summary['seconds']['total']:.1f} s; wrote {out_dir}/audit.csv, audit.json, "
               f"suspects.png")

