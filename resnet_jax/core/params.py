"""Parameter paths, subsets and the row layout of per-example gradients.

Parameter subsets (`params=`)
    Parameters are named by their '/'-joined paths: `conv1/kernel`, `bn1/scale`,
    `layer4_1/conv2/kernel`, `fc/kernel`, `fc/bias`, ... A subset is one of the named ones
    `fc` (the "gradient weights" GW, default), `stem` (conv1, bn1), `layer1` ... `layer4` (all blocks
    of that stage), `all`; or a glob over the paths (`layer4_*/conv2/*`; `*` also matches '/'); or
    a module prefix (`layer4_1/conv2`); or a regular expression `re:<regex>` (full match); several
    may be joined with commas. The gradient is taken only with respect to the selected leaves.

Row layout (unprojected), D = number of selected parameters
    Leaves are ordered by module path (tuple order of the path components, which is jax's
    tree order), and inside one module weights (`kernel`, `scale`) come before `bias`. Each leaf
    is flattened row-major in its Flax shape and the leaves are concatenated. For `fc` this is the
    fc kernel gradient (d, C) row-major, then the bias gradient (C): D = d*C + C.
    `Layout.entries` gives (path, shape, offset) of every block.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Sequence

import jax

from resnet_jax.errors import UserError

NAMED_SUBSETS = ("fc", "stem", "layer1", "layer2", "layer3", "layer4", "all")
_WEIGHT_NAMES = ("kernel", "scale", "embedding")


def path_tuple(path) -> tuple[str, ...]:
    """Returns the keys of a jax key path as strings."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _order_key(path: tuple[str, ...]):
    return (path[:-1], 0 if path[-1] in _WEIGHT_NAMES else 1, path[-1])


def param_paths(params) -> list[str]:
    """Returns every parameter path ('/'-joined) in the documented row order."""
    paths = [path_tuple(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return ["/".join(p) for p in sorted(paths, key=_order_key)]


def _match(pattern: str, paths: list[str]) -> list[str]:
    if pattern == "all":
        return list(paths)
    if pattern == "stem":
        return [p for p in paths if p.split("/")[0] in ("conv1", "bn1")]
    if re.fullmatch(r"layer\d+", pattern):
        return [p for p in paths if p.split("/")[0].startswith(pattern + "_")]
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise UserError(f"bad parameter regex {pattern[3:]!r}: {e}; fix the pattern after 're:'") from None
        return [p for p in paths if rx.fullmatch(p)]
    hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern) or p.startswith(pattern.rstrip("/") + "/")]
    return hits


def select_paths(params, pattern: str = "fc") -> list[str]:
    """Returns the selected parameter paths, in row order; UserError if a pattern matches nothing."""
    paths = param_paths(params)
    if not isinstance(pattern, str) or not pattern.strip():
        raise UserError(f"empty parameter subset {pattern!r}: pass fc, layer4, all or a glob like 'layer4_*/conv2/*'")
    chosen: set[str] = set()
    for part in (s.strip() for s in pattern.split(",")):
        if not part:
            continue
        hits = _match(part, paths)
        if not hits:
            examples = ", ".join(_examples(paths))
            raise UserError(f"parameter pattern {part!r} matches no parameter: use one of "
                            f"{', '.join(NAMED_SUBSETS)}, a glob or 're:<regex>' over paths such as {examples}")
        chosen.update(hits)
    return [p for p in paths if p in chosen]


def _examples(paths: list[str]) -> list[str]:
    picks = [paths[0]] if paths else []
    for want in ("layer1_0/bn1/scale", "layer4_1/conv2/kernel", "fc/kernel", "fc/bias"):
        if want in paths:
            picks.append(want)
    return picks or paths[:4]


def get(tree, path: str):
    """Returns the leaf (or subtree) of `tree` at the '/'-joined `path`."""
    for k in path.split("/"):
        tree = tree[k]
    return tree


def split_params(params, paths: Sequence[str]):
    """Returns (selected, frozen): two nested dicts that together hold every leaf of `params`."""
    chosen = set(paths)
    sel: dict = {}
    fro: dict = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(params):
        t = path_tuple(p)
        d = sel if "/".join(t) in chosen else fro
        for k in t[:-1]:
            d = d.setdefault(k, {})
        d[t[-1]] = leaf
    return sel, fro


def merge_params(a, b):
    """Returns the union of two nested dicts of leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_params(out[k], v) if k in out and isinstance(v, dict) else v
    return out


@dataclass(frozen=True)
class Layout:
    """The unprojected row layout: `entries` = ((path, shape, offset), ...), `dim` = D."""

    entries: tuple

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(e[0] for e in self.entries)

    @property
    def dim(self) -> int:
        if not self.entries:
            return 0
        path, shape, off = self.entries[-1]
        return off + math.prod(shape)

    def to_json(self) -> list:
        return [{"path": p, "shape": list(s), "offset": o} for p, s, o in self.entries]


def layout(params, pattern: str = "fc") -> Layout:
    """Returns the Layout of the rows for subset `pattern` of `params` (arrays or shape structs)."""
    entries, off = [], 0
    for path in select_paths(params, pattern):
        shape = tuple(get(params, path).shape)
        entries.append((path, shape, off))
        off += math.prod(shape)
    return Layout(tuple(entries))


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def model_key(model) -> tuple:
    """A hashable description of a Flax module's configuration (lists become tuples)."""
    fields = [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
    return (type(model).__module__, type(model).__qualname__) + tuple(
        (f, _freeze(getattr(model, f))) for f in fields)

