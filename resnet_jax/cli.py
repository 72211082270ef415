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
@click.option("--epochs", default=8, show_default=True, help="Passes over the training split.")
@click.option("--batch-size", default=64, show_default=True)
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
def train(model, data_spec, epochs, batch_size, learning_rate, weight_decay, stem, image_size, augment_shift,
          grad_align, grad_mi, seed, out_dir, quiet):
    """Train a ResNet, report held-out accuracy each epoch, checkpoint each epoch (resumable)."""
    _setup_jax()
    from . import train as training

    config = training.TrainConfig(model=model, data=data_spec, epochs=epochs, batch_size=batch_size,
                                  learning_rate=learning_rate, weight_decay=weight_decay, stem=stem,
                                  image_size=image_size, seed=seed, augment_shift=augment_shift,
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
        click.echo(f"{'history':>16}: " + ", ".join(f"epoch {h['epoch']} acc {h['test_accuracy']:.4f}"
                                                     for h in history))


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
