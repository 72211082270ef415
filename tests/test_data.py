"""Tests of resnet_jax.data: the digits, folder and tfds sources behind one interface.

tfds is tested with tfds' own `mock_data` and with a tiny builder prepared into tmp (array_record,
readable without TensorFlow; tfrecord, streamed with TensorFlow). Those tests skip only when
tensorflow-datasets (or, for tfrecord, tensorflow) is not importable; CI installs the tfds extra.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_jax.core import data
from resnet_jax.errors import UserError

HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tfds = pytest.mark.skipif(not HAS_TFDS, reason="tensorflow-datasets not installed (extra: resnet-jax[tfds])")
needs_tf = pytest.mark.skipif(not (HAS_TFDS and HAS_TF),
                              reason="tensorflow not installed (extra: resnet-jax[tfds]); needed for tfrecord")
ROOT = Path(__file__).resolve().parents[1]


def collect(ds, batch_size=64, **kw):
    """Concatenates every batch: (images, labels, ids, masks or None, number of batches)."""
    batches = list(ds.batches(batch_size, **kw))
    images = np.concatenate([b.images for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    ids = [i for b in batches for i in b.ids]
    masks = np.concatenate([b.masks for b in batches]) if batches and batches[0].masks is not None else None
    return images, labels, ids, masks, len(batches)


def run_hidden(code: str, hidden: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter in which the top-level packages `hidden` cannot be found."""
    prelude = textwrap.dedent(f"""
        import importlib.machinery as _m, sys
        _HIDDEN = {set(hidden)!r}
        class _Hide:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name.split(".")[0] in _HIDDEN:
                    return None
                return _m.PathFinder.find_spec(name, path, target)
            @staticmethod
            def invalidate_caches():
                _m.PathFinder.invalidate_caches()
        sys.meta_path[:] = [_Hide if f is _m.PathFinder else f for f in sys.meta_path]
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# ----------------------------------------------------------------------------- spec grammar


@pytest.mark.parametrize("spec, expected", [
    ("digits", ("digits", None, None)),
    ("digits:train", ("digits", None, "train")),
    ("folder:/data/pets", ("folder", "/data/pets", None)),
    ("folder:/data/pets:val", ("folder", "/data/pets", "val")),
    ("folder:rel/dir", ("folder", "rel/dir", None)),
    ("tfds:imagenette", ("tfds", "imagenette", None)),
    ("tfds:imagenette/320px-v2:validation", ("tfds", "imagenette/320px-v2", "validation")),
])
def test_parse_spec(spec, expected):
    assert data.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "mnist", "digits:a:b", "folder:", "tfds:", "tfds:mnist:3.0.1:train",
                                  "tfds:mnist:train[:10%]", "cifar:train"])
def test_parse_spec_rejects(spec):
    with pytest.raises(UserError):
        data.parse_spec(spec)


def test_folder_spec_with_colon_in_existing_path(tmp_path):
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert data.parse_spec(f"folder:{odd}") == ("folder", str(odd), None)


# ----------------------------------------------------------------------------- digits


def test_digits_split_sizes_stratified_and_labelled():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train = data.load("digits", default_split="train")
    test = data.load("digits")
    assert (train.spec, test.spec) == ("digits:train", "digits:test")
    assert (len(train), len(test)) == (1257, 540)
    assert train.class_names == tuple("0123456789") and train.num_classes == 10
    index = {s: [int(i.rsplit(":", 1)[1]) for i in ds.ids] for s, ds in (("train", train), ("test", test))}
    assert not set(index["train"]) & set(index["test"])
    assert sorted(index["train"] + index["test"]) == list(range(1797))
    assert len(set(test.ids)) == 540 and test.ids[0].startswith("digits:test:")
    np.testing.assert_array_equal(test.labels, target[index["test"]])
    np.testing.assert_array_equal(train.labels, target[index["train"]])
    for c in range(10):  # stratified: every class keeps its 30 % share within one example
        assert abs(np.sum(test.labels == c) - 0.3 * np.sum(target == c)) <= 1
    assert test.labels.dtype == np.int32


def test_digits_deterministic_by_seed_and_independent_of_batching():
    a = data.load("digits", seed=0).take(range(30))
    b = data.load("digits", seed=0).take(range(30))
    c = data.load("digits", seed=1).take(range(30))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.images.dtype == np.float32 and a.images.shape == (30, 72, 72, 3)

    def corner(masks):
        return [tuple(np.argwhere(m > 0).min(axis=0)) for m in masks]

    moved = sum(p != q for p, q in zip(corner(a.masks), corner(c.masks)))
    assert moved >= 25, "a different seed must place most glyphs elsewhere"
    assert not np.array_equal(a.images, c.images)
    one = data.load("digits", seed=0).take([17])
    np.testing.assert_array_equal(one.images[0], a.images[17])
    train_first = data.load("digits:train", seed=0).take([0])
    assert train_first.ids[0] != a.ids[0]


def test_digits_masks_cover_the_glyph():
    from sklearn.datasets import load_digits

    glyphs = load_digits().images / 16.0
    ds = data.load("digits")
    batch = ds.take(range(40))
    for image, mask, ident in zip(batch.images, batch.masks, batch.ids):
        gray = image.mean(axis=-1)
        on, off = gray[mask == 1], gray[mask == 0]
        assert on.mean() > off.mean() + 0.5
        assert on.min() > data.DIGITS_MASK_THRESHOLD and off.max() <= 1.0
        ink = np.sum(glyphs[int(ident.rsplit(":", 1)[1])] > data.DIGITS_MASK_THRESHOLD)
        assert mask.sum() == ink * (data.DIGITS_GLYPH // 8) ** 2  # nearest 4x upscale: 16 px per glyph pixel
        ys, xs = np.nonzero(mask)
        assert ys.max() - ys.min() < data.DIGITS_GLYPH and xs.max() - xs.min() < data.DIGITS_GLYPH
        assert set(np.unique(mask)) <= {0.0, 1.0}
    noise_only = batch.images[batch.masks == 0]
    assert noise_only.min() >= 0.0
    assert np.quantile(noise_only, 0.9) < 0.2  # background is low-amplitude noise


@pytest.mark.parametrize("size, glyph", [(32, 16), (224, 96), (8, 8)])
def test_digits_render_at_requested_canvas(size, glyph):
    from sklearn.datasets import load_digits

    glyphs = load_digits().images / 16.0
    assert data.digits_glyph_size(size) == glyph
    ds = data.load("digits:train", image_size=size)
    assert ds.image_size == size
    batch = ds.take([0, 1, 2])
    assert batch.images.shape == (3, size, size, 3) and batch.masks.shape == (3, size, size)
    for mask, ident in zip(batch.masks, batch.ids):
        ink = np.sum(glyphs[int(ident.rsplit(":", 1)[1])] > data.DIGITS_MASK_THRESHOLD)
        assert mask.sum() == ink * (glyph // 8) ** 2


def test_normalization_none_and_imagenet():
    plain = data.load("digits").take(range(5)).images
    assert plain.min() >= 0.0 and plain.max() <= 1.0 and plain.max() > 0.9
    net = data.load("digits", normalization="imagenet").take(range(5)).images
    assert net.dtype == np.float32
    r, g, b = plain[..., 0], plain[..., 1], plain[..., 2]
    np.testing.assert_allclose(net[..., 0], (r - 0.485) / 0.229, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net[..., 1], (g - 0.456) / 0.224, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net[..., 2], (b - 0.406) / 0.225, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="normalization"):
        data.load("digits", normalization="zscore")


def test_start_shuffle_and_drop_remainder():
    ds = data.load("digits")
    images, labels, ids, masks, _ = collect(ds, 64)
    np.testing.assert_array_equal(labels, ds.labels)
    assert ids == ds.ids
    part = collect(ds, 50, start=123)
    np.testing.assert_array_equal(part[0], images[123:])
    np.testing.assert_array_equal(part[1], labels[123:])
    np.testing.assert_array_equal(part[3], masks[123:])
    assert part[2] == ids[123:]
    assert collect(ds, 64, start=len(ds) - 1)[2] == ids[-1:]
    assert list(ds.batches(64, start=len(ds))) == []

    shuffled = collect(ds, 64, shuffle=True, seed=3)
    assert sorted(shuffled[2]) == sorted(ids) and shuffled[2] != ids
    assert collect(ds, 100, shuffle=True, seed=3)[2] == shuffled[2]
    assert collect(ds, 64, shuffle=True, seed=4)[2] != shuffled[2]
    assert collect(ds, 64, shuffle=True, seed=3, start=500)[2] == shuffled[2][500:]
    by_id = dict(zip(ids, labels))
    assert [by_id[i] for i in shuffled[2]] == list(shuffled[1])

    full, _, _, _, n = collect(ds, 100, drop_remainder=True)
    assert n == 5 and len(full) == 500
    assert collect(ds, 100)[4] == 6
    for bad in ({"start": -1}, {"start": len(ds) + 1}):
        with pytest.raises(UserError):
            next(ds.batches(8, **bad))
    with pytest.raises(UserError):
        ds.batches(0)  # raised at the call


def test_split_choice_and_errors():
    with pytest.raises(UserError, match="train, test"):
        data.load("digits:validation")
    with pytest.raises(UserError, match="give only one"):
        data.load("digits:train", split="test")
    assert data.load("digits", split="train").split == "train"
    assert data.load("digits", default_split="validation").split == "test"
    with pytest.raises(UserError):
        data.load("digits", image_size=4)
    with pytest.raises(UserError):
        data.load("digits", seed=-1)


# ----------------------------------------------------------------------------- folder


def write_image(path: Path, array: np.ndarray, **save_kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kw)


def solid(w, h, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


@pytest.fixture
def pets(tmp_path):
    """cat: RGB PNG 40x30, grayscale JPG 25x50 (upper-case extension), RGB JPEG 30x30; dog: grayscale
    PNG 20x20, RGB JPG 64x48; plus files that are not images, and masks for every image."""
    root = tmp_path / "pets"
    write_image(root / "cat" / "a.png", solid(40, 30, (250, 10, 10)))
    write_image(root / "cat" / "b.JPG", np.full((50, 25), 128, np.uint8), quality=95)
    write_image(root / "cat" / "c.jpeg", solid(30, 30, (10, 250, 10)), quality=95)
    write_image(root / "dog" / "d.png", np.full((20, 20), 30, np.uint8))
    write_image(root / "dog" / "e.jpg", solid(64, 48, (10, 10, 250)), quality=95)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    for rel, (w, h) in {"cat/a": (40, 30), "cat/b": (25, 50), "cat/c": (30, 30), "dog/d": (20, 20),
                        "dog/e": (64, 48)}.items():
        m = np.zeros((h, w), np.uint8)
        m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        write_image(root / "masks" / f"{rel}.png", m)
    return root


def test_folder_all_split_decodes_every_kind(pets):
    ds = data.load(f"folder:{pets}", split="all", image_size=16)
    assert ds.spec == f"folder:{pets.resolve()}:all" and ds.split == "all"
    assert ds.class_names == ("cat", "dog") and ds.has_masks
    assert ds.ids == ["cat/a.png", "cat/b.JPG", "cat/c.jpeg", "dog/d.png", "dog/e.jpg"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1])
    images, labels, ids, masks, _ = collect(ds, 2)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.float32
    assert masks.shape == (5, 16, 16) and set(np.unique(masks)) <= {0.0, 1.0}
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_allclose(images[0], np.broadcast_to([250 / 255, 10 / 255, 10 / 255], (16, 16, 3)), atol=1e-6)
    gray = images[1]  # grayscale JPG replicated to three equal channels
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert abs(gray.mean() - 128 / 255) < 0.02
    np.testing.assert_allclose(images[4].mean(axis=(0, 1)), [10 / 255, 10 / 255, 250 / 255], atol=0.03)
    for m in masks:  # centred half-size rectangles survive the centre crop
        assert 0.15 < m.mean() < 0.6 and m[8, 8] == 1 and m[0, 0] == 0
    np.testing.assert_array_equal(labels, ds.labels)
    np.testing.assert_allclose(data.load(f"folder:{pets}:all", image_size=16, normalization="imagenet")
                               .take([0]).images[0, 0, 0], (np.array([250, 10, 10]) / 255 - data.IMAGENET_MEAN)
                               / data.IMAGENET_STD, rtol=1e-5)


def test_folder_centre_crop_then_resize(tmp_path):
    root = tmp_path / "crop"
    wide = solid(60, 20, (255, 0, 0))
    wide[:, 20:40] = (0, 255, 0)  # only the centre 20x20 square is green
    write_image(root / "x" / "wide.png", wide)
    tall = solid(10, 30, (255, 0, 0))
    tall[10:20, :] = (0, 0, 255)
    write_image(root / "x" / "tall.png", tall)
    batch = data.load(f"folder:{root}:all", image_size=10).take([0, 1])
    tall_img, wide_img = batch.images  # ids sort: tall.png, wide.png
    assert batch.ids == ["x/tall.png", "x/wide.png"]
    np.testing.assert_allclose(wide_img[1:-1, 1:-1], np.broadcast_to([0, 1, 0], (8, 8, 3)), atol=1e-6)
    np.testing.assert_allclose(tall_img, np.broadcast_to([0, 0, 1], (10, 10, 3)), atol=1e-6)


def test_folder_mask_follows_crop_exactly(tmp_path):
    root = tmp_path / "m"
    img = np.zeros((40, 60, 3), np.uint8)
    img[5:15, 12:22] = 255
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 12:22] = 1  # any nonzero value is object
    write_image(root / "k" / "p.png", img)
    write_image(root / "masks" / "k" / "p.png", mask)
    batch = data.load(f"folder:{root}:all", image_size=40).take([0])
    expected = np.zeros((40, 40), np.float32)
    expected[5:15, 2:12] = 1  # the crop drops 10 columns on the left
    np.testing.assert_array_equal(batch.masks[0], expected)
    np.testing.assert_allclose(batch.images[0].mean(-1), expected, atol=1e-6)


def test_folder_hash_split_is_stratified_and_stable(tmp_path):
    root = tmp_path / "many"
    tiny = np.zeros((4, 4, 3), np.uint8)
    for c in ("x", "y"):
        for i in range(60):
            write_image(root / c / f"{i:03d}.png", tiny)
    train = data.load(f"folder:{root}", default_split="train", image_size=8)
    test = data.load(f"folder:{root}", image_size=8)
    every = data.load(f"folder:{root}:all", image_size=8)
    assert (train.split, test.split) == ("train", "test")
    assert not set(train.ids) & set(test.ids)
    assert sorted(train.ids + test.ids) == sorted(every.ids) and len(every) == 120
    for c in (0, 1):
        frac = np.sum(test.labels == c) / 60
        assert 0.05 <= frac <= 0.4, frac
    for c in ("x", "y"):  # new files sort between the old ones, shifting them irregularly
        for i in range(0, 60, 3):
            write_image(root / c / f"{i:03d}b.png", tiny)
    train2 = data.load(f"folder:{root}:train", image_size=8)
    test2 = data.load(f"folder:{root}:test", image_size=8)
    assert set(test.ids) <= set(test2.ids) and set(train.ids) <= set(train2.ids)
    assert len(train2) + len(test2) == 160
    with pytest.raises(UserError, match="train, test, all"):
        data.load(f"folder:{root}:val", image_size=8)


def test_folder_split_subfolders(tmp_path):
    root = tmp_path / "split"
    tiny = np.zeros((6, 6, 3), np.uint8)
    for s, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                write_image(root / s / c / f"{i}.png", tiny)
    ds = data.load(f"folder:{root}", image_size=8)
    assert ds.split == "val" and ds.spec.endswith(":val") and len(ds) == 4
    assert ds.ids[0] == "val/a/0.png" and ds.class_names == ("a", "b")
    assert len(data.load(f"folder:{root}", default_split="train", image_size=8)) == 6
    assert len(data.load(f"folder:{root}:all", image_size=8)) == 10
    write_image(root / "val" / "zebra" / "0.png", tiny)
    with pytest.raises(UserError, match="zebra"):
        data.load(f"folder:{root}", image_size=8)


def assert_one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_folder_errors(tmp_path, pets):
    with pytest.raises(UserError) as e:
        data.load(f"folder:{tmp_path / 'nowhere'}")
    assert_one_line(e, "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        data.load(f"folder:{tmp_path / 'empty'}")
    assert_one_line(e, "no class subfolders")
    (pets / "fish").mkdir()
    (pets / "fish" / "readme.md").write_text("x")
    with pytest.raises(UserError) as e:
        data.load(f"folder:{pets}:all", image_size=16)
    assert_one_line(e, "fish", "no images")


def test_folder_corrupt_and_truncated_images(tmp_path):
    root = tmp_path / "bad"
    write_image(root / "c" / "good.png", solid(8, 8, (1, 2, 3)))
    (root / "c" / "junk.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "c" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds = data.load(f"folder:{root}:all", image_size=8)  # listing is cheap and succeeds
    assert len(ds) == 3
    np.testing.assert_allclose(ds.take([1]).images[0, 0, 0], np.array([1, 2, 3]) / 255, atol=1e-6)
    with pytest.raises(UserError) as e:
        ds.take([0])
    assert_one_line(e, "cut.jpg")
    with pytest.raises(UserError) as e:
        list(ds.batches(4))
    assert "cut.jpg" in str(e.value) or "junk.png" in str(e.value)
    with pytest.raises(UserError) as e:
        ds.validate()
    assert_one_line(e, "2 of 3", "cut.jpg", "junk.png")
    assert data.load(f"folder:{root}:all", image_size=8).take([1]).ids == ["c/good.png"]


def test_folder_mask_errors(tmp_path):
    root = tmp_path / "masked"
    write_image(root / "c" / "p.png", solid(10, 8, (0, 0, 0)))
    write_image(root / "c" / "q.png", solid(10, 8, (0, 0, 0)))
    write_image(root / "masks" / "c" / "p.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(UserError) as e:
        data.load(f"folder:{root}:all", image_size=8)
    assert_one_line(e, "q.png", "no mask")
    write_image(root / "masks" / "c" / "q.png", np.zeros((9, 10), np.uint8))
    ds = data.load(f"folder:{root}:all", image_size=8)
    assert ds.take([0]).masks.shape == (1, 8, 8)
    with pytest.raises(UserError) as e:
        ds.take([1])
    assert_one_line(e, "q.png", "10x9", "10x8")


def test_folder_without_masks_and_default_size(pets):
    import shutil

    shutil.rmtree(pets / "masks")
    ds = data.load(f"folder:{pets}:all")
    assert not ds.has_masks and ds.image_size == data.DEFAULT_IMAGE_SIZE == 224
    batch = ds.take([0, 3])
    assert batch.masks is None and batch.images.shape == (2, 224, 224, 3)


# ----------------------------------------------------------------------------- tfds without tfds


def test_imports_and_runs_without_tensorflow_or_tfds():
    proc = run_hidden("""
        from resnet_jax.core import data
        from resnet_jax.errors import UserError
        assert "tensorflow_datasets" not in sys.modules and "tensorflow" not in sys.modules
        batch = next(data.load("digits").batches(2))
        assert batch.images.shape == (2, 72, 72, 3)
        try:
            data.load("tfds:mnist")
        except UserError as e:
            print("MESSAGE", e)
    """, ("tensorflow", "tensorflow_datasets"))
    assert proc.returncode == 0, proc.stderr
    assert f"MESSAGE {data.TFDS_EXTRA_MESSAGE}" in proc.stdout


# ----------------------------------------------------------------------------- tfds


if HAS_TFDS:
    import tensorflow_datasets as tfds

    def _png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    class ResnetJaxTinyPets(tfds.core.GeneratorBasedBuilder):
        """Image + label + segmentation_mask; colour R = 10 * index + 5, G = 80 * label (checkable)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "fish"]),
                "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12, 0), "test": self._generate_examples(6, 12)}

        def _generate_examples(self, n, first):
            for i in range(first, first + n):
                label = i % 3
                h, w = 20 + i % 4, 16 + 2 * (i % 5)
                mask = np.zeros((h, w), np.uint8)
                mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 3  # nonzero = object outside oxford_iiit_pet
                # images are given encoded: encoding numpy arrays would need TensorFlow
                yield f"ex{i}", {"image": _png(solid(w, h, (10 * i + 5, 80 * label, 200))), "label": label,
                                 "segmentation_mask": _png(mask)}


