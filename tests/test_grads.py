"""Per-example gradients against independent references.

* a plain Python loop over examples of `jax.grad` of a one-image loss written here (full parameter
  tree, leaves picked and flattened by hand in the documented layout);
* the closed form of the fc gradient, computed here in numpy from the pooled features;
* projections: the (D, k) matrix rebuilt here from the documented recipe (fold_in(key(seed),
  crc32(path)), Rademacher draws, numpy kron per block, first k columns, 1/sqrt(k));
* 1 vs 8 devices: a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 that starts
  at module set-up and runs while the other tests do.
"""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.core import grads, models, projection
from resnet_jax.core.params import layout, select_paths
from resnet_jax.benchmarks.speed import random_variables
from resnet_jax.errors import UserError

B, C, SIZE = 5, 6, 72  # resnet18 at 72 px: layer4 maps 3x3; B=5 pads to 8 on 8 devices
CONV = "layer1_1/conv2/*,layer1_1/bn2"  # conv kernel + BatchNorm scale/bias (backward through most of the net)
CONV_PATHS = ["layer1_1/bn2/scale", "layer1_1/bn2/bias", "layer1_1/conv2/kernel"]  # documented order
CONV_SHAPES = [(64,), (64,), (3, 3, 64, 64)]
K = 48


@pytest.fixture(scope="module", autouse=True)
def _float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


MODEL = models.create("resnet18", num_classes=C)
VARIABLES = random_variables(MODEL, SIZE)
IMAGES = np.random.default_rng(1).normal(size=(B, SIZE, SIZE, 3)).astype(np.float32)
LABELS = np.array([0, 3, 5, 2, 1], np.int32)
IDS = [f"img{i}" for i in range(B)]

SUBPROCESS = textwrap.dedent("""
    import os, pickle, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from resnet_jax.core import grads, models
    assert jax.device_count() == 8, jax.devices()
    inp = pickle.load(open(sys.argv[1], "rb"))
    model = models.create("resnet18", num_classes=inp["C"])
    out = {}
    with jax.default_matmul_precision("float32"):
        for name, kw in inp["configs"].items():
            fn = grads.build(model, inp["variables"], **kw)
            assert fn.n_devices == 8
            out[name] = fn(inp["images"], inp["labels"], inp["ids"])
    pickle.dump(out, open(sys.argv[2], "wb"))
""")
EIGHT = {"fc": dict(params="fc"),
         "conv_proj": dict(params=CONV, project_dim=K, seed=7),
         "conv_vmap": dict(params=CONV, method="vmap")}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Starts the 8-device subprocess early so that it runs alongside the other tests."""
    d = tmp_path_factory.mktemp("eight")
    with open(d / "in.pkl", "wb") as f:
        pickle.dump({"C": C, "variables": VARIABLES, "images": IMAGES, "labels": LABELS, "ids": IDS,
                     "configs": EIGHT}, f)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS, str(d / "in.pkl"), str(d / "out.pkl")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield proc, d / "out.pkl"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


_CACHE: dict = {}


def run(name, **kw):
    """grads.compute on the module's batch, memoised (several tests share a configuration)."""
    if name not in _CACHE:
        _CACHE[name] = grads.compute(MODEL, VARIABLES, IMAGES, LABELS, ids=IDS, **kw)
    return _CACHE[name]


def one_loss(params, batch_stats, image, label):
    logits = MODEL.apply({"params": params, "batch_stats": batch_stats}, image[None], train=False)[0][0]
    return -jax.nn.log_softmax(logits)[label]


_loop_grad = jax.jit(jax.grad(one_loss, argnums=(0, 2)))  # (params, image)


def loop_rows(paths, labels):
    """(B, D): one jax.grad per example over all parameters, then the chosen leaves flattened."""
    rows = []
    for i in range(B):
        g = _loop_grad(VARIABLES["params"], VARIABLES["batch_stats"], IMAGES[i], labels[i])[0]
        leaves = []
        for p in paths:
            t = g
            for k in p.split("/"):
                t = t[k]
            leaves.append(np.asarray(t).ravel())
        rows.append(np.concatenate(leaves))
    return np.stack(rows)


