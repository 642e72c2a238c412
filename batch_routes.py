"""Batch REST endpoints (wire-compatible with Omi's Modal functions). `/v1/vad` runs the streaming VAD code over a
whole upload. Speaker identification and profiles come with the speaker issue."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Request, UploadFile
from pydantic import BaseModel

from streaming.audiofile import AudioFileError, decode_audio_file
from streaming.pipeline import speech_regions

router = APIRouter()


class SpeechRegion(BaseModel):
    start: float
    end: float
    duration: float


async def read_upload(upload: UploadFile, max_mb: float) -> bytes:
    """Reads at most MAX_UPLOAD_MB (+1 byte to tell), so a huge upload is refused without being held in memory."""
    limit = int(max_mb * 1024 * 1024)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than the limit of {max_mb:g} MB")
    return data


@router.post("/v1/vad", response_model=list[SpeechRegion], summary="Speech regions of an audio file")
async def vad(request: Request, file: Annotated[UploadFile, File(description="audio: WAV, FLAC, OGG, MP3, M4A...")]):
    state = request.app.state
    settings = state.settings
    data = await read_upload(file, settings.max_upload_mb)
    try:
        audio = await asyncio.to_thread(decode_audio_file, data, settings.max_upload_seconds)
    except AudioFileError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return await asyncio.to_thread(speech_regions, state.vad_backend, audio, state.vad_params)
