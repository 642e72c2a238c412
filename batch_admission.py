"""Admission of batch requests (`/v1/vad`, `/v1/speaker-identification`): at most BATCH_MAX_CONCURRENT run at
once, so bulk work cannot take the CPU (and the speaker pool) from the live streams.

One `BatchAdmission` per app (`app.state.batch_admission`), no per-request state beyond its waiters. A request
beyond the limit waits, first come first served, up to BATCH_ADMISSION_WAIT_S for a slot: Omi's backend treats any
answer but 200 from `/v1/speaker-identification` as "nobody identified" and does not retry, so a short queue beats
an instant refusal. At most BATCH_MAX_CONCURRENT requests wait (each holds its upload meanwhile); any more, or one
whose wait ran out, gets 429 with `Retry-After` at once. The slot is taken before the upload is decoded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

from fastapi import HTTPException, Request

import metrics

RETRY_AFTER_S = 5  # what a refused request is told (a typical batch request takes seconds)


class BatchAdmission:
    """A FIFO counting semaphore with a bounded, time-limited wait. Event loop only (not thread-safe)."""

    def __init__(self, limit: int, wait_s: float, max_waiting: int | None = None) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.max_waiting = limit if max_waiting is None else max_waiting
        self.active = 0
        self.refused = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """True: a slot is held (call `release` once); False: refused."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        if self.wait_s <= 0 or len(self._waiters) >= self.max_waiting:
            self.refused += 1
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s)
        except TimeoutError:
            pass
        except BaseException:  # cancelled (the client went away): a slot handed over meanwhile goes on
            if waiter.done() and not waiter.cancelled():
                self.release()
            else:
                waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled():  # handed a slot (maybe just as the wait ran out)
            return True
        waiter.cancel()  # release() skips it from now on
        self.refused += 1
        return False

    def release(self) -> None:
        """Hands the slot to the longest waiter still waiting, else frees it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: `active` stays
                return
        self.active -= 1

    def stats(self) -> dict[str, int | float]:
        return {"active": self.active, "waiting": len(self._waiters), "limit": self.limit, "refused": self.refused}


def batch_admission(request: Request) -> BatchAdmission:
    """The app's admission, made on first use from its settings (the event loop's single thread: no race)."""
    st = request.app.state
    admission = getattr(st, "batch_admission", None)
    if admission is None:
        s = st.settings
        admission = st.batch_admission = BatchAdmission(s.batch_max_concurrent, s.batch_admission_wait_s)
    return admission


async def batch_slot(request: Request) -> AsyncIterator[None]:
    """Route dependency: holds a batch slot for the request's handler, or answers 429 with Retry-After."""
    admission = batch_admission(request)
    if not await admission.acquire():
        raise HTTPException(429, f"too many batch requests at once (at most {admission.limit}); retry later",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    started = time.monotonic()
    try:
        yield
    finally:
        admission.release()
        # The route's path, not the raw URL: a bounded label set (two endpoints).
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.BATCH_REQUEST_SECONDS.labels(endpoint=endpoint).observe(time.monotonic() - started)
