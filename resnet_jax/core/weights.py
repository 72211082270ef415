"""Import torchvision ResNet weights (a `.pth`/`.pt` state_dict or a `.safetensors` file).

torchvision's `resnet18` ... `resnet152` (v1.5) map one to one onto `models.ResNet`:

    torchvision                          resnet-jax (params / batch_stats)
    conv1.weight (O, I, kH, kW)          params/conv1/kernel (kH, kW, I, O)
    bn1.weight / bn1.bias                params/bn1/scale / params/bn1/bias
    bn1.running_mean / running_var       batch_stats/bn1/mean / batch_stats/bn1/var
    bn1.num_batches_tracked              (accepted and ignored)
    layerS.B.convK / bnK                 layerS_B/convK / bnK
    layerS.B.downsample.0 / .1           layerS_B/downsample_conv / downsample_bn
    fc.weight (C, d) / fc.bias (C,)      params/fc/kernel (d, C) / params/fc/bias

The expected keys and shapes come from the model's own variable shapes (`models.variable_shapes`)
through this one mapping (`_spec`), so `torchvision_keys` and `from_state_dict` cannot disagree.
A `module.` prefix (a checkpoint saved from `nn.DataParallel`) is stripped.

Reading `.pth` needs torch (the `torch` extra); `.safetensors` needs only numpy. To make a
safetensors file from a torchvision model, with torch installed:

    from safetensors.torch import save_file
    save_file(model.state_dict(), "resnet50.safetensors")
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections import Counter
from typing import NamedTuple

import jax
import numpy as np

from resnet_jax.core import checkpoint, models
from resnet_jax.constants import IMAGE_SIZE_MAX, IMAGE_SIZE_MIN
from resnet_jax.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIXES = (".safetensors",)
SOURCE_FORMATS = {".pth": "pytorch", ".pt": "pytorch", ".safetensors": "safetensors"}
IGNORED = "num_batches_tracked"
DATAPARALLEL_PREFIX = "module."

# Our leaf name -> torchvision's, per collection. Conv and Dense kernels are both "kernel".
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# torchvision's state_dict order, used to sort the spec.
_TOP_ORDER = {"conv1": 0, "bn1": 1, "fc": 3}  # layerS_B sit between, at 2
_SUB_ORDER = {name: i for i, name in enumerate(
    ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"))}
_LEAF_ORDER = {name: i for i, name in enumerate(
    ("weight", "bias", "running_mean", "running_var", IGNORED))}


class _Entry(NamedTuple):
    torch_key: str
    torch_shape: tuple
    path: tuple | None  # (collection, module..., leaf) in our variables; None for num_batches_tracked
    kind: str  # "conv" (OIHW <-> HWIO), "dense" (transpose), "copy" or "ignored"


def _torch_module(modules: tuple) -> str:
    out = []
    for m in modules:
        block = re.fullmatch(r"layer(\d+)_(\d+)", m)
        out.append(f"layer{block[1]}.{block[2]}" if block else _MODULES.get(m, m))
    return ".".join(out)


def _order(entry: _Entry) -> tuple:
    parts = entry.torch_key.split(".")
    leaf = _LEAF_ORDER[parts[-1]]
    if not parts[0].startswith("layer"):
        return (_TOP_ORDER[parts[0]], 0, 0, 0, leaf)
    sub = parts[2] if parts[2] != "downsample" else ("downsample_conv" if parts[3] == "0" else "downsample_bn")
    return (2, int(parts[0][5:]), int(parts[1]), _SUB_ORDER[sub], leaf)


@functools.lru_cache(maxsize=16)
def _spec(model_name: str, num_classes: int, stem: str = "standard") -> tuple[_Entry, ...]:
    """Every torchvision key of the model, in torchvision's order, with where it goes in ours."""
    model = models.create(model_name, num_classes, stem)
    shapes = models.variable_shapes(model, 64)  # the variables do not depend on the image size
    entries, norms = [], set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        names = tuple(checkpoint._key((k,)) for k in path)
        collection, modules, leaf_name = names[0], names[1:-1], names[-1]
        shape = tuple(leaf.shape)
        kind = "copy"
        if leaf_name == "kernel":
            kind = "conv" if len(shape) == 4 else "dense"
            shape = (shape[3], shape[2], shape[0], shape[1]) if kind == "conv" else shape[::-1]
        if leaf_name == "scale":
            norms.add(modules)
        torch_key = f"{_torch_module(modules)}.{_LEAVES[collection, leaf_name]}"
        entries.append(_Entry(torch_key, shape, names, kind))
    for modules in norms:
        entries.append(_Entry(f"{_torch_module(modules)}.{IGNORED}", (), None, "ignored"))
    return tuple(sorted(entries, key=_order))


