"""ResNet-18/34/50/101/152 in Flax, the same architecture as torchvision's (v1.5).

The stride of a bottleneck block sits on its 3x3 convolution, BatchNorm uses eps 1e-5, and the
stem's max-pool is padded (1, 1), so torchvision weights (see `convert.py`) give torchvision's
logits. Parameter names follow torchvision's: `conv1`, `bn1`, `layer3_5/conv2`, `fc`, ...

A forward pass returns the logits and the named intermediates the analyses use:
`stem`, `layer1` ... `layer4` (NHWC stage outputs), `pooled` (N, d) and `logits` (N, C).
Each stage output also passes through `Module.perturb`, so the gradient with respect to it is
the gradient with respect to a zero `perturbations` entry of the same name (Grad-CAM).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from resnet_jax.constants import STAGES
from resnet_jax.errors import UserError

INTERMEDIATES = STAGES + ("pooled", "logits")
STEMS = ("standard", "small")

# He normal with fan_out, as torchvision initialises its convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PointwiseConv(nn.Module):
    """A bias-free 1x1 convolution (VALID padding) computed as a matrix product.

    Same parameter as `nn.Conv` (`kernel` (1, 1, Cin, Cout)) and the same result; XLA:CPU runs
    the matrix product 2-4x faster than a 1x1 convolution, its weight gradient most of all.
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    kernel_init: Callable = conv_init

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        if self.strides > 1:
            x = x[:, ::self.strides, ::self.strides]
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def make_conv(features: int, kernel_size, strides=(1, 1), padding="VALID", *, name=None, dtype=jnp.float32,
              kernel_init=conv_init) -> nn.Module:
    """Returns a bias-free convolution module: `PointwiseConv` for 1x1 VALID kernels, else `nn.Conv`."""
    if tuple(kernel_size) == (1, 1) and padding == "VALID" and strides[0] == strides[1]:
        return PointwiseConv(features, strides[0], dtype=dtype, kernel_init=kernel_init, name=name)
    return nn.Conv(features, kernel_size, strides, padding=padding, use_bias=False, dtype=dtype,
                   kernel_init=kernel_init, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    planes: int
    stride: int = 1
    conv: Callable = nn.Conv
    norm: Callable = nn.BatchNorm
    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.planes, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.planes:
            residual = self.conv(self.planes, (1, 1), (self.stride, self.stride), padding="VALID",
                                 name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convolutions, 4x channel expansion."""

    planes: int
    stride: int = 1
    conv: Callable = nn.Conv
    norm: Callable = nn.BatchNorm
    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        out_channels = self.planes * self.expansion
        y = self.conv(self.planes, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(out_channels, (1, 1), padding="VALID", name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_channels:
            residual = self.conv(out_channels, (1, 1), (self.stride, self.stride), padding="VALID",
                                 name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """A torchvision-compatible ResNet.

    `__call__(x (N, H, W, 3), train=False)` returns `(logits (N, C), intermediates)` where
    intermediates maps each name in `INTERMEDIATES` to its array. `train=True` normalises with
    batch statistics and needs `mutable=["batch_stats"]`; the analyses use running statistics.
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int = 1000
    stem: str = "standard"
    dtype: Any = jnp.float32
    momentum: float = 0.9  # of the running BatchNorm statistics (0: the batch's own, see train.precise_batch_stats)

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = partial(make_conv, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                       dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "standard":
            x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "small":
            x = conv(64, (3, 3), (1, 1), padding=((1, 1), (1, 1)), name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
        else:
            raise UserError(f"unknown stem {self.stem!r}: choose one of {', '.join(STEMS)}")
        inter = {"stem": self.perturb("stem", x)}
        x = inter["stem"]
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = self.block_cls(64 * 2 ** stage, stride, conv=conv, norm=norm,
                                   name=f"layer{stage + 1}_{b}")(x)
            x = self.perturb(f"layer{stage + 1}", x)
            inter[f"layer{stage + 1}"] = x
        pooled = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        logits = jnp.asarray(logits, jnp.float32)
        inter["pooled"] = jnp.asarray(pooled, jnp.float32)
        inter["logits"] = logits
        return logits, inter


ARCHITECTURES = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], Bottleneck),
    "resnet101": ([3, 4, 23, 3], Bottleneck),
    "resnet152": ([3, 8, 36, 3], Bottleneck),
}
MODEL_NAMES = tuple(ARCHITECTURES)


def create(name: str, num_classes: int = 1000, stem: str = "standard", dtype=jnp.float32) -> ResNet:
    """Returns the (unbound) Flax module for `name`, e.g. `create("resnet50", 10)`."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}: choose one of {', '.join(STEMS)}")
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    stage_sizes, block = ARCHITECTURES[name]
    return ResNet(stage_sizes=stage_sizes, block_cls=block, num_classes=int(num_classes), stem=stem, dtype=dtype)


def init(model: ResNet, rng, image_size: int) -> dict:
    """Returns variables `{"params": ..., "batch_stats": ...}` for (N, image_size, image_size, 3) inputs."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(partial(model.init, train=False))(rng, x)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def variable_shapes(model: ResNet, image_size: int = 224) -> dict:
    """Returns the variables' `jax.ShapeDtypeStruct`s without allocating or compiling."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), x)
    return {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}


def count_params(tree) -> int:
    """Returns the total number of elements in a pytree of arrays or shape structs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def apply(model: ResNet, variables: dict, images, train: bool = False):
    """Returns `(logits (N, C), intermediates)`; with `train=True` also the new batch_stats.

    In eval mode this is pure in `variables`: wrap it with `jit`, `vmap` or `grad`.
    """
    if train:
        (logits, inter), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, inter, updates["batch_stats"]
    return model.apply(variables, images, train=False)


_FORWARDS: dict = {}


def forward_fn(model: ResNet):
    """Returns jit(f)(variables, images) -> (logits (B, C), pooled features (B, d)) in eval mode,
    one per architecture: every checkpoint of a run (and every call) shares its compiled programs.
    Keyed by the module's repr, since a Flax module holding a list attribute is not hashable."""
    key = repr(model)
    fn = _FORWARDS.get(key)
    if fn is None:
        def forward(variables, images):
            logits, inter = apply(model, variables, images)
            return logits, inter["pooled"]

        fn = _FORWARDS[key] = jax.jit(forward)
    return fn


def validate_images(images, image_size: int | None = None) -> None:
    """Raises UserError unless `images` is a float (N, H, W, 3) batch of the expected size."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"images must have shape (N, H, W, 3), got {shape}: pass a batch of RGB images")
    if image_size is not None and shape[1:3] != (image_size, image_size):
        raise UserError(f"images are {shape[1]}x{shape[2]} but the model expects {image_size}x{image_size}: "
                        f"resize them (the data loaders do this with --image-size)")