# float32 through a ResNet: a different batch shape or processor changes XLA's summation order,
# which moved results by up to 1.4e-5 of their largest entry on an AMD EPYC (within the earlier bounds,
# 1e-6 or 1e-5 by test, on an Intel Xeon)
F32 = 1e-4


def rel(a, b):
    """Largest absolute difference as a fraction of b's largest entry."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_subsets_and_layout(eight_devices):  # (starts the 8-device subprocess early)
    shapes = models.variable_shapes(MODEL, SIZE)["params"]
    assert select_paths(shapes, "fc") == ["fc/kernel", "fc/bias"]
    lay = layout(shapes, "fc")
    assert lay.dim == 512 * C + C and lay.entries[1] == ("fc/bias", (C,), 512 * C)
    assert select_paths(shapes, CONV) == CONV_PATHS
    assert select_paths(shapes, "layer4_*/conv2/*") == ["layer4_0/conv2/kernel", "layer4_1/conv2/kernel"]
    assert select_paths(shapes, "re:layer4_1/conv\\d/kernel") == ["layer4_1/conv1/kernel",
                                                                       "layer4_1/conv2/kernel"]
    layer4 = select_paths(shapes, "layer4")
    assert layer4 and all(p.startswith("layer4_") for p in layer4) and "layer4_0/downsample_conv/kernel" in layer4
    assert layout(shapes, "all").dim == models.count_params(shapes)
    assert select_paths(shapes, "all")[:3] == ["bn1/scale", "bn1/bias", "conv1/kernel"]
    for bad in ("layer9", "fc/weight", "re:nothing.*here"):
        with pytest.raises(UserError, match="matches no parameter.*layer4_1/conv2/kernel"):
            select_paths(shapes, bad)


@pytest.mark.device
def test_fc_closed_form_and_loop_agree():
    closed = run("fc")
    loop = loop_rows(["fc/kernel", "fc/bias"], LABELS)
    # The closed form, by hand: delta = softmax - onehot, kernel = h (x) delta row-major, then bias.
    h = closed["fm"].astype(np.float64)
    z = closed["logits"].astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = p - np.eye(C)[LABELS]
    by_hand = np.concatenate([(h[:, :, None] * delta[:, None, :]).reshape(B, -1), delta], 1)
    assert closed["gw"].shape == (B, 512 * C + C) and closed["gw"].dtype == np.float32
    for got in (closed["gw"], by_hand):
        assert rel(got, loop) < F32
    np.testing.assert_array_equal(closed["labels"], LABELS)
    np.testing.assert_allclose(closed["probs"], p, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(closed["preds"], z.argmax(1))
    assert rel(closed["logits"], run("conv_vmap", params=CONV, method="vmap")["logits"]) < F32


@pytest.mark.device
def test_conv_and_batchnorm_subset_taps_vmap_loop():
    taps = run("conv", params=CONV)
    vmap = run("conv_vmap", params=CONV, method="vmap")
    loop = loop_rows(CONV_PATHS, LABELS)
    assert taps["gw"].shape == (B, 64 + 64 + 3 * 3 * 64 * 64)
    assert rel(taps["gw"], loop) < F32
    assert rel(vmap["gw"], loop) < F32
    # each block is nontrivial (a wrong block would not hide behind the big kernel block)
    for a, b in ((0, 64), (64, 128), (128, None)):
        assert rel(taps["gw"][:, a:b], loop[:, a:b]) < F32


@pytest.mark.device
def test_strided_pointwise_conv_taps():
    """The 1x1 stride-2 downsample (a models.PointwiseConv) on the taps path, forced, against the loop."""
    paths = ["layer2_0/downsample_conv/kernel"]
    taps = grads.compute(MODEL, VARIABLES, IMAGES, LABELS, params=paths[0], method="taps")
    assert taps["gw"].shape == (B, 64 * 128)
    assert rel(taps["gw"], loop_rows(paths, LABELS)) < F32


def test_predicted_labels():
    closed = run("fc")
    wrong = (closed["preds"] + 1) % C  # true labels that differ from every prediction
    pred = grads.compute(MODEL, VARIABLES, IMAGES, wrong, params="fc", label_source="predicted")
    truth = grads.compute(MODEL, VARIABLES, IMAGES, wrong, params="fc", label_source="true")
    loop = loop_rows(["fc/kernel", "fc/bias"], closed["preds"])
    assert rel(pred["gw"], loop) < F32
    np.testing.assert_array_equal(pred["labels"], closed["preds"])
    assert rel(truth["gw"], loop) > 0.1
    # predicted labels need no labels at all; on the taps path too
    taps = grads.compute(MODEL, VARIABLES, IMAGES, None, params="layer4_1/bn2", label_source="predicted")
    assert rel(taps["gw"], loop_rows(["layer4_1/bn2/scale", "layer4_1/bn2/bias"], closed["preds"])) < F32


@pytest.mark.device
def test_input_gradients():
    got = np.asarray(grads.input_grads(MODEL, VARIABLES, IMAGES, LABELS))
    loop = np.stack([_loop_grad(VARIABLES["params"], VARIABLES["batch_stats"], IMAGES[i], LABELS[i])[1]
                     for i in range(B)])
    assert got.shape == IMAGES.shape and rel(got, loop) < F32


def documented_projection(paths, shapes, k, seed, kron=(8, 8)):
    """The (D, k) matrix from the module docstring's recipe, built here independently."""
    k1, k2 = kron
    r = math.ceil(k / (k1 * k2))
    key = jax.random.key(seed)
    blocks = []
    for path, shape in zip(paths, shapes):
        lk = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        if len(shape) <= 1:
            blocks.append(np.asarray(jax.random.rademacher(lk, (math.prod(shape), k)), np.float64))
            continue
        ka, kb = jax.random.split(lk)
        a = np.asarray(jax.random.rademacher(ka, (math.prod(shape[:-1]), r * k1)), np.float64)
        b = np.asarray(jax.random.rademacher(kb, (shape[-1], r * k2)), np.float64)
        cols = np.concatenate([np.kron(a[:, j * k1:(j + 1) * k1], b[:, j * k2:(j + 1) * k2]) for j in range(r)], 1)
        blocks.append(cols[:, :k])
    return np.concatenate(blocks) / np.sqrt(k)