def tiny_dir(tmp_path_factory, file_format):
    d = tmp_path_factory.mktemp(f"tfds_{file_format}")
    ResnetJaxTinyPets(data_dir=str(d)).download_and_prepare(file_format=file_format)
    return str(d)


@pytest.fixture(scope="module")
def tiny_array_record(tmp_path_factory):
    return tiny_dir(tmp_path_factory, "array_record")


def check_tiny(ds, split_size):
    """Checks a loaded ResnetJaxTinyPets split against the colours its generator encodes."""
    images, labels, ids, masks, _ = collect(ds, 4)
    assert len(ds) == split_size == len(images) and ds.class_names == ("cat", "dog", "fish")
    assert images.shape[1:] == (16, 16, 3) and masks.shape[1:] == (16, 16)
    np.testing.assert_array_equal(labels, ds.labels)
    assert ids == ds.ids and len(set(ids)) == len(ids)
    np.testing.assert_allclose(images[:, 5, 5, 1] * 255, 80 * labels, atol=0.01)
    index = np.round((images[:, 5, 5, 0] * 255 - 5) / 10).astype(int)
    np.testing.assert_array_equal(index % 3, labels)
    assert set(np.unique(masks)) == {0.0, 1.0} and masks[:, 8, 8].all() and not masks[:, 0, 0].any()
    part = collect(ds, 5, start=3)
    assert part[2] == ids[3:]
    np.testing.assert_array_equal(part[0], images[3:])
    shuffled = collect(ds, 4, shuffle=True, seed=1)
    assert sorted(shuffled[2]) == sorted(ids)
    assert collect(ds, 3, shuffle=True, seed=1)[2] == shuffled[2]
    by_id = dict(zip(ids, index))
    np.testing.assert_array_equal([by_id[i] for i in shuffled[2]],
                                  np.round((shuffled[0][:, 5, 5, 0] * 255 - 5) / 10).astype(int))
    return dict(zip(ids, index))


