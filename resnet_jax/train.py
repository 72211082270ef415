"""Supervised training: optax AdamW with warm-up and cosine decay, jit-compiled steps.

`fit` trains a ResNet on a data spec, reports held-out accuracy after every epoch, writes an
Orbax checkpoint per epoch (params, batch statistics, optimiser state, metadata) and resumes
from the latest one when run again with the same directory. An epoch is a pass over the
training split, or over the first `images_per_epoch` images of its per-epoch shuffle.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint, data, labels, models
from .errors import UserError
from .losses import cross_entropy


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run; all of them are stored in the checkpoint metadata."""

    model: str = "resnet18"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    stem: str = "standard"
    image_size: int | None = None
    seed: int = 0
    images_per_epoch: int | None = None
    augment_shift: int = 0
    grad_align: float = 0.0
    grad_mi: float = 0.0
    per_class: int = 4
    precision: str = "fp32"  # compute dtype (precision.py); parameters and optimiser state stay float32
    extra: dict = field(default_factory=dict)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Returns the learning rate by step: a linear warm-up then cosine decay over the whole run."""
    total = max(1, config.epochs * steps_per_epoch)
    # At most a quarter of a short run warms up.
    warmup = min(total - 1, int(min(config.warmup_epochs, 0.25 * config.epochs) * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total,
                                              end_value=config.learning_rate * 1e-2)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Returns AdamW on `make_schedule`."""
    return optax.adamw(make_schedule(config, steps_per_epoch), weight_decay=config.weight_decay)


def make_train_step(model: models.ResNet, tx: optax.GradientTransformation, loss_fn=None):
    """Returns jit(step)(params, batch_stats, opt_state, images, labels, rng) ->
    (params, batch_stats, opt_state, metrics) with train-mode BatchNorm.

    `loss_fn(params, batch_stats, images, labels, rng) -> (loss, (batch_stats, logits, aux))`
    replaces plain cross-entropy (the gradient-alignment loss plugs in here).
    """
    if loss_fn is None:
        def loss_fn(params, batch_stats, images, labels, rng):
            logits, _, new_stats = models.apply(model, {"params": params, "batch_stats": batch_stats}, images,
                                                train=True)
            return cross_entropy(logits, labels).mean(), (new_stats, logits, {})

    def step(params, batch_stats, opt_state, images, labels, rng):
        (loss, (new_stats, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), **aux}
        return params, new_stats, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(model: models.ResNet):
    """Returns jit(f)(variables, images) -> logits (N, C) with running BatchNorm statistics."""
    return jax.jit(lambda variables, images: models.apply(model, variables, images)[0])


def evaluate(model, variables, dataset, batch_size: int = 128) -> float:
    """Returns the accuracy of the model on every example of `dataset`."""
    eval_step = make_eval_step(model)
    correct = 0
    for batch in dataset.batches(batch_size):
        logits = eval_step(variables, batch.images)
        correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == batch.labels))
    return correct / len(dataset)


