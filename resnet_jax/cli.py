"""The `resnet-jax` command line: parses options and composes the device and host sides.

Bad input raises `UserError` (or `ValueError` from the host-side packages); `main` prints it as
one line `error: ...` and exits with code 2. Set RESNET_JAX_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import json
import os
import sys

import click

from . import cli_explain, files
from .compile_cache import enable as _setup_jax
from .errors import UserError, failure_line
from .validate import (FRACTION, IMAGE_SIZE, MODEL_CHOICES, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE,
                       POSITIVE_FLOAT, SEED, Int, stopping_options)

MIN_FREE_BYTES = 64 << 20  # refuse an --out whose disk has less free: every output needs more
# Measured by `python -m resnet_jax.device_check accuracy` (README, "Mixed precision").
PRECISION_HELP = ("fp32, or bf16: bfloat16 compute, float32 parameters, gradient sums and Grad-CAM maps. "
                  "bf16 against fp32 on the 540 held-out digits (ResNet-18, 3 epochs, CPU): fc gradient cosine "
                  "mean 0.99996 (min 0.9993), projected all-parameter cosine mean 0.9994 (min 0.989), Grad-CAM "
                  "CC mean 0.99998 (min 0.9992), the same prediction for 99.4% of the images.")
AUDIT_DEFAULT_METHODS = ("margin", "loss", "aum", "tracin")  # audit.DEFAULT_METHODS (not imported for --help)


def _check_out(out_dir: str) -> None:
    """Refuses an --out that is a file or not writable before anything is computed."""
    files.check_out_dir(out_dir, "--out", MIN_FREE_BYTES)


def _model_name(ctx, param, value):
    if value is not None and value not in MODEL_CHOICES:
        raise UserError(f"unknown model {value!r}: choose one of {', '.join(MODEL_CHOICES)}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Evaluate ResNet image classifiers through their per-example gradients.

    Typical flow: `train` (or `convert` torchvision weights), `extract` per-example gradients (GW),
    predictions (P) and features (FM), then `gradcam` and `similarity` (Table 1); `reproduce` runs it all,
    clustering (Tables 2 and 3) included.
    """


@cli.command("models")
@click.option("--num-classes", type=POSITIVE, default=1000, show_default=True, help="Classes of the fc layer.")
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
@click.option("--max-epochs", "--epochs", "epochs", type=POSITIVE, default=30, show_default=True,
              help="Cap on epochs (passes over the training slice); the learning rate decays over it.")
@stopping_options()
@click.option("--zero-init-residual", is_flag=True, help="Start each residual block's last BatchNorm scale at 0.")
@click.option("--label-smoothing", type=FRACTION, default=0.0, show_default=True,
              help="Smooth the training labels towards uniform by this much.")
@click.option("--redraw/--no-redraw", default=None, help="Render the training images afresh each epoch (default: on "
              "for digits: new position and noise, same glyph; other data cannot).")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Images per training step.")
@click.option("--images-per-epoch", type=POSITIVE, default=None,
              help="Train each epoch on this many images of its shuffle (default: the whole training split).")
@click.option("--learning-rate", type=POSITIVE_FLOAT, default=2e-3, show_default=True,
              help="Peak AdamW learning rate (cosine decay).")
@click.option("--weight-decay", type=NON_NEGATIVE_FLOAT, default=5e-4, show_default=True,
              help="AdamW weight decay.")
@click.option("--stem", type=click.Choice(["standard", "small"]), default="standard", show_default=True,
              help="standard: 7x7/2 conv + max-pool (ImageNet); small: 3x3/1 conv, no pool (small images).")
@click.option("--image-size", type=IMAGE_SIZE, default=None, help="Input size; default: the source's own (digits: 72).")
@click.option("--augment-shift", type=NON_NEGATIVE, default=4, show_default=True, help="Random translation in pixels while training.")
@click.option("--grad-align", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="λ1 of the gradient-alignment loss (same-class input gradients; 0 = plain training).")
@click.option("--grad-mi", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="λ2 of the gradient mutual-information term.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initialisation, shuffles and augmentation.")
@click.option("--label-noise", default=0.0, show_default=True,
              help="Flip this fraction of the training labels (recorded in the checkpoint; for `audit`).")
@click.option("--noise-seed", type=SEED, default=0, show_default=True, help="Seed of the flipped images and labels.")
@click.option("--noise-kind", type=click.Choice(["symmetric", "pairs"]), default="symmetric", show_default=True,
              help="symmetric: to a uniformly chosen other class; pairs: class c to c+1.")
@click.option("--keep-epochs", default=None,
              help="Checkpoints to keep: all, or epochs such as 2,4,6 (default: all with --label-noise, "
                   "else the last two).")
