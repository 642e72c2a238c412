"""Per-connection `Pipeline` (decode → resample → VAD → STT → segments), and the same steps in batch mode.

All per-stream state lives here: the frame decoder, the VAD state, the STT session, the sent-audio timeline and the
segment being built. Shared objects (the VAD backend, the STT factory, settings) are only read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

import metrics
from streaming.codecs import DecodeError, FrameDecoder
from streaming.pool import VadJob
from streaming.protocol import ErrorEvent, TranscriptSegment
from streaming.segment_writer import Persist, SegmentWriter
from streaming.segments import SegmentBuilder, SegmentTail
from streaming.stt import SAMPLE_RATE, SentTimeline, SttError, SttFactory, SttSession, Transcript, to_int16
from streaming.tagging import SpeakerLabel, SpeakerTagger
from streaming.vad import SpeechAudio, SpeechEnd, SpeechStart, StreamingVAD, VadBackend, VadEvent, VadParams

log = logging.getLogger(__name__)

AudioTap = Callable[[np.ndarray], None]  # float32 16 kHz mono samples, as decoded; must not block
Emit = Callable[[Any], Awaitable[None]]  # sends one JSON message (a list of segments or an event) to the client
# Runs one stream's `FrameJob` (decode + VAD) and returns its result: the model pool's batched VAD (`run_vad`) in the
# server; by default the job alone in a worker thread.
VadRunner = Callable[[VadJob], Awaitable[Any]]
# For a caller that speaks another protocol than Omi's segments (deepgram_compat): every STT result as it comes, on
# the sent-audio clock (`Pipeline.timeline` maps it), with its words' speaker labels (finals, when tagging ran).
ResultTap = Callable[[Transcript, list[SpeakerLabel] | None], Awaitable[None]]
SpeechStartTap = Callable[[int], Awaitable[None]]  # the stream sample where a speech region (with pre-roll) begins


class SpeechPcm(NamedTuple):
    """`vad.SpeechAudio` as int16 samples, converted once in the worker thread: STT and the speaker ring take int16."""

    start: int  # stream sample of pcm[0]
    pcm: np.ndarray  # int16


def _speech_as_pcm(events: list[VadEvent]) -> list[SpeechPcm | VadEvent]:
    return [SpeechPcm(ev.start, to_int16(ev.audio)) if isinstance(ev, SpeechAudio) else ev for ev in events]


class FrameJob:
    """One stream's queued frames on their way through decode and VAD (a `pool.VadJob`). `prepare` and `complete`
    run in the VAD worker thread and touch only this stream's decoder and VAD, which nothing else touches while the
    job is out (`Pipeline._work` awaits it). The result: the VAD events, and the frames that could not be decoded
    as (frame number, why)."""

    __slots__ = ("audio", "bad", "decoder", "events", "frames", "samples", "vad")

    def __init__(self, decoder: FrameDecoder, vad: StreamingVAD, frames: list[tuple[int, bytes]]) -> None:
        self.decoder = decoder
        self.vad = vad
        self.frames = frames
        self.audio = np.zeros(0, np.float32)  # the decoded 16 kHz audio (for the stream's audio tap)
        self.bad: list[tuple[int, str]] = []
        self.samples = 0  # 16 kHz samples decoded
        self.events: list[SpeechPcm | VadEvent] = []

    def prepare(self) -> tuple[StreamingVAD, np.ndarray]:
        decoded = []
        for index, frame in self.frames:
            try:
                audio = self.decoder.decode(frame)
            except DecodeError as exc:
                self.bad.append((index, str(exc)))
                continue
            if len(audio):
                decoded.append(audio)
        audio = np.concatenate(decoded) if len(decoded) > 1 else (decoded[0] if decoded else np.zeros(0, np.float32))
        self.samples = len(audio)
        self.audio = audio
        return self.vad, self.vad.take(audio)

    def complete(self, probs: np.ndarray) -> FrameJob:
        self.events = _speech_as_pcm(self.vad.decide(probs))
        return self

    def run_alone(self) -> FrameJob:
        """Blocking: the job without the pool (one model call for this stream)."""
        vad, model_in = self.prepare()
        return self.complete(vad.backend.speech_probs(vad.state, model_in) if len(model_in) else model_in[:0])


@dataclass
class PipelineStats:
    frames: int = 0
    bad_frames: int = 0
    stream_samples: int = 0
    sent_samples: int = 0
    regions: int = 0
    keepalives: int = 0
    started: float = field(default_factory=time.monotonic)


# A stream's frames waiting for its worker. Beyond either bound `feed` waits: 2 s of 16 kHz pcm16, or 1 s of 20 ms
# frames, bounds the memory a fast client can take while keeping enough for the worker to batch under load.
MAX_QUEUED_BYTES = 64 * 1024
MAX_QUEUED_FRAMES = 50


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
        tagger: SpeakerTagger | None = None,
        persist: Persist | None = None,
        time_offset: float = 0.0,
        keepalive_s: float = 5.0,
        pending_max: int = 5000,
        retry_on_close_s: float = 30.0,
        write_timeout_s: float = 10.0,
        vad_runner: VadRunner | None = None,
        tail: SegmentTail | None = None,
        fixed_label: SpeakerLabel | None = None,
        audio_tap: AudioTap | None = None,
        emit_partial: Emit | None = None,
        result_tap: ResultTap | None = None,
        speech_start_tap: SpeechStartTap | None = None,
    ) -> None:
        self._decoder = decoder
        self._audio_tap = audio_tap  # called on the event loop with each run of decoded 16 kHz audio, in order
        self._vad = StreamingVAD(vad_backend, vad_params)
        self._run_vad = vad_runner or _run_alone
        self._emit = emit
        # Partial transcripts and their clean-up go to the client only: never stored, never to the transcript webhook.
        self._emit_partial = emit_partial or emit
        self._result_tap = result_tap
        self._speech_start_tap = speech_start_tap
        self.timeline = SentTimeline()
        self.segments = SegmentBuilder(self.timeline, time_offset, tail, fixed_label)
        self.stt: SttSession = stt_factory.session(self._on_transcript, language, self._on_stt_error)
        # Metrics: the STT backend's name (a bounded label), and when each region sent to STT ended, oldest first,
        # to time its final (bounded: a backend that answers some regions with nothing must not grow it).
        self._stt_backend = str(getattr(stt_factory, "backend", "unknown"))
        self._speech_sent = metrics.STT_SPEECH_SECONDS.labels(backend=self._stt_backend)
        self._stt_round_trip = metrics.STT_ROUND_TRIP.labels(backend=self._stt_backend)
        self._region_ends: deque[float] = deque(maxlen=64)
        self.stats = PipelineStats()
        self.tagger = tagger
        self._keepalive_s = keepalive_s
        self._last_sent = time.monotonic()
        self._keepalive_task: asyncio.Task | None = None
        self._inbox: list[tuple[int, bytes]] = []  # (frame number, frame) not yet decoded
        self._inbox_bytes = 0
        self._worker: asyncio.Task | None = None
        self._worker_error: Exception | None = None
        self._worker_error_raised = False  # feed() raised it: the stream's end was decided (and logged) by then
        self.writer = (SegmentWriter(persist, self._emit, pending_max=pending_max, retry_on_close_s=retry_on_close_s,
                                     write_timeout_s=write_timeout_s) if persist is not None else None)

    async def start(self) -> None:
        await self.stt.start()
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name="stt-keepalive")

    async def feed(self, frame: bytes) -> None:
        """Queues a frame for this stream's worker and returns; waits only while the queue is full (a client
        sending faster than the server processes is slowed down by TCP, never dropped)."""
        self.stt.check()  # STT gave up for good (raises SttError): the stream must end, not go on deaf
        self._raise_worker_error()
        self.stats.frames += 1
        self._inbox.append((self.stats.frames, frame))
        self._inbox_bytes += len(frame)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="pipeline-worker")
        if self._inbox_bytes >= MAX_QUEUED_BYTES or len(self._inbox) >= MAX_QUEUED_FRAMES:
            await asyncio.shield(self._worker)
            self._raise_worker_error()

    def _raise_worker_error(self) -> None:
        if self._worker_error is not None:
            self._worker_error_raised = True
            raise self._worker_error

    async def _work(self) -> None:
        """Decodes and runs the VAD on every queued frame in one job (on the model pool, batched with the other
        streams' jobs), forwards the result, and goes on while frames arrived meanwhile. A stream has one job out at
        a time; the frames that come meanwhile make its next one, so under load each job carries more frames."""
        try:
            while self._inbox:
                batch, self._inbox, self._inbox_bytes = self._inbox, [], 0
                job = await self._run_vad(FrameJob(self._decoder, self._vad, batch))
                self.stats.stream_samples += job.samples
                metrics.AUDIO_RECEIVED_SECONDS.inc(job.samples / SAMPLE_RATE)
                self._tap(job.audio)
                await self._forward(job.events)
                for index, problem in job.bad:
                    self.stats.bad_frames += 1
                    await self._emit(ErrorEvent(code="bad_frame", message=f"frame {index}: {problem}").model_dump())
        except Exception as exc:  # raised (and logged) by the next feed() or by finish(), as if they had raised it
            self._worker_error = exc
            self._inbox, self._inbox_bytes = [], 0

    async def finish(self) -> None:
        """Flush the decoder and VAD, deliver the last transcripts, close STT, store what is left. Call once.

        Every step runs even when an earlier one failed (the segments still get stored). The first failure is
        raised at the end for the caller to log and to close with (1011); a worker failure that `feed` already
        raised is not raised again, nor is STT's giving up (`SttError`: the STT session logged it)."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        errors: list[Exception] = []
        if self._worker is not None:
            await asyncio.wait({self._worker})  # the frames received before the end are processed first
            if self._worker_error is not None and not self._worker_error_raised:
                errors.append(self._worker_error)
        for step in (self._flush_and_forward, self.stt.close, self._drain_writer):
            try:
                await step()
            except SttError:
                pass
            except Exception as exc:
                errors.append(exc)
        for extra in errors[1:]:
            log.error("stream end: a further step failed", exc_info=extra)
        if errors:
            raise errors[0]

    async def _flush_and_forward(self) -> None:
        tail, events = await asyncio.to_thread(self._flush)
        self._tap(tail)  # here, on the loop: the tap is not thread-safe
        await self._forward(events)

    def _tap(self, audio: np.ndarray) -> None:
        if self._audio_tap is not None and len(audio):
            self._audio_tap(audio)

    async def _drain_writer(self) -> None:
        """The last transcripts are delivered by now: store what storage has not taken yet."""
        if self.writer is not None:
            await self.writer.drain()

    # -- steps --------------------------------------------------------------------------------------------------

    def _flush(self) -> tuple[np.ndarray, list[SpeechPcm | VadEvent]]:
        """The decoder's last audio, and the VAD events it and the VAD's own flush make."""
        tail = self._decoder.flush()
        self.stats.stream_samples += len(tail)
        metrics.AUDIO_RECEIVED_SECONDS.inc(len(tail) / SAMPLE_RATE)
        events = self._vad.process(tail) if len(tail) else []
        return tail, _speech_as_pcm(events + self._vad.flush())

    async def _forward(self, events: list[SpeechPcm | VadEvent]) -> None:
        for ev in events:
            if isinstance(ev, SpeechPcm):
                self.timeline.append(ev.start, len(ev.pcm))
                if self.tagger is not None:
                    self.tagger.add_audio(ev.pcm)
                self.stats.sent_samples += len(ev.pcm)
                self._speech_sent.inc(len(ev.pcm) / SAMPLE_RATE)
                self._last_sent = time.monotonic()
                await self.stt.send(ev.pcm)
            elif isinstance(ev, SpeechEnd):
                self.stats.regions += 1
                self._last_sent = time.monotonic()
                self._region_ends.append(self._last_sent)
                await self.stt.finalize()
            elif isinstance(ev, SpeechStart) and self._speech_start_tap is not None:
                await self._speech_start_tap(ev.sample)

    async def end_region(self) -> bool:
        """The client asked for its results now (Deepgram's `Finalize`): the frames received so far go through the
        VAD, an open speech region is closed here as if its speech had ended, and STT finalizes it. True when a
        region was open."""
        if self._worker is not None:
            await asyncio.wait({self._worker})
            self._raise_worker_error()
        events = _speech_as_pcm(await asyncio.to_thread(self._vad.flush))
        await self._forward(events)
        return any(isinstance(ev, SpeechEnd) for ev in events)

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

    async def _on_stt_error(self, code: str, message: str) -> None:
        await self._emit(ErrorEvent(code=code, message=message).model_dump())

    async def _on_transcript(self, transcript: Transcript) -> None:
        if not transcript.is_final:
            if self._result_tap is not None:
                await self._result_tap(transcript, None)
            await self._show(self.segments.preview(transcript, self._partial_label()))
            return
        received = time.monotonic()
        if transcript.speech_final and self._region_ends:
            self._stt_round_trip.observe(received - self._region_ends.popleft())
        labels, relabels = None, {}
        words = [w for w in transcript.words if w.text.strip()]
        if self.tagger is not None and words:
            try:
                labels, relabels = await self.tagger.label_words(words)
            except Exception as exc:  # a saturated pool or a model error must not lose the transcript
                log.warning("speaker tagging failed, sending unlabelled: %s", exc)
        changed = []
        for speaker_id, label in relabels.items():  # earlier segments first, so the new words extend them
            changed += [s for s in self.segments.relabel(speaker_id, label) if s not in changed]
        transcript = Transcript(tuple(words), transcript.is_final, transcript.speech_final)
        changed += [s for s in self.segments.add(transcript, labels) if s not in changed]
        if self._result_tap is not None:
            await self._result_tap(transcript, labels)
        await self._deliver(changed)
        if changed:
            metrics.SEGMENT_LATENCY.observe(time.monotonic() - received)
        await self._show(self.segments.settle(changed))  # what partials showed that the final did not send

    def _partial_label(self) -> SpeakerLabel:
        """Partials are not speaker-tagged (an embedding per partial would cost more than the partial): their words
        go to the speaker of the conversation's last segment, or the channel's fixed speaker; the final's tagging
        then decides, and the final replaces the partial by id."""
        last = self.segments.tail.segment
        if self.tagger is None or last is None:
            return self.segments.default_label
        return SpeakerLabel(last.speaker_id, last.is_user, last.person_id)

    async def _show(self, segments: list[TranscriptSegment]) -> None:
        """Segments for the client's eyes only (partials, and segments as they are once a partial is gone). A
        segment only a partial made, whose words the final dropped, is sent empty (the 2025 app replaces it by id)
        and listed in `segments_deleted` (the new app removes it)."""
        if not segments:
            return
        await self._emit_partial([s.model_dump() for s in segments])
        retracted = SegmentBuilder.retracted(segments)
        if retracted:
            await self._emit_partial({"type": "segments_deleted", "segment_ids": retracted})

    async def _deliver(self, changed: list[TranscriptSegment]) -> None:
        """Persist, then send: while storage answers, a segment the client has seen is a segment that is stored.
        While it is down (or slow) the client still gets its transcript at once, unstored; the writer keeps the
        segments for its background retry (bounded: `SegmentWriter`)."""
        if not changed:
            return
        moved = await self.writer.store(changed) if self.writer is not None else []
        await self._emit([s.model_dump() for s in changed + moved])

    @property
    def stream_seconds(self) -> float:
        return self.stats.stream_samples / SAMPLE_RATE

    async def assign_speaker(self, speaker_id: int | None, person_id: str | None, is_user: bool,
                             segment_ids: list[str]) -> tuple[list[TranscriptSegment], np.ndarray]:
        """The client's `speaker_assigned`: the listed segments, and the speaker's segments from now on, are the
        user (`is_user`) or `person_id`. Sends the changed segments; returns them and the speaker's embeddings
        (empty when this stream has no such speaker)."""
        embeddings = np.zeros((0, 0), np.float32)
        changed: list[TranscriptSegment] = []
        if self.tagger is not None and speaker_id is not None:
            try:
                embeddings = self.tagger.assign(speaker_id, person_id, is_user)
            except ValueError:  # not a speaker of this stream (maybe of another stream): the segment ids still count
                pass
            else:
                changed = self.segments.relabel(speaker_id, self.tagger.label(speaker_id))
        elif speaker_id is not None and speaker_id == self.segments.default_label.speaker_id:  # a channel's speaker
            self.segments.default_label = SpeakerLabel(speaker_id, is_user, person_id)
            changed = self.segments.relabel(speaker_id, self.segments.default_label)
        changed += [s for s in self.segments.tag(segment_ids, is_user, person_id) if s not in changed]
        await self._deliver(changed)
        return changed, embeddings


async def _run_alone(job: VadJob) -> FrameJob:
    return await asyncio.to_thread(job.run_alone)
