"""The threads batch work runs in: decoding uploads, their VAD and trimming, the per-segment work of
`/v1/speaker-identification`. A small pool of low-priority threads (`lower_thread_priority`: Linux nice 19, per
thread), so that on a busy CPU the scheduler runs the live streams' threads first (the event loop, the pool's VAD
and embedder workers, local STT), and bulk work takes only the CPU they leave.

Why threads of their own: `batch_admission` bounds how many batch requests run, but their decoding and VAD ran in
asyncio's default executor at the live threads' priority. bench/batch_vs_live.py (4 live streams, 4 batch clients
posting 120 s files with 96 segments each, 2 shared cores) measured live p95 335 ms quiet vs 1676 ms under batch
load with the default executor; with these threads and the pool's own low-priority batch worker, 195 vs 209 ms.

One `BatchThreads` per app; it holds no per-request state. `run` may be awaited from any coroutine of the loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from streaming.batching import lower_thread_priority

T = TypeVar("T")


class BatchThreads:
    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="batch", initializer=lower_thread_priority)

    async def run(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` in a batch thread (blocking work: decoding, VAD, trimming)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(work, *args))

    def close(self) -> None:
        """Queued work is dropped; work already running finishes in its thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def batch_threads(state: object) -> BatchThreads:
    """The app's batch threads (`app.state.batch_threads`), made on first use from BATCH_MAX_CONCURRENT (one thread
    per admitted batch request; the event loop's single thread makes this race-free)."""
    threads = getattr(state, "batch_threads", None)
    if threads is None:
        threads = BatchThreads(state.settings.batch_max_concurrent)  # type: ignore[attr-defined]
        state.batch_threads = threads  # type: ignore[attr-defined]
    return threads
