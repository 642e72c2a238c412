"""An OpenAI-protocol transcription server (``POST /v1/audio/transcriptions``) on a free loopback port, in its own
thread, for the `openai` STT backend's tests: real HTTP, real multipart, real speech recognition.

It parses the multipart request as OpenAI does and refuses what OpenAI refuses with OpenAI's JSON error shape
(``{"error": {"message", "type", "param", "code"}}``): a wrong or missing key (401; the message repeats the key it
was sent, worse than OpenAI's masked echo, so a client that logs error bodies is caught), no file or no model (400),
an unknown model (404), an unknown response_format, timestamp_granularities without verbose_json, a language that
is not ISO-639-1, a file that is not audio or is shorter than 0.1 s (400), over 25 MB (413). A valid request is
transcribed by pocketsphinx (`LocalRecognizer`) on the uploaded audio, so the words and their times come from the
audio that really arrived, and the answer has OpenAI's verbose_json shape (``task, language, duration, text``,
``words: [{word, start, end}]`` with word granularity, ``segments`` with segment granularity or none given).

Every request is recorded (:class:`TranscriptionRequest`: fields, file, decoded audio, the answer) before it is
answered. Faults are scripted per request in arrival order (:meth:`script`, then :attr:`default` for the rest):
an error status with an optional Retry-After, a delay, or a dropped connection (headers sent, then the socket
closed with no body).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import uvicorn
from server_process import free_port
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from streaming.stt_local import LocalRecognizer

PATH = "/v1/audio/transcriptions"
MAX_FILE_BYTES = 25 * 1024 * 1024
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "nl": "dutch"}
SR = 16000


@dataclass(frozen=True)
class Fault:
    """What to do with one request instead of (or before) transcribing it."""

    status: int | None = None  # answer this status with an OpenAI error body
    retry_after: str | None = None  # with `status`: a Retry-After header
    delay_s: float = 0.0  # hold the answer this long first (then answer normally, or with `status`)
    drop: bool = False  # send the response headers, then close the connection without the body


OK = Fault()


@dataclass
class TranscriptionRequest:
    at: float
    headers: dict[str, str]
    fields: dict[str, list[str]]  # form fields other than the file, in order, repeated ones as lists
    filename: str | None = None
    file_content_type: str | None = None
    file_bytes: int = 0
    sample_rate: int | None = None
    channels: int | None = None
    subtype: str | None = None  # soundfile's name: PCM_16 for 16-bit WAV
    pcm: bytes = b""  # the audio as int16 mono (what was recognised)
    status: int | None = None  # the answer
    answer: Any = None  # the JSON answered (or the error body)
    done_at: float | None = None

    def value(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _decode(data: bytes) -> tuple[int, int, str, np.ndarray] | None:
    """(sample rate, channels, subtype, int16 mono at 16 kHz) of an audio file, or None if it is not one."""
    try:
        info = sf.info(io.BytesIO(data))
        audio, sr = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    except Exception:
        return None
    mono = audio.mean(axis=1).astype(np.int16) if audio.shape[1] > 1 else audio[:, 0]
    if sr != SR:  # a real server resamples; pocketsphinx needs 16 kHz
        positions = np.arange(0, len(mono) * SR / sr) * sr / SR
        mono = np.interp(positions, np.arange(len(mono)), mono).astype(np.int16)
    return sr, info.channels, info.subtype, mono


_recognizer: LocalRecognizer | None = None
_recognizer_lock = threading.Lock()


def _shared_recognizer() -> LocalRecognizer:
    global _recognizer
    with _recognizer_lock:
        if _recognizer is None:
            _recognizer = LocalRecognizer(decoders=2, lazy=True)
        return _recognizer


class OpenAISttTestServer:
    """``with OpenAISttTestServer(api_key=...) as srv:`` starts it (uvicorn in a daemon thread), stops it after."""

    def __init__(self, api_key: str | None = "sk-test-stt", models: tuple[str, ...] = ("whisper-1",)) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.models = models
        self.default = OK
        self._faults: deque[Fault] = deque()
        self._requests: list[TranscriptionRequest] = []
        self._lock = threading.Lock()
        self._cache: dict[str, list[dict[str, Any]]] = {}  # audio hash -> words (a retried region decodes once)
        config = uvicorn.Config(self._asgi, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off",
                                interface="asgi3",
                                ws="none", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="openai-stt-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[TranscriptionRequest]:
        with self._lock:
            return list(self._requests)

    def script(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def wait_for(self, predicate, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)

    def recognize(self, pcm: bytes) -> list[dict[str, Any]]:
        """OpenAI-shaped words ({word, start, end}) of int16 mono 16 kHz audio, by pocketsphinx (cached by audio)."""
        key = hashlib.sha1(pcm).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = [{"word": w.text, "start": round(w.start, 2), "end": round(w.end, 2)}
                      for w in _shared_recognizer().recognize(pcm)]
            with self._lock:
                self._cache[key] = cached
        return [dict(w) for w in cached]

    # -- ASGI ------------------------------------------------------------------------------------------------------

    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != PATH or scope["method"] != "POST":
            await JSONResponse({"error": {"message": "not found", "type": "invalid_request_error"}},
                               status_code=404)(scope, receive, send)
            return
        request = Request(scope, receive)
        with self._lock:
            fault = self._faults.popleft() if self._faults else self.default
        record = TranscriptionRequest(time.monotonic(), dict(request.headers), {})
        with self._lock:
            self._requests.append(record)
        response = await self._answer(request, record, fault)
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        record.done_at = time.monotonic()
        if fault.drop:
            record.status = None
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
            raise ConnectionAbortedError("scripted drop")  # uvicorn closes the socket mid-response
        await response(scope, receive, send)

    async def _answer(self, request: Request, record: TranscriptionRequest, fault: Fault) -> Response:
        response = await self._transcription(request, record, fault)
        record.status = response.status_code
        if isinstance(response, JSONResponse):
            record.answer = json.loads(response.body)
        return response

    async def _transcription(self, request: Request, record: TranscriptionRequest, fault: Fault) -> Response:
        sent_auth = request.headers.get("authorization", "")
        if self.api_key is not None and sent_auth != f"Bearer {self.api_key}":
            given = sent_auth.removeprefix("Bearer ") or "none"
            return _error(401, f"Incorrect API key provided: {given}. You can find your API key at "
                          "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(400, "Invalid Content-Type header, expected multipart/form-data")
        try:
            form = await request.form(max_part_size=MAX_FILE_BYTES + 1024 * 1024)
        except Exception as exc:
            return _error(400, f"Could not parse multipart form: {type(exc).__name__}")
        upload = None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "file":
                    upload = value
            else:
                record.fields.setdefault(name, []).append(value)
        data = await upload.read() if upload is not None else b""
        if upload is not None:
            record.filename, record.file_content_type = upload.filename, upload.content_type
            record.file_bytes = len(data)
        decoded = _decode(data) if upload is not None and len(data) <= MAX_FILE_BYTES else None
        if decoded is not None:
            record.sample_rate, record.channels, record.subtype, mono = decoded
            record.pcm = mono.tobytes()
        if fault.drop:  # the request was read; the answer never comes
            return Response(status_code=200)
        if fault.status is not None:  # a scripted failure, after the request was read (as a real server's would be)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            kind = "server_error" if fault.status >= 500 else "invalid_request_error"
            return _error(fault.status, f"scripted failure {fault.status}", kind=kind, headers=headers)
        if upload is None:
            return _error(400, "Missing required parameter: 'file'.", param="file")
        model = record.value("model")
        if not model:
            return _error(400, "Missing required parameter: 'model'.", param="model")
        if model not in self.models:
            return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          code="model_not_found")
        response_format = record.value("response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            return _error(400, f"'{response_format}' is not one of {list(RESPONSE_FORMATS)} - 'response_format'",
                          param="response_format")
        granularities = record.fields.get("timestamp_granularities[]", [])
        if any(g not in ("word", "segment") for g in granularities):
            return _error(400, "timestamp_granularities[] must be 'word' or 'segment'",
                          param="timestamp_granularities")
        if granularities and response_format != "verbose_json":
            return _error(400, "timestamp_granularities is only supported with response_format=verbose_json",
                          param="timestamp_granularities")
        language = record.value("language")
        if language is not None and not (len(language) == 2 and language.isalpha() and language.islower()):
            return _error(400, f"Invalid language '{language}'. Language parameter must be specified in ISO-639-1 "
                          "format.", param="language")
        temperature = record.value("temperature")
        if temperature is not None:
            try:
                if not 0.0 <= float(temperature) <= 1.0:
                    raise ValueError
            except ValueError:
                return _error(400, "temperature must be a number between 0 and 1", param="temperature")
        if len(data) > MAX_FILE_BYTES:
            return _error(413, f"Maximum content size limit ({MAX_FILE_BYTES}) exceeded ({len(data)} bytes read)",
                          kind="server_error")
        extension = (upload.filename or "").rsplit(".", 1)[-1].lower()
        if extension not in FORMATS or decoded is None:
            return _error(400, f"Invalid file format. Supported formats: {list(FORMATS)}", param="file")
        duration = len(record.pcm) / 2 / SR
        if duration < 0.1:
            return _error(400, "Audio file is too short. Minimum audio length is 0.1 seconds.", param="file",
                          code="audio_too_short")
        words = await asyncio.to_thread(self.recognize, record.pcm)
        text = " ".join(w["word"] for w in words)
        if response_format == "text":
            return PlainTextResponse(text + "\n")
        if response_format != "verbose_json":
            return JSONResponse({"text": text})
        body: dict[str, Any] = {"task": "transcribe", "language": LANGUAGE_NAMES.get(language or "en", "english"),
                                "duration": round(duration, 2), "text": text}
        if "word" in granularities:
            body["words"] = words
        if "segment" in granularities or not granularities:
            body["segments"] = [{"id": 0, "seek": 0, "start": words[0]["start"] if words else 0.0,
                                 "end": words[-1]["end"] if words else round(duration, 2), "text": " " + text,
                                 "tokens": [], "temperature": float(temperature or 0.0), "avg_logprob": -0.3,
                                 "compression_ratio": 1.2, "no_speech_prob": 0.01}]
        return JSONResponse(body)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> OpenAISttTestServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI STT test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> OpenAISttTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

