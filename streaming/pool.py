"""The shared model pool: one per process, one batching worker per model, shared by every connection.

`BatchingWorker` is the cross-connection batcher (the pattern of WhisperLive's batch inference worker): requests from
every connection's coroutine go into one bounded queue; one thread per model takes them off in batches of up to
`max_batch` items, or whatever has arrived `max_wait_ms` after the first one, whichever comes first; it runs the
model once per batch and hands each request its own result.

Two lanes: "live" (the streams' work, and what a user waits on) and "batch" (the batch endpoints' bulk work, e.g.
`/v1/speaker-identification`'s segments), each its own bounded queue. The worker serves the batch lane only when
the live lane is empty, in model calls of at most `batch_max_batch` items, so a live request waits at most one such
call; batch items never count as live saturation (`saturation`, `ModelPool.saturated`: the live lane only).

Thread-safety contract of `BatchingWorker`:

- `submit`/`submit_many` run on an event loop (any number of loops, in practice the server's one). They never block
  on the worker: admission is a few list operations under a lock the worker only holds to pop requests (never while
  the model runs). A full lane raises `PoolSaturated` at once (a full batch lane never refuses live work, nor the
  reverse); a stopped worker raises `PoolClosed`.
- `batch_fn` is only ever called from the worker thread, one batch at a time, so the model needs no lock of its own.
- The worker thread touches no asyncio object except through `loop.call_soon_threadsafe` (one call per batch and
  loop); the futures are completed on their own loop. It skips requests whose future is already cancelled (a client
  that went away): they are never computed, and a result for one cancelled meanwhile is dropped. A requester's loop
  that has closed is ignored.
- If `batch_fn` raises (or returns the wrong number of results), every request of that batch gets the exception and
  the worker goes on with the next batch. A result that is an `ItemFailed` fails only its own request. Should the
  thread itself ever die, it fails everything queued and refuses new work rather than leaving callers waiting
  forever.
- `stop()` may be called from any thread (the lifespan calls it through `asyncio.to_thread`): queued requests fail
  with `PoolClosed`, a batch already inside `batch_fn` finishes and is delivered, the thread is joined.

`ModelPool` owns the workers (the VAD's and the speaker embedder's) and holds no per-stream state: each request
carries its own data and future. A VAD request carries one stream's own decoder and VAD state (`VadJob`); a stream
has at most one request in flight, so while it is queued or computed only the worker thread touches that state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from config import Settings
from streaming.model_source import redactor
from streaming.vad import StreamingVAD, VadBackend

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

SATURATED_AT = 0.9  # ModelPool.saturated: new streams are refused from this queue fill on


class PoolSaturated(RuntimeError):
    """The model's queue (of that lane) is full. Callers refuse new work (new streams close with 1013 and a retry
    hint; a batch request gets 503 with Retry-After)."""


class PoolClosed(RuntimeError):
    """The worker is not running (not started yet, stopped at shutdown, or its thread died)."""


@dataclass(slots=True)
class ItemFailed:
    """A `batch_fn` result that fails its own request only (the rest of the batch succeeds)."""

    error: BaseException


class VadJob(Protocol):
    """One stream's step on the VAD worker: its frames to decode and score. Both methods run in the worker thread,
    one job of a stream at a time (see `Pipeline`): they may touch that stream's decoder and VAD state only."""

    def prepare(self) -> tuple[StreamingVAD, np.ndarray]:
        """Decodes the frames; returns the stream's VAD and the model input of `StreamingVAD.take` (maybe empty)."""

    def complete(self, probs: np.ndarray) -> Any:
        """The probabilities of `prepare`'s model input; returns what the stream's request resolves to."""


def run_vad_jobs(backend: VadBackend, jobs: Sequence[VadJob]) -> list[Any]:
    """Blocking: prepares every job, scores all of them in one `speech_probs_batch`, completes them. A job whose
    `prepare` or `complete` raises gets an `ItemFailed`; a model error fails the whole call."""
    results: list[Any] = [None] * len(jobs)
    scoring: list[tuple[int, StreamingVAD, np.ndarray]] = []
    for i, job in enumerate(jobs):
        try:
            vad, model_in = job.prepare()
        except Exception as exc:
            results[i] = ItemFailed(exc)
            continue
        scoring.append((i, vad, model_in))
    probs = backend.speech_probs_batch([vad.state for _, vad, _ in scoring], [m for _, _, m in scoring])
    for (i, _, _), p in zip(scoring, probs, strict=True):
        try:
            results[i] = jobs[i].complete(p)
        except Exception as exc:
            results[i] = ItemFailed(exc)
    return results


