"""The `bench` group: benchmarks measured side by side in one run, printed as ratios (the only module of the library that imports `resnet_jax.benchmarks`)."""
from __future__ import annotations


import click

from resnet_jax.cli.options import (IMAGE_SIZE, NON_NEGATIVE_FLOAT, POSITIVE, SEED, Int, check_out, model_name)
from resnet_jax.constants import EXPLAIN_REMOVALS, STAGES, MODEL_CHOICES
from resnet_jax.core import files
from resnet_jax.core.compile_cache import enable as setup_jax
from resnet_jax.constants import INFLUENCES
from resnet_jax.errors import UserError
from resnet_jax.cli.options import INFLUENCE_HELP, MIN_FREE_BYTES


@click.group()
def bench():
    """Benchmarks: throughputs measured side by side in one run, printed as ratios."""


def _print_bench(title: str, rows: list[tuple[str, float, str]]) -> None:
    click.echo(f"## {title}")
    from resnet_jax.paper.tables import markdown_table

    click.echo(markdown_table([{"work": w, "value": v, "ratio": r} for w, v, r in rows], ("work", "value", "ratio"), 2))


@bench.command("grads")
@click.option("--model", default="resnet50", show_default=True, callback=model_name, help="Architecture.")
@click.option("--size", type=IMAGE_SIZE, default=224, show_default=True, help="Input size in pixels.")
@click.option("--batch", type=POSITIVE, default=32, show_default=True,
              help="Batch for forward, fwd+bwd, fc and projected all.")
@click.option("--vmap-batch", type=POSITIVE, default=8, show_default=True,
              help="Batch for vmap(grad) over all parameters.")
@click.option("--loop-n", type=POSITIVE, default=8, show_default=True, help="Images in the per-sample jax.grad loop.")
@click.option("--project-dim", type=POSITIVE, default=1024, show_default=True, help="Projection dimension.")
@click.option("--steps", type=POSITIVE, default=3, show_default=True, help="Timed repetitions (median).")
@click.option("--json", "json_path", default=None, help="Also write the numbers as JSON here.")
def bench_grads_cmd(model, size, batch, vmap_batch, loop_n, project_dim, steps, json_path):
    """Per-example gradient throughput beside forward and batched forward+backward."""
    setup_jax()
    import jax

    from resnet_jax.benchmarks import speed as benchmarks

    result = benchmarks.bench_grads(model, size, batch=batch, vmap_batch=vmap_batch, loop_n=loop_n,
                               project_dim=project_dim, steps=steps, log=click.echo)
    rates, ratios = result["samples_per_s"], result["ratios"]
    rows = [(f"{k} (samples/s)", v, "") for k, v in rates.items()]
    rows += [(f"ratio {k}", v, "") for k, v in ratios.items()]
    _print_bench(f"{model} {size}px on {jax.devices()[0].device_kind} x{jax.device_count()}", rows)
    if json_path:
        _write_json(json_path, result)


@bench.command("gradcam")
@click.option("--model", default="resnet18", show_default=True, callback=model_name, help="Architecture.")
@click.option("--size", type=IMAGE_SIZE, default=72, show_default=True, help="Input size in pixels.")
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="Images per step.")
@click.option("--steps", type=POSITIVE, default=10, show_default=True, help="Timed repetitions.")
@click.option("--layer", type=click.Choice(STAGES), default="layer4",
              show_default=True, help="Stage of the maps.")
@click.option("--similarity-n", type=POSITIVE, default=100_000, show_default=True,
              help="Rows for the similarity timing.")
@click.option("--similarity-d", type=POSITIVE, default=2048, show_default=True,
              help="Feature dimension for the similarity timing.")
