"""The `resnet-jax` command line: parses options and composes the device and host sides.

Bad input raises `UserError` (or `ValueError` from the host-side packages); `main` prints it as
one line `error: ...` and exits with code 2. Set RESNET_JAX_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import json
import os
import sys

import click

from .errors import UserError

MODEL_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _setup_jax() -> None:
    """Turns on JAX's persistent compilation cache (a second run skips the compiles)."""
    import jax

    cache = os.environ.get("RESNET_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "resnet-jax", "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _model_name(ctx, param, value):
    if value is not None and value not in MODEL_CHOICES:
        raise UserError(f"unknown model {value!r}: choose one of {', '.join(MODEL_CHOICES)}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Evaluate ResNet image classifiers through their per-example gradients.

    Typical flow: `train` (or `convert` torchvision weights), `extract` per-example gradients (GW),
    predictions (P) and features (FM), then `similarity`, `gradcam`, `cluster`; `reproduce` runs it all.
    """


@cli.command("models")
@click.option("--num-classes", default=1000, show_default=True, help="Classes of the fc layer.")
def models_cmd(num_classes):
    """List the model names and their parameter counts."""
    from . import models

    for name in models.MODEL_NAMES:
        count = models.count_params(models.variable_shapes(models.create(name, num_classes))["params"])
        click.echo(f"{name:<10} {count:>12,d} parameters")


@cli.command()
@click.option("--model", default="resnet18", show_default=True, callback=_model_name,
              help="Architecture: resnet18, resnet34, resnet50, resnet101 or resnet152.")
@click.option("--data", "data_spec", default="digits", show_default=True,
              help="Data spec: digits, folder:PATH or tfds:NAME, each with an optional :SPLIT (default: train).")
@click.option("--epochs", default=6, show_default=True, help="Passes over the training split.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--images-per-epoch", type=int, default=None,
              help="Train each epoch on this many images of its shuffle (default: the whole training split).")
@click.option("--learning-rate", default=2e-3, show_default=True, help="Peak AdamW learning rate (cosine decay).")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--stem", type=click.Choice(["standard", "small"]), default="standard", show_default=True,
              help="standard: 7x7/2 conv + max-pool (ImageNet); small: 3x3/1 conv, no pool (small images).")
@click.option("--image-size", type=int, default=None, help="Input size; default: the source's own (digits: 72).")
@click.option("--augment-shift", default=4, show_default=True, help="Random translation in pixels while training.")
@click.option("--grad-align", default=0.0, show_default=True,
              help="λ1 of the gradient-alignment loss (same-class input gradients; 0 = plain training).")
@click.option("--grad-mi", default=0.0, show_default=True, help="λ2 of the gradient mutual-information term.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out_dir", required=True, help="Checkpoint directory; training resumes from it.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(model, data_spec, epochs, batch_size, images_per_epoch, learning_rate, weight_decay, stem, image_size,
          augment_shift, grad_align, grad_mi, seed, out_dir, quiet):
    """Train a ResNet, report held-out accuracy each epoch, checkpoint each epoch (resumable)."""
    _setup_jax()
    from . import train as training

    config = training.TrainConfig(model=model, data=data_spec, epochs=epochs, batch_size=batch_size,
                                  images_per_epoch=images_per_epoch, learning_rate=learning_rate,
                                  weight_decay=weight_decay, stem=stem, image_size=image_size, seed=seed,
                                  augment_shift=augment_shift,
                                  grad_align=grad_align, grad_mi=grad_mi)
    result = training.fit(config, out_dir, progress=not quiet, log=click.echo)
    click.echo(f"test accuracy {result['test_accuracy']:.4f} on {result['test_split']} after {len(result['history'])} "
               f"epochs ({result['seconds']:.0f} s this run); checkpoint: {out_dir}")


@cli.command()
@click.argument("src", type=click.Path())
@click.option("--model", required=True, callback=_model_name, help="Architecture the weights belong to.")
@click.option("--out", "out_dir", required=True, help="Checkpoint directory to write.")
@click.option("--num-classes", type=int, default=None, help="Default: read from fc.weight.")
@click.option("--class-names", default=None, help="File with one class name per line.")
@click.option("--image-size", default=224, show_default=True, help="Input size the analyses will use.")
@click.option("--stem", type=click.Choice(["standard", "small"]), default="standard", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
def convert(src, model, out_dir, num_classes, class_names, image_size, stem, overwrite):
    """Import torchvision weights (.pth state_dict, needs torch; or .safetensors) as a checkpoint."""
    from . import convert as conversion

    names = None
    if class_names:
        try:
            with open(class_names) as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --class-names {class_names}: {e.strerror}") from None
    meta = conversion.convert(src, model, out_dir, num_classes=num_classes, class_names=names,
                              image_size=image_size, stem=stem, overwrite=overwrite)
    click.echo(f"wrote {meta['model']} ({meta['num_classes']} classes) from {src} to {out_dir}")


@cli.command()
@click.argument("ckpt", type=click.Path())
def info(ckpt):
    """Print a checkpoint's metadata (model, classes, input size, accuracy, ...)."""
    from . import checkpoint

    meta = checkpoint.load_meta(ckpt)
    history = meta.pop("history", None)
    for key, value in meta.items():
        if key == "class_names" and len(value) > 12:
            value = value[:12] + [f"... ({len(value)} in all)"]
        click.echo(f"{key:>16}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if history:
        click.echo(f"{'history':>16}: " + ", ".join(
            f"epoch {h['epoch']} acc " + ("-" if h["test_accuracy"] is None else f"{h['test_accuracy']:.4f}")
            for h in history))


@cli.command()
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory (from train or convert).")
@click.option("--data", "data_spec", default="digits", show_default=True,
              help="Data spec; default split: the held-out one (digits:test, folder:PATH:test, ...).")
@click.option("--out", "out_dir", required=True, help="Store directory; an interrupted run resumes in it.")
@click.option("--grad-params", default="fc", show_default=True,
              help="Parameters of the per-example gradient: fc (the draft's GW), layer4, all, or a path "
                   "pattern such as 'layer4_*/conv2/*'.")
@click.option("--label-source", type=click.Choice(["true", "predicted"]), default="true", show_default=True,
              help="Label of the loss: the true label (the draft) or the argmax prediction (control).")
@click.option("--project-dim", type=int, default=None,
              help="Random projection of each gradient to this many dimensions (seeded, on device; "
                   "block-Kronecker with 8x8 blocks). It is approximate: cosines between projected fc "
                   "gradients (ResNet-18, digits, 200 images) were off by 0.067 (std) at 1024 and 0.042 at "
                   "2048 dimensions (a dense projection: 0.029 at 1024). Leave it out for exact cosines.")
@click.option("--batch-size", default=64, show_default=True, help="Images per shard (and per step).")
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--seed", default=0, show_default=True, help="Seed of the projection.")
@click.option("--force", is_flag=True, help="Rebuild the store even if it holds a complete or other run.")
@click.option("--distributed", is_flag=True,
              help="Multi-host: call jax.distributed.initialize() and extract this process's slice of the data "
                   "(give each process its own --out). On TPU, Slurm and Open MPI the peers are found "
                   "automatically; elsewhere pass the three options below.")
@click.option("--coordinator", default=None, help="With --distributed: address:port of process 0.")
@click.option("--num-processes", type=int, default=None, help="With --distributed: number of processes.")
@click.option("--process-id", type=int, default=None, help="With --distributed: this process's index.")
@click.option("--save-gw", is_flag=True,
              help="Also write the explicit N x (d*C + C) fc gradients (gw.npy); without it an fc store without "
                   "projection keeps their exact factors (fm, logits, labels) and every reader uses those.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(ckpt_dir, data_spec, out_dir, grad_params, label_source, project_dim, batch_size, limit, seed, force,
            distributed, coordinator, num_processes, process_id, save_gw, quiet):
    """Write per-example gradients (GW), probabilities (P), logits, features (FM), labels and ids."""
    _setup_jax()
    from . import extract as extraction

    process = None
    if distributed:
        import jax

        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        process = (jax.process_index(), jax.process_count())

    manifest = extraction.run_extract(ckpt_dir, data_spec, out_dir, grad_params=grad_params,
                                      label_source=label_source, project_dim=project_dim, seed=seed,
                                      batch_size=batch_size, limit=limit, progress=not quiet, force=force,
                                      process=process, save_gw=save_gw, log=click.echo)
    kept = "as rows" if "gw.npy" in manifest["files"] else "as its factors fm, logits and labels"
    click.echo(f"store {out_dir}: {manifest['n']} images, gw {manifest['n']} x {manifest['dim']} {kept} "
               f"({manifest['run']['grad_params']}, {manifest['run']['label_source']} labels)")


@cli.command()
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory.")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec (default: held-out split).")
@click.option("--out", "out_dir", required=True, help="Output directory (replaced when complete).")
@click.option("--layer", type=click.Choice(["stem", "layer1", "layer2", "layer3", "layer4"]), default="layer4",
              show_default=True, help="Stage whose output the maps are computed on.")
@click.option("--method", type=click.Choice(["gradcam", "gradcampp"]), default="gradcam", show_default=True,
              help="Grad-CAM or Grad-CAM++.")
@click.option("--label-source", "--target", "label_source", type=click.Choice(["true", "predicted"]), default="true",
              show_default=True, help="Class whose logit is explained: the true label or the prediction "
                                      "(--target is the older name).")
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--max-pairs", default=2000, show_default=True,
              help="Same-class pairs of maps to compare (a seeded sample when there are more).")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def gradcam(ckpt_dir, data_spec, out_dir, layer, method, label_source, limit, batch_size, max_pairs, seed, quiet):
    """Grad-CAM maps (cams.npy), agreement metrics (CSV/JSON) and an overlay grid (PNG)."""
    _setup_jax()
    from . import cams, tables

    summary = cams.run_gradcam(ckpt_dir, data_spec, out_dir, layer=layer, method=method, label_source=label_source,
                               limit=limit, batch_size=batch_size, max_pairs=max_pairs, seed=seed, progress=not quiet)
    rows = cams.cam_metric_rows(summary)
    click.echo(tables.markdown_table(rows, ("comparison", "metric", "mean", "median", "std", "n", "undefined")))
    click.echo(f"{summary['n']} maps of {summary['data']} ({summary['degenerate_maps']} all-zero) compared with "
               f"{summary['compared_with']}; written to {out_dir}")


@cli.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--cams", "cams_dirs", multiple=True, help="Grad-CAM directory per store, in the same order.")
@click.option("--out", "out_prefix", default=None, help="Write OUT.csv and OUT.json beside the printed table.")
def similarity(stores, cams_dirs, out_prefix):
    """Table 1: mean same-class cosine similarity of GW, P and FM (and Grad-CAM agreement)."""
    from . import analysis, files, tables

    rows, details = analysis.similarity_table(list(stores), list(cams_dirs) or None)
    click.echo(tables.markdown_table_1(rows))
    click.echo()
    click.echo(tables.markdown_table(rows, ["Model", *tables.INTER_COLUMNS]))
    if cams_dirs:
        click.echo()
        click.echo(tables.markdown_table(rows, tables.CAM_ROW_COLUMNS))
    if out_prefix:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        files.write_csv(out_prefix + ".csv", rows, columns)
        files.write_json(out_prefix + ".json", {"rows": rows, "details": details})
        click.echo(f"wrote {out_prefix}.csv and {out_prefix}.json")


@cli.command("reproduce")
@click.option("--models", "models_text", default="resnet18,resnet34,resnet50,resnet101,resnet152", show_default=True,
              help="Comma-separated models.")
@click.option("--data", "data_spec", default="digits", show_default=True,
              help="Data spec: trained on its training split, analysed on its held-out split.")
@click.option("--ckpt", "ckpts", multiple=True, metavar="NAME=DIR",
              help="Use this checkpoint for model NAME instead of training (e.g. converted weights).")
@click.option("--out", "out_dir", default="results", show_default=True)
@click.option("--quick", is_flag=True, help="ResNet-18 only, 3 epochs, 200 held-out images (about 2 minutes).")
@click.option("--limit", type=int, default=None, help="Analyse only the first N held-out images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace results of another configuration in --out.")
@click.option("--grad-align", default=0.0, show_default=True,
              help="Also train each model with the gradient-alignment loss (this λ1) and compare side by side.")
@click.option("--grad-mi", default=0.0, show_default=True, help="λ2 (mutual information) of the aligned runs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce_cmd(models_text, data_spec, ckpts, out_dir, quick, limit, seed, force, grad_align, grad_mi, quiet):
    """Train, extract, Grad-CAM, Tables 1-3, the misclassification report and figures, for each model."""
    _setup_jax()
    from . import reproduce

    models = reproduce.parse_models("resnet18" if quick and models_text == MODELS_DEFAULT else models_text)
    given = {}
    for item in ckpts:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UserError(f"--ckpt takes NAME=DIR, got {item!r}")
        given[name] = path
    results = reproduce.run(models, data_spec, given, out_dir, quick=quick, force=force, limit=limit, seed=seed,
                            grad_align=grad_align, grad_mi=grad_mi, progress=not quiet, log=click.echo)
    click.echo(f"wrote {out_dir}/tables.md, results.json, *.csv and {len(results['figures'])} figures "
               f"in {results['timings']['total_seconds']:.0f} s")


@cli.command()
@click.option("--ckpt", "ckpt_dir", required=True, help="Checkpoint directory.")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec (default: held-out split).")
@click.option("--limit", type=int, default=256, show_default=True, help="Images to use (the first N).")
@click.option("--params", "param_subset", default="fc", show_default=True,
              help="Parameters of the Hessian: fc, layer4, all or a path pattern.")
@click.option("--iterations", default=20, show_default=True, help="Lanczos iterations for the top eigenvalue.")
@click.option("--probes", default=30, show_default=True, help="Hutchinson probes for the trace.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the report as JSON here.")
def curvature(ckpt_dir, data_spec, limit, param_subset, iterations, probes, seed, json_path):
    """Top Hessian eigenvalue and trace of the loss, for correctly classified and misclassified images."""
    _setup_jax()
    from . import files, hessian, tables

    report, rows, note = hessian.curvature_of_checkpoint(ckpt_dir, data_spec, limit, param_subset, iterations,
                                                         probes, seed)
    click.echo(tables.markdown_table(rows, ("group", "count", "loss", "top_eigenvalue", "trace", "trace_stderr")))
    click.echo(note)
    if json_path:
        files.write_json(json_path, report)


@cli.group()
def bench():
    """Benchmarks: throughputs measured side by side in one run, printed as ratios."""


def _print_bench(title: str, rows: list[tuple[str, float, str]]) -> None:
    click.echo(f"## {title}")
    from .tables import markdown_table

    click.echo(markdown_table([{"work": w, "value": v, "ratio": r} for w, v, r in rows], ("work", "value", "ratio"), 2))


@bench.command("grads")
@click.option("--model", default="resnet50", show_default=True, callback=_model_name)
@click.option("--size", default=224, show_default=True, help="Input size in pixels.")
@click.option("--batch", default=32, show_default=True, help="Batch for forward, fwd+bwd, fc and projected all.")
@click.option("--vmap-batch", default=8, show_default=True, help="Batch for vmap(grad) over all parameters.")
@click.option("--loop-n", default=8, show_default=True, help="Images in the per-sample jax.grad loop.")
@click.option("--project-dim", default=1024, show_default=True)
@click.option("--steps", default=3, show_default=True, help="Timed repetitions (median).")
@click.option("--json", "json_path", default=None, help="Also write the numbers as JSON here.")
def bench_grads_cmd(model, size, batch, vmap_batch, loop_n, project_dim, steps, json_path):
    """Per-example gradient throughput beside forward and batched forward+backward."""
    _setup_jax()
    import jax

    from . import bench as benchmarks

    result = benchmarks.bench_grads(model, size, batch=batch, vmap_batch=vmap_batch, loop_n=loop_n,
                               project_dim=project_dim, steps=steps, log=click.echo)
    rates, ratios = result["samples_per_s"], result["ratios"]
    rows = [(f"{k} (samples/s)", v, "") for k, v in rates.items()]
    rows += [(f"ratio {k}", v, "") for k, v in ratios.items()]
    _print_bench(f"{model} {size}px on {jax.devices()[0].device_kind} x{jax.device_count()}", rows)
    if json_path:
        _write_json(json_path, result)


@bench.command("gradcam")
@click.option("--model", default="resnet18", show_default=True, callback=_model_name)
@click.option("--size", default=72, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--layer", default="layer4", show_default=True)
@click.option("--similarity-n", default=100_000, show_default=True, help="Rows for the similarity timing.")
@click.option("--similarity-d", default=2048, show_default=True, help="Feature dimension for the similarity timing.")
@click.option("--json", "json_path", default=None)
def bench_gradcam_cmd(model, size, batch, steps, layer, similarity_n, similarity_d, json_path):
    """Grad-CAM images/s beside the forward pass; intra-class similarity time beside brute force."""
    _setup_jax()
    import jax

    from metrics import similarity

    from . import bench as benchmarks, models

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
@click.option("--model", default="resnet18", show_default=True, callback=_model_name)
@click.option("--size", default=72, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--grad-align", default=1.0, show_default=True)
@click.option("--grad-mi", default=0.1, show_default=True)
@click.option("--steps", default=5, show_default=True)
@click.option("--hvp-params", default="all", show_default=True, help="Parameters of the HVP timing.")
@click.option("--json", "json_path", default=None)
def bench_train_cmd(model, size, batch, grad_align, grad_mi, steps, hvp_params, json_path):
    """Plain vs gradient-aligned training step; one HVP as a multiple of one gradient."""
    _setup_jax()
    import jax

    from . import bench as benchmarks

    tr = benchmarks.bench_train(model, size, batch, lambda_align=grad_align, lambda_mi=grad_mi, n_iter=steps)
    hv = benchmarks.bench_hvp(model_name=model, image_size=size, batch_size=batch, params=hvp_params, n_iter=steps)
    _print_bench(f"{model} {size}px batch {batch} on {jax.devices()[0].device_kind}", [
        ("plain step (samples/s)", tr["plain_samples_per_s"], ""),
        ("aligned step (samples/s)", tr["aligned_samples_per_s"], f"{tr['ratio']:.2f} x plain step time"),
        ("gradient (s)", hv["grad_s"], ""),
        ("HVP (s)", hv["hvp_s"], f"{hv['ratio']:.2f} x gradient")])
    if json_path:
        _write_json(json_path, {"train": tr, "hvp": hv})


MODELS_DEFAULT = "resnet18,resnet34,resnet50,resnet101,resnet152"


def _write_json(path, obj) -> None:
    from .files import write_json

    write_json(path, obj)


def main(argv=None) -> None:
    """Entry point: runs the CLI, turning bad input into one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except (UserError, ValueError) as e:
        if os.environ.get("RESNET_JAX_DEBUG"):
            raise
        click.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
