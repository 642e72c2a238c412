"""Batch REST endpoints (wire-compatible with Omi's Modal functions) and speech-profile enrolment.

- `POST /v1/vad`: the streaming VAD code over a whole upload.
- `POST /v1/speaker-identification`: the live tagger's matching code over the segments of an upload.
- `POST /v3/upload-audio` (Omi) and `/v1/speech-profile`: the user's own voice.
- `/v1/people`: other people's voices (create, list, add samples, delete).

Every route that touches a user's data takes the uid from the verified `Authorization` header.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field, ValidationError

from auth import AuthError, Caller
from storage import SpeakerProfile
from streaming.audiofile import AudioFileError, decode_audio_file
from streaming.pipeline import speech_regions
from streaming.speaker import SAMPLE_RATE, ProfileIndex
from streaming.vad import detect_regions

router = APIRouter()

USER_PROFILE_MIN_S, USER_PROFILE_MAX_S = 5.0, 120.0  # speech accepted for the user's own profile (as Omi does)
PERSON_SAMPLE_MIN_S = 2.0  # a person's sample: enough for a couple of embedding windows
ENROL_CLIP_S = 3.0  # enrolment speech is embedded in 3 s pieces: one embedding row each


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
        raise HTTPException(400, "the admin key acts for a user: 'Authorization: <ADMIN_KEY><uid>'")
    return who.uid


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


async def enrolment_embeddings(request: Request, upload: UploadFile, min_s: float, max_s: float | None):
    """(embeddings (n, dim), speech seconds) of an enrolment upload."""
    audio = await read_audio(request, upload)
    speech = await asyncio.to_thread(speech_only, request, audio)
    seconds = len(speech) / SAMPLE_RATE
    if seconds < min_s:
        raise HTTPException(422, f"{seconds:.1f} s of speech found; at least {min_s:g} s needed")
    if max_s is not None and seconds > max_s:
        raise HTTPException(422, f"{seconds:.1f} s of speech found; at most {max_s:g} s accepted")
    step = int(ENROL_CLIP_S * SAMPLE_RATE)
    clips = [speech[i : i + step] for i in range(0, len(speech), step)]
    if len(clips) > 1 and len(clips[-1]) < step // 2:  # a short tail joins the piece before it
        clips[-2] = np.concatenate(clips[-2:])
        clips.pop()
    pool = request.app.state.pool
    return await pool.embed_many(clips), seconds


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
    who: Annotated[Caller, Depends(caller)],
    audio_file: Annotated[UploadFile, File(description="audio of the conversation")],
    segments: Annotated[str, Form(description='JSON list of {"start", "end", ...} in seconds')],
    uid: Annotated[str | None, Query(description="admin key only: the user to match against")] = None,
):
    if uid is not None and not who.admin:
        raise HTTPException(403, "only the admin key may name another uid")
    uid = uid if who.admin and uid is not None else who.uid
    if uid is None:
        raise HTTPException(400, "no uid: the admin key needs ?uid=")
    try:
        raw = json.loads(segments)
        if not isinstance(raw, list):
            raise ValueError("segments must be a JSON list")
        spans = [SegmentIn.model_validate(x) for x in raw]
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"segments: {exc}") from None
    audio = await read_audio(request, audio_file)
    st = request.app.state
    index = profile_index(request, await st.storage.list_profiles(uid))
    return await st.identifier.identify(audio, [(s.start, s.end) for s in spans], index)


# --- the user's own profile -----------------------------------------------------------------------------------------


@router.post("/v3/upload-audio", response_model=ProfileOut, summary="Enrol the user's own voice (Omi)")
@router.post("/v1/speech-profile", response_model=ProfileOut, summary="Enrol the user's own voice")
async def upload_user_profile(request: Request, uid: Annotated[str, Depends(user_uid)],
                              file: Annotated[UploadFile, File(description="5-120 s of the user speaking")]):
    embeddings, seconds = await enrolment_embeddings(request, file, USER_PROFILE_MIN_S, USER_PROFILE_MAX_S)
    profile = SpeakerProfile(uid=uid, kind="user", model=request.app.state.pool.embedder_name,
                             embeddings=embeddings, speech_seconds=seconds)
    await request.app.state.storage.save_profile(profile)
    return ProfileOut.of(profile)


@router.get("/v1/speech-profile", response_model=ProfileOut, summary="The user's own voice profile")
async def get_user_profile(request: Request, uid: Annotated[str, Depends(user_uid)]):
    profile = await request.app.state.storage.user_profile(uid)
    if profile is None:
        raise HTTPException(404, "no speech profile")
    return ProfileOut.of(profile)


@router.delete("/v1/speech-profile", status_code=204, summary="Delete the user's own voice profile")
async def delete_user_profile(request: Request, uid: Annotated[str, Depends(user_uid)]):
    profile = await request.app.state.storage.user_profile(uid)
    if profile is None or not await request.app.state.storage.delete_profile(uid, profile.id):
        raise HTTPException(404, "no speech profile")


# --- other people ---------------------------------------------------------------------------------------------------


@router.post("/v1/people", response_model=ProfileOut, status_code=201, summary="Add a person (no voice yet)")
async def create_person(request: Request, uid: Annotated[str, Depends(user_uid)], body: PersonIn):
    await request.app.state.pool.ensure_loaded()
    dim = request.app.state.pool.embedding_dim
    profile = SpeakerProfile(uid=uid, kind="person", name=body.name, model=request.app.state.pool.embedder_name,
                             embeddings=np.zeros((0, dim), np.float32))
    await request.app.state.storage.save_profile(profile)
    return ProfileOut.of(profile)


@router.get("/v1/people", response_model=list[ProfileOut], summary="The user's enrolled people")
async def list_people(request: Request, uid: Annotated[str, Depends(user_uid)]):
    return [ProfileOut.of(p) for p in await request.app.state.storage.list_profiles(uid) if p.kind == "person"]


async def _person(request: Request, uid: str, person_id: str) -> SpeakerProfile:
    profile = await request.app.state.storage.get_profile(uid, person_id)
    if profile is None or profile.kind != "person":
        raise HTTPException(404, "no such person")
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
