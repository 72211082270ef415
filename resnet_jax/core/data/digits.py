"""The embedded `digits` source: scikit-learn's 8x8 digits on a seeded noisy canvas, with masks."""
from __future__ import annotations

import functools
import zlib

import numpy as np

from resnet_jax.core.data.spec import (DIGITS_CANVAS, DIGITS_GLYPH, DIGITS_MASK_THRESHOLD, DIGITS_NOISE,
                                       DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE)



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


class DigitsSource:
    has_masks = True
    random_access = True
    redrawable = True
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

    def read(self, idx, redraw: int | None = None):
        """Returns (images (B, C, C, 3), labels (B,), masks (B, C, C)) of the examples at `idx`; `redraw` k
        renders each glyph afresh (another position and noise, drawn from its own seed and k)."""
        c, g = self.image_size, self.glyph
        f = g // 8
        images = np.empty((len(idx), c, c, 3), np.float32)
        masks = np.zeros((len(idx), c, c), np.float32)
        variant = [] if redraw is None else [1, int(redraw)]
        for j, i in enumerate(idx):
            o = int(self.orig[i])
            rng = np.random.default_rng([self.seed, self._split_code, o, *variant])
            y, x = rng.integers(0, c - g + 1, size=2)
            images[j] = rng.random((c, c, 3), dtype=np.float32) * np.float32(DIGITS_NOISE)
            glyph = np.repeat(np.repeat(self._glyphs[o], f, axis=0), f, axis=1)
            region = images[j, y:y + g, x:x + g]
            np.maximum(region, glyph[:, :, None], out=region)
            masks[j, y:y + g, x:x + g] = glyph > DIGITS_MASK_THRESHOLD
        return images, self.labels[idx], masks
