"""A circuit breaker per receiver URL (scheme, host, port, path), so a receiver that keeps failing stops costing
requests: WEBHOOK_BREAKER_FAILURES failed deliveries in a row open it; while open (WEBHOOK_BREAKER_OPEN_S) its
deliveries are dropped without a request; then one trial delivery goes (half-open): success closes it, failure
opens it again. Bounded: the least recently used URLs are forgotten beyond `max_urls`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


def breaker_key(url: str) -> str:
    """scheme://host:port/path: one receiver, whatever its query string (which may hold a token)."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return f"{scheme}://{(parts.hostname or '').rstrip('.')}:{port}{parts.path or '/'}"
    except ValueError:
        return "invalid"


@dataclass
class _State:
    failures: int = 0
    open_until: float | None = None  # set while open (and half-open: the trial runs after it)
    trial: bool = False  # a half-open trial delivery is running


class CircuitBreakers:
    def __init__(self, failures: int, open_s: float, *, max_urls: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.open_s = open_s
        self.max_urls = max_urls
        self.clock = clock
        self._states: OrderedDict[str, _State] = OrderedDict()

    def _state(self, key: str) -> _State:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
            while len(self._states) > self.max_urls:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return state

    def allow(self, key: str) -> str | None:
        """May a delivery to this receiver start now? None: no (open). "closed": yes. "trial": yes, as the one
        half-open trial: end it with `record(..., trial=True)` (a verdict) or `release` (the delivery never reached
        the receiver)."""
        state = self._states.get(key)
        if state is None or state.open_until is None:
            return "closed"
        if self.clock() < state.open_until or state.trial:
            return None
        state.trial = True
        return "trial"

    def record(self, key: str, ok: bool, *, trial: bool = False) -> None:
        """A delivery's verdict (after its retries): success closes; a failure counts, and opens at the threshold or
        when it was the half-open trial."""
        state = self._state(key)
        if trial:
            state.trial = False
        if ok:
            state.failures, state.open_until = 0, None
            return
        state.failures += 1
        if trial or state.failures >= self.failures:
            state.open_until = self.clock() + self.open_s

    def release(self, key: str) -> None:
        state = self._states.get(key)
        if state is not None:
            state.trial = False

    def is_open(self, key: str) -> bool:
        state = self._states.get(key)
        return state is not None and state.open_until is not None
