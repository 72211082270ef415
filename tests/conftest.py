"""Shared fixtures: a tiny image folder and a checkpoint trained on it (small, fast on 2 CPU cores)."""
import contextlib
import os

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import models
from resnet_jax.cli import main


def run_cli(argv, capsys):
    """Runs the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def make_folder(root, classes=("circle", "square", "cross"), per_class=10, size=24, seed=0):
    """Writes PATH/<class>/*.png with a simple shape per class; returns the path."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(per_class):
            cy, cx = rng.integers(7, size - 7, 2)
            if c == 0:
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
            elif c == 1:
                shape = (abs(yy - cy) < 4) & (abs(xx - cx) < 4)
            else:
                shape = (abs(yy - cy) < 1.5) | (abs(xx - cx) < 1.5)
            img = rng.random((size, size, 3)) * 0.2 + shape[..., None] * 0.8
            Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(root, name, f"{k:03d}.png"))
    return str(root)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_folder, tmp_path_factory):
    """A resnet18 (small stem, 24 px) trained for one epoch on tiny_folder."""
    from resnet_jax import train

    out = str(tmp_path_factory.mktemp("ckpt") / "r18")
    config = train.TrainConfig(model="resnet18", data=f"folder:{tiny_folder}", epochs=1, batch_size=8,
                               stem="small", image_size=24)
    train.fit(config, out, progress=False, log=lambda s: None)
    return out


def random_variables(model, size, seed=0):
    """Returns seeded random variables (He-scaled kernels, BatchNorm scale/var in [0.5, 1.5]) for `model`."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if "kernel" in name and len(shape) == 4:
            value = rng.normal(size=shape) * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
        elif "kernel" in name:
            value = rng.normal(size=shape) / np.sqrt(shape[0])
        elif "scale" in name or "var" in name:
            value = rng.uniform(0.5, 1.5, size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        return np.asarray(value, np.float32)

    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(model, size))


@contextlib.contextmanager
def float64():
    """Enables jax float64 inside the block, restoring the previous setting afterwards."""
    old = jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)
