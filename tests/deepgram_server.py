"""A Deepgram live-transcription (``/v1/listen``) test server, speaking the real wire protocol.

The project's Deepgram STT backend is tested against this server with the real deepgram-sdk: no mocks. Point the
app's ``DEEPGRAM_URL`` at :attr:`DeepgramTestServer.url` (``http://127.0.0.1:<port>``; the SDK's WebSocket base is
``ws://127.0.0.1:<port>``).

Protocol, as Deepgram speaks it:

* ``GET /v1/listen?model=...&encoding=linear16&sample_rate=16000&...`` WebSocket upgrade with
  ``Authorization: Token <key>`` (or ``Bearer <key>``; the SDK sends ``bearer`` for ``access_token=``). A wrong or
  missing key is refused with HTTP 401 (JSON body ``{"err_code": "INVALID_AUTH", ...}``, as Deepgram does); another
  path with 404; ``refuse_connections`` refuses the next N attempts with 503.
* Client → server: binary messages are audio (linear16, ``channels`` interleaved, ``sample_rate`` from the query,
  default 16 kHz mono); text messages are JSON control messages ``{"type": "KeepAlive" | "Finalize" |
  "CloseStream"}``. Any other text gets an ``Error`` message (variant ``SchemaError``) and the socket stays open.
* Server → client: nothing on open; ``Results``, ``UtteranceEnd`` and, after ``CloseStream``, one ``Metadata``,
  then close 1000. No data (audio or any text message) for ``idle_timeout_s`` → close 1011 with Deepgram's
  ``NET-0001`` reason.

Deterministic transcription (so tests can check timestamp mapping exactly). Times are "sent audio" seconds: sample
index / sample rate, counted from the first sample received on the connection. Audio is cut into words of
``word_s`` seconds starting at the end of the last covered audio; each word is ``f"w{start:.2f}"`` (``"w12.50"``)
with its exact ``start``/``end``, ``confidence`` 0.99, and ``speaker`` 0 / ``speaker_confidence`` 0.99 when
diarization is on (``diarize=true`` or ``diarize_model``), as the real API does.

* Whenever the pending (not yet covered) audio reaches ``max(word_s, result_every_s)``, a final ``Results``
  (``is_final`` true, ``speech_final`` false, ``from_finalize`` false) covers all pending *whole* words.
* ``Finalize``: a ``Results`` with ``is_final``, ``speech_final`` and ``from_finalize`` true covering ALL pending
  audio (the last partial word becomes a shorter word; an empty transcript when nothing is pending), then an
  ``UtteranceEnd`` (``last_word_end`` = end of the last word) if any word was sent since the previous one.
* ``CloseStream``: pending audio (if any) in a final ``Results`` (``speech_final`` true, ``from_finalize`` false),
  then ``Metadata`` (``duration`` = seconds of audio received, ``sha256`` of the received bytes), then close 1000.
* ``Results.start`` / ``Results.duration`` are the covered span. ``reply_delay_s`` delays every reply (and the
  closing handshake after ``CloseStream``) without blocking receipt; order is kept.

Recording (per connection, :class:`RecordedConnection`): query parameters, the auth scheme (normalised to
``"Token"`` / ``"Bearer"``), every client message in order (:class:`RecordedMessage`: kind ``"audio"`` or the
control type, byte length, ``time.monotonic()`` arrival time), the received audio, every reply sent
(:class:`RecordedReply`), events (``("idle_timeout" | "drop_after_bytes" | "close_stream" | "server_stop", t)``),
and how it ended: ``closed_by`` is ``"server"`` (CloseStream handled, idle timeout, fault injection, server stopped)
or ``"client"`` (the client sent a close frame, ``close_code`` its code, or vanished, 1006); ``close_reason`` says why.
All upgrade attempts, refused ones included, are in :attr:`DeepgramTestServer.attempts`.

Fault injection: ``drop_after_bytes`` (close 1011 as soon as a connection has received that many audio bytes,
pending replies discarded; with ``drops_left`` = N only the next N connections are dropped) and
``refuse_connections`` (the next N upgrades get HTTP 503). Both are plain
attributes and may be changed while the server runs.

Use :class:`DeepgramTestServer` inside an asyncio test, or :class:`ThreadedDeepgramTestServer` (own thread and event
loop; thread-safe snapshots) when the code under test runs elsewhere, e.g. a uvicorn subprocess. As a script:
``python tests/deepgram_server.py --port 8765`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("deepgram_test_server")
T = TypeVar("T")

LISTEN_PATH = "/v1/listen"
# Deepgram's reason for closing an idle socket (close code 1011).
NET0001_REASON = (
    "Deepgram did not receive audio data or a text message within the timeout window. See https://dpgr.am/net0001"
)
DROP_REASON = "fault injection: drop_after_bytes"
MODEL_VERSION = "2024-12-20.0"


@dataclass
class RecordedMessage:
    """One client → server message: ``kind`` is ``"audio"`` (binary) or the JSON ``type`` of a text message
    (``"KeepAlive"``, ``"Finalize"``, ``"CloseStream"``; ``"invalid"`` when it is not a JSON object with a type)."""

    kind: str
    nbytes: int
    t: float  # time.monotonic() at arrival
    text: str | None = None  # the raw text of a text message


@dataclass
class RecordedReply:
    """One server → client message as sent (``t`` = time.monotonic() when it was sent)."""

    type: str
    t: float
    payload: dict[str, Any]


@dataclass
class UpgradeAttempt:
    t: float
    path: str
    query: dict[str, str]
    auth_scheme: str
    status: int  # 101 when accepted


@dataclass
class RecordedConnection:
    query: dict[str, str]
    auth_scheme: str  # "Token", "Bearer" (normalised), or what else was sent
    path: str = LISTEN_PATH
    headers: dict[str, str] = field(default_factory=dict)  # request headers, Authorization redacted
    request_id: str = ""
    opened_at: float = 0.0
    first_audio_at: float | None = None
    closed_at: float | None = None
    messages: list[RecordedMessage] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    audio_bytes: int = 0  # total received (also counted when the server does not keep audio)
    replies: list[RecordedReply] = field(default_factory=list)
    events: list[tuple[str, float]] = field(default_factory=list)
    closed_by: str | None = None  # "server" | "client" | None while open
    close_code: int | None = None
    close_reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_by is None

    def audio_samples(self) -> np.ndarray:
        """The received audio as int16 (interleaved if multichannel); a trailing odd byte is ignored."""
        n = len(self.audio) // 2 * 2
        return np.frombuffer(bytes(self.audio[:n]), dtype="<i2").astype(np.int16)

    def control_messages(self) -> list[str]:
        """Kinds of the text messages in order, e.g. ``["KeepAlive", "Finalize", "CloseStream"]``."""
        return [m.kind for m in self.messages if m.kind != "audio"]

    def reply_types(self) -> list[str]:
        return [r.type for r in self.replies]

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]

    def copy(self) -> RecordedConnection:
        """A snapshot that later traffic does not change."""
        return replace(
            self,
            headers=dict(self.headers),
            messages=list(self.messages),
            audio=bytearray(self.audio),
            replies=list(self.replies),
            events=list(self.events),
        )


def _parse_auth(value: str | None) -> tuple[str, str | None]:
    """``"Token abc"`` → ``("Token", "abc")``; scheme normalised for Token/Bearer; ``("", None)`` when absent."""
    if not value:
        return "", None
    scheme, _, cred = value.strip().partition(" ")
    canonical = {"token": "Token", "bearer": "Bearer"}.get(scheme.lower(), scheme)
    return canonical, cred.strip() or None


def _model_info(model: str) -> tuple[str, dict[str, str]]:
    """Deepgram reports e.g. model ``nova-3`` as name ``general-nova-3``, arch ``nova-3``."""
    arch = model or "nova-3"
    name = f"general-{arch}"
    model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"deepgram-test-model/{model}"))
    return model_uuid, {"name": name, "version": MODEL_VERSION, "arch": arch}


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() not in ("false", "0", "")


class _Session:
    """Per-connection protocol state machine (runs on the server's event loop)."""

    def __init__(self, server: DeepgramTestServer, ws: ServerConnection, rec: RecordedConnection) -> None:
        self.server = server
        self.ws = ws
        self.rec = rec
        q = rec.query
        try:
            self.sample_rate = int(q.get("sample_rate", "16000"))
            self.channels = max(1, int(q.get("channels", "1")))
        except ValueError:
            self.sample_rate, self.channels = 16000, 1
        self.frame_bytes = 2 * self.channels  # linear16
        self.word_frames = max(1, round(server.word_s * self.sample_rate))
        self.threshold_frames = max(self.word_frames, round(server.result_every_s * self.sample_rate))
        self.diarize = _truthy(q.get("diarize")) or "diarize_model" in q
        self.model = q.get("model", "nova-3")
        self.model_uuid, self.model_info = _model_info(self.model)
        self.cursor = 0  # frames already covered by Results
        self.words_since_utterance_end = 0
        self.last_word_end = 0.0
        self.sha = hashlib.sha256()
        self.queue: asyncio.Queue[tuple[float, str, dict[str, Any] | None]] = asyncio.Queue()
        self.sender: asyncio.Task[None] | None = None
        self.sender_exc: ConnectionClosed | None = None
        self.created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    # ---- receive side ----
    async def run(self) -> None:
        rec = self.rec
        self.sender = asyncio.create_task(self._send_loop())
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: no Task per message (this runs for every audio message)
                    async with asyncio.timeout(self.server.idle_timeout_s):
                        msg = await self.ws.recv()
                except TimeoutError:
                    rec.events.append(("idle_timeout", time.monotonic()))
                    await self._abort(1011, NET0001_REASON)
                    return
                now = time.monotonic()
                if isinstance(msg, bytes):
                    if self._on_audio(msg, now):
                        await self._abort(1011, DROP_REASON)
                        return
                elif self._on_text(msg, now):
                    break  # CloseStream: the sender finishes the replies and closes
            await self.sender
            if rec.closed_by is None and self.sender_exc is not None:
                self._record_closed(self.sender_exc)
        except ConnectionClosed as exc:
            self._record_closed(exc)
        finally:
            if self.sender is not None and not self.sender.done():
                self.sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.sender
            if rec.closed_by is None:  # e.g. the handler was cancelled
                rec.closed_by, rec.close_code, rec.close_reason = "server", self.ws.close_code, "handler ended"
            rec.closed_at = time.monotonic()
            log.info(
                "connection %s closed by %s (%s %s): %d audio bytes, %d replies, controls %s",
                rec.request_id,
                rec.closed_by,
                rec.close_code,
                rec.close_reason,
                rec.audio_bytes,
                len(rec.replies),
                rec.control_messages(),
            )

    def _record_closed(self, exc: ConnectionClosed) -> None:
        rec = self.rec
        if rec.closed_by is not None:
            return
        if exc.rcvd is not None and (exc.sent is None or exc.rcvd_then_sent):
            rec.closed_by, rec.close_code, rec.close_reason = "client", exc.rcvd.code, exc.rcvd.reason
        elif exc.sent is not None:
            rec.closed_by, rec.close_code, rec.close_reason = "server", exc.sent.code, exc.sent.reason
            if exc.sent.code == 1001:
                rec.events.append(("server_stop", time.monotonic()))
        else:
            rec.closed_by, rec.close_code, rec.close_reason = "client", 1006, "connection lost"

    async def _abort(self, code: int, reason: str) -> None:
        """Close now, discarding pending replies (idle timeout, fault injection)."""
        rec = self.rec
        if self.sender is not None:
            self.sender.cancel()
        rec.closed_by, rec.close_code, rec.close_reason = "server", code, reason
        await self.ws.close(code, reason)

    def _on_audio(self, data: bytes, now: float) -> bool:
        """Record an audio message, reply when enough is pending; True when the connection is to be dropped."""
        rec = self.rec
        if rec.first_audio_at is None:
            rec.first_audio_at = now
        rec.messages.append(RecordedMessage("audio", len(data), now))
        if self.server.keep_audio:
            rec.audio.extend(data)
        rec.audio_bytes += len(data)
        self.sha.update(data)
        limit = self.server.drop_after_bytes
        if limit is not None and rec.audio_bytes >= limit:
            rec.events.append(("drop_after_bytes", now))
            if self.server.drops_left is not None:  # a limited number of drops, then healthy again
                self.server.drops_left -= 1
                if self.server.drops_left <= 0:
                    self.server.drop_after_bytes, self.server.drops_left = None, None
            return True
        pending = self._frames_total() - self.cursor
        if pending >= self.threshold_frames:
            whole = pending // self.word_frames
            self._enqueue(
                self._results(self.cursor + whole * self.word_frames, speech_final=False, from_finalize=False)
            )
        return False

    def _on_text(self, text: str, now: float) -> bool:
        """Handle a control message; True when the stream is closing (CloseStream)."""
        rec = self.rec
        try:
            obj = json.loads(text)
            kind = obj.get("type") if isinstance(obj, dict) else None
        except ValueError:
            kind = None
        kind = kind if isinstance(kind, str) and kind else "invalid"
        rec.messages.append(RecordedMessage(kind, len(text.encode()), now, text))
        if kind == "KeepAlive":
            return False
        if kind == "Finalize":
            self._enqueue(self._results(self._frames_total(), speech_final=True, from_finalize=True))
            if self.words_since_utterance_end:
                self._enqueue({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": self.last_word_end})
                self.words_since_utterance_end = 0
            return False
        if kind == "CloseStream":
            rec.events.append(("close_stream", now))
            if self._frames_total() > self.cursor:
                self._enqueue(self._results(self._frames_total(), speech_final=True, from_finalize=False))
            self._enqueue(self._metadata())
            self._enqueue(None)  # then close 1000
            return True
        self._enqueue(
            {
                "type": "Error",
                "variant": "SchemaError",
                "description": f"Could not parse client message of type {kind!r}.",
                "message": text[:1000],
            }
        )
        return False

    # ---- replies ----
    def _frames_total(self) -> int:
        return self.rec.audio_bytes // self.frame_bytes

    def _word(self, f0: int, f1: int) -> dict[str, Any]:
        start, end = f0 / self.sample_rate, f1 / self.sample_rate
        text = f"w{start:.2f}"
        word: dict[str, Any] = {
            "word": text,
            "start": start,
            "end": end,
            "confidence": 0.99,
            "punctuated_word": text,
        }
        if self.diarize:
            word["speaker"] = 0
            word["speaker_confidence"] = 0.99
        return word

    def _results(self, end_frame: int, *, speech_final: bool, from_finalize: bool) -> dict[str, Any]:
        start_frame = self.cursor
        words = []
        f = start_frame
        while f < end_frame:
            e = min(f + self.word_frames, end_frame)
            words.append(self._word(f, e))
            f = e
        self.cursor = max(self.cursor, end_frame)
        if words:
            self.words_since_utterance_end += len(words)
            self.last_word_end = words[-1]["end"]
        sr = self.sample_rate
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": (end_frame - start_frame) / sr,
            "start": start_frame / sr,
            "is_final": True,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(w["punctuated_word"] for w in words),
                        "confidence": 0.99 if words else 0.0,
                        "words": words,
                    }
                ],
            },
            "metadata": {
                "request_id": self.rec.request_id,
                "model_info": dict(self.model_info),
                "model_uuid": self.model_uuid,
            },
        }

    def _metadata(self) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.rec.request_id,
            "sha256": self.sha.hexdigest(),
            "created": self.created,
            "duration": self._frames_total() / self.sample_rate,
            "channels": self.channels,
            "models": [self.model_uuid],
            "model_info": {self.model_uuid: dict(self.model_info)},
        }

    def _enqueue(self, payload: dict[str, Any] | None) -> None:
        kind = "close" if payload is None else "json"
        self.queue.put_nowait((time.monotonic() + self.server.reply_delay_s, kind, payload))

    async def _send_loop(self) -> None:
        rec = self.rec
        try:
            while True:
                due, kind, payload = await self.queue.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if kind == "close":
                    rec.closed_by, rec.close_code, rec.close_reason = "server", 1000, "CloseStream"
                    await self.ws.close(1000)
                    return
                assert payload is not None
                await self.ws.send(json.dumps(payload))
                rec.replies.append(RecordedReply(payload["type"], time.monotonic(), payload))
        except ConnectionClosed as exc:
            self.sender_exc = exc


