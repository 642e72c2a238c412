"""Speech-to-text backends behind one session interface, and the map from "sent audio" time to stream time.

Only speech (with its VAD padding) is sent to STT, so an STT backend's clock counts sent samples, not stream
samples. `SentTimeline` records where each sent span sits in the stream and maps word times back exactly.

Backends:
- `deepgram`: deepgram-sdk's async live client against `DEEPGRAM_URL` (api.deepgram.com, a self-hosted Deepgram,
  or the tests' Deepgram-protocol server). KeepAlive during silence, Finalize when a speech region closes; a
  dropped socket is re-opened and the unacknowledged speech replayed (see `DeepgramSession`).
- `local`: pocketsphinx (its English model ships in the wheel), offline. Each speech region is decoded as one
  utterance when it closes, on a small shared pool of decoders in worker threads.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

import metrics
from config import Settings
from streaming.reconnect import ReplayBuffer, backoff_delay

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


# --- Deepgram -----------------------------------------------------------------------------------------------------


@dataclass
class _Connection:
    """One Deepgram socket. `base`: the sent-clock sample where its own clock starts (0 on the first socket, the
    first replayed sample on a reconnect)."""

    stack: contextlib.AsyncExitStack
    socket: Any
    base: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    got_result: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task | None = None


# A socket that lived this long was working even without results (silence with KeepAlive): losing it is not a
# "quick failure". Deepgram closes a socket that hears nothing for 10 s, so a shorter life means it never worked.
STABLE_CONNECTION_S = 10.0


class DeepgramSession(SttSession):
    """Deepgram live transcription over deepgram-sdk's async WebSocket client, surviving dropped sockets.

    Every speech chunk and Finalize goes into a `ReplayBuffer` before it is sent; final results acknowledge audio
    (their `start + duration`) and Finalize requests (`from_finalize`). When the socket drops, a background task
    reconnects with backoff and jitter while `send` goes on buffering (it never waits for the network), then sends
    the unacknowledged items again on the new socket. That socket's clock starts at the first replayed sample, so
    its word times are shifted back onto the session's sent-audio clock: timestamps stay exact across reconnects.

    Gives up after `stt_reconnect_max_failures` quick failures in a row (refused, or dropped before any result and
    within `STABLE_CONNECTION_S`): `check()` and the next call raise SttError. The first connect is not retried:
    no audio is held yet, and the client gets a clear `stt_unavailable` at once.
    """

    def __init__(self, on_transcript: OnTranscript, settings: Settings, language: str,
                 on_error: OnError | None = None) -> None:
        super().__init__(on_transcript, on_error)
        self._settings = settings
        self._language = language
        self._buffer = ReplayBuffer(max(1, int(settings.stt_replay_buffer_s * SAMPLE_RATE)))
        self._conn: _Connection | None = None
        self._reconnect_task: asyncio.Task | None = None
        self._failures = 0  # quick failures in a row
        self._failed: SttError | None = None
        self._closing = False
        self._overflow_reported = False
        self._written = 0  # sent-clock position up to which audio was written to some socket
        self._send_samples = max(1, int(settings.stt_send_chunk_ms * SAMPLE_RATE / 1000))
        self._last_reader: asyncio.Task | None = None
        self.connections = 0  # sockets opened, the first included

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

    async def _open(self) -> _Connection:
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
        stack = contextlib.AsyncExitStack()
        try:
            socket = await stack.enter_async_context(client.listen.v1.connect(**self._options()))
        except Exception as exc:  # the SDK raises websockets' own errors; none of them carry the key
            await stack.aclose()
            where = urlsplit(s.deepgram_url)  # the operator's log gets the host; the client's message never does
            log.error("cannot connect to Deepgram at %s:%s: %s", where.hostname, where.port or "", type(exc).__name__)
            raise SttError(f"cannot connect to the speech-to-text service ({type(exc).__name__})") from None
        self.connections += 1
        return _Connection(stack, socket)

    def _start_reader(self, conn: _Connection) -> None:
        previous = self._last_reader
        conn.reader = asyncio.create_task(self._read(conn, previous), name="deepgram-reader")
        self._last_reader = conn.reader

    async def start(self) -> None:
        self._conn = await self._open()
        self._start_reader(self._conn)

    async def _read(self, conn: _Connection, previous: asyncio.Task | None = None) -> None:
        from deepgram.listen.v1.types import ListenV1Results

        try:
            if previous is not None:  # results stay in order: the old socket's last ones are delivered first
                await asyncio.wait({previous})
            async for message in conn.socket:
                if not isinstance(message, ListenV1Results) or not message.is_final:
                    continue
                conn.got_result = True
                self._failures = 0
                self._buffer.ack(conn.base + round((message.start + message.duration) * SAMPLE_RATE))
                if message.from_finalize:
                    self._buffer.ack_finalize()
                try:
                    await self.on_transcript(_from_deepgram(message, conn.base / SAMPLE_RATE))
                except Exception:  # a bug downstream must not look like a dropped socket
                    log.exception("transcript handler failed")
        except Exception as exc:
            log.warning("deepgram connection ended: %s", type(exc).__name__)
        finally:
            conn.closed.set()
            if not self._closing:
                self._lost(conn)

    def _lost(self, conn: _Connection) -> None:
        """The current socket is gone (its reader ended, or a write failed): reconnect in the background."""
        if conn is not self._conn:
            return
        self._conn = None
        if not conn.got_result and time.monotonic() - conn.opened_at < STABLE_CONNECTION_S:
            self._failures += 1
        log.warning("deepgram socket lost; reconnecting with %.1f s of speech to replay",
                    self._buffer.audio_samples / SAMPLE_RATE)
        self._discard(conn)
        self._reconnect_task = asyncio.create_task(self._reconnect(), name="deepgram-reconnect")

    def _discard(self, conn: _Connection) -> None:
        """Close a dead socket. Its reader is not cancelled: it may be delivering the last results it received
        (already acknowledged in the buffer); it ends by itself once the socket is closed."""

        async def close() -> None:
            with contextlib.suppress(Exception):
                await conn.stack.aclose()

        asyncio.get_running_loop().create_task(close())

    async def _reconnect(self) -> None:
        s = self._settings
        while not self._closing:
            if self._failures >= s.stt_reconnect_max_failures:
                return self._give_up()
            await asyncio.sleep(backoff_delay(self._failures, s.stt_reconnect_base_s, s.stt_reconnect_max_s))
            try:
                conn = await self._open()
            except SttError as exc:
                self._failures += 1
                metrics.inc("stt_reconnect_failures_total")
                log.warning("deepgram reconnect failed (%d in a row): %s", self._failures, exc)
                continue
            conn.base = self._buffer.start
            lost = self._buffer.lost  # trimmed while the socket was gone: the new socket starts after a hole
            self._start_reader(conn)
            resent_s = max(0, self._written - conn.base) / SAMPLE_RATE  # sent before, unacknowledged: sent again
            replayed, seq = 0, 0
            self._buffer.hold = True  # the new socket's clock starts at `base`: nothing may be cut under the replay
            try:
                while True:  # items may arrive while replaying: loop until caught up, then go live (no await)
                    items = self._buffer.items_after(seq)
                    if not items:
                        break
                    for item in items:
                        if item.audio is None:
                            await conn.socket.send_finalize()
                        else:
                            await conn.socket.send_media(item.audio)
                            replayed += item.samples
                        seq = item.seq
            except Exception as exc:
                log.warning("deepgram replay failed: %s", type(exc).__name__)
            finally:
                self._buffer.hold = False
            if conn.closed.is_set() or (conn.reader is not None and conn.reader.done()):
                self._failures += 1
                metrics.inc("stt_reconnect_failures_total")
                self._discard(conn)
                continue
            self._conn = conn
            self._written = self._buffer.end
            if lost:
                await self._report_loss(lost)
                self._buffer.acked = max(self._buffer.acked, conn.base)  # counted once
            self._overflow_reported = False
            metrics.inc("stt_reconnects_total")
            metrics.inc("stt_replayed_seconds_total", resent_s)
            log.info("deepgram reconnected (socket %d): %.2f s sent again, %.2f s held during the outage",
                     self.connections, resent_s, replayed / SAMPLE_RATE - resent_s)
            return None
        return None

    def _give_up(self) -> None:
        lost_s = self._buffer.audio_samples / SAMPLE_RATE
        self._failed = SttError(f"the Deepgram connection was lost and {self._failures} reconnects failed")
        metrics.inc("stt_gave_up_total")
        metrics.inc("stt_lost_seconds_total", lost_s)
        log.error("giving up on deepgram after %d failures; %.1f s of speech not transcribed", self._failures, lost_s)

    def check(self) -> None:
        if self._failed is not None:
            raise self._failed

    async def _write(self, op: Callable[[Any], Awaitable[None]]) -> bool:
        conn = self._conn
        if conn is None:
            return False  # reconnecting: the buffer holds it for the replay
        try:
            await op(conn.socket)
            return True
        except Exception as exc:
            log.warning("deepgram write failed: %s", type(exc).__name__)
            self._lost(conn)
            return False

    async def send(self, pcm16: np.ndarray) -> None:
        self.check()
        dropped = self._buffer.add_audio(pcm16.tobytes())
        if dropped and self._conn is None:  # a live socket may still answer for what was cut: not lost yet
            await self._tell_overflow()
        if (self._buffer.end - self._written) >= self._send_samples:
            await self._send_held()

    async def _send_held(self) -> None:
        """Sends the audio held since the last send as one message. Frames arrive every 20 ms; one WebSocket
        message per `STT_SEND_CHUNK_MS` instead costs the server (and Deepgram) a fraction of the per-message work."""
        end = self._buffer.end
        start = max(self._written, self._buffer.start)
        if end <= start or self._conn is None:
            return
        data = self._buffer.audio_between(start, end)
        if await self._write(lambda socket: socket.send_media(data)):
            self._written = max(self._written, end)

    async def _report_loss(self, lost: int) -> None:
        metrics.inc("stt_buffer_overflow_seconds_total", lost / SAMPLE_RATE)
        log.error("deepgram replay buffer overflowed: %.2f s of speech not transcribed", lost / SAMPLE_RATE)
        await self._tell_overflow()

    async def _tell_overflow(self) -> None:
        """Once per outage: the client hears that speech is being dropped (as soon as it is, not after)."""
        if self._overflow_reported:
            return
        self._overflow_reported = True
        limit = self._settings.stt_replay_buffer_s
        if self.on_error is not None:
            await self.on_error("stt_buffer_full", f"speech-to-text has been unreachable for over {limit:.0f} s of "
                                "speech: the oldest speech is not transcribed")

    async def finalize(self) -> None:
        self.check()
        await self._send_held()  # the region's last audio goes at once, before the Finalize
        self._buffer.add_finalize()
        await self._write(lambda socket: socket.send_finalize())

    async def keepalive(self) -> None:
        await self._write(lambda socket: socket.send_keep_alive())

    async def close(self) -> None:
        task = self._reconnect_task
        if task is not None and not task.done():  # an outage at the end: wait a while for the last results
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=self._settings.stt_close_wait_s)
        self._closing = True
        if task is not None and not task.done():
            task.cancel()
        conn = self._conn
        if conn is not None and not conn.closed.is_set():
            with contextlib.suppress(Exception):
                await self._send_held()
                await conn.socket.send_finalize()
                await conn.socket.send_close_stream()
            if conn.reader is not None:
                # The server answers CloseStream with the last results and Metadata, then closes. The reader may
                # also be behind on results already received (speaker tagging under load): give it time to deliver.
                wait_s = max(5.0, self._settings.stt_close_wait_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.reader), timeout=wait_s)
        elif self._failed is None and self._buffer.audio_samples:
            lost_s = self._buffer.audio_samples / SAMPLE_RATE
            metrics.inc("stt_lost_seconds_total", lost_s)
            log.error("stream ended while deepgram was unreachable: %.1f s of speech not transcribed", lost_s)
        if conn is not None:
            if conn.reader is not None and not conn.reader.done():
                conn.reader.cancel()
            with contextlib.suppress(Exception):
                await conn.stack.aclose()


def _from_deepgram(message, offset_s: float = 0.0) -> Transcript:
    """A Results message as a Transcript on the session's sent-audio clock (`offset_s`: where its socket began)."""
    alternatives = message.channel.alternatives
    words = tuple(
        Word(
            text=w.punctuated_word or w.word,
            start=float(w.start) + offset_s,
            end=float(w.end) + offset_s,
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

    def __init__(self, decoders: int = 2, lazy: bool = False) -> None:
        self._count = decoders
        self._free: queue.Queue = queue.Queue()
        self._made = False
        self._lock = threading.Lock()
        if not lazy:  # LAZY_MODELS: built by the first utterance (in its worker thread), ~1 s off the start-up
            self._make()

    def _make(self) -> None:
        with self._lock:
            if self._made:
                return
            from pocketsphinx import Decoder

            for _ in range(self._count):
                self._free.put(Decoder(samprate=SAMPLE_RATE, loglevel="FATAL"))
            self._made = True

    def recognize(self, pcm16: bytes) -> list[Word]:
        """Blocking: run in a worker thread. Returns words with times relative to the audio's start."""
        if not self._made:
            self._make()
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

    async def send(self, pcm16: np.ndarray) -> None:
        self._region.append(pcm16)
        self._sent += len(pcm16)

    async def finalize(self) -> None:
        if not self._region:
            return
        audio = np.concatenate(self._region)
        offset = self._region_sent_start / SAMPLE_RATE
        self._region, self._region_sent_start = [], self._sent
        self._last_task = asyncio.create_task(self._recognize(self._last_task, audio, offset))

    async def _recognize(self, previous: asyncio.Task | None, audio: np.ndarray, offset: float) -> None:
        words = await asyncio.to_thread(self._recognizer.recognize, audio.tobytes())
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
        self._recognizer = LocalRecognizer(lazy=settings.lazy_models) if self.backend == "local" else None

    def session(self, on_transcript: OnTranscript, language: str, on_error: OnError | None = None) -> SttSession:
        if self.backend == "deepgram":
            return DeepgramSession(on_transcript, self.settings, language, on_error)
        assert self._recognizer is not None
        return LocalSession(on_transcript, self._recognizer)
