"""The shared model pool (streaming/pool.py).

`BatchingWorker` with recording batch functions: batches form across concurrent callers and never exceed max_batch,
results reach the right caller in order, a lone request is not held back, a failing batch fails exactly its own
callers, cancelled callers are skipped, a full queue refuses at once, stop() fails what is queued and joins.
`ModelPool` with a stand-in embedder (loading, lazy loading, per-clip validation, close), then with the real
resemblyzer embedder: embeddings through the pool from 8 concurrent tasks equal one-at-a-time `embed_batch` calls.

Timing is asserted loosely only (shared CI machines are noisy); ordering is made deterministic with gates (a
threading.Event the batch function waits on) instead of sleeps.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from config import Settings
from streaming.pool import BATCH, BatchingWorker, ModelPool, PoolClosed, PoolSaturated
from streaming.speaker import SpeakerEmbedder

SAMPLE_WAV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sample.wav"
SR = 16000


class Recorder:
    """A batch function that records every batch, optionally waits on a gate, and fails on items named 'bad'."""

    def __init__(self, delay_s: float = 0.0, gated: bool = False) -> None:
        self.batches: list[list] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.entered = threading.Event()  # set when a batch is inside the function
        self.threads: set[str] = set()
        if not gated:
            self.gate.set()

    def __call__(self, items: list) -> list:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if "bad" in items:
            raise ValueError("bad item in batch")
        return [("done", x) for x in items]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def make_worker(fn, max_batch=8, max_wait_ms=20.0, queue_size=64) -> BatchingWorker:
    w = BatchingWorker("test", fn, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size)
    w.start()
    return w


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def install_handler(errors: list[dict]) -> None:
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))


# --- BatchingWorker ---------------------------------------------------------------------------------------------


async def test_batches_form_across_tasks_and_results_go_to_their_callers():
    rec = Recorder(delay_s=0.005)
    w = make_worker(rec, max_batch=8, max_wait_ms=20, queue_size=128)
    try:

        async def client(c: int) -> list:
            # each client fires many concurrent requests, like windows of several streams
            return await asyncio.gather(*(w.submit((c, i)) for i in range(25)))

        results = await asyncio.gather(*(client(c) for c in range(4)))
        for c, res in enumerate(results):
            assert res == [("done", (c, i)) for i in range(25)]
        assert sum(rec.sizes) == 100
        assert max(rec.sizes) <= 8
        assert max(rec.sizes) > 1
        assert rec.threads == {"pool-test"}  # batch_fn only ever runs in the worker thread
        st = w.stats()
        assert st["items"] == 100 and st["batches"] == len(rec.batches) and st["mean_batch"] > 1
        assert st["max_queued"] > 1 and st["last_batch_ms"] > 0
    finally:
        w.stop()


async def test_submit_many_keeps_order_and_mixes_with_others():
    rec = Recorder()
    w = make_worker(rec, max_batch=5, max_wait_ms=20)
    try:
        many, single = await asyncio.gather(w.submit_many(list(range(12))), w.submit("x"))
        assert many == [("done", i) for i in range(12)]
        assert single == ("done", "x")
        assert max(rec.sizes) <= 5
        assert await w.submit_many([]) == []
    finally:
        w.stop()


async def test_lone_request_is_served_after_about_max_wait():
    rec = Recorder()
    w = make_worker(rec, max_batch=32, max_wait_ms=20)
    try:
        started = time.perf_counter()
        assert await w.submit("only") == ("done", "only")
        assert time.perf_counter() - started < 1.0  # ~20 ms; loose on purpose
        assert rec.sizes == [1]
    finally:
        w.stop()


async def test_failing_batch_reaches_exactly_its_callers_and_worker_goes_on():
    rec = Recorder()
    w = make_worker(rec, max_batch=4, max_wait_ms=50)
    try:
        items = [f"ok{i}" for i in range(11)] + ["bad"]
        outcomes = await asyncio.gather(*(w.submit(x) for x in items), return_exceptions=True)
        failed_batch = next(b for b in rec.batches if "bad" in b)
        for item, outcome in zip(items, outcomes, strict=True):
            if item in failed_batch:
                assert isinstance(outcome, ValueError), (item, outcome)
            else:
                assert outcome == ("done", item)
        assert w.stats()["failed_batches"] == 1
        assert await w.submit("after") == ("done", "after")
    finally:
        w.stop()


async def test_wrong_number_of_results_fails_the_batch():
    w = make_worker(lambda items: items[:-1], max_batch=4, max_wait_ms=5)
    try:
        with pytest.raises(RuntimeError, match="results for"):
            await w.submit("x")
    finally:
        w.stop()


async def test_cancelled_callers_are_skipped_and_nothing_breaks():
    errors: list[dict] = []
    await install_handler(errors)
    rec = Recorder(gated=True)
    w = make_worker(rec, max_batch=2, max_wait_ms=200)  # the first two requests make one full batch at once
    try:
        first = asyncio.create_task(w.submit("in-flight-kept"))
        dropped_in_flight = asyncio.create_task(w.submit("in-flight-cancelled"))
        await asyncio.to_thread(rec.entered.wait, 5)  # batch 1 is inside batch_fn, blocked on the gate
        queued_cancelled = asyncio.create_task(w.submit("queued-cancelled"))
        last = asyncio.create_task(w.submit("queued-kept"))
        await wait_until(lambda: w.queued == 2)
        queued_cancelled.cancel()
        dropped_in_flight.cancel()  # no-op for the worker: its result is simply dropped
        await asyncio.sleep(0)
        rec.gate.set()
        assert await first == ("done", "in-flight-kept")
        assert await last == ("done", "queued-kept")
        for t in (queued_cancelled, dropped_in_flight):
            with pytest.raises(asyncio.CancelledError):
                await t
        assert all("queued-cancelled" not in b for b in rec.batches)  # never computed
        assert w.stats()["skipped_cancelled"] == 1
        assert await w.submit("still-works") == ("done", "still-works")
        assert errors == []
    finally:
        rec.gate.set()
        w.stop()


async def test_cancelling_submit_many_withdraws_its_queued_items():
    rec = Recorder(gated=True)
    w = make_worker(rec, max_batch=1, max_wait_ms=0)
    try:
        blocker = asyncio.create_task(w.submit("blocker"))
        await asyncio.to_thread(rec.entered.wait, 5)
        many = asyncio.create_task(w.submit_many(["a", "b", "c"]))
        await wait_until(lambda: w.queued == 3)
        many.cancel()
        await asyncio.sleep(0)
        rec.gate.set()
        assert await blocker == ("done", "blocker")
        with pytest.raises(asyncio.CancelledError):
            await many
        assert await w.submit("next") == ("done", "next")
        assert rec.batches == [["blocker"], ["next"]]
    finally:
        rec.gate.set()
        w.stop()


async def test_full_queue_raises_at_once_and_saturation_reports_it():
    rec = Recorder(gated=True)
    w = make_worker(rec, max_batch=1, max_wait_ms=0, queue_size=4)
    try:
        in_flight = asyncio.create_task(w.submit("in-flight"))
        await asyncio.to_thread(rec.entered.wait, 5)
        assert w.saturation == 0.0
        waiting = [asyncio.create_task(w.submit(f"q{i}")) for i in range(3)]
        await wait_until(lambda: w.queued == 3)
        assert w.saturation == pytest.approx(0.75)
        with pytest.raises(PoolSaturated):  # all or nothing: 2 more do not fit, none is queued
            await asyncio.wait_for(w.submit_many(["x", "y"]), 1.0)
        assert w.queued == 3
        waiting.append(asyncio.create_task(w.submit("q3")))
        await wait_until(lambda: w.queued == 4)
        assert w.saturation == 1.0
        started = time.perf_counter()
        with pytest.raises(PoolSaturated, match="saturated"):
            await asyncio.wait_for(w.submit("one-too-many"), 1.0)
        assert time.perf_counter() - started < 0.5  # refused at once, not after waiting for room
        with pytest.raises(ValueError, match="queue holds"):  # can never fit
            await w.submit_many(list(range(5)))
        rec.gate.set()
        assert await in_flight == ("done", "in-flight")
        assert await asyncio.gather(*waiting) == [("done", f"q{i}") for i in range(4)]
        assert w.saturation == 0.0
        assert w.stats()["max_queued"] == 4
    finally:
        rec.gate.set()
        w.stop()


# --- the batch lane ------------------------------------------------------------------------------------------------


async def test_stop_fails_queued_requests_finishes_running_batch_and_joins():
    rec = Recorder(gated=True)
    w = make_worker(rec, max_batch=1, max_wait_ms=0)
    in_flight = asyncio.create_task(w.submit("in-flight"))
    await asyncio.to_thread(rec.entered.wait, 5)
    queued = [asyncio.create_task(w.submit(f"q{i}")) for i in range(3)]
    await wait_until(lambda: w.queued == 3)
    stopping = asyncio.create_task(asyncio.to_thread(w.stop, 5.0))
    for t in queued:
        with pytest.raises(PoolClosed, match="stopped"):
            await asyncio.wait_for(t, 2.0)
    assert not w.running
    with pytest.raises(PoolClosed):
        await w.submit("after-stop")
    rec.gate.set()  # the batch inside batch_fn finishes and is delivered
    await asyncio.wait_for(stopping, 5.0)
    assert await in_flight == ("done", "in-flight")
    assert not w._thread.is_alive()
    assert rec.batches == [["in-flight"]]
    w.stop()  # idempotent


async def test_thread_init_runs_once_in_the_worker_thread():
    calls: list[str] = []
    w = BatchingWorker("init", Recorder(), max_batch=4, max_wait_ms=1, queue_size=8,
                       thread_init=lambda: calls.append(threading.current_thread().name))
    w.start()
    try:
        assert await asyncio.gather(w.submit(1), w.submit(2)) == [("done", 1), ("done", 2)]
        assert await w.submit(3) == ("done", 3)
        assert calls == ["pool-init"]
    finally:
        w.stop()


async def test_submit_before_start_is_refused():
    w = BatchingWorker("idle", Recorder(), max_batch=2, max_wait_ms=1, queue_size=2)
    with pytest.raises(PoolClosed):
        await w.submit(1)
    w.stop()


# --- ModelPool with a stand-in embedder ------------------------------------------------------------------------


class FakeEmbedder(SpeakerEmbedder):
    """Deterministic 'embedding': statistics of the clip, normalised. Records batch sizes."""

    name = "fake"
    dim = 4
    min_samples = 100

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.warmed = False

    def check_clip(self, clip) -> np.ndarray:
        wav = np.ascontiguousarray(clip, dtype=np.float32)
        if wav.ndim != 1 or len(wav) < self.min_samples:
            raise ValueError("unusable clip")
        return wav

    def warm_up(self) -> None:
        self.warmed = True

    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        self.batch_sizes.append(len(clips))
        return np.array([[len(c), c.mean(), c.std(), 1.0] for c in clips], np.float32)


def pool_settings(**kw) -> Settings:
    base = {"pool_max_batch": 8, "pool_max_wait_ms": 20.0, "pool_queue_size": 64, "model_device": "cpu"}
    return Settings(_env_file=None, **{**base, **kw})


@pytest.fixture
def fake(monkeypatch) -> FakeEmbedder:
    import streaming.speaker

    embedder = FakeEmbedder()
    monkeypatch.setattr(streaming.speaker, "load_embedder", lambda settings: embedder)
    return embedder


async def test_model_pool_loads_warms_and_batches(fake):
    pool = await ModelPool.create(pool_settings())
    try:
        assert pool.loaded and fake.warmed and pool.embedder_name == "fake" and pool.embedding_dim == 4
        rng = np.random.default_rng(1)
        clips = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(200, 2000, 24)]
        singles = await asyncio.gather(*(pool.embed(c) for c in clips))
        expected = fake.embed_batch(clips)
        np.testing.assert_allclose(np.stack(singles), expected, atol=1e-6)
        many = await pool.embed_many(clips[:5])
        assert many.shape == (5, 4)
        assert (await pool.embed_many([])).shape == (0, 4)
        st = pool.stats()
        assert st["loaded"] and st["speaker"]["items"] == 29 and st["speaker"]["mean_batch"] > 1
        assert not pool.saturated and pool.saturation == 0.0
    finally:
        await pool.close()
    with pytest.raises(PoolClosed):
        await pool.embed(np.ones(200, np.float32))


async def test_model_pool_lazy_loads_on_first_use(fake):
    pool = await ModelPool.create(pool_settings(lazy_models=True))
    try:
        assert not pool.loaded and pool.embedder_name == "resemblyzer"  # the configured backend until loaded
        with pytest.raises(RuntimeError):
            _ = pool.embedding_dim
        emb = await pool.embed(np.ones(500, np.float32))
        assert pool.loaded and fake.warmed and emb.shape == (4,)
    finally:
        await pool.close()


async def test_model_pool_bad_clip_fails_only_its_own_request(fake):
    pool = await ModelPool.create(pool_settings())
    try:
        good = np.ones(500, np.float32)
        outcomes = await asyncio.gather(pool.embed(good), pool.embed_many([good, np.ones(10, np.float32)]),
                                        pool.embed(good), return_exceptions=True)
        assert isinstance(outcomes[1], ValueError) and "clip 1" in str(outcomes[1])
        assert outcomes[0].shape == (4,) and outcomes[2].shape == (4,)
    finally:
        await pool.close()


async def test_model_pool_submits_more_clips_than_a_queue_holds_in_chunks(fake):
    pool = await ModelPool.create(pool_settings(pool_queue_size=5, pool_max_batch=2, pool_batch_queue_size=3,
                                                pool_batch_max_batch=2))
    try:
        rng = np.random.default_rng(2)
        clips = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(200, 2000, 23)]
        expected = fake.embed_batch(clips)
        fake.batch_sizes.clear()
        np.testing.assert_allclose(await pool.embed_many(clips, BATCH), expected, atol=1e-6)
        np.testing.assert_allclose(await pool.embed_many(clips), expected, atol=1e-6)  # live lane too
        assert max(fake.batch_sizes) <= 2
        st = pool.stats()
        assert st["speaker_batch"]["items"] == 23 and st["speaker_batch"]["max_queued"] <= 3
        assert st["speaker"]["items"] == 23 and st["speaker"]["max_queued"] <= 5
    finally:
        await pool.close()


async def test_full_batch_lane_leaves_the_pool_open_to_new_streams():
    from server import _pool_has_room

    embedder = GatedEmbedder()
    pool = await ModelPool.create(pool_settings(pool_max_batch=1, pool_queue_size=10, pool_batch_queue_size=10,
                                                pool_batch_max_batch=1), embedder=embedder)
    clip = np.ones(200, np.float32)
    try:
        bulk = [asyncio.create_task(pool.embed_many([clip, clip], BATCH)) for _ in range(6)]  # 12 clips, room for 10
        await wait_until(lambda: pool.stats()["speaker_batch"]["queued"] >= 9)
        outcomes = await asyncio.gather(*bulk[5:], return_exceptions=True)
        assert isinstance(outcomes[0], PoolSaturated)  # the sixth request found the lane full
        assert not pool.saturated and pool.saturation == 0.0
        assert await _pool_has_room(pool, wait_s=0.1) is True
        live = asyncio.create_task(pool.embed(clip))
        embedder.gate.set()
        assert (await live).shape == (4,)
        assert all(r.shape == (2, 4) for r in await asyncio.gather(*bulk[:5]))
    finally:
        embedder.gate.set()
        await pool.close()


class BatchThreadGatedEmbedder(FakeEmbedder):
    """Blocks in the model call only in the pool's batch worker thread; records each call's thread priority."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.nice: dict[str, int] = {}

    def embed_batch(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        name = threading.current_thread().name
        self.nice[name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if name == "pool-speaker-batch":
            self.gate.wait(10)
        return super().embed_batch(clips)


async def test_batch_work_runs_in_its_own_low_priority_thread_and_never_delays_live_work():
    """Bulk clips go to the batch worker (its own thread, nice 19 on Linux): while one of its model calls is
    stuck, live windows are still embedded at once, in the live worker at normal priority."""
    embedder = BatchThreadGatedEmbedder()
    pool = await ModelPool.create(pool_settings(pool_batch_queue_size=8, pool_batch_max_batch=1), embedder=embedder)
    clip = np.ones(200, np.float32)
    try:
        bulk = asyncio.create_task(pool.embed_many([clip, clip, clip], BATCH))
        await wait_until(lambda: "pool-speaker-batch" in embedder.nice)  # inside the model, stuck
        live = await asyncio.wait_for(asyncio.gather(*(pool.embed(clip) for _ in range(5))), 5.0)
        assert len(live) == 5 and not bulk.done()
        assert pool.stats()["speaker_batch"]["queued"] >= 1 and pool.saturation == 0.0
        embedder.gate.set()
        assert (await asyncio.wait_for(bulk, 5.0)).shape == (3, 4)
        assert embedder.nice["pool-speaker"] == os.getpriority(os.PRIO_PROCESS, 0)
        if sys.platform == "linux":
            assert embedder.nice["pool-speaker-batch"] == 19
        with pytest.raises(ValueError, match="no lane"):
            await pool.embed_many([clip], "bulk")
    finally:
        embedder.gate.set()
        await pool.close()
    with pytest.raises(PoolClosed):
        await pool.embed_many([clip], BATCH)


# --- ModelPool with the real resemblyzer embedder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def resemblyzer():
    pytest.importorskip("resemblyzer")
    try:
        from streaming.speaker import load_embedder
    except ImportError as exc:  # streaming/speaker.py not written yet
        pytest.skip(f"streaming.speaker is not available: {exc}")
    embedder = load_embedder(Settings(_env_file=None, speaker_backend="resemblyzer", model_device="cpu"))
    embedder.warm_up()
    return embedder


def sample_clips(n: int, seed: int = 0) -> list[np.ndarray]:
    audio, sr = sf.read(SAMPLE_WAV, dtype="float32")
    assert sr == SR and audio.ndim == 1
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        length = int(rng.uniform(1.0, 4.0) * SR)
        start = int(rng.integers(0, len(audio) - length))
        clips.append(audio[start : start + length].copy())
    return clips


async def test_real_embeddings_through_pool_equal_one_at_a_time(resemblyzer):
    clips = sample_clips(24)
    reference = np.stack([resemblyzer.embed_batch([c])[0] for c in clips])

    pool = await ModelPool.create(pool_settings(pool_max_batch=8, pool_max_wait_ms=50), embedder=resemblyzer)
    try:
        results: dict[int, np.ndarray] = {}

        async def requester(t: int) -> None:  # 8 streams, each asking for its windows one by one
            for k in range(t, len(clips), 8):
                results[k] = await pool.embed(clips[k])

        await asyncio.gather(*(requester(t) for t in range(8)))
        got = np.stack([results[k] for k in range(len(clips))])
        assert got.shape == (24, resemblyzer.dim) and got.dtype == np.float32
        assert np.abs(got - reference).max() < 1e-4
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        st = pool.stats()["speaker"]
        assert st["items"] == 24 and st["mean_batch"] > 1 and st["failed_batches"] == 0

        many = await pool.embed_many(clips[:6])  # one connection's several windows at once
        assert np.abs(many - reference[:6]).max() < 1e-4
    finally:
        await pool.close()


class GatedEmbedder(FakeEmbedder):
    """Blocks in the model call until released: a pool kept busy, so its queue fills."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def embed_batch(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        self.gate.wait(10)
        return super().embed_batch(clips)


async def test_saturated_pool_makes_new_streams_wait_then_refuses():
    from server import _pool_has_room

    embedder = GatedEmbedder()
    pool = await ModelPool.create(pool_settings(pool_max_batch=1, pool_queue_size=10), embedder=embedder)
    clip = np.ones(200, np.float32)
    try:
        busy = [asyncio.create_task(pool.embed(clip))]  # taken by the worker, which blocks in the model
        await asyncio.sleep(0.1)
        busy += [asyncio.create_task(pool.embed(clip)) for _ in range(9)]  # 9 of 10 queue places: saturated
        await asyncio.sleep(0.1)
        assert pool.saturated
        started = time.monotonic()
        assert await _pool_has_room(pool, wait_s=0.3) is False  # waited briefly, then refused
        assert time.monotonic() - started >= 0.3
        embedder.gate.set()
        assert await _pool_has_room(pool, wait_s=5.0) is True  # room again once the queue drains
        await asyncio.gather(*busy)
    finally:
        embedder.gate.set()
        await pool.close()
