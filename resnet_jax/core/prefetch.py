"""Keeping the accelerator fed: a bounded prefetch queue, a background writer, batch size from memory.

* `prefetch(items, transform, depth)` runs `transform` (read, decode, `jax.device_put`) on a
  background thread up to `depth` items ahead of the consumer, so the next batch is on the device
  when the current one finishes. Errors raised there reach the consumer at the item that failed.
* `BackgroundWriter` writes results (shards) on one background thread, in submission order, with
  at most `depth` writes waiting; the caller keeps the device busy meanwhile.
* `auto_batch_size` picks a batch size from the device's free memory (`device.memory_stats()`,
  GPUs and TPUs) and an estimate of the bytes one example needs; where a device reports no
  memory (the CPU) it returns the default.
"""
from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

_DONE = object()


class _Failure(NamedTuple):
    error: BaseException


def prefetch(items: Iterable, transform: Callable = lambda item: item, depth: int = 2) -> Iterator:
    """Yields transform(item) for each item, computed on a background thread at most `depth` items
    ahead. Closing the generator (or leaving the loop) stops the thread after its current item."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(value) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if stop.is_set() or not offer(transform(item)):
                    return
            offer(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            offer(_Failure(e))

    thread = threading.Thread(target=work, name="resnet-jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value
    finally:
        stop.set()
        thread.join()


class BackgroundWriter:
    """Runs `submit(fn, *args)` jobs on one thread, in order, at most `depth` waiting (`submit`
    blocks beyond that). `wait()` waits for every job and raises the first job's error; as a
    context manager it waits on exit (and re-raises a job's error unless the block raised)."""

    def __init__(self, depth: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="resnet-jax-writer")
        self._slots = threading.Semaphore(depth + 1)  # depth waiting + the one being written
        self._futures: list[concurrent.futures.Future] = []

    def submit(self, fn: Callable, *args) -> None:
        self._raise_failed()
        self._slots.acquire()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self._futures = [f for f in self._futures if not f.done()]

    def wait(self) -> None:
        concurrent.futures.wait(self._futures)
        self._raise_failed()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            concurrent.futures.wait(self._futures)
            if exc_type is None:
                self._raise_failed()
        finally:
            self._pool.shutdown(wait=True)
        return False


# ----------------------------------------------------------------------------- batch size from memory

def free_device_bytes(device=None) -> int | None:
    """Bytes the device can still allocate (bytes_limit - bytes_in_use of `memory_stats()`), or None
    where the device reports no memory statistics (the CPU)."""
    import jax

    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented on this platform
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))


def activation_bytes_per_example(model, image_size: int) -> int:
    """Bytes of every module output of one example's forward pass at `image_size` (the activations
    a backward pass keeps), in the model's compute dtype; shape-only (no compile, no memory)."""
    import flax.linen as nn
    import jax

    total = 0

    def count(next_fun, args, kwargs, ctx):
        nonlocal total
        y = next_fun(*args, **kwargs)
        for leaf in jax.tree_util.tree_leaves(y):
            if hasattr(leaf, "shape") and leaf.ndim >= 1:
                total += math.prod(leaf.shape[1:]) * np.dtype(leaf.dtype).itemsize
        return y

    def forward(v, x):
        with nn.intercept_methods(count):
            return model.apply(v, x, train=False)[0]

    from resnet_jax.core import models

    variables = models.variable_shapes(model, image_size)
    jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32))
    return int(total)


def choose_batch_size(bytes_per_example: int, free_bytes: int | None, *, default: int = 64,
                      fraction: float = 0.5, largest: int = 1024, multiple: int = 1) -> int:
    """The largest power of two (times `multiple`) whose examples fit `fraction` of `free_bytes`,
    at most `largest`, at least `multiple`; `default` when free_bytes is None (no statistics)."""
    if free_bytes is None:
        return default
    groups = int(fraction * free_bytes) // max(1, int(bytes_per_example) * multiple)
    groups = max(1, min(groups, largest // multiple))
    return multiple * (1 << (groups.bit_length() - 1))


def auto_batch_size(model, image_size: int, extra_bytes_per_example: int = 0, *, default: int = 64,
                    devices=None) -> int:
    """A batch size for `model` at `image_size` from the first device's free memory: activations
    (twice, forward and backward) plus `extra_bytes_per_example` (e.g. per-example gradients) per
    example, a multiple of the device count; `default` on devices without memory statistics."""
    import jax

    devices = list(devices or jax.local_devices())
    per_example = 2 * activation_bytes_per_example(model, image_size) + int(extra_bytes_per_example)
    return choose_batch_size(per_example, free_device_bytes(devices[0]), default=default, multiple=len(devices))
