"""`Dataset` (one split of one source), `Batch`, and `load`; see the package docstring."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.core.data.arrays import ArraySource
from resnet_jax.core.data.digits import DigitsSource
from resnet_jax.core.data.folder import FolderSource
from resnet_jax.core.data.spec import (DEFAULT_IMAGE_SIZE, DIGITS_CANVAS, IMAGENET_MEAN, IMAGENET_STD,
                                       NORMALIZATIONS, choose_split, parse_spec)
from resnet_jax.core.data.tfds import TfdsSource


class DecodedSource:
    """Another source's examples decoded once, in memory (`Dataset.cached`)."""

    random_access = True

    def __init__(self, source):
        images, labels, masks = source.read(np.arange(source.n))
        self._images, self._masks = images, masks
        self.labels, self.ids, self.n = source.labels, source.ids, source.n
        self.spec, self.split, self.class_names = source.spec, source.split, source.class_names
        self.image_size, self.has_masks = source.image_size, source.has_masks

    def ids_at(self, idx):
        return [self.ids[i] for i in idx]

    def read(self, idx):
        idx = np.asarray(idx, np.int64)
        return self._images[idx], self.labels[idx], None if self._masks is None else self._masks[idx]


class Batch(NamedTuple):
    images: np.ndarray  # (B, H, W, 3) float32
    labels: np.ndarray  # (B,) int32
    ids: list[str]
    masks: np.ndarray | None = None  # (B, H, W) float32 in {0, 1}


