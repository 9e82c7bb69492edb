"""Batch forming policy of the dynamic batcher (no model: a stand-in records what each forward got)."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from adapterserve.runtime.server.batcher import Batcher


class RecordingModel:
    """Takes `per_row` seconds per row, like a CPU forward; records every batch it was given."""

    def __init__(self, per_row: float) -> None:
        self.per_row = per_row
        self.batches: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def infer(self, rows, on_forward_done=None) -> None:
        with self.lock:
            self.batches.append((threading.current_thread().name, len(rows)))
        time.sleep(self.per_row * len(rows))


class BandedModel:
    """Runs a pool as forwards of `band` rows each, `per_forward` seconds apart, like the runtime's
    length bands."""

    def __init__(self, band: int, per_forward: float) -> None:
        self.band, self.per_forward = band, per_forward

    def infer(self, rows, on_forward_done=None) -> None:
        for i in range(0, len(rows), self.band):
            time.sleep(self.per_forward)
            if on_forward_done is not None and i + self.band < len(rows):  # like Runtime.infer: not the last
                on_forward_done(rows[i:i + self.band])


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
    assert sizes[0] == 8 and max(sizes) == 8, f"the burst was not split between the idle workers: {sizes}"
    assert sum(sizes) == 16 and len({name for name, _ in model.batches}) == 2


def test_a_worker_takes_only_its_share_while_another_is_busy():
    """One worker is busy with a long pool when a burst arrives: the free worker takes half the burst,
    not all of it (run on one thread of a 2-core CPU, a whole burst would take twice as long as it
    need), and the rest is still served."""
    async def run(model):
        pool = ThreadPoolExecutor(2, thread_name_prefix="model")
        batcher = Batcher(model, pool, max_batch_tokens=100_000, max_batch_size=64, max_wait_ms=0, max_queue=10_000,
                          workers=2)
        batcher.start()
        await asyncio.sleep(0.01)
        long = await batcher.submit(_rows(30), None)
        await asyncio.sleep(0.05)  # one worker is inside the 30-row forward, the other waits for work
        burst = [await batcher.submit(_rows(2), None) for _ in range(8)]
        await asyncio.gather(long.future, *[w.future for w in burst])
        await batcher.close()
        pool.shutdown()

    model = RecordingModel(per_row=0.01)
    asyncio.run(run(model))
    (busy, first), (free, second) = model.batches[:2]
    assert first == 30 and busy != free
    assert second == 8, f"the free worker took {second} of the 16 queued rows, not its share of 8"
    assert sum(n for _, n in model.batches) == 30 + 16


def test_requests_are_answered_when_their_forwards_are_done_not_the_whole_pool():
    async def run():
        pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        batcher = Batcher(BandedModel(band=2, per_forward=0.05), pool, max_batch_tokens=100_000, max_batch_size=64,
                          max_wait_ms=0, max_queue=10_000)
        batcher.start()
        await asyncio.sleep(0.01)
        works = [await batcher.submit(_rows(2), None) for _ in range(4)]  # one pool, four forwards
        done_at = {}
        for w in works:
            w.future.add_done_callback(lambda f, w=w: done_at.setdefault(id(w), time.perf_counter()))
        await asyncio.gather(*[w.future for w in works])
        await batcher.close()
        pool.shutdown()
        return [done_at[id(w)] for w in works], [w.inference_ns for w in works]

    done, inference_ns = asyncio.run(run())
    assert done == sorted(done)
    assert done[-1] - done[0] > 0.1, "the first request waited for the whole pool"
    assert inference_ns[0] < inference_ns[-1] and inference_ns[-1] >= 0.2e9


def test_a_request_that_can_never_fit_is_bad_input_not_retry():
    import pytest

    from adapterserve.runtime.errors import InvalidInputError, ResourceExhaustedError

    async def run():
        pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        batcher = Batcher(RecordingModel(per_row=0.01), pool, max_batch_tokens=100_000, max_batch_size=64,
                          max_wait_ms=0, max_queue=8)
        with pytest.raises(InvalidInputError, match="can never fit the queue of 8"):
            await batcher.submit(_rows(9), None)
        first = await batcher.submit(_rows(6), None)  # not started: the queue holds 6 of 8
        with pytest.raises(ResourceExhaustedError, match="retry"):
            await batcher.submit(_rows(3), None)  # fits an empty queue: back off and retry
        batcher.start()
        await first.future
        await batcher.close()
        pool.shutdown()

    asyncio.run(run())


def test_long_rows_run_in_their_own_lane_beside_short_ones():
    """A request with a row of long_row_tokens or more goes to the long lane's thread; a short request
    that arrives while that forward runs is answered before it ends."""
    release = threading.Event()
    seen = []

    class Model:
        def infer(self, rows, on_forward_done=None) -> None:
            seen.append((threading.current_thread().name.rsplit("_", 1)[0], [r.encoded.length for r in rows]))
            if any(r.encoded.length >= 100 for r in rows):
                assert release.wait(10), "the test never released the long forward"

    def row(length):
        return SimpleNamespace(encoded=SimpleNamespace(length=length))

    async def scenario():
        pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        long_pool = ThreadPoolExecutor(1, thread_name_prefix="model-long")
        batcher = Batcher(Model(), pool, max_batch_tokens=100_000, max_batch_size=64, max_wait_ms=0, max_queue=1000,
                          long_row_tokens=100, long_executor=long_pool)
        batcher.start()
        long = await batcher.submit([row(500), row(8)], None)
        await asyncio.sleep(0.05)  # the long forward is now running, held until released
        short = await batcher.submit([row(8), row(12)], None)
        await asyncio.wait_for(short.future, 5)
        assert not long.future.done()
        release.set()
        await asyncio.wait_for(long.future, 5)
        assert batcher.pending_texts == 0
        await batcher.close()
        pool.shutdown()
        long_pool.shutdown()

    asyncio.run(scenario())
    assert seen == [("model-long", [500, 8]), ("model", [8, 12])]
