"""JAX's persistent compilation cache, shared by every command (a second run skips the compiles)."""
from __future__ import annotations

import os


def enable() -> None:
    """Turns on the persistent cache in RESNET_JAX_CACHE (default ~/.cache/resnet-jax/xla)."""
    import jax

    cache = os.environ.get("RESNET_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "resnet-jax", "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
