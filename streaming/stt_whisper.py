"""STT backend `whisper`: faster-whisper (CTranslate2) in this process, on the GPU when there is one.

`WhisperRecognizer` (one per process) owns the model and one `BatchingWorker` (streaming/batching.py, the model
pool's batcher): each closed speech region of every stream is a request, and the worker runs up to
WHISPER_BATCH_SIZE regions through faster-whisper's batched pipeline (`BatchedInferencePipeline.forward`: one encoder
call and one beam search for the whole batch, then word alignment) as soon as a batch fills or WHISPER_MAX_WAIT_MS
after the first region. `WhisperSession` (one per connection) buffers a region, submits it when it closes and
delivers results in region order, words on the sent-audio clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config import Settings
from streaming.batching import BatchingWorker, ItemFailed, PoolSaturated
from streaming.model_source import hub_cache_dir, hub_offline, looks_like_local_path, redactor, split_revision
from streaming.stt import SAMPLE_RATE, OnError, OnTranscript, SttSession, Transcript, Word

log = logging.getLogger(__name__)

CHUNK_S = 30  # Whisper's window: a longer region is cut into pieces of this length (each piece one batch item)
# Each batch item gets its own time base this far apart. faster-whisper carries `last_speech_timestamp` from one
# batch item to the next (its "first word after a pause" rule); with every item at least this far after the
# previous one's speech, that rule sees a pause before every region, alone or batched, so a region's words never
# depend on its batch mates.
ITEM_SPACING_S = 1000.0
# faster-whisper's own silence rule (WhisperModel.transcribe): a region the model thinks is no speech, and that it
# decoded with low confidence, gives no words (Whisper invents "Thank you." on noise otherwise).
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
LOAD_RETRY_AFTER_S = 30.0  # after a failed load, regions fail at once for this long, then the next one retries


@dataclass(frozen=True, slots=True)
class RegionItem:
    """One batch item: at most CHUNK_S seconds of float32 16 kHz audio and its language (None: detect)."""

    audio: np.ndarray
    language: str | None


def whisper_language(language: str) -> str | None:
    """The stream's language parameter ("en", "en-US", "multi") as Whisper's code; None: let the model detect it."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    code = language.strip().lower().split("-")[0].split("_")[0]
    return code if code in _LANGUAGE_CODES else None


def resolve_device(model_device: str) -> str:
    """MODEL_DEVICE for CTranslate2: auto is cuda when CTranslate2 sees a GPU (no torch import needed)."""
    if model_device != "auto":
        return model_device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resolve_compute_type(compute_type: str, device: str) -> str:
    """WHISPER_COMPUTE_TYPE auto: int8 on CPU (CTranslate2's fastest there), float16 on CUDA."""
    if compute_type != "auto":
        return compute_type
    return "float16" if device == "cuda" else "int8"


