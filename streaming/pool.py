"""The shared model pool: one per process, one batching worker per model, shared by every connection.

Thread-safety contract of `BatchingWorker`:
- `submit`/`submit_many` are called on the event loop only. They never block: a request goes into a bounded
  `queue.Queue` with `put_nowait`, and a full queue raises `PoolSaturated` at once.
- One worker thread per model takes requests off the queue, gathers a batch (up to `max_batch` items, or
  `max_wait_ms` after the first item, whichever comes first), calls `batch_fn` in that thread, and hands each
  result back to its requester's loop with `loop.call_soon_threadsafe`. The thread touches no other asyncio
  object, skips requests whose future was cancelled (a client that went away), and survives `batch_fn` errors:
  every request of the failing batch gets the exception, the next batch runs as usual.
- `batch_fn` is only ever called from the worker thread, one batch at a time, so the model needs no lock.

The pool holds no per-stream state: requests carry their own data and future.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class PoolSaturated(RuntimeError):
    """The model's queue is full. Callers refuse new work (new streams close with 1013 and a retry hint)."""


@dataclass
class _Request:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


_STOP = object()


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BatchingWorker(Generic[T, R]):
    def __init__(self, name: str, batch_fn: Callable[[list[T]], Sequence[R]], max_batch: int, max_wait_ms: float,
                 queue_size: int) -> None:
        self.name = name
        self._batch_fn = batch_fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.items = self.batches = self.max_depth = 0
        self.last_batch_ms = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pool-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_pending(RuntimeError(f"model pool {self.name} stopped"))

    @property
    def saturation(self) -> float:
        return self._queue.qsize() / self.queue_size

    def stats(self) -> dict[str, float]:
        return {"items": self.items, "batches": self.batches,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
                "queued": self._queue.qsize(), "max_queued": self.max_depth,
                "last_batch_ms": round(self.last_batch_ms, 2)}

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """All or nothing: either every item is queued or PoolSaturated is raised."""
        if self._stopping:
            raise RuntimeError(f"model pool {self.name} stopped")
        if self._queue.qsize() + len(items) > self.queue_size:
            raise PoolSaturated(f"model pool {self.name} is saturated")
        loop = asyncio.get_running_loop()
        requests = [_Request(item, loop.create_future(), loop) for item in items]
        for r in requests:
            try:
                self._queue.put_nowait(r)
            except queue.Full:  # raced with another submitter: cancel what we queued
                for q in requests:
                    q.future.cancel()
                raise PoolSaturated(f"model pool {self.name} is saturated") from None
        self.max_depth = max(self.max_depth, self._queue.qsize())
        return list(await asyncio.gather(*(r.future for r in requests)))

    # -- worker thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._serve([r for r in batch if not r.future.cancelled()])
            if stop:
                return

    def _serve(self, batch: list[_Request]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            results = list(self._batch_fn([r.item for r in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} requests")
            outcome = [(res, None) for res in results]
        except Exception as exc:  # the batch's callers get the error; the worker goes on
            log.warning("model pool %s: batch of %d failed: %s", self.name, len(batch), exc)
            outcome = [(None, exc)] * len(batch)
        self.last_batch_ms = (time.perf_counter() - started) * 1000
        self.items += len(batch)
        self.batches += 1
        for r, (res, err) in zip(batch, outcome, strict=True):
            r.loop.call_soon_threadsafe(_resolve, r.future, res, err)

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                return
            if r is not _STOP:
                r.loop.call_soon_threadsafe(_resolve, r.future, None, error)


class ModelPool:
    """One per process, created in the app lifespan. Owns the speaker embedder and its batching worker (the place
    where more models' workers go, e.g. batched VAD). Holds no per-stream state."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._embedder = None
        self._load_lock = asyncio.Lock()
        self._worker = BatchingWorker("speaker", self._embed_batch, settings.pool_max_batch,
                                      settings.pool_max_wait_ms, settings.pool_queue_size)

    @classmethod
    async def create(cls, settings: Settings) -> ModelPool:
        pool = cls(settings)
        if not settings.lazy_models:
            await pool.ensure_loaded()
        pool._worker.start()
        return pool

    async def ensure_loaded(self) -> None:
        if self._embedder is not None:
            return
        async with self._load_lock:
            if self._embedder is None:
                from streaming.speaker import load_embedder

                embedder = await asyncio.to_thread(load_embedder, self._settings)
                # Warm-up: resemblyzer's first call compiles (numba) for seconds; not on the first user's time.
                await asyncio.to_thread(embedder.warm_up)
                self._embedder = embedder
                log.info("speaker embedder ready: %s (dim %d)", embedder.name, embedder.dim)

    def _embed_batch(self, clips: list[np.ndarray]) -> np.ndarray:
        return self._embedder.embed_batch(clips)

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    @property
    def embedder_name(self) -> str:
        """The model that makes (and may match) embeddings; profiles record it."""
        if self._embedder is not None:
            return self._embedder.name
        return self._settings.speaker_backend

    @property
    def embedding_dim(self) -> int:
        if self._embedder is None:
            raise RuntimeError("the speaker embedder is not loaded yet")
        return self._embedder.dim

    @property
    def saturated(self) -> bool:
        return self._worker.saturation >= 0.9

    def stats(self) -> dict[str, Any]:
        return {"speaker": self._worker.stats(), "loaded": self.loaded}

    async def embed(self, clip: np.ndarray) -> np.ndarray:
        return (await self.embed_many([clip]))[0]

    async def embed_many(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) embeddings; the clips join batches with every other connection's."""
        await self.ensure_loaded()
        if not clips:
            return np.zeros((0, self._embedder.dim), np.float32)
        return np.stack(await self._worker.submit_many(list(clips)))

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.stop)
