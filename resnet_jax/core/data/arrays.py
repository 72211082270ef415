"""In-memory images as a source (`Dataset.from_arrays`): a notebook's numpy arrays behind the same
interface as the digits, folder and tfds sources."""
from __future__ import annotations

import numpy as np

from resnet_jax.errors import UserError


def unit_float(images) -> np.ndarray:
    """Returns images as float32 in [0, 1]: uint8 pixels divided by 255, floats checked to be finite
    and in [0, 1]; raises UserError for any other dtype or range."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"images must be uint8 or float, got {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise UserError(f"float images must be finite and in [0, 1], got [{x.min():.3g}, {x.max():.3g}]: "
                        f"divide uint8 pixels by 255 (or pass the uint8 array)")
    return x


class ArraySource:
    """Images (N, H, W, 3) uint8 or floats in [0, 1], labels (N,), optional ids and masks (N, H, W)."""

    random_access = True
    split = "arrays"
    spec = "arrays"

    def __init__(self, images, labels, class_names=None, ids=None, masks=None):
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
            raise UserError(f"images must be square RGB (N, H, H, 3), got shape {x.shape}: crop or resize them")
        x = unit_float(x)
        y = np.asarray(labels)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"labels must be (N,) integers for the {len(x)} images, got {y.dtype} {y.shape}")
        k = int(y.max()) + 1 if len(y) else 0
        if class_names is None:
            class_names = [str(c) for c in range(k)]
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise UserError(f"labels must be in [0, {len(class_names)}) for {len(class_names)} class names, "
                            f"got [{y.min()}, {y.max()}]")
        ids = [f"arrays:{i:06d}" for i in range(len(x))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(x) or len(set(ids)) != len(ids):
            raise UserError(f"ids must be {len(x)} unique strings, one per image")
        if masks is not None:
            masks = (np.asarray(masks) > 0).astype(np.float32)
            if masks.shape != x.shape[:3]:
                raise UserError(f"masks must be (N, H, W) = {x.shape[:3]}, got {masks.shape}")
        self._images, self._masks = x, masks
        self.labels = y.astype(np.int32)
        self.labels.flags.writeable = False
        self.class_names = tuple(str(c) for c in class_names)
        self.ids = ids
        self.n = len(x)
        self.image_size = int(x.shape[1])
        self.has_masks = masks is not None

    def ids_at(self, idx):
        return [self.ids[i] for i in idx]

    def read(self, idx):
        idx = np.asarray(idx, np.int64)
        return (self._images[idx], self.labels[idx], None if self._masks is None else self._masks[idx])
