"""`POST /v1/vad` (wire-compatible with Omi's Modal function): the streaming VAD code over a whole upload (open:
Omi's backend calls it with no credentials)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel

from streaming.pipeline import speech_regions
from uploads import read_audio

router = APIRouter()


class SpeechRegion(BaseModel):
    start: float
    end: float
    duration: float


@router.post("/v1/vad", response_model=list[SpeechRegion], summary="Speech regions of an audio file")
async def vad(request: Request, file: Annotated[UploadFile, File(description="audio: WAV, FLAC, OGG, MP3, M4A...")]):
    audio = await read_audio(request, file)
    st = request.app.state
    return await asyncio.to_thread(speech_regions, st.vad_backend, audio, st.vad_params)
