"""What a developer webhook is: its type (Omi's names) and where one delivery goes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class WebhookType(StrEnum):
    memory_created = "memory_created"
    realtime_transcript = "realtime_transcript"
    audio_bytes = "audio_bytes"
    day_summary = "day_summary"


@dataclass(frozen=True)
class Target:
    """Where one user's webhook of one type delivers right now."""

    url: str  # the receiver's URL, without Omi's ",N" audio-interval suffix
    secrets: tuple[str, ...] = ()  # signing secrets valid now, current first; empty: deliveries go unsigned
    audio_interval_s: int = 0  # audio_bytes only: seconds of audio per request
