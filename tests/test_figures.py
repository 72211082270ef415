"""Tests for clustering.figures: PNGs are written atomically, readable and of a sensible size."""

import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest

from resnet_jax.plots import image_grid, pca_grid


def small_reps(n=30, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    reps = {
        "GW": rng.standard_normal((n, 20)) + 5 * np.eye(3, 20)[y],
        "FM": rng.standard_normal((n, 8)),
        "P": rng.standard_normal((n, 2)),  # used as coordinates as is
    }
    kmeans = {name: y for name in reps}
    gmm = {name: (y + 1) % 3 for name in reps}
    return reps, y, kmeans, gmm


def read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_pca_grid_writes_a_png(tmp_path):
    reps, y, kmeans, gmm = small_reps()
    out = tmp_path / "grid.png"
    assert pca_grid(reps, y, kmeans, gmm, out, title="test", class_names=["a", "b", "c"]) == str(out)
    pixels = read_png(out)
    # 3 columns x 3 rows of 3.2-inch panels at 100 dpi
    assert pixels.shape[0] == pixels.shape[1] == 960 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left


def test_pca_grid_rejects_mismatched_input(tmp_path):
    reps, y, kmeans, gmm = small_reps()
    with pytest.raises(ValueError, match="gmm_labels keys"):
        pca_grid(reps, y, kmeans, {"GW": y}, tmp_path / "grid.png")
    with pytest.raises(ValueError, match="rows"):
        pca_grid(reps, y[:-1], kmeans, gmm, tmp_path / "grid.png")
    with pytest.raises(ValueError, match=".png"):
        pca_grid(reps, y, kmeans, gmm, tmp_path / "grid.jpg")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_an_error_and_nothing_is_created(tmp_path):
    reps, y, kmeans, gmm = small_reps()
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="does not exist"):
        pca_grid(reps, y, kmeans, gmm, missing / "grid.png")
    with pytest.raises(ValueError, match="does not exist"):
        image_grid(np.zeros((2, 4, 4, 3)), [0, 1], ["a", "b"], missing / "images.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "images.png"
    out.write_bytes(b"old")

    def broken_savefig(self, fname, **kwargs):
        fname.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        image_grid(np.zeros((2, 4, 4, 3)), [0, 1], ["a", "b"], out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["images.png"]


def test_image_grid_rows_per_class_and_overlays(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-5, 300, (7, 8, 8, 3))  # any range: min-max scaled per image
    labels = np.array([2, 0, 2, 2, 0, 5, 2])  # three classes present -> three rows
    names = [f"class {i}" for i in range(6)]
    plain = read_png(image_grid(images, labels, names, tmp_path / "plain.png", per_class=3))
    # 3 cells of 1.1 in + 1 in for the row names, 3 rows of 1.1 in, at 100 dpi
    assert plain.shape[:2] == (330, 430)

    overlays = np.zeros((7, 8, 8))
    overlays[:, :4] = 1.0
    with_maps = read_png(image_grid(images, labels, names, tmp_path / "cam.png", per_class=3, overlays=overlays))
    assert with_maps.shape == plain.shape and np.abs(with_maps - plain).max() > 0.1

    grey = read_png(image_grid(images[..., :1], labels, names, tmp_path / "grey.png", per_class=2, title="grey"))
    assert grey.shape[:2] == (370, 320)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.png", "grey.png", "plain.png"]


def test_image_grid_rejects_bad_input(tmp_path):
    images = np.zeros((2, 4, 4, 3))
    out = tmp_path / "images.png"
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        image_grid(np.zeros((2, 4, 4)), [0, 1], ["a", "b"], out)
    with pytest.raises(ValueError, match="class_names has 1 names"):
        image_grid(images, [0, 1], ["a"], out)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_grid(images, [0, 1], ["a", "b"], out, overlays=np.full((2, 4, 4), 2.0))
    with pytest.raises(ValueError, match="overlays must have shape"):
        image_grid(images, [0, 1], ["a", "b"], out, overlays=np.zeros((2, 3, 3)))
    assert list(tmp_path.iterdir()) == []