def model_path(source: str, cache_dir: str | Path | None, token: str | None) -> str:
    """WHISPER_MODEL as a directory: a local directory as it is; a Hugging Face id ("Systran/faster-whisper-small",
    optionally "@revision") or a faster-whisper size name ("small") from the hub cache `cache_dir`, downloaded once
    unless HF_HUB_OFFLINE is set. Raises ValueError for a local path that is not there, RuntimeError when the hub
    fails (the message never holds the token)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ValueError(f"whisper model directory {source!r} has no model.bin (a CTranslate2 conversion)")
        return str(path)
    if looks_like_local_path(source):
        raise ValueError(f"whisper model directory {source!r} not found")
    from faster_whisper.utils import download_model

    repo, revision = split_revision(source)
    try:
        return download_model(repo, local_files_only=hub_offline(), revision=revision, use_auth_token=token or None,
                              cache_dir=str(hub_cache_dir(cache_dir)) if cache_dir else None)
    except Exception as e:
        raise RuntimeError(f"whisper model {source!r} could not be fetched: "
                           f"{redactor(token)(str(e) or type(e).__name__)}") from None


class WhisperRecognizer:
    """Process-wide: the model and its batching worker; holds no per-stream state (each request carries its audio,
    language and future). Loaded at construction, or by the first batch with LAZY_MODELS (in the worker thread)."""

    def __init__(self, settings: Settings, lazy: bool | None = None) -> None:
        self._settings = settings
        self.device = resolve_device(settings.model_device)
        self.compute_type = resolve_compute_type(settings.whisper_compute_type, self.device)
        self.beam_size = settings.whisper_beam_size
        self._model: Any = None
        self._pipeline: Any = None
        self._load_lock = threading.Lock()
        self._loading = False
        self._load_error: str | None = None
        self._load_failed_at = 0.0
        self._worker: BatchingWorker[RegionItem, list[Word]] = BatchingWorker(
            "whisper", self._batch, settings.whisper_batch_size, settings.whisper_max_wait_ms,
            settings.pool_queue_size)
        if not (settings.lazy_models if lazy is None else lazy):
            self.load()
        self._worker.start()

    # --- model -----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: loads the model once (a later call after a failure retries after LOAD_RETRY_AFTER_S)."""
        with self._load_lock:
            if self._model is not None:
                return
            if self._load_error is not None and time.monotonic() - self._load_failed_at < LOAD_RETRY_AFTER_S:
                raise RuntimeError(f"whisper model is not available: {self._load_error}")
            s = self._settings
            token = s.huggingface_token.get_secret_value() if s.huggingface_token else None
            self._loading = True
            started = time.monotonic()
            try:
                from faster_whisper import BatchedInferencePipeline, WhisperModel

                path = model_path(s.whisper_model, s.model_cache_dir, token)
                model = WhisperModel(path, device=self.device, compute_type=self.compute_type,
                                     cpu_threads=s.whisper_cpu_threads or (os.cpu_count() or 1))
            except Exception as e:
                self._load_error = redactor(token)(str(e) or type(e).__name__)
                self._load_failed_at = time.monotonic()
                log.error("whisper model %s failed to load: %s", s.whisper_model, self._load_error)
                raise
            finally:
                self._loading = False
            self._model, self._pipeline = model, BatchedInferencePipeline(model)
            self._load_error = None
            log.info("whisper model ready: %s on %s (%s, multilingual %s) in %.1f s", s.whisper_model, self.device,
                     self.compute_type, model.model.is_multilingual, time.monotonic() - started)

    @property
    def status(self) -> str:
        """"ready", "loading", "lazy", "failed: <error>" (for LOAD_RETRY_AFTER_S), "lazy, last load failed: ..."."""
        if self._model is not None:
            return "ready"
        if self._loading:
            return "loading"
        if self._load_error is None:
            return "lazy"
        if time.monotonic() - self._load_failed_at < LOAD_RETRY_AFTER_S:
            return f"failed: {self._load_error}"
        return f"lazy, last load failed: {self._load_error}"

    def stats(self) -> dict[str, Any]:
        return {"model": self.status, **self._worker.stats()}

    def close(self) -> None:
        self._worker.stop()

    # --- requests (event loop) -------------------------------------------------------------------------------

    async def transcribe(self, audio: np.ndarray, language: str | None) -> list[Word]:
        """One region (float32 16 kHz, any length) batched with every stream's; words in seconds from its start.
        Raises PoolSaturated when the queue is full, PoolClosed after `close()`, or the model's error."""
        step = CHUNK_S * SAMPLE_RATE
        pieces = [RegionItem(audio[i : i + step], language) for i in range(0, max(len(audio), 1), step)]
        results = await self._worker.submit_many(pieces)
        return [Word(w.text, w.start + k * CHUNK_S, w.end + k * CHUNK_S, w.confidence)
                for k, words in enumerate(results) for w in words]

    # --- the batch (worker thread) ---------------------------------------------------------------------------

    def transcribe_batch(self, items: Sequence[RegionItem]) -> list[list[Word] | ItemFailed]:
        """Blocking: each item's words (seconds from the item's start). Items of one language are one model call
        (the prompt holds the language); an item that cannot be read fails alone."""
        self.load()
        results: list[list[Word] | ItemFailed] = [[] for _ in items]
        groups: dict[str | None, list[int]] = {}
        for i, item in enumerate(items):
            if item.audio.ndim != 1 or len(item.audio) > CHUNK_S * SAMPLE_RATE:
                results[i] = ItemFailed(ValueError(f"whisper item: {item.audio.shape} is not 1-D audio of at most "
                                                   f"{CHUNK_S} s"))
            elif len(item.audio):
                language = item.language if self._model.model.is_multilingual else "en"
                groups.setdefault(language, []).append(i)
        for language, indices in groups.items():
            for i, words in zip(indices, self._forward([items[i].audio for i in indices], language), strict=True):
                results[i] = words
        return results

    _batch = transcribe_batch  # the worker's batch_fn

    def _forward(self, audios: list[np.ndarray], language: str | None) -> list[list[Word]]:
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import TranscriptionOptions, get_suppressed_tokens

        model = self._model
        multilingual = bool(model.model.is_multilingual)
        # detect: the batched pipeline's per-item language detection replaces the prompt's language token
        tokenizer = Tokenizer(model.hf_tokenizer, multilingual, task="transcribe", language=language or "en")
        features = np.stack([pad_or_trim(model.feature_extractor(a)[..., :-1]) for a in audios])
        metadata = [{"offset": (k + 1) * ITEM_SPACING_S, "duration": len(a) / SAMPLE_RATE}
                    for k, a in enumerate(audios)]
        options = TranscriptionOptions(
            beam_size=self.beam_size, best_of=5, patience=1.0, length_penalty=1.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, log_prob_threshold=LOG_PROB_THRESHOLD, no_speech_threshold=NO_SPEECH_THRESHOLD,
            compression_ratio_threshold=2.4, condition_on_previous_text=False, prompt_reset_on_temperature=0.5,
            temperatures=[0.0], initial_prompt=None, prefix=None, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]), without_timestamps=True,
            max_initial_timestamp=0.0, word_timestamps=True, prepend_punctuations="\"'“¿([{-",
            append_punctuations="\"'.。,，!！?？:：”)]}、", multilingual=multilingual and language is None,
            max_new_tokens=None, clip_timestamps=[], hallucination_silence_threshold=None, hotwords=None)
        self._pipeline.last_speech_timestamp = 0.0
        outputs = self._pipeline.forward(features, tokenizer, metadata, options)
        results = []
        for k, segments in enumerate(outputs):
            offset, duration = (k + 1) * ITEM_SPACING_S, metadata[k]["duration"]
            words = []
            for seg in segments:
                if seg["no_speech_prob"] > NO_SPEECH_THRESHOLD and seg["avg_logprob"] < LOG_PROB_THRESHOLD:
                    continue
                for w in seg.get("words") or ():
                    text = w["word"].strip()
                    if text:
                        # alignment runs over whole seconds: clamp into the item's audio
                        start = min(max(w["start"] - offset, 0.0), duration)
                        end = min(max(w["end"] - offset, start), duration)
                        words.append(Word(text, round(float(start), 3), round(float(end), 3), float(w["probability"])))
            results.append(words)
        return results


