"""The one per-example softmax cross-entropy of the project (training, per-example gradients,
gradient alignment, curvature)."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from . import models


def cross_entropy(logits, labels):
    """Returns -log softmax(logits)[label] per example, shape (...); logits (..., C), labels (...).

    Logits are computed in at least float32 (bfloat16 logits are promoted; float64 stays float64),
    so the loss of a confident example is not rounded to 0."""
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels).astype(jnp.int32))


def example_loss(model, params, batch_stats, image, label):
    """Returns the loss of one example (image (H, W, 3), scalar label) with eval-mode BatchNorm."""
    logits, _ = models.apply(model, {"params": params, "batch_stats": batch_stats}, image[None])
    return cross_entropy(logits[0], label)
