"""Per-example gradients of the cross-entropy loss with respect to the weights (and the input).

The model runs in eval mode (BatchNorm with its running statistics), so the examples of a batch do
not interact and the gradient of example n's loss depends on example n alone.

Loss and labels
    loss_n = -log softmax(logits_n)[y_n], with y_n the given label (`label_source="true"`) or
    the model's own prediction argmax(logits_n) (`label_source="predicted"`).

Parameter subsets and the row layout: `params`. Projections (`project_dim=k`): `projection`.
The taps of method "taps": `taps`.

Methods (`method=`)
    "closed"  only fc leaves: exact from the forward pass alone, delta = softmax(logits) - onehot(y)
              (`losses.stable_delta`: delta_y = -sum_{c != y} p_c, exact at any margin),
              kernel gradient = h (x) delta (h = pooled features), bias gradient = delta.
    "vmap"    the reference: jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0)) over the
              selected leaves (the frozen ones are closed over), one example per vmapped lane.
    "taps"    one batched backward pass that records every selected layer's input and output
              cotangent (module `taps`); the activation backward skips every weight-gradient
              convolution. With a projection the per-example gradient is never formed. Finiteness is
              checked on the layer inputs and cotangents (and the logits and images), not on B x D rows.
    "auto"    closed for fc-only subsets, else taps when every selected leaf belongs to a supported
              module (2-D Conv without groups/mask, models.PointwiseConv, Dense, BatchNorm on the last axis),
              else vmap.

Memory
    A step holds at most `max_grad_floats` (default 2 GiB of float32 = 512 Mi floats) per-example
    gradient floats per device: micro-batch = max(1, budget // floats per example), where floats
    per example is D (unprojected, or the vmap path) or the size of the projected intermediates.

Data parallelism
    `build` makes a 1-D Mesh over the process's local devices with the axis "batch". Images and
    labels are placed with NamedSharding(mesh, P("batch")), variables replicated (P()), and the step
    runs under jax.shard_map (each device computes its own examples; see `_jitted` for why not the
    SPMD partitioner). A batch is padded (repeating its last example) to a multiple of the device
    count and the padding dropped.

Multi-host
    Every process works alone on its own slice of the data set; nothing is exchanged between hosts:

        # on each of P hosts (e.g. under SLURM / a TPU pod launcher):
        import jax; jax.distributed.initialize()      # coordinator, process_count, process_id from env
        from resnet_jax.core import grads
        from resnet_jax.jobs import extract
        rows = grads.process_shard(N, jax.process_index(), jax.process_count())
        extract.run_extract(ckpt, data, f"store-{jax.process_index():05d}",
                            process=(jax.process_index(), jax.process_count()))

    `process_shard` splits N examples into contiguous, nearly equal ranges; concatenating the stores
    in process order gives the rows of a single-process run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.core import models, taps as taplib
from resnet_jax.errors import UserError
from resnet_jax.core.losses import cross_entropy, example_loss, stable_delta
from resnet_jax.core.params import get, layout, merge_params, model_key, select_paths, split_params
from resnet_jax.core.projection import DEFAULT_KRON, Projection, make_factors, project_leaf, project_pair

LABEL_SOURCES = ("true", "predicted")
METHODS = ("auto", "closed", "vmap", "taps")
DEFAULT_MAX_GRAD_FLOATS = (2 << 30) // 4  # 2 GiB of float32 per device


def check_label_source(label_source) -> None:
    """Refuses a gradient label other than "true" (the data's) or "predicted" (the model's argmax)."""
    if label_source not in LABEL_SOURCES:
        raise UserError(f"unknown label source {label_source!r}: choose one of {', '.join(LABEL_SOURCES)}")


def input_grads(model, variables, images, labels=None, label_source: str = "true"):
    """(B, H, W, 3): the gradient of each example's loss with respect to its own image (a batched
    backward pass of the summed loss: examples do not interact in eval mode)."""
    fn = GradFn(model, variables, params="fc", label_source=label_source, input_grad=True)
    return fn(images, labels)["input_grad"]


@dataclass(frozen=True)
class _Config:
    model: Any = field(compare=False, hash=False)
    key: tuple
    paths: tuple
    label_source: str
    proj: Projection | None
    method: str
    input_grad: bool
    taps: tuple  # ((module, taplib.Tap), ...) for method "taps"


def _leaf_owner(path: str) -> tuple[str, str]:
    mod, _, leaf = path.rpartition("/")
    return mod, leaf


def _step(cfg: _Config, sel, fro, batch_stats, factors, images, labels):
    model = cfg.model
    params = merge_params(sel, fro)
    variables = {"params": params, "batch_stats": batch_stats}
    taps = dict(cfg.taps)
    out = {}

    if cfg.method == "taps":
        modules = tuple(taps)
        eps = {m: jnp.zeros((images.shape[0],) + taps[m].out_shape, jnp.float32) for m in modules}

        def f(e):
            logits, inter, inputs, _, _ = taplib.tapped_apply(model, variables, images, modules, e)
            y = jnp.argmax(logits, -1) if cfg.label_source == "predicted" else labels
            y = jax.lax.stop_gradient(y)
            return jnp.sum(cross_entropy(logits, y)), (logits, inter["pooled"], inputs, y)

        _, vjp, (logits, pooled, inputs, y) = jax.vjp(f, eps, has_aux=True)
        cots = vjp(jnp.ones((), jnp.float32))[0]
        # Finite layer inputs and output cotangents give finite gradients (sums of their products,
        # barring float32 overflow): checking them is far cheaper than reading B x D gradients.
        factors_finite = jnp.ones((images.shape[0],), bool)
        for m in modules:
            for a in (inputs[m], cots[m]):
                factors_finite = factors_finite & jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
        rows = []
        for path in cfg.paths:
            mod, leaf = _leaf_owner(path)
            tap = taps[mod]
            bs = get(batch_stats, mod) if tap.kind == "bn" else None
            if cfg.proj is None:
                rows.append(taplib.leaf_grad(tap, leaf, inputs[mod], cots[mod], bs).reshape(images.shape[0], -1))
            else:
                shape = get(params, path).shape
                fac = factors[path]
                rows.append(taplib.leaf_proj(tap, leaf, shape, inputs[mod], cots[mod], bs, fac, cfg.proj))
    else:
        factors_finite = None
        logits, inter = models.apply(model, variables, images)
        pooled = inter["pooled"]
        y = jnp.argmax(logits, -1) if cfg.label_source == "predicted" else labels
        y = jax.lax.stop_gradient(y)
        grads = {}
        if cfg.method == "closed":
            delta = stable_delta(logits, y).astype(logits.dtype)
            # h (x) delta is finite when h and the logits are (no need to read B x D floats again)
            factors_finite = jnp.all(jnp.isfinite(pooled), axis=1)
            for path in cfg.paths:
                grads[path] = delta if path.endswith("/bias") else None
        else:
            def loss(s, f_, bs, image, label):
                return example_loss(model, merge_params(s, f_), bs, image, label)
            g = jax.vmap(jax.grad(loss), in_axes=(None, None, None, 0, 0))(sel, fro, batch_stats, images, y)
            grads = {p: get(g, p) for p in cfg.paths}
        rows = []
        for path in cfg.paths:
            n = images.shape[0]
            if cfg.method == "closed" and path.endswith("/kernel"):
                if cfg.proj is None:
                    rows.append((pooled[:, :, None] * delta[:, None, :]).reshape(n, -1))
                else:
                    fac = factors[path]
                    rows.append(project_pair(pooled @ fac[0], delta @ fac[1], cfg.proj))
                continue
            gl = grads[path]
            if cfg.proj is None:
                rows.append(gl.reshape(n, -1))
            else:
                rows.append(project_leaf(gl, factors[path], cfg.proj))

    if cfg.proj is None:
        # One (B, D_l) part per leaf, put side by side on the host: a device-side concatenate would
        # copy the largest array of the step once more (memory-bound on CPUs).
        parts = tuple(r.astype(jnp.float32) for r in rows)
    else:
        parts = ((sum(rows[1:], rows[0]) / jnp.sqrt(jnp.float32(cfg.proj.dim))).astype(jnp.float32),)
    out["gw"] = parts
    out["logits"] = logits
    out["probs"] = jax.nn.softmax(logits, -1)
    out["fm"] = pooled
    out["preds"] = jnp.argmax(logits, -1).astype(jnp.int32)
    out["labels"] = y.astype(jnp.int32)
    out["loss"] = cross_entropy(logits, y)
    # Images too: XLA's CPU max (relu, max-pool) may turn a NaN input into finite garbage.
    finite = jnp.all(jnp.isfinite(logits), axis=1) & jnp.all(jnp.isfinite(images.reshape(images.shape[0], -1)), 1)
    if factors_finite is not None and cfg.proj is None:
        finite = finite & factors_finite
    else:
        for part in parts:
            finite = finite & jnp.all(jnp.isfinite(part), axis=1)
    out["finite"] = finite
    if cfg.input_grad:
        def total(x):
            lg, _ = models.apply(model, variables, x)
            return jnp.sum(cross_entropy(lg, y))
        ig = jax.grad(total)(images)
        out["input_grad"] = ig
        out["finite"] = out["finite"] & jnp.all(jnp.isfinite(ig.reshape(ig.shape[0], -1)), axis=1)
    return out


_JIT_CACHE: dict = {}


def _jitted(cfg: _Config, mesh: Mesh | None = None):
    """The compiled step for `cfg`, cached. On several devices the step runs under jax.shard_map:
    every device runs the one-device program on its slice of the batch (examples are independent,
    nothing is communicated). Left to the SPMD partitioner instead, XLA (jax 0.10, CPU) returns
    wrong per-example conv weight gradients (the batch-grouped convolutions of vmap(grad)) on every
    device but the first."""
    n = 1 if mesh is None else mesh.devices.size
    key = (cfg, None if n == 1 else tuple(d.id for d in mesh.devices.flat))
    fn = _JIT_CACHE.get(key)
    if fn is None:
        step = partial(_step, cfg)
        if n > 1 and hasattr(jax, "shard_map"):
            # check_vma=False: the variables are replicated, and with the check on, the transpose of
            # their implicit broadcast would psum every per-example gradient over the devices.
            specs = dict(mesh=mesh, in_specs=(P(), P(), P(), P(), P("batch"), P("batch")), out_specs=P("batch"))
            try:
                step = jax.shard_map(step, check_vma=False, **specs)
            except TypeError:  # an older spelling
                step = jax.shard_map(step, check_rep=False, **specs)
        fn = _JIT_CACHE[key] = jax.jit(step)
    return fn


# ---------------------------------------------------------------------------------------------
# build / compute

def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "batch" over `devices` (default: this process's local devices)."""
    devs = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devs), ("batch",))


