"""What a network STT session needs to survive a dropped socket: the unacknowledged speech, and when to retry.

Pure bookkeeping, no I/O. Positions are samples on the session's *sent-audio clock* (every speech sample sent to
STT, all connections together, 16 kHz), so a reconnect does not move any timestamp: a new connection starts at
the first unacknowledged sample, and its word times are shifted by that position.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass


@dataclass
class BufferedItem:
    seq: int  # order of arrival, so a replay can pick up items added while it was sending
    position: int  # sent-clock sample where this audio starts, or where the Finalize was asked
    audio: bytes | None  # pcm16 little-endian mono; None for a Finalize marker

    @property
    def samples(self) -> int:
        return len(self.audio) // 2 if self.audio is not None else 0


class ReplayBuffer:
    """Speech sent (or to be sent) to STT whose results have not come back yet, with the Finalize requests between.

    - `add_audio` / `add_finalize` as the pipeline sends; the buffer holds at most `limit_samples` of audio and drops
      the oldest beyond it (returned, so the caller can tell the client and count it).
    - `ack(position)`: a final result covered everything before `position`; that audio is never needed again.
    - `ack_finalize()`: a Finalize was answered (results arrive in order, so it is the oldest one).
    - `items_after(seq)`: what to send again, in order, on a new connection that starts at `start` (the first
      sample kept).
    """

    def __init__(self, limit_samples: int) -> None:
        if limit_samples <= 0:
            raise ValueError("limit_samples must be > 0")
        self.limit_samples = limit_samples
        self._items: deque[BufferedItem] = deque()
        self._audio_samples = 0
        self.end = 0  # sent-clock position after the last audio added
        self.acked = 0  # results came back for everything before this
        self.hold = False  # a replay is reading the items: don't trim under it (the limit may be passed briefly)
        self._seq = 0

    @property
    def audio_samples(self) -> int:
        return self._audio_samples

    @property
    def start(self) -> int:
        """The first sample still held (where a new connection's clock starts)."""
        for item in self._items:
            if item.audio is not None:
                return item.position
        return self.end

    def add_audio(self, pcm16: bytes) -> int:
        """Appends at `end`; returns the samples dropped from the front to stay within the limit."""
        self._seq += 1
        item = BufferedItem(self._seq, self.end, pcm16)
        self._items.append(item)
        self.end += item.samples
        self._audio_samples += item.samples
        return self._trim()

    def audio_between(self, start: int, end: int) -> bytes:
        """The held audio of sent-clock samples [start, end), joined (what a coalesced send carries)."""
        parts = []
        for item in self._items:
            if item.audio is None or item.position + item.samples <= start or item.position >= end:
                continue
            a, b = max(start, item.position) - item.position, min(end, item.position + item.samples) - item.position
            parts.append(item.audio[a * 2 : b * 2])
        return b"".join(parts)

    def add_finalize(self) -> None:
        self._seq += 1
        self._items.append(BufferedItem(self._seq, self.end, None))

    def ack(self, position: int) -> None:
        """Drops audio before `position`, and Finalize markers strictly before it (a result for later audio means
        the server handled them). A chunk that straddles `position` keeps its unacknowledged part."""
        position = min(position, self.end)
        self.acked = max(self.acked, position)
        while self._items:
            item = self._items[0]
            if item.audio is None:
                if item.position < position:
                    self._items.popleft()
                    continue
                break
            item_end = item.position + item.samples
            if item_end <= position:
                self._items.popleft()
                self._audio_samples -= item.samples
                continue
            if item.position < position:
                cut = position - item.position
                item.audio = item.audio[cut * 2 :]
                item.position = position
                self._audio_samples -= cut
            break

    def ack_finalize(self) -> None:
        for i, item in enumerate(self._items):
            if item.audio is None:
                del self._items[i]
                return

    def items_after(self, seq: int = 0) -> list[BufferedItem]:
        """Held items that arrived after item `seq`, oldest first."""
        return [item for item in self._items if item.seq > seq]

    @property
    def lost(self) -> int:
        """Samples trimmed away without a result: a new connection starting at `start` leaves this hole."""
        return max(0, self.start - self.acked)

    def _trim(self) -> int:
        dropped = 0
        if self.hold:
            return 0
        while self._audio_samples > self.limit_samples and self._items:
            item = self._items[0]
            if item.audio is None:
                self._items.popleft()
                continue
            excess = self._audio_samples - self.limit_samples
            if item.samples <= excess:
                self._items.popleft()
                self._audio_samples -= item.samples
                dropped += item.samples
            else:
                item.audio = item.audio[excess * 2 :]
                item.position += excess
                self._audio_samples -= excess
                dropped += excess
        return dropped


def backoff_delay(failures: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the step is fixed, half random, so many streams that lost the
    same upstream at once do not all reconnect in the same instant, yet none retries almost immediately."""
    step = min(cap_s, base_s * (2 ** max(failures, 0)))
    return step / 2 + (rng or random).uniform(0, step / 2)
