"""Checks of options and numbers before any compute: click parameter types and plain functions.

The click types reject out-of-range, NaN and overflowing values while the command line is parsed,
so a bad option fails in milliseconds, before any data is read or anything compiled. Host side: no JAX.
"""
from __future__ import annotations

import math

import click

from resnet_jax.constants import IMAGE_SIZE_MAX, IMAGE_SIZE_MIN, MODEL_CHOICES, SEED_MAX
from resnet_jax.errors import UserError



class Int(click.ParamType):
    """An integer in [lo, hi] (hi None: unbounded); the message names the range."""

    name = "integer"

    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        if (self.lo is not None and number < self.lo) or (self.hi is not None and number > self.hi):
            self.fail(f"{value} is out of range: {self._range()}", param, ctx)
        return number

    def _range(self) -> str:
        if self.hi is None:
            return f"pass an integer >= {self.lo}"
        return f"pass an integer from {self.lo} to {self.hi}"


class Float(click.ParamType):
    """A finite float with lo < value (lo_open) or lo <= value, and value <= hi when hi is given."""

    name = "number"

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        low = self.lo is not None and (number <= self.lo if self.lo_open else number < self.lo)
        if low or (self.hi is not None and number > self.hi):
            bound = [f"> {self.lo}" if self.lo_open else f">= {self.lo}"] if self.lo is not None else []
            bound += [f"<= {self.hi}"] if self.hi is not None else []
            self.fail(f"{value} is out of range: pass a number {' and '.join(bound)}", param, ctx)
        return number


POSITIVE = Int(1)
NON_NEGATIVE = Int(0)
SEED = Int(0, SEED_MAX)
IMAGE_SIZE = Int(IMAGE_SIZE_MIN, IMAGE_SIZE_MAX)
POSITIVE_FLOAT = Float(0.0, lo_open=True)
NON_NEGATIVE_FLOAT = Float(0.0)


FRACTION = Float(0.0, 0.9)
ACCURACY = Float(0.0, 1.0, lo_open=True)
_STOPPING = {
    "target_accuracy": click.option(
        "--target-accuracy", type=ACCURACY, default=None,
        help="Stop when the validation slice of the training split reaches this accuracy "
             "(default: 0.95 on digits; other data train to the epoch cap or a plateau)."),
    "patience": click.option("--patience", type=POSITIVE, default=None,
                             help="Stop after this many epochs without a new best validation accuracy "
                                  "(default: 4; reproduce: per model)."),
    "time_budget": click.option("--time-budget", type=POSITIVE_FLOAT, default=None,
                                help="Cap in seconds per training run: stop before an epoch would end past it."),
    "validation_fraction": click.option(
        "--validation-fraction", type=FRACTION, default=0.1, show_default=True,
        help="Stratified share of the training split held out of training to decide when to stop "
             "(0: no slice, no target, train to the epoch cap)."),
}


def stopping_options(*names):
    """Returns a decorator adding the stopping options `names` (all when empty) to a click command; the
    command receives them as one dict `stopping` (options left at None are dropped)."""
    import functools

    names = names or tuple(_STOPPING)

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            stopping = {name: kwargs.pop(name) for name in names}
            return command(*args, stopping={k: v for k, v in stopping.items() if v is not None}, **kwargs)

        for name in reversed(names):
            wrapper = _STOPPING[name](wrapper)
        return wrapper

    return decorate


MIN_FREE_BYTES = 64 << 20  # refuse an --out whose disk has less free: every output needs more
PRECISION_HELP = ("fp32, or bf16: bfloat16 compute, float32 parameters, gradient sums and Grad-CAM maps "
                  "(what bf16 costs: docs/guides/accelerators.md).")


def check_out(out_dir: str) -> None:
    """Refuses an --out that is a file or not writable before anything is computed."""
    from resnet_jax.core import files

    files.check_out_dir(out_dir, "--out", MIN_FREE_BYTES)


def model_name(ctx, param, value):
    """click callback: refuses a model name that is not one of MODEL_CHOICES."""
    if value is not None and value not in MODEL_CHOICES:
        raise UserError(f"unknown model {value!r}: choose one of {', '.join(MODEL_CHOICES)}")
    return value
INFLUENCE_HELP = ("relatif (default): TracIn over the square root of the training image's TracIn self-influence; "
                  "cosine: sum of eta_t times the gradient cosines; raw: TracIn, sum of eta_t times the gradient "
                  "inner products (favours training images of large gradient); fisher: the influence function "
                  "with the damped empirical Fisher of the projected training gradients, averaged over the "
                  "checkpoints (--method proj only).")
