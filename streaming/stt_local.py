"""STT backend `local`: pocketsphinx (its English model ships in the wheel), offline. Each speech region is decoded
as one utterance when it closes, on a small shared pool of decoders in worker threads."""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np

from streaming.stt import SAMPLE_RATE, OnTranscript, SttSession, Transcript, Word


class LocalRecognizer:
    """Shared pocketsphinx decoders. A decoder serves one utterance at a time; regions are independent utterances,
    so no stream's state outlives its call. Thread-safe: decoders are checked out of a queue."""

    FRAME_RATE = 100  # pocketsphinx frames per second
    _FILLERS = ("<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "<unk>")

    def __init__(self, decoders: int = 2, lazy: bool = False) -> None:
        self._count = decoders
        self._free: queue.Queue = queue.Queue()
        self._made = False
        self._lock = threading.Lock()
        if not lazy:  # LAZY_MODELS: built by the first utterance (in its worker thread), ~1 s off the start-up
            self._make()

    def _make(self) -> None:
        with self._lock:
            if self._made:
                return
            from pocketsphinx import Decoder

            for _ in range(self._count):
                self._free.put(Decoder(samprate=SAMPLE_RATE, loglevel="FATAL"))
            self._made = True

    def recognize(self, pcm16: bytes) -> list[Word]:
        """Blocking: run in a worker thread. Returns words with times relative to the audio's start."""
        if not self._made:
            self._make()
        decoder = self._free.get()
        try:
            # pocketsphinx adapts its feature normalisation (cepstral mean) across utterances; a fresh front end per
            # utterance keeps one stream's audio from changing another stream's transcript (costs ~0.1 ms).
            decoder.reinit_feat()
            decoder.start_utt()
            decoder.process_raw(pcm16, full_utt=True)
            decoder.end_utt()
            words = []
            for seg in decoder.seg():
                text = seg.word.split("(")[0]  # "word(2)" is an alternate pronunciation of "word"
                if text in self._FILLERS or text.startswith("++") or text.startswith("["):
                    continue
                words.append(
                    Word(
                        text=text,
                        start=seg.start_frame / self.FRAME_RATE,
                        end=(seg.end_frame + 1) / self.FRAME_RATE,
                        confidence=float(min(1.0, np.exp(seg.prob))) if seg.prob else 1.0,
                    )
                )
            return words
        finally:
            self._free.put(decoder)


class LocalSession(SttSession):
    """Buffers each speech region's audio and decodes it when the region closes.

    Decoding runs in a worker thread as a chain of tasks (one per region, each awaiting the one before), so the
    stream keeps taking audio while a region is recognised and results still come out in order.
    """

    def __init__(self, on_transcript: OnTranscript, recognizer: LocalRecognizer) -> None:
        super().__init__(on_transcript)
        self._recognizer = recognizer
        self._region: list[np.ndarray] = []
        self._region_sent_start = 0  # sent-audio sample of the buffered region's first sample
        self._sent = 0
        self._last_task: asyncio.Task | None = None

    async def start(self) -> None:
        return None

    async def send(self, pcm16: np.ndarray) -> None:
        self._region.append(pcm16)
        self._sent += len(pcm16)

    async def finalize(self) -> None:
        if not self._region:
            return
        audio = np.concatenate(self._region)
        offset = self._region_sent_start / SAMPLE_RATE
        self._region, self._region_sent_start = [], self._sent
        self._last_task = asyncio.create_task(self._recognize(self._last_task, audio, offset))

    async def _recognize(self, previous: asyncio.Task | None, audio: np.ndarray, offset: float) -> None:
        words = await asyncio.to_thread(self._recognizer.recognize, audio.tobytes())
        if previous is not None:
            await previous
        shifted = tuple(Word(w.text, w.start + offset, w.end + offset, w.confidence) for w in words)
        await self.on_transcript(Transcript(words=shifted, is_final=True, speech_final=True))

    async def close(self) -> None:
        await self.finalize()
        if self._last_task is not None:
            await self._last_task
