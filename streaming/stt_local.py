"""STT backend `local`: pocketsphinx (its English model ships in the wheel), offline. Each speech region is decoded
as one utterance when it closes, on a small shared pool of decoders in worker threads; while it is open, its
partial transcript comes from an incremental decoder when one is free (`streaming/sphinx_partials.py`)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from streaming.sphinx_partials import PartialDecoders, PartialRegion, decoder_words
from streaming.stt import SAMPLE_RATE, OnTranscript, SttSession, Transcript, Word

log = logging.getLogger(__name__)

# The final's decoder in each worker process of `LocalRecognizer` (made by `_make_decoder`, the pool's initializer).
_decoder = None


def _make_decoder() -> None:
    global _decoder
    from pocketsphinx import Decoder

    _decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
    # A server killed without its shutdown (SIGKILL, OOM) would leave this process waiting for work forever, holding
    # its ~200 MB: it ends itself once its parent is gone.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="parent-watch", daemon=True).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _decode(pcm16: bytes) -> list[Word]:
    """In a worker process: one utterance, words with times relative to the audio's start."""
    # pocketsphinx adapts its feature normalisation (cepstral mean) across utterances; a fresh front end per
    # utterance keeps one stream's audio from changing another stream's transcript (costs ~0.1 ms).
    _decoder.reinit_feat()
    _decoder.start_utt()
    _decoder.process_raw(pcm16, full_utt=True)
    _decoder.end_utt()
    return decoder_words(_decoder)


class LocalRecognizer:
    """Shared pocketsphinx decoders for finals: `decoders` worker processes, one decoder and one utterance at a time
    each; regions are independent utterances, so no stream's state outlives its call. Processes, not threads:
    pocketsphinx holds the GIL while it decodes, and a 29 s region's batch decode in a thread stopped the event loop
    for 12 s here (every stream's messages with it). Thread-safe.

    `partials` lends decoders for partial transcripts (`partial_decoders` at most, 0: no partials); those run in
    threads, in pieces short enough for the event loop (`sphinx_partials.MAX_PIECE`)."""

    def __init__(self, decoders: int = 2, lazy: bool = False, partial_decoders: int = 0) -> None:
        self._decoders = decoders
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self.partials = PartialDecoders(partial_decoders)
        if not lazy:  # LAZY_MODELS: the processes start with the first utterance, ~1 s off the start-up
            self.recognize(bytes(SAMPLE_RATE // 10))

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self._decoders, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_make_decoder)

    def recognize(self, pcm16: bytes) -> list[Word]:
        """Blocking (waits for a worker process): run in a worker thread. Returns words with times relative to the
        audio's start. A worker that died (killed, out of memory) breaks the pool: a new one takes the utterance,
        once, so one lost process does not end local STT for the rest of the server's life."""
        pool = self._pool
        try:
            return pool.submit(_decode, pcm16).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    log.error("local STT: a decoder process died; starting new ones")
                    self._pool = self._new_pool()
                pool = self._pool
            return pool.submit(_decode, pcm16).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalSession(SttSession):
    """Buffers each speech region's audio and decodes it when the region closes.

    Decoding runs in a worker thread as a chain of tasks (one per region, each awaiting the one before), so the
    stream keeps taking audio while a region is recognised and results still come out in order. With
    `partial_interval_s` above 0, an open region also gets partial transcripts (`is_final` false) at that interval
    while a partial decoder is free. A partial holds the latest hypothesis of every region whose final is not out
    yet (a region still being decoded keeps its words on screen while the next one is spoken); a region's final
    (`is_final` true) comes after its last partial and replaces it, and what is left of the later regions'
    partials is sent again right after it. Every result goes out under one lock, in the order it was made.
    """

    def __init__(self, on_transcript: OnTranscript, recognizer: LocalRecognizer,
                 partial_interval_s: float = 0.0) -> None:
        super().__init__(on_transcript)
        self._recognizer = recognizer
        self._partial_interval_s = partial_interval_s
        self._region: list[np.ndarray] = []
        self._region_sent_start = 0  # sent-audio sample of the buffered region's first sample
        self._sent = 0
        self._last_task: asyncio.Task | None = None
        self._partial: PartialRegion | None = None
        self._regions = 0  # regions opened so far; a region's number keys its partial words
        self._partial_words: dict[int, list[Word]] = {}  # region -> its last partial words, until its final is out
        self._deliver = asyncio.Lock()
        self._partial_sent_at = 0.0  # monotonic time of the stream's last partial

    async def start(self) -> None:
        return None

    async def send(self, pcm16: np.ndarray) -> None:
        if not self._region:
            self._regions += 1
            if self._partial_interval_s > 0:
                self._partial = self._open_partials(self._regions)
        self._region.append(pcm16)
        self._sent += len(pcm16)
        if self._partial is not None:
            self._partial.feed(pcm16)

    def _open_partials(self, region: int) -> PartialRegion | None:
        pool = self._recognizer.partials
        decoder = pool.try_lend()
        if decoder is None:  # all lent: this region's transcript comes whole at its end
            return None

        async def on_partial(words: list[Word]) -> None:
            async with self._deliver:
                self._partial_words[region] = words
                self._partial_sent_at = time.monotonic()
                await self._send_partial()

        # The region's first partial may come as soon as it has words, if the stream's last one is old enough.
        return PartialRegion(pool, decoder, offset_s=self._region_sent_start / SAMPLE_RATE,
                             interval_s=self._partial_interval_s, on_partial=on_partial,
                             last_sent=self._partial_sent_at)

    async def _send_partial(self) -> None:
        """The partial words of every region whose final is not out, in order (hold `_deliver`)."""
        words = tuple(w for region in sorted(self._partial_words) for w in self._partial_words[region])
        await self.on_transcript(Transcript(words=words, is_final=False, speech_final=False))

    async def finalize(self) -> None:
        if not self._region:
            return
        audio = np.concatenate(self._region)
        offset = self._region_sent_start / SAMPLE_RATE
        self._region, self._region_sent_start = [], self._sent
        partial, self._partial = self._partial, None
        if partial is not None:
            partial.end()  # synchronously: it emits nothing from now on
        self._last_task = asyncio.create_task(self._recognize(
            self._last_task, audio, offset, self._regions, partial.done if partial is not None else None))

    async def _recognize(self, previous: asyncio.Task | None, audio: np.ndarray, offset: float, region: int,
                         partials: asyncio.Task | None) -> None:
        words = await asyncio.to_thread(self._recognizer.recognize, audio.tobytes())
        if previous is not None:
            await previous
        if partials is not None:
            await partials  # its decoder is back in the pool, its last partial delivered
        shifted = tuple(Word(w.text, w.start + offset, w.end + offset, w.confidence) for w in words)
        async with self._deliver:
            self._partial_words.pop(region, None)
            await self.on_transcript(Transcript(words=shifted, is_final=True, speech_final=True))
            if self._partial_words:  # the next region's words, which the final's segments do not hold
                await self._send_partial()

    async def close(self) -> None:
        await self.finalize()
        if self._last_task is not None:
            await self._last_task
