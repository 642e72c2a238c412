"""Reading uploads and enrolment speech, shared by the batch, people and voice-profile routes: an upload is checked
against MAX_UPLOAD_MB, decoded to 16 kHz mono from the file Starlette spooled it to (never a bytes copy), VAD-trimmed
with the same VAD as the streams, embedded in 3 s pieces. (`upload_guard` bounds the body before it is read.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, TypeVar

import numpy as np
from fastapi import HTTPException, Request, UploadFile

from batch_threads import batch_threads
from streaming.audiofile import AudioFileError, decode_audio_file
from streaming.speaker import SAMPLE_RATE
from streaming.vad import detect_regions

ENROL_CLIP_S = 3.0  # enrolment speech is embedded in 3 s pieces: one embedding row each
T = TypeVar("T")


def _too_large(max_mb: float) -> HTTPException:
    return HTTPException(413, f"upload larger than the limit of {max_mb:g} MB")


async def read_upload(upload: UploadFile, max_mb: float) -> bytes:
    """Reads at most MAX_UPLOAD_MB (+1 byte to tell), so a huge upload is refused without being held in memory."""
    limit = int(max_mb * 1024 * 1024)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise _too_large(max_mb)
    return data


def spooled_upload(upload: UploadFile, max_mb: float) -> BinaryIO:
    """The file Starlette spooled the upload to (memory up to 1 MB, then disk), if it holds at most MAX_UPLOAD_MB;
    413 otherwise. Read it in a worker thread: on disk, its reads block."""
    size = upload.size
    if size is None:
        size = upload.file.seek(0, 2)
    if size > max_mb * 1024 * 1024:
        raise _too_large(max_mb)
    return upload.file


async def decode_in_worker(request: Request, work: Callable[..., T], *args: object) -> T:
    """`work(*args)` (blocking: decoding, VAD) in a low-priority batch thread (`batch_threads`); an AudioFileError
    becomes its HTTP status."""
    try:
        return await batch_threads(request.app.state).run(work, *args)
    except AudioFileError as exc:
        raise HTTPException(exc.status, str(exc)) from None


async def read_audio(request: Request, upload: UploadFile) -> np.ndarray:
    settings = request.app.state.settings
    source = spooled_upload(upload, settings.max_upload_mb)
    return await decode_in_worker(request, decode_audio_file, source, settings.max_upload_seconds)


def speech_only(request: Request, audio: np.ndarray) -> np.ndarray:
    """The speech of a recording, VAD-trimmed with the same VAD as everything else. Blocking."""
    st = request.app.state
    regions = detect_regions(st.vad_backend, audio, st.vad_params)
    return np.concatenate([audio[s:e] for s, e in regions]) if regions else np.zeros(0, np.float32)


async def enrolment_speech(request: Request, upload: UploadFile, min_s: float, max_s: float | None) -> np.ndarray:
    """The VAD-trimmed speech of an enrolment upload; 422 when there is less than min_s or more than max_s."""
    audio = await read_audio(request, upload)
    speech = await batch_threads(request.app.state).run(speech_only, request, audio)
    seconds = len(speech) / SAMPLE_RATE
    if seconds < min_s:
        raise HTTPException(422, f"{seconds:.1f} s of speech found; at least {min_s:g} s needed")
    if max_s is not None and seconds > max_s:
        raise HTTPException(422, f"{seconds:.1f} s of speech found; at most {max_s:g} s accepted")
    return speech


async def embed_speech(request: Request, speech: np.ndarray) -> np.ndarray:
    """(n, dim) embeddings of enrolment speech, one per ENROL_CLIP_S piece (a short tail joins the one before)."""
    step = int(ENROL_CLIP_S * SAMPLE_RATE)
    clips = [speech[i : i + step] for i in range(0, len(speech), step)]
    if len(clips) > 1 and len(clips[-1]) < step // 2:  # a short tail joins the piece before it
        clips[-2] = np.concatenate(clips[-2:])
        clips.pop()
    return await request.app.state.pool.embed_many(clips)


async def enrolment_embeddings(request: Request, upload: UploadFile, min_s: float, max_s: float | None):
    """(embeddings (n, dim), speech seconds) of an enrolment upload."""
    speech = await enrolment_speech(request, upload, min_s, max_s)
    return await embed_speech(request, speech), len(speech) / SAMPLE_RATE
