"""Per-connection `Pipeline` (decode → resample → VAD → STT → segments), and the same steps in batch mode.

All per-stream state lives here: the frame decoder, the VAD state, the STT session, the sent-audio timeline and the
segment being built. Shared objects (the VAD backend, the STT factory, settings) are only read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streaming.codecs import DecodeError, FrameDecoder
from streaming.protocol import ErrorEvent, TranscriptSegment
from streaming.stt import SAMPLE_RATE, SentTimeline, SttFactory, SttSession, Transcript
from streaming.vad import SpeechAudio, SpeechEnd, StreamingVAD, VadBackend, VadEvent, VadParams, detect_regions

log = logging.getLogger(__name__)

Emit = Callable[[Any], Awaitable[None]]  # sends one JSON message (a list of segments or an event) to the client


class SegmentBuilder:
    """Turns final transcripts into Omi transcript segments. Pure: no I/O.

    A segment collects the words of one utterance; it grows (same `id`, sent again) until the STT backend marks
    the utterance ended (`speech_final`, which the pipeline provokes with Finalize at the end of each speech region).
    """

    def __init__(self, timeline: SentTimeline) -> None:
        self._timeline = timeline
        self._current: TranscriptSegment | None = None
        self.segments: list[TranscriptSegment] = []

    def add(self, transcript: Transcript) -> list[TranscriptSegment]:
        changed: list[TranscriptSegment] = []
        words = [w for w in transcript.words if w.text.strip()] if transcript.is_final else []
        if words:
            to_stream = self._timeline.to_stream
            text = " ".join(w.text.strip() for w in words)
            start, end = to_stream(words[0].start), to_stream(words[-1].end, is_end=True)
            if self._current is None:
                self._current = TranscriptSegment(id=str(uuid.uuid4()), text=text, start=start, end=end)
                self.segments.append(self._current)
            else:
                self._current.text = f"{self._current.text} {text}"
                self._current.end = max(self._current.end, end)
            changed.append(self._current)
        if transcript.speech_final:
            self._current = None
        return changed


@dataclass
class PipelineStats:
    frames: int = 0
    bad_frames: int = 0
    stream_samples: int = 0
    sent_samples: int = 0
    regions: int = 0
    keepalives: int = 0
    started: float = field(default_factory=time.monotonic)


class Pipeline:
    """One connection's audio path. `feed` frames in arrival order; `finish` once at the end."""

    def __init__(
        self,
        *,
        decoder: FrameDecoder,
        vad_backend: VadBackend,
        vad_params: VadParams,
        stt_factory: SttFactory,
        language: str,
        emit: Emit,
        keepalive_s: float = 5.0,
    ) -> None:
        self._decoder = decoder
        self._vad = StreamingVAD(vad_backend, vad_params)
        self._emit = emit
        self.timeline = SentTimeline()
        self.segments = SegmentBuilder(self.timeline)
        self.stt: SttSession = stt_factory.session(self._on_transcript, language)
        self.stats = PipelineStats()
        self._keepalive_s = keepalive_s
        self._last_sent = time.monotonic()
        self._keepalive_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.stt.start()
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name="stt-keepalive")

    async def feed(self, frame: bytes) -> None:
        self.stats.frames += 1
        try:
            events = await asyncio.to_thread(self._decode_and_detect, frame)
        except DecodeError as exc:
            self.stats.bad_frames += 1
            await self._emit(ErrorEvent(code="bad_frame", message=f"frame {self.stats.frames}: {exc}").model_dump())
            return
        await self._forward(events)

    async def finish(self) -> None:
        """Flush the decoder and VAD, deliver the last transcripts, close STT. Safe to call once."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        with contextlib.suppress(Exception):
            events = await asyncio.to_thread(self._flush)
            await self._forward(events)
        await self.stt.close()

    # -- steps --------------------------------------------------------------------------------------------------

    def _decode_and_detect(self, frame: bytes) -> list[VadEvent]:
        """Worker thread: codec decode, resample to 16 kHz, VAD. Touches only this pipeline's state."""
        audio = self._decoder.decode(frame)
        self.stats.stream_samples += len(audio)
        return self._vad.process(audio) if len(audio) else []

    def _flush(self) -> list[VadEvent]:
        tail = self._decoder.flush()
        self.stats.stream_samples += len(tail)
        events = self._vad.process(tail) if len(tail) else []
        return events + self._vad.flush()

    async def _forward(self, events: list[VadEvent]) -> None:
        for ev in events:
            if isinstance(ev, SpeechAudio):
                self.timeline.append(ev.start, len(ev.audio))
                self.stats.sent_samples += len(ev.audio)
                self._last_sent = time.monotonic()
                await self.stt.send(ev.audio)
            elif isinstance(ev, SpeechEnd):
                self.stats.regions += 1
                self._last_sent = time.monotonic()
                await self.stt.finalize()

    async def _keepalive_loop(self) -> None:
        """Deepgram drops a socket that hears nothing for 10 s; during silence we send KeepAlive instead of audio."""
        while True:
            await asyncio.sleep(self._keepalive_s / 2)
            if time.monotonic() - self._last_sent >= self._keepalive_s:
                try:
                    await self.stt.keepalive()
                except Exception as exc:
                    log.warning("keepalive failed: %s", type(exc).__name__)
                self.stats.keepalives += 1
                self._last_sent = time.monotonic()

    async def _on_transcript(self, transcript: Transcript) -> None:
        changed = self.segments.add(transcript)
        if changed:
            await self._emit([s.model_dump() for s in changed])


# --- batch mode -------------------------------------------------------------------------------------------------


def speech_regions(backend: VadBackend, audio: np.ndarray, params: VadParams) -> list[dict[str, float]]:
    """`/v1/vad`: merged speech regions of a whole 16 kHz signal, in seconds. Blocking: call from a worker thread."""
    out = []
    for s, e in detect_regions(backend, audio, params):
        start, end = round(s / SAMPLE_RATE, 3), round(e / SAMPLE_RATE, 3)
        out.append({"start": start, "end": end, "duration": round(end - start, 3)})
    return out
