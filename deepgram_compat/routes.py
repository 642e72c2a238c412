"""`WS /v1/listen` and `POST /v1/listen` in Deepgram's protocol: auth, admission, Deepgram's error shapes.

Credentials, as Deepgram takes them: `Authorization: Token <key>` or `Bearer <token>`, or, from a browser (which
cannot set headers on a WebSocket), the subprotocols `token, <key>` / `bearer, <token>` (the chosen subprotocol is
echoed, as browsers require). The credential is this server's own (`auth.Authenticator`: the admin key, a Firebase
ID token, or the uid in the loopback-only mode), never a Deepgram key.

Refusals at the WebSocket upgrade are HTTP responses with Deepgram's JSON error body, as Deepgram answers them (the
SDKs raise them as errors with the status): 401 bad credentials, 400 bad parameters, 429 server full, 503 shutting
down. Without the ASGI denial-response extension the upgrade is refused with close 1008 (HTTP 403) instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import uuid
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from auth import AuthError, Caller
from batch_admission import RETRY_AFTER_S, batch_admission
from batch_threads import batch_threads
from deepgram_compat import messages
from deepgram_compat.live import LiveSession
from deepgram_compat.messages import ModelInfo
from deepgram_compat.options import ListenOptions, OptionsError, live_options, parse_options
from deepgram_compat.prerecorded import decode_upload, transcribe
from streaming.audiofile import AudioFileError
from streaming.codecs import make_decoder
from streaming.pipeline import Pipeline
from streaming.pool import PoolClosed, PoolSaturated
from streaming.speaker import MATCH_RULES, ProfileIndex
from streaming.stt import SttError
from streaming.tagging import SpeakerTagger
from ws_client import WsClient

log = logging.getLogger(__name__)

router = APIRouter()
SUBPROTOCOL_SCHEMES = {"token": "Token", "bearer": "Bearer"}
URL_REFUSED = ("fetching audio from a url is not supported: the server would make requests to addresses its callers "
               "choose (server-side request forgery, e.g. to internal services); send the audio bytes as the body")


def _error_response(status: int, err_code: str, err_msg: str, request_id: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(messages.http_error(err_code, err_msg, request_id), status_code=status,
                        headers={"dg-error": err_msg[:200], "dg-request-id": request_id, **(headers or {})})


def credentials(headers: Headers, subprotocols: list[str]) -> tuple[str | None, str | None]:
    """(the Authorization value to verify, the subprotocol to accept with). The header wins; else a browser's
    `token, <key>` / `bearer, <token>` subprotocol pair."""
    offered = [p.strip() for p in subprotocols]
    chosen = offered[0] if len(offered) >= 2 and offered[0].lower() in SUBPROTOCOL_SCHEMES else None
    header = headers.get("authorization")
    if header:
        return header, chosen
    if chosen is not None:
        return f"{SUBPROTOCOL_SCHEMES[chosen.lower()]} {offered[1]}", chosen
    return None, None


async def _verified(authenticator: Any, header: str | None, host: str | None, headers: Headers) -> Caller | None:
    try:
        return await authenticator.caller(header, host, headers)
    except AuthError as exc:
        log.info("deepgram-compatible request refused: %s", exc)  # the message never holds the credential
        return None


def _model(st: Any, options: ListenOptions) -> ModelInfo:
    return ModelInfo.for_backend(st.stt_factory.backend, options.model)


# --- live ------------------------------------------------------------------------------------------------------


async def _deny(websocket: WebSocket, response: JSONResponse) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=1008)


async def listen_ws(websocket: WebSocket) -> None:
    """`WS /v1/listen`: see `deepgram_compat.live`."""
    st = websocket.app.state
    s = st.settings
    request_id = str(uuid.uuid4())
    host = websocket.client.host if websocket.client else None
    header, subprotocol = credentials(websocket.headers, websocket.scope.get("subprotocols") or [])
    if await _verified(st.authenticator, header, host, websocket.headers) is None:
        return await _deny(websocket, _error_response(401, "INVALID_AUTH", "Invalid credentials.", request_id))
    try:
        options = live_options(dict(websocket.query_params))
        decoder = make_decoder(options.codec, options.sample_rate or 0, options.channels)
    except (OptionsError, ValueError) as exc:
        return await _deny(websocket, _error_response(400, "Bad Request", str(exc), request_id))
    if st.draining:
        return await _deny(websocket, _error_response(503, "SERVICE_UNAVAILABLE", "server shutting down, reconnect",
                                                      request_id, {"Retry-After": str(RETRY_AFTER_S)}))
    if st.active_streams >= s.max_streams or st.pool.saturated:
        return await _deny(websocket, _error_response(429, "TOO_MANY_REQUESTS", "server full, retry in 5 s",
                                                      request_id, {"Retry-After": str(RETRY_AFTER_S)}))
    await websocket.accept(subprotocol=subprotocol, headers=[(b"dg-request-id", request_id.encode())])
    client = WsClient(websocket, s.ws_send_queue_max, s.ws_slow_client_timeout_s)
    st.streams.add(client)  # the shutdown drain stops it (it then finishes its audio and closes 1001)
    st.active_streams += 1
    try:
        session = LiveSession(client, options, _model(st, options), request_id, s.idle_timeout_s, s.max_frame_bytes)
        tagger = (SpeakerTagger(st.pool, ProfileIndex.from_profiles([], st.pool.embedder_name), MATCH_RULES)
                  if options.diarize else None)
        pipeline = Pipeline(
            decoder=decoder, vad_backend=st.vad_backend, vad_params=st.vad_params, stt_factory=st.stt_factory,
            language=options.language, emit=session.on_pipeline_message, emit_partial=session.drop, tagger=tagger,
            keepalive_s=s.deepgram_keepalive_s, vad_runner=st.pool.run_vad,
            result_tap=session.on_result, speech_start_tap=session.on_speech_start,
        )
        log.info("deepgram-compatible stream open: encoding=%s rate=%d channels=%d diarize=%s", options.encoding,
                 options.sample_rate, options.channels, options.diarize)
        await session.run(pipeline)
    finally:
        st.active_streams -= 1
        st.streams.discard(client)
        client.abandon()


router.add_api_websocket_route("/v1/listen", listen_ws)


# --- prerecorded -------------------------------------------------------------------------------------------------


async def _spool_body(request: Request, limit: int) -> tempfile.SpooledTemporaryFile | None:
    """The body in a spooled file (memory up to 1 MiB, then disk); None when it is over `limit` bytes."""
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            spool.close()
            return None
        if chunk:
            await asyncio.to_thread(spool.write, chunk)  # past 1 MiB a disk write
    spool.seek(0)
    return spool


def _sha256(spool: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    for block in iter(lambda: spool.read(1 << 20), b""):
        digest.update(block)
    spool.seek(0)
    return digest.hexdigest()


@router.post("/v1/listen", summary="Deepgram-compatible prerecorded transcription (the audio file as the body)")
async def listen_file(request: Request) -> JSONResponse:
    st = request.app.state
    s = st.settings
    request_id = str(uuid.uuid4())
    host = request.client.host if request.client else None
    header = request.headers.get("authorization")
    if await _verified(st.authenticator, header, host, request.headers) is None:
        return _error_response(401, "INVALID_AUTH", "Invalid credentials.", request_id)
    try:
        options = parse_options(dict(request.query_params))
    except OptionsError as exc:
        return _error_response(400, "Bad Request", str(exc), request_id)
    if (request.headers.get("content-type") or "").split(";")[0].strip().lower() == "application/json":
        return await _json_body(request, s, request_id)
    admission = batch_admission(request)
    if not await admission.acquire():
        return _error_response(429, "TOO_MANY_REQUESTS", f"too many batch requests at once (at most "
                               f"{admission.limit}); retry later", request_id, {"Retry-After": str(RETRY_AFTER_S)})
    try:
        return await _transcribe_body(request, options, request_id)
    finally:
        admission.release()


listen_file.raw_audio_body = True  # upload_guard: the body is an upload (MAX_UPLOAD_MB), not a JSON body


async def _json_body(request: Request, s: Any, request_id: str) -> JSONResponse:
    """Deepgram's `{"url": ...}` form: refused (SSRF), as is any other JSON."""
    limit = int(s.max_json_body_kb * 1024)
    spool = await _spool_body(request, limit)
    if spool is None:
        return _error_response(413, "PAYLOAD_TOO_LARGE", f"JSON body larger than {s.max_json_body_kb:g} KB",
                               request_id)
    try:
        with spool:
            body = json.loads(spool.read())
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and "url" in body:
        return _error_response(400, "Bad Request", URL_REFUSED, request_id)
    return _error_response(400, "Bad Request", "a JSON body is not audio: send the audio file's bytes as the body "
                           "(any Content-Type but application/json)", request_id)


