"""The fed device: prefetch queue, background writer, batch size from free memory."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from resnet_jax.core import models
from resnet_jax.core.prefetch import (BackgroundWriter, activation_bytes_per_example, auto_batch_size,
                                      choose_batch_size, free_device_bytes, prefetch)


def test_prefetch_yields_in_order_and_runs_ahead_by_at_most_depth():
    produced = []
    consumed = 0
    ahead = []

    def slow_square(i):
        produced.append(i)
        ahead.append(len(produced) - consumed)
        return i * i

    out = []
    for value in prefetch(range(20), slow_square, depth=2):
        time.sleep(0.005)  # the consumer is slower: the producer fills the queue and waits
        consumed += 1
        out.append(value)
    assert out == [i * i for i in range(20)]
    # at most `depth` waiting in the queue, plus the item in the consumer's hands, plus the one
    # being transformed when the queue is full
    assert max(ahead) <= 2 + 2
    assert max(ahead) >= 2  # it did run ahead


def test_prefetch_overlaps_work_with_the_consumer():
    def work(i):
        time.sleep(0.05)
        return i

    t = time.perf_counter()
    for _ in prefetch(range(8), work):
        time.sleep(0.05)
    overlapped = time.perf_counter() - t
    assert overlapped < 8 * 0.1 * 0.8  # serial would be 0.8 s; overlapped about 0.45 s


def test_prefetch_raises_the_error_at_the_failing_item():
    def boom(i):
        if i == 3:
            raise ValueError("bad image 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad image 3"):
        for v in prefetch(range(10), boom):
            got.append(v)
    assert got == [0, 1, 2]


def test_leaving_the_loop_stops_the_thread():
    before = threading.active_count()
    gen = prefetch(iter(range(10 ** 6)), depth=2)
    assert next(gen) == 0
    gen.close()
    assert threading.active_count() == before


def test_background_writer_writes_in_order_and_reports_errors(tmp_path):
    order = []

    def write(i):
        time.sleep(0.01)
        (tmp_path / f"{i}.txt").write_text(str(i))
        order.append(i)

    with BackgroundWriter(depth=2) as writer:
        for i in range(6):
            writer.submit(write, i)
    assert order == list(range(6)) and sorted(os.listdir(tmp_path)) == [f"{i}.txt" for i in range(6)]

    def fail():
        raise OSError("disk full")

    writer = BackgroundWriter()
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter() as w:
            w.submit(fail)


def test_choose_batch_size():
    assert choose_batch_size(1000, None, default=64) == 64  # no memory statistics (CPU)
    # half of 1e6 bytes holds 500 examples of 1000 bytes: the largest power of two below is 256
    assert choose_batch_size(1000, 10 ** 6) == 256
    assert choose_batch_size(1000, 10 ** 6, multiple=8) == 8 * 32  # 62 groups of 8 -> 32 groups
    assert choose_batch_size(1000, 10 ** 12) == 1024  # capped
    assert choose_batch_size(10 ** 9, 10 ** 6) == 1  # nothing fits: one example
    assert choose_batch_size(10 ** 9, 10 ** 6, multiple=4) == 4


class _FakeDevice:
    def __init__(self, limit, used):
        self.stats = {"bytes_limit": limit, "bytes_in_use": used}

    def memory_stats(self):
        return self.stats


def test_batch_size_from_device_memory():
    import jax

    assert free_device_bytes(_FakeDevice(10 ** 9, 4 * 10 ** 8)) == 6 * 10 ** 8
    cpu = jax.devices("cpu")[0]
    if cpu.memory_stats() is None:
        assert free_device_bytes(cpu) is None
    model = models.create("resnet18", 10)
    act = activation_bytes_per_example(model, 72)
    # the stem's conv output alone is 36 x 36 x 64 float32; the whole net holds several times that
    assert act > 36 * 36 * 64 * 4 * 5
    assert activation_bytes_per_example(models.create("resnet18", 10, dtype=jax.numpy.bfloat16), 72) < 0.6 * act
    per_example = 2 * act + 4000
    free = 300 * per_example
    want = 1 << int(np.floor(np.log2(free // 2 // per_example)))  # 150 fit in half: 128
    assert auto_batch_size(model, 72, 4000, devices=[_FakeDevice(free, 0)]) == want == 128
    assert auto_batch_size(model, 72, 4000, devices=[_FakeDevice(free, 0)] * 2) == 2 * 64


def test_extract_without_batch_size_resumes_with_the_stores_own(tiny_ckpt, tiny_folder, tmp_path):
    from resnet_jax.jobs import extract

    spec = f"folder:{tiny_folder}"
    out = str(tmp_path / "store")
    with pytest.raises(extract._Stop):
        extract.run_extract(tiny_ckpt, spec, out, batch_size=2, progress=False, stop_after_shards=1, save_gw=True)
    resumed = extract.run_extract(tiny_ckpt, spec, out, batch_size=None, progress=False, save_gw=True)
    assert resumed["run"]["batch_size"] == 2 and resumed["complete"]
    fresh = extract.run_extract(tiny_ckpt, spec, str(tmp_path / "auto"), batch_size=None, progress=False,
                                save_gw=True)
    assert fresh["run"]["batch_size"] == 64  # the CPU reports no memory statistics: the default
    np.testing.assert_allclose(np.load(os.path.join(out, "gw.npy")), np.load(str(tmp_path / "auto" / "gw.npy")),
                               rtol=1e-5, atol=1e-6)
