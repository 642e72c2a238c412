"""The unified audio server: app factory, lifespan (settings, models, auth), the `/v4/listen` WebSocket, health.

    uvicorn server:app --host 0.0.0.0 --port 8080
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
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

import batch_routes  # noqa: E402
import conversation_routes  # noqa: E402
import deepgram_compat.routes  # noqa: E402
import jobs  # noqa: E402
import metrics  # noqa: E402
import omi_profile_routes  # noqa: E402
import openapi_docs  # noqa: E402
import people_routes  # noqa: E402
import user_routes  # noqa: E402
import vad_routes  # noqa: E402
import webhook_routes  # noqa: E402
from auth import Authenticator, AuthError  # noqa: E402
from batch_threads import batch_threads  # noqa: E402
from browser_credentials import stream_credentials  # noqa: E402
from config import Settings, get_settings  # noqa: E402
from conversations import ConversationService  # noqa: E402
from listen_session import REPLACED_MESSAGE, serve_stream  # noqa: E402
from notify import ChannelNotifier, webhook_message_notifier  # noqa: E402
from route_errors import RouteErrors  # noqa: E402
from storage import open_storage  # noqa: E402
from streaming.identify import SegmentIdentifier  # noqa: E402
from streaming.pool import ModelPool, create_pool  # noqa: E402
from streaming.protocol import CloseCode, ErrorEvent, ListenParams  # noqa: E402
from streaming.speaker import MATCH_RULES  # noqa: E402
from streaming.stt import SttFactory  # noqa: E402
from streaming.vad import VadParams, load_vad_backend  # noqa: E402
from summaries import make_summarizer  # noqa: E402
from upload_guard import UploadGuard  # noqa: E402
from web import mount_page  # noqa: E402
from webhooks.dispatcher import WebhookDispatcher  # noqa: E402
from webhooks.types import WebhookType  # noqa: E402
from webhooks.user_webhooks import UserWebhooks  # noqa: E402
from ws_client import WsClient  # noqa: E402

log = logging.getLogger("server")

WEBHOOK_SHUTDOWN_GRACE_S = 5.0  # at exit, queued webhook deliveries get this long; the rest are counted dropped


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
        if s.torch_threads and not s.lazy_models:  # lazy: no torch import at start (the pool's threads set it)
            _set_torch_threads(s.torch_threads)
        st.vad_params = VadParams.from_settings(s)
        st.vad_backend = await asyncio.to_thread(load_vad_backend, s)
        # Warm-up: the first model call pays for allocation; keep that off the first user's stream.
        await asyncio.to_thread(st.vad_backend.warm_up)
        st.stt_factory = await asyncio.to_thread(SttFactory, s)
        st.storage = await open_storage(s)
        st.user_webhooks = UserWebhooks(st.storage, s)
        notifier = ChannelNotifier(s)
        st.webhooks = WebhookDispatcher(s, st.user_webhooks, on_message=webhook_message_notifier(st.storage, notifier))
        st.conversations = ConversationService(
            st.storage, summarizer=make_summarizer(s), close_lease_s=s.conversation_close_lease_s,
            on_completed=lambda uid, memory: st.webhooks.submit_json(uid, WebhookType.memory_created, memory))
        st.jobs = jobs.JobRunner(s, st.storage, st.conversations, notifier, webhooks=st.webhooks)
        if s.jobs_enabled:
            st.jobs.start()
        st.pool = await create_pool(s, vad_backend=st.vad_backend)  # MODEL_POOL: local, or ray
        st.identifier = SegmentIdentifier(st.pool, st.vad_backend, st.vad_params, MATCH_RULES,
                                          run_blocking=batch_threads(st).run)
        st.ready = True
        log.info("ready: vad=%s stt=%s device=%s", st.vad_backend.name, st.stt_factory.backend, s.model_device)
        restore_signals = _drain_before_exit_on_signals(app)
        yield
        restore_signals()
        st.ready = False
        await st.jobs.shutdown()
        await st.webhooks.aclose(WEBHOOK_SHUTDOWN_GRACE_S)  # after the streams and jobs that feed it
        await notifier.aclose()
        await st.pool.close()
        await st.stt_factory.aclose()
        batch_threads(st).close()
        await st.conversations.summarizer.aclose()
        await st.storage.close()

    app = FastAPI(title="Omi unified audio server", version="0.1.0", lifespan=lifespan)
    app.add_middleware(UploadGuard)  # body limits and caller checks before a request's body is read
    app.add_middleware(RouteErrors)  # outermost: a route's unexpected failure is a JSON 503 (storage down) or 500
    app.include_router(vad_routes.router, tags=["batch"])
    app.include_router(batch_routes.router, tags=["batch"])
    app.include_router(conversation_routes.router, tags=["conversations"])
    app.include_router(people_routes.router, tags=["voices"])
    app.include_router(omi_profile_routes.router, tags=["voices"])
    app.include_router(webhook_routes.router, tags=["webhooks"])
    app.include_router(user_routes.router, tags=["users"])
    app.include_router(jobs.router, tags=["jobs"])
    app.include_router(metrics.router, tags=["operations"])
    app.include_router(deepgram_compat.routes.router, tags=["deepgram"])  # Deepgram's WS and POST /v1/listen
    app.openapi = openapi_docs.document(app)

    @app.get("/health", summary="Liveness", tags=["operations"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Models loaded and accepting streams", tags=["operations"])
    async def ready() -> JSONResponse:
        st = app.state
        if not getattr(st, "ready", False):
            return JSONResponse({"ready": False, "reason": "starting"}, status_code=503)
        if st.draining:
            return JSONResponse({"ready": False, "reason": "shutting_down", "active_streams": st.active_streams},
                                status_code=503)
        storage_ok = await st.storage.ping()
        ok = (storage_ok and st.active_streams < st.settings.max_streams and not st.pool.saturated
              and not st.pool.models_failed
              and not any(v.startswith("failed") for v in st.stt_factory.status().values()))
        body = {
            "ready": ok,
            "vad": st.vad_backend.name,
            "stt": st.stt_factory.backend,
            "speaker": st.pool.embedder_name,
            "storage": storage_ok,
            "pool": st.pool.stats(),
            "pool_saturated": st.pool.saturated,
            "models": st.pool.model_status() | st.stt_factory.status(),
            "active_streams": st.active_streams,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    app.add_api_websocket_route("/v4/listen", listen)
    app.add_api_websocket_route("/v3/listen", listen)
    mount_page(app)  # the browser page at / (web/)
    return app


def _set_torch_threads(threads: int) -> None:
    """Process-wide torch intra-op threads (the pool's workers set it again in their own threads)."""
    import torch

    torch.set_num_threads(threads)


# --- graceful shutdown ------------------------------------------------------------------------------------------

SHUTTING_DOWN_MESSAGE = "server shutting down, reconnect"


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


async def listen(websocket: WebSocket) -> None:
    """`/v4/listen`: binary frames are audio; text frames are JSON commands; results go back as JSON.

    Identity is checked before the upgrade is accepted, as Omi does: a missing or invalid credential is refused at
    the upgrade (uvicorn answers HTTP 403), so the client's first receive fails and the app's token refresh runs; no
    message is sent first. An `AuthError` with a `close_code` of its own (4001 expired, 4004 revoked: codes the newer
    app acts on) is accepted and closed with that code at once, still without a message."""
    st = websocket.app.state
    s: Settings = st.settings
    subprotocol = None  # `omi.listen` when a browser page offered it (browser_credentials: the page's credential)
    try:
        authorization, subprotocol = stream_credentials(websocket.headers)
        uid = await st.authenticator.uid_for(authorization, websocket.client.host if websocket.client else None,
                                             websocket.headers)
    except AuthError as exc:
        code = getattr(exc, "close_code", None)
        log.info("stream refused at the upgrade: %s", exc)
        if code is not None:
            await websocket.accept(subprotocol=subprotocol)
        await websocket.close(code=code or CloseCode.POLICY)
        return
    await websocket.accept(subprotocol=subprotocol)
    client = WsClient(websocket, s.ws_send_queue_max, s.ws_slow_client_timeout_s)
    try:
        await _admit(client, websocket, uid, st, s)
    finally:
        client.abandon()


async def _admit(client: WsClient, websocket: WebSocket, uid: str, st: Any, s: Settings) -> None:
    """Checks parameters and room, registers the stream and serves it.

    A user may stream from several devices at once (phone and desktop, as Omi allows); with MAX_STREAMS_PER_USER
    above 0 a newer stream replaces the oldest. While the server shuts down (`_drain`), a new stream gets the error
    event `shutting_down` and close 1013 (try again later: as for `server_full`, the client reconnects, and the load
    balancer, seeing `/ready` answer 503, sends it to another replica)."""
    try:
        params = ListenParams(**dict(websocket.query_params))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return await client.refuse(CloseCode.POLICY, "bad_parameters", problems)
    if st.draining:
        return await client.refuse(CloseCode.TRY_AGAIN_LATER, "shutting_down", SHUTTING_DOWN_MESSAGE)
    # The streams this one replaces make room for it: a user's reconnect is never refused for their own old stream.
    mine = st.user_streams.get(uid, [])
    replaced = max(len(mine) - s.max_streams_per_user + 1, 0) if s.max_streams_per_user else 0
    if st.active_streams - replaced >= s.max_streams or not await _pool_has_room(st.pool):
        return await client.refuse(CloseCode.TRY_AGAIN_LATER, "server_full", "server full, retry in 5 s")
    if st.draining:  # the drain began while waiting for the pool; no await from here to the registration
        return await client.refuse(CloseCode.TRY_AGAIN_LATER, "shutting_down", SHUTTING_DOWN_MESSAGE)

    # The replaced stream is dropped at once, never awaited: its client may be dead or not reading, and its close
    # could take WS_SLOW_CLIENT_TIMEOUT_S. Its own task finishes its audio, stores it and closes it (bounded; until
    # then it still counts in active_streams).
    mine = st.user_streams.setdefault(uid, [])
    while s.max_streams_per_user and len(mine) >= s.max_streams_per_user:
        mine.pop(0).stop_with_error(CloseCode.GOING_AWAY, "replaced", REPLACED_MESSAGE)
    mine.append(client)
    st.streams.add(client)
    st.active_streams += 1
    try:
        await serve_stream(client, params, uid, st, s)
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


app = create_app()