@pytest.mark.device
def test_projection_equals_explicit_matrix():
    shapes = [(512, C), (C,)]
    r_fc = documented_projection(["fc/kernel", "fc/bias"], shapes, K, 7)
    full = run("fc")["gw"].astype(np.float64)
    proj = run("fc_proj", params="fc", project_dim=K, seed=7)["gw"]
    assert proj.shape == (B, K)
    assert rel(proj, full @ r_fc) < F32
    lay = layout(VARIABLES["params"], "fc")
    np.testing.assert_allclose(projection.projection_matrix(lay, projection.Projection(K, 7)), r_fc, rtol=1e-6)
    # conv + BatchNorm leaves through the taps path: never forms the per-example gradient
    r_conv = documented_projection(CONV_PATHS, CONV_SHAPES, K, 7)
    full_conv = run("conv")["gw"].astype(np.float64)
    taps = run("conv_proj", params=CONV, project_dim=K, seed=7)["gw"]
    assert rel(taps, full_conv @ r_conv) < F32
    # another seed, another projection
    other = grads.compute(MODEL, VARIABLES, IMAGES, LABELS, params="fc", project_dim=K, seed=8)["gw"]
    assert rel(other, proj) > 0.1


def test_projection_preserves_inner_products():
    k = 8192
    full = run("fc")["gw"].astype(np.float64)
    proj = grads.compute(MODEL, VARIABLES, IMAGES, LABELS, params="fc", project_dim=k, seed=3)["gw"].astype(np.float64)
    gram, pgram = full @ full.T, proj @ proj.T
    norms = np.sqrt(np.diag(gram))
    err = np.abs(pgram - gram) / np.outer(norms, norms)
    # rank-one rows, kron (8, 8): relative std of a squared norm ~ sqrt(4 * 8 / k) ~ 0.06
    assert err.max() < 0.3, err
    assert np.corrcoef(gram.ravel(), pgram.ravel())[0, 1] > 0.95


