"""The unified audio server: app factory, lifespan (settings, models, auth), the `/v4/listen` WebSocket, health.

    uvicorn server:app --host 0.0.0.0 --port 8080
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")  # pyannote.audio sends telemetry unless told not to

import numpy as np  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from starlette.websockets import WebSocketDisconnect, WebSocketState  # noqa: E402

import batch_routes  # noqa: E402
import conversation_routes  # noqa: E402
import jobs  # noqa: E402
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
        st.authenticator = Authenticator(s)
        st.vad_params = VadParams.from_settings(s)
        st.vad_backend = await asyncio.to_thread(load_vad_backend, s)
        # Warm-up: the first model call pays for allocation; keep that off the first user's stream.
        await asyncio.to_thread(st.vad_backend.speech_probs, st.vad_backend.new_state(),
                                np.zeros(st.vad_backend.chunk_samples, np.float32))
        st.stt_factory = await asyncio.to_thread(SttFactory, s)
        st.storage = await open_storage(s)
        st.conversations = ConversationService(st.storage)
        st.jobs = jobs.JobRunner(s, st.storage, st.conversations)
        if s.jobs_enabled:
            st.jobs.start()
        st.pool = await ModelPool.create(s)
        st.identifier = SegmentIdentifier(st.pool, st.vad_backend, st.vad_params, MATCH_RULES)
        st.ready = True
        log.info("ready: vad=%s stt=%s device=%s", st.vad_backend.name, st.stt_factory.backend, s.model_device)
        yield
        st.ready = False
        await st.jobs.shutdown()
        await st.pool.close()
        await st.storage.close()

    app = FastAPI(title="Omi unified audio server", version="0.1.0", lifespan=lifespan)
    app.include_router(batch_routes.router)
    app.include_router(conversation_routes.router)
    app.include_router(jobs.router)
    app.openapi = _openapi_with_string_details(app)

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Models loaded and accepting streams")
    async def ready() -> JSONResponse:
        st = app.state
        if not getattr(st, "ready", False):
            return JSONResponse({"ready": False, "reason": "starting"}, status_code=503)
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


# --- the WebSocket -----------------------------------------------------------------------------------------------


class _Client:
    """Sends to one WebSocket from several tasks (pipeline results, heartbeat) without interleaving frames."""

    def __init__(self, websocket: WebSocket) -> None:
        self.ws = websocket
        self._lock = asyncio.Lock()
        self.gone = False

    async def send_json(self, payload: Any) -> None:
        await self.send_text(json.dumps(payload, separators=(",", ":")))

    async def send_text(self, text: str) -> None:
        if self.gone:
            return
        async with self._lock:
            try:
                await self.ws.send_text(text)
            except Exception:  # the client went away; the pipeline still finishes its work
                self.gone = True

    async def close(self, code: int, reason: str = "") -> None:
        if self.gone or self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        async with self._lock:
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason[:120])
            self.gone = True


async def _refuse(client: _Client, code: int, error: str, message: str) -> None:
    await client.send_json(ErrorEvent(code=error, message=message).model_dump())
    await client.close(code, message)


async def listen(websocket: WebSocket) -> None:
    """`/v4/listen`: binary frames are audio; text frames are JSON commands; results go back as JSON."""
    st = websocket.app.state
    s: Settings = st.settings
    await websocket.accept()
    client = _Client(websocket)
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
    if st.active_streams >= s.max_streams or not await _pool_has_room(st.pool):
        return await _refuse(client, CloseCode.TRY_AGAIN_LATER, "server_full", "server full, retry in 5 s")

    mine = st.user_streams.setdefault(uid, [])
    while len(mine) >= s.max_streams_per_user:  # the newest stream wins: an old one may be a dead phone socket
        old = mine.pop(0)
        await old.send_json(ErrorEvent(code="replaced", message="a newer stream of this user replaced this one")
                            .model_dump())
        await old.close(CloseCode.GOING_AWAY, "replaced by a newer stream")
    mine.append(client)
    st.active_streams += 1
    try:
        await _serve_stream(client, params, uid, st, s)
    finally:
        st.active_streams -= 1
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
    last = await service.last_memory(uid)
    if last is not None:
        await client.send_json({"type": "last_memory", "memory_id": last.id})
    conversation = await service.attach(uid, params.language, params.conversation_timeout)
    link = ConversationLink(service, conversation, params.language, params.conversation_timeout)
    tagger = await _speaker_tagger(st, uid, params)
    state = await st.storage.load_speaker_state(uid, conversation.id)
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
        await st.storage.save_speaker_state(uid, conv.id, tagger.export_state())
        await service.stream_ended(conv, pipeline.segments.offset + pipeline.stream_seconds)
        log.info("stream closed uid=%s frames=%d bad=%d sent=%.1fs of %.1fs", uid, pipeline.stats.frames,
                 pipeline.stats.bad_frames, pipeline.stats.sent_samples / 16000, pipeline.stats.stream_samples / 16000)
        await client.close(close_code)


async def _receive_loop(client: _Client, pipeline: Pipeline, s: Settings, on_text) -> int:
    """Returns the close code to end with. Idle means no audio for IDLE_TIMEOUT_S (text frames don't count)."""
    last_audio = time.monotonic()
    while True:
        remaining = s.idle_timeout_s - (time.monotonic() - last_audio)
        try:
            message = await asyncio.wait_for(client.ws.receive(), timeout=max(remaining, 0.01))
        except TimeoutError:
            await client.send_json(ErrorEvent(code="idle", message="no audio received, closing").model_dump())
            return CloseCode.GOING_AWAY
        except WebSocketDisconnect:
            client.gone = True
            return CloseCode.NORMAL
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
    person = await st.storage.get_profile(uid, assigned.person_id)
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
        await st.storage.add_profile_embeddings(uid, person.id, embeddings, len(embeddings) * WINDOW_S)


async def _heartbeat(client: _Client, every_s: float) -> None:
    while not client.gone:
        await asyncio.sleep(every_s)
        await client.send_text("ping")


app = create_app()
