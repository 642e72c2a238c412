"""The waiting deliveries of one user and one webhook type, bounded, in order. Pure bookkeeping: no I/O, no awaiting,
so the live stream's event loop can add to it at the cost of a few dict operations.

Real-time transcript segments coalesce: while a batch waits, a segment whose `id` is already in it replaces its
earlier version in place and new ids append, so the receiver gets every segment's latest version in order with
fewer requests. Other types queue one delivery per submit. When an outbox is full (WEBHOOK_QUEUE_MAX items, where a
waiting transcript segment is an item, or WEBHOOK_QUEUE_MAX_BYTES) the NEW item is refused, so what is queued
stays continuous; a first item larger than the byte bound is still taken, so no setting can block a type entirely.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from webhooks.signing import encode_json
from webhooks.types import WebhookType


@dataclass
class Delivery:
    """One request's worth: a fixed body, or a transcript batch rendered when it is sent."""

    wtype: WebhookType
    submitted: float  # loop time of the oldest submit it carries (end-to-end delivery time starts here)
    content_type: str = "application/json"
    params: dict[str, str] = field(default_factory=dict)  # added to the URL's query (uid is added at send time)
    body: bytes = b""
    segments: dict[object, bytes] | None = None  # transcript: encoded segment by id, in first-submit order

    @property
    def size(self) -> int:
        return len(self.body) if self.segments is None else sum(map(len, self.segments.values()))

    @property
    def items(self) -> int:
        return 1 if self.segments is None else len(self.segments)

    def render(self, uid: str) -> bytes:
        """The body bytes. A batch is byte-identical to encode_json({"segments": [...], "session_id": uid})."""
        if self.segments is None:
            return self.body
        return b'{"segments":[' + b",".join(self.segments.values()) + b'],"session_id":' + encode_json(uid) + b"}"


class Outbox:
    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.waiting: deque[Delivery] = deque()
        self.items = 0  # items in `waiting` (segments count one each)
        self.nbytes = 0
        self.in_flight: Delivery | None = None
        self.task: asyncio.Task | None = None
        self.next_request = 0.0  # loop time before which no request may start (real-time transcript interval)

    def _fits(self, items: int, nbytes: int) -> bool:
        if not self.waiting:
            return True
        return self.items + items <= self.max_items and self.nbytes + nbytes <= self.max_bytes

    def offer(self, delivery: Delivery) -> bool:
        """Queue a delivery; False (nothing queued) when the outbox is full."""
        size = delivery.size
        if not self._fits(delivery.items, size):
            return False
        self.waiting.append(delivery)
        self.items += delivery.items
        self.nbytes += size
        return True

    def merge_segments(self, encoded: list[tuple[object, bytes]], now: float) -> int:
        """Merge transcript segments into the waiting batch (one is opened when none waits); the number refused."""
        if not self.waiting:
            self.waiting.append(Delivery(WebhookType.realtime_transcript, submitted=now, segments={}))
        batch = self.waiting[-1]
        segments = batch.segments
        assert segments is not None  # a transcript outbox holds batches only
        refused = 0
        for key, data in encoded:
            old = segments.get(key)
            grow = len(data) - (len(old) if old is not None else 0)
            if self.items > 0 and (self.nbytes + grow > self.max_bytes
                                   or (old is None and self.items + 1 > self.max_items)):
                refused += 1
                continue
            segments[key] = data  # an existing key keeps its place
            self.nbytes += grow
            self.items += old is None
        if not segments:  # everything refused into a batch opened just now
            self.waiting.pop()
        return refused

    def take(self) -> Delivery | None:
        """The next delivery to send (it leaves the bounds), or None."""
        if not self.waiting:
            return None
        delivery = self.waiting.popleft()
        self.items -= delivery.items
        self.nbytes -= delivery.size
        self.in_flight = delivery
        return delivery

    def pending(self) -> int:
        """Deliveries waiting or in flight."""
        return len(self.waiting) + (self.in_flight is not None)