@needs_tfds
def test_tfds_prepared_array_record(tiny_array_record):
    ds = data.load("tfds:resnet_jax_tiny_pets", image_size=16, data_dir=tiny_array_record)
    assert ds.spec == "tfds:resnet_jax_tiny_pets:test" and ds.random_access and ds.has_masks
    next(ds.batches(2))
    assert ds._source._labels is None, "batches must not start the pass that reads every label"
    assert ds.ids[0] == "resnet_jax_tiny_pets:test:0000000"
    by_id = check_tiny(ds, 6)
    assert sorted(by_id.values()) == list(range(12, 18))
    batch = ds.take([4, 1])
    assert batch.ids == [ds.ids[4], ds.ids[1]]
    train = data.load("tfds:resnet_jax_tiny_pets", image_size=16, data_dir=tiny_array_record, default_split="train")
    assert train.split == "train" and len(train) == 12
    with pytest.raises(UserError) as e:
        data.load("tfds:resnet_jax_tiny_pets:validation", data_dir=tiny_array_record)
    assert_one_line(e, "validation", "train, test")


@needs_tfds
def test_tfds_array_record_needs_no_tensorflow(tiny_array_record):
    proc = run_hidden(f"""
        from resnet_jax.core import data
        import tensorflow_datasets as tfds
        ds = data.load("tfds:resnet_jax_tiny_pets:train", image_size=16, data_dir={tiny_array_record!r})
        batch = next(ds.batches(5))
        assert batch.images.shape == (5, 16, 16, 3) and batch.masks.shape == (5, 16, 16)
        assert len(ds.labels) == 12 and list(batch.labels) == list(ds.labels[:5])
        with tfds.testing.mock_data(num_examples=6):
            mock = data.load("tfds:imagenette", image_size=16)
            assert len(mock.labels) == 6 and next(mock.batches(6)).images.shape == (6, 16, 16, 3)
        assert "tensorflow" not in sys.modules
        print("OK")
    """, ("tensorflow",))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@needs_tfds
