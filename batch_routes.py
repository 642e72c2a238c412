"""Batch REST endpoints (wire-compatible with Omi's Modal functions) and people's voices, plus the upload and
enrolment helpers `omi_profile_routes` (the user's own voice, Omi's speech-profile and people paths) shares.

- `POST /v1/vad`: the streaming VAD code over a whole upload (open: Omi's backend calls it with no credentials).
- `POST /v1/speaker-identification`: the live tagger's matching code over the segments of an upload.
- `/v1/people`: other people's voices (create, list, add samples, delete), and the same people at the Omi app's
  paths and shapes (`app/lib/backend/http/api/users.dart`, `schema/person.dart`; backend `routers/users.py`,
  `models/other.py`): `GET /v1/users/people?include_speech_samples=`, `GET /v1/users/people/{id}`,
  `POST /v1/users/people {"name"}` (2-40 characters; the existing person of that exact name is returned, as Omi
  does; 200), `PATCH /v1/users/people/{id}/name?value=` → `{"status": "ok"}` or 404, `DELETE /v1/users/people/{id}`
  → 204 (for an unknown id too, as Omi), `DELETE /v1/users/people/{id}/speech-samples/{index}` → 404 (no sample
  files are kept). A Person is `{id, name, created_at, updated_at (ISO 8601, UTC), speech_samples (always []),
  speech_sample_transcripts (null), speech_samples_version (3)}`. Omi adds voices from conversations; here they
  come from `POST /v1/people/{id}/samples` or live from `speaker_assigned`.

Every route that touches a user's data takes the uid from the verified `Authorization` header, except an internal
caller's `?uid=` on `/v1/speaker-identification` (see there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, Response, UploadFile
from pydantic import BaseModel, Field, ValidationError

from auth import AuthError, Caller, checked_uid
from storage import SpeakerProfile
from streaming.audiofile import AudioFileError, decode_audio_file
from streaming.pipeline import speech_regions
from streaming.speaker import SAMPLE_RATE, ProfileIndex
from streaming.vad import detect_regions

router = APIRouter()

PERSON_SAMPLE_MIN_S = 2.0  # a person's sample: enough for a couple of embedding windows
ENROL_CLIP_S = 3.0  # enrolment speech is embedded in 3 s pieces: one embedding row each
NAME_MIN, NAME_MAX = 2, 40  # Omi's CreatePerson
MAX_PEOPLE = 500  # people per user, at Omi's path
MAX_ID_CHARS = 128
SPEECH_SAMPLES_VERSION = 3  # Omi's current version (the app's default when absent)


class SpeechRegion(BaseModel):
    start: float
    end: float
    duration: float


class SegmentIn(BaseModel):
    start: float = Field(ge=0)
    end: float = Field(ge=0)
    model_config = {"extra": "allow"}


class Identification(BaseModel):
    is_user: bool
    person_id: str | None


class ProfileOut(BaseModel):
    id: str
    kind: str
    name: str | None
    model: str
    samples: int
    speech_seconds: float
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, p: SpeakerProfile) -> ProfileOut:
        return cls(id=p.id, kind=p.kind, name=p.name, model=p.model, samples=len(p.embeddings),
                   speech_seconds=round(p.speech_seconds, 2), created_at=p.created_at, updated_at=p.updated_at)


class PersonIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)


# --- helpers ------------------------------------------------------------------------------------------------------


async def caller(request: Request) -> Caller:
    try:
        return await request.app.state.authenticator.caller(
            request.headers.get("authorization"), request.client.host if request.client else None
        )
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


async def user_uid(who: Annotated[Caller, Depends(caller)]) -> str:
    if who.uid is None:
        raise HTTPException(400, "the admin key acts for a user: 'Authorization: Bearer <ADMIN_KEY><uid>'")
    return who.uid


async def caller_or_internal(request: Request) -> Caller:
    """The verified caller; without an Authorization header, Omi's backend when it is an internal caller
    (`Caller(None, internal=True)`); 401 otherwise."""
    host = request.client.host if request.client else None
    if not request.headers.get("authorization") and request.app.state.authenticator.internal(request.headers, host):
        return Caller(None, internal=True)
    return await caller(request)


async def read_upload(upload: UploadFile, max_mb: float) -> bytes:
    """Reads at most MAX_UPLOAD_MB (+1 byte to tell), so a huge upload is refused without being held in memory."""
    limit = int(max_mb * 1024 * 1024)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than the limit of {max_mb:g} MB")
    return data


async def read_audio(request: Request, upload: UploadFile) -> np.ndarray:
    settings = request.app.state.settings
    data = await read_upload(upload, settings.max_upload_mb)
    try:
        return await asyncio.to_thread(decode_audio_file, data, settings.max_upload_seconds)
    except AudioFileError as exc:
        raise HTTPException(exc.status, str(exc)) from None


def speech_only(request: Request, audio: np.ndarray) -> np.ndarray:
    """The speech of a recording, VAD-trimmed with the same VAD as everything else. Blocking."""
    st = request.app.state
    regions = detect_regions(st.vad_backend, audio, st.vad_params)
    return np.concatenate([audio[s:e] for s, e in regions]) if regions else np.zeros(0, np.float32)


async def enrolment_speech(request: Request, upload: UploadFile, min_s: float, max_s: float | None) -> np.ndarray:
    """The VAD-trimmed speech of an enrolment upload; 422 when there is less than min_s or more than max_s."""
    audio = await read_audio(request, upload)
    speech = await asyncio.to_thread(speech_only, request, audio)
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


def profile_index(request: Request, profiles: list[SpeakerProfile]) -> ProfileIndex:
    return ProfileIndex.from_profiles(profiles, request.app.state.pool.embedder_name)


# --- VAD ------------------------------------------------------------------------------------------------------------


@router.post("/v1/vad", response_model=list[SpeechRegion], summary="Speech regions of an audio file")
async def vad(request: Request, file: Annotated[UploadFile, File(description="audio: WAV, FLAC, OGG, MP3, M4A...")]):
    audio = await read_audio(request, file)
    st = request.app.state
    return await asyncio.to_thread(speech_regions, st.vad_backend, audio, st.vad_params)


# --- speaker identification ----------------------------------------------------------------------------------------


@router.post("/v1/speaker-identification", response_model=list[Identification],
             summary="Which segments of an upload are the user or an enrolled person")
async def speaker_identification(
    request: Request,
    who: Annotated[Caller, Depends(caller_or_internal)],
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
    try:
        raw = json.loads(segments)
        if not isinstance(raw, list):
            raise ValueError("segments must be a JSON list")
        spans = [SegmentIn.model_validate(x) for x in raw]
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"segments: {exc}") from None
    except RecursionError:  # JSON nested deeper than Python's recursion limit
        raise HTTPException(422, "segments: nested too deeply") from None
    audio = await read_audio(request, audio_file)
    st = request.app.state
    index = profile_index(request, await st.storage.list_profiles(uid))
    return await st.identifier.identify(audio, [(s.start, s.end) for s in spans], index)


# --- other people ---------------------------------------------------------------------------------------------------


async def new_person(request: Request, uid: str, name: str) -> SpeakerProfile:
    """A stored person profile with no voice yet."""
    pool = request.app.state.pool
    await pool.ensure_loaded()
    profile = SpeakerProfile(uid=uid, kind="person", name=name, model=pool.embedder_name,
                             embeddings=np.zeros((0, pool.embedding_dim), np.float32))
    await request.app.state.storage.save_profile(profile)
    return profile


@router.post("/v1/people", response_model=ProfileOut, status_code=201, summary="Add a person (no voice yet)")
async def create_person(request: Request, uid: Annotated[str, Depends(user_uid)], body: PersonIn):
    return ProfileOut.of(await new_person(request, uid, body.name))


@router.get("/v1/people", response_model=list[ProfileOut], summary="The user's enrolled people")
async def list_people(request: Request, uid: Annotated[str, Depends(user_uid)]):
    return [ProfileOut.of(p) for p in await request.app.state.storage.list_profiles(uid) if p.kind == "person"]


async def _person_or_none(request: Request, uid: str, person_id: str) -> SpeakerProfile | None:
    if not 0 < len(person_id) <= MAX_ID_CHARS:
        return None
    profile = await request.app.state.storage.get_profile(uid, person_id)
    return profile if profile is not None and profile.kind == "person" else None


async def _person(request: Request, uid: str, person_id: str) -> SpeakerProfile:
    profile = await _person_or_none(request, uid, person_id)
    if profile is None:
        raise HTTPException(404, "Person not found")
    return profile


@router.get("/v1/people/{person_id}", response_model=ProfileOut, summary="One enrolled person")
async def get_person(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str):
    return ProfileOut.of(await _person(request, uid, person_id))


@router.post("/v1/people/{person_id}/samples", response_model=ProfileOut,
             summary="Add a voice sample to a person (VAD-trimmed, embedded, stored)")
async def add_person_sample(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str,
                            file: Annotated[UploadFile, File(description="the person speaking, 2 s or more")]):
    await _person(request, uid, person_id)
    embeddings, seconds = await enrolment_embeddings(request, file, PERSON_SAMPLE_MIN_S, None)
    await request.app.state.storage.add_profile_embeddings(uid, person_id, embeddings, seconds)
    return ProfileOut.of(await _person(request, uid, person_id))


@router.delete("/v1/people/{person_id}", status_code=204, summary="Delete a person and their voice")
async def delete_person(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str):
    await _person(request, uid, person_id)
    await request.app.state.storage.delete_profile(uid, person_id)


# --- Omi: people ---------------------------------------------------------------------------------------------------


class Person(BaseModel):
    id: str
    name: str
    created_at: dt.datetime
    updated_at: dt.datetime
    speech_samples: list[str] = []
    speech_sample_transcripts: list[str] | None = None
    speech_samples_version: int = SPEECH_SAMPLES_VERSION

    @classmethod
    def of(cls, p: SpeakerProfile) -> Person:
        def utc(ts: float) -> dt.datetime:
            return dt.datetime.fromtimestamp(ts, dt.UTC)

        return cls(id=p.id, name=p.name or "", created_at=utc(p.created_at), updated_at=utc(p.updated_at))


class StatusOk(BaseModel):
    status: str = "ok"


class CreatePerson(BaseModel):
    name: str = Field(min_length=NAME_MIN, max_length=NAME_MAX)


def _name(raw: str) -> str:
    name = raw.strip()
    if not NAME_MIN <= len(name) <= NAME_MAX:
        raise HTTPException(422, f"the name must have {NAME_MIN}-{NAME_MAX} characters")
    return name


async def _people(request: Request, uid: str) -> list[SpeakerProfile]:
    return [p for p in await request.app.state.storage.list_profiles(uid) if p.kind == "person"]


@router.get("/v1/users/people", response_model=list[Person], summary="The user's people (Omi)")
async def omi_list_people(request: Request, uid: Annotated[str, Depends(user_uid)],
                          include_speech_samples: bool = True):
    return [Person.of(p) for p in sorted(await _people(request, uid), key=lambda p: p.created_at)]


@router.get("/v1/users/people/{person_id}", response_model=Person, summary="One person (Omi)")
async def omi_get_person(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str,
                         include_speech_samples: bool = False):
    return Person.of(await _person(request, uid, person_id))


@router.post("/v1/users/people", response_model=Person, summary="Create a person, or the one of that name (Omi)")
async def omi_create_person(request: Request, uid: Annotated[str, Depends(user_uid)], body: CreatePerson):
    name = _name(body.name)
    people = await _people(request, uid)
    existing = next((p for p in people if p.name == name), None)
    if existing is not None:
        return Person.of(existing)
    if len(people) >= MAX_PEOPLE:
        raise HTTPException(400, f"at most {MAX_PEOPLE} people per user")
    return Person.of(await new_person(request, uid, name))


@router.patch("/v1/users/people/{person_id}/name", response_model=StatusOk, summary="Rename a person (Omi)")
async def omi_rename_person(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str,
                            value: Annotated[str, Query(max_length=NAME_MAX * 4)]):
    name = _name(value)
    profile = await _person(request, uid, person_id)
    # A sample added between the read and this save would be lost: storage has no rename of its own.
    await request.app.state.storage.save_profile(dataclasses.replace(profile, name=name, updated_at=time.time()))
    return StatusOk()


@router.delete("/v1/users/people/{person_id}", status_code=204, response_class=Response,
               summary="Delete a person and their voice (Omi: 204 for an unknown id too)")
async def omi_delete_person(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str):
    if await _person_or_none(request, uid, person_id) is not None:
        await request.app.state.storage.delete_profile(uid, person_id)
    return Response(status_code=204)


@router.delete("/v1/users/people/{person_id}/speech-samples/{sample_index}", response_model=StatusOk,
               summary="Delete a person's speech sample (Omi): no sample files are kept here")
async def omi_delete_person_sample(request: Request, uid: Annotated[str, Depends(user_uid)], person_id: str,
                                   sample_index: int):
    await _person(request, uid, person_id)
    raise HTTPException(404, "Sample not found")
