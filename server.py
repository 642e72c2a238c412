"""The unified audio server: app factory, lifespan (settings, models, auth), the `/v4/listen` WebSocket, health.

    uvicorn server:app --host 0.0.0.0 --port 8080
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")  # pyannote.audio sends telemetry unless told not to
# One thread per numeric-library call, unless the environment says otherwise. These libraries read the variables
# once, when they load (before numpy and torch are imported). Under many streams the parallelism comes from the
# streams' worker threads and the pool's batches; a library's extra threads only spin-wait between small calls
# (bench/RESULTS.md: about 35% less CPU per stream with 1).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from fastapi import FastAPI, WebSocket  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from starlette.websockets import WebSocketDisconnect, WebSocketState  # noqa: E402

import batch_routes  # noqa: E402
import conversation_routes  # noqa: E402
import jobs  # noqa: E402
import metrics  # noqa: E402
from auth import Authenticator, AuthError  # noqa: E402
from config import Settings, get_settings  # noqa: E402
from conversations import ConversationLink, ConversationService  # noqa: E402
from storage import open_storage  # noqa: E402
from streaming.codecs import make_decoder  # noqa: E402
from streaming.pipeline import Pipeline, SegmentIdentifier  # noqa: E402
from streaming.pool import ModelPool  # noqa: E402
from streaming.protocol import CloseCode, ErrorEvent, ListenParams, ServiceStatusEvent, SpeakerAssigned  # noqa: E402
from streaming.speaker import MATCH_RULES, ProfileIndex  # noqa: E402
from streaming.stt import SttError, SttFactory  # noqa: E402
from streaming.tagging import WINDOW_S, SpeakerTagger  # noqa: E402
from streaming.vad import VadParams, load_vad_backend  # noqa: E402

log = logging.getLogger("server")


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = settings or get_settings()
        logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        st = app.state
        st.settings = s
        st.ready = False
        st.active_streams = 0
        st.user_streams = {}  # uid → that user's open connections, oldest first (to replace, not to process)
        st.streams = set()  # every registered stream's client (the shutdown drain stops them all)
        st.draining = False  # SIGTERM/SIGINT received: new streams are refused, open ones finish (see _drain)
        st.authenticator = Authenticator(s)
        if s.torch_threads:
            _set_torch_threads(s.torch_threads)
        st.vad_params = VadParams.from_settings(s)
        st.vad_backend = await asyncio.to_thread(load_vad_backend, s)
        # Warm-up: the first model call pays for allocation; keep that off the first user's stream.
        await asyncio.to_thread(st.vad_backend.warm_up)
        st.stt_factory = await asyncio.to_thread(SttFactory, s)
        st.storage = await open_storage(s)
        st.conversations = ConversationService(st.storage)
        st.jobs = jobs.JobRunner(s, st.storage, st.conversations)
        if s.jobs_enabled:
            st.jobs.start()
        st.pool = await ModelPool.create(s, vad_backend=st.vad_backend)
        st.identifier = SegmentIdentifier(st.pool, st.vad_backend, st.vad_params, MATCH_RULES)
        st.ready = True
        log.info("ready: vad=%s stt=%s device=%s", st.vad_backend.name, st.stt_factory.backend, s.model_device)
        restore_signals = _drain_before_exit_on_signals(app)
        yield
        restore_signals()
        st.ready = False
        await st.jobs.shutdown()
        await st.pool.close()
        await st.storage.close()

    app = FastAPI(title="Omi unified audio server", version="0.1.0", lifespan=lifespan)
    app.include_router(batch_routes.router)
    app.include_router(conversation_routes.router)
    app.include_router(jobs.router)
    app.include_router(metrics.router)
    app.openapi = _openapi_with_string_details(app)

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Models loaded and accepting streams")
    async def ready() -> JSONResponse:
        st = app.state
        if not getattr(st, "ready", False):
            return JSONResponse({"ready": False, "reason": "starting"}, status_code=503)
        if st.draining:
            return JSONResponse({"ready": False, "reason": "shutting_down", "active_streams": st.active_streams},
                                status_code=503)
        storage_ok = await st.storage.ping()
        ok = storage_ok and st.active_streams < st.settings.max_streams and not st.pool.saturated
        body = {
            "ready": ok,
            "vad": st.vad_backend.name,
            "stt": st.stt_factory.backend,
            "speaker": st.pool.embedder_name,
            "storage": storage_ok,
            "pool": st.pool.stats(),
            "pool_saturated": st.pool.saturated,
            "active_streams": st.active_streams,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    app.add_api_websocket_route("/v4/listen", listen)
    app.add_api_websocket_route("/v3/listen", listen)
    return app


def _set_torch_threads(threads: int) -> None:
    """Process-wide torch intra-op threads (the pool's workers set it again in their own threads)."""
    import torch

    torch.set_num_threads(threads)


def _openapi_with_string_details(app: FastAPI):
    """FastAPI documents a 422 body as `{"detail": [validation errors]}`, but the routes also answer 422 (and other
    4xx) with `{"detail": "<message>"}` (HTTPException): the schema must allow both shapes."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()  # caches itself in app.openapi_schema; patched in place
            error = schema.get("components", {}).get("schemas", {}).get("HTTPValidationError", {})
            detail = error.get("properties", {}).get("detail")
            if detail is not None:
                title = detail.pop("title", "Detail")
                error["properties"]["detail"] = {"title": title, "anyOf": [detail, {"type": "string"}]}
        return app.openapi_schema

    return openapi


# --- graceful shutdown ------------------------------------------------------------------------------------------

SHUTTING_DOWN_MESSAGE = "server shutting down, reconnect"
_LINGER_GAP_S = 0.25  # a stopping stream ends once no frame came for this long (see _receive_loop)


def _drain_before_exit_on_signals(app: FastAPI) -> Callable[[], None]:
    """On SIGTERM/SIGINT under uvicorn, drain the streams first (`_drain`), then let uvicorn shut down.

    uvicorn (0.38, `Server.capture_signals`) installs its `handle_exit` with `signal.signal` before the lifespan
    starts. Left alone, a signal makes it close every WebSocket at once with 1012 ("service restart") while the
    streams still have audio in their VAD and STT. So the lifespan wraps that handler: the first signal starts
    `_drain` on the event loop, and uvicorn's own handler runs when the drain is done (or SHUTDOWN_GRACE_S passed);
    uvicorn then stops listening and runs the lifespan's shutdown as before. A second signal goes to uvicorn at once
    (Ctrl+C twice still forces the exit). Under another server, or off the main thread, nothing is wrapped.
    Returns a function that puts the wrapped handlers back."""
    try:
        from uvicorn.server import Server
    except ImportError:
        return lambda: None
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    wrapped: dict[int, tuple[Callable[[int, FrameType | None], None], Any]] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        uvicorn_handler = signal.getsignal(sig)
        if not isinstance(getattr(uvicorn_handler, "__self__", None), Server):
            continue

        def on_signal(signum: int, frame: FrameType | None, uvicorn_handler: Any = uvicorn_handler) -> None:
            if app.state.draining:  # a second signal: uvicorn's own behaviour, now
                uvicorn_handler(signum, frame)
                return
            app.state.draining = True  # /ready answers 503 and new streams are refused from here on
            # A signal handler runs between two bytecodes of whatever the loop was doing: only hand over.
            loop.call_soon_threadsafe(_start_drain, app, lambda: uvicorn_handler(signum, None))

        signal.signal(sig, on_signal)
        wrapped[sig] = (on_signal, uvicorn_handler)

    def restore() -> None:
        for sig, (ours, theirs) in wrapped.items():
            if signal.getsignal(sig) is ours:
                signal.signal(sig, theirs)

    return restore


def _start_drain(app: FastAPI, then: Callable[[], None]) -> None:
    app.state.drain_task = asyncio.get_running_loop().create_task(_drain(app, then), name="drain")


async def _drain(app: FastAPI, then: Callable[[], None]) -> None:
    """Graceful shutdown of the streams, then `then()` (uvicorn's exit). While it runs `/ready` answers 503 and new
    streams are refused (`shutting_down`, 1013). Every open stream gets the error event `shutting_down` and is
    asked to stop: it still processes the audio that keeps arriving back to back (sent before the client heard of
    the stop; at most half of SHUTDOWN_GRACE_S), then `_serve_stream` finishes it as on any end (VAD flush, STT
    finalize, last segments stored and sent) and closes it with 1001 "server shutting down". After
    SHUTDOWN_GRACE_S uvicorn's exit runs regardless (it closes what is left with 1012)."""
    st = app.state
    grace_s = st.settings.shutdown_grace_s
    deadline = time.monotonic() + grace_s
    log.info("shutting down: finishing %d streams (at most %.0f s)", st.active_streams, grace_s)
    try:
        while True:
            for client in list(st.streams):
                if client.stop_code is None:
                    await client.send_json(ErrorEvent(code="shutting_down", message=SHUTTING_DOWN_MESSAGE)
                                           .model_dump())
                    client.request_stop(CloseCode.GOING_AWAY, "server shutting down", linger_s=grace_s / 2)
            if st.active_streams == 0:
                log.info("shutting down: all streams finished")
                break
            if time.monotonic() >= deadline:
                log.warning("shutting down: %d streams still open after %.0f s", st.active_streams, grace_s)
                break
            await asyncio.sleep(0.05)
    finally:
        then()


# --- the WebSocket -----------------------------------------------------------------------------------------------


class _Outgoing:
    """One queued message: text (an event or a ping), a segment list (kept by id until sent, so that a newer version
    of a segment can replace a queued one), or the close, which ends the queue."""

    __slots__ = ("close", "ping", "segments", "text")

    def __init__(self, text: str = "", *, segments: dict[str, Any] | None = None, ping: bool = False,
                 close: tuple[int, str] | None = None) -> None:
        self.text = text
        self.segments = segments
        self.ping = ping
        self.close = close

    def render(self) -> str:
        if self.segments is not None:
            return json.dumps(list(self.segments.values()), separators=(",", ":"))
        return self.text


SLOW_CLIENT_REASON = "slow client: not reading its messages"


class _Client:
    """One WebSocket's outbound side: a bounded queue drained by one sender task, in order.

    Why: uvicorn's WebSocket implementations (websockets, the default; websockets-sansio; wsproto) all wait in `send`
    while the transport's write buffer is over its high-water mark (64 KiB), so a peer that stops reading does not
    grow the server's buffers: it blocks `send` once the TCP buffers are full. Awaited by the producers, that stalled
    the STT reader task (`Pipeline._on_transcript` → emit) behind one slow phone, so its last results were cancelled
    unstored at the end of the stream, and it stalled the conversation events of the user's other streams. So:

    - `send_json` / `send_text` / `send_ping` only queue; they never block their caller.
    - A ping is dropped while anything is queued (the queued messages keep the connection busy anyway).
    - Segment lists are upserts by `id`: a new list moves its segments' newer versions into the queued, unsent lists
      that hold them (in place: the client still sees each segment first where it first came), within the run of
      segment lists at the tail of the queue (never past an event). A list left empty is dropped. Drops count in
      `ws_messages_dropped_total`.
    - Slow client: over WS_SEND_QUEUE_MAX messages queued, or one send stuck for WS_SLOW_CLIENT_TIMEOUT_S. The queue
      is dropped, an `error` event `slow_client` is attempted, the stream is told to stop reading (`request_stop`)
      and closes with 1008 (`CloseCode.POLICY`; the client broke the rule that it reads its messages), counted in
      `ws_slow_clients_closed_total`. The stream still finishes and stores everything (segments are stored before
      they are sent): the client re-reads them from `/v1/conversations` when it reconnects.
    - `close` is queued behind what is queued already, which gets WS_SLOW_CLIENT_TIMEOUT_S to go out.

    Also the stop signal for the stream's receive loop (`request_stop`, `receive`): server shutdown, slow client.
    """

    def __init__(self, websocket: WebSocket, queue_max: int = 256, slow_timeout_s: float = 30.0) -> None:
        self.ws = websocket
        self.gone = False  # nothing more will be sent: the client went away, or the close was sent
        self.slow = False
        self.stop_code: int | None = None  # the receive loop is asked to end with this close code
        self.stop_deadline = 0.0
        self.close_reason = ""
        self._queue_max = queue_max
        self._slow_timeout_s = slow_timeout_s
        self._queue: deque[_Outgoing] = deque()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()  # the connection's handler task: the one that calls `receive`
        self._receiving = False  # a receive is in progress (and may be interrupted)
        self._interrupted = False  # ... and was: its task was cancelled to end it
        self._receive_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None  # wakes the receive at its deadline (re-armed lazily)
        self._closing = False
        self._flush_deadline: float | None = None
        self._sender = asyncio.create_task(self._send_loop(), name="ws-sender")

    # -- producers (never block) --------------------------------------------------------------------------------

    async def send_json(self, payload: Any) -> None:
        if isinstance(payload, list) and payload and all(isinstance(p, dict) and "id" in p for p in payload):
            self._put(_Outgoing(segments={p["id"]: p for p in payload}))
        else:
            self._put(_Outgoing(json.dumps(payload, separators=(",", ":"))))

    async def send_text(self, text: str) -> None:
        self._put(_Outgoing(text))

    def send_ping(self) -> None:
        if self._queue:
            metrics.inc("ws_messages_dropped_total")
            return
        self._put(_Outgoing("ping", ping=True))

    def _put(self, item: _Outgoing) -> None:
        if self.gone or self.slow or self._closing:
            return
        if item.segments is not None and self._coalesce(item):
            return
        self._queue.append(item)
        if len(self._queue) > self._queue_max:
            self._give_up(f"over {self._queue_max} messages queued")
            return
        self._wake.set()

    def _coalesce(self, item: _Outgoing) -> bool:
        """Moves `item`'s segments into the queued lists holding older versions; True when nothing is left of it."""
        assert item.segments is not None
        for queued in reversed(self._queue):
            if queued.ping:
                continue
            if queued.segments is None:
                break
            for segment_id in [i for i in item.segments if i in queued.segments]:
                queued.segments[segment_id] = item.segments.pop(segment_id)
            if not item.segments:
                metrics.inc("ws_messages_dropped_total")
                return True
        return False

    def _give_up(self, why: str) -> None:
        if self.slow or self.gone:
            return
        self.slow = True
        closes = [q for q in self._queue if q.close is not None]
        metrics.inc("ws_messages_dropped_total", len(self._queue) - len(closes))
        metrics.inc("ws_slow_clients_closed_total")
        log.warning("closing a slow client (%s); its stream still finishes and is stored", why)
        self._queue.clear()
        event = ErrorEvent(code="slow_client", message=f"{SLOW_CLIENT_REASON} ({why}); the transcript is stored")
        self._queue.append(_Outgoing(json.dumps(event.model_dump(), separators=(",", ":"))))
        self._queue.extend(closes)
        self._wake.set()
        self.request_stop(CloseCode.POLICY, SLOW_CLIENT_REASON)

    # -- the sender ---------------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue.popleft()
            if item.close is not None:
                await self._close_now(*item.close)
                return
            timeout = 1.0 if self.slow else self._slow_timeout_s  # a slow client's error event is only attempted
            if self._flush_deadline is not None:
                timeout = max(min(timeout, self._flush_deadline - time.monotonic()), 0.01)
            try:
                async with asyncio.timeout(timeout):
                    await self.ws.send_text(item.render())
            except TimeoutError:
                self._give_up(f"nothing sent for {timeout:.1f} s")
            except Exception:  # the client went away; the pipeline still finishes its work
                self.gone = True
                self._queue.clear()
                return

    async def _close_now(self, code: int, reason: str) -> None:
        if self.slow:
            code, reason = CloseCode.POLICY, SLOW_CLIENT_REASON
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason[:120])
        self.gone = True

    async def close(self, code: int, reason: str = "") -> None:
        """Closes after the messages already queued (bounded, see above); returns when the close was sent."""
        if not self._closing:
            self._closing = True
            self._flush_deadline = time.monotonic() + self._slow_timeout_s
            self._queue.append(_Outgoing(close=(code, reason or self.close_reason)))
            self._wake.set()
        await asyncio.wait({self._sender})  # never raises; cancelling this wait leaves the sender running

    def abandon(self) -> None:
        """The connection's handler is done: stop the sender if nothing closed it."""
        if self._timer is not None:
            self._timer.cancel()
        if not self._sender.done():
            self._sender.cancel()

    # -- the receive side ---------------------------------------------------------------------------------------

    def request_stop(self, code: int, reason: str, linger_s: float = 0.0) -> None:
        """Asks the stream's receive loop to end and close with `code`. For `linger_s` it still processes frames
        that keep arriving back to back (audio the client sent before it heard of the stop). A later request can
        only shorten the linger."""
        deadline = time.monotonic() + linger_s
        if self.stop_code is None:
            self.stop_code, self.close_reason, self.stop_deadline = code, reason, deadline
            self._interrupt()
        else:
            self.stop_deadline = min(self.stop_deadline, deadline)

    async def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next ASGI message, or None after `timeout` s or as soon as a stop is requested during this call (a
        message that came meanwhile is returned, never lost: cancelling a pending receive is safe in uvicorn's
        implementations). Errors as from `WebSocket.receive`.

        Called for every audio frame (50 a second per stream), so it is cheap: the receive is awaited directly in
        the handler's task, and `_interrupt` ends it by cancelling that task, the way `asyncio.timeout` does (the
        cancellation lands inside this await, is taken back with `uncancel` and becomes None), without a task, a
        timer, a wait or a timeout object per frame. One timer per client wakes it at its deadline, re-armed only
        when it fires early (a frame's deadline is almost always later than the previous one's)."""
        self._receive_deadline = self._loop.time() + timeout
        if self._timer is None or self._timer.when() > self._receive_deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._receive_deadline, self._on_timer)
        self._receiving = True
        try:
            return await self.ws.receive()
        except asyncio.CancelledError:
            if not self._interrupted or self._task.uncancel() > 0:
                raise  # a real cancellation of the handler (also one that came with the interruption)
            return None
        finally:
            self._receiving = self._interrupted = False

    def _on_timer(self) -> None:
        self._timer = None
        if not self._receiving:
            return  # not receiving now: the next receive arms the timer again
        if self._loop.time() >= self._receive_deadline:
            self._interrupt()
        else:
            self._timer = self._loop.call_at(self._receive_deadline, self._on_timer)

    def _interrupt(self) -> None:
        """Ends the receive in progress, if any, with None. Only ever called from other tasks and callbacks (while
        a receive is in progress its own task is suspended in it)."""
        if self._receiving and not self._interrupted:
            self._interrupted = True
            self._task.cancel()


async def _refuse(client: _Client, code: int, error: str, message: str) -> None:
    await client.send_json(ErrorEvent(code=error, message=message).model_dump())
    await client.close(code, message)


async def listen(websocket: WebSocket) -> None:
    """`/v4/listen`: binary frames are audio; text frames are JSON commands; results go back as JSON."""
    st = websocket.app.state
    s: Settings = st.settings
    await websocket.accept()
    client = _Client(websocket, s.ws_send_queue_max, s.ws_slow_client_timeout_s)
    try:
        await _admit(client, websocket, st, s)
    finally:
        client.abandon()


async def _admit(client: _Client, websocket: WebSocket, st: Any, s: Settings) -> None:
    """Checks parameters, identity and room, registers the stream and serves it.

    While the server shuts down (`_drain`), a new stream gets the error event `shutting_down` and close 1013 (try
    again later: as for `server_full`, the client reconnects, and the load balancer, seeing `/ready` answer 503,
    sends it to another replica)."""
    try:
        params = ListenParams(**dict(websocket.query_params))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return await _refuse(client, CloseCode.POLICY, "bad_parameters", problems)
    if params.conversation_timeout < s.min_conversation_timeout_s:
        return await _refuse(client, CloseCode.POLICY, "bad_parameters",
                             f"conversation_timeout: at least {s.min_conversation_timeout_s} s")
    try:
        uid = await st.authenticator.uid_for(websocket.headers.get("authorization"),
                                             websocket.client.host if websocket.client else None)
    except AuthError as exc:
        return await _refuse(client, CloseCode.POLICY, "unauthorized", str(exc))
    if st.draining:
        return await _refuse(client, CloseCode.TRY_AGAIN_LATER, "shutting_down", SHUTTING_DOWN_MESSAGE)
    if st.active_streams >= s.max_streams or not await _pool_has_room(st.pool):
        return await _refuse(client, CloseCode.TRY_AGAIN_LATER, "server_full", "server full, retry in 5 s")

    # The newest stream wins: an old one may be a dead phone socket. (Re-read the user's list after each await: the
    # old stream's end may have removed it from user_streams meanwhile.)
    while len(mine := st.user_streams.setdefault(uid, [])) >= s.max_streams_per_user:
        old = mine.pop(0)
        await old.send_json(ErrorEvent(code="replaced", message="a newer stream of this user replaced this one")
                            .model_dump())
        await old.close(CloseCode.GOING_AWAY, "replaced by a newer stream")
    if st.draining:  # the drain began during the awaits above; none from here to the registration
        return await _refuse(client, CloseCode.TRY_AGAIN_LATER, "shutting_down", SHUTTING_DOWN_MESSAGE)
    mine.append(client)
    st.streams.add(client)
    st.active_streams += 1
    try:
        await _serve_stream(client, params, uid, st, s)
    finally:
        st.active_streams -= 1
        st.streams.discard(client)
        mine = st.user_streams.get(uid, [])
        if client in mine:
            mine.remove(client)
        if not mine:
            st.user_streams.pop(uid, None)


async def _pool_has_room(pool: ModelPool, wait_s: float = 2.0) -> bool:
    """A saturated pool makes a new stream wait briefly for room, then refuses it (never a slow crawl)."""
    deadline = time.monotonic() + wait_s
    while pool.saturated:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _speaker_tagger(st: Any, uid: str, params: ListenParams) -> SpeakerTagger:
    profiles = await st.storage.list_profiles(uid) if params.include_speech_profile else []
    index = ProfileIndex.from_profiles(profiles, st.pool.embedder_name)
    return SpeakerTagger(st.pool, index, MATCH_RULES)


async def _serve_stream(client: _Client, params: ListenParams, uid: str, st: Any, s: Settings) -> None:
    await client.send_json(ServiceStatusEvent(status="initiating", status_text="Service starting").model_dump())
    try:
        decoder = make_decoder(params.codec, params.sample_rate, params.channels)
    except ValueError as exc:
        return await _refuse(client, CloseCode.POLICY, "bad_parameters", str(exc))
    service: ConversationService = st.conversations
    try:  # storage down at the start: no conversation to keep the transcript in, so the client retries later
        last = await service.last_memory(uid)
        conversation = await service.attach(uid, params.language, params.conversation_timeout)
        tagger = await _speaker_tagger(st, uid, params)
        state = await st.storage.load_speaker_state(uid, conversation.id)
    except Exception as exc:
        log.error("stream for %s refused, storage unavailable: %s", uid, type(exc).__name__)
        return await _refuse(client, CloseCode.TRY_AGAIN_LATER, "storage_unavailable",
                             "storage unavailable, retry shortly")
    if last is not None:
        await client.send_json({"type": "last_memory", "memory_id": last.id})
    link = ConversationLink(service, conversation, params.language, params.conversation_timeout)
    if state is not None:
        tagger.import_state(state)
    pipeline = Pipeline(
        decoder=decoder,
        vad_backend=st.vad_backend,
        vad_params=st.vad_params,
        stt_factory=st.stt_factory,
        language=params.language,
        emit=client.send_json,
        tagger=tagger,
        persist=link.persist,
        time_offset=conversation.duration_s,
        keepalive_s=s.deepgram_keepalive_s,
        pending_max=s.storage_pending_max_segments,
        retry_on_close_s=s.storage_retry_on_close_s,
        write_timeout_s=s.storage_write_timeout_s,
        vad_runner=st.pool.run_vad,
    )
    link.pipeline = pipeline
    await client.send_json(ServiceStatusEvent(status="stt_initiating", status_text="STT starting").model_dump())
    try:
        await pipeline.start()
    except SttError as exc:
        log.error("stream for %s: %s", uid, exc)
        return await _refuse(client, CloseCode.SERVER_ERROR, "stt_unavailable", str(exc))
    await client.send_json(ServiceStatusEvent(status="ready").model_dump())
    log.info("stream open uid=%s codec=%s rate=%d", uid, params.codec, params.sample_rate)

    heartbeat = asyncio.create_task(_heartbeat(client, s.heartbeat_s))
    stop_listening = service.listen(uid, client.send_json)
    close_code = CloseCode.NORMAL
    try:
        close_code = await _receive_loop(client, pipeline, s, lambda text: _command(client, pipeline, st, uid, text))
    finally:
        heartbeat.cancel()
        await pipeline.finish()
        stop_listening()
        conv = link.conversation
        try:  # storage still down: the speaker labels restart on reconnect, but the client is still closed
            await st.storage.save_speaker_state(uid, conv.id, tagger.export_state())
        except Exception as exc:
            log.warning("could not store the speaker state of %s: %s", uid, type(exc).__name__)
        try:  # storage still down: a reconnect restarts the clock at the last stored segment's end
            await service.stream_ended(conv, pipeline.segments.offset + pipeline.stream_seconds)
        except Exception as exc:
            log.warning("could not store the end of the stream of %s: %s", uid, type(exc).__name__)
        log.info("stream closed uid=%s frames=%d bad=%d sent=%.1fs of %.1fs", uid, pipeline.stats.frames,
                 pipeline.stats.bad_frames, pipeline.stats.sent_samples / 16000, pipeline.stats.stream_samples / 16000)
        await client.close(close_code)


async def _receive_loop(client: _Client, pipeline: Pipeline, s: Settings, on_text) -> int:
    """Returns the close code to end with. Idle means no audio for IDLE_TIMEOUT_S (text frames don't count).

    One frame at a time: the next is read only when the previous went through decode and VAD, so a client that
    sends faster than real time is paced by TCP, never dropped: uvicorn stops reading the socket while its queue
    (32 messages) is full, the kernel's receive buffer fills (several MB on Linux), then the client's sends wait.
    Such a client must wait for the server's close frame after its own (its close timeout): the audio still in
    the buffers is processed first, and an aborted connection discards it.

    A stop request (`_Client.request_stop`: shutdown, slow client) ends the loop with its code once no frame came
    for `_LINGER_GAP_S` or its linger deadline passed: the audio a client sent before it heard of the stop is still
    processed."""
    last_audio = time.monotonic()
    while True:
        now = time.monotonic()
        stopping = client.stop_code is not None
        if stopping:
            timeout = min(_LINGER_GAP_S, client.stop_deadline - now)
        else:
            timeout = max(s.idle_timeout_s - (now - last_audio), 0.01)
        try:
            message = await client.receive(timeout) if timeout > 0 else None
        except WebSocketDisconnect:
            client.gone = True
            return CloseCode.NORMAL
        if message is None:
            if client.stop_code is not None:
                if stopping:
                    return client.stop_code
                continue  # stop requested just now: linger
            await client.send_json(ErrorEvent(code="idle", message="no audio received, closing").model_dump())
            return CloseCode.GOING_AWAY
        if message["type"] == "websocket.disconnect":
            client.gone = True
            return CloseCode.NORMAL
        if message.get("bytes") is not None:
            frame = message["bytes"]
            last_audio = time.monotonic()
            if len(frame) > s.max_frame_bytes:
                pipeline.stats.bad_frames += 1
                await client.send_json(ErrorEvent(
                    code="frame_too_large", message=f"frame of {len(frame)} bytes over {s.max_frame_bytes}"
                ).model_dump())
                continue
            try:
                await pipeline.feed(frame)
            except SttError as exc:
                await client.send_json(ErrorEvent(code="stt_unavailable", message=str(exc)).model_dump())
                return CloseCode.SERVER_ERROR
        elif message.get("text") is not None:
            await on_text(message["text"])


async def _command(client: _Client, pipeline: Pipeline, st: Any, uid: str, text: str) -> None:
    """JSON commands from the client. Unknown or malformed text is ignored with a logged warning (Omi's rule)."""
    try:
        command = json.loads(text)
        kind = command.get("type") if isinstance(command, dict) else None
    except ValueError:
        command, kind = None, None
    if kind != "speaker_assigned":
        log.warning("ignoring text frame of %d chars (type=%r)", len(text), kind)
        return
    try:
        assigned = SpeakerAssigned.model_validate(command)
    except ValidationError as exc:
        await client.send_json(ErrorEvent(code="bad_command", message=f"speaker_assigned: {exc.errors()[0]['msg']}")
                               .model_dump())
        return
    try:
        person = await st.storage.get_profile(uid, assigned.person_id)
    except Exception as exc:  # storage down: the command fails clearly, the stream goes on
        log.warning("speaker_assigned: storage unavailable: %s", type(exc).__name__)
        await client.send_json(ErrorEvent(code="storage_unavailable", message="speaker_assigned: storage unavailable,"
                                          " send it again shortly").model_dump())
        return
    if person is None or person.kind != "person":
        await client.send_json(ErrorEvent(code="bad_command", message="speaker_assigned: unknown person_id")
                               .model_dump())
        return
    try:
        _, embeddings = await pipeline.assign_speaker(assigned.speaker_id, assigned.person_id)
    except ValueError as exc:
        await client.send_json(ErrorEvent(code="bad_command", message=f"speaker_assigned: {exc}").model_dump())
        return
    if len(embeddings) and person.model == st.pool.embedder_name:
        try:
            await st.storage.add_profile_embeddings(uid, person.id, embeddings, len(embeddings) * WINDOW_S)
        except Exception as exc:  # the relabel stands; only the profile's learning from it is lost
            log.warning("speaker_assigned: could not add embeddings to the profile: %s", type(exc).__name__)


async def _heartbeat(client: _Client, every_s: float) -> None:
    while not client.gone:
        await asyncio.sleep(every_s)
        client.send_ping()  # dropped while other messages wait


app = create_app()
