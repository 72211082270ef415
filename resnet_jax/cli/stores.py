"""Commands that write or read a store: `extract`, `gradcam`, `similarity`."""
from __future__ import annotations

import os

import click

from resnet_jax.constants import STAGES

from resnet_jax.cli.options import (NON_NEGATIVE, POSITIVE, PRECISION_HELP, SEED, check_out)
from resnet_jax.core import files
from resnet_jax.errors import UserError
from resnet_jax.core.compile_cache import enable as setup_jax


@click.command()
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory (from train or convert).")
@click.option("--data", "data_spec", default="digits", show_default=True,
              help="Data spec; default split: the held-out one (digits:test, folder:PATH:test, ...).")
@click.option("--out", "out_dir", required=True, help="Store directory; an interrupted run resumes in it.")
@click.option("--grad-params", default="fc", show_default=True,
              help="Parameters of the per-example gradient: fc (the draft's GW), layer4, all, or a path "
                   "pattern such as 'layer4_*/conv2/*'.")
@click.option("--label-source", type=click.Choice(["true", "predicted"]), default="true", show_default=True,
              help="Label of the loss: the true label (the draft) or the argmax prediction (control).")
@click.option("--project-dim", type=POSITIVE, default=None,
              help="Random projection of each gradient to this many dimensions (seeded, on device; "
                   "block-Kronecker with 8x8 blocks). It is approximate (its measured error: "
                   "docs/guides/own-data.md); leave it out for exact cosines.")
@click.option("--batch-size", type=POSITIVE, default=None,
              help="Images per shard (and per step); default: from the device's free memory (64 on the CPU).")
@click.option("--limit", type=POSITIVE, default=None, help="Only the first N images.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the projection.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help=PRECISION_HELP)
@click.option("--force", is_flag=True, help="Rebuild the store even if it holds a complete or other run.")
@click.option("--distributed", is_flag=True,
              help="Multi-host: call jax.distributed.initialize() and extract this process's slice of the data "
                   "(give each process its own --out). On TPU, Slurm and Open MPI the peers are found "
                   "automatically; elsewhere pass the three options below.")
@click.option("--coordinator", default=None, help="With --distributed: address:port of process 0.")
@click.option("--num-processes", type=POSITIVE, default=None, help="With --distributed: number of processes.")
@click.option("--process-id", type=NON_NEGATIVE, default=None, help="With --distributed: this process's index.")
@click.option("--save-gw", is_flag=True,
              help="Also write the explicit N x (d*C + C) fc gradients (gw.npy); without it an fc store without "
                   "projection keeps their exact factors (fm, logits, labels) and every reader uses those.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(ckpt_dir, data_spec, out_dir, grad_params, label_source, project_dim, batch_size, limit, seed, precision,
            force, distributed, coordinator, num_processes, process_id, save_gw, quiet):
    """Write per-example gradients (GW), probabilities (P), logits, features (FM), labels and ids."""
    peers = [name for name, value in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                      ("--process-id", process_id)) if value is not None]
    if peers and not distributed:
        raise UserError(f"{', '.join(peers)} take effect only with --distributed: add --distributed or drop them")
    if distributed and coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--coordinator takes HOST:PORT of process 0 (e.g. 10.0.0.1:1234), got {coordinator!r}")
    check_out(out_dir)
    setup_jax()
    from resnet_jax.jobs import extract as extraction

    process = None
    if distributed:
        import jax

        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        process = (jax.process_index(), jax.process_count())

    with files.locked(out_dir):
        manifest = extraction.run_extract(ckpt_dir, data_spec, out_dir, grad_params=grad_params,
                                          label_source=label_source, project_dim=project_dim, seed=seed,
                                          batch_size=batch_size, limit=limit, progress=not quiet, force=force,
                                          process=process, save_gw=save_gw, precision=precision, log=click.echo)
    kept = "as rows" if "gw.npy" in manifest["files"] else "as its factors fm, logits and labels"
    click.echo(f"store {out_dir}: {manifest['n']} images, gw {manifest['n']} x {manifest['dim']} {kept} "
               f"({manifest['run']['grad_params']}, {manifest['run']['label_source']} labels)")


@click.command()
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory.")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec (default: held-out split).")
@click.option("--out", "out_dir", required=True, help="Output directory (replaced when complete).")
@click.option("--layer", type=click.Choice(STAGES), default="layer4",
              show_default=True, help="Stage whose output the maps are computed on.")
@click.option("--method", type=click.Choice(["gradcam", "gradcampp"]), default="gradcam", show_default=True,
              help="Grad-CAM or Grad-CAM++.")
@click.option("--label-source", "--target", "label_source", type=click.Choice(["true", "predicted"]), default="true",
              show_default=True, help="Class whose logit is explained: the true label or the prediction "
                                      "(--target is the older name).")
@click.option("--limit", type=POSITIVE, default=None, help="Only the first N images.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Images per step.")
@click.option("--max-pairs", type=POSITIVE, default=2000, show_default=True,
              help="Same-class pairs of maps to compare (a seeded sample when there are more).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the pair sample.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help=PRECISION_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def gradcam(ckpt_dir, data_spec, out_dir, layer, method, label_source, limit, batch_size, max_pairs, seed, precision,
            quiet):
    """Grad-CAM maps (cams.npy), agreement metrics (CSV/JSON) and an overlay grid (PNG)."""
    check_out(out_dir)
    setup_jax()
    from resnet_jax.jobs import cams
    from resnet_jax.paper import tables

    with files.locked(out_dir):
        summary = cams.run_gradcam(ckpt_dir, data_spec, out_dir, layer=layer, method=method,
                                   label_source=label_source, limit=limit, batch_size=batch_size,
                                   max_pairs=max_pairs, seed=seed, progress=not quiet, precision=precision)
    rows = cams.cam_metric_rows(summary)
    click.echo(tables.markdown_table(rows, ("comparison", "metric", "mean", "median", "std", "n", "undefined")))
    click.echo(f"{summary['n']} maps of {summary['data']} ({summary['degenerate_maps']} all-zero) compared with "
               f"{summary['compared_with']}; written to {out_dir}")


@click.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--cams", "cams_dirs", multiple=True, help="Grad-CAM directory per store, in the same order.")
@click.option("--out", "out_dir", default=None, help="Also write table1.csv and table1.json into this directory.")
def similarity(stores, cams_dirs, out_dir):
    """Table 1: mean same-class cosine similarity of GW, P and FM (and Grad-CAM agreement)."""
    from resnet_jax.paper import analysis, tables

    if out_dir:
        check_out(out_dir)
    rows, details = analysis.similarity_table(list(stores), list(cams_dirs) or None)
    click.echo(tables.markdown_table_1(rows))
    click.echo()
    click.echo(tables.markdown_table(rows, ["Model", *tables.INTER_COLUMNS]))
    if cams_dirs:
        click.echo()
        click.echo(tables.markdown_table(rows, tables.CAM_ROW_COLUMNS))
    if out_dir:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with files.locked(out_dir):
            os.makedirs(out_dir, exist_ok=True)
            files.write_csv(os.path.join(out_dir, "table1.csv"), rows, columns)
            files.write_json(os.path.join(out_dir, "table1.json"), {"rows": rows, "details": details})
        click.echo(f"wrote {out_dir}/table1.csv and {out_dir}/table1.json")

