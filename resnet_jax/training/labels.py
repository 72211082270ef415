"""Edits of the training labels: injected noise, relabelled and removed images.

`LabelEdits` says what to change; `apply(dataset, edits)` returns a view of the data set with the
edited labels (and without the removed images) plus a JSON record of what changed, which the
trainer stores in the checkpoint metadata (`meta["label_edits"]`). `given_labels` reads that
record back: the labels a model was trained with, and which images were flipped on purpose.

Noise (`noise_rate` r, `noise_seed`, `noise_kind`): exactly round(r * N) images, drawn without
replacement by numpy's default_rng(noise_seed), get another label:
    symmetric  a uniformly chosen other class (label + U{1, ..., C-1} mod C);
    pairs      a fixed partner per class, the next one (label + 1 mod C), the pair flipping of
               Han et al. (2018, Co-teaching).
Noise is drawn on the whole split first, so a run that also relabels or removes images (the
cleaned retraining, the K-fold models) keeps the very same noisy labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resnet_jax.core.data.dataset import batch_indices
from resnet_jax.errors import UserError

NOISE_KINDS = ("symmetric", "pairs")
HELD_OUT_SPLITS = ("test", "validation", "val")


@dataclass(frozen=True)
class LabelEdits:
    """What to change in the training labels; `relabel` pairs (image id, new label); `remove` drops
    images from the training set; `mask` keeps images in their batches with zero weight in the loss
    (a removal that leaves every batch as it was: same images, same order)."""

    noise_rate: float = 0.0
    noise_seed: int = 0
    noise_kind: str = "symmetric"
    relabel: tuple[tuple[str, int], ...] = ()
    remove: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0 <= self.noise_rate < 1:
            raise UserError(f"--label-noise must be in [0, 1), got {self.noise_rate}: it is the fraction of "
                            f"training labels to flip")
        if self.noise_kind not in NOISE_KINDS:
            raise UserError(f"unknown noise kind {self.noise_kind!r}: choose one of {', '.join(NOISE_KINDS)}")
        if self.noise_seed < 0:
            raise UserError(f"--noise-seed must be a non-negative integer, got {self.noise_seed}")

    @property
    def empty(self) -> bool:
        return self.noise_rate == 0 and not self.relabel and not self.remove and not self.mask


def inject_noise(labels, num_classes: int, rate: float, seed: int = 0, kind: str = "symmetric"):
    """Returns (noisy labels (N,) int32, flipped indices (M,) ascending), M = round(rate * N)."""
    edits = LabelEdits(noise_rate=rate, noise_seed=seed, noise_kind=kind)  # validates the arguments
    labels = np.asarray(labels, np.int64).reshape(-1)
    if num_classes < 2 and rate > 0:
        raise UserError("label noise needs at least two classes")
    rng = np.random.default_rng(edits.noise_seed)
    flipped = np.sort(rng.choice(labels.size, int(round(rate * labels.size)), replace=False))
    step = rng.integers(1, num_classes, flipped.size) if kind == "symmetric" else np.ones(flipped.size, np.int64)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + step) % num_classes
    return noisy.astype(np.int32), flipped


def apply(ds, edits: LabelEdits | None):
    """Returns (view, record): `ds` with the edited labels and without the removed images, and the
    JSON record of the edits (None, with `ds` itself, when there are none); masked images stay in
    the view, named by record["masked"] (`masked_rows`)."""
    if edits is None or edits.empty:
        return ds, None
    if edits.noise_rate > 0 and ds.split in HELD_OUT_SPLITS:
        raise UserError(f"--label-noise was asked on {ds.spec}, a held-out split: inject noise into the "
                        f"training split only (e.g. digits:train)")
    ids = list(ds.ids)
    original = np.asarray(ds.labels, np.int32)
    labels, flipped = inject_noise(original, ds.num_classes, edits.noise_rate, edits.noise_seed, edits.noise_kind)
    record = {"noise": {"rate": edits.noise_rate, "seed": edits.noise_seed, "kind": edits.noise_kind,
                        "ids": [ids[i] for i in flipped], "original": original[flipped].tolist(),
                        "given": labels[flipped].tolist()}}
    position = {image_id: i for i, image_id in enumerate(ids)}
    if edits.relabel:
        where = [_position(position, image_id, ds) for image_id, _ in edits.relabel]
        new = np.asarray([label for _, label in edits.relabel], np.int64)
        if new.min() < 0 or new.max() >= ds.num_classes:
            raise UserError(f"relabelled class outside [0, {ds.num_classes}): pass labels of {ds.spec}")
        record["relabel"] = {"ids": [image_id for image_id, _ in edits.relabel], "before": labels[where].tolist(),
                             "given": new.tolist()}
        labels[where] = new
    keep = np.arange(len(ids))
    if edits.remove:
        removed = {_position(position, image_id, ds) for image_id in edits.remove}
        keep = np.asarray([i for i in keep if i not in removed], np.int64)
        if keep.size == 0:
            raise UserError(f"removing {len(removed)} images leaves none of {ds.spec} to train on")
        record["removed"] = sorted(edits.remove)
    if edits.mask:
        for image_id in edits.mask:
            _position(position, image_id, ds)
        record["masked"] = sorted(edits.mask)
    return LabelView(ds, keep, labels[keep]), record


def masked_rows(ds, record: dict | None) -> np.ndarray | None:
    """Returns a (N,) bool array marking the images of `ds` that `record` masks, or None."""
    if not record or not record.get("masked"):
        return None
    return np.isin(np.asarray(ds.ids), np.asarray(record["masked"]))


def _position(position: dict, image_id: str, ds) -> int:
    if image_id not in position:
        raise UserError(f"image {image_id!r} is not in {ds.spec}: pass ids of that data set")
    return position[image_id]


def given_labels(ds, record: dict | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Returns (labels the model was trained with (N,), flipped mask (N,) or None, original labels (N,)
    or None) for the images of `ds`, from a checkpoint's `label_edits` record. Raises UserError when
    the recorded original labels disagree with the data's (another data set than the training one)."""
    labels = np.asarray(ds.labels, np.int32).copy()
    if not record:
        return labels, None, None
    position = {image_id: i for i, image_id in enumerate(ds.ids)}
    original = labels.copy()
    flipped = np.zeros(labels.size, bool)
    for part in ("noise", "relabel"):
        entry = record.get(part)
        if not entry:
            continue
        present = [(position[i], g) for i, g in zip(entry["ids"], entry["given"]) if i in position]
        if part == "noise":
            if len(present) != len(entry["ids"]):
                raise UserError(f"{len(entry['ids']) - len(present)} of the images the checkpoint flipped are "
                                f"not in {ds.spec}: pass the data the checkpoint was trained on")
            where = np.asarray([p for p, _ in present], np.int64)
            if where.size and not np.array_equal(labels[where], np.asarray(entry["original"])):
                raise UserError(f"the labels of {ds.spec} differ from those the checkpoint was trained on: "
                                f"pass the checkpoint's training data")
            flipped[where] = True
        for p, g in present:
            labels[p] = g
    return labels, (flipped if record.get("noise") else None), (original if record.get("noise") else None)


