"""One request to an OpenAI-compatible `POST {OPENAI_STT_URL}/audio/transcriptions`: a speech region as a WAV in,
words with times out. Process-wide (one per `SttFactory`): one pooled `httpx.AsyncClient` and a cap on requests in
flight (`OPENAI_STT_MAX_CONCURRENT`), so a slow server cannot make the process hold unbounded sockets.

Servers differ in where they put word times (OpenAI, speaches and faster-whisper-server: top-level `words`;
whisper.cpp's server: `segments[].words`; some only give segments): `words_from_verbose_json` reads all three.
Failures are sorted for the session's retry policy (`TranscriptionFailed.kind`). The API key goes in the
Authorization header only, and is cut out of any server text before it is logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging
import time
import wave
from typing import Any, Literal

import httpx

from config import Settings
from streaming.stt import SAMPLE_RATE, Word

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 25 * 1024 * 1024  # OpenAI refuses larger uploads (413)
WAV_HEADER_BYTES = 44
MAX_RETRY_AFTER_S = 60.0  # a server's Retry-After beyond this is not believed (the session gives up in time)
RETRYABLE_STATUSES = {408, 409, 425, 429}  # and every 5xx
LASTING_STATUSES = {401, 403, 404}  # the key, the URL or the model is wrong: every region would fail the same way

FailureKind = Literal["retry", "rejected", "refused"]


class TranscriptionFailed(Exception):
    """`kind`: `retry` (network error, timeout, 5xx, 408, 429, an answer that is not verbose_json: try again),
    `rejected` (this region was refused, e.g. 400/413/415: trying again cannot help, later regions may pass),
    `refused` (401/403/404: the configuration is wrong, no region can pass). `reason` is safe for a client."""

    def __init__(self, kind: FailureKind, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retry_after_s = retry_after_s


def wav_bytes(pcm16: bytes) -> bytes:
    """16 kHz mono 16-bit PCM as a WAV file (a header and a copy: cheap enough for the event loop at 30 s)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm16)
    return out.getvalue()


def api_language(language: str) -> str | None:
    """Omi's language ("en", "en-US", "multi") as the API's ISO-639-1 code; None lets the server detect it."""
    primary = language.split("-")[0].lower()
    if primary in ("multi", "auto") or not primary.isalpha() or len(primary) not in (2, 3):
        return None
    return primary


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped at MAX_RETRY_AFTER_S; None if absent or odd."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _spread(text: str, start: float, end: float) -> list[Word]:
    """A server that gave no word times: the text's words share the span evenly (times approximate)."""
    tokens = text.split()
    if not tokens:
        return []
    step = max(end - start, 0.0) / len(tokens)
    return [Word(t, start + i * step, start + (i + 1) * step) for i, t in enumerate(tokens)]


def _timed_words(items: Any) -> list[Word] | None:
    if not isinstance(items, list):
        return None
    words = []
    for item in items:
        if not isinstance(item, dict):
            continue
        text = item.get("word", item.get("text"))
        start, end = _number(item.get("start")), _number(item.get("end"))
        if not isinstance(text, str) or not text.strip() or start is None or end is None:
            continue
        confidence = _number(item.get("probability"))
        words.append(Word(text.strip(), start, end, 1.0 if confidence is None else min(max(confidence, 0.0), 1.0)))
    return words


def words_from_verbose_json(body: Any, duration_s: float) -> list[Word]:
    """Words on the region's own clock (0 = its first sample), clamped to the audio sent, in time order.
    Raises ValueError when the body is not a transcription at all."""
    if not isinstance(body, dict) or not isinstance(body.get("text", ""), str):
        raise ValueError("not a verbose_json transcription")
    words = _timed_words(body.get("words"))
    segments = body.get("segments") if isinstance(body.get("segments"), list) else []
    if not words:
        words = [w for seg in segments if isinstance(seg, dict) for w in (_timed_words(seg.get("words")) or [])]
    if not words:
        words = []
        for seg in segments:
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                start, end = _number(seg.get("start")) or 0.0, _number(seg.get("end")) or duration_s
                words += _spread(seg["text"], start, end)
    if not words and "words" not in body and not segments:
        words = _spread(body.get("text", ""), 0.0, duration_s)
    clamped = []
    for w in sorted(words, key=lambda w: w.start):
        start = min(max(w.start, 0.0), duration_s)
        clamped.append(Word(w.text, start, min(max(w.end, start), duration_s), w.confidence))
    return clamped


class OpenAiTranscriber:
    """Shared by every stream of the process. The client and the semaphore are made on first use, on the event
    loop (the factory is built in a worker thread at start-up)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.openai_stt_url:
            raise ValueError("STT_BACKEND=openai needs OPENAI_STT_URL")
        self.url = settings.openai_stt_url.rstrip("/") + "/audio/transcriptions"
        self._key = settings.openai_stt_api_key.get_secret_value() if settings.openai_stt_api_key else ""
        self._model = settings.openai_stt_model
        self._prompt = settings.openai_stt_prompt
        self._timeout_s = settings.openai_stt_timeout_s
        self._max_concurrent = settings.openai_stt_max_concurrent
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self.requests = 0  # sent, retries included

    def _ensure_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._client is None or self._slots is None:
            limits = httpx.Limits(max_connections=self._max_concurrent, max_keepalive_connections=self._max_concurrent)
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            self._client = httpx.AsyncClient(timeout=self._timeout_s, limits=limits, headers=headers)
            self._slots = asyncio.Semaphore(self._max_concurrent)
        return self._client, self._slots

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _form(self, language: str | None) -> dict[str, str]:
        form = {"model": self._model, "response_format": "verbose_json", "timestamp_granularities[]": "word",
                "temperature": "0"}
        if language:
            form["language"] = language
        if self._prompt:
            form["prompt"] = self._prompt
        return form

    async def transcribe(self, pcm16: bytes, language: str | None) -> list[Word]:
        """Words of one region (times from its start). Raises TranscriptionFailed."""
        client, slots = self._ensure_client()
        duration_s = len(pcm16) / 2 / SAMPLE_RATE
        files = {"file": ("speech.wav", wav_bytes(pcm16), "audio/wav")}
        async with slots:
            self.requests += 1
            try:
                response = await client.post(self.url, data=self._form(language), files=files)
            except httpx.TimeoutException:
                raise TranscriptionFailed("retry", f"no answer in {self._timeout_s:g} s") from None
            except httpx.HTTPError as exc:  # connection refused or dropped: the message never holds the key
                raise TranscriptionFailed("retry", f"connection failed ({type(exc).__name__})") from None
        return self._words(response, duration_s)

    def _words(self, response: httpx.Response, duration_s: float) -> list[Word]:
        status = response.status_code
        if status == 200:
            try:
                return words_from_verbose_json(response.json(), duration_s)
            except ValueError:
                raise TranscriptionFailed("retry", "the answer was not verbose_json") from None
        detail = self.redact(_error_message(response))
        log.warning("transcription request answered HTTP %d: %s", status, detail)
        reason = f"HTTP {status}"
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise TranscriptionFailed("retry", reason, retry_after_seconds(response.headers.get("retry-after")))
        if status in LASTING_STATUSES:
            raise TranscriptionFailed("refused", reason)
        raise TranscriptionFailed("rejected", reason)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _error_message(response: httpx.Response) -> str:
    """The server's own words for a refusal (OpenAI: {"error": {"message"}}; FastAPI servers: {"detail"}), short."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:300]
        if isinstance(body.get("detail"), str):
            return body["detail"][:300]
    return str(body)[:200]
