"""resnet-jax: evaluate image classifiers through their per-example gradients.

The public API is `resnet_jax.api`, re-exported here: `import resnet_jax as rj`, then `rj.load_model`,
`rj.per_example_grads`, ... (`rj.__all__` lists every name). The names are loaded on first use, so
`import resnet_jax.metrics` (host side) does not import JAX.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

# In a checkout used without installing it (bin/, PYTHONPATH), metrics/, clustering/ and benchmarks/
# sit beside this folder: a finder maps resnet_jax.<name> to them (an install maps them itself).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BESIDE = {f"resnet_jax.{name}": os.path.join(_ROOT, name) for name in ("metrics", "clustering", "benchmarks")}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _BESIDE.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


if os.path.isfile(os.path.join(_ROOT, "metrics", "similarity.py")) and os.path.isfile(
        os.path.join(_ROOT, "pyproject.toml")):
    sys.meta_path.append(_CheckoutFinder())

__version__ = "0.1.0"

from resnet_jax._names import NAMES as _NAMES  # noqa: E402  (the API's names, without importing it)

__all__ = list(_NAMES)


def __getattr__(name):
    if name in __all__:
        value = getattr(importlib.import_module("resnet_jax.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
