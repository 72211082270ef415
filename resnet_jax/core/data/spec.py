"""Data specs (`digits[:SPLIT]`, `folder:PATH[:SPLIT]`, `tfds:NAME[:SPLIT]`), the constants of the
sources and the split choice; see the package docstring."""
from __future__ import annotations

import os
import re
from typing import Sequence

from resnet_jax.errors import UserError

DIGITS_CANVAS = 72
DIGITS_GLYPH = 32
DIGITS_NOISE = 0.15
DIGITS_MASK_THRESHOLD = 0.25
DIGITS_TEST_SIZE = 0.3
DIGITS_SPLIT_SEED = 0
DEFAULT_IMAGE_SIZE = 224
FOLDER_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("none", "imagenet")
TFDS_SHUFFLE_BUFFER = 2048
TFDS_EXTRA_MESSAGE = "tfds source needs the tfds extra: pip install 'resnet-jax[tfds]'"
SPEC_HELP = "use digits[:SPLIT], folder:PATH[:SPLIT] or tfds:NAME[:SPLIT]"

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_FALLBACKS = {"test": ("test", "validation", "val"), "validation": ("validation", "val", "test"),
              "val": ("val", "validation", "test")}
# The normalisation a source's images get when a model is trained on them: the embedded digits are
# used as rendered ([0, 1]); photographs (folder, tfds) get ImageNet's statistics, as torchvision's
# pretrained weights expect.
SOURCE_NORMALIZATION = {"digits": "none", "folder": "imagenet", "tfds": "imagenet"}


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Returns (kind, arg, split) of a spec; arg is None for digits, split None when absent.

    For folder specs the last ":"-separated part is a split when it looks like one (letters,
    digits, "_", "-", ".") and "PATH:SPLIT" as a whole is not an existing path.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty data spec: {SPEC_HELP}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        if not rest:
            return "digits", None, None
        if ":" in rest or not _SPLIT_RE.match(rest):
            raise UserError(f"bad digits spec {spec!r}: use digits or digits:SPLIT (train, test)")
        return "digits", None, rest
    if kind == "folder":
        if not rest:
            raise UserError(f"folder spec {spec!r} lacks a path: use folder:PATH[:SPLIT]")
        if ":" in rest:
            head, tail = rest.rsplit(":", 1)
            if head and _SPLIT_RE.match(tail) and not os.path.exists(os.path.expanduser(rest)):
                return "folder", head, tail
        return "folder", rest, None
    if kind == "tfds":
        parts = rest.split(":")
        if not rest or not parts[0]:
            raise UserError(f"tfds spec {spec!r} lacks a dataset name: use tfds:NAME[:SPLIT]")
        if len(parts) > 2 or (len(parts) == 2 and not parts[1]):
            raise UserError(f"bad tfds spec {spec!r}: use tfds:NAME or tfds:NAME:SPLIT "
                            f"(dataset versions are not supported in specs)")
        if len(parts) == 2 and not _SPLIT_RE.match(parts[1]):
            raise UserError(f"bad split {parts[1]!r} in {spec!r}: give a whole split name "
                            f"(slicing like train[:10%] is not supported)")
        return "tfds", parts[0], parts[1] if len(parts) == 2 else None
    raise UserError(f"unknown data source {spec!r}: {SPEC_HELP}")


def default_normalization(spec: str) -> str:
    """Returns the normalisation ("none" or "imagenet") that models trained on `spec` are fed with."""
    return SOURCE_NORMALIZATION[parse_spec(spec)[0]]


def choose_split(requested: str | None, default: str, available: Sequence[str], what: str) -> str:
    if requested is not None:
        if requested not in available:
            raise UserError(f"{what} has no split {requested!r}: available splits are {', '.join(available)}")
        return requested
    for candidate in _FALLBACKS.get(default, (default,)):
        if candidate in available:
            return candidate
    raise UserError(f"{what} has no {default!r} split: pick one of {', '.join(available)}")
