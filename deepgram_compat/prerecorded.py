"""`POST /v1/listen`'s work: a whole file through the VAD gate and the configured STT, words on the file's clock,
speakers when `diarize=true`.

It runs on the batch lane, so it never starves the live streams: the route holds a batch slot (`batch_admission`),
decoding and the VAD run in the low-priority batch threads, speaker embeddings go to the pool's BATCH lane, and the
regions go to STT one at a time (the next one only once the last one's final came), so a long file never queues
hundreds of regions in front of the streams' own (local STT shares its decoders with them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

import numpy as np

from deepgram_compat.messages import TimedWord
from deepgram_compat.options import ListenOptions
from streaming.audiofile import AudioFileError, decode_audio_file
from streaming.codecs import DecodeError, make_decoder
from streaming.pool import BATCH
from streaming.speaker import MATCH_RULES, ProfileIndex
from streaming.stt import SAMPLE_RATE, SentTimeline, SttFactory, Transcript, to_int16
from streaming.tagging import SpeakerTagger
from streaming.vad import VadBackend, VadParams, detect_regions

log = logging.getLogger(__name__)

RunBlocking = Callable[..., Awaitable[Any]]  # the app's `BatchThreads.run`
REGION_RESULT_TIMEOUT_S = 120.0  # a region's final is waited for this long at most (then the next one goes)


class BatchLanePool:
    """The model pool as a `SpeakerTagger` sees it, with its embeddings on the BATCH lane (bulk work: served when
    no live window waits, never counted as live saturation)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def embed_many(self, clips: list[np.ndarray]) -> np.ndarray:
        return await self._pool.embed_many(clips, BATCH)


def decode_upload(source: BinaryIO, options: ListenOptions, max_seconds: float) -> np.ndarray:
    """Blocking. 16 kHz mono float32 of the upload: a container (WAV, FLAC, OGG, MP3, M4A...) as the other upload
    routes decode it, or raw linear16 when `encoding=linear16` (with `sample_rate`, and `channels`) says so."""
    if options.encoding is None:
        return decode_audio_file(source, max_seconds)
    if options.encoding != "linear16" or options.sample_rate is None:
        raise AudioFileError("raw audio needs encoding=linear16 and its sample_rate (opus is taken on the live "
                             "stream only; send an Ogg/WebM file without encoding instead)", 400)
    data = source.read()
    frame = 2 * options.channels
    if len(data) < frame:
        raise AudioFileError("no audio in the request body", 400)
    if len(data) / frame / options.sample_rate > max_seconds:
        raise AudioFileError(f"audio longer than the limit of {max_seconds:g} s", 413)
    decoder = make_decoder("pcm16", options.sample_rate, options.channels)
    try:
        audio = decoder.decode(data[: len(data) - len(data) % frame])
    except DecodeError as exc:
        raise AudioFileError(f"raw linear16 audio: {exc}", 400) from None
    tail = decoder.flush()
    return np.concatenate((audio, tail)) if len(tail) else audio


def speech_pieces(backend: VadBackend, audio: np.ndarray, params: VadParams) -> list[tuple[int, int]]:
    """Blocking. The live gate's regions of the file (sample pairs), each cut to at most VAD_MAX_SPEECH_S, as a
    stream's would be."""
    longest = max(1, int(params.max_speech_s * SAMPLE_RATE))
    return [(s, min(s + longest, e)) for start, e in detect_regions(backend, audio, params)
            for s in range(start, e, longest)]


class _Collector:
    """The STT session's results for one file: final words on the file's clock, speaker labels from the tagger."""

    def __init__(self, timeline: SentTimeline, tagger: SpeakerTagger | None) -> None:
        self.timeline = timeline
        self.tagger = tagger
        self.words: list[TimedWord] = []
        self.regions_done = 0
        self.done = asyncio.Event()
        self.error: Exception | None = None

    async def on_transcript(self, transcript: Transcript) -> None:
        if not transcript.is_final:
            return
        try:
            await self._add([w for w in transcript.words if w.text.strip()])
        except Exception as exc:  # raised to the route after STT is closed, not into the STT backend's task
            self.error = self.error or exc
        if transcript.speech_final:
            self.regions_done += 1
            self.done.set()

    async def _add(self, words: list) -> None:
        speakers: list[int | None] = [None] * len(words)
        if self.tagger is not None and words:
            labels, relabels = await self.tagger.label_words(words)
            speakers = [label.speaker_id for label in labels]
            for old, label in relabels.items():  # clusters merged since: the earlier words follow
                self.words = [TimedWord(w.word, w.start, w.end, label.speaker_id) if w.speaker == old else w
                              for w in self.words]
        to_stream = self.timeline.to_stream
        self.words += [TimedWord(w, to_stream(w.start), to_stream(w.end, is_end=True), spk)
                       for w, spk in zip(words, speakers, strict=True)]


async def transcribe(audio: np.ndarray, options: ListenOptions, *, stt_factory: SttFactory, vad_backend: VadBackend,
                     vad_params: VadParams, pool: Any, run_blocking: RunBlocking,
                     ) -> tuple[list[TimedWord], list[tuple[float, float]]]:
    """The words of a decoded file and its speech regions (seconds). Raises SttError (STT unreachable),
    PoolSaturated (the pool's batch lane is full), or what the STT backend raised."""
    pieces = await run_blocking(speech_pieces, vad_backend, audio, vad_params)
    timeline = SentTimeline()
    tagger = None
    if options.diarize:
        tagger = SpeakerTagger(BatchLanePool(pool), ProfileIndex.from_profiles([], pool.embedder_name), MATCH_RULES)
    collector = _Collector(timeline, tagger)
    session = stt_factory.session(collector.on_transcript, options.language)
    await session.start()
    try:
        for n, (start, end) in enumerate(pieces, 1):
            pcm = to_int16(audio[start:end])
            timeline.append(start, len(pcm))
            if tagger is not None:
                tagger.add_audio(pcm)
            await session.send(pcm)
            await session.finalize()
            await _until(collector, n, REGION_RESULT_TIMEOUT_S + len(pcm) / SAMPLE_RATE)
            if collector.error is not None:
                raise collector.error
    finally:
        await session.close()
    if collector.error is not None:
        raise collector.error
    collector.words.sort(key=lambda w: w.start)
    return collector.words, [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in pieces]


async def _until(collector: _Collector, regions: int, timeout_s: float) -> None:
    """Waits for the final of region number `regions`; after `timeout_s` goes on (its words come by `close`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while collector.regions_done < regions and collector.error is None:
        collector.done.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("no final for a region after %.0f s; going on", timeout_s)
            return
        try:
            await asyncio.wait_for(collector.done.wait(), remaining)
        except TimeoutError:
            continue