def batch_indices(n: int, batch_size: int, start: int, shuffle: bool, seed: int, drop_remainder: bool):
    """Yields the positions (B,) of each batch over n examples: in order, or a permutation seeded by
    `seed`, skipping the first `start`; a last short batch is dropped with drop_remainder."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    order = order[start:]
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        if drop_remainder and len(idx) < batch_size:
            return
        yield idx


@dataclass(eq=False)
class Dataset:
    """One split of one source; see the module docstring."""

    spec: str
    split: str
    class_names: tuple[str, ...]
    image_size: int
    has_masks: bool
    normalization: str = "none"
    _source: Any = field(default=None, repr=False)

    @classmethod
    def from_arrays(cls, images, labels, *, class_names=None, ids=None, masks=None,
                    normalization: str = "none") -> "Dataset":
        """A data set over in-memory images (N, H, H, 3) (uint8 or floats in [0, 1]) and labels (N,)."""
        if normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
        src = ArraySource(images, labels, class_names, ids, masks)
        return cls(spec=src.spec, split=src.split, class_names=src.class_names, image_size=src.image_size,
                   has_masks=src.has_masks, normalization=normalization, _source=src)

    def __len__(self) -> int:
        return self._source.n

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 labels in the unshuffled order, read without decoding images."""
        return self._source.labels

    @property
    def ids(self) -> list[str]:
        """N stable, unique string ids in the unshuffled order."""
        return self._source.ids

    @property
    def random_access(self) -> bool:
        """Whether `take` works (False only for tfds datasets streamed from tfrecord files)."""
        return self._source.random_access

    def batches(self, batch_size: int, *, start: int = 0, shuffle: bool = False, seed: int = 0,
                drop_remainder: bool = False) -> Iterator[Batch]:
        """Yields batches; with shuffle, a seeded permutation; `start` skips that many examples of the
        iteration order. Bad arguments raise UserError at the call, not at the first batch."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(self)
        if not isinstance(start, (int, np.integer)) or not 0 <= start <= n:
            raise UserError(f"start must be between 0 and {n} (the size of {self.spec}), got {start!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"shuffle seed must be a non-negative integer, got {seed!r}")
        return self._batches(int(batch_size), int(start), bool(shuffle), int(seed), bool(drop_remainder))

    def _batches(self, batch_size, start, shuffle, seed, drop_remainder):
        n = len(self)
        if not self._source.random_access:
            for images, labels, ids, masks in self._source.stream(batch_size, start, shuffle, seed, drop_remainder):
                yield Batch(normalize(images, self.normalization), labels, ids, masks)
            return
        for idx in batch_indices(n, batch_size, start, shuffle, seed, drop_remainder):
            yield self._batch(idx)

    @property
    def redrawable(self) -> bool:
        """Whether `take(..., redraw=k)` renders other versions of the same examples (digits only)."""
        return getattr(self._source, "redrawable", False)

    def take(self, indices: Sequence[int], redraw: int | None = None) -> Batch:
        """The examples at `indices` (positions in the unshuffled order) as one batch; `redraw` k (a
        source that is `redrawable`) renders version k of each: the same glyph and label, drawn afresh."""
        if not self.random_access:
            raise UserError(f"{self.spec} is streamed from tfrecord files and has no random access: rebuild it "
                            f"with `tfds build {self.spec.split(':')[1]} --file_format=array_record`")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise UserError(f"index out of range for {self.spec} (size {len(self)})")
        if redraw is not None and not self.redrawable:
            raise UserError(f"{self.spec} cannot redraw its images: only the embedded digits can")
        return self._batch(idx, redraw)

    def cached(self, max_bytes: int = 1 << 30) -> "Dataset":
        """This data set with every image decoded once and held in memory (the same spec, split, ids
        and order), for a caller that reads it several times (`reproduce` runs the held-out split
        through extract, Grad-CAM and its figures). Returns `self` unchanged when the decoded images
        would take more than `max_bytes` or the source has no random access (streamed tfds)."""
        size = self.image_size
        if not self.random_access or len(self) * size * size * (3 + self.has_masks) * 4 > max_bytes:
            return self
        return Dataset(spec=self.spec, split=self.split, class_names=self.class_names, image_size=size,
                       has_masks=self.has_masks, normalization=self.normalization,
                       _source=DecodedSource(self._source))

    def validate(self, progress: bool = False) -> int:
        """Decodes every example (images and masks); raises UserError naming bad files. Returns N."""
        if hasattr(self._source, "validate"):
            return self._source.validate(progress)
        for _ in self.batches(256):
            pass
        return len(self)

    def _batch(self, idx: np.ndarray, redraw: int | None = None) -> Batch:
        images, labels, masks = self._source.read(idx) if redraw is None else self._source.read(idx, redraw)
        return Batch(normalize(images, self.normalization), labels, self._source.ids_at(idx), masks)


def load(spec: str, *, split: str | None = None, image_size: int | None = None, normalization: str = "none",
         seed: int = 0, default_split: str = "test", data_dir: str | None = None) -> Dataset:
    """Opens one split of a source. `data_dir` is the tfds data directory (tfds only)."""
    kind, arg, spec_split = parse_spec(spec)
    if spec_split is not None and split is not None and spec_split != split:
        raise UserError(f"spec {spec!r} names split {spec_split!r} but split={split!r} was also given: "
                        f"give only one")
    requested = spec_split if spec_split is not None else split
    if normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool)
                                   or image_size < 8):
        raise UserError(f"image size must be an integer >= 8, got {image_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if kind == "digits":
        source = DigitsSource(choose_split(requested, default_split, ("train", "test"), spec),
                               image_size or DIGITS_CANVAS, int(seed))
    elif kind == "folder":
        source = FolderSource(arg, requested, default_split, image_size or DEFAULT_IMAGE_SIZE, spec)
    else:
        source = TfdsSource(arg, requested, default_split, image_size, data_dir)
    return Dataset(spec=source.spec, split=source.split, class_names=tuple(source.class_names),
                   image_size=int(source.image_size), has_masks=source.has_masks, normalization=normalization,
                   _source=source)


def load_for_checkpoint(spec: str, meta: dict, *, split: str | None = None, default_split: str = "test",
                        seed: int = 0) -> Dataset:
    """Returns the data set fed as a checkpoint expects (its input size and normalisation).

    `meta` is the checkpoint metadata. Raises UserError when the data's classes differ in number
    from the model's, or when the split holds no images.
    """
    ds = load(spec, split=split, image_size=meta["image_size"], normalization=meta.get("normalization", "none"),
              default_split=default_split, seed=seed)
    check_classes(ds, meta)
    if len(ds) == 0:
        raise UserError(f"{ds.spec} holds no images: pass a data spec with images")
    return ds


def check_classes(ds, meta: dict) -> None:
    """Raises UserError when the data set `ds` has another number of classes than the checkpoint
    whose metadata is `meta`."""
    if ds.num_classes != meta["num_classes"]:
        raise UserError(f"{ds.spec} has {ds.num_classes} classes but the checkpoint's model has "
                        f"{meta['num_classes']}: pass data with the checkpoint's classes")


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
    """Returns images (B, H, W, 3) in [0, 1] normalised as named ("none" leaves them as they are)."""
    if normalization == "imagenet":
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        return (images - mean) / std
    return images
