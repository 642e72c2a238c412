"""Partial transcripts of the local STT backend: an open speech region decoded as it arrives.

A stream whose region opens borrows a pocketsphinx decoder from `PartialDecoders` (per process, at most
`LOCAL_PARTIAL_DECODERS`, made on demand), feeds it the region's audio in a worker thread as it comes
(`process_raw`), and reads the best hypothesis so far (with word times) every `LOCAL_PARTIAL_INTERVAL_S`. At the
region's end the decoder goes back to the pool; the region's final transcript still comes from the batch decode in
`stt_local.LocalRecognizer`, so finals are exactly what they are without partials. When every partial decoder is lent,
the region simply has no partials (nothing is lost: its final comes as always).

Decoding once, incrementally, costs about one decode of the region; re-decoding the whole region every second would
grow with the square of its length (`bench/local_partials.py` measures both).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np

from streaming.stt import SAMPLE_RATE, Word

log = logging.getLogger(__name__)

FRAME_RATE = 100  # pocketsphinx frames per second
_FILLERS = ("<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "<unk>")
# Partial decoders search with at most this many active HMMs per frame (pocketsphinx's default is 30000) and skip
# the second passes (fwdflat, bestpath) that only the final result uses: on sample.wav's 23 s region the
# hypothesis stays nearly the same and the decode costs 0.13 s of CPU per second of speech instead of 0.27-0.29.
PARTIAL_MAX_HMM_PER_FRAME = 3000
# pocketsphinx holds the GIL while it decodes (its Cython binding has no `nogil`), so a call from a worker thread
# stops the event loop for as long as it runs: audio goes in pieces of at most this many samples (0.25 s of speech,
# ~30 ms of CPU), and the loop runs between them however much audio piled up.
MAX_PIECE = SAMPLE_RATE // 4


def decoder_words(decoder, offset_s: float = 0.0) -> list[Word]:
    """The words of a pocketsphinx decoder's current best hypothesis (final after `end_utt`, partial before),
    fillers dropped, times in seconds from the utterance's start plus `offset_s`."""
    words = []
    for seg in decoder.seg() or ():  # None before the first frame of an utterance
        text = seg.word.split("(")[0]  # "word(2)" is an alternate pronunciation of "word"
        if text in _FILLERS or text.startswith("++") or text.startswith("["):
            continue
        words.append(
            Word(
                text=text,
                start=seg.start_frame / FRAME_RATE + offset_s,
                end=(seg.end_frame + 1) / FRAME_RATE + offset_s,
                confidence=float(min(1.0, np.exp(seg.prob))) if seg.prob else 1.0,
            )
        )
    return words


class _PartialDecoder:
    """One pocketsphinx decoder of the partial pool. `lock` is held by every call on it, so a borrower's call still
    running in a thread (its stream cancelled meanwhile) finishes before the next borrower's first call starts."""

    __slots__ = ("decoder", "in_utterance", "lock")

    def __init__(self) -> None:
        self.decoder = None  # made by the first borrower, in its worker thread (about 0.3-0.9 s)
        self.in_utterance = False
        self.lock = threading.Lock()

    def start(self) -> None:
        """Blocking (hold `lock`): a fresh utterance with a fresh front end, so no earlier stream's audio changes
        this one's hypothesis (pocketsphinx otherwise carries its cepstral mean across utterances)."""
        if self.decoder is None:
            from pocketsphinx import Decoder

            self.decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", fwdflat=False, bestpath=False,
                                   maxhmmpf=PARTIAL_MAX_HMM_PER_FRAME)
        if self.in_utterance:  # its last borrower was cut off mid-region
            self.decoder.end_utt()
        self.decoder.reinit_feat()
        self.decoder.start_utt()
        self.in_utterance = True

    def stop(self) -> None:
        """Blocking (hold `lock`)."""
        if self.in_utterance:
            self.decoder.end_utt()
            self.in_utterance = False


class PartialDecoders:
    """Per process: the decoders lent to open regions for their partials, at most `limit`, made on demand and kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: list[_PartialDecoder] = []
        self._made = 0
        self._lock = threading.Lock()

    def try_lend(self) -> _PartialDecoder | None:
        """A decoder for one region, or None when all `limit` are lent. Never blocks."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._made < self.limit:
                self._made += 1
                return _PartialDecoder()
            return None

    def give_back(self, decoder: _PartialDecoder) -> None:
        with self._lock:
            self._free.append(decoder)

    @property
    def lent(self) -> int:
        with self._lock:
            return self._made - len(self._free)


OnPartial = Callable[[list[Word]], Awaitable[None]]


class PartialRegion:
    """One open region's partials: feeds its audio to a borrowed decoder in a worker thread (one call at a time, in
    order) and calls `on_partial` with the hypothesis (sent-audio times) when it changed and `interval_s` has passed
    since the stream's last partial (`last_sent`, monotonic; a hypothesis is cheap to read, ~0.1 ms, so an unchanged
    one is read again with the next audio). After `end()` it decodes nothing more; `done` is over once its decoder
    is back in the pool and its last `on_partial` has returned (await it before the region's final is delivered)."""

    def __init__(self, pool: PartialDecoders, decoder: _PartialDecoder, *, offset_s: float, interval_s: float,
                 on_partial: OnPartial, last_sent: float) -> None:
        self._pool = pool
        self._decoder = decoder
        self._offset_s = offset_s  # sent-audio time of the region's first sample
        self._interval_s = interval_s
        self._on_partial = on_partial
        self._pending: list[np.ndarray] = []
        self._wake = asyncio.Event()
        self._ended = False
        self._last_sent = last_sent
        self._shown: tuple[tuple[str, float], ...] = ()
        self.done = asyncio.create_task(self._run(), name="stt-partials")

    def feed(self, pcm16: np.ndarray) -> None:
        self._pending.append(pcm16)
        self._wake.set()

    def end(self) -> None:
        self._ended = True
        self._wake.set()

    async def _run(self) -> None:
        started = False
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._ended:
                    break
                audio, self._pending = self._pending, []
                look = time.monotonic() - self._last_sent >= self._interval_s
                words = await asyncio.to_thread(self._decode, audio, not started, look)
                started = True
                if self._ended:
                    break
                key = tuple((w.text, w.start) for w in words) if words is not None else self._shown
                if key != self._shown:
                    self._shown = key
                    self._last_sent = time.monotonic()
                    await self._on_partial(words)
        except Exception:  # partials are a preview: the region's final still comes
            log.warning("local STT partials stopped for this region", exc_info=True)
        finally:
            if started:
                try:
                    await asyncio.to_thread(self._stop)
                finally:
                    self._pool.give_back(self._decoder)
            else:
                self._pool.give_back(self._decoder)

    def _decode(self, chunks: list[np.ndarray], start: bool, look: bool) -> list[Word] | None:
        """Blocking: the new audio into the utterance; its hypothesis when `look`."""
        with self._decoder.lock:
            if start:
                self._decoder.start()
            decoder = self._decoder.decoder
            if chunks:
                audio = np.concatenate(chunks)
                for i in range(0, len(audio), MAX_PIECE):
                    decoder.process_raw(audio[i : i + MAX_PIECE].tobytes(), full_utt=False)
            return decoder_words(decoder, self._offset_s) if look else None

    def _stop(self) -> None:
        with self._decoder.lock:
            self._decoder.stop()