@click.option("--json", "json_path", default=None, help="Also write the numbers as JSON here.")
def bench_gradcam_cmd(model, size, batch, steps, layer, similarity_n, similarity_d, json_path):
    """Grad-CAM images/s beside the forward pass; intra-class similarity time beside brute force."""
    setup_jax()
    import jax

    from resnet_jax.metrics import similarity

    from resnet_jax.benchmarks import speed as benchmarks
    from resnet_jax.core import models

    net = models.create(model, 1000)
    cam = benchmarks.bench_gradcam(net, benchmarks.random_variables(net, size), batch, size, steps=steps, layer=layer)
    sim = similarity.benchmark_similarity(n=similarity_n, d=similarity_d, n_brute=min(5000, similarity_n))
    _print_bench(f"{model} {size}px batch {batch} on {jax.devices()[0].device_kind}", [
        ("forward (images/s)", cam["forward_images_per_s"], ""),
        (f"Grad-CAM {layer} (images/s)", cam["gradcam_images_per_s"], f"{cam['ratio']:.2f} x forward"),
        (f"similarity {similarity_n:,} x {similarity_d} (s)", sim["fast_s"], ""),
        (f"similarity {sim['n_brute']:,} x {similarity_d} (s)", sim["fast_small_s"], ""),
        (f"brute force {sim['n_brute']:,} x {similarity_d} (s)", sim["brute_s"], f"{sim['speedup']:.0f} x slower")])
    if json_path:
        _write_json(json_path, {"gradcam": cam, "similarity": sim})


@bench.command("train")
@click.option("--model", default="resnet18", show_default=True, callback=model_name, help="Architecture.")
@click.option("--size", type=IMAGE_SIZE, default=72, show_default=True, help="Input size in pixels.")
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="Images per step.")
@click.option("--grad-align", type=NON_NEGATIVE_FLOAT, default=1.0, show_default=True,
              help="λ1 of the aligned step.")
@click.option("--grad-mi", type=NON_NEGATIVE_FLOAT, default=0.1, show_default=True, help="λ2 of the aligned step.")
@click.option("--steps", type=POSITIVE, default=5, show_default=True, help="Timed repetitions.")
@click.option("--hvp-params", default="all", show_default=True, help="Parameters of the HVP timing.")
@click.option("--json", "json_path", default=None, help="Also write the numbers as JSON here.")
def bench_train_cmd(model, size, batch, grad_align, grad_mi, steps, hvp_params, json_path):
    """Plain vs gradient-aligned training step; one HVP as a multiple of one gradient."""
    setup_jax()
    import jax

    from resnet_jax.benchmarks import speed as benchmarks

    tr = benchmarks.bench_train(model, size, batch, lambda_align=grad_align, lambda_mi=grad_mi, n_iter=steps)
    hv = benchmarks.bench_hvp(model_name=model, image_size=size, batch_size=batch, params=hvp_params, n_iter=steps)
    _print_bench(f"{model} {size}px batch {batch} on {jax.devices()[0].device_kind}", [
        ("plain step (samples/s)", tr["plain_samples_per_s"], ""),
        ("aligned step (samples/s)", tr["aligned_samples_per_s"], f"{tr['ratio']:.2f} x plain step time"),
        ("gradient (s)", hv["grad_s"], ""),
        ("HVP (s)", hv["hvp_s"], f"{hv['ratio']:.2f} x gradient")])
    if json_path:
        _write_json(json_path, {"train": tr, "hvp": hv})


@bench.command("audit")
@click.option("--model", default="resnet18", show_default=True, callback=model_name, help="Architecture trained.")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec (its training split).")
@click.option("--epochs", default=6, show_default=True, help="Epochs of every training run (the train default).")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Images per training step.")
@click.option("--label-noise", default=0.1, show_default=True, help="Fraction of training labels flipped.")
@click.option("--noise-seed", type=SEED, default=0, show_default=True, help="Seed of the flipped images and labels.")
@click.option("--noise-kind", type=click.Choice(["symmetric", "pairs"]), default="symmetric", show_default=True,
              help="symmetric: to a uniformly chosen other class; pairs: class c to c+1.")
@click.option("--folds", default=5, show_default=True, help="K of cleanlab's K-fold out-of-sample probabilities.")
@click.option("--method", "methods", default="margin,loss,aum,tracin,tracin-proj", show_default=True,
              help="Our methods; the first one ranks the images that --retrain cleans.")
@click.option("--project-dim", default=1024, show_default=True, help="Projection dimension of tracin-proj.")
@click.option("--retrain", is_flag=True, help="Also retrain without the top --fraction by ours and by cleanlab, "
                                              "and without noise, and compare held-out accuracy.")
@click.option("--fraction", default=0.1, show_default=True, help="Fraction of the images cleaned by --retrain.")
@click.option("--action", type=click.Choice(["remove", "relabel"]), default="remove", show_default=True,
              help="remove the suspects, or relabel them (ours: suggested label; cleanlab: its argmax).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of training and the folds.")
