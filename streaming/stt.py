"""Speech-to-text backends behind one session interface, and the map from "sent audio" time to stream time.

Only speech (with its VAD padding) is sent to STT, so an STT backend's clock counts sent samples, not stream
samples. `SentTimeline` records where each sent span sits in the stream and maps word times back exactly.

Backends:
- `deepgram` (`streaming/stt_deepgram.py`): Deepgram's live API over deepgram-sdk, reconnecting and replaying.
- `local` (`streaming/stt_local.py`): pocketsphinx, offline, on a small shared pool of decoders; partial
  transcripts (`is_final` false) while a region is open (`streaming/sphinx_partials.py`).
- `openai` (`streaming/stt_openai.py`): an OpenAI-compatible /v1/audio/transcriptions server, one request per region.
- `whisper` (`streaming/stt_whisper.py`): faster-whisper in process, regions of all streams batched on one model.
"""

from __future__ import annotations

import asyncio
import bisect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from config import Settings

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Word:
    text: str  # punctuated when the backend punctuates
    start: float  # seconds; sent-audio time when it comes from a backend, stream time after mapping
    end: float
    confidence: float = 1.0
    speaker: int | None = None  # the backend's own diarization label, if any


@dataclass(frozen=True)
class Transcript:
    words: tuple[Word, ...]
    is_final: bool
    speech_final: bool  # the backend says the utterance ended (a Finalize answer or its endpointing)


OnTranscript = Callable[[Transcript], Awaitable[None]]
OnError = Callable[[str, str], Awaitable[None]]  # (code, message): an `error` event for the client


class SttError(RuntimeError):
    """The STT service cannot be reached or refused the session. The message is safe to show a client."""


class SttSession(ABC):
    """One per connection. Calls `on_transcript` (on the event loop) for every result, in order."""

    def __init__(self, on_transcript: OnTranscript, on_error: OnError | None = None) -> None:
        self.on_transcript = on_transcript
        self.on_error = on_error

    def check(self) -> None:  # noqa: B027 - optional: only backends that can fail for good override it
        """Raises SttError if the session can no longer transcribe (checked for every frame)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def send(self, pcm16: np.ndarray) -> None:
        """Speech audio, int16 16 kHz mono (`to_int16`), continuing the sent-audio clock."""

    @abstractmethod
    async def finalize(self) -> None:
        """A speech region closed: produce the results for everything sent so far."""

    async def keepalive(self) -> None:  # noqa: B027 - optional: only network backends need it
        """Silence on the stream: keep the upstream connection open."""

    @abstractmethod
    async def close(self) -> None:
        """End of stream: deliver the last results, then release everything."""


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] as 16-bit PCM samples (rounded, clipped): what STT and the speaker ring take."""
    out = np.multiply(audio, 32768.0, dtype=np.float32)
    np.rint(out, out=out)
    np.clip(out, -32768.0, 32767.0, out=out)
    return out.astype("<i2")


def to_pcm16(audio: np.ndarray) -> bytes:
    return to_int16(audio).tobytes()


# --- sent-audio time → stream time ------------------------------------------------------------------------------


class SentTimeline:
    """Where each span of sent audio lies in the stream. Pure bookkeeping, no I/O.

    `append(stream_start, n)` records that the next n sent samples are stream samples stream_start..stream_start+n.
    `to_stream(t)` maps a time on the backend's clock to the stream's clock (both in seconds).
    """

    def __init__(self) -> None:
        self._sent_starts: list[int] = []
        self._stream_starts: list[int] = []
        self._lengths: list[int] = []
        self.sent_samples = 0

    def append(self, stream_start: int, n: int) -> None:
        if n <= 0:
            return
        if self._lengths and self._stream_starts[-1] + self._lengths[-1] == stream_start:
            self._lengths[-1] += n  # contiguous on both clocks: extend the span
        else:
            self._sent_starts.append(self.sent_samples)
            self._stream_starts.append(stream_start)
            self._lengths.append(n)
        self.sent_samples += n

    def to_stream(self, t: float, is_end: bool = False) -> float:
        """A word's start maps through the span that contains it; a word's end that falls exactly on a span's
        end maps through that span (not to the start of the next span, which may lie much later)."""
        if not self._sent_starts:
            return t
        s = t * SAMPLE_RATE
        if is_end:
            i = bisect.bisect_left(self._sent_starts, s) - 1
        else:
            i = bisect.bisect_right(self._sent_starts, s) - 1
        i = max(i, 0)
        offset = min(max(s - self._sent_starts[i], 0.0), float(self._lengths[i]))
        return (self._stream_starts[i] + offset) / SAMPLE_RATE


# --- factory ------------------------------------------------------------------------------------------------------


class SttFactory:
    """Process-wide: holds the shared parts (pocketsphinx decoders) and makes one session per connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = settings.stt_backend
        self._recognizer = None
        if self.backend == "local":
            from streaming.stt_local import LocalRecognizer

            self._recognizer = LocalRecognizer(lazy=settings.lazy_models,
                                               partial_decoders=settings.local_partial_decoders)
        self._transcriber = None
        if self.backend == "openai":
            from streaming.openai_transcriber import OpenAiTranscriber

            self._transcriber = OpenAiTranscriber(settings)  # one pooled HTTP client for every stream
        self._whisper = None
        if self.backend == "whisper":
            from streaming.stt_whisper import WhisperRecognizer

            self._whisper = WhisperRecognizer(settings)  # one model and batching worker for every stream

    def status(self) -> dict[str, str]:
        """The shared STT model's state for `/ready` (whisper loads a model; the other backends have none to wait
        for): "ready", "loading", "lazy", or "failed: ..."."""
        if self._whisper is not None:
            return {"stt": self._whisper.status}
        return {}

    async def aclose(self) -> None:
        """At shutdown, after the streams: the worker processes, the model's thread, the pooled HTTP client."""
        if self._recognizer is not None:
            self._recognizer.close()
        if self._whisper is not None:
            await asyncio.to_thread(self._whisper.close)
        if self._transcriber is not None:
            await self._transcriber.aclose()

    def session(self, on_transcript: OnTranscript, language: str, on_error: OnError | None = None) -> SttSession:
        if self.backend == "deepgram":
            from streaming.stt_deepgram import DeepgramSession

            return DeepgramSession(on_transcript, self.settings, language, on_error)
        if self.backend == "openai":
            from streaming.stt_openai import OpenAiSession

            return OpenAiSession(on_transcript, self.settings, language, self._transcriber, on_error)
        if self.backend == "whisper":
            from streaming.stt_whisper import WhisperSession

            assert self._whisper is not None
            return WhisperSession(on_transcript, self._whisper, language, on_error)
        from streaming.stt_local import LocalSession

        assert self._recognizer is not None
        return LocalSession(on_transcript, self._recognizer, self.settings.local_partial_interval_s)
