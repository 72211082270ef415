"""Supervised training to a target: optax AdamW with warm-up and cosine decay, jit-compiled steps.

`fit` trains a ResNet on a data spec until it reaches a target: after every epoch it measures the
accuracy on a validation slice carved from the *training* split (stratified, `validation_fraction`
of it, never trained on and disjoint from the held-out split) and stops when that accuracy reaches
`target_accuracy` (default 0.95 on the embedded digits), when it has not improved for `patience`
epochs, at `epochs` (the cap, over which the learning rate decays) or before an epoch would end
past `time_budget` seconds; the checkpoint metadata records which (`meta["stop"]`). It reports
held-out accuracy after every epoch (never used to stop), writes an Orbax checkpoint per epoch
(params, batch statistics, optimiser state, metadata) and resumes from the latest one when run
again with the same directory, towards the same target. An epoch is a pass over the training
slice, or over the first `images_per_epoch` images of its per-epoch shuffle.
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

from resnet_jax.core import checkpoint, data, models
from resnet_jax.training import labels
from resnet_jax.core.data.dataset import batch_indices
from resnet_jax.errors import UserError
from resnet_jax.core.losses import cross_entropy


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
    target_accuracy: float | None = None  # None: DIGITS_TARGET on digits, no target on other data
    patience: int | None = 4
    validation_fraction: float = 0.1
    zero_init_residual: bool = False
    label_smoothing: float = 0.0
    time_budget: float | None = None
    redraw: bool | None = None  # render training images afresh every epoch; None: wherever the source can (digits)
    precise_bn_images: int = 128  # training images that re-estimate BatchNorm statistics before evaluating; 0: off
    extra: dict = field(default_factory=dict)


# Validation accuracy a run on the embedded digits stops at unless --target-accuracy says otherwise.
DIGITS_TARGET = 0.95
# Options a resumed run may change: caps on this invocation, not part of what is trained.
RESUMABLE_CHANGES = ("time_budget",)


def recorded_config(config: TrainConfig) -> dict:
    """Returns the fields of `config` stored as the checkpoint's `train_config`, which a resumed run must match
    (all but `extra` and `precision`: either precision may continue a run)."""
    return {k: v for k, v in config.__dict__.items() if k not in ("extra", "precision")}


def target_for(config: TrainConfig) -> float | None:
    """Returns the validation accuracy the run stops at: the configured one, else 0.95 on digits
    (None without a validation slice)."""
    if config.validation_fraction <= 0:
        return None
    if config.target_accuracy is not None:
        return config.target_accuracy
    return DIGITS_TARGET if data.parse_spec(config.data)[0] == "digits" else None


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns sorted (train_indices, validation_indices) into a training split with these labels:
    a stratified `fraction` of it (at least one image per class) for validation, the rest to train on."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    if fraction <= 0:
        return indices, indices[:0]
    classes = len(np.unique(labels))
    n_val = max(int(round(fraction * len(labels))), classes)
    if n_val > len(labels) - 2 * classes or np.min(np.unique(labels, return_counts=True)[1]) < 2:
        raise UserError(f"a validation slice of {fraction} leaves too few of the {len(labels)} training images "
                        f"to train on: add images, or pass --validation-fraction 0 (no slice, no target)")
    train_idx, val_idx = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def zero_init_residual(params: dict) -> dict:
    """Returns params with the scale of each residual block's last BatchNorm (`bn2` of a BasicBlock,
    `bn3` of a Bottleneck) set to zero, so that every block starts as the identity."""
    def last_bn_zeroed(block: dict) -> dict:
        last = "bn3" if "bn3" in block else "bn2"
        return {**block, last: {**block[last], "scale": jnp.zeros_like(block[last]["scale"])}}

    return {name: last_bn_zeroed(module) if name.startswith("layer") else module for name, module in params.items()}


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


def smoothed_cross_entropy(logits, labels, smoothing: float):
    """Returns (N,) cross-entropy against labels smoothed towards uniform: (1 - s) CE(y) + s mean_c CE(c)."""
    if smoothing == 0:
        return cross_entropy(logits, labels)
    uniform = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
    return (1 - smoothing) * cross_entropy(logits, labels) + smoothing * uniform


def make_train_step(model: models.ResNet, tx: optax.GradientTransformation, loss_fn=None, label_smoothing: float = 0.0):
    """Returns jit(step)(params, batch_stats, opt_state, images, labels, rng, weights=None) ->
    (params, batch_stats, opt_state, metrics) with train-mode BatchNorm.

    `weights` (B,): the loss is sum(w * loss) / max(sum(w), 1) instead of the mean (a zero weight
    masks an image out of the loss; it still enters the batch's BatchNorm statistics).
    `loss_fn(params, batch_stats, images, labels, rng) -> (loss, (batch_stats, logits, aux))`
    replaces plain (optionally label-smoothed) cross-entropy (the gradient-alignment loss plugs in
    here; it takes no weights).
    """
    if loss_fn is None:
        def loss_fn(params, batch_stats, images, labels, rng, weights=None):
            logits, _, new_stats = models.apply(model, {"params": params, "batch_stats": batch_stats}, images,
                                                train=True)
            losses = smoothed_cross_entropy(logits, labels, label_smoothing)
            loss = losses.mean() if weights is None else jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)
            return loss, (new_stats, logits, {})

    def step(params, batch_stats, opt_state, images, labels, rng, weights=None):
        (loss, (new_stats, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels, rng, *(() if weights is None else (weights,)))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), **aux}
        return params, new_stats, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(model: models.ResNet):
    """Returns jit(f)(variables, images) -> logits (N, C) with running BatchNorm statistics."""
    return jax.jit(lambda variables, images: models.apply(model, variables, images)[0])


def evaluate(model, variables, dataset, batch_size: int = 128, eval_step=None) -> float:
    """Returns the accuracy of the model on every example of `dataset` (a Dataset or an iterable of Batches)."""
    eval_step = eval_step or make_eval_step(model)
    batches = dataset.batches(batch_size) if hasattr(dataset, "batches") else dataset
    correct = total = 0
    for batch in batches:
        logits = eval_step(variables, batch.images)
        correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == batch.labels))
        total += len(batch.labels)
    return correct / total


def make_batch_stats_step(model: models.ResNet):
    """Returns jit(f)(variables, images) -> the BatchNorm statistics of that batch alone, per layer."""
    fresh = model.clone(momentum=0.0)
    return jax.jit(lambda variables, images: models.apply(fresh, variables, images, train=True)[2])


def precise_batch_stats(model: models.ResNet, variables: dict, batches, batch_stats_step=None) -> dict:
    """Returns BatchNorm statistics re-estimated with the current weights ("precise BN"): per layer, the
    mean over `batches` (image arrays (B, H, W, 3) of one size) of each batch's own mean and variance.

    The running averages lag behind weights that change fast; in short runs that costs eval-mode
    accuracy, and the validation slice that decides when to stop is evaluated in eval mode.
    `batch_stats_step` is `make_batch_stats_step(model)`, made once per run (else compiled per call).
    """
    batch_stats_of = batch_stats_step or make_batch_stats_step(model)
    stats = [batch_stats_of(variables, images) for images in batches]
    return jax.tree_util.tree_map(lambda *per_batch: sum(per_batch) / len(per_batch), *stats)


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
    """Trains (or resumes) a model to its target; returns {"test_accuracy", "epochs", "seconds", "history",
    "stop", "test_split"}.

    `stop` is {"reason": "target" | "plateau" | "max_epochs" | "time_budget", "epoch", "validation_accuracy",
    "target_accuracy", "seconds"}, as stored in the checkpoint metadata. Held-out accuracy is measured after
    every epoch; `held_out=False` skips it and does not open the split (None in the records and as
    "test_split"), for callers that run the held-out split
    through the model themselves. `label_edits` (noise, relabelled, removed or masked images) change the
    training labels (masked images stay in their batches with zero loss weight); what changed is recorded in
    the metadata (`label_edits`). Every epoch's record holds its mean learning rate (TracIn's step size). `keep_epochs`: the epochs whose checkpoints are kept, "all", or
    None for the default: all of them when the labels are edited, else the newest two.
    """
    from tqdm.auto import tqdm

    from resnet_jax.core import precision as precisions

    target = _check_config(config)
    kind, arg, _ = data.parse_spec(config.data)
    normalization = data.default_normalization(config.data)
    train_set = data.load(config.data, image_size=config.image_size, normalization=normalization,
                          default_split="train", seed=config.seed)
    # held_out=False (reproduce runs the held-out split itself): not even opened here
    test_set = data.load(kind if arg is None else f"{kind}:{arg}", image_size=train_set.image_size,
                         normalization=normalization, default_split="test", seed=config.seed) if held_out else None
    train_set, edits_record = labels.apply(train_set, label_edits)
    masked = labels.masked_rows(train_set, edits_record)
    if masked is not None and (config.grad_align > 0 or config.grad_mi > 0):
        raise UserError("masked images need the plain cross-entropy: drop --grad-align / --grad-mi, or remove "
                        "the images instead of masking them")
    keep, wanted = _keep_policy(keep_epochs, edits_record is not None)
    _check_training_data(train_set, config.batch_size)
    if config.validation_fraction > 0 and not train_set.random_access:
        raise UserError(f"{train_set.spec} is streamed and cannot be sliced for validation: rebuild it as "
                        f"array_record, or pass --validation-fraction 0 (no slice, no target)")
    train_idx, val_idx = validation_split(train_set.labels, config.validation_fraction, config.seed)
    redraw = train_set.redrawable if config.redraw is None else config.redraw
    if redraw and not train_set.redrawable:
        raise UserError(f"{train_set.spec} cannot redraw its images (only the embedded digits can): drop --redraw")
    if len(train_idx) < config.batch_size:
        raise UserError(f"{len(train_idx)} training images are left beside the validation slice, fewer than one "
                        f"batch of --batch-size {config.batch_size}: lower --batch-size or --validation-fraction")
    if kind == "folder":  # every image file decodable before the first compile
        for ds in (train_set, test_set):
            if ds is not None:
                ds.validate(progress)

    def validation_batches():  # read each time, not held in memory
        for i in range(0, len(val_idx), 128):
            yield train_set.take(val_idx[i:i + 128])

    stats_idx = train_idx[np.random.default_rng(config.seed).permutation(len(train_idx))]
    stats_idx = (stats_idx if masked is None else stats_idx[~masked[stats_idx]])[:config.precise_bn_images]
    stats_images = [train_set.take(stats_idx[i:i + config.batch_size]).images
                    for i in range(0, len(stats_idx) - config.batch_size + 1, config.batch_size)]
    model = precisions.with_precision(models.create(config.model, train_set.num_classes, config.stem),
                                      config.precision)
    steps_per_epoch = max(1, min(len(train_idx), config.images_per_epoch or len(train_idx)) // config.batch_size)
    tx = make_optimizer(config, steps_per_epoch)
    meta = checkpoint.make_meta(config.model, train_set.num_classes, train_set.class_names, config.stem,
                                train_set.image_size, normalization, data=train_set.spec,
                                train_config=recorded_config(config),
                                precision=config.precision,  # not in the resume check: either precision continues
                                validation={"fraction": config.validation_fraction, "size": int(len(val_idx)),
                                            "ids_sha256": _ids_digest(train_set.ids, val_idx)},
                                **({"label_edits": edits_record} if edits_record else {}))
    schedule = make_schedule(config, steps_per_epoch)
    params, batch_stats, opt_state, start_epoch, history, stop = _initial_state(config, model, tx, meta, out_dir,
                                                                                 train_set.image_size)
    loss_fn = None
    if config.grad_align > 0 or config.grad_mi > 0:
        from resnet_jax.training.align import make_aligned_loss
        loss_fn = make_aligned_loss(model, config.grad_align, config.grad_mi, seed=config.seed)
    train_step = make_train_step(model, tx, loss_fn, label_smoothing=config.label_smoothing)
    eval_step, batch_stats_step = make_eval_step(model), make_batch_stats_step(model)
    rng = jax.random.key(config.seed)
    started = time.perf_counter()
    offset = history[-1]["seconds"] if history else 0.0  # seconds of the runs this one resumes
    if stop is not None and stop["reason"] != "time_budget":
        log(f"{out_dir} already stopped at epoch {stop['epoch']} ({stop['reason']}); nothing to train")
    else:
        stop = None
    epoch = start_epoch
    while stop is None and epoch < config.epochs:
        epoch_rng = jax.random.fold_in(rng, epoch)
        version = epoch if redraw else None
        if loss_fn is None:
            order = batch_indices(len(train_idx), config.batch_size, 0, True, config.seed * 1000 + epoch, True)
        else:  # class-balanced, so that every batch holds same-class pairs
            from resnet_jax.training.align import balanced_batches
            order = balanced_batches(train_set.labels[train_idx], config.batch_size,
                                     _images_per_class(config, train_set.num_classes), seed=config.seed, epoch=epoch)
        batches = ((train_idx[idx], train_set.take(train_idx[idx], redraw=version)) for idx in order)
        last_val = history[-1].get("validation_accuracy") if history else None
        status = {} if target is None else {"val": "-" if last_val is None else f"{last_val:.3f}", "target": target}
        bar = tqdm(itertools.islice(batches, steps_per_epoch), total=steps_per_epoch,
                   desc=f"{config.model} epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress,
                   leave=False)
        losses, accs, extras = [], [], {}
        for i, (rows, batch) in enumerate(bar):
            step_rng = jax.random.fold_in(epoch_rng, i)
            images = random_shift(jnp.asarray(batch.images), step_rng, config.augment_shift)
            weights = () if masked is None else (jnp.asarray(~masked[rows], jnp.float32),)
            params, batch_stats, opt_state, metrics = train_step(params, batch_stats, opt_state, images,
                                                                 jnp.asarray(batch.labels), step_rng, *weights)
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
            bar.set_postfix(loss=f"{loss:.3f}", **status)
        epoch += 1
        if stats_images:
            batch_stats = precise_batch_stats(model, {"params": params, "batch_stats": batch_stats}, stats_images,
                                              batch_stats_step)
        variables = {"params": params, "batch_stats": batch_stats}
        val_acc = evaluate(model, variables, validation_batches(), eval_step=eval_step) if len(val_idx) else None
        test_acc = evaluate(model, variables, test_set, eval_step=eval_step) if held_out else None
        learning_rate = float(np.mean(schedule(np.arange((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch))))
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accs)),
                  "validation_accuracy": val_acc, "test_accuracy": test_acc, "learning_rate": learning_rate,
                  "seconds": round(offset + time.perf_counter() - started, 1),
                  **{f"train_{k}": float(np.mean(v)) for k, v in extras.items()}}
        history.append(record)
        elapsed = time.perf_counter() - started
        stop = _stopping(config, history, target, elapsed, epoch - start_epoch)
        log(f"{config.model} epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}  train acc "
            f"{record['train_accuracy']:.3f}  val acc {'-' if val_acc is None else f'{val_acc:.4f}'}"
            f"{'' if target is None else f' (target {target})'}  test acc "
            f"{'-' if test_acc is None else f'{test_acc:.4f}'}  ({record['seconds']:.0f} s"
            + (_time_left(config, history, target, elapsed / (epoch - start_epoch)) if stop is None else "") + ")"
            + "".join(f"  {k} {np.mean(v):.4f}" for k, v in extras.items() if k != "n_pairs")
            + ("" if stop is None else f"  -> stop: {stop['reason']}"))
        checkpoint.save(out_dir, epoch, variables, dict(meta, test_accuracy=test_acc, history=history, stop=stop),
                        opt_state=opt_state, keep=keep)
        if wanted is not None:
            checkpoint.delete_steps(out_dir, [s for s in checkpoint.steps(out_dir)[:-1] if s not in wanted])
    if stop is None and history:  # resumed at the cap by a run that predates stop records
        stop = _stopping(config, history, target, 0.0, 1)
    final = history[-1]["test_accuracy"] if history else None
    return {"test_accuracy": final, "epochs": len(history), "history": history, "stop": stop,
            "seconds": time.perf_counter() - started, "test_split": None if test_set is None else test_set.spec}


def _check_config(config: TrainConfig) -> float | None:
    """Raises UserError on out-of-range options; returns the target validation accuracy (or None)."""
    from resnet_jax.core import precision as precisions

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
    if not 0 <= config.validation_fraction < 1:
        raise UserError(f"--validation-fraction must be in [0, 1), got {config.validation_fraction}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
        raise UserError(f"--target-accuracy must be in (0, 1], got {config.target_accuracy}")
    if config.target_accuracy is not None and config.validation_fraction == 0:
        raise UserError("--target-accuracy needs a validation slice: pass --validation-fraction above 0")
    if config.precise_bn_images < 0:
        raise UserError(f"precise_bn_images must be >= 0, got {config.precise_bn_images}")
    if config.patience is not None and config.patience < 1:
        raise UserError(f"--patience must be at least 1, got {config.patience}")
    if config.time_budget is not None and not config.time_budget > 0:
        raise UserError(f"--time-budget must be a positive number of seconds, got {config.time_budget}")
    return target_for(config)


def _stopping(config: TrainConfig, history: list, target: float | None, elapsed: float, epochs_run: int) -> dict | None:
    """Returns the stop record after the last epoch of `history`, or None to go on: "target" (validation
    accuracy reached it), "plateau" (no new best for `patience` epochs), "max_epochs" (the cap) or
    "time_budget" (another epoch of this invocation, at its mean pace so far, would end past it)."""
    last = history[-1]
    accs = [h["validation_accuracy"] for h in history if h.get("validation_accuracy") is not None]
    if target is not None and accs and accs[-1] >= target:
        reason = "target"
    elif config.patience is not None and accs and len(accs) - 1 - int(np.argmax(accs)) >= config.patience:
        reason = "plateau"
    elif last["epoch"] >= config.epochs:
        reason = "max_epochs"
    elif config.time_budget is not None and elapsed * (1 + 1 / epochs_run) > config.time_budget:
        reason = "time_budget"
    else:
        return None
    return {"reason": reason, "epoch": last["epoch"], "validation_accuracy": last.get("validation_accuracy"),
            "target_accuracy": target, "seconds": last["seconds"]}


def _time_left(config: TrainConfig, history: list, target: float | None, seconds_per_epoch: float) -> str:
    """Returns ", at most N s left, about M s to the target" for the log line: the time to the epoch cap
    (an upper bound) and the time to the target extrapolated from the last two validation accuracies
    when they rise."""
    text = f", at most {seconds_per_epoch * (config.epochs - history[-1]['epoch']):.0f} s left"
    accs = [h.get("validation_accuracy") for h in history[-2:]]
    if target is not None and len(accs) == 2 and None not in accs and accs[1] > accs[0]:
        epochs = min(math.ceil((target - accs[1]) / (accs[1] - accs[0])), config.epochs - history[-1]["epoch"])
        text += f", about {seconds_per_epoch * epochs:.0f} s to the target"
    return text


def _ids_digest(ids, indices) -> str:
    """Returns the SHA-256 of the ids at `indices`, one per line: which images the validation slice holds."""
    import hashlib

    return hashlib.sha256("\n".join(ids[i] for i in indices).encode()).hexdigest()


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
    """Returns (params, batch_stats, opt_state, start_epoch, history, stop), resuming from out_dir if it
    holds a step; `stop` is the stored stop record or None."""
    if checkpoint.latest_step(out_dir) is not None:
        old = checkpoint.load_meta(out_dir)
        for key in ("model", "num_classes", "stem", "image_size", "data", "train_config", "label_edits", "validation"):
            have, want = old.get(key), meta.get(key)
            if key == "train_config" and isinstance(have, dict):
                have, want = ({k: v for k, v in d.items() if k not in RESUMABLE_CHANGES} for d in (have, want))
                if have != want:
                    key = next(k for k in list(want) + list(have) if have.get(k) != want.get(k))
                    have, want = have.get(key), want.get(key)
            if have != want:
                raise UserError(f"{out_dir} holds a run with {key}={have!r}, not {want!r}: "
                                f"pass another --out or delete it")
        abstract = jax.eval_shape(tx.init, models.variable_shapes(model, image_size)["params"])
        ckpt = checkpoint.load(out_dir, opt_state_target=abstract)
        return (ckpt.variables["params"], ckpt.variables["batch_stats"], ckpt.opt_state, ckpt.step,
                list(old.get("history", [])), old.get("stop"))
    variables = models.init(model, jax.random.key(config.seed), image_size)
    params = zero_init_residual(variables["params"]) if config.zero_init_residual else variables["params"]
    return params, variables["batch_stats"], tx.init(params), 0, [], None