@click.option("--out", "out_dir", required=True, help="Checkpoint directory; training resumes from it.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help=PRECISION_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(model, data_spec, epochs, stopping, zero_init_residual, label_smoothing, redraw, batch_size, images_per_epoch,
          learning_rate, weight_decay, stem, image_size, augment_shift, grad_align, grad_mi, seed, label_noise,
          noise_seed, noise_kind, keep_epochs, out_dir, precision, quiet):
    """Train a ResNet until a validation slice of the training split reaches the target (or stops
    improving, or a cap is hit); report held-out accuracy each epoch, checkpoint each epoch (resumable)."""
    from . import labels

    _check_out(out_dir)
    edits = labels.LabelEdits(noise_rate=label_noise, noise_seed=noise_seed, noise_kind=noise_kind)
    _setup_jax()
    from . import train as training

    config = training.TrainConfig(model=model, data=data_spec, epochs=epochs, batch_size=batch_size,
                                  images_per_epoch=images_per_epoch, learning_rate=learning_rate,
                                  weight_decay=weight_decay, stem=stem, image_size=image_size, seed=seed,
                                  augment_shift=augment_shift,
                                  grad_align=grad_align, grad_mi=grad_mi, precision=precision,
                                  zero_init_residual=zero_init_residual, label_smoothing=label_smoothing,
                                  redraw=redraw, **stopping)
    with files.locked(out_dir):
        result = training.fit(config, out_dir, progress=not quiet, log=click.echo, label_edits=edits,
                              keep_epochs=keep_epochs)
    stop, val = result["stop"], result["stop"]["validation_accuracy"]
    click.echo(f"stopped ({stop['reason']}) at epoch {stop['epoch']}, validation accuracy "
               f"{'-' if val is None else f'{val:.4f}'}; test accuracy {result['test_accuracy']:.4f} on "
               f"{result['test_split']} ({result['seconds']:.0f} s this run); checkpoint: {out_dir}")


@cli.command()
@click.argument("src", type=click.Path())
@click.option("--model", required=True, callback=_model_name, help="Architecture the weights belong to.")
@click.option("--out", "out_dir", required=True, help="Checkpoint directory to write.")
@click.option("--num-classes", type=POSITIVE, default=None, help="Default: read from fc.weight.")
@click.option("--class-names", default=None, help="File with one class name per line.")
@click.option("--image-size", type=IMAGE_SIZE, default=224, show_default=True, help="Input size the analyses will use.")
@click.option("--stem", type=click.Choice(["standard", "small"]), default="standard", show_default=True,
              help="Stem the weights were trained with (torchvision: standard).")
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
    _check_out(out_dir)
    with files.locked(out_dir):
        meta = conversion.convert(src, model, out_dir, num_classes=num_classes, class_names=names,
                                  image_size=image_size, stem=stem, overwrite=overwrite)
    click.echo(f"wrote {meta['model']} ({meta['num_classes']} classes) from {src} to {out_dir}")


@cli.command()
@click.argument("ckpt_arg", metavar="[CKPT]", required=False, type=click.Path())
@click.option("--ckpt", "ckpt_opt", default=None, help="Checkpoint directory (or give it as the argument).")
def info(ckpt_arg, ckpt_opt):
    """Print a checkpoint's metadata (model, classes, input size, accuracy, ...)."""
    from . import checkpoint

    if (ckpt_arg is None) == (ckpt_opt is None):
        raise click.UsageError("give the checkpoint once: --ckpt DIR (or DIR as the argument)")
    ckpt = ckpt_opt or ckpt_arg

    meta = checkpoint.load_meta(ckpt)
    history = meta.pop("history", None)
    for key, value in meta.items():
        if key == "class_names" and len(value) > 12:
            value = value[:12] + [f"... ({len(value)} in all)"]
        if key == "label_edits":  # the ids are many: counts only
            value = {part: ({k: v for k, v in entry.items() if k not in ("ids", "original", "given", "before")}
                            | {"images": len(entry["ids"])} if isinstance(entry, dict) else len(entry))
                     for part, entry in value.items()}
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
@click.option("--project-dim", type=POSITIVE, default=None,
              help="Random projection of each gradient to this many dimensions (seeded, on device; "
                   "block-Kronecker with 8x8 blocks). It is approximate: cosines between projected fc "
                   "gradients (ResNet-18, digits, 200 images) were off by 0.067 (std) at 1024 and 0.042 at "
                   "2048 dimensions (a dense projection: 0.029 at 1024). Leave it out for exact cosines.")
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
    _check_out(out_dir)
    _setup_jax()
    from . import extract as extraction

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
    _check_out(out_dir)
    _setup_jax()
    from . import cams, tables

    with files.locked(out_dir):
        summary = cams.run_gradcam(ckpt_dir, data_spec, out_dir, layer=layer, method=method,
                                   label_source=label_source, limit=limit, batch_size=batch_size,
                                   max_pairs=max_pairs, seed=seed, progress=not quiet, precision=precision)
    rows = cams.cam_metric_rows(summary)
    click.echo(tables.markdown_table(rows, ("comparison", "metric", "mean", "median", "std", "n", "undefined")))
    click.echo(f"{summary['n']} maps of {summary['data']} ({summary['degenerate_maps']} all-zero) compared with "
               f"{summary['compared_with']}; written to {out_dir}")


