"""One admitted `WS /v1/listen` stream in Deepgram's protocol, served by a `Pipeline`.

Audio (binary messages) goes into the pipeline: decode, the VAD gate, the configured STT, speaker tagging when
`diarize=true`. The pipeline's result tap becomes `Results`: a final per speech region (`is_final` and
`speech_final` true: the VAD closed the region), partials as `is_final` false when `interim_results=true` and the
STT backend makes them. `SpeechStarted` at each region's start with `vad_events=true`; `UtteranceEnd` after a
region's final with `utterance_end_ms` set (the gap is the VAD's hangover, not `utterance_end_ms`).

Client messages: `KeepAlive` (resets the idle timer, as any message does), `Finalize` (the open region is closed
now and its final comes with `from_finalize` true; with no region open, an empty `Results` with `from_finalize`
true answers at once), `CloseStream` (everything is finished, then `Metadata`, then close 1000). Any other text gets
an `Error` (`SchemaError`) and the stream goes on. An empty binary message is Deepgram's old CloseStream.

Bounds: a binary message over MAX_FRAME_BYTES is answered with an `Error` and not processed; a text message over
MAX_TEXT_BYTES likewise; IDLE_TIMEOUT_S without any message closes 1011 with Deepgram's NET-0001 reason; the
outbound queue is the `WsClient`'s (a client that does not read is closed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from deepgram_compat import messages
from deepgram_compat.messages import ModelInfo, TimedWord
from deepgram_compat.options import ListenOptions
from streaming.pipeline import Pipeline
from streaming.stt import SAMPLE_RATE, Transcript
from streaming.tagging import SpeakerLabel
from ws_client import WsClient

log = logging.getLogger(__name__)

MAX_TEXT_BYTES = 64 * 1024  # control messages are tiny JSON objects
LINGER_GAP_S = 0.25  # a stopping stream (server shutdown) ends once no message came for this long
# After the idle deadline one more short receive: a message that arrived while the event loop was held up (a model
# holding the GIL) is still waiting in the socket, and the stream is not idle.
IDLE_RECHECK_S = 0.1
NET0001_REASON = "Deepgram did not receive audio data or a text message within the timeout window. See NET-0001"
CLOSE_NORMAL, CLOSE_ERROR = 1000, 1011


class LiveSession:
    """Per connection: the pipeline, the Results cursor, Finalize bookkeeping and the audio's digest."""

    def __init__(self, client: WsClient, options: ListenOptions, model: ModelInfo, request_id: str,
                 idle_timeout_s: float, max_frame_bytes: int) -> None:
        self.client = client
        self.options = options
        self.model = model
        self.request_id = request_id
        self.idle_timeout_s = idle_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.pipeline: Pipeline | None = None
        self.created = messages.created_now()
        self._digest = hashlib.sha256()
        self._cursor = 0.0  # stream seconds covered by the final Results sent so far
        self._finalizes = 0  # Finalize requests whose region's final is still to come
        self._words_since_utterance_end = False
        self._last_word_end = 0.0
        self._bad_frame_reported = False

    # -- the pipeline's side ----------------------------------------------------------------------------------

    async def on_result(self, transcript: Transcript, labels: list[SpeakerLabel] | None) -> None:
        """Every STT result (the pipeline's result tap), as Deepgram's `Results`."""
        assert self.pipeline is not None
        if not transcript.is_final and not self.options.interim_results:
            return
        timeline = self.pipeline.timeline
        words = [TimedWord(w, timeline.to_stream(w.start), timeline.to_stream(w.end, is_end=True),
                           labels[i].speaker_id if labels else None)
                 for i, w in enumerate(transcript.words) if w.text.strip()]
        end = max([self._cursor, self.pipeline.stream_seconds] + [w.end for w in words])
        if not transcript.is_final:
            await self._send(messages.results(words, self.options, start=self._cursor, end=end, is_final=False,
                                              speech_final=False, from_finalize=False, request_id=self.request_id,
                                              model=self.model))
            return
        from_finalize = self._finalizes > 0
        if from_finalize:
            self._finalizes -= 1
        await self._send(messages.results(words, self.options, start=self._cursor, end=end, is_final=True,
                                          speech_final=True, from_finalize=from_finalize,
                                          request_id=self.request_id, model=self.model))
        self._cursor = end
        if words:
            self._words_since_utterance_end = True
            self._last_word_end = words[-1].end
        if self.options.utterance_end_ms is not None and self._words_since_utterance_end:
            self._words_since_utterance_end = False
            await self._send(messages.utterance_end(self._last_word_end))

    async def on_speech_start(self, sample: int) -> None:
        if self.options.vad_events:
            await self._send(messages.speech_started(sample / SAMPLE_RATE))

    async def on_pipeline_message(self, payload: Any) -> None:
        """The pipeline's Omi messages: segments are dropped (Results carry the words); its error events (a frame
        that did not decode, STT trouble) become Deepgram `Error`s, the first undecodable frame only."""
        if not isinstance(payload, dict) or payload.get("type") != "error":
            return
        if payload.get("code") == "bad_frame":
            if self._bad_frame_reported:
                return
            self._bad_frame_reported = True
        await self._send(messages.error(f"{payload.get('code')}: {payload.get('message')}"))

    async def drop(self, payload: Any) -> None:
        """Partial Omi segments: the result tap already made them `Results`."""

    async def _send(self, payload: dict[str, Any]) -> None:
        await self.client.send_json(payload)

    # -- the client's side -------------------------------------------------------------------------------------

    async def run(self, pipeline: Pipeline) -> None:
        """Serves the stream to its end and closes it."""
        self.pipeline = pipeline
        try:
            await pipeline.start()
        except Exception as exc:  # STT unreachable (SttError's message is safe to show) or the pool closing
            log.warning("deepgram-compatible stream could not start: %s", type(exc).__name__)
            await self._send(messages.error(_safe_message(exc)))
            await self.client.close(CLOSE_ERROR, "speech-to-text unavailable")
            return
        ending = await self._receive()
        try:
            await pipeline.finish()
        except Exception as exc:
            log.warning("deepgram-compatible stream ended with a failure: %s", type(exc).__name__)
            await self._send(messages.error(_safe_message(exc)))
            if ending[0] == CLOSE_NORMAL:
                ending = (CLOSE_ERROR, "stream failed")
        if ending == (CLOSE_NORMAL, "CloseStream"):
            await self._send(messages.metadata(request_id=self.request_id, sha256=self._digest.hexdigest(),
                                               created=self.created, duration=pipeline.stream_seconds,
                                               channels=self.options.channels, model=self.model))
        stats = pipeline.stats
        log.info("deepgram-compatible stream closed (%s): frames=%d bad=%d %.1fs", ending[1], stats.frames,
                 stats.bad_frames, pipeline.stream_seconds)
        if not self.client.gone:
            await self.client.close(*ending)

    async def _receive(self) -> tuple[int, str]:
        """Reads until the stream ends; (close code, reason) to end with."""
        client = self.client
        last_message = time.monotonic()
        rechecked = False
        while True:
            now = time.monotonic()
            stopping = client.stop_code is not None
            if stopping:
                timeout = min(LINGER_GAP_S, client.stop_deadline - now)
            elif rechecked:
                timeout = IDLE_RECHECK_S
            else:
                timeout = max(self.idle_timeout_s - (now - last_message), 0.01)
            try:
                message = await client.receive(timeout) if timeout > 0 else None
            except Exception:  # the client went away (WebSocketDisconnect, or the socket broke)
                client.gone = True
                return CLOSE_NORMAL, "client gone"
            if message is None:
                if client.stop_code is not None:
                    if stopping:
                        return client.stop_code, client.close_reason
                    continue  # a stop was requested just now: linger
                if not rechecked:  # idle means the client sent nothing, not that this loop was held up
                    rechecked = True
                    continue
                return CLOSE_ERROR, NET0001_REASON
            rechecked = False
            if message["type"] == "websocket.disconnect":
                client.gone = True
                return CLOSE_NORMAL, "client gone"
            last_message = time.monotonic()
            try:
                if message.get("bytes") is not None:
                    if not await self._on_audio(message["bytes"]):
                        return CLOSE_NORMAL, "CloseStream"
                elif message.get("text") is not None:
                    if not await self._on_text(message["text"]):
                        return CLOSE_NORMAL, "CloseStream"
            except Exception as exc:  # the pipeline failed (STT gave up, the pool closed): the stream ends
                log.warning("deepgram-compatible stream failed: %s", type(exc).__name__)
                await self._send(messages.error(_safe_message(exc)))
                return CLOSE_ERROR, "stream failed"

    async def _on_audio(self, frame: bytes) -> bool:
        """False: the stream is to close (an empty message, Deepgram's old CloseStream)."""
        if not frame:
            return False
        if len(frame) > self.max_frame_bytes:
            await self._send(messages.error(f"binary message of {len(frame)} bytes over the limit of "
                                            f"{self.max_frame_bytes}; send audio in smaller chunks", "Error"))
            return True
        self._digest.update(frame)
        assert self.pipeline is not None
        await self.pipeline.feed(frame)
        return True

    async def _on_text(self, text: str) -> bool:
        """False: CloseStream."""
        if len(text) > MAX_TEXT_BYTES:
            await self._send(messages.error(f"text message over {MAX_TEXT_BYTES} bytes", "SchemaError"))
            return True
        try:
            kind = json.loads(text).get("type")
        except (ValueError, AttributeError, RecursionError):
            kind = None
        if kind == "KeepAlive":
            return True
        if kind == "CloseStream":
            return False
        if kind == "Finalize":
            await self._finalize()
            return True
        await self._send({**messages.error(f"Could not parse client message of type {kind!r}.", "SchemaError"),
                          "message": text[:1000]})
        return True

    async def _finalize(self) -> None:
        assert self.pipeline is not None
        if await self.pipeline.end_region():
            self._finalizes += 1  # the region's final, when STT delivers it, answers this Finalize
            return
        end = max(self._cursor, self.pipeline.stream_seconds)
        await self._send(messages.results([], self.options, start=self._cursor, end=end, is_final=True,
                                          speech_final=True, from_finalize=True, request_id=self.request_id,
                                          model=self.model))
        self._cursor = end


def _safe_message(exc: Exception) -> str:
    """What the client is told: SttError's own message (written to be shown), else only the kind of failure."""
    from streaming.pool import PoolClosed, PoolSaturated
    from streaming.stt import SttError

    if isinstance(exc, SttError):
        return str(exc)
    if isinstance(exc, PoolSaturated):
        return "server busy, retry in 5 s"
    if isinstance(exc, PoolClosed):
        return "server restarting, retry in 5 s"
    return "internal server error"
