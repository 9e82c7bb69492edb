"""Batch forming policy of the dynamic batcher (no model: a stand-in records what each forward got)."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from runtime.batcher import Batcher


class RecordingModel:
    """Takes `per_row` seconds per row, like a CPU forward; records every batch it was given."""

    def __init__(self, per_row: float) -> None:
        self.per_row = per_row
        self.batches: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def infer(self, rows) -> None:
        with self.lock:
            self.batches.append((threading.current_thread().name, len(rows)))
        time.sleep(self.per_row * len(rows))


def _rows(n):
    return [SimpleNamespace(encoded=SimpleNamespace(length=8)) for _ in range(n)]


async def _burst(workers: int, requests: int, rows_each: int, model: RecordingModel) -> None:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="model")
    batcher = Batcher(model, pool, max_batch_tokens=100_000, max_batch_size=64, max_wait_ms=0, max_queue=10_000,
                      workers=workers)
    batcher.start()
    await asyncio.sleep(0.01)  # every batch loop is now waiting for work
    # submit() does not yield, so the whole burst is queued before any batch loop wakes up.
    burst = [await batcher.submit(_rows(rows_each), None) for _ in range(requests)]
    await asyncio.gather(*[w.future for w in burst])
    await batcher.close()
    pool.shutdown()


def test_one_worker_takes_the_whole_queued_burst():
    model = RecordingModel(per_row=0.002)
    asyncio.run(_burst(1, 8, 2, model))
    assert [n for _, n in model.batches] == [16]


def test_idle_workers_split_a_burst():
    model = RecordingModel(per_row=0.002)
    asyncio.run(_burst(2, 8, 2, model))
    sizes = [n for _, n in model.batches]
    assert sorted(sizes) == [8, 8], f"the burst was not split between the idle workers: {sizes}"
    assert len({name for name, _ in model.batches}) == 2
