"""Benchmarks, each measured side by side in one run and reported as ratios (`resnet-jax bench`).

Random weights (`random_variables`) and random inputs throughout; each timing is taken after a
warm-up (compile) on device (`block_until_ready`), without host transfers. Measured numbers are in
docs/guides/accelerators.md.
"""
from __future__ import annotations

import math
import statistics
import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax.training import align, hessian, train
from resnet_jax.core import gradcam, grads, losses, models, projection
from resnet_jax.errors import UserError
from resnet_jax.core.params import path_tuple


def random_variables(model, image_size: int, seed: int = 0) -> dict:
    """Returns seeded random variables of `model` at `image_size` px, drawn in numpy (no compiled init):
    He-scaled kernels, BatchNorm scales and variances in [0.5, 1.5], other leaves 0.1 * N(0, 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = "/".join(path_tuple(path)), leaf.shape
        if name.endswith("kernel"):
            fan_in = math.prod(shape[:-1])
            v = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith("scale") or name.endswith("var"):
            v = rng.uniform(0.5, 1.5, size=shape)
        else:
            v = 0.1 * rng.normal(size=shape)
        return np.asarray(v, np.float32)

    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(model, image_size))



def random_batch(n: int, image_size: int, num_classes: int, seed: int = 1, sharding=None):
    """Returns seeded images (n, S, S, 3) float32 ~ N(0, 1) and labels (n,) int32 in [0, num_classes):
    numpy arrays, or device arrays placed with `sharding` when it is given."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    return (x, y) if sharding is None else (jax.device_put(x, sharding), jax.device_put(y, sharding))


STEPS = ("forward", "fwd_bwd", "fc", "all_vmap", "all_taps", "projected_all", "gradcam", "train_step")


def step_callable(name: str, model, variables, x, y, *, project_dim: int = 1024, kron=projection.DEFAULT_KRON):
    """Returns (call, method): call() computes one batch of step `name` (one of STEPS) on the device
    arrays x (B, H, W, 3), y (B,) (sharded over `grads.make_mesh()`'s batch axis) and blocks until it
    is done; method is the per-example gradient method ("closed", "vmap", "taps"), else None.
    `variables` are on the device (replicated); the training step updates copies of them."""
    if name in ("fc", "all_vmap", "all_taps", "projected_all"):
        kw = {"fc": dict(params="fc"), "all_vmap": dict(params="all", method="vmap"),
              "all_taps": dict(params="all", method="taps"),
              "projected_all": dict(params="all", project_dim=project_dim, kron=kron)}[name]
        step, method = grads.GradFn(model, variables, max_grad_floats=1 << 40, **kw).device_step(x.shape[1:])
        return (lambda: jax.block_until_ready(step(x, y))), method
    if name == "forward":
        fwd = jax.jit(lambda v, a: models.apply(model, v, a)[0])
        return (lambda: fwd(variables, x).block_until_ready()), None
    if name == "fwd_bwd":
        def mean_loss(p, bs, a, b):
            logits, _ = models.apply(model, {"params": p, "batch_stats": bs}, a)
            return jnp.mean(losses.cross_entropy(logits, b))
        fb = jax.jit(jax.grad(mean_loss))
        return (lambda: jax.block_until_ready(fb(variables["params"], variables["batch_stats"], x, y))), None
    if name == "gradcam":
        cam = gradcam.compiled(model, "layer4", "gradcam")
        return (lambda: jax.block_until_ready(cam(variables, x, y))), None
    if name == "train_step":
        tx = optax.adamw(1e-3)
        step = train.make_train_step(model, tx)  # params, batch_stats, opt_state donated: copies
        copy = partial(jax.tree_util.tree_map, jnp.copy)
        state = [copy(variables["params"]), copy(variables["batch_stats"]), tx.init(variables["params"])]
        rng = jax.random.key(0)

        def one():
            *new, metrics = step(*state, x, y, rng)
            state[:] = new
            jax.block_until_ready(metrics)
        return one, None
    raise UserError(f"unknown benchmark step {name!r}: choose one of {', '.join(STEPS)}")