class DeepgramTestServer:
    """Deepgram ``/v1/listen`` on 127.0.0.1 (a free port unless ``port`` is given); run it on the current loop."""

    def __init__(
        self,
        api_key: str = "test-key",
        word_s: float = 0.5,
        result_every_s: float = 1.0,
        reply_delay_s: float = 0.0,
        idle_timeout_s: float = 10.0,
        *,
        drop_after_bytes: int | None = None,
        drops_left: int | None = None,
        refuse_connections: int = 0,
        keep_audio: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if word_s <= 0 or result_every_s <= 0 or idle_timeout_s <= 0 or reply_delay_s < 0:
            raise ValueError("word_s, result_every_s and idle_timeout_s must be > 0, reply_delay_s >= 0")
        self.api_key = api_key
        self.word_s = word_s
        self.result_every_s = result_every_s
        self.reply_delay_s = reply_delay_s
        self.idle_timeout_s = idle_timeout_s
        self.drop_after_bytes = drop_after_bytes
        self.drops_left = drops_left  # None: drop every connection; N: only the next N, then stop dropping
        self.refuse_connections = refuse_connections
        self.keep_audio = keep_audio
        self.host = host
        self.port = port
        self.connections: list[RecordedConnection] = []
        self.attempts: list[UpgradeAttempt] = []
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """What the app's DEEPGRAM_URL is set to."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket base (``DeepgramClientEnvironment(production=...)``)."""
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            close_timeout=2,
            max_size=16 * 1024 * 1024,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Deepgram test server listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DeepgramTestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[DeepgramTestServer], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` is true (polling), or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.01)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        scheme, cred = _parse_auth(request.headers.get("Authorization"))
        request_id = str(uuid.uuid4())
        if parts.path.rstrip("/") != LISTEN_PATH:
            status, err = HTTPStatus.NOT_FOUND, ("NOT_FOUND", "Not found.")
        elif self.refuse_connections > 0:
            self.refuse_connections -= 1
            status, err = HTTPStatus.SERVICE_UNAVAILABLE, ("SERVICE_UNAVAILABLE", "Service temporarily unavailable.")
        elif scheme not in ("Token", "Bearer") or cred != self.api_key:
            status, err = HTTPStatus.UNAUTHORIZED, ("INVALID_AUTH", "Invalid credentials.")
        else:
            self.attempts.append(UpgradeAttempt(time.monotonic(), parts.path, query, scheme, 101))
            connection.dg_request_id = request_id  # type: ignore[attr-defined]
            return None
        self.attempts.append(UpgradeAttempt(time.monotonic(), parts.path, query, scheme, status.value))
        body = json.dumps({"err_code": err[0], "err_msg": err[1], "request_id": request_id})
        response = connection.respond(status, body)
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        response.headers["dg-error"] = err[1]
        response.headers["dg-request-id"] = request_id
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        parts = urlsplit(request.path)
        scheme, _ = _parse_auth(request.headers.get("Authorization"))
        headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in request.headers.raw_items()}
        rec = RecordedConnection(
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            auth_scheme=scheme,
            path=parts.path,
            headers=headers,
            request_id=getattr(ws, "dg_request_id", str(uuid.uuid4())),
            opened_at=time.monotonic(),
        )
        self.connections.append(rec)
        await _Session(self, ws, rec).run()


class ThreadedDeepgramTestServer:
    """:class:`DeepgramTestServer` on its own thread and event loop, for code under test running elsewhere.

    ``start()`` / ``stop()`` (or ``with``); ``connections`` / ``attempts`` return snapshots taken on the server's
    loop (consistent, and not changed by later traffic). The fault knobs may be set from any thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.server = DeepgramTestServer(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:  # reported to the starting thread
                error.append(exc)
                ready.set()
                loop.close()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="deepgram-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("Deepgram test server did not start")
        if error:
            raise error[0]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> ThreadedDeepgramTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (so it sees a consistent state) and return its result."""
        if self._loop is None:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    @property
    def api_key(self) -> str:
        return self.server.api_key

    @property
    def connections(self) -> list[RecordedConnection]:
        return self._on_loop(lambda: [c.copy() for c in self.server.connections])

    @property
    def attempts(self) -> list[UpgradeAttempt]:
        return self._on_loop(lambda: list(self.server.attempts))

    @property
    def drop_after_bytes(self) -> int | None:
        return self.server.drop_after_bytes

    @drop_after_bytes.setter
    def drop_after_bytes(self, value: int | None) -> None:
        self.server.drop_after_bytes = value

    def drop_connections(self, after_bytes: int, times: int = 1) -> None:
        """Drop the next `times` connections (each once it has received `after_bytes` of audio), then no more."""

        def arm() -> None:
            self.server.drop_after_bytes, self.server.drops_left = after_bytes, times

        self._on_loop(arm)

    @property
    def refuse_connections(self) -> int:
        return self.server.refuse_connections

    @refuse_connections.setter
    def refuse_connections(self, value: int) -> None:
        self._on_loop(lambda: setattr(self.server, "refuse_connections", value))

    @property
    def reply_delay_s(self) -> float:
        return self.server.reply_delay_s

    @reply_delay_s.setter
    def reply_delay_s(self, value: float) -> None:
        self.server.reply_delay_s = value

    def wait_for(self, predicate: Callable[[ThreadedDeepgramTestServer], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` is true (polling snapshots), or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            time.sleep(0.01)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Deepgram /v1/listen test server (deterministic transcripts).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--api-key", default="test-key")
    p.add_argument("--word-s", type=float, default=0.5)
    p.add_argument("--result-every-s", type=float, default=1.0)
    p.add_argument("--reply-delay-s", type=float, default=0.0)
    p.add_argument("--idle-timeout-s", type=float, default=10.0)
    p.add_argument("--keep-audio", action="store_true", help="keep received audio in memory (off: only counted)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        server = DeepgramTestServer(
            api_key=args.api_key,
            word_s=args.word_s,
            result_every_s=args.result_every_s,
            reply_delay_s=args.reply_delay_s,
            idle_timeout_s=args.idle_timeout_s,
            keep_audio=args.keep_audio,
            host=args.host,
            port=args.port,
        )
        await server.start()
        print(f"Deepgram test server listening on {server.url} (ws {server.ws_url}{LISTEN_PATH})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
