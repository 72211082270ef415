"""Image classification data: one interface over three sources.

Spec grammar (`parse_spec`, `load`)::

    digits[:SPLIT]          scikit-learn's 8x8 digits on a noisy canvas (embedded, offline)
    folder:PATH[:SPLIT]     PATH/<class>/*.{jpg,jpeg,png}, optional PATH/masks/<class>/<stem>.png
    tfds:NAME[:SPLIT]       a prepared tensorflow-datasets image classification dataset
                            (NAME may carry a config, "imagenette/320px-v2"; no version, no slicing)

`load` returns a `Dataset` (one split of one source); `Dataset.batches` yields `Batch`es of
float32 RGB images (B, H, W, 3), int32 labels, stable string ids and, where the source has them,
float32 object masks (B, H, W) in {0, 1}. `Dataset.labels` and `Dataset.ids` are available without
decoding images. The order without shuffling is deterministic; `start` skips the first `start`
examples of the iteration order (for resuming).

Beyond that: `Dataset.take(indices)` returns the examples at those positions as one Batch (random
access; every source except tfds datasets stored as tfrecord, see `Dataset.random_access`),
`Dataset.validate()` decodes everything and raises one UserError naming the bad files, and
`load(..., data_dir=)` is the tfds data directory (default: TFDS_DATA_DIR or ~/tensorflow_datasets).

Split choice: the split in the spec, else `split=`, else `default_split` ("test" falls back to
"validation" then "val"; "validation" falls back to "val" then "test").

Sources and policies

* digits: `sklearn.datasets.load_digits()` (1,797 glyphs, classes "0".."9"), a fixed stratified
  70/30 split (`train_test_split(..., test_size=0.3, stratify=y, random_state=DIGITS_SPLIT_SEED)`,
  1,257 train / 540 test, kept in ascending sklearn index order). Each glyph (0..16 scaled to [0,1])
  is upscaled by an integer factor with nearest neighbour (crisp edges, the mask stays exact) to
  `DIGITS_GLYPH` px and composited white, as max(noise, glyph), at a random position on a
  `DIGITS_CANVAS` px canvas of uniform RGB noise in [0, DIGITS_NOISE). Mask = upscaled glyph >
  DIGITS_MASK_THRESHOLD at the placed position. Placement and noise come from
  `np.random.default_rng([seed, crc32(split), sklearn_index])`: bit-identical for the same seed,
  independent of batching. `image_size` renders at that canvas size with glyph
  round(image_size * 32/72) rounded to a multiple of 8 (at least 8); no resampling. Ids
  "digits:SPLIT:NNNNN" with the sklearn index. Rendered per batch (the 8x8 glyphs are held in memory).
* folder: class names = sorted subfolder names (hidden folders and `masks` excluded); images are the
  class folder's direct files ending .jpg/.jpeg/.png (any case; other files are ignored). If PATH has
  `train` plus `test`/`val`/`validation` subfolders, each is a split with its own class folders (and
  its own `masks/`), the class sets must match; "all" is their union. Otherwise "train"/"test" is a
  per-file 80/20 split by SHA-256 of the relative path "class/file" (a file never changes split when
  others are added or removed; stratified in expectation, each class independently) and "all" is
  everything. Ids are paths relative to PATH ("cat/a.png", "train/cat/a.png"). If `masks/` exists,
  every image must have one (nonzero = object; same size as the image, else an error).
* tfds: `tfds.builder(NAME, data_dir=data_dir)` (never downloads). Image feature "image" (else the
  single Image feature that is not "segmentation_mask"), label "label" (else the single ClassLabel),
  class names from that ClassLabel. "segmentation_mask" gives masks: for oxford_iiit_pet the trimap
  (1 pet, 2 background, 3 border) becomes mask = (value == 1); for other datasets mask = nonzero; a
  mask whose size differs from its image is first resized to it (nearest).
  Datasets prepared as array_record/parquet are read with random access through
  `builder.as_data_source` and need no TensorFlow; datasets prepared as tfrecord (the `tfds build`
  default) are streamed through `builder.as_dataset`, which needs TensorFlow (GPU hidden from it) and
  cannot serve `Dataset.take`; shuffling a stream is seeded file shuffling plus a
  `TFDS_SHUFFLE_BUFFER`-example buffer. `Dataset.labels` for tfds costs one pass over the split
  that skips image decoding (done on first use). Ids "NAME:SPLIT:NNNNNNN" by position in the
  unshuffled split.

Images (folder, tfds) are centre-cropped to a square (the shorter side) and resized with PIL
bilinear to `image_size` (masks with nearest); folder images get their EXIF orientation applied.
`image_size` defaults: digits `DIGITS_CANVAS` (72), folder `DEFAULT_IMAGE_SIZE` (224), tfds the
native size when the dataset's image shape is fixed and square (cifar10: 32), else 224.
Grayscale is replicated to RGB, alpha is dropped. `normalization`: "none" ([0, 1]) or "imagenet"
((x - IMAGENET_MEAN) / IMAGENET_STD per channel).

All bad input raises `UserError` with a one-line message naming the problem and the fix.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

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


class Batch(NamedTuple):
    images: np.ndarray  # (B, H, W, 3) float32
    labels: np.ndarray  # (B,) int32
    ids: list[str]
    masks: np.ndarray | None = None  # (B, H, W) float32 in {0, 1}


# ----------------------------------------------------------------------------- spec and Dataset


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
                yield Batch(_normalize(images, self.normalization), labels, ids, masks)
            return
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        order = order[start:]
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            if drop_remainder and len(idx) < batch_size:
                break
            yield self._batch(idx)

    def take(self, indices: Sequence[int]) -> Batch:
        """The examples at `indices` (positions in the unshuffled order) as one batch."""
        if not self.random_access:
            raise UserError(f"{self.spec} is streamed from tfrecord files and has no random access: rebuild it "
                            f"with `tfds build {self.spec.split(':')[1]} --file_format=array_record`")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise UserError(f"index out of range for {self.spec} (size {len(self)})")
        return self._batch(idx)

    def validate(self) -> int:
        """Decodes every example (images and masks); raises UserError naming bad files. Returns N."""
        if hasattr(self._source, "validate"):
            return self._source.validate()
        for _ in self.batches(256):
            pass
        return len(self)

    def _batch(self, idx: np.ndarray) -> Batch:
        images, labels, masks = self._source.read(idx)
        return Batch(_normalize(images, self.normalization), labels, self._source.ids_at(idx), masks)


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
        source = _DigitsSource(_choose_split(requested, default_split, ("train", "test"), spec),
                               image_size or DIGITS_CANVAS, int(seed))
    elif kind == "folder":
        source = _FolderSource(arg, requested, default_split, image_size or DEFAULT_IMAGE_SIZE, spec)
    else:
        source = _TfdsSource(arg, requested, default_split, image_size, data_dir)
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


def _choose_split(requested: str | None, default: str, available: Sequence[str], what: str) -> str:
    if requested is not None:
        if requested not in available:
            raise UserError(f"{what} has no split {requested!r}: available splits are {', '.join(available)}")
        return requested
    for candidate in _FALLBACKS.get(default, (default,)):
        if candidate in available:
            return candidate
    raise UserError(f"{what} has no {default!r} split: pick one of {', '.join(available)}")


def _normalize(images: np.ndarray, normalization: str) -> np.ndarray:
    if normalization == "imagenet":
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        return (images - mean) / std
    return images


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_raw():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    glyphs = (d.images / 16.0).astype(np.float32)
    targets = d.target.astype(np.int32)
    train, test = train_test_split(np.arange(len(targets)), test_size=DIGITS_TEST_SIZE, stratify=targets,
                                   random_state=DIGITS_SPLIT_SEED)
    return glyphs, targets, {"train": np.sort(train), "test": np.sort(test)}


def digits_glyph_size(image_size: int) -> int:
    """Glyph size used on a canvas of `image_size` px (32 on the default 72 px canvas)."""
    if image_size == DIGITS_CANVAS:
        return DIGITS_GLYPH
    return min(max(8, int(round(image_size * DIGITS_GLYPH / DIGITS_CANVAS / 8)) * 8), image_size // 8 * 8)


class _DigitsSource:
    has_masks = True
    random_access = True
    class_names = tuple(str(i) for i in range(10))

    def __init__(self, split: str, image_size: int, seed: int):
        glyphs, targets, splits = _digits_raw()
        self.split, self.image_size, self.seed = split, int(image_size), seed
        self.spec = f"digits:{split}"
        self.glyph = digits_glyph_size(self.image_size)
        self._glyphs = glyphs
        self.orig = splits[split]
        self.n = len(self.orig)
        self.labels = targets[self.orig]
        self.labels.flags.writeable = False
        self.ids = [f"digits:{split}:{i:05d}" for i in self.orig]
        self._split_code = zlib.crc32(split.encode())

    def ids_at(self, idx):
        return [self.ids[i] for i in idx]

    def read(self, idx):
        c, g = self.image_size, self.glyph
        f = g // 8
        images = np.empty((len(idx), c, c, 3), np.float32)
        masks = np.zeros((len(idx), c, c), np.float32)
        for j, i in enumerate(idx):
            o = int(self.orig[i])
            rng = np.random.default_rng([self.seed, self._split_code, o])
            y, x = rng.integers(0, c - g + 1, size=2)
            images[j] = rng.random((c, c, 3), dtype=np.float32) * np.float32(DIGITS_NOISE)
            glyph = np.repeat(np.repeat(self._glyphs[o], f, axis=0), f, axis=1)
            region = images[j, y:y + g, x:x + g]
            np.maximum(region, glyph[:, :, None], out=region)
            masks[j, y:y + g, x:x + g] = glyph > DIGITS_MASK_THRESHOLD
        return images, self.labels[idx], masks


# ----------------------------------------------------------------------------- image helpers


def _fit(img: Image.Image, size: int, resample) -> Image.Image:
    """Centre crop to a square of the shorter side, then resize to size x size."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if s == size and (w, h) == (s, s):
        return img
    return img.resize((size, size), resample, box=(left, top, left + s, top + s))