def test_tfds_mock_imagenette():
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load("tfds:imagenette", image_size=32, normalization="imagenet")
        assert ds.spec.startswith("tfds:imagenette:") and len(ds) == 20
        assert ds.num_classes == 10 and ds.class_names[0].startswith("n0") and not ds.has_masks
        images, labels, ids, masks, _ = collect(ds, 8)
        assert images.shape == (20, 32, 32, 3) and masks is None
        np.testing.assert_array_equal(labels, ds.labels)
        assert labels.min() >= 0 and labels.max() < 10
        raw = data.load("tfds:imagenette", image_size=32).take(range(20)).images
        assert raw.min() >= 0 and raw.max() <= 1
        np.testing.assert_allclose(images, (raw - data.IMAGENET_MEAN) / data.IMAGENET_STD, rtol=1e-5, atol=1e-5)
        assert collect(ds, 8, start=13)[2] == ids[13:]


@needs_tfds
def test_tfds_mock_oxford_pet_masks():
    with tfds.testing.mock_data(num_examples=4):
        ds = data.load("tfds:oxford_iiit_pet", image_size=24)
        assert ds.has_masks and ds.num_classes == 37
        batch = next(ds.batches(4))
        assert batch.masks.shape == (4, 24, 24) and set(np.unique(batch.masks)) <= {0.0, 1.0}


