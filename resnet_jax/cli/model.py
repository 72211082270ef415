"""Commands about models and their weights: `models`, `train`, `convert`, `info`."""
from __future__ import annotations

import json

import click

from resnet_jax.cli.options import (FRACTION, IMAGE_SIZE, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT,
                                    PRECISION_HELP, SEED, check_out, model_name, stopping_options)
from resnet_jax.core import files
from resnet_jax.core.compile_cache import enable as setup_jax
from resnet_jax.errors import UserError


@click.command("models")
@click.option("--num-classes", type=POSITIVE, default=1000, show_default=True, help="Classes of the fc layer.")
def models_cmd(num_classes):
    """List the model names and their parameter counts."""
    from resnet_jax.core import models

    for name in models.MODEL_NAMES:
        count = models.count_params(models.variable_shapes(models.create(name, num_classes))["params"])
        click.echo(f"{name:<10} {count:>12,d} parameters")


@click.command()
@click.option("--model", default="resnet18", show_default=True, callback=model_name,
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
    from resnet_jax.training import labels
    from resnet_jax.jobs.extract import STORE_FORMAT

    check_out(out_dir)
    if files.is_ours(out_dir, "manifest.json", STORE_FORMAT):
        raise UserError(f"{out_dir} holds an extract store, not a training run: pass another --out for the checkpoints")
    edits = labels.LabelEdits(noise_rate=label_noise, noise_seed=noise_seed, noise_kind=noise_kind)
    setup_jax()
    from resnet_jax.training import train as training

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


@click.command()
@click.argument("src", type=click.Path())
@click.option("--model", required=True, callback=model_name, help="Architecture the weights belong to.")
@click.option("--out", "out_dir", required=True, help="Checkpoint directory to write.")
@click.option("--num-classes", type=POSITIVE, default=None, help="Default: read from fc.weight.")
@click.option("--class-names", default=None, help="File with one class name per line.")
@click.option("--image-size", type=IMAGE_SIZE, default=224, show_default=True, help="Input size the analyses will use.")
@click.option("--stem", type=click.Choice(["standard", "small"]), default="standard", show_default=True,
              help="Stem the weights were trained with (torchvision: standard).")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
def convert(src, model, out_dir, num_classes, class_names, image_size, stem, overwrite):
    """Import torchvision weights (.pth state_dict, needs torch; or .safetensors) as a checkpoint."""
    from resnet_jax.core import weights as conversion

    names = None
    if class_names:
        try:
            with open(class_names) as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --class-names {class_names}: {e.strerror}") from None
    check_out(out_dir)
    with files.locked(out_dir):
        meta = conversion.convert(src, model, out_dir, num_classes=num_classes, class_names=names,
                                  image_size=image_size, stem=stem, overwrite=overwrite)
    click.echo(f"wrote {meta['model']} ({meta['num_classes']} classes) from {src} to {out_dir}")


@click.command()
@click.argument("ckpt_arg", metavar="[CKPT]", required=False, type=click.Path())
@click.option("--ckpt", "ckpt_opt", default=None, help="Checkpoint directory (or give it as the argument).")
def info(ckpt_arg, ckpt_opt):
    """Print a checkpoint's metadata (model, classes, input size, accuracy, ...)."""
    from resnet_jax.core import checkpoint

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