def _rgb_array(img: Image.Image, size: int) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(_fit(img, size, Image.BILINEAR), dtype=np.float32) / np.float32(255.0)


def _mask_array(binary: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(binary.astype(np.uint8) * 255)
    return (np.asarray(_fit(img, size, Image.NEAREST)) > 127).astype(np.float32)


def _pil_from_array(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@functools.lru_cache(maxsize=1)
def _executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                                 thread_name_prefix="resnet-jax-decode")


# ----------------------------------------------------------------------------- folder


class _FolderSource:
    random_access = True

    def __init__(self, path: str, requested: str | None, default: str, image_size: int, spec: str):
        root = Path(os.path.expanduser(path)).resolve()
        if not root.exists():
            raise UserError(f"data folder {root} does not exist: check the path in {spec!r}")
        if not root.is_dir():
            raise UserError(f"{root} is not a folder: folder:PATH needs a folder of class subfolders")
        self.root, self.image_size = root, int(image_size)
        split_dirs = [d for d in ("train", "test", "val", "validation") if (root / d).is_dir()]
        if "train" in split_dirs and len(split_dirs) > 1:
            scans = {d: self._scan(root / d, f"{d}/") for d in split_dirs}
            ref = scans["train"][0]
            for d in split_dirs[1:]:
                names = scans[d][0]
                if names != ref:
                    only_train, only_other = sorted(set(ref) - set(names)), sorted(set(names) - set(ref))
                    raise UserError(f"{root}: class folders differ between train and {d} (only in train: "
                                    f"{only_train or 'none'}; only in {d}: {only_other or 'none'}): give every "
                                    f"split the same class folders")
            available = split_dirs + ["all"]
            self.split = _choose_split(requested, default, available, f"folder {root}")
            entries = [e for d in split_dirs for e in scans[d][1]] if self.split == "all" else scans[self.split][1]
            class_names = ref
        else:
            class_names, entries = self._scan(root, "")
            self.split = _choose_split(requested, default, ("train", "test", "all"), f"folder {root}")
            if self.split != "all":
                want_test = self.split == "test"
                entries = [e for e in entries if _hash_is_test(e[0]) == want_test]
        self.class_names = class_names
        self.spec = f"folder:{root}:{self.split}"
        self.n = len(entries)
        self.ids = [e[0] for e in entries]
        self.labels = np.asarray([e[1] for e in entries], dtype=np.int32)
        self.labels.flags.writeable = False
        self._masks = [e[2] for e in entries]  # path relative to the root, or None
        self.has_masks = bool(entries) and all(m is not None for m in self._masks)
        if self.n == 0:
            raise UserError(f"split {self.split!r} of {root} is empty: add images or use split 'all'")

    @staticmethod
    def _scan(root: Path, prefix: str):
        """Returns (class_names, [(id, label, mask id | None)]) of a flat class folder root; ids are
        relative to the dataset root (`prefix` is this root's path below it)."""
        classes = sorted(e.name for e in os.scandir(root)
                         if e.is_dir() and not e.name.startswith(".") and e.name != "masks")
        if not classes:
            raise UserError(f"{root} has no class subfolders: put the images in {root}/<class>/*.jpg|*.png")
        masks_root = root / "masks"
        has_masks = masks_root.is_dir()
        entries, missing = [], []
        for label, name in enumerate(classes):
            files = sorted(e.name for e in os.scandir(root / name)
                           if e.is_file() and not e.name.startswith(".")
                           and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise UserError(f"class folder {root / name} has no images (.jpg, .jpeg, .png): add images "
                                f"or remove the folder")
            mask_stems = {}
            if has_masks and (masks_root / name).is_dir():
                mask_stems = {os.path.splitext(e.name)[0]: f"{prefix}masks/{name}/{e.name}"
                              for e in os.scandir(masks_root / name)
                              if e.is_file() and e.name.lower().endswith(".png")}
            for f in files:
                mask = None
                if has_masks:
                    mask = mask_stems.get(os.path.splitext(f)[0])
                    if mask is None:
                        missing.append(f"{name}/{f}")
                entries.append((f"{prefix}{name}/{f}", label, mask))
        if missing:
            raise UserError(f"{len(missing)} image(s) under {root} have no mask, e.g. {missing[0]} needs "
                            f"{masks_root}/{os.path.splitext(missing[0])[0]}.png: add the masks or remove "
                            f"{masks_root}")
        return classes, entries

    def _decode(self, i: int):
        path = self.root / self.ids[i]
        mask_path = None if self._masks[i] is None else self.root / self._masks[i]
        try:
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                size = img.size
                image = _rgb_array(img, self.image_size)
        except Exception as e:  # PIL raises many types for bad files
            raise UserError(f"cannot read image {path} ({_one_line(e)}): fix or delete the file "
                            f"(Dataset.validate() lists every bad file)") from None
        mask = None
        if mask_path is not None:
            try:
                with Image.open(mask_path) as m:
                    m.load()
                    raw = np.asarray(m)
            except Exception as e:
                raise UserError(f"cannot read mask {mask_path} ({_one_line(e)}): fix or delete the file") from None
            if raw.shape[1::-1] != size:
                raise UserError(f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} but image {path} is "
                                f"{size[0]}x{size[1]}: a mask must have its image's size")
            binary = raw[..., :3].any(axis=-1) if raw.ndim == 3 else raw != 0
            mask = _mask_array(binary, self.image_size)
        return image, mask

    def ids_at(self, idx):
        return [self.ids[i] for i in idx]

    def read(self, idx):
        results = list(_executor().map(self._decode, [int(i) for i in idx]))
        images = np.stack([r[0] for r in results]) if results else np.zeros(
            (0, self.image_size, self.image_size, 3), np.float32)
        masks = None
        if self.has_masks:
            masks = np.stack([r[1] for r in results]) if results else np.zeros(
                (0, self.image_size, self.image_size), np.float32)
        return images, self.labels[idx], masks

    def validate(self) -> int:
        bad = []

        def check(i):
            try:
                self._decode(i)
            except UserError as e:
                return str(e)
            return None

        for msg in _executor().map(check, range(self.n)):
            if msg is not None:
                bad.append(msg)
        if bad:
            raise UserError(f"{len(bad)} of {self.n} files under {self.root} are unreadable; first: {bad[0]}"
                            + (f"; also: {'; '.join(b.split(' (')[0] for b in bad[1:5])}" if len(bad) > 1 else ""))
        return self.n


def _hash_is_test(rel: str) -> bool:
    """Per-file split by the SHA-256 of the path relative to the class root (stable when files change)."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
    return h < FOLDER_TEST_FRACTION * 2.0 ** 64


# ----------------------------------------------------------------------------- tfds


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        if getattr(e, "name", None) in ("tensorflow_datasets", None):
            raise UserError(TFDS_EXTRA_MESSAGE) from None
        raise UserError(f"{TFDS_EXTRA_MESSAGE} (importing tensorflow_datasets failed: {_one_line(e)})") from None
    return tfds


def _import_tensorflow(what: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError(f"{what} is stored as tfrecord, which needs TensorFlow to read: "
                        f"pip install 'resnet-jax[tfds]', or rebuild it without TensorFlow needs: "
                        f"tfds build {what.split(':')[1]} --file_format=array_record") from None
    try:  # keep TensorFlow off the accelerators JAX uses
        tf.config.set_visible_devices([], "GPU")
    except Exception:
        pass
    return tf


class _TfdsSource:
    def __init__(self, name: str, requested: str | None, default: str, image_size: int | None,
                 data_dir: str | None):
        tfds = _import_tfds()
        self._tfds, self.name = tfds, name
        not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except not_found:
            raise UserError(f"unknown tfds dataset {name!r}: check the name in the catalogue "
                            f"(https://www.tensorflow.org/datasets/catalog)") from None
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"cannot open tfds dataset {name!r}: {_one_line(e)[:300]}") from None
        self._builder = builder
        features = builder.info.features
        image_features = {k: f for k, f in features.items() if isinstance(f, tfds.features.Image)}
        self.mask_key = "segmentation_mask" if "segmentation_mask" in image_features else None
        if "image" in image_features:
            self.image_key = "image"
        else:
            candidates = [k for k in image_features if k != self.mask_key]
            if len(candidates) != 1:
                raise UserError(f"tfds:{name} has no single image feature (features: {', '.join(features)}): "
                                f"it is not an image classification dataset")
            self.image_key = candidates[0]
        labels = {k: f for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)}
        if "label" in labels:
            self.label_key = "label"
        elif len(labels) == 1:
            self.label_key = next(iter(labels))
        else:
            raise UserError(f"tfds:{name} has no 'label' class feature (class features: "
                            f"{', '.join(labels) or 'none'}): it is not an image classification dataset")
        self.class_names = tuple(labels[self.label_key].names)
        self._trimap = name.split("/")[0] == "oxford_iiit_pet"
        self.has_masks = self.mask_key is not None
        self._image_keys = [k for k in (self.image_key, self.mask_key) if k is not None]
        shape = getattr(image_features[self.image_key], "shape", (None, None))
        native = shape[0] if shape[0] is not None and shape[0] == shape[1] else None
        self.image_size = int(image_size or native or DEFAULT_IMAGE_SIZE)

        available = [str(s) for s in builder.info.splits.keys()]
        where = f"tfds:{name} in {builder.data_dir}"
        if available:
            self.split = _choose_split(requested, default, available, f"tfds:{name}")
        else:  # not prepared (or tfds' mock data, whose split names are unknown)
            self.split = requested or _FALLBACKS.get(default, (default,))[0]
        self.spec = f"tfds:{name}:{self.split}"
        try:
            self._ds = builder.as_data_source(split=self.split)
        except Exception as e:
            if not builder.is_prepared():
                raise UserError(f"{where} is not prepared (resnet-jax never downloads): run `tfds build {name} "
                                f"--data_dir DIR` (add --file_format=array_record to read it without TensorFlow) "
                                f"and pass that data_dir or set TFDS_DATA_DIR") from None
            if not isinstance(e, NotImplementedError):
                raise UserError(f"cannot read {where}: {_one_line(e)[:300]}") from None
            self._ds = None  # tfrecord: stream it with TensorFlow
            self._tf = _import_tensorflow(self.spec)
            info = builder.info.splits[self.split]
            self.n = int(info.num_examples)
            self._offsets = np.concatenate([[0], np.cumsum(info.shard_lengths or [])]).astype(np.int64)
        else:
            self.n = len(self._ds)
        self.random_access = self._ds is not None
        self._labels = None
        self._ids = None

    # ids and labels

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self.ids_at(range(self.n))
        return self._ids

    def ids_at(self, idx):
        return [f"{self.name}:{self.split}:{int(i):07d}" for i in idx]

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            labels = self._stream_labels() if self._ds is None else self._source_labels()
            if len(labels) != self.n:
                raise UserError(f"{self.spec}: read {len(labels)} labels but the split has {self.n} examples: "
                                f"the prepared files are incomplete, rebuild the dataset")
            labels.flags.writeable = False
            self._labels = labels
        return self._labels

    def _source_labels(self) -> np.ndarray:
        tfds = self._tfds
        try:
            src = self._builder.as_data_source(
                split=self.split, decoders={k: tfds.decode.SkipDecoding() for k in self._image_keys})
            out = [int(ex[self.label_key]) for ex in _getitems_chunks(src, self.n)]
        except Exception:
            # tfds.testing.mock_data cannot serve skipped (encoded) features: without TensorFlow it cannot
            # encode images, with it it draws invalid bounding boxes (oxford_iiit_pet). Decode fully instead
            # (a real dataset that fails here fails the same way below, with tfds' own error).
            out = [int(ex[self.label_key]) for ex in _getitems_chunks(self._ds, self.n)]
        return np.asarray(out, dtype=np.int32)

    def _stream_labels(self) -> np.ndarray:
        tfds, key = self._tfds, self.label_key
        ds = self._builder.as_dataset(split=self.split, shuffle_files=False,
                                      decoders={k: tfds.decode.SkipDecoding() for k in self._image_keys})
        ds = ds.map(lambda ex: ex[key]).batch(8192)
        parts = list(tfds.as_numpy(ds))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

    # decoding

    def _example(self, ex):
        image = ex[self.image_key]
        img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else _pil_from_array(image)
        size = img.size
        out = _rgb_array(img, self.image_size)
        mask = None
        if self.mask_key is not None:
            raw = ex[self.mask_key]
            raw = np.asarray(Image.open(io.BytesIO(raw))) if isinstance(raw, bytes) else np.asarray(raw)
            if raw.ndim == 3:
                raw = raw[:, :, 0]
            binary = raw == 1 if self._trimap else raw != 0
            if binary.shape[::-1] != size:  # not in real datasets; tfds' mock data draws shapes independently
                binary = np.asarray(Image.fromarray(binary).resize(size, Image.NEAREST))
            mask = _mask_array(binary, self.image_size)
        return out, int(ex[self.label_key]), mask

    def read(self, idx):
        idx = [int(i) for i in idx]
        examples = _get_many(self._ds, idx)
        results = [self._example(ex) for ex in examples]
        s = self.image_size
        images = np.stack([r[0] for r in results]) if results else np.zeros((0, s, s, 3), np.float32)
        labels = np.asarray([r[1] for r in results], dtype=np.int32)
        masks = None
        if self.has_masks:
            masks = np.stack([r[2] for r in results]) if results else np.zeros((0, s, s), np.float32)
        return images, labels, masks

    def stream(self, batch_size: int, start: int, shuffle: bool, seed: int, drop_remainder: bool):
        tfds, tf = self._tfds, self._tf
        keys = [self.label_key, *self._image_keys]
        split = f"{self.split}[{start}:]" if start and not shuffle else self.split
        read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=int(seed) if shuffle else None)
        ds = self._builder.as_dataset(split=split, shuffle_files=bool(shuffle), read_config=read_config,
                                      decoders={k: tfds.decode.SkipDecoding() for k in self._image_keys})
        ds = ds.map(lambda ex: {k: ex[k] for k in keys + ["tfds_id"]})
        if shuffle:
            ds = ds.shuffle(TFDS_SHUFFLE_BUFFER, seed=int(seed), reshuffle_each_iteration=False)
            if start:
                ds = ds.skip(start)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        position = start
        s = self.image_size
        for raw in tfds.as_numpy(ds):
            n = len(raw[self.label_key])
            examples = [{k: raw[k][j] for k in keys} for j in range(n)]
            results = list(_executor().map(self._example, examples))
            ids = [self._stream_id(t, None if shuffle else position + j) for j, t in enumerate(raw["tfds_id"])]
            position += n
            images = np.stack([r[0] for r in results]) if results else np.zeros((0, s, s, 3), np.float32)
            labels = np.asarray([r[1] for r in results], dtype=np.int32)
            masks = np.stack([r[2] for r in results]) if self.has_masks else None
            yield images, labels, ids, masks

    def _stream_id(self, tfds_id: bytes, position: int | None) -> str:
        text = tfds_id.decode() if isinstance(tfds_id, bytes) else str(tfds_id)
        m = re.search(r"-(\d+)-of-(\d+)__(\d+)$", text)
        if m and int(m.group(2)) == len(self._offsets) - 1:
            return f"{self.name}:{self.split}:{int(self._offsets[int(m.group(1))]) + int(m.group(3)):07d}"
        if position is not None:
            return f"{self.name}:{self.split}:{position:07d}"
        return f"{self.name}:{self.split}:{text}"


def _get_many(src, idx: list[int]) -> list:
    getitems = getattr(src, "__getitems__", None)  # batched (parallel) array_record reads
    if getitems is not None:
        try:
            return list(getitems(idx))
        except TypeError:  # tfds.testing.mock_data's data source has an unbound __getitems__
            pass
    return [src[i] for i in idx]


def _getitems_chunks(src, n: int, chunk: int = 1024):
    for b in range(0, n, chunk):
        yield from _get_many(src, list(range(b, min(n, b + chunk))))