@cli.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--cams", "cams_dirs", multiple=True, help="Grad-CAM directory per store, in the same order.")
@click.option("--out", "out_dir", default=None, help="Also write table1.csv and table1.json into this directory.")
def similarity(stores, cams_dirs, out_dir):
    """Table 1: mean same-class cosine similarity of GW, P and FM (and Grad-CAM agreement)."""
    from . import analysis, tables

    if out_dir:
        _check_out(out_dir)
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


@cli.command("reproduce")
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
@click.option("--force", is_flag=True, help="Replace results of another configuration in --out.")
@click.option("--grad-align", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="Also train each model with the gradient-alignment loss (this λ1) and compare side by side.")
@click.option("--grad-mi", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="λ2 (mutual information) of the aligned runs.")
@stopping_options("target_accuracy", "time_budget")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce_cmd(models_text, data_spec, ckpts, out_dir, quick, limit, seed, force, grad_align, grad_mi, stopping,
                  quiet):
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
    _check_out(out_dir)
    with files.locked(out_dir):
        results = reproduce.run(models, data_spec, given, out_dir, quick=quick, force=force, limit=limit,
                                seed=seed, grad_align=grad_align, grad_mi=grad_mi, progress=not quiet,
                                log=click.echo, **stopping)
    click.echo(f"wrote {out_dir}/tables.md, results.json, *.csv and {len(results['figures'])} figures "
               f"in {results['timings']['total_seconds']:.0f} s")


@cli.command()
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
        _check_out(out_dir)
    _setup_jax()
    from . import hessian, tables

    report, rows, note = hessian.curvature_of_checkpoint(ckpt_dir, data_spec, limit, param_subset, iterations,
                                                         probes, seed)
    click.echo(tables.markdown_table(rows, ("group", "count", "loss", "top_eigenvalue", "trace", "trace_stderr")))
    click.echo(note)
    if out_dir:
        with files.locked(out_dir):
            os.makedirs(out_dir, exist_ok=True)
            files.write_json(os.path.join(out_dir, "curvature.json"), report)
        click.echo(f"wrote {out_dir}/curvature.json")


@cli.command("audit")
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
    _setup_jax()
    from . import audit, tables

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


@cli.group()
def bench():
    """Benchmarks: throughputs measured side by side in one run, printed as ratios."""


def _print_bench(title: str, rows: list[tuple[str, float, str]]) -> None:
    click.echo(f"## {title}")
    from .tables import markdown_table

    click.echo(markdown_table([{"work": w, "value": v, "ratio": r} for w, v, r in rows], ("work", "value", "ratio"), 2))


@bench.command("grads")
@click.option("--model", default="resnet50", show_default=True, callback=_model_name, help="Architecture.")
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
@click.option("--model", default="resnet18", show_default=True, callback=_model_name, help="Architecture.")
@click.option("--size", type=IMAGE_SIZE, default=72, show_default=True, help="Input size in pixels.")
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="Images per step.")
@click.option("--steps", type=POSITIVE, default=10, show_default=True, help="Timed repetitions.")
@click.option("--layer", type=click.Choice(["stem", "layer1", "layer2", "layer3", "layer4"]), default="layer4",
              show_default=True, help="Stage of the maps.")
@click.option("--similarity-n", type=POSITIVE, default=100_000, show_default=True,
              help="Rows for the similarity timing.")
@click.option("--similarity-d", type=POSITIVE, default=2048, show_default=True,
              help="Feature dimension for the similarity timing.")
@click.option("--json", "json_path", default=None, help="Also write the numbers as JSON here.")
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
@click.option("--model", default="resnet18", show_default=True, callback=_model_name, help="Architecture.")
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


@bench.command("audit")
@click.option("--model", default="resnet18", show_default=True, callback=_model_name, help="Architecture trained.")
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
    _setup_jax()
    from . import audit_bench, tables

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


cli.add_command(cli_explain.explain_cmd)
bench.add_command(cli_explain.bench_explain_cmd)

MODELS_DEFAULT = "resnet18,resnet34,resnet50,resnet101,resnet152"


def _write_json(path, obj) -> None:
    from .files import write_json

    write_json(path, obj)


def _exit_now(code: int) -> None:
    """Exits without interpreter teardown, which can crash while XLA compiles in other threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> None:
    """Entry point and the one error boundary: every failure becomes one line on stderr; exit code 2 for
    expected failures, 1 for unexpected ones (the traceback only with RESNET_JAX_DEBUG=1), 130 on Ctrl-C."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        if argv is None:  # the console script: no teardown racing the compiler threads
            _exit_now(130)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        if os.environ.get("RESNET_JAX_DEBUG"):
            raise
        line, code = failure_line(e)
        click.echo(line, err=True)
        sys.exit(code)
