"""`BatchingWorker`, the cross-connection batcher (the pattern of WhisperLive's batch inference worker): requests
from every connection's coroutine go into one bounded queue; one thread per model takes them off in batches of up to
`max_batch` items, or whatever has arrived `max_wait_ms` after the first one, whichever comes first; it runs the
model once per batch and hands each request its own result. `ModelPool` (streaming/pool.py) owns the workers.

Thread-safety contract of `BatchingWorker`:

- `submit`/`submit_many` run on an event loop (any number of loops, in practice the server's one). They never block
  on the worker: admission is a few list operations under a lock the worker only holds to pop requests (never while
  the model runs). A full queue raises `PoolSaturated` at once; a stopped worker raises `PoolClosed`.
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
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class PoolSaturated(RuntimeError):
    """The model's queue is full. Callers refuse new work (new streams close with 1013 and a retry hint; a batch
    request gets 503 with Retry-After)."""


class PoolClosed(RuntimeError):
    """The worker is not running (not started yet, stopped at shutdown, or its thread died)."""


@dataclass(slots=True)
class ItemFailed:
    """A `batch_fn` result that fails its own request only (the rest of the batch succeeds)."""

    error: BaseException


@dataclass(slots=True)
class _Request:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = 0.0  # time.monotonic() at submit: the queue wait is measured from it


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


class BatchingWorker(Generic[T, R]):
    """One worker thread per model. Gathers requests from all connections into batches of up to `max_batch` items
    or `max_wait_ms` after the first item, whichever first; calls `batch_fn(list[T]) -> Sequence[R]` (results in the
    same order) in that thread; resolves one asyncio future per request on the requester's event loop
    (`loop.call_soon_threadsafe`). If `batch_fn` raises, every future of that batch gets the exception; the worker
    goes on. See the module docstring for the full thread-safety contract."""

    def __init__(self, name: str, batch_fn: Callable[[list[T]], Sequence[R]], max_batch: int, max_wait_ms: float,
                 queue_size: int, thread_init: Callable[[], None] | None = None) -> None:
        """`thread_init`: called once in the worker thread before the first batch (per-thread library settings,
        e.g. torch's thread count, which only takes full effect when set in the thread that runs the model)."""
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError(f"pool {name}: need max_batch >= 1, queue_size >= 1, max_wait_ms >= 0")
        self.name = name
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.queue_size = queue_size
        self._batch_fn = batch_fn
        self._thread_init = thread_init
        self._pending: deque[_Request] = deque()
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

    async def submit(self, item: T) -> R:
        """`submit_many([item])[0]`, with one future and no gather (the VAD sends one request per stream and step)."""
        loop = asyncio.get_running_loop()
        request = _Request(item, loop.create_future(), loop, time.monotonic())
        self._admit([request])
        try:
            return await request.future
        finally:  # cancelled: the worker skips it
            request.future.cancel()

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Results in the order of `items`. All or nothing: every item is queued, or `PoolSaturated` is raised and
        none is. Cancelling the caller withdraws its requests still queued; a failed item withdraws the others."""
        if not items:
            return []
        if len(items) > self.queue_size:
            raise ValueError(f"model pool {self.name}: {len(items)} items in one request, the queue holds "
                             f"{self.queue_size}")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        requests = [_Request(item, loop.create_future(), loop, now) for item in items]
        self._admit(requests)
        futures = [r.future for r in requests]
        try:
            return list(await asyncio.gather(*futures))
        finally:  # cancelled, or one item failed: the rest need not be computed
            for f in futures:
                f.cancel()

    def _admit(self, requests: list[_Request]) -> None:
        with self._cond:
            if not self._running:
                raise PoolClosed(f"model pool {self.name} is not running")
            if len(self._pending) + len(requests) > self.queue_size:
                raise PoolSaturated(f"model pool {self.name} is saturated ({len(self._pending)} requests queued)")
            self._pending.extend(requests)
            self._max_queued = max(self._max_queued, len(self._pending))
            # Wake the worker only when it waits for a first request or a batch just filled: waking it for every
            # request of a forming batch cost a thread switch (and the GIL) per request.
            if self._idle or len(self._pending) >= self.max_batch:
                self._cond.notify()

    # --- introspection -------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def saturation(self) -> float:
        """Queued requests / queue_size, 0..1 (cancelled ones count until the worker drops them)."""
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
        """The next batch (live requests only; may be empty when all were cancelled), or None once stopped."""
        with self._cond:
            self._idle = True
            while self._running and not self._pending:
                self._cond.wait()
            self._idle = False
            if not self._running:
                return None
            deadline = time.monotonic() + self.max_wait_ms / 1000.0
            while self._running and len(self._pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if not self._running:
                return None  # stop() fails what is queued
            batch: list[_Request] = []
            while self._pending and len(batch) < self.max_batch:
                request = self._pending.popleft()
                if request.future.cancelled():
                    self._skipped += 1
                else:
                    batch.append(request)
            return batch

    def _serve(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        wait = metrics.POOL_QUEUE_WAIT.labels(model=self.name)
        for request in batch:
            wait.observe(now - request.queued_at)
        metrics.POOL_BATCH_SIZE.labels(model=self.name).observe(len(batch))
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
            pending = list(self._pending)
            self._pending.clear()
        if pending:
            log.info("model pool %s: %s; failing %d queued requests", self.name, why, len(pending))
            self._post(pending, [(r.future, None, PoolClosed(f"model pool {self.name} {why}")) for r in pending])


# The lowest priority, for bulk work: a nice-19 thread gets about 1.5 % of a core that a nice-0 thread also wants
# (CFS weights 15 vs 1024), and all of a core nobody else wants.
BULK_NICE = 19


def lower_thread_priority() -> None:
    """Best effort, Linux: the calling thread (a thread id names one thread, not the process) at BULK_NICE. Elsewhere,
    or not allowed, the thread keeps its priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)
    except (OSError, AttributeError) as exc:
        log.debug("thread priority unchanged: %s", exc)