def process_shard(n: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """The contiguous range of the n examples that process `process_index` of `process_count` handles."""
    i = jax.process_index() if process_index is None else int(process_index)
    c = jax.process_count() if process_count is None else int(process_count)
    if c < 1 or not 0 <= i < c:
        raise UserError(f"process index {i} is not in [0, {c}): pass an index below the process count")
    return range(n * i // c, n * (i + 1) // c)


class GradFn:
    """A compiled per-example gradient step: `fn(images, labels, ids=None) -> dict of numpy arrays`
    gw (B, D or k), logits (B, C), probs (B, C), fm (B, d), preds (B,), labels (B,) (the labels the
    loss used), loss (B,), and input_grad (B, H, W, 3) when asked for."""

    def __init__(self, model, variables, *, params="fc", label_source="true", project_dim=None, seed=0,
                 projection="rademacher", kron=DEFAULT_KRON, method="auto", max_grad_floats=None,
                 max_grad_bytes=None, devices=None, input_grad=False):
        check_label_source(label_source)
        if method not in METHODS:
            raise UserError(f"unknown gradient method {method!r}: choose one of {', '.join(METHODS)}")
        self.model = model
        self.paths = tuple(select_paths(variables["params"], params))
        self.params_spec = params
        self.layout = layout(variables["params"], params)
        self.label_source = label_source
        self.proj = None if project_dim is None else Projection(project_dim, int(seed), projection, tuple(kron))
        self.seed = int(seed)
        self.requested_method = method
        self.input_grad = bool(input_grad)
        if max_grad_floats is None:
            max_grad_floats = DEFAULT_MAX_GRAD_FLOATS if max_grad_bytes is None else int(max_grad_bytes) // 4
        if int(max_grad_floats) < 1:
            raise UserError(f"gradient memory budget must be positive, got {max_grad_floats}")
        self.max_grad_floats = int(max_grad_floats)
        self.mesh = make_mesh(devices)
        self.n_devices = self.mesh.devices.size
        rep = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("batch"))
        sel, fro = split_params(variables["params"], self.paths)
        self._sel, self._fro, self._bs = jax.device_put((sel, fro, variables["batch_stats"]), rep)
        self._factors = {} if self.proj is None else jax.device_put(make_factors(self.proj, self.layout), rep)
        self._plans: dict = {}

    @property
    def dim(self) -> int:
        """Columns of gw: k with a projection, else D."""
        return self.layout.dim if self.proj is None else self.proj.dim

    def plan(self, image_shape) -> tuple[_Config, int]:
        """(config, micro-batch per device) for images of shape (H, W, 3)."""
        image_shape = tuple(int(s) for s in image_shape)
        if image_shape in self._plans:
            return self._plans[image_shape]
        method, taps = self.requested_method, ()
        fc_only = all(p.startswith("fc/") for p in self.paths) and self.model.__class__ is models.ResNet
        if method == "closed" and not fc_only:
            raise UserError("method 'closed' only covers fc parameters: use params=fc or method auto")
        if method == "auto" and fc_only:
            method = "closed"
        if method in ("auto", "taps"):
            modules = tuple(dict.fromkeys(_leaf_owner(p)[0] for p in self.paths))
            probe = taplib.probe(self.model, {"params": merge_params(self._sel, self._fro), "batch_stats": self._bs},
                           image_shape, modules)
            bad = [m for m, t in probe.items() if t is None]
            if bad and method == "taps":
                raise UserError(f"method 'taps' does not support module {bad[0]}: use method vmap")
            method = "vmap" if bad else "taps"
            taps = tuple((m, probe[m]) for m in modules) if not bad else ()
        proj = None if self.proj is None else dataclasses.replace(self.proj, seed=0)  # seed: in the factors
        cfg = _Config(self.model, model_key(self.model), self.paths, self.label_source, proj, method, self.input_grad, taps)
        per_example = self._floats_per_example(cfg, image_shape)
        mb = max(1, self.max_grad_floats // max(1, per_example))
        self._plans[image_shape] = (cfg, mb)
        return cfg, mb

    def device_step(self, image_shape):
        """Returns (step, method): step(images, labels) runs the compiled step on device arrays that
        are already sharded over the mesh (for benchmarks: no padding, no host transfers)."""
        cfg, _ = self.plan(image_shape)
        fn = _jitted(cfg, self.mesh)
        return partial(fn, self._sel, self._fro, self._bs, self._factors), cfg.method

    def grad_floats_per_example(self, image_shape) -> int:
        """Per-example gradient floats one step holds for images of shape (H, W, 3) (memory planning)."""
        return self._floats_per_example(self.plan(image_shape)[0], tuple(image_shape))

    def _floats_per_example(self, cfg: _Config, image_shape) -> int:
        D = self.layout.dim
        if cfg.method == "vmap":
            return D + (self.proj.dim if self.proj else 0)
        if cfg.method == "closed":
            return D if self.proj is None else self.proj.dim * 2
        total, biggest = 0, 0
        for m, tap in cfg.taps:
            pos = math.prod(tap.out_shape[:-1]) if len(tap.out_shape) > 1 else 1
            if self.proj is None:
                if tap.kind == "conv":
                    biggest = max(biggest, pos * math.prod(tap.conf[0]) * tap.in_shape[-1])
            else:
                k1, k2 = self.proj.kron
                total += pos * self.proj.blocks * (k1 + k2) + self.proj.blocks * k1 * k2
        if self.proj is None:
            return D + biggest
        return total + self.proj.dim

    def __call__(self, images, labels=None, ids=None, *, pad_to: int | None = None) -> dict:
        return self.collect(self.launch(self.put(images, labels, lazy=True, pad_to=pad_to)), ids)

    def put(self, images, labels=None, *, lazy: bool = False, pad_to: int | None = None) -> "Placed":
        """Checks a batch and transfers it to the devices, in chunks of the step's size (the last
        padded by repeating its last example); `lazy` defers each chunk's transfer to its launch.
        `pad_to`: the batch size of a stream; a smaller batch (its last) is cut and padded as one of
        that size would be, so that every batch of the stream runs the same compiled step.
        Thread-safe: a prefetching thread can place the next batch while this one computes."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            models.validate_images(images)
        n = images.shape[0]
        if self.label_source == "true":
            if labels is None:
                raise UserError("label source 'true' needs labels: pass them or use label source 'predicted'")
            labels = np.asarray(labels, np.int32).reshape(-1)
            C = self.model.num_classes
            if labels.shape[0] != n:
                raise UserError(f"{labels.shape[0]} labels for {n} images: pass one label per image")
            if n and (labels.min() < 0 or labels.max() >= C):
                raise UserError(f"label {int(labels.max() if labels.max() >= C else labels.min())} is outside "
                                f"[0, {C}): the data's classes do not match the model's {C}")
        else:
            labels = np.zeros((n,), np.int32)
        cfg, mb = self.plan(images.shape[1:])
        nd = self.n_devices
        group = nd * mb
        rows = max(n, int(pad_to or 0))
        chunks = max(1, -(-rows // group))
        size = -(-rows // chunks)
        size = -(-size // nd) * nd

        def chunk(start):
            x, y = images[start:start + size], labels[start:start + size]
            real = x.shape[0]
            x, y = pad_rows(x, size), pad_rows(y, size)  # to the fixed chunk size
            return (jax.device_put(x, self._batch_sharding), jax.device_put(y, self._batch_sharding), start, real)

        starts = range(0, n, size)
        return Placed(n, cfg, (chunk(s) for s in starts) if lazy else [chunk(s) for s in starts])

    def launch(self, placed: "Placed") -> tuple:
        """Dispatches the steps of a placed batch (asynchronously) and returns them for `collect`:
        all at once when its chunks were placed eagerly, else one by one as `collect` goes."""
        fn = _jitted(placed.cfg, self.mesh)
        steps = ((fn(self._sel, self._fro, self._bs, self._factors, xs, ys), start, real)
                 for xs, ys, start, real in placed.chunks)
        return placed.n, (steps if isinstance(placed.chunks, Iterator) else list(steps))

    def collect(self, launched: tuple, ids=None) -> dict:
        """Waits for launched steps; returns the dict of numpy arrays of the class docstring."""
        n, steps = launched
        dims = [math.prod(shape) for _, shape, _ in self.layout.entries] if self.proj is None else [self.proj.dim]
        offsets = np.cumsum([0] + dims)
        out: dict = {"gw": np.empty((n, int(offsets[-1])), np.float32)}

        def collect(res, start, real):
            for k, v in res.items():
                if k == "gw":
                    for part, lo, hi in zip(v, offsets[:-1], offsets[1:]):
                        out["gw"][start:start + real, lo:hi] = np.asarray(part)[:real]
                else:
                    a = np.asarray(v)[:real]
                    if k not in out:
                        out[k] = np.empty((n,) + a.shape[1:], a.dtype)
                    out[k][start:start + real] = a

        pending = None
        for step in steps:  # (lazy launch: dispatches the next chunk before the last is collected)
            if pending is not None:
                collect(*pending)
            pending = step
        if pending is not None:
            collect(*pending)
        if n == 0:
            return {}
        finite = out.pop("finite")
        if not finite.all():
            bad = np.flatnonzero(~finite)
            names = [str(ids[i]) if ids is not None else f"#{i}" for i in bad[:10]]
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise UserError(f"NaN or Inf in the images, logits or gradients of {len(bad)} image(s): "
                            f"{', '.join(names)}{more}; check these images and the checkpoint's weights")
        return out


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Returns x (n, ...) padded to (size, ...) by repeating its last row (x itself when n >= size)."""
    return x if len(x) >= size else np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)])


class Placed(NamedTuple):
    """A batch on the devices (`GradFn.put`): n examples, the step's configuration and its chunks
    (images, labels, first row, real rows)."""

    n: int
    cfg: Any
    chunks: Any


def build(model, variables, **kwargs) -> GradFn:
    """Returns a GradFn (see its docstring and `GradFn.__init__` for the options)."""
    return GradFn(model, variables, **kwargs)


def compute(model, variables, images, labels=None, *, params="fc", label_source="true", project_dim=None,
            seed=0, ids=None, **kwargs) -> dict:
    """One-shot `build(...)(images, labels, ids)`; the compiled step is cached per configuration."""
    fn = build(model, variables, params=params, label_source=label_source, project_dim=project_dim,
               seed=seed, **kwargs)
    return fn(images, labels, ids)