@needs_tfds
def test_tfds_oxford_trimap_becomes_pet_mask():
    trimap = np.full((24, 36), 2, np.uint8)  # background
    trimap[4:20, 10:30] = 3  # border
    trimap[6:18, 12:28] = 1  # pet
    image = np.zeros((24, 36, 3), np.uint8)
    image[trimap == 1] = 255
    examples = [{"image": image, "label": 7, "segmentation_mask": trimap[..., None]},
                {"image": image[:, 6:30], "label": 3, "segmentation_mask": trimap[:, 6:30, None]}]

    def as_data_source(self, split, **kwargs):
        return examples

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        ds = data.load("tfds:oxford_iiit_pet:test", image_size=24)
        batch = ds.take([0, 1])
    expected = (trimap[:, 6:30] == 1).astype(np.float32)  # centre crop of 36 -> 24 drops 6 columns a side
    np.testing.assert_array_equal(batch.masks[0], expected)
    np.testing.assert_array_equal(batch.masks[1], expected)
    np.testing.assert_allclose(batch.images[0].mean(-1), expected, atol=1e-6)
    np.testing.assert_array_equal(batch.labels, [7, 3])
    np.testing.assert_array_equal(ds.labels, [7, 3])


@needs_tfds
def test_tfds_unknown_name_and_unprepared(tmp_path):
    with pytest.raises(UserError) as e:
        data.load("tfds:resnet_jax_no_such_dataset")
    assert_one_line(e, "resnet_jax_no_such_dataset", "unknown tfds dataset")
    with pytest.raises(UserError) as e:
        data.load("tfds:mnist", data_dir=str(tmp_path))
    assert_one_line(e, "not prepared", "tfds build mnist", "data_dir")


