"""The `resnet-jax explain` and `resnet-jax bench explain` commands (registered by `cli`): they parse
options and call `explain.run_explain` and `explain_bench.run`."""
from __future__ import annotations

import click

from . import files
from .compile_cache import enable as setup_jax
from .errors import UserError
from .validate import MODEL_CHOICES, POSITIVE, SEED

MIN_FREE_BYTES = 64 << 20
INFLUENCES = ("relatif", "cosine", "raw", "fisher")  # explain.INFLUENCES (not imported for --help)
INFLUENCE_HELP = ("relatif (default): TracIn over the square root of the training image's TracIn self-influence; "
                  "cosine: sum of eta_t times the gradient cosines; raw: TracIn, sum of eta_t times the gradient "
                  "inner products (favours training images of large gradient); fisher: the influence function "
                  "with the damped empirical Fisher of the projected training gradients, averaged over the "
                  "checkpoints (--method proj only).")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < (0 if name == "seeds" else 1):
        raise UserError(f"--{name} takes comma-separated integers such as {'0,1,2' if name == 'seeds' else '20,10'} "
                        f"({'>= 0' if name == 'seeds' else '>= 1'}), got {text!r}")
    return values


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
    from . import explain, tables

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


@click.command("explain")
@click.option("--model", type=click.Choice(MODEL_CHOICES), default="resnet18", show_default=True,
              help="Architecture trained.")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec (its training split).")
@click.option("--epochs", type=POSITIVE, default=6, show_default=True, help="Epochs of every training run.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Images per training step.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@click.option("--top", "ks", default="10,20", show_default=True,
              help="Comma-separated K: each error's top-K proponents removed (the first K runs first).")
@click.option("--influence", "kinds", default=INFLUENCES[0], show_default=True,
              help="Comma-separated influence kinds; the proponents (and random removals of the same count) of each "
                   "are retrained, high-loss removal at the first's count. " + INFLUENCE_HELP)
@click.option("--method", type=click.Choice(["proj", "fc"]), default="proj", show_default=True,
              help="Gradients of the attribution: proj (all parameters, projected) or fc (closed form).")
@click.option("--project-dim", type=POSITIVE, default=1024, show_default=True, help="Projection dimension of proj.")
@click.option("--arms", default="proponents,random,reorder,high-loss", show_default=True,
              help="Comma-separated removals to retrain: proponents, random, reorder (one random image: the noise "
                   "floor), high-loss.")
@click.option("--removal", type=click.Choice(["retrain", "mask"]), default="retrain", show_default=True,
              help="retrain: without the removed images (every epoch's batches change); mask: the images stay in "
                   "their batches with zero loss weight (the base run's batches, same order).")
@click.option("--lds", type=click.IntRange(min=0), default=0, show_default=True,
              help="Half-subset retrainings per seed (at least 3) for the linear datamodeling score; 0: none.")
@click.option("--out", "out_dir", default="bench-explain", show_default=True,
              help="Directory of the runs (each resumes) and bench-explain.json.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench_explain_cmd(model, data_spec, epochs, batch_size, seeds, ks, kinds, method, project_dim, arms, removal,
                      lds, out_dir, quiet):
    """Counterfactual check: retrain without each error's top-K proponents, vs random and high-loss removal."""
    seeds, ks = _ints(seeds, "seeds"), _ints(ks, "top")
    files.check_out_dir(out_dir, "--out", MIN_FREE_BYTES)
    setup_jax()
    from . import explain_bench, tables

    with files.locked(out_dir):
        result = explain_bench.run(out_dir, seeds=seeds, ks=ks, model=model, data_spec=data_spec, epochs=epochs,
                                   batch_size=batch_size, method=method,
                                   kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()), project_dim=project_dim,
                                   arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
                                   removal=removal, lds=lds, progress=not quiet, log=click.echo)
    click.echo(tables.markdown_table(result["table"], list(result["table"][0]), 3))
    if lds:
        null = result["linear_datamodeling_null"]
        click.echo("linear datamodeling score (Spearman over the half-subset retrainings, mean over the errors; "
                   "shuffled scores in brackets): " +
                   ", ".join(f"{kind} {v['mean']:.3f} [{null[kind]['mean']:.3f}]"
                             for kind, v in result["linear_datamodeling_score"].items() if v["mean"] is not None))
