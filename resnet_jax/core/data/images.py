"""Image helpers of the sources: centre crop and resize, RGB and mask arrays, a decoding pool."""
from __future__ import annotations

import concurrent.futures
import functools
import os

import numpy as np
from PIL import Image

def fit(img: Image.Image, size: int, resample) -> Image.Image:
    """Centre crop to a square of the shorter side, then resize to size x size."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if s == size and (w, h) == (s, s):
        return img
    return img.resize((size, size), resample, box=(left, top, left + s, top + s))


def rgb_array(img: Image.Image, size: int) -> np.ndarray:
    """Returns (size, size, 3) float32 in [0, 1]; 16-bit greyscale is scaled by 65535 (PIL's RGB conversion
    would clip it at 255)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = fit(Image.fromarray(np.asarray(img, dtype=np.float32) / np.float32(65535.0)), size, Image.BILINEAR)
        return np.repeat(np.clip(np.asarray(grey, np.float32), 0, 1)[..., None], 3, axis=-1)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(fit(img, size, Image.BILINEAR), dtype=np.float32) / np.float32(255.0)


def mask_array(binary: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(binary.astype(np.uint8) * 255)
    return (np.asarray(fit(img, size, Image.NEAREST)) > 127).astype(np.float32)


def pil_from_array(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@functools.lru_cache(maxsize=1)
def executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                                 thread_name_prefix="resnet-jax-decode")