@needs_tf
def test_tfds_tfrecord_streams_with_tensorflow(tmp_path_factory, tiny_array_record):
    stream_dir = tiny_dir(tmp_path_factory, "tfrecord")
    ds = data.load("tfds:resnet_jax_tiny_pets:train", image_size=16, data_dir=stream_dir)
    assert not ds.random_access and len(ds) == 12
    by_id = check_tiny(ds, 12)
    reference = data.load("tfds:resnet_jax_tiny_pets:train", image_size=16, data_dir=tiny_array_record)
    ref = collect(reference, 12)
    assert by_id == dict(zip(ref[2], np.round((ref[0][:, 5, 5, 0] * 255 - 5) / 10).astype(int)))
    assert collect(ds, 5, shuffle=True, seed=2, start=7)[2] == collect(ds, 5, shuffle=True, seed=2)[2][7:]
    with pytest.raises(UserError, match="array_record"):
        ds.take([0])
    proc = run_hidden(f"""
        from resnet_jax.core import data
        from resnet_jax.errors import UserError
        try:
            data.load("tfds:resnet_jax_tiny_pets:train", data_dir={stream_dir!r})
        except UserError as e:
            print("MESSAGE", e)
    """, ("tensorflow",))
    assert "MESSAGE" in proc.stdout, proc.stderr[-3000:]
    message = proc.stdout.split("MESSAGE ", 1)[1].strip()
    assert "needs TensorFlow" in message and "--file_format=array_record" in message and "\n" not in message