async def _transcribe_body(request: Request, options: ListenOptions, request_id: str) -> JSONResponse:
    st = request.app.state
    s = st.settings
    limit = int(s.max_upload_mb * (1 << 20))
    spool = await _spool_body(request, limit)
    if spool is None:
        return _error_response(413, "PAYLOAD_TOO_LARGE", f"upload larger than the limit of {s.max_upload_mb:g} MB",
                               request_id)
    run = batch_threads(st).run
    try:
        digest = await run(_sha256, spool)
        audio = await run(decode_upload, spool, options, s.max_upload_seconds)
    except AudioFileError as exc:
        if exc.status == 413:
            return _error_response(413, "PAYLOAD_TOO_LARGE", str(exc), request_id)
        return _error_response(400, "Bad Request", str(exc), request_id)  # Deepgram answers unusable audio 400
    finally:
        spool.close()
    try:
        words, regions = await transcribe(audio, options, stt_factory=st.stt_factory, vad_backend=st.vad_backend,
                                          vad_params=st.vad_params, pool=st.pool, run_blocking=run)
    except (PoolSaturated, PoolClosed):
        return _error_response(503, "SERVICE_UNAVAILABLE", "server busy, retry in 5 s", request_id,
                               {"Retry-After": str(RETRY_AFTER_S)})
    except SttError as exc:
        return _error_response(503, "SERVICE_UNAVAILABLE", str(exc), request_id, {"Retry-After": str(RETRY_AFTER_S)})
    body = messages.prerecorded_response(words, options, duration=len(audio) / 16000, sha256=digest,
                                         request_id=request_id, model=_model(st, options), regions=regions)
    return JSONResponse(body, headers={"dg-request-id": request_id})
