"""One stream's segment writes, riding out storage outages. Lives in the stream's `Pipeline` (per-connection state).

A segment is sent to the client after its write returned. When a write fails (or takes longer than
`write_timeout_s`), the client still gets the segments at once, unstored: they are kept in memory, the latest
version of each id in first-seen order, and a background task writes them with exponential backoff until storage
answers again. Segments are upserted by id, so a segment written again is updated, never stored twice. At the
stream's end `drain` retries for up to `retry_on_close_s`, then counts what is left as lost (metrics and one log
line). Beyond `pending_max` kept segments the oldest are dropped and counted, so an outage cannot grow memory
without bound; a process that dies loses what it kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import metrics
from streaming.protocol import TranscriptSegment

log = logging.getLogger(__name__)

Persist = Callable[[list[TranscriptSegment]], Awaitable[None]]  # stores segments before they are sent
Emit = Callable[[Any], Awaitable[None]]

# Storage down: the first retry of the kept segments after this long, doubling up to RETRY_MAX_S between tries.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


class SegmentWriter:
    def __init__(self, persist: Persist, emit: Emit, *, pending_max: int = 5000, retry_on_close_s: float = 30.0,
                 write_timeout_s: float = 10.0) -> None:
        self._persist = persist
        self._emit = emit  # segments a write moved in time (a new conversation began) are sent again
        self._pending: dict[str, tuple[TranscriptSegment, int]] = {}  # id -> (latest version, generation kept)
        self._generation = 0
        self._pending_max = pending_max
        self._retry_on_close_s = retry_on_close_s
        self._write_timeout_s = write_timeout_s  # a black-holed database must not hold the transcript back long
        self._dropped = 0
        self._drained = False  # drain() is done with the pending segments
        self._persist_lock = asyncio.Lock()  # one write at a time: ConversationLink may start a new conversation
        self._retry_task: asyncio.Task | None = None
        self._retry_wake = asyncio.Event()  # drain() cuts the retry's backoff short

    @property
    def pending(self) -> int:
        """Segments not stored yet."""
        return len(self._pending)

    async def store(self, changed: list[TranscriptSegment]) -> list[TranscriptSegment]:
        """Stores `changed` (or keeps them for the retry). Returns other segments the write moved in time, which
        the caller sends along with `changed`."""
        moved: list[TranscriptSegment] = []
        self._keep(changed)  # before any await: a version changed during a write in flight stays pending
        # While a retry runs, storage is known down: don't make every delivery wait for a failing write.
        if not self._retrying:
            async with self._persist_lock:
                if not self._retrying and self._pending:
                    written = await self._write_pending()
                    if written is None:
                        log.error("storage unavailable: %d segments kept in memory for a retry", len(self._pending))
                        self._start_retry()
                    else:
                        moved = [s for s in written[1] if s.id not in {c.id for c in changed}]
        return moved

    def _keep(self, changed: list[TranscriptSegment]) -> None:
        """Segments to store, the latest version of each id; beyond `pending_max` the oldest are dropped."""
        for seg in changed:
            self._generation += 1
            self._pending[seg.id] = (seg, self._generation)  # an id already kept keeps its place
        excess = len(self._pending) - self._pending_max
        if excess > 0:
            for key in list(self._pending)[:excess]:
                del self._pending[key]
            metrics.inc("storage_segments_lost_total", excess)
            if not self._dropped:  # once per stream; finish() reports the total
                log.error("storage unavailable: more than %d unstored segments, dropping the oldest",
                          self._pending_max)
            self._dropped += excess

    async def _write_pending(self) -> tuple[int, list[TranscriptSegment]] | None:
        """One write of every pending segment, in order (hold `_persist_lock`). Returns how many were written
        and those the write moved in time (a new conversation was started), or None when storage failed."""
        batch = list(self._pending.items())
        segments = [seg for _, (seg, _) in batch]
        spans = [(seg.start, seg.end) for seg in segments]
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self._persist(segments)
        except Exception as exc:  # storage down or timed out: all of them stay pending
            metrics.inc("storage_write_failures_total")
            log.debug("storage write of %d segments failed: %s: %s", len(batch), type(exc).__name__, exc)
            return None
        for key, (_, generation) in batch:
            if key in self._pending and self._pending[key][1] == generation:  # unchanged since: stored
                del self._pending[key]
        return len(batch), [seg for seg, span in zip(segments, spans, strict=True) if (seg.start, seg.end) != span]

    @property
    def _retrying(self) -> bool:
        return self._retry_task is not None and not self._retry_task.done()

    def _start_retry(self) -> None:
        if self._drained:  # a late delivery after finish(): no task may outlive the stream
            metrics.inc("storage_segments_lost_total", len(self._pending))
            log.error("storage unavailable: %d segments delivered after the stream ended were not stored",
                      len(self._pending))
            self._pending.clear()
        elif not self._retrying:
            self._retry_task = asyncio.create_task(self._retry_loop(), name="storage-retry")

    async def _retry_loop(self) -> None:
        """Writes the pending segments, with exponential backoff, until none is left."""
        delay = RETRY_FIRST_S
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_wake.wait(), timeout=delay)
            self._retry_wake.clear()  # a wake-up skips one wait, not the backoff from then on
            async with self._persist_lock:
                written = await self._write_pending() if self._pending else (0, [])
            if written is None:
                delay = min(max(delay * 2, RETRY_FIRST_S), RETRY_MAX_S)
                continue
            count, moved = written
            metrics.inc("storage_segments_retried_total", count)
            log.info("storage available again: stored %d kept segments", count)
            if moved:
                with contextlib.suppress(Exception):  # a closed client: they are stored, which is what counts
                    await self._emit([s.model_dump() for s in moved])
            delay = 0.0  # whatever changed during the write goes at once

    async def drain(self) -> None:
        """The stream ended: retry the unstored segments for up to `retry_on_close_s`, then count them lost."""
        if self._pending:
            self._start_retry()
            self._retry_wake.set()  # no backoff now: the client is gone and only this is left to do
            task = self._retry_task
            try:
                await asyncio.wait({task}, timeout=self._retry_on_close_s)
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        elif self._retry_task is not None:
            self._retry_task.cancel()
        if self._pending or self._dropped:
            lost = len(self._pending)
            metrics.inc("storage_segments_lost_total", lost)
            log.error("storage unavailable: %d segments of this stream were not stored (%d pending after %.0f s, "
                      "%d dropped over the memory limit)", lost + self._dropped, lost, self._retry_on_close_s,
                      self._dropped)
            self._pending.clear()
        self._drained = True
