"""The extract store: contents, atomic shards, resume after a kill, refusal of a different run."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from resnet_jax.core import checkpoint, data, grads, models
from resnet_jax.jobs import extract
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError

C, SIZE, BS, LIMIT = 10, 72, 4, 10  # digits: 10 classes at 72 px; shards of 4, 4, 2 rows


@pytest.fixture(scope="module", autouse=True)
def _float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    model = models.create("resnet18", C)
    variables = random_variables(model, SIZE)
    meta = checkpoint.make_meta("resnet18", C, [str(i) for i in range(C)], "standard", SIZE, "none")
    checkpoint.save(d, 1, variables, meta)
    return d, model, variables


@pytest.fixture(scope="module")
def full_store(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "store")
    man = extract.run_extract(ckpt[0], "digits", out, batch_size=BS, limit=LIMIT, progress=False, save_gw=True)
    return out, man


def npy_bytes(d):
    return {name: open(os.path.join(d, name), "rb").read()
            for name in sorted(os.listdir(d)) if name.endswith(".npy") or name == "ids.json"}


@pytest.mark.device
def test_store_contents(ckpt, full_store):
    out, man = full_store
    _, model, variables = ckpt
    st = extract.load_store(out)
    D = 512 * C + C
    assert man["complete"] and man["n"] == LIMIT and man["dim"] == D
    assert st["gw"].shape == (LIMIT, D) and st["gw"].dtype == np.float32
    assert st["p"].shape == st["logits"].shape == (LIMIT, C) and st["fm"].shape == (LIMIT, 512)
    np.testing.assert_allclose(st["p"].sum(1), 1, rtol=1e-5)
    ds = data.load("digits", image_size=SIZE, default_split="test")
    assert st["ids"] == ds.ids[:LIMIT]
    np.testing.assert_array_equal(st["labels"], ds.labels[:LIMIT])
    np.testing.assert_array_equal(st["preds"], st["logits"].argmax(1))
    batch = next(ds.batches(LIMIT))
    ref = grads.compute(model, variables, batch.images, batch.labels, params="fc")
    np.testing.assert_allclose(st["gw"], ref["gw"], rtol=1e-5, atol=1e-6)
    assert not os.path.exists(os.path.join(out, "shards"))
    with open(os.path.join(out, "manifest.json")) as f:
        disk = json.load(f)
    assert disk["run"]["grad_params"] == "fc" and disk["run"]["checkpoint_step"] == 1
    assert set(disk["versions"]) == {"jax", "flax", "numpy", "resnet-jax"}
    assert disk["shapes"]["gw"]["shape"] == [LIMIT, D]


@pytest.mark.device
def test_killed_run_resumes_to_identical_arrays(ckpt, full_store, tmp_path):
    out = str(tmp_path / "store")
    with pytest.raises(extract._Stop):
        extract.run_extract(ckpt[0], "digits", out, batch_size=BS, limit=LIMIT, progress=False, stop_after_shards=1,
                            save_gw=True)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000.npz"]
    with pytest.raises(UserError, match="is incomplete: run extract again"):
        extract.load_store(out)
    # a torn write of the next shard (killed mid-write) must be ignored
    with open(os.path.join(out, "shards", "00001.npz.tmp-999"), "wb") as f:
        f.write(b"garbage")
    extract.run_extract(ckpt[0], "digits", out, batch_size=BS, limit=LIMIT, progress=False, save_gw=True)
    assert extract.load_store(out)["manifest"]["complete"]
    assert npy_bytes(out) == npy_bytes(full_store[0])
    assert len(npy_bytes(out)) == 7


def test_complete_store_is_left_alone(ckpt, full_store):
    out = full_store[0]
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    said = []
    extract.run_extract(ckpt[0], "digits", out, batch_size=BS, limit=LIMIT, progress=False, save_gw=True,
                        log=said.append)
    assert "already complete" in said[0]
    assert before == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}


@pytest.mark.parametrize("change, field", [
    (dict(grad_params="layer4_1/bn2"), "grad_params"),
    (dict(label_source="predicted"), "label_source"),
    (dict(limit=LIMIT + 1), "limit"),
    (dict(batch_size=BS + 1), "batch_size"),
    (dict(project_dim=16), "projection"),
    (dict(save_gw=False), "save_gw"),
])
def test_a_different_run_is_refused(ckpt, full_store, change, field):
    args = dict(batch_size=BS, limit=LIMIT, progress=False, save_gw=True)
    args.update(change)
    with pytest.raises(UserError, match=f"holds a different run: {field} is"):
        extract.run_extract(ckpt[0], "digits", full_store[0], **args)


class NanDigits:
    """The digits test split with one image made NaN (a stand-in Dataset)."""

    def __init__(self, bad_index):
        self.ds = data.load("digits", image_size=SIZE, default_split="test")
        self.spec, self.split, self.class_names = "nan-digits", "test", self.ds.class_names
        self.ids, self.labels, self.bad = self.ds.ids, self.ds.labels, bad_index

    def __len__(self):
        return len(self.ds)

    def batches(self, batch_size, start=0):
        for i, b in enumerate(self.ds.batches(batch_size, start=start)):
            images = b.images.copy()
            for j in range(len(images)):
                if start + i * batch_size + j == self.bad:
                    images[j] = np.nan
            yield data.Batch(images, b.labels, b.ids, b.masks)


def test_nan_is_reported_and_nothing_marked_complete(ckpt, tmp_path):
    out = str(tmp_path / "store")
    ds = NanDigits(bad_index=5)
    with pytest.raises(UserError, match=f"NaN or Inf.*{ds.ids[5]}"):
        extract.run_extract(ckpt[0], ds, out, batch_size=BS, limit=LIMIT, progress=False)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["complete"] is False
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000.npz"]


def test_process_slice(ckpt, full_store, tmp_path):
    out = str(tmp_path / "store")
    # 540 test digits over 135 processes: process 1 has rows 4..7
    man = extract.run_extract(ckpt[0], "digits", out, batch_size=BS, progress=False, process=(1, 135), save_gw=True)
    assert man["rows"] == [4, 8]
    st, full = extract.load_store(out), extract.load_store(full_store[0])
    assert st["ids"] == full["ids"][4:8]
    np.testing.assert_array_equal(st["gw"], full["gw"][4:8])


def test_fc_store_keeps_factors_and_reads_like_rows(ckpt, full_store, tmp_path):
    """Without save_gw the fc store holds no N x (d*C + C) file; Representations rebuilds the rows,
    their Gram matrix and their cosine summary from the factors, equal to the rows extracted."""
    from resnet_jax.paper.analysis import Representations

    out = str(tmp_path / "store")
    man = extract.run_extract(ckpt[0], "digits", out, batch_size=BS, limit=LIMIT, progress=False)
    assert man["gw"] == "factors" and "gw.npy" not in os.listdir(out) and "gw" not in man["shapes"]
    assert extract.load_store(out)["gw"] is None
    rows = np.asarray(extract.load_store(full_store[0])["gw"], np.float64)
    rep = Representations.from_store(extract.load_store(out))
    assert rep.gw_kind == "kronecker" and rep.label_source == "true"
    np.testing.assert_allclose(rep.gw_rows(), rows, atol=1e-4 * np.abs(rows).max())
    # The Gram matrix against unit rows [h (x) delta, delta] built here in float64 from fm and logits
    # (the float32 rows lose digits where softmax is nearly one-hot).
    st = extract.load_store(out)
    z = np.asarray(st["logits"], np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    delta = e / e.sum(1, keepdims=True) - np.eye(C)[st["labels"]]
    g = np.concatenate([np.einsum("nd,nc->ndc", np.asarray(st["fm"], np.float64), delta).reshape(LIMIT, -1), delta], 1)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(rep.gw_unit_gram(), unit @ unit.T, atol=1e-12)
    labels = rep.labels
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    assert rep.gw_cosine_summary(labels).intra == pytest.approx((unit @ unit.T)[same].mean(), rel=1e-9)
    saved = Representations.from_store(extract.load_store(full_store[0]))  # gw.npy saved: factors still used
    assert saved.gw_kind == "kronecker" and "gw.npy" in full_store[1]["files"]


def test_bad_arguments_and_directories(ckpt, tmp_path):
    with pytest.raises(UserError, match="projection dimension"):
        extract.run_extract(ckpt[0], "digits", str(tmp_path / "a"), project_dim=0)
    with pytest.raises(UserError, match="limit"):
        extract.run_extract(ckpt[0], "digits", str(tmp_path / "a"), limit=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no extract store"):
        extract.run_extract(ckpt[0], "digits", str(other), limit=2, progress=False)
    with pytest.raises(UserError, match="not an extract store"):
        extract.load_store(str(other))
