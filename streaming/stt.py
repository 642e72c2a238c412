"""Speech-to-text backends behind one session interface, and the map from "sent audio" time to stream time.

Only speech (with its VAD padding) is sent to STT, so an STT backend's clock counts sent samples, not stream
samples. `SentTimeline` records where each sent span sits in the stream and maps word times back exactly.

Backends:
- `deepgram`: deepgram-sdk's async live client against `DEEPGRAM_URL` (api.deepgram.com, a self-hosted Deepgram,
  or the tests' Deepgram-protocol server). KeepAlive during silence, Finalize when a speech region closes.
- `local`: pocketsphinx (its English model ships in the wheel), offline. Each speech region is decoded as one
  utterance when it closes, on a small shared pool of decoders in worker threads.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import queue
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from config import Settings

log = logging.getLogger(__name__)

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


class SttError(RuntimeError):
    """The STT service cannot be reached or refused the session. The message is safe to show a client."""


class SttSession(ABC):
    """One per connection. Calls `on_transcript` (on the event loop) for every result, in order."""

    def __init__(self, on_transcript: OnTranscript) -> None:
        self.on_transcript = on_transcript

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def send(self, audio: np.ndarray) -> None:
        """Speech audio, float32 16 kHz mono, continuing the sent-audio clock."""

    @abstractmethod
    async def finalize(self) -> None:
        """A speech region closed: produce the results for everything sent so far."""

    async def keepalive(self) -> None:  # noqa: B027 - optional: only network backends need it
        """Silence on the stream: keep the upstream connection open."""

    @abstractmethod
    async def close(self) -> None:
        """End of stream: deliver the last results, then release everything."""


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()


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


# --- Deepgram -----------------------------------------------------------------------------------------------------


class DeepgramSession(SttSession):
    """Deepgram live transcription over deepgram-sdk's async WebSocket client."""

    def __init__(self, on_transcript: OnTranscript, settings: Settings, language: str) -> None:
        super().__init__(on_transcript)
        self._settings = settings
        self._language = language
        self._stack = contextlib.AsyncExitStack()
        self._socket = None
        self._reader: asyncio.Task | None = None
        self.closed_by_server = asyncio.Event()

    def _options(self) -> dict[str, str]:
        # As Omi sends them; Deepgram's live API takes query strings, the SDK types them as "true"/"false".
        return {
            "model": self._settings.deepgram_model,
            "language": self._language,
            "encoding": "linear16",
            "sample_rate": str(SAMPLE_RATE),
            "channels": "1",
            "punctuate": "true",
            "smart_format": "true",
            "diarize": "true",
            "endpointing": "300",
            "interim_results": "false",
        }

    async def start(self) -> None:
        from deepgram import AsyncDeepgramClient
        from deepgram.environment import DeepgramClientEnvironment

        s = self._settings
        env = DeepgramClientEnvironment(
            base=s.deepgram_url.rstrip("/"),
            production=s.deepgram_ws_url,
            agent=s.deepgram_ws_url,
            agent_rest=s.deepgram_url.rstrip("/"),
        )
        key = s.deepgram_api_key.get_secret_value() if s.deepgram_api_key else ""
        client = AsyncDeepgramClient(api_key=key, environment=env)
        try:
            self._socket = await self._stack.enter_async_context(client.listen.v1.connect(**self._options()))
        except Exception as exc:  # the SDK raises websockets' own errors; none of them carry the key
            await self._stack.aclose()
            raise SttError(f"cannot connect to Deepgram at {s.deepgram_url}: {type(exc).__name__}") from None
        self._reader = asyncio.create_task(self._read(), name="deepgram-reader")

    async def _read(self) -> None:
        from deepgram.listen.v1.types import ListenV1Results

        try:
            async for message in self._socket:
                if isinstance(message, ListenV1Results):
                    await self.on_transcript(_from_deepgram(message))
        except Exception as exc:
            log.warning("deepgram connection ended: %s", type(exc).__name__)
        finally:
            self.closed_by_server.set()

    async def send(self, audio: np.ndarray) -> None:
        await self._guarded(self._socket.send_media(to_pcm16(audio)))

    async def finalize(self) -> None:
        await self._guarded(self._socket.send_finalize())

    async def keepalive(self) -> None:
        await self._guarded(self._socket.send_keep_alive())

    async def _guarded(self, send) -> None:
        """Deepgram went away mid-stream: a defined SttError (reconnecting with replay is separate work)."""
        if self.closed_by_server.is_set():
            send.close()
            raise SttError("the Deepgram connection was closed")
        try:
            await send
        except Exception as exc:
            raise SttError(f"lost the Deepgram connection: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._socket is not None and not self.closed_by_server.is_set():
            with contextlib.suppress(Exception):
                await self._socket.send_finalize()
                await self._socket.send_close_stream()
            if self._reader is not None:
                # The server answers CloseStream with the last results and Metadata, then closes.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reader), timeout=5.0)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self._stack.aclose()


def _from_deepgram(message) -> Transcript:
    alternatives = message.channel.alternatives
    words = tuple(
        Word(
            text=w.punctuated_word or w.word,
            start=float(w.start),
            end=float(w.end),
            confidence=float(w.confidence),
            speaker=w.speaker,
        )
        for w in (alternatives[0].words if alternatives else [])
    )
    return Transcript(words=words, is_final=bool(message.is_final), speech_final=bool(message.speech_final))


# --- local (pocketsphinx) --------------------------------------------------------------------------------------


class LocalRecognizer:
    """Shared pocketsphinx decoders. A decoder serves one utterance at a time; regions are independent utterances,
    so no stream's state outlives its call. Thread-safe: decoders are checked out of a queue."""

    FRAME_RATE = 100  # pocketsphinx frames per second
    _FILLERS = ("<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "<unk>")

    def __init__(self, decoders: int = 2) -> None:
        from pocketsphinx import Decoder

        self._free: queue.Queue = queue.Queue()
        for _ in range(decoders):
            self._free.put(Decoder(samprate=SAMPLE_RATE, loglevel="FATAL"))

    def recognize(self, pcm16: bytes) -> list[Word]:
        """Blocking: run in a worker thread. Returns words with times relative to the audio's start."""
        decoder = self._free.get()
        try:
            # pocketsphinx adapts its feature normalisation (cepstral mean) across utterances; a fresh front end per
            # utterance keeps one stream's audio from changing another stream's transcript (costs ~0.1 ms).
            decoder.reinit_feat()
            decoder.start_utt()
            decoder.process_raw(pcm16, full_utt=True)
            decoder.end_utt()
            words = []
            for seg in decoder.seg():
                text = seg.word.split("(")[0]  # "word(2)" is an alternate pronunciation of "word"
                if text in self._FILLERS or text.startswith("++") or text.startswith("["):
                    continue
                words.append(
                    Word(
                        text=text,
                        start=seg.start_frame / self.FRAME_RATE,
                        end=(seg.end_frame + 1) / self.FRAME_RATE,
                        confidence=float(min(1.0, np.exp(seg.prob))) if seg.prob else 1.0,
                    )
                )
            return words
        finally:
            self._free.put(decoder)


class LocalSession(SttSession):
    """Buffers each speech region's audio and decodes it when the region closes.

    Decoding runs in a worker thread as a chain of tasks (one per region, each awaiting the one before), so the
    stream keeps taking audio while a region is recognised and results still come out in order.
    """

    def __init__(self, on_transcript: OnTranscript, recognizer: LocalRecognizer) -> None:
        super().__init__(on_transcript)
        self._recognizer = recognizer
        self._region: list[np.ndarray] = []
        self._region_sent_start = 0  # sent-audio sample of the buffered region's first sample
        self._sent = 0
        self._last_task: asyncio.Task | None = None

    async def start(self) -> None:
        return None

    async def send(self, audio: np.ndarray) -> None:
        self._region.append(audio)
        self._sent += len(audio)

    async def finalize(self) -> None:
        if not self._region:
            return
        audio = np.concatenate(self._region)
        offset = self._region_sent_start / SAMPLE_RATE
        self._region, self._region_sent_start = [], self._sent
        self._last_task = asyncio.create_task(self._recognize(self._last_task, audio, offset))

    async def _recognize(self, previous: asyncio.Task | None, audio: np.ndarray, offset: float) -> None:
        words = await asyncio.to_thread(self._recognizer.recognize, to_pcm16(audio))
        if previous is not None:
            await previous
        shifted = tuple(Word(w.text, w.start + offset, w.end + offset, w.confidence) for w in words)
        await self.on_transcript(Transcript(words=shifted, is_final=True, speech_final=True))

    async def close(self) -> None:
        await self.finalize()
        if self._last_task is not None:
            await self._last_task


# --- factory ------------------------------------------------------------------------------------------------------


class SttFactory:
    """Process-wide: holds the shared parts (pocketsphinx decoders) and makes one session per connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = settings.stt_backend
        self._recognizer = LocalRecognizer() if self.backend == "local" else None

    def session(self, on_transcript: OnTranscript, language: str) -> SttSession:
        if self.backend == "deepgram":
            return DeepgramSession(on_transcript, self.settings, language)
        assert self._recognizer is not None
        return LocalSession(on_transcript, self._recognizer)
