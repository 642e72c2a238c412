"""The webhook part of one live stream: hands its transcript segments and its audio to the dispatcher.

Built once at stream start from the user's settings (`StreamWebhooks.open`): whether the real-time transcript and
audio bytes webhooks are on, and the audio interval. A webhook switched on during a stream starts with the next
stream; one switched off stops at once (the dispatcher looks the target up for every delivery).

Audio arrives as float32 16 kHz mono in [-1, 1], becomes little-endian 16-bit PCM with the same rounding and
clipping as the audio sent for transcription (`streaming.stt.to_int16`), and goes out in chunks of exactly
`interval_s * 16000 * 2` bytes. At the stream's end `flush()` sends the partial remainder: Omi drops it, we send
it, so a receiver gets the whole stream. At most one chunk is held here, so memory stays bounded.
"""

from __future__ import annotations

import logging

import numpy as np

from streaming.stt import to_int16
from webhooks.dispatcher import WebhookDispatcher
from webhooks.types import WebhookType
from webhooks.user_webhooks import UserWebhooks

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # the stream's audio after decoding and resampling
BYTES_PER_SAMPLE = 2


class StreamWebhooks:
    def __init__(self, dispatcher: WebhookDispatcher, uid: str, *, transcript: bool, audio_interval_s: int) -> None:
        self.dispatcher = dispatcher
        self.uid = uid
        self.transcript = transcript
        self.chunk_bytes = audio_interval_s * SAMPLE_RATE * BYTES_PER_SAMPLE  # 0: audio_bytes is off
        self._pending = bytearray()

    @classmethod
    async def open(cls, dispatcher: WebhookDispatcher, user_webhooks: UserWebhooks, uid: str) -> StreamWebhooks:
        """The tap for a stream starting now. Raises what storage raises when the settings cannot be read."""
        transcript = await user_webhooks.target(uid, WebhookType.realtime_transcript)
        audio = await user_webhooks.target(uid, WebhookType.audio_bytes)
        return cls(dispatcher, uid, transcript=transcript is not None,
                   audio_interval_s=audio.audio_interval_s if audio is not None else 0)

    @property
    def active(self) -> bool:
        return self.transcript or self.chunk_bytes > 0

    def segments(self, payload: list[dict]) -> None:
        """The segments the stream just sent its client."""
        if self.transcript and payload:
            self.dispatcher.submit_transcript(self.uid, payload)

    def audio(self, samples: np.ndarray) -> None:
        """Decoded audio of the stream (float32, 16 kHz, mono)."""
        if not self.chunk_bytes or not len(samples):
            return
        self._pending += to_int16(samples).tobytes()
        while len(self._pending) >= self.chunk_bytes:
            chunk = bytes(self._pending[:self.chunk_bytes])
            del self._pending[:self.chunk_bytes]
            self.dispatcher.submit_audio(self.uid, chunk, SAMPLE_RATE)

    def flush(self) -> None:
        """The stream ended: send the partial chunk that is left (Omi drops it)."""
        if self._pending:
            chunk, self._pending = bytes(self._pending), bytearray()
            self.dispatcher.submit_audio(self.uid, chunk, SAMPLE_RATE)
