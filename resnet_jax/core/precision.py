"""Mixed precision: `fp32` (the default) or `bf16` compute for extract, gradcam and train.

`bf16` runs the convolutions, matrix products and activations of the network in bfloat16 while
the parameters stay float32 (Flax's `param_dtype`), so training updates, optimiser state and
gradients with respect to the parameters are float32. What is float32 under bf16 as well:
the logits and pooled features (`models.ResNet` casts them), the loss and softmax, BatchNorm's
statistics (Flax reduces them in float32), the closed-form fc gradient (float32 products of the
float32 features and softmax), the sums over positions of the projected gradients
(`projection.project_pair` accumulates in float32), and Grad-CAM's channel weights and maps.

`resnet_jax.benchmarks.precision.accuracy` measures what bf16 costs against fp32.
"""
from __future__ import annotations

import jax.numpy as jnp

from resnet_jax.errors import UserError

from resnet_jax.constants import PRECISIONS
_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def check(precision: str) -> str:
    """Returns `precision` if it is one of PRECISIONS, else raises UserError."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision: str):
    """The compute dtype of `precision` (jnp.float32 or jnp.bfloat16)."""
    return _DTYPES[check(precision)]


def with_precision(model, precision: str):
    """Returns the (unbound) Flax module `model` computing in `precision`'s dtype, float32 parameters."""
    dtype = compute_dtype(precision)
    return model if model.dtype == dtype else model.clone(dtype=dtype)
