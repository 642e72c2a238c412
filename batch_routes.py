"""`POST /v1/speaker-identification` (wire-compatible with Omi's Modal function): the live tagger's matching code
over the segments of an upload. (`POST /v1/vad`, the other batch endpoint: `vad_routes`.)

Its work is bounded before it is done: a batch slot (`batch_admission`, 429 beyond), then the segments are checked
(BATCH_MAX_SEGMENTS, BATCH_MAX_SEGMENT_SECONDS, finite, end >= start: 422) before the upload is decoded; the
embeddings go into the speaker pool's batch lane (full: 503 with Retry-After)."""

from __future__ import annotations

import json
import math
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field, ValidationError

from auth import AuthError, Caller, checked_uid
from batch_admission import RETRY_AFTER_S, batch_slot
from request_auth import caller_or_internal
from storage import SpeakerProfile
from streaming.pool import PoolSaturated
from streaming.speaker import ProfileIndex
from uploads import read_audio

router = APIRouter()


class SegmentIn(BaseModel):
    start: float = Field(ge=0, allow_inf_nan=False)
    end: float = Field(ge=0, allow_inf_nan=False)
    model_config = {"extra": "allow"}


def checked_segments(text: str, max_segments: int, max_seconds: float) -> list[SegmentIn]:
    """The `segments` form field, or 422: a JSON list of at most `max_segments` {start, end} (finite, >= 0,
    end >= start) whose durations (overlaps count fully) sum to at most `max_seconds`."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("segments must be a JSON list")
        if len(raw) > max_segments:  # before validating each one: the count alone refuses a huge list
            raise ValueError(f"{len(raw)} segments; at most {max_segments} per request (BATCH_MAX_SEGMENTS)")
        spans = [SegmentIn.model_validate(x) for x in raw]
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"segments: {exc}") from None
    except RecursionError:  # JSON nested deeper than Python's recursion limit
        raise HTTPException(422, "segments: nested too deeply") from None
    for i, span in enumerate(spans):
        if span.end < span.start:
            raise HTTPException(422, f"segments: segment {i} ends ({span.end:g}) before it starts ({span.start:g})")
    total = math.fsum(s.end - s.start for s in spans)
    if total > max_seconds:
        raise HTTPException(422, f"segments: {total:.0f} s in all; at most {max_seconds:g} s per request "
                                 "(BATCH_MAX_SEGMENT_SECONDS; overlapping segments count fully)")
    return spans


class Identification(BaseModel):
    is_user: bool
    person_id: str | None



def profile_index(request: Request, profiles: list[SpeakerProfile]) -> ProfileIndex:
    return ProfileIndex.from_profiles(profiles, request.app.state.pool.embedder_name)


# --- speaker identification ----------------------------------------------------------------------------------------


@router.post("/v1/speaker-identification", response_model=list[Identification],
             summary="Which segments of an upload are the user or an enrolled person")
async def speaker_identification(
    request: Request,
    who: Annotated[Caller, Depends(caller_or_internal)],
    _slot: Annotated[None, Depends(batch_slot)],
    audio_file: Annotated[UploadFile, File(description="audio of the conversation")],
    segments: Annotated[str, Form(description='JSON list of {"start", "end", ...} in seconds')],
    uid: Annotated[str | None, Query(description="admin key or internal caller: the user to match against")] = None,
):
    """One `{is_user, person_id}` per segment, in order.

    Who names the user: a user's own credentials match against their own profiles (naming another `?uid=`: 403);
    the admin key may name any `?uid=`; an internal caller (Omi's backend, which sends `?uid=` and no Authorization
    header: `backend/utils/stt/speech_profile.py`) must name it. Without credentials and not internal: 401.

    Omi's backend treats any answer but 200 as "nobody identified", silently. So a deployment that sets neither
    `INTERNAL_API_KEY` (sent as `X-Internal-Key`) nor `INTERNAL_NETWORKS` answers Omi's backend 401 here, and Omi's
    speaker identification is quietly off: configure one of them for Omi's backend.
    """
    if who.internal:
        if uid is None:
            raise HTTPException(400, "an internal caller names the user: ?uid=")
        try:
            checked_uid(uid)
        except AuthError as exc:
            raise HTTPException(400, str(exc)) from None
    elif uid is not None and not who.admin:
        raise HTTPException(403, "only the admin key may name another uid")
    uid = uid if (who.admin or who.internal) and uid is not None else who.uid
    if uid is None:
        raise HTTPException(400, "no uid: the admin key needs ?uid=")
    st = request.app.state
    spans = checked_segments(segments, st.settings.batch_max_segments, st.settings.batch_max_segment_seconds)
    audio = await read_audio(request, audio_file)
    index = profile_index(request, await st.storage.list_profiles(uid))
    try:
        return await st.identifier.identify(audio, [(s.start, s.end) for s in spans], index)
    except PoolSaturated:
        raise HTTPException(503, "the speaker model's batch queue is full; retry later",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
