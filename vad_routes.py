"""`POST /v1/vad` (wire-compatible with Omi's Modal function): the speech of a whole upload as it is (no live-gate
padding; VAD_BATCH_* settings), decoded and scored piece by piece (`streaming.file_vad`: memory independent of the
file's length).

Callers (`request_auth.caller_or_local`): with auth configured a user, the admin key or the internal caller (Omi's
backend calls it with no credentials: configure it as the internal caller); in the loopback-only mode any loopback
client, without a header."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from pydantic import BaseModel

from auth import Caller
from batch_admission import batch_slot
from request_auth import caller_or_local
from streaming.file_vad import file_speech_regions
from streaming.vad_batch import BatchVadParams
from uploads import decode_in_worker, spooled_upload

router = APIRouter()


class SpeechRegion(BaseModel):
    start: float
    end: float
    duration: float


@router.post("/v1/vad", response_model=list[SpeechRegion], summary="Speech regions of an audio file")
async def vad(request: Request, file: Annotated[UploadFile, File(description="audio: WAV, FLAC, OGG, MP3, M4A...")],
              _who: Annotated[Caller, Depends(caller_or_local)],
              _slot: Annotated[None, Depends(batch_slot)]):  # at most BATCH_MAX_CONCURRENT batch requests at once
    st = request.app.state
    source = spooled_upload(file, st.settings.max_upload_mb)
    params = BatchVadParams.from_settings(st.settings)
    return await decode_in_worker(request, file_speech_regions, st.vad_backend, source, params,
                                  st.settings.max_upload_seconds)
