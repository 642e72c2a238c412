"""STT backend `deepgram`: deepgram-sdk's async live client against `DEEPGRAM_URL` (api.deepgram.com, a self-hosted
Deepgram, or the tests' Deepgram-protocol server). KeepAlive during silence, Finalize when a speech region closes; a
dropped socket is re-opened and the unacknowledged speech replayed (see `DeepgramSession`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

import metrics
from config import Settings
from streaming.reconnect import ReplayBuffer, backoff_delay
from streaming.stt import SAMPLE_RATE, OnError, OnTranscript, SttError, SttSession, Transcript, Word

log = logging.getLogger(__name__)


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