class LabelView:
    """A data set with replaced labels, optionally restricted to some of its images (`indices`, in
    the data set's unshuffled order); it batches like `data.Dataset` and delegates the rest."""

    def __init__(self, ds, indices, labels):
        self._ds = ds
        self._indices = np.asarray(indices, np.int64)
        self._labels = np.asarray(labels, np.int32)
        self._whole = self._indices.size == len(ds) and np.array_equal(self._indices, np.arange(len(ds)))
        if not self._whole and not ds.random_access:
            raise UserError(f"{ds.spec} is streamed and has no random access: removing images needs an "
                            f"array_record build (tfds build --file_format=array_record)")

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def __len__(self) -> int:
        return int(self._indices.size)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def ids(self) -> list[str]:
        ids = self._ds.ids
        return [ids[i] for i in self._indices]

    def take(self, indices, redraw: int | None = None):
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise UserError(f"index out of range for {self.spec} (size {len(self)})")
        return self._ds.take(self._indices[idx], redraw=redraw)._replace(labels=self._labels[idx])

    def batches(self, batch_size: int, *, start: int = 0, shuffle: bool = False, seed: int = 0,
                drop_remainder: bool = False):
        """Yields batches as `data.Dataset.batches` does (the same seeded order over len(self) images)."""
        if not self._ds.random_access:  # the whole set, streamed: replace the labels by id
            label_of = dict(zip(self._ds.ids, self._labels))
            for batch in self._ds.batches(batch_size, start=start, shuffle=shuffle, seed=seed,
                                          drop_remainder=drop_remainder):
                yield batch._replace(labels=np.asarray([label_of[i] for i in batch.ids], np.int32))
            return
        for idx in batch_indices(len(self), batch_size, start, shuffle, seed, drop_remainder):
            yield self.take(idx)