def bench_grads(model_name: str = "resnet50", image_size: int = 224, batch: int = 32, vmap_batch: int = 8,
                loop_n: int = 8, project_dim: int = 1024, steps: int = 3, num_classes: int = 1000,
                stem: str = "standard", kron=projection.DEFAULT_KRON, which: Sequence[str] | None = None,
                log=None) -> dict:
    """Samples/s of: forward only, batched forward+backward (mean loss, all params), per-example fc
    (closed form), per-example all by vmap(grad), per-example all by taps (unprojected), projected
    all (taps, `project_dim`), and a per-sample jax.grad loop; plus the ratios fc/forward,
    all_vmap/loop, projected_all/fwd_bwd. Random weights and inputs; each timing is the median of
    `steps` runs after a warm-up, on device (block_until_ready), without host transfers.
    `which` restricts the measurements (names as in the result's "samples_per_s")."""
    say = log or (lambda *_: None)
    model = models.create(model_name, num_classes, stem)
    variables = random_variables(model, image_size)
    mesh = grads.make_mesh()
    nd = mesh.devices.size
    batch = -(-batch // nd) * nd
    vmap_batch = -(-vmap_batch // nd) * nd
    shard = NamedSharding(mesh, P("batch"))
    var_d = jax.device_put(variables, NamedSharding(mesh, P()))
    x, y = random_batch(batch, image_size, num_classes, seed=1, sharding=shard)
    xv, yv = random_batch(vmap_batch, image_size, num_classes, seed=2, sharding=shard)

    want = set(which) if which else {"forward", "fwd_bwd", "fc", "all_vmap", "all_taps", "projected_all", "loop"}
    cases: list = []  # (name, blocking callable, samples per call)
    methods: dict = {}
    for name in ("forward", "fwd_bwd", "fc", "all_vmap", "all_taps", "projected_all"):
        if name in want:
            a, b, n = (xv, yv, vmap_batch) if name.startswith("all_") else (x, y, batch)
            call, method = step_callable(name, model, var_d, a, b, project_dim=project_dim, kron=kron)
            cases.append((name, call, n))
            if method is not None:
                methods[name] = method
    if "loop" in want:
        one = jax.jit(jax.grad(partial(losses.example_loss, model)))
        dev = jax.local_devices()[0]
        p1, b1 = jax.device_put((variables["params"], variables["batch_stats"]), dev)
        xh, yh = np.asarray(x), np.asarray(y)
        imgs = [jax.device_put(xh[i % batch], dev) for i in range(loop_n)]
        labs = [jax.device_put(yh[i % batch], dev) for i in range(loop_n)]

        def loop():
            for i in range(loop_n):
                g = one(p1, b1, imgs[i], labs[i])
            jax.block_until_ready(g)
        cases.append(("loop", loop, loop_n))

    # Warm up (compile) every case, then time them round-robin so that a change of the machine's
    # load (shared CPUs) hits all of them alike; report the median of each.
    for name, fn, _ in cases:
        t = time.perf_counter()
        fn()
        say(f"{name}: compiled and warmed up in {time.perf_counter() - t:.1f} s")
    times: dict = {name: [] for name, _, _ in cases}
    for _ in range(max(1, steps)):
        for name, fn, _ in cases:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rates: dict = {}
    for name, _, n in cases:
        sec = statistics.median(times[name])
        rates[name] = n / sec
        say(f"{name}: {rates[name]:.2f} samples/s ({sec * 1e3:.1f} ms for {n})")

    def ratio(a, b):
        return rates[a] / rates[b] if a in rates and b in rates else None

    result = {
        "config": {"model": model_name, "image_size": image_size, "batch": batch, "vmap_batch": vmap_batch,
                   "loop_n": loop_n, "project_dim": project_dim, "kron": list(kron), "steps": steps,
                   "num_classes": num_classes, "stem": stem, "devices": nd,
                   "device_kind": jax.local_devices()[0].device_kind,
                   "grad_dim_all": models.count_params(variables["params"])},
        "methods": methods,
        "samples_per_s": rates,
        "ratios": {"fc/forward": ratio("fc", "forward"), "all_vmap/loop": ratio("all_vmap", "loop"),
                   "all_taps/loop": ratio("all_taps", "loop"),
                   "projected_all/fwd_bwd": ratio("projected_all", "fwd_bwd")},
        "targets": {"fc/forward": 0.9, "all_vmap/loop": 5.0, "projected_all/fwd_bwd": 0.3},
    }
    return result


def bench_gradcam(model, variables, batch: int, image_size: int, steps: int = 10, layer: str = "layer4",
                  method: str = "gradcam", warmup: int = 2, seed: int = 0) -> dict:
    """Times the jit forward pass (logits only) against batched jit Grad-CAM on the same batch.

    Both are compiled and run `warmup` times first; then `steps` timed calls of each, interleaved
    (so load from other processes hits both alike), each ended with `block_until_ready`. Returns
    images/s from the median call time of each and `ratio` = Grad-CAM / forward throughput.
    """
    gradcam.check_layer_and_method(layer, method)
    if batch < 1 or steps < 1:
        raise UserError(f"batch and steps must be at least 1, got batch={batch}, steps={steps}")
    images = jax.random.normal(jax.random.key(seed), (batch, image_size, image_size, 3), jnp.float32)
    targets = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    cam = gradcam.compiled(model, layer, method)

    def call(fn, *args):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    for _ in range(max(1, warmup)):
        call(forward, variables, images)
        call(cam, variables, images, targets)
    t_forward, t_cam = [], []
    for _ in range(steps):
        t_forward.append(call(forward, variables, images))
        t_cam.append(call(cam, variables, images, targets))
    forward_ips = batch / statistics.median(t_forward)
    cam_ips = batch / statistics.median(t_cam)
    return {"batch": batch, "image_size": image_size, "steps": steps, "layer": layer, "method": method,
            "forward_images_per_s": forward_ips, "gradcam_images_per_s": cam_ips,
            "ratio": cam_ips / forward_ips}


def bench_train(model_name: str = "resnet18", image_size: int = 72, batch_size: int = 32, per_class: int = 4,
                stem: str = "standard", num_classes: int = 10, lambda_align: float = 1.0, lambda_mi: float = 0.1,
                n_iter: int = 5, seed: int = 0, second_order: str = "forward") -> dict:
    """Times the plain and the aligned training steps on the same model and batch.

    Both steps are compiled first, then run alternately `n_iter` times each (so load changes on a
    shared machine hit both alike); rates use each step's fastest run, `ratio_median` the medians.
    Returns {"plain_samples_per_s", "aligned_samples_per_s", "ratio" (aligned step time / plain),
    "ratio_median", "plain_compile_s", "aligned_compile_s", "config"}.
    """
    if n_iter < 1:
        raise UserError(f"n_iter must be at least 1, got {n_iter}")
    model = models.create(model_name, num_classes, stem)
    variables = random_variables(model, image_size, seed)
    tx = optax.adamw(1e-3)
    rs = np.random.default_rng(seed)
    images = jnp.asarray(rs.normal(size=(batch_size, image_size, image_size, 3)), jnp.float32)
    labels = jnp.asarray(np.arange(batch_size) // per_class % num_classes, jnp.int32)
    rng = jax.random.key(seed)
    out = {"config": {"model": model_name, "image_size": image_size, "batch_size": batch_size, "stem": stem,
                      "per_class": per_class, "lambda_align": lambda_align, "lambda_mi": lambda_mi,
                      "n_iter": n_iter, "second_order": second_order, "backend": jax.default_backend()}}
    aligned = align.make_aligned_loss(model, lambda_align, lambda_mi, second_order=second_order)
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    steps, states = {}, {}
    for name, loss_fn in (("plain", None), ("aligned", aligned)):
        steps[name] = train.make_train_step(model, tx, loss_fn)
        state = (copy(variables["params"]), copy(variables["batch_stats"]), tx.init(variables["params"]))
        t0 = time.perf_counter()
        *state, metrics = steps[name](*state, images, labels, rng)
        jax.block_until_ready((state, metrics))
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        states[name] = state
    times = {"plain": [], "aligned": []}
    for _ in range(n_iter):
        for name in ("plain", "aligned"):
            t0 = time.perf_counter()
            *state, metrics = steps[name](*states[name], images, labels, rng)
            jax.block_until_ready((state, metrics))
            times[name].append(time.perf_counter() - t0)
            states[name] = state
    for name in ("plain", "aligned"):
        out[f"{name}_samples_per_s"] = batch_size / min(times[name])
    out["ratio"] = min(times["aligned"]) / min(times["plain"])
    out["ratio_median"] = float(np.median(times["aligned"]) / np.median(times["plain"]))
    return out


def _time(fn, n_iter):
    jax.block_until_ready(fn())                 # compile
    t0 = time.perf_counter()
    for _ in range(n_iter):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n_iter


def bench_hvp(f=None, x=None, *, model_name: str = "resnet18", image_size: int = 72, batch_size: int = 32,
              stem: str = "standard", params: str = "all", num_classes: int = 10, n_iter: int = 5,
              seed: int = 0) -> dict:
    """Time of one HVP as a multiple of one gradient of the same function (both jitted, compile excluded).

    With f and x given, times those; otherwise the eval-mode mean loss of a random batch through a
    freshly initialised `model_name` w.r.t. the `params` subset. Returns {"grad_s", "hvp_s", "ratio",
    "config"}.
    """
    hessian.check_counts(n_iter=n_iter)
    config = {"n_iter": n_iter, "backend": jax.default_backend()}
    if f is None:
        model = models.create(model_name, num_classes, stem)
        variables = random_variables(model, image_size, seed)
        rs = np.random.default_rng(seed)
        images = rs.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
        labels = rs.integers(0, num_classes, batch_size)
        f, x = hessian.params_loss(model, variables, images, labels, params)
        config.update(model=model_name, image_size=image_size, batch_size=batch_size, stem=stem, params=params,
                      n_params=optax.tree_utils.tree_size(x))
    elif x is None:
        raise UserError("bench_hvp needs x together with f")
    f = hessian.as_partial(f)
    v = hessian.probe_vector(np.random.default_rng([int(seed), hessian.PROBE_STREAM]), x, kind="normal")
    grad_s = _time(lambda: hessian.grad_jit(f, x), n_iter)
    hvp_s = _time(lambda: hessian.hvp_jit(f, x, v), n_iter)
    return {"grad_s": grad_s, "hvp_s": hvp_s, "ratio": hvp_s / grad_s, "config": config}
