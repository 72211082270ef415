"""The `explain` command: the training images behind each error (`jobs.explain.run_explain`)."""
from __future__ import annotations

import click

from resnet_jax.core import files
from resnet_jax.core.compile_cache import enable as setup_jax
from resnet_jax.constants import INFLUENCES
from resnet_jax.cli.options import INFLUENCE_HELP, MIN_FREE_BYTES, POSITIVE, SEED


@click.command("explain")
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory (every saved epoch enters the sum).")
@click.option("--train", "train_spec", default=None, help="Training data spec (default: the checkpoint's).")
@click.option("--test", "test_spec", default=None,
              help="Test data spec (default: the held-out split of the checkpoint's data).")
@click.option("--errors-only/--all", default=True, show_default=True,
              help="Explain the misclassified test images only, or every test image.")
@click.option("--top", type=POSITIVE, default=10, show_default=True, help="Proponents and opponents per test image.")
@click.option("--influence", "kind", type=click.Choice(INFLUENCES), default=INFLUENCES[0], show_default=True,
              help=INFLUENCE_HELP)
@click.option("--method", type=click.Choice(["proj", "fc"]), default="proj", show_default=True,
              help="proj: all parameters through a random projection; fc: the fc layer in closed form (exact).")
@click.option("--project-params", default="all", show_default=True, help="Parameters of --method proj.")
@click.option("--project-dim", type=POSITIVE, default=1024, show_default=True, help="Projection dimension of proj.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the projection.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Images per step.")
@click.option("--steps", default="all", show_default=True, help="Checkpoints summed over: all, or steps such as 4,5,6.")
@click.option("--shown", type=POSITIVE, default=6, show_default=True, help="Proponents and opponents per figure.")
@click.option("--out", "out_dir", default="explain", show_default=True,
              help="Output directory (replaced when complete; its train-store/ is reused by the next run).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def explain_cmd(ckpt_dir, train_spec, test_spec, errors_only, top, kind, method, project_params, project_dim, seed,
                batch_size, steps, shown, out_dir, quiet):
    """Which training images made each mistake: TracIn proponents and opponents of each prediction."""
    files.check_out_dir(out_dir, "--out", MIN_FREE_BYTES)
    setup_jax()
    from resnet_jax.jobs import explain
    from resnet_jax.paper import tables

    with files.locked(out_dir):
        summary = explain.run_explain(ckpt_dir, out_dir, train_spec, test_spec, errors_only=errors_only, top=top,
                                      method=method, kind=kind, project_params=project_params,
                                      project_dim=project_dim, seed=seed, batch_size=batch_size, steps=steps,
                                      shown=shown, progress=not quiet, log=click.echo)
    if summary is None:
        return
    rows = [{"test": it["test_id"], "true -> predicted": f"{it['true_label']} -> {it['predicted_label']}",
             "top proponent": f"{it['proponents'][0]['train_id']} ({it['proponents'][0]['train_label']})",
             "influence": it["proponents"][0]["influence"]} for it in summary["images"][:10]]
    click.echo(tables.markdown_table(rows, list(rows[0])))
    s = summary["summary"]
    line = (f"top-{s['top']} proponents: {s['carry_predicted_label']:.0%} carry the predicted label (chance "
            f"{s['carry_predicted_label_chance']:.0%}), {s['look_alike']:.0%} look alike (chance "
            f"{s['look_alike_chance']:.0%})")
    if "carry_flipped_label" in s:
        line += f", {s['carry_flipped_label']:.0%} carry a flipped label (chance {s['carry_flipped_label_chance']:.0%})"
    click.echo(line)
    click.echo(f"explained {summary['explained']} of {summary['n_test']} test images against {summary['n_train']} "
               f"training images over {len(summary['trajectory']['steps'])} checkpoints ({kind} influence) in "
               f"{summary['seconds']['total']:.1f} s; wrote {out_dir}/explain.csv, explain.json, figures/")