@pytest.mark.device
def test_micro_batches_give_the_same_rows():
    fn = grads.build(MODEL, VARIABLES, params="fc", max_grad_floats=2 * (512 * C + C))
    assert fn.plan(IMAGES.shape[1:])[1] == 2
    out = fn(IMAGES, LABELS, IDS)
    assert rel(out["gw"], run("fc")["gw"]) < F32
    assert out["gw"].shape == (B, 512 * C + C)


@pytest.mark.device
def test_pad_to_cuts_a_short_batch_as_a_full_one():
    full = run("fc")["gw"]
    fn = grads.build(MODEL, VARIABLES, params="fc")
    placed = fn.put(IMAGES[:3], LABELS[:3], pad_to=B)
    assert [c[0].shape[0] for c in placed.chunks] == [fn.put(IMAGES, LABELS).chunks[0][0].shape[0]]
    assert rel(fn(IMAGES[:3], LABELS[:3], pad_to=B)["gw"], full[:3]) < F32
    small = grads.build(MODEL, VARIABLES, params="fc", max_grad_floats=2 * (512 * C + C))  # 2 per step
    placed = small.put(IMAGES[:3], LABELS[:3], pad_to=B)
    assert [(c[0].shape[0], c[3]) for c in placed.chunks] == [(2, 2), (2, 1)]
    out = small(IMAGES[:3], LABELS[:3], IDS[:3], pad_to=B)
    assert out["gw"].shape == (3, 512 * C + C) and rel(out["gw"], full[:3]) < F32


@pytest.mark.device
def test_nan_names_the_images():
    bad = IMAGES.copy()
    bad[3, 10, 10, 0] = np.nan  # (XLA:CPU's relu may squash it: images are checked too)
    with pytest.raises(UserError, match=r"NaN or Inf.* img3(?!.*img[0124])"):
        grads.compute(MODEL, VARIABLES, bad, LABELS, ids=IDS, params="fc")
    broken = jax.tree.map(np.copy, VARIABLES)
    broken["params"]["fc"]["kernel"][0, 0] = np.inf
    with pytest.raises(UserError, match="img0, img1, img2, img3, img4"):
        grads.compute(MODEL, broken, IMAGES, LABELS, ids=IDS, params="fc")


def test_bad_arguments():
    with pytest.raises(UserError, match="projection dimension"):
        grads.build(MODEL, VARIABLES, project_dim=0)
    with pytest.raises(UserError, match="label source"):
        grads.build(MODEL, VARIABLES, label_source="guess")
    fn = grads.build(MODEL, VARIABLES)
    with pytest.raises(UserError, match="outside"):
        fn(IMAGES, np.array([0, 1, 2, 3, C]))


def test_process_shard():
    for n in (0, 1, 7, 100):
        for count in (1, 3, 8):
            parts = [grads.process_shard(n, i, count) for i in range(count)]
            assert [i for r in parts for i in r] == list(range(n))
            assert max(len(r) for r in parts) - min(len(r) for r in parts) <= 1
    with pytest.raises(UserError):
        grads.process_shard(10, 3, 3)


def test_one_device_equals_eight_devices(eight_devices):
    proc, out_path = eight_devices
    ours = {name: run(name, **kw) for name, kw in EIGHT.items()}
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log.decode()[-3000:]
    with open(out_path, "rb") as f:
        theirs = pickle.load(f)
    for name in EIGHT:
        for key in ("gw", "logits", "fm", "probs"):
            assert theirs[name][key].shape == ours[name][key].shape
            assert rel(theirs[name][key], ours[name][key]) < F32, (name, key)
        np.testing.assert_array_equal(theirs[name]["preds"], ours[name]["preds"])