def random_shift(images, rng, max_shift: int):
    """Returns images (N, H, W, C) each translated by a random integer offset in [-s, s], edge-padded."""
    if max_shift <= 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def fit(config: TrainConfig, out_dir: str, progress: bool = True, log=print, held_out: bool = True,
        label_edits: labels.LabelEdits | None = None, keep_epochs=None) -> dict:
    """Trains (or resumes) a model; returns {"test_accuracy", "epochs", "seconds", "history"}.

    Held-out accuracy is measured after every epoch; `held_out=False` skips it (None in the
    records), for callers that run the held-out split through the model themselves.
    `label_edits` (noise, relabelled or removed images) change the training labels; what changed
    is recorded in the metadata (`label_edits`). Every epoch's record holds its mean learning
    rate (TracIn's step size). `keep_epochs`: the epochs whose checkpoints are kept, "all", or
    None for the default: all of them when the labels are edited, else the newest two.
    """
    from tqdm.auto import tqdm

    from . import precision as precisions

    precisions.check(config.precision)
    for name, value in (("epochs", config.epochs), ("batch_size", config.batch_size)):
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if config.images_per_epoch is not None and config.images_per_epoch < config.batch_size:
        raise UserError(f"--images-per-epoch must be at least the batch size ({config.batch_size}), "
                        f"got {config.images_per_epoch}")
    for flag, value, low in (("--learning-rate", config.learning_rate, 0.0), ("--weight-decay", config.weight_decay,
                              None), ("--grad-align", config.grad_align, None), ("--grad-mi", config.grad_mi, None)):
        if not math.isfinite(value) or value < 0 or (low is not None and value <= low):
            raise UserError(f"{flag} must be a finite number {'> 0' if low is not None else '>= 0'}, got {value}")
    kind, arg, _ = data.parse_spec(config.data)
    normalization = data.default_normalization(config.data)
    train_set = data.load(config.data, image_size=config.image_size, normalization=normalization,
                          default_split="train", seed=config.seed)
    test_set = data.load(kind if arg is None else f"{kind}:{arg}", image_size=train_set.image_size,
                         normalization=normalization, default_split="test", seed=config.seed)
    train_set, edits_record = labels.apply(train_set, label_edits)
    keep, wanted = _keep_policy(keep_epochs, edits_record is not None)
    _check_training_data(train_set, config.batch_size)
    if kind == "folder":  # every image file decodable before the first compile
        for ds in (train_set, test_set):
            ds.validate(progress)
    model = precisions.with_precision(models.create(config.model, train_set.num_classes, config.stem),
                                      config.precision)
    steps_per_epoch = max(1, min(len(train_set), config.images_per_epoch or len(train_set)) // config.batch_size)
    tx = make_optimizer(config, steps_per_epoch)
    meta = checkpoint.make_meta(config.model, train_set.num_classes, train_set.class_names, config.stem,
                                train_set.image_size, normalization, data=train_set.spec,
                                train_config={k: v for k, v in config.__dict__.items()
                                              if k not in ("extra", "precision")},
                                precision=config.precision,  # not in the resume check: either precision continues
                                **({"label_edits": edits_record} if edits_record else {}))
    schedule = make_schedule(config, steps_per_epoch)
    params, batch_stats, opt_state, start_epoch, history = _initial_state(config, model, tx, meta, out_dir,
                                                                           train_set.image_size)
    loss_fn = None
    if config.grad_align > 0 or config.grad_mi > 0:
        from .align import make_aligned_loss
        loss_fn = make_aligned_loss(model, config.grad_align, config.grad_mi, seed=config.seed)
    train_step = make_train_step(model, tx, loss_fn)
    rng = jax.random.key(config.seed)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        epoch_rng = jax.random.fold_in(rng, epoch)
        if loss_fn is None:
            batches = train_set.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch,
                                        drop_remainder=True)
        else:  # class-balanced, so that every batch holds same-class pairs
            from .align import balanced_batches
            batches = (train_set.take(idx) for idx in balanced_batches(
                train_set.labels, config.batch_size, _images_per_class(config, train_set.num_classes),
                seed=config.seed, epoch=epoch))
        bar = tqdm(itertools.islice(batches, steps_per_epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress, leave=False)
        losses, accs, extras = [], [], {}
        for i, batch in enumerate(bar):
            step_rng = jax.random.fold_in(epoch_rng, i)
            images = random_shift(jnp.asarray(batch.images), step_rng, config.augment_shift)
            params, batch_stats, opt_state, metrics = train_step(params, batch_stats, opt_state, images,
                                                                 jnp.asarray(batch.labels), step_rng)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                kept = (f"the last good checkpoint in {out_dir} (epoch {epoch}) is kept" if epoch > 0
                        else "no checkpoint was written")
                raise UserError(f"training loss became {loss} at epoch {epoch + 1}, step {i + 1}; {kept}: lower "
                                f"--learning-rate (or --grad-align / --grad-mi)")
            losses.append(loss)
            accs.append(float(metrics["accuracy"]))
            for key in ("l_grad", "l_mi", "n_pairs"):
                if key in metrics:
                    extras.setdefault(key, []).append(float(metrics[key]))
            bar.set_postfix(loss=f"{loss:.3f}")
        variables = {"params": params, "batch_stats": batch_stats}
        test_acc = evaluate(model, variables, test_set) if held_out else None
        learning_rate = float(np.mean(schedule(np.arange(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch))))
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accs)),
                  "test_accuracy": test_acc, "learning_rate": learning_rate,
                  "seconds": round(time.perf_counter() - started, 1),
                  **{f"train_{k}": float(np.mean(v)) for k, v in extras.items()}}
        history.append(record)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f}  train acc "
            f"{record['train_accuracy']:.3f}  test acc {'-' if test_acc is None else f'{test_acc:.4f}'}  "
            f"({record['seconds']:.0f} s)"
            + "".join(f"  {k} {np.mean(v):.4f}" for k, v in extras.items() if k != "n_pairs"))
        checkpoint.save(out_dir, epoch + 1, variables, dict(meta, test_accuracy=test_acc, history=history),
                        opt_state=opt_state, keep=keep)
        if wanted is not None:
            checkpoint.delete_steps(out_dir, [s for s in checkpoint.steps(out_dir)[:-1] if s not in wanted])
    final = history[-1]["test_accuracy"] if history else None
    return {"test_accuracy": final, "epochs": config.epochs, "history": history,
            "seconds": time.perf_counter() - started, "test_split": test_set.spec}