@dataclass(slots=True)
class _Request:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _name_os_thread(name: str) -> None:
    """Best effort, Linux: the OS-level name of the calling thread (15 bytes), so `top -H`, /proc/<pid>/task/*/comm
    and the load benchmark can tell the pool's workers from the event loop."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _deliver(outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """Runs on the requester's loop: completes the futures that are still waited for."""
    for future, result, error in outcomes:
        if future.done():  # cancelled meanwhile
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


LIVE, BATCH = "live", "batch"  # the lanes of a BatchingWorker


class BatchingWorker(Generic[T, R]):
    """One worker thread per model. Gathers live requests from all connections into batches of up to `max_batch`
    items or `max_wait_ms` after the first item, whichever first; batch-lane requests, when no live one waits, in
    batches of up to `batch_max_batch` at once; calls `batch_fn(list[T]) -> Sequence[R]` (results in the
    same order) in that thread; resolves one asyncio future per request on the requester's event loop
    (`loop.call_soon_threadsafe`). If `batch_fn` raises, every future of that batch gets the exception; the worker
    goes on. See the module docstring for the full thread-safety contract."""

    def __init__(self, name: str, batch_fn: Callable[[list[T]], Sequence[R]], max_batch: int, max_wait_ms: float,
                 queue_size: int, thread_init: Callable[[], None] | None = None, batch_queue_size: int = 0,
                 batch_max_batch: int = 1) -> None:
        """`thread_init`: called once in the worker thread before the first batch (per-thread library settings,
        e.g. torch's thread count, which only takes full effect when set in the thread that runs the model).
        `batch_queue_size`: the batch lane's queue (0: no batch lane, its requests raise PoolSaturated);
        `batch_max_batch`: batch-lane items per model call (bounds how long a live request can wait behind one)."""
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or batch_queue_size < 0 or batch_max_batch < 1:
            raise ValueError(f"pool {name}: need max_batch >= 1, queue_size >= 1, max_wait_ms >= 0, "
                             "batch_queue_size >= 0, batch_max_batch >= 1")
        self.name = name
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.queue_size = queue_size
        self.batch_queue_size = batch_queue_size
        self.batch_max_batch = batch_max_batch
        self._batch_fn = batch_fn
        self._thread_init = thread_init
        self._pending: deque[_Request] = deque()  # the live lane
        self._batch_pending: deque[_Request] = deque()  # the batch lane
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False  # accepting work; guarded by _cond
        self._idle = False  # the worker waits for a first request (not gathering, not computing); guarded by _cond
        # statistics: written by the worker thread (and admission, for max_queued), read anywhere
        self._items = 0
        self._batches = 0
        self._failed_batches = 0
        self._skipped = 0
        self._max_queued = 0
        self._batch_items = 0
        self._max_batch_queued = 0
        self._last_batch_ms = 0.0
        self._busy_s = 0.0

    # --- lifecycle (any thread) ----------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"model pool {self.name}: worker already started")
            self._running = True
            self._thread = threading.Thread(target=self._run, name=f"pool-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Fails every queued request with `PoolClosed`, lets a running batch finish, joins the thread."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._fail_pending("stopped")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("model pool %s: worker still inside a batch after %.1f s; left behind", self.name, timeout)

    @property
    def running(self) -> bool:
        return self._running

    # --- requests (event loop) -----------------------------------------------------------------------------------

    async def submit(self, item: T, lane: str = LIVE) -> R:
        """`submit_many([item])[0]`, with one future and no gather (the VAD sends one request per stream and step)."""
        loop = asyncio.get_running_loop()
        request = _Request(item, loop.create_future(), loop)
        self._admit([request], lane)
        try:
            return await request.future
        finally:  # cancelled: the worker skips it
            request.future.cancel()

    async def submit_many(self, items: Sequence[T], lane: str = LIVE) -> list[R]:
        """Results in the order of `items`. All or nothing: every item is queued, or `PoolSaturated` is raised and
        none is. Cancelling the caller withdraws its requests still queued; a failed item withdraws the others.
        More items than the lane's queue holds: ValueError (submit them in chunks, as `ModelPool.embed_many`)."""
        if not items:
            return []
        capacity = self.lane_size(lane)
        if len(items) > capacity:
            raise ValueError(f"model pool {self.name}: {len(items)} items in one request, the {lane} queue holds "
                             f"{capacity}")
        loop = asyncio.get_running_loop()
        requests = [_Request(item, loop.create_future(), loop) for item in items]
        self._admit(requests, lane)
        futures = [r.future for r in requests]
        try:
            return list(await asyncio.gather(*futures))
        finally:  # cancelled, or one item failed: the rest need not be computed
            for f in futures:
                f.cancel()

    def lane_size(self, lane: str) -> int:
        if lane == LIVE:
            return self.queue_size
        if lane == BATCH:
            return self.batch_queue_size
        raise ValueError(f"model pool {self.name}: no lane {lane!r}")

    def _admit(self, requests: list[_Request], lane: str = LIVE) -> None:
        capacity = self.lane_size(lane)
        with self._cond:
            if not self._running:
                raise PoolClosed(f"model pool {self.name} is not running")
            queue = self._pending if lane == LIVE else self._batch_pending
            if len(queue) + len(requests) > capacity:
                raise PoolSaturated(f"model pool {self.name} is saturated ({len(queue)} {lane} requests queued)")
            queue.extend(requests)
            if lane == LIVE:
                self._max_queued = max(self._max_queued, len(queue))
            else:
                self._max_batch_queued = max(self._max_batch_queued, len(queue))
            # Wake the worker only when it waits for a first request or a batch just filled: waking it for every
            # request of a forming batch cost a thread switch (and the GIL) per request.
            if self._idle or len(self._pending) >= self.max_batch:
                self._cond.notify()

    # --- introspection -------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Live requests queued."""
        return len(self._pending)

    @property
    def batch_queued(self) -> int:
        return len(self._batch_pending)

    @property
    def saturation(self) -> float:
        """Queued live requests / queue_size, 0..1 (cancelled ones count until the worker drops them). The batch
        lane does not count: bulk work must not make the server look full to live streams."""
        return min(1.0, len(self._pending) / self.queue_size)

    def stats(self) -> dict[str, Any]:
        return {
            "items": self._items,
            "batches": self._batches,
            "mean_batch": round(self._items / self._batches, 2) if self._batches else 0.0,
            "failed_batches": self._failed_batches,
            "skipped_cancelled": self._skipped,
            "queued": len(self._pending),
            "max_queued": self._max_queued,
            "saturation": round(self.saturation, 4),
            "batch_items": self._batch_items,
            "batch_queued": len(self._batch_pending),
            "max_batch_queued": self._max_batch_queued,
            "batch_queue_size": self.batch_queue_size,
            "last_batch_ms": round(self._last_batch_ms, 2),
            "busy_s": round(self._busy_s, 3),
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_ms,
            "queue_size": self.queue_size,
        }

    # --- worker thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        _name_os_thread(f"pool-{self.name}")
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:
                log.exception("model pool %s: thread_init failed; serving anyway", self.name)
        try:
            while (batch := self._gather()) is not None:
                if batch:
                    self._serve(batch)
        except BaseException:  # a bug here must not leave callers waiting forever
            log.exception("model pool %s: worker thread died", self.name)
            with self._cond:
                self._running = False
            self._fail_pending("worker thread died")
            raise

    def _gather(self) -> list[_Request] | None:
        """The next batch (requests still waited for; may be empty when all were cancelled), or None once stopped.
        Live requests first, gathered for up to max_wait_ms; batch-lane ones only when no live one is queued, taken
        at once (a chunk arrives whole) and never mixed into a live batch, which would make it slower."""
        with self._cond:
            self._idle = True
            while self._running and not self._pending and not self._batch_pending:
                self._cond.wait()
            self._idle = False
            if not self._running:
                return None
            if not self._pending:
                return self._take(self._batch_pending, self.batch_max_batch, batch_lane=True)
            deadline = time.monotonic() + self.max_wait_ms / 1000.0
            while self._running and len(self._pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if not self._running:
                return None  # stop() fails what is queued
            return self._take(self._pending, self.max_batch)

    def _take(self, queue: deque[_Request], most: int, batch_lane: bool = False) -> list[_Request]:
        """Pops up to `most` requests still waited for (caller holds _cond)."""
        batch: list[_Request] = []
        while queue and len(batch) < most:
            request = queue.popleft()
            if request.future.cancelled():
                self._skipped += 1
            else:
                batch.append(request)
        if batch_lane:
            self._batch_items += len(batch)
        return batch

    def _serve(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            results = list(self._batch_fn([r.item for r in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"model pool {self.name}: {len(results)} results for {len(batch)} requests")
            outcomes = [(r.future, None, res.error) if isinstance(res, ItemFailed) else (r.future, res, None)
                        for r, res in zip(batch, results, strict=True)]
        except Exception as exc:  # the batch's callers get the error; the worker goes on
            log.warning("model pool %s: batch of %d failed: %r", self.name, len(batch), exc)
            self._failed_batches += 1
            outcomes = [(r.future, None, exc) for r in batch]
        elapsed = time.perf_counter() - started
        self._last_batch_ms = elapsed * 1000.0
        self._busy_s += elapsed
        self._items += len(batch)
        self._batches += 1
        self._post(batch, outcomes)

    def _post(self, batch: list[_Request], outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
        """One `call_soon_threadsafe` per requester loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(request.loop, []).append(outcome)
        for loop, loop_outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, loop_outcomes)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _fail_pending(self, why: str) -> None:
        with self._cond:
            pending = [*self._pending, *self._batch_pending]
            self._pending.clear()
            self._batch_pending.clear()
        if pending:
            log.info("model pool %s: %s; failing %d queued requests", self.name, why, len(pending))
            self._post(pending, [(r.future, None, PoolClosed(f"model pool {self.name} {why}")) for r in pending])


class ModelPool:
    """One per process, created in the app lifespan; holds no per-stream state. Owns the speaker embedder and the
    VAD backend, each with its batching worker."""

    def __init__(self, settings: Settings, torch_threads: int | None = None,
                 vad_backend: VadBackend | None = None) -> None:
        self._settings = settings
        self._embedder = None
        self._load_lock = asyncio.Lock()
        self._loading = False
        self._load_error: str | None = None  # the last failed load of the embedder, and when (monotonic)
        self._load_failed_at = 0.0
        self.torch_threads = torch_threads
        self.vad_backend = vad_backend
        self._speaker = BatchingWorker("speaker", self._embed_batch, settings.pool_max_batch,
                                       settings.pool_max_wait_ms, settings.pool_queue_size,
                                       thread_init=self._init_worker_thread,
                                       batch_queue_size=settings.pool_batch_queue_size,
                                       batch_max_batch=settings.pool_batch_max_batch)
        self._vad = BatchingWorker("vad", self._vad_batch, settings.vad_max_batch, settings.vad_max_wait_ms,
                                   settings.pool_queue_size, thread_init=self._init_worker_thread)

    @classmethod
    async def create(cls, settings: Settings, embedder: Any | None = None, torch_threads: int | None = None,
                     vad_backend: VadBackend | None = None) -> ModelPool:
        """Loads (`streaming.speaker.load_embedder`, in a thread) and warms up the embedder unless
        `settings.lazy_models`; starts the workers.

        `embedder`: an already loaded and warmed-up `SpeakerEmbedder` to use instead (tests, benchmarks).
        `torch_threads`: torch intra-op threads in the worker threads; default: `settings.torch_threads` (0: the
        process-wide `torch.get_num_threads()`), applied in each worker thread because a thread that did not set it
        itself runs small batches several times slower (measured, bench/embeddings.py).
        `vad_backend`: the live streams' VAD (`run_vad`); without it `run_vad` raises PoolClosed."""
        pool = cls(settings, torch_threads if torch_threads is not None else (settings.torch_threads or None),
                   vad_backend)
        if embedder is not None:
            pool._embedder = embedder
        elif not settings.lazy_models:
            await pool.ensure_loaded()
        pool._speaker.start()
        if vad_backend is not None:
            pool._vad.start()
        return pool

    LOAD_RETRY_AFTER_S = 30.0  # a failed lazy load is not retried before this: callers meanwhile fail at once

    async def ensure_loaded(self) -> None:
        """Loads and warms up the speaker embedder once (at start-up, or on first use with LAZY_MODELS), in a thread.
        After a failed load, callers get RuntimeError at once for `LOAD_RETRY_AFTER_S`, then the next one retries
        (so a hundred streams waiting on a model that cannot load do not each pay for an attempt)."""
        if self._embedder is not None:
            return
        async with self._load_lock:
            if self._embedder is not None:
                return
            if self._load_error is not None and time.monotonic() - self._load_failed_at < self.LOAD_RETRY_AFTER_S:
                raise RuntimeError(f"speaker embedder {self._settings.speaker_backend} is not available: "
                                   f"{self._load_error}")
            from streaming.speaker import load_embedder

            self._loading = True
            started = time.monotonic()
            try:
                embedder = await asyncio.to_thread(load_embedder, self._settings)
                # resemblyzer's first call compiles (numba) for seconds: not on the first user's time
                await asyncio.to_thread(embedder.warm_up)
            except Exception as e:
                token = self._settings.huggingface_token
                scrub = redactor(token.get_secret_value() if token else None)
                self._load_error, self._load_failed_at = scrub(str(e) or type(e).__name__), time.monotonic()
                log.error("speaker embedder %s failed to load: %s", self._settings.speaker_backend, self._load_error)
                raise
            finally:
                self._loading = False
            self._embedder, self._load_error = embedder, None
            log.info("speaker embedder ready: %s (dim %d) in %.1f s", embedder.name, embedder.dim,
                     time.monotonic() - started)

    def model_status(self) -> dict[str, str]:
        """Each model's state: "ready", "loading", "lazy" (LAZY_MODELS: loads on first use), "failed: <error>" (a
        load that failed, for `LOAD_RETRY_AFTER_S`), then "lazy, last load failed: <error>" (the next use retries).
        `/ready` reports it (in the pool's stats)."""
        if self._embedder is not None:
            speaker = "ready"
        elif self._loading:
            speaker = "loading"
        elif self._load_error is None:
            speaker = "lazy"
        elif time.monotonic() - self._load_failed_at < self.LOAD_RETRY_AFTER_S:
            speaker = f"failed: {self._load_error}"
        else:
            speaker = f"lazy, last load failed: {self._load_error}"
        out = {"speaker": speaker}
        if self.vad_backend is not None:
            out["vad"] = getattr(self.vad_backend, "status", "ready")  # a LazyVadBackend knows; others are loaded
        return out

    @property
    def models_failed(self) -> bool:
        """A model's load failed less than its retry delay ago: requests that need it fail meanwhile."""
        return any(v.startswith("failed") for v in self.model_status().values())

    def _init_worker_thread(self) -> None:  # worker thread
        import torch

        torch.set_num_threads(self.torch_threads or torch.get_num_threads())

    def _embed_batch(self, clips: list[np.ndarray]) -> np.ndarray:  # worker thread
        return self._embedder.embed_batch(clips)

    def _vad_batch(self, jobs: list[VadJob]) -> list[Any]:  # worker thread
        return run_vad_jobs(self.vad_backend, jobs)

    async def run_vad(self, job: VadJob) -> Any:
        """One stream's frames through decode and VAD, batched with every other stream's (one model call per 32 ms
        frame step for all of them). The caller must not touch the stream's decoder or VAD until this returns.
        Raises PoolSaturated, PoolClosed, or what the job raised."""
        return await self._vad.submit(job)

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    @property
    def embedder_name(self) -> str:
        """The model that makes (and may match) embeddings; profiles record it."""
        if self._embedder is not None:
            return self._embedder.name
        from streaming.speaker import embedder_name

        return embedder_name(self._settings)  # LAZY_MODELS: the name the embedder will have once loaded

    @property
    def embedding_dim(self) -> int:
        if self._embedder is None:
            raise RuntimeError("the speaker embedder is not loaded yet")
        return self._embedder.dim

    @property
    def saturation(self) -> float:
        return self._speaker.saturation

    @property
    def saturated(self) -> bool:
        """The live lane is (nearly) full: new streams are refused. The batch lane never makes it true."""
        return self._speaker.saturation >= SATURATED_AT

    def stats(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "models": self.model_status(), "speaker": self._speaker.stats(),
                "vad": self._vad.stats()}

    async def embed(self, clip: np.ndarray) -> np.ndarray:
        """One (dim,) embedding."""
        return (await self.embed_many([clip]))[0]

    async def embed_many(self, clips: Sequence[np.ndarray], lane: str = LIVE) -> np.ndarray:
        """(n, dim) float32 embeddings, unit norm; the clips join batches with every other connection's.

        `lane`: LIVE (streams, and what a user waits on) or BATCH (the batch endpoints' bulk work: served when no
        live work waits, never counted as live saturation). Submitted in chunks of up to two model batches (the
        next one is queued while one is computed; any number of clips, a lane never holds more than its share).

        Raises ValueError for an unusable clip (checked here, so it fails only its own request, not a whole batch),
        PoolSaturated when the lane's queue has no room for a chunk, PoolClosed after `close()`."""
        await self.ensure_loaded()
        embedder = self._embedder
        if not len(clips):
            return np.zeros((0, embedder.dim), np.float32)
        checked = embedder.check_clips(clips)
        worker = self._speaker
        per_call = worker.max_batch if lane == LIVE else worker.batch_max_batch
        chunk = max(1, min(2 * per_call, worker.lane_size(lane)))
        out: list[np.ndarray] = []
        for i in range(0, len(checked), chunk):
            out += await worker.submit_many(checked[i : i + chunk], lane)
        return np.stack(out)

    async def close(self) -> None:
        await asyncio.to_thread(self._speaker.stop)
        await asyncio.to_thread(self._vad.stop)
