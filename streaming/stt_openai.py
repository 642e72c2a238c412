"""STT backend `openai`: any OpenAI-compatible `/v1/audio/transcriptions` server (speaches, faster-whisper-server,
vLLM, whisper.cpp's server, OpenAI itself). Each speech region goes as one WAV request when it closes (Whisper-style
models transcribe whole utterances; there are no interim results), regions are transcribed concurrently and
delivered in order, and a failed request is retried with backoff while the region's audio is held."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np

import metrics
from config import Settings
from streaming.openai_transcriber import (
    MAX_FILE_BYTES,
    WAV_HEADER_BYTES,
    OpenAiTranscriber,
    TranscriptionFailed,
    api_language,
)
from streaming.reconnect import backoff_delay
from streaming.stt import SAMPLE_RATE, OnError, OnTranscript, SttError, SttSession, Transcript, Word

log = logging.getLogger(__name__)


@dataclass
class _Region:
    """One request's audio. `audio` is dropped (None) once answered, dropped for the bound, or given up."""

    sent_start: int  # sent-clock sample of its first sample
    audio: bytes | None
    samples: int
    cut: bool = False  # cut at the upload limit: the utterance goes on in the next region
    task: asyncio.Task | None = field(default=None, repr=False)


class OpenAiSession(SttSession):
    """One per stream. `send` collects the open region; `finalize` starts its request (a task per region, each
    waiting for the one before it to deliver, so results stay in order while requests overlap).

    Failures: network errors, timeouts, 5xx, 408 and 429 are retried with backoff (`STT_RECONNECT_BASE_S` doubling
    to `STT_RECONNECT_MAX_S`, at least the server's Retry-After); after `STT_RECONNECT_MAX_FAILURES` failed tries of
    one region the session gives up (`check()` raises SttError: the stream ends with `stt_unavailable`). 401, 403
    and 404 (key, URL or model wrong) give up at once; any other 4xx skips that region with an `stt_rejected`
    event. Speech waiting for an answer is held up to `STT_REPLAY_BUFFER_S` (besides the open region); beyond it the
    oldest waiting region is dropped, counted, and the client gets `stt_buffer_full` once per outage.
    """

    def __init__(self, on_transcript: OnTranscript, settings: Settings, language: str,
                 transcriber: OpenAiTranscriber, on_error: OnError | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
        super().__init__(on_transcript, on_error)
        self._settings = settings
        self._language = api_language(language)
        self._transcriber = transcriber
        self._limit_samples = max(1, int(settings.stt_replay_buffer_s * SAMPLE_RATE))
        self._max_region_samples = max(1, (max_file_bytes - WAV_HEADER_BYTES) // 2)
        self._open: list[np.ndarray] = []
        self._open_samples = 0
        self._open_start = 0
        self._sent = 0
        self._waiting: list[_Region] = []  # finalized, not yet answered (oldest first)
        self._tasks: set[asyncio.Task] = set()
        self._last_task: asyncio.Task | None = None
        self._failed: SttError | None = None
        self._overflow_reported = False
        self._closing = False

    # -- the SttSession interface ------------------------------------------------------------------------------

    async def start(self) -> None:
        return None  # nothing to open: requests go out per region on the shared client

    def check(self) -> None:
        if self._failed is not None:
            raise self._failed

    async def send(self, pcm16: np.ndarray) -> None:
        self.check()
        while len(pcm16):
            room = self._max_region_samples - self._open_samples
            if room <= 0:  # the upload limit: this part goes now, the utterance continues in the next request
                self._submit(cut=True)
                continue
            part, pcm16 = pcm16[:room], pcm16[room:]
            self._open.append(part)
            self._open_samples += len(part)
            self._sent += len(part)
        await self._enforce_limit()

    async def finalize(self) -> None:
        self.check()
        self._submit(cut=False)
        await self._enforce_limit()

    async def close(self) -> None:
        if self._failed is None:
            self._submit(cut=False)
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=self._settings.stt_close_wait_s)
        self._closing = True
        left = [t for t in self._tasks if not t.done()]
        lost_s = self._held_samples() / SAMPLE_RATE
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
        if lost_s and self._failed is None:
            metrics.inc("stt_lost_seconds_total", lost_s)
            log.error("stream ended with %.1f s of speech still unanswered by the transcription server", lost_s)

    # -- regions -----------------------------------------------------------------------------------------------

    def _submit(self, cut: bool) -> None:
        if not self._open:
            return
        audio = np.concatenate(self._open).astype("<i2", copy=False).tobytes()
        region = _Region(self._open_start, audio, self._open_samples, cut=cut)
        self._open, self._open_samples, self._open_start = [], 0, self._sent
        self._waiting.append(region)
        region.task = asyncio.create_task(self._run(region, self._last_task), name="openai-stt-region")
        self._last_task = region.task
        self._tasks.add(region.task)
        region.task.add_done_callback(self._tasks.discard)

    def _held_samples(self) -> int:
        return sum(r.samples for r in self._waiting)

    async def _enforce_limit(self) -> None:
        """Waiting speech over the limit: the oldest waiting region goes (cancelled, counted, told once)."""
        while self._waiting and self._held_samples() + self._open_samples > self._limit_samples:
            region = self._waiting[0]
            self._forget(region)
            if region.task is not None:
                region.task.cancel()
            lost_s = region.samples / SAMPLE_RATE
            metrics.inc("stt_buffer_overflow_seconds_total", lost_s)
            log.error("transcription backlog over %.0f s of speech: %.2f s dropped untranscribed",
                      self._settings.stt_replay_buffer_s, lost_s)
            if not self._overflow_reported and self.on_error is not None:
                self._overflow_reported = True
                await self.on_error("stt_buffer_full", "speech-to-text has been failing for over "
                                    f"{self._settings.stt_replay_buffer_s:.0f} s of speech: the oldest speech is "
                                    "not transcribed")

    def _forget(self, region: _Region) -> None:
        region.audio = None
        with contextlib.suppress(ValueError):
            self._waiting.remove(region)

    async def _run(self, region: _Region, previous: asyncio.Task | None) -> None:
        words = await self._transcribe(region)
        if previous is not None:  # in order: the region before delivers first (a dropped one just ends)
            await asyncio.wait({previous})
        if words is None or self._closing:
            return
        offset = region.sent_start / SAMPLE_RATE
        shifted = tuple(Word(w.text, w.start + offset, w.end + offset, w.confidence) for w in words)
        try:
            await self.on_transcript(Transcript(words=shifted, is_final=True, speech_final=not region.cut))
        except Exception:  # a bug downstream must not look like a failed request
            log.exception("transcript handler failed")

    async def _transcribe(self, region: _Region) -> list[Word] | None:
        """The region's words (times from its start), or None when it is skipped or the session gave up."""
        s = self._settings
        failures = 0
        while region.audio is not None and self._failed is None:
            try:
                words = await self._transcriber.transcribe(region.audio, self._language)
            except TranscriptionFailed as exc:
                if exc.kind == "refused":
                    self._give_up(f"the speech-to-text service refused the request ({exc.reason})")
                    return None
                if exc.kind == "rejected":
                    self._forget(region)
                    if self.on_error is not None:
                        await self.on_error("stt_rejected", f"speech-to-text refused {region.samples / SAMPLE_RATE:.1f}"
                                            f" s of speech ({exc.reason}); it is not transcribed")
                    return None
                failures += 1
                metrics.inc("stt_reconnect_failures_total")
                if failures >= s.stt_reconnect_max_failures:
                    self._give_up(f"the speech-to-text service failed {failures} times in a row ({exc.reason})")
                    return None
                delay = backoff_delay(failures - 1, s.stt_reconnect_base_s, s.stt_reconnect_max_s)
                delay = max(delay, exc.retry_after_s or 0.0)
                log.warning("transcription of %.1f s failed (%s, try %d); retrying in %.2f s",
                            region.samples / SAMPLE_RATE, exc.reason, failures, delay)
                await asyncio.sleep(delay)
                continue
            self._forget(region)
            if failures:
                metrics.inc("stt_reconnects_total")
                metrics.inc("stt_replayed_seconds_total", failures * region.samples / SAMPLE_RATE)
            self._overflow_reported = False  # the service answers again: a later overflow is a new outage
            return words
        return None

    def _give_up(self, message: str) -> None:
        if self._failed is not None:
            return
        self._failed = SttError(message)
        lost_s = self._held_samples() / SAMPLE_RATE
        metrics.inc("stt_gave_up_total")
        metrics.inc("stt_lost_seconds_total", lost_s)
        log.error("giving up on the transcription server: %s; %.1f s of speech not transcribed", message, lost_s)
        for region in list(self._waiting):
            self._forget(region)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