def torchvision_keys(model_name: str, num_classes: int = 1000, stem: str = "standard") -> list[tuple[str, tuple]]:
    """Returns [(torch key, torch shape), ...] in torchvision's state_dict order.

    Includes each BatchNorm's `num_batches_tracked` (shape ()), which `from_state_dict` accepts
    but does not need.
    """
    return [(e.torch_key, e.torch_shape) for e in _spec(model_name, int(num_classes), stem)]


def _strip_prefix(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = str(key)
        name = key[len(DATAPARALLEL_PREFIX):] if key.startswith(DATAPARALLEL_PREFIX) else key
        if name in out:
            raise UserError(f"weights hold both {name!r} and {DATAPARALLEL_PREFIX}{name!r}: "
                            f"keep one copy of each weight")
        out[name] = value
    return out


def guess_model(keys) -> str | None:
    """Names the torchvision ResNet whose block layout the keys have, if any."""
    blocks = Counter()
    bottleneck = False
    for key in keys:
        m = re.match(r"layer(\d+)\.(\d+)\.(\w+)", key)
        if m:
            blocks[int(m[1])] = max(blocks[int(m[1])], int(m[2]) + 1)
            bottleneck |= m[3] == "conv3"
    layout = [blocks[s] for s in (1, 2, 3, 4)]
    for name, (sizes, block) in models.ARCHITECTURES.items():
        if list(sizes) == layout and (block is models.Bottleneck) == bottleneck:
            return name
    return None


def _hint(model_name: str, keys) -> str:
    guess = guess_model(keys)
    if guess and guess != model_name:
        return f": the weights look like {guess}, not {model_name}; pass --model {guess}"
    return f": pass the torchvision {model_name} weights (or the right --model / --num-classes / --stem)"


def from_state_dict(state: dict, model_name: str, num_classes: int | None = None,
                    stem: str = "standard") -> dict:
    """Returns variables {"params", "batch_stats"} (nested dicts of float32 numpy arrays).

    `state` maps torchvision keys to arrays. `num_classes` defaults to `fc.weight`'s first
    dimension. A missing, unexpected or mis-shaped key raises UserError naming it.
    """
    state = _strip_prefix(state)
    if num_classes is None:
        if "fc.weight" not in state:
            raise UserError(f"weights lack fc.weight{_hint(model_name, state)}")
        num_classes = int(np.shape(state["fc.weight"])[0])
    spec = _spec(model_name, int(num_classes), stem)
    expected = {e.torch_key for e in spec}
    for e in spec:
        if e.kind != "ignored" and e.torch_key not in state:
            raise UserError(f"weights lack {e.torch_key} {e.torch_shape}{_hint(model_name, state)}")
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"unexpected weight {extra[0]} {tuple(np.shape(state[extra[0]]))}{more}"
                        f"{_hint(model_name, state)}")
    variables: dict = {}
    for e in spec:
        if e.kind == "ignored":
            continue
        value = state[e.torch_key]
        shape = tuple(np.shape(value))
        if shape != e.torch_shape:
            fix = (f": pass --num-classes {shape[0]} or the matching weights" if e.torch_key.startswith("fc.")
                   else _hint(model_name, state))
            raise UserError(f"weight {e.torch_key} has shape {shape}, {model_name} with {num_classes} classes "
                            f"needs {e.torch_shape}{fix}")
        try:
            value = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError(f"weight {e.torch_key} is not numeric ({type(value).__name__}): "
                            f"pass a state_dict of float tensors") from None
        if e.kind == "conv":
            value = value.transpose(2, 3, 1, 0)
        elif e.kind == "dense":
            value = value.T
        node = variables
        for name in e.path[:-1]:
            node = node.setdefault(name, {})
        node[e.path[-1]] = np.ascontiguousarray(value)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _torch_to_numpy(value, path: str, key: str):
    import torch

    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: "
                        f"save model.state_dict() with torch.save")
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()
    return value.numpy()


