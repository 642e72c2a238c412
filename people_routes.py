"""Other people's voices.

- `/v1/people`: other people's voices (create, list, add samples, delete), and the same people at the Omi app's
  paths and shapes (`app/lib/backend/http/api/users.dart`, `schema/person.dart`; backend `routers/users.py`,
  `models/other.py`): `GET /v1/users/people?include_speech_samples=`, `GET /v1/users/people/{id}`,
  `POST /v1/users/people {"name"}` (2-40 characters; the existing person of that exact name is returned, as Omi
  does; 200), `PATCH /v1/users/people/{id}/name?value=` → `{"status": "ok"}` or 404, `DELETE /v1/users/people/{id}`
  → 204 (for an unknown id too, as Omi), `DELETE /v1/users/people/{id}/speech-samples/{index}` → 404 (no sample
  files are kept). A Person is `{id, name, created_at, updated_at (ISO 8601, UTC), speech_samples (always []),
  speech_sample_transcripts (null), speech_samples_version (3)}`. Omi adds voices from conversations; here they
  come from `POST /v1/people/{id}/samples` or live from `speaker_assigned`.

Every route takes the uid from the verified `Authorization` header.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, Response, UploadFile
from pydantic import BaseModel, Field

from request_auth import user_uid
from storage import SpeakerProfile
from uploads import enrolment_embeddings

router = APIRouter()

PERSON_SAMPLE_MIN_S = 2.0  # a person's sample: enough for a couple of embedding windows
NAME_MIN, NAME_MAX = 2, 40  # Omi's CreatePerson
MAX_PEOPLE = 500  # people per user, at Omi's path
MAX_ID_CHARS = 128
SPEECH_SAMPLES_VERSION = 3  # Omi's current version (the app's default when absent)


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
                            file: Annotated[UploadFile, File(description="the person speaking: 2 s to "
                                                                         "PERSON_SAMPLE_MAX_S (120 s) of speech")]):
    await _person(request, uid, person_id)
    max_s = request.app.state.settings.person_sample_max_s  # 422 beyond, checked before the speech is embedded
    embeddings, seconds = await enrolment_embeddings(request, file, PERSON_SAMPLE_MIN_S, max_s)
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
