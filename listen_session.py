"""One admitted `/v4/listen` stream: its conversation, its pipeline(s), the receive loop, the heartbeat.

`channels=2` is the newer Omi backend's multi-channel stream (`routers/listen/receiver.py`,
`utils/listen_audio.py`): each binary frame starts with a channel byte, 0x01 the microphone (the user,
`SPEAKER_0`, is_user true) and 0x02 the remote or system audio (`SPEAKER_1`); frames of another channel byte are
ignored. Each channel has its own decoder, VAD and STT (a `Pipeline` each) and a fixed speaker; no speaker tagging
runs on them. One stream keeps one conversation either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocketDisconnect

from config import Settings
from conversations import ConversationLink, ConversationService, StreamEvents
from listen_commands import CommandContext, handle_text
from streaming.codecs import make_decoder
from streaming.pipeline import Pipeline
from streaming.pool import PoolClosed, PoolSaturated
from streaming.protocol import CloseCode, ErrorEvent, ListenParams, ServiceStatusEvent, TranscriptSegment
from streaming.segments import SegmentTail
from streaming.speaker import MATCH_RULES, ProfileIndex
from streaming.stt import SttError
from streaming.tagging import SpeakerLabel, SpeakerTagger
from webhooks.stream_tap import StreamWebhooks
from ws_client import WsClient

log = logging.getLogger("server")

LINGER_GAP_S = 0.25  # a stopping stream ends once no frame came for this long (see receive_loop)
# Binary frames this short are not audio: the app answers every "ping" with the frame 8a 00 (pure_socket.dart), and
# Omi skips frames of <= 2 bytes (transcribe.py, receiver.py). Decoded, one would be 10 ms of Opus concealment or a
# click of PCM, and would move the stream's clock.
KEEPALIVE_MAX_BYTES = 2
REPLACED_MESSAGE = "replaced by a newer stream of this user"


@dataclass(frozen=True)
class Channel:
    byte: int | None  # the frame's first byte that selects this channel; None: a mono stream (no channel byte)
    label: SpeakerLabel | None  # a fixed speaker; None: the speaker tagger labels the words


MONO = (Channel(None, None),)
# Omi's ChannelConfig for two channels: the microphone is the user, the remote side another speaker.
MIC_AND_REMOTE = (Channel(0x01, SpeakerLabel(0, is_user=True)), Channel(0x02, SpeakerLabel(1)))


async def _speaker_tagger(st: Any, uid: str, params: ListenParams) -> SpeakerTagger:
    """Reads only what matching needs: one centroid per profile of the running embedder, from at most
    PROFILE_MAX_EMBEDDINGS rows each (`matching_profiles`). 500 people (bench/profile_start.py, 2 shared cores):
    SQLite, 64 rows each: 363 → 266 ms, 31.3 → 0.5 MiB handed over, peak allocation 33 → 2 MiB; 200 rows each (grown
    before the cap): 756 → 251 ms, 98 → 0.5 MiB, 99 → 2 MiB. PostgreSQL, 64 rows each: about 200-320 ms both ways
    (the rows cross the wire either way), peak 64 → 38 MiB."""
    model = st.pool.embedder_name
    profiles = await st.storage.matching_profiles(uid, model) if params.include_speech_profile else []
    index = ProfileIndex.from_profiles(profiles, model)
    return SpeakerTagger(st.pool, index, MATCH_RULES)


async def serve_stream(client: WsClient, params: ListenParams, uid: str, st: Any, s: Settings) -> None:
    """Serves one admitted stream to its end. A failure outside the receive loop and the stream's end (setting
    it up) still ends it as any failure does: one log line, an `error` event, a defined close code."""
    try:
        await _serve_stream(client, params, uid, st, s)
    except Exception as exc:
        await client.close(await _end_on_failure(client, exc, uid))


async def _serve_stream(client: WsClient, params: ListenParams, uid: str, st: Any, s: Settings) -> None:
    await client.send_json(ServiceStatusEvent(status="initiating", status_text="Service starting").model_dump())
    channels = MIC_AND_REMOTE if params.channels == 2 else MONO
    try:  # a multi-channel frame carries one channel's mono audio
        decoders = [make_decoder(params.codec, params.sample_rate, 1 if ch.byte is not None else params.channels)
                    for ch in channels]
    except ValueError as exc:
        return await client.refuse(CloseCode.POLICY, "bad_parameters", str(exc))
    service: ConversationService = st.conversations
    timeout_s = params.effective_timeout(s.min_conversation_timeout_s)
    try:  # storage down at the start: no conversation to keep the transcript in, so the client retries later
        last = await service.last_memory(uid)
        conversation = await service.attach(uid, params.language, timeout_s, source=params.source or "omi")
        tagger = await _speaker_tagger(st, uid, params) if channels is MONO else None
        state = await st.storage.load_speaker_state(uid, conversation.id) if tagger is not None else None
        stored = await st.storage.list_segments(uid, conversation.id) if conversation.duration_s else []
        # This stream's row among the live streams of every replica: beyond MAX_STREAMS_PER_USER the oldest are
        # revoked (each one's replica stops it at its next refresh, `_sync`).
        stream_id = uuid.uuid4().hex
        await st.storage.open_stream(uid, stream_id, _place_ttl(s), s.max_streams_per_user)
        # Another live stream of this user (on any replica) may still be growing the last stored segment: extending
        # it here too would make two streams rewrite one segment, each losing the other's words.
        if stored and await st.storage.live_streams(uid) != [stream_id]:
            stored = []
    except Exception as exc:
        log.error("stream for %s refused, storage unavailable: %s", uid, type(exc).__name__)
        return await client.refuse(CloseCode.TRY_AGAIN_LATER, "storage_unavailable",
                                   "storage unavailable, retry shortly")
    hooks = await _stream_webhooks(st, uid)
    if last is not None:
        await client.send_json({"type": "last_memory", "memory_id": last.id})
    if tagger is not None and state is not None:
        tagger.import_state(state)
    tail = SegmentTail()
    links, pipelines = [], []
    for channel, decoder in zip(channels, decoders, strict=True):
        link = ConversationLink(service, conversation, params.language, timeout_s)
        link.pipeline = Pipeline(
            decoder=decoder, vad_backend=st.vad_backend, vad_params=st.vad_params, stt_factory=st.stt_factory,
            language=params.language, emit=_tapped(client.send_json, hooks), emit_partial=client.send_json,
            tagger=tagger, persist=link.persist,
            time_offset=conversation.duration_s, keepalive_s=s.deepgram_keepalive_s,
            pending_max=s.storage_pending_max_segments, retry_on_close_s=s.storage_retry_on_close_s,
            write_timeout_s=s.storage_write_timeout_s, vad_runner=st.pool.run_vad, tail=tail,
            fixed_label=channel.label,
            # the audio_bytes webhook gets the first (microphone) channel
            audio_tap=hooks.audio if hooks is not None and hooks.chunk_bytes and not links else None,
        )
        links.append(link)
        pipelines.append(link.pipeline)
    if stored:  # a continued conversation: new speech may extend its last segment, as the app would merge it
        fields = TranscriptSegment.model_fields
        pipelines[0].segments.seed(TranscriptSegment(**{k: getattr(stored[-1], k) for k in fields}))
    await client.send_json(ServiceStatusEvent(status="stt_initiating", status_text="STT starting").model_dump())
    started = []
    try:
        for pipeline in pipelines:
            await pipeline.start()
            started.append(pipeline)
    except Exception as exc:
        code = await _end_on_failure(client, exc, uid)
        await _finish_all(client, started, uid)
        await _close_place(st, uid, stream_id)
        return await client.close(code)
    await client.send_json(ServiceStatusEvent(status="ready").model_dump())
    log.info("stream open uid=%s codec=%s rate=%d channels=%d", uid, params.codec, params.sample_rate,
             len(channels))

    heartbeat = asyncio.create_task(_heartbeat(client, s.heartbeat_s))
    events = StreamEvents(st.storage, uid, client.send_json)
    for link in links:
        events.watch(link.conversation.id)
        link.on_attach = events.watch
    stop_listening = service.listen(uid, events.deliver)
    syncing = asyncio.create_task(_sync(client, events, s.stream_sync_s,
                                        lambda: st.storage.refresh_stream(uid, stream_id, _place_ttl(s))))
    close_code = CloseCode.NORMAL
    commands = CommandContext(uid, pipelines, st.storage, st.pool.embedder_name)
    route = _router(channels, pipelines)
    try:
        close_code = await receive_loop(client, route, s, lambda text: handle_text(commands, text), uid)
    finally:
        heartbeat.cancel()
        syncing.cancel()
        failed = await _finish_all(client, pipelines, uid)  # never raises: what follows always runs
        if failed is not None and close_code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            close_code = failed
        stop_listening()
        if hooks is not None:
            hooks.flush()  # the last partial audio chunk
        await _stream_ended(st, service, uid, tagger, links)
        await _close_place(st, uid, stream_id)
        for pipeline in pipelines:
            stats = pipeline.stats
            log.info("stream closed uid=%s frames=%d bad=%d sent=%.1fs of %.1fs", uid, stats.frames,
                     stats.bad_frames, stats.sent_samples / 16000, stats.stream_samples / 16000)
        await client.close(close_code)


async def _stream_webhooks(st: Any, uid: str) -> StreamWebhooks | None:
    """The stream's developer-webhook tap (real-time transcript, audio bytes), or None when the user has neither
    or their settings cannot be read now (the stream goes on without them: webhooks never hold up a stream)."""
    try:
        hooks = await StreamWebhooks.open(st.webhooks, st.user_webhooks, uid)
    except Exception as exc:
        log.warning("webhooks of %s off for this stream, settings unreadable: %s", uid, type(exc).__name__)
        return None
    return hooks if hooks.active else None


def _tapped(emit, hooks: StreamWebhooks | None):
    """`emit` that also hands every segment list it sends to the real-time transcript webhook (queued, not
    awaited: a slow receiver never slows the stream)."""
    if hooks is None or not hooks.transcript:
        return emit

    async def send(payload: Any) -> None:
        if isinstance(payload, list):
            hooks.segments(payload)
        await emit(payload)

    return send


def _failure(exc: Exception) -> tuple[int, str, str]:
    """A stream's failure as (close code, `error` event code, message). The client is told what to do, not what
    broke (no internals, no secrets: the operator's log has those)."""
    if isinstance(exc, SttError):
        return CloseCode.SERVER_ERROR, "stt_unavailable", str(exc)
    if isinstance(exc, PoolSaturated):  # the models' queue is full: as a refusal at the start, retry later
        return CloseCode.TRY_AGAIN_LATER, "server_full", "server busy, retry in 5 s"
    if isinstance(exc, PoolClosed):  # the models stopped: the server is going down
        return CloseCode.TRY_AGAIN_LATER, "server_unavailable", "server restarting, retry in 5 s"
    return CloseCode.SERVER_ERROR, "internal_error", "internal server error, reconnect"


async def _end_on_failure(client: WsClient, exc: Exception, uid: str) -> int:
    """Logs a stream's failure once, sends the client its `error` event, returns the close code to end with."""
    code, error, message = _failure(exc)
    if isinstance(exc, PoolSaturated | PoolClosed):
        log.error("stream of %s ended: %s", uid, exc)  # a known condition: no traceback
    elif not isinstance(exc, SttError):  # (STT's giving up was logged by its session)
        log.error("stream of %s failed", uid, exc_info=exc)
    await client.send_json(ErrorEvent(code=error, message=message).model_dump())
    return code


async def _finish_all(client: WsClient, pipelines: list[Pipeline], uid: str) -> int | None:
    """Finishes every pipeline (each stores what it can even when a step fails); the close code of the first
    failure, or None."""
    failed = None
    for pipeline in pipelines:
        try:
            await pipeline.finish()
        except Exception as exc:
            code = await _end_on_failure(client, exc, uid)
            failed = code if failed is None else failed
    return failed


async def _stream_ended(st: Any, service: ConversationService, uid: str, tagger: SpeakerTagger | None,
                        links: list[ConversationLink]) -> None:
    conv = links[0].conversation
    if tagger is not None:
        try:  # storage still down: the speaker labels restart on reconnect, but the client is still closed
            await st.storage.save_speaker_state(uid, conv.id, tagger.export_state())
        except Exception as exc:
            log.warning("could not store the speaker state of %s: %s", uid, type(exc).__name__)
    end_s = max(link.pipeline.segments.offset + link.pipeline.stream_seconds for link in links)
    try:  # storage still down: a reconnect restarts the clock at the last stored segment's end
        await service.stream_ended(conv, end_s)
    except Exception as exc:
        log.warning("could not store the end of the stream of %s: %s", uid, type(exc).__name__)


def _router(channels: tuple[Channel, ...], pipelines: list[Pipeline]):
    """frame → (the pipeline it feeds, its audio), or None for a frame of no channel of this stream."""
    if channels is MONO:
        only = pipelines[0]
        return lambda frame: (only, frame)
    by_byte = {ch.byte: p for ch, p in zip(channels, pipelines, strict=True)}

    def route(frame: bytes):
        pipeline = by_byte.get(frame[0])
        return (pipeline, frame[1:]) if pipeline is not None else None

    return route


async def receive_loop(client: WsClient, route, s: Settings, on_text, uid: str = "") -> int:
    """Returns the close code to end with; a failure of the pipeline or of a command ends it (`_failure`). Idle
    means no message at all (audio, keepalive or text) for IDLE_TIMEOUT_S, as Omi judges it: a connected app
    answers every ping, so only a dead connection gets there.

    One frame at a time: the next is read only when the previous went through decode and VAD, so a client that
    sends faster than real time is paced by TCP, never dropped: uvicorn stops reading the socket while its queue
    (32 messages) is full, the kernel's receive buffer fills (several MB on Linux), then the client's sends wait.
    Such a client must wait for the server's close frame after its own (its close timeout): the audio still in
    the buffers is processed first, and an aborted connection discards it.

    A stop request (`WsClient.request_stop`: shutdown, slow client) ends the loop with its code once no frame came
    for `LINGER_GAP_S` or its linger deadline passed: the audio a client sent before it heard of the stop is still
    processed."""
    last_message = time.monotonic()
    while True:
        now = time.monotonic()
        stopping = client.stop_code is not None
        if stopping:
            timeout = min(LINGER_GAP_S, client.stop_deadline - now)
        else:
            timeout = max(s.idle_timeout_s - (now - last_message), 0.01)
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
            await client.send_json(ErrorEvent(code="idle", message="nothing received, closing").model_dump())
            return CloseCode.GOING_AWAY
        if message["type"] == "websocket.disconnect":
            client.gone = True
            return CloseCode.NORMAL
        last_message = time.monotonic()
        if message.get("bytes") is not None:
            frame = message["bytes"]
            if len(frame) <= KEEPALIVE_MAX_BYTES:
                continue
            if len(frame) > s.max_frame_bytes:
                await client.send_json(ErrorEvent(
                    code="frame_too_large", message=f"frame of {len(frame)} bytes over {s.max_frame_bytes}"
                ).model_dump())
                continue
            target = route(frame)
            if target is None:
                continue  # a channel byte of no channel here: ignored, as Omi does
            pipeline, audio = target
            try:
                await pipeline.feed(audio)
            except Exception as exc:
                return await _end_on_failure(client, exc, uid)
        elif message.get("text") is not None:
            try:
                if await on_text(message["text"]):
                    return CloseCode.NORMAL  # CloseStream: the session finishes the pipelines, then closes
            except Exception as exc:
                return await _end_on_failure(client, exc, uid)


def _place_ttl(s: Settings) -> float:
    """A live stream's row outlives three missed refreshes (a stalled or dead replica's streams stop counting)."""
    return 3 * s.stream_sync_s


async def _close_place(st: Any, uid: str, stream_id: str) -> None:
    try:  # storage down: the row runs out by itself (`_place_ttl`)
        await st.storage.close_stream(uid, stream_id)
    except Exception as exc:
        log.warning("could not remove the live-stream row of %s: %s", uid, type(exc).__name__)


async def _sync(client: WsClient, events: StreamEvents, every_s: float, keep_place) -> None:
    """What other replicas did, from storage, every STREAM_SYNC_S: this stream's row refreshed, or, once a newer
    stream of the user (on any replica) revoked it, the stream stopped (`replaced`, 1001, as a replacement in this
    process); a close of this stream's conversation there (`StreamEvents.sync`). Storage down: tried again next
    time (the stream goes on)."""
    while not client.gone and client.stop_code is None:
        await asyncio.sleep(every_s)
        try:
            if not await keep_place():
                log.info("stream replaced by a newer stream of its user on another replica")
                client.stop_with_error(CloseCode.GOING_AWAY, "replaced", REPLACED_MESSAGE)
        except Exception as exc:
            log.debug("stream refresh failed: %s", type(exc).__name__)
        try:
            await events.sync()
        except Exception as exc:
            log.debug("stream sync failed: %s", type(exc).__name__)


async def _heartbeat(client: WsClient, every_s: float) -> None:
    while not client.gone:
        await asyncio.sleep(every_s)
        client.send_ping()  # dropped while other messages wait