@click.option("--out", "out_dir", default="bench-audit", show_default=True,
              help="Directory of the runs (each resumes) and bench-audit.json.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench_audit_cmd(model, data_spec, epochs, batch_size, label_noise, noise_seed, noise_kind, folds, methods,
                    project_dim, retrain, fraction, action, seed, out_dir, quiet):
    """Our label-error detection (one run) beside cleanlab's (K-fold), on the same noisy labels."""
    setup_jax()
    from resnet_jax.benchmarks import audit as audit_bench
    from resnet_jax.paper import tables

    result = audit_bench.run(out_dir, model=model, data_spec=data_spec, epochs=epochs, batch_size=batch_size,
                             noise=label_noise, noise_seed=noise_seed, noise_kind=noise_kind, seed=seed, folds=folds,
                             methods=methods, project_dim=project_dim, retrain=retrain, fraction=fraction,
                             action=action, progress=not quiet, log=click.echo)
    click.echo(f"## {result['n']} images, {result['n_flipped']} flipped; one training epoch {result['epoch_seconds']} s")
    click.echo(tables.markdown_table(result["detection"], list(result["detection"][0]), 3))
    fli = result["find_label_issues"]
    click.echo(f"cleanlab find_label_issues: {fli['flagged']} flagged, precision {fli['precision']:.3f}, "
               f"recall {fli['recall']:.3f}")
    if "retrain" in result:
        click.echo(tables.markdown_table(result["retrain"], list(result["retrain"][0]), 4))


@bench.command("audit-grid")
@click.option("--seeds", "seeds_text", default="0,1,2", show_default=True,
              help="Seeds of every regime (each one seeds the noise and the training).")
@click.option("--kinds", default="symmetric,pairs", show_default=True, help="Noise kinds.")
@click.option("--rates", default="0.1,0.3", show_default=True, help="Noise rates.")
@click.option("--epochs", "epochs_text", default="6,24", show_default=True,
              help="Training schedules (epochs): the audit's, and one long enough to memorise the flips.")
@click.option("--folds", type=Int(2), default=5, show_default=True, help="K of cleanlab's K-fold probabilities.")
@click.option("--max-cells", type=POSITIVE, default=None, help="Stop after computing this many new cells.")
@click.option("--out", "out_dir", default="bench-audit-grid", show_default=True,
              help="Directory of the cells (each cached by its configuration) and bench-audit-grid.json.")
def bench_audit_grid_cmd(seeds_text, kinds, rates, epochs_text, folds, max_cells, out_dir):
    """The audit benchmark over noise seeds, kinds, rates and schedules, resumable; mean ± SD per regime."""
    setup_jax()
    from resnet_jax.benchmarks import audit_grid
    from resnet_jax.paper import tables

    try:
        rate_values = tuple(float(r) for r in rates.split(","))
    except ValueError:
        rate_values = ()
    if not rate_values or not all(0 < r < 1 for r in rate_values):
        raise UserError(f"--rates takes comma-separated rates in (0, 1) such as 0.1,0.3, got {rates!r}")
    check_out(out_dir)
    with files.locked(out_dir):
        result = audit_grid.run(out_dir, seeds=_ints(seeds_text, "seeds"),
                                kinds=tuple(k.strip() for k in kinds.split(",")), rates=rate_values,
                                epochs=_ints(epochs_text, "epochs"), folds=folds, max_cells=max_cells, log=click.echo)
    if result["regimes"]:
        click.echo(tables.markdown_table(result["regimes"], list(result["regimes"][0]), 3))
    click.echo(f"wrote {out_dir}/bench-audit-grid.json ({len(result['cells'])} cells)")


def _write_json(path, obj) -> None:
    from resnet_jax.core.files import write_json

    write_json(path, obj)



def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < (0 if name == "seeds" else 1):
        raise UserError(f"--{name} takes comma-separated integers such as {'0,1,2' if name == 'seeds' else '20,10'} "
                        f"({'>= 0' if name == 'seeds' else '>= 1'}), got {text!r}")
    return values


@bench.command("explain")
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
@click.option("--removal", type=click.Choice(EXPLAIN_REMOVALS), default=EXPLAIN_REMOVALS[0], show_default=True,
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
    from resnet_jax.benchmarks import explain as explain_bench
    from resnet_jax.paper import tables

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

