"""Helpers shared by the tests: the CLI run in-process, a tiny image folder, float64 in jax.

Random weights come from `resnet_jax.bench.random_variables` (the project's one helper)."""
import contextlib
import os

import jax
import numpy as np
from PIL import Image

from resnet_jax.cli import main


def assert_one_line_error(code, err, *fragments):
    """Asserts exit code 2 and one stderr line "error: ..." holding every fragment, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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


@contextlib.contextmanager
def float64():
    """Enables jax float64 inside the block, restoring the previous setting afterwards."""
    old = jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def per_sample_grads(model, variables, images, labels, paths):
    """Per-sample jax.grad loop of the cross-entropy: flat gradients (N, D) float64 over the parameter
    `paths` ("layer4_1/bn2/scale", ...) in their order; an independent reference for the engines."""
    from resnet_jax.core import models

    def loss(v, image, label):
        logits, _ = models.apply(model, v, image[None])
        return -jax.nn.log_softmax(logits[0])[label]

    grad = jax.jit(jax.grad(loss))
    rows = []
    for image, label in zip(images, labels):
        g = grad(variables, jax.numpy.asarray(image), int(label))
        flat = []
        for path in paths:
            leaf = g["params"]
            for part in path.split("/"):
                leaf = leaf[part]
            flat.append(np.asarray(leaf, np.float64).ravel())
        rows.append(np.concatenate(flat))
    return np.asarray(rows)