class WhisperSession(SttSession):
    """Buffers each speech region and submits it to the shared recognizer when it closes. One task per region,
    each awaiting the one before it before delivering, so results come out in region order while regions of this
    and every other stream are decoded together. A region that fails (queue full, model error) gives no words and
    one `stt_failed` error event; the stream goes on."""

    def __init__(self, on_transcript: OnTranscript, recognizer: WhisperRecognizer, language: str,
                 on_error: OnError | None = None) -> None:
        super().__init__(on_transcript, on_error)
        self._recognizer = recognizer
        self._language = whisper_language(language)
        self._region: list[np.ndarray] = []
        self._region_sent_start = 0  # sent-audio sample of the buffered region's first sample
        self._sent = 0
        self._last_task: asyncio.Task | None = None
        self._error_reported = False

    async def start(self) -> None:
        return None

    async def send(self, pcm16: np.ndarray) -> None:
        self._region.append(pcm16)
        self._sent += len(pcm16)

    async def finalize(self) -> None:
        if not self._region:
            return
        audio = np.concatenate(self._region).astype(np.float32) / 32768.0
        offset = self._region_sent_start / SAMPLE_RATE
        self._region, self._region_sent_start = [], self._sent
        self._last_task = asyncio.create_task(self._recognize(self._last_task, audio, offset))

    async def _recognize(self, previous: asyncio.Task | None, audio: np.ndarray, offset: float) -> None:
        try:
            words = await self._recognizer.transcribe(audio, self._language)
        except Exception as exc:
            words = None
            log.warning("whisper: a %.1f s region failed: %s", len(audio) / SAMPLE_RATE,
                        "queue full" if isinstance(exc, PoolSaturated) else repr(exc))
        if previous is not None:
            await previous
        if words is None:
            if not self._error_reported and self.on_error is not None:
                self._error_reported = True
                await self.on_error("stt_failed", "speech-to-text failed for a speech region; its words are lost")
            return
        shifted = tuple(Word(w.text, w.start + offset, w.end + offset, w.confidence) for w in words)
        await self.on_transcript(Transcript(words=shifted, is_final=True, speech_final=True))

    async def close(self) -> None:
        await self.finalize()
        if self._last_task is not None:
            await self._last_task