def _keep_policy(keep_epochs, edited: bool):
    """Returns (keep for checkpoint.save, the set of epochs to keep or None) of a `keep_epochs` option."""
    if keep_epochs is None:
        return (None, None) if edited else (2, None)
    if keep_epochs == "all":
        return None, None
    try:
        wanted = {int(e) for e in str(keep_epochs).split(",")}
    except ValueError:
        wanted = {0}
    if min(wanted) < 1:
        raise UserError(f"--keep-epochs takes 'all' or comma-separated epochs such as 2,4,6, got {keep_epochs!r}")
    return None, wanted


def _check_training_data(train_set, batch_size: int) -> None:
    """Refuses training data without one full batch or with fewer than two classes (nothing to learn)."""
    if len(train_set) < batch_size:
        raise UserError(f"{train_set.spec} has {len(train_set)} training images, fewer than one batch of "
                        f"--batch-size {batch_size}: lower --batch-size or add images")
    present = np.unique(np.asarray(train_set.labels))
    if len(present) < 2:
        raise UserError(f"{train_set.spec} holds images of {len(present)} class(es): training a classifier "
                        f"needs at least two; add class folders")


def _images_per_class(config: TrainConfig, num_classes: int) -> int:
    """Returns images per class of a balanced batch: at least config.per_class, with as many classes
    (at most num_classes) as divide the batch."""
    for classes in range(min(num_classes, config.batch_size // config.per_class), 1, -1):
        if config.batch_size % classes == 0:
            return config.batch_size // classes
    raise UserError(f"a batch of {config.batch_size} cannot hold {config.per_class} images of each of two "
                    f"classes: raise --batch-size")


def _initial_state(config, model, tx, meta, out_dir, image_size):
    """Returns (params, batch_stats, opt_state, start_epoch, history), resuming from out_dir if it holds a step."""
    if checkpoint.latest_step(out_dir) is not None:
        old = checkpoint.load_meta(out_dir)
        for key in ("model", "num_classes", "stem", "image_size", "data", "train_config", "label_edits"):
            have, want = old.get(key), meta.get(key)
            if key == "train_config" and isinstance(have, dict) and have != want:
                key = next(k for k in list(want) + list(have) if have.get(k) != want.get(k))
                have, want = have.get(key), want.get(key)
            if have != want:
                raise UserError(f"{out_dir} holds a run with {key}={have!r}, not {want!r}: "
                                f"pass another --out or delete it")
        abstract = jax.eval_shape(tx.init, models.variable_shapes(model, image_size)["params"])
        ckpt = checkpoint.load(out_dir, opt_state_target=abstract)
        return (ckpt.variables["params"], ckpt.variables["batch_stats"], ckpt.opt_state, ckpt.step,
                list(old.get("history", [])))
    variables = models.init(model, jax.random.key(config.seed), image_size)
    return variables["params"], variables["batch_stats"], tx.init(variables["params"]), 0, []