def read_weights(path: str) -> dict:
    """Returns {key: numpy array} from a `.pth`/`.pt` (torch) or `.safetensors` file."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise UserError(f"cannot read weights from {path}: unknown extension {suffix or '(none)'!r}; "
                        f"pass a .pth, .pt or .safetensors file")
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist: check the path")
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.numpy import load_file

        try:
            state = load_file(path)
        except Exception as e:  # truncated, not safetensors, or a dtype numpy lacks (bfloat16)
            raise UserError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}): "
                            f"pass a complete .safetensors file of float32 or float16 tensors") from None
    else:
        try:
            import torch
        except ImportError:
            raise UserError(f"reading .pth needs the torch extra: pip install 'resnet-jax[torch]', "
                            f"or convert {path} to .safetensors") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, or a pickled nn.Module
            why = (str(e).strip().splitlines() or [""])[0][:120]
            raise UserError(f"cannot read {path} with torch.load(weights_only=True) ({type(e).__name__}: {why}): "
                            f"pass a file written by torch.save(model.state_dict(), ...)") from None
        if isinstance(obj, dict):
            for inner in ("state_dict", "model"):
                if isinstance(obj.get(inner), dict):
                    obj = obj[inner]
                    break
        if not isinstance(obj, dict):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict: "
                            f"save model.state_dict() with torch.save")
        state = {str(k): _torch_to_numpy(v, path, k) for k, v in obj.items()}
    if not state:
        raise UserError(f"{path} holds no weights: pass a torchvision ResNet state_dict")
    return state


def convert(src: str, model_name: str, out_dir: str, num_classes: int | None = None, class_names=None,
            image_size: int = 224, stem: str = "standard", overwrite: bool = False) -> dict:
    """Converts torchvision weights `src` into a resnet-jax checkpoint (step 0) in `out_dir`.

    `class_names` defaults to ["class_0", "class_1", ...]: for ImageNet weights "class_i" is the
    i-th ImageNet-1k class in torchvision's order; pass the real names to see them in reports.
    The metadata says normalization "imagenet", `source` (the absolute path of `src`) and
    `source_format` ("pytorch" or "safetensors").

    Everything is converted in memory before anything is written; the checkpoint is written to a
    temporary directory beside `out_dir` and renamed into place, so a failure leaves no partial
    checkpoint. An `out_dir` that already holds a checkpoint is refused unless `overwrite=True`,
    which replaces the whole directory. Returns the metadata.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir, overwrite)
    if not IMAGE_SIZE_MIN <= int(image_size) <= IMAGE_SIZE_MAX:
        raise UserError(f"--image-size must be from {IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX}, "
                        f"got {image_size}")
    models.create(model_name, num_classes or 1, stem)  # validates the names early
    state = read_weights(src)
    variables = from_state_dict(state, model_name, num_classes, stem)
    finite_weights(variables, os.fspath(src))
    num_classes = variables["params"]["fc"]["bias"].shape[0]
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names given but the weights have {num_classes} classes: "
                        f"pass one name per class")
    suffix = os.path.splitext(os.fspath(src))[1].lower()
    meta = checkpoint.make_meta(model_name, num_classes, class_names, stem, image_size, "imagenet",
                                source=os.path.abspath(os.fspath(src)), source_format=SOURCE_FORMATS[suffix])
    _write(out_dir, variables, meta)
    return meta


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output {out_dir} is a file: pass a directory for the checkpoint")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if checkpoint.latest_step(out_dir) is None:
        raise UserError(f"output directory {out_dir} is not empty and holds no checkpoint: "
                        f"pass a new or empty directory")
    if not overwrite:
        raise UserError(f"output directory {out_dir} already holds a checkpoint: pass another directory "
                        f"or --overwrite to replace it")


def _write(out_dir: str, variables: dict, meta: dict) -> None:
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.convert-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a normal directory, not mkdtemp's 0700
    old = None
    try:
        checkpoint.save(tmp, 0, variables, meta)
        if os.path.isdir(out_dir):
            if os.listdir(out_dir):  # a checkpoint, with overwrite=True
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
                os.rename(out_dir, os.path.join(old, "ckpt"))
            else:
                os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out_dir):
            os.rename(os.path.join(old, "ckpt"), out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def finite_weights(tree, source: str) -> None:
    """Raises UserError naming the first array of `tree` (a nested dict of arrays) with NaN or inf."""
    def walk(node, path):
        if isinstance(node, dict):
            for key in sorted(node):
                walk(node[key], f"{path}/{key}" if path else str(key))
            return
        a = np.asarray(node)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(f"{source}: weight {path} holds {int((~np.isfinite(a)).sum())} NaN or infinite "
                            f"value(s): pass weights from a finished, healthy training run")
    walk(tree, "")
