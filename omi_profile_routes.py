"""The user's own voice, at our paths and at the Omi app's paths and shapes.

Omi's app (`app/lib/backend/http/api/speech_profile.dart`) and backend (`backend/routers/speech_profile.py`):

- `POST /v3/upload-audio` (multipart `file`): a 16 kHz WAV of 5-180 s (Omi's current bound; 5-120 s before) →
  `{"url", ...}`; 400 with `detail` for a file that is not WAV, another sample rate, a duration out of bounds,
  "Audio is empty" (no speech found), or under 2 s of speech (too little for a usable voice: our addition). Our
  profile fields come in the same body.
- `GET /v3/speech-profile` → `{"has_profile"}`; `GET /v4/speech-profile` → `{"url": str | null}`;
  `GET /v3/speech-profile/status` → `{has_profile, duration_seconds, sample_count, url}`.
- `GET /v3/speech-profile/expand` → `[]` and `DELETE /v3/speech-profile/expand?memory_id&segment_idx` →
  `{"status": "ok"}`: Omi keeps extra samples cut from conversations there; this server keeps none (a
  `speaker_assigned` adds a cluster's embeddings to the person instead), so the list is honestly empty and there is
  nothing to delete.
- People at Omi's `/v1/users/people` paths: in `people_routes`, next to ours.
- Ours: `POST /v1/speech-profile` (5-120 s of speech after VAD, 422 otherwise; returns the profile),
  `GET`/`DELETE /v1/speech-profile`.

Profile audio: either enrolment keeps the VAD-trimmed speech (16 kHz mono int16 WAV, at most 180 s) in
`DATA_DIR/speech_profiles/<sha256 of the uid>.wav` (never the raw uid), replaced on re-enrolment and deleted with
the profile. The app plays the url without sending credentials (Omi's are signed storage URLs), so the url is a
signed link: `GET /v4/speech-profile/audio?token=<file key>.<expiry>.<HMAC>`, valid `AUDIO_URL_TTL_S`, signed with
a random key kept in the same folder; the same path with the owner's `Authorization` header and no token works too.
With several replicas `DATA_DIR/speech_profiles` must be a volume they all share (the files and the signing key):
otherwise the audio enrolled through one replica is missing on the others (their `/v4/speech-profile` says null
while `has_profile`, read from the shared database, says true), and a url signed by one is refused by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from batch_threads import batch_threads
from people_routes import ProfileOut, StatusOk
from request_auth import caller, user_uid
from storage import SpeakerProfile
from streaming.audiofile import AudioFileError, decode_audio_file
from streaming.speaker import SAMPLE_RATE
from uploads import embed_speech, enrolment_speech, read_upload, speech_only

log = logging.getLogger(__name__)

router = APIRouter()

OMI_MIN_S, OMI_MAX_S = 5.0, 180.0  # /v3/upload-audio: the recording's duration (Omi's current backend)
OMI_MIN_SPEECH_S = 2.0  # /v3/upload-audio: speech after VAD trimming, enough for a couple of embedding windows
USER_PROFILE_MIN_S, USER_PROFILE_MAX_S = 5.0, 120.0  # /v1/speech-profile: speech after VAD trimming
AUDIO_URL_TTL_S = 3600
MAX_ID_CHARS = 128
_KEY = re.compile(r"^[0-9a-f]{64}$")


# --- profile audio files ------------------------------------------------------------------------------------------


class ProfileAudio:
    """The enrolled speech of each user, one WAV a user under `root`, named by a hash of the uid; signed links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._secret: bytes | None = None

    @staticmethod
    def key(uid: str) -> str:
        return hashlib.sha256(b"omi-speech-profile\0" + uid.encode("utf-8", "surrogateescape")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.wav"

    def stage(self, speech: np.ndarray) -> Path:
        """Writes speech (float32, 16 kHz) as a temporary WAV in `root`, to `commit` once the profile is saved."""
        import soundfile as sf

        self.root.mkdir(parents=True, exist_ok=True)
        pcm = (np.clip(speech[: int(OMI_MAX_S * SAMPLE_RATE)], -1.0, 32767 / 32768) * 32768.0).round()
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                sf.write(f, pcm.astype(np.int16), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def commit(self, staged: Path, uid: str) -> None:
        os.replace(staged, self.path(self.key(uid)))

    def delete(self, uid: str) -> None:
        self.path(self.key(uid)).unlink(missing_ok=True)

    def exists(self, uid: str) -> bool:
        return self.path(self.key(uid)).is_file()

    def _signing_key(self) -> bytes:
        """32 random bytes kept in `root` (shared by replicas on a shared volume), made once, atomically."""
        if self._secret is None:
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.root / ".url-signing-key"
            if not final.exists():
                fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, final)  # another replica may have won: theirs is used
                Path(tmp).unlink(missing_ok=True)
            secret = final.read_bytes()
            if len(secret) != 32:
                raise OSError("speech profile url signing key is damaged")
            self._secret = secret
        return self._secret

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._signing_key(), f"{key}.{expires}".encode(), hashlib.sha256).hexdigest()

    def token(self, uid: str, ttl_s: float = AUDIO_URL_TTL_S) -> str:
        key, expires = self.key(uid), int(time.time() + ttl_s)
        return f"{key}.{expires}.{self._signature(key, expires)}"

    def verified_key(self, token: str) -> str | None:
        """The file key of a valid, unexpired token, else None."""
        key, _, rest = token.partition(".")
        expires, _, signature = rest.partition(".")
        if not _KEY.match(key) or not expires.isdigit() or len(expires) > 12 or int(expires) < time.time():
            return None
        return key if hmac.compare_digest(signature.encode(), self._signature(key, int(expires)).encode()) else None


def profile_audio(request: Request) -> ProfileAudio:
    st = request.app.state
    store = getattr(st, "profile_audio", None)
    if store is None:
        store = st.profile_audio = ProfileAudio(Path(st.settings.data_dir) / "speech_profiles")
    return store


async def audio_url(request: Request, uid: str) -> str | None:
    """The signed url of the user's profile audio, None without one."""
    store = profile_audio(request)
    if not await asyncio.to_thread(store.exists, uid):
        return None
    try:
        token = await asyncio.to_thread(store.token, uid)
    except OSError:
        log.exception("speech profile url: no signing key")
        return None
    return f"{str(request.base_url).rstrip('/')}/v4/speech-profile/audio?token={token}"


async def enrol_user(request: Request, uid: str, speech: np.ndarray) -> SpeakerProfile:
    """Embeds the user's speech, stores it as their profile (replacing the old one) and keeps the audio."""
    embeddings = await embed_speech(request, speech)
    profile = SpeakerProfile(uid=uid, kind="user", model=request.app.state.pool.embedder_name, embeddings=embeddings,
                             speech_seconds=len(speech) / SAMPLE_RATE)
    store = profile_audio(request)
    try:
        staged = await asyncio.to_thread(store.stage, speech)
    except OSError:
        log.exception("speech profile audio could not be written")
        raise HTTPException(503, "the profile audio could not be stored") from None
    try:
        await request.app.state.storage.save_profile(profile)
        await asyncio.to_thread(store.commit, staged, uid)
    finally:
        staged.unlink(missing_ok=True)
    return profile


# --- Omi: the user's own voice -------------------------------------------------------------------------------------


class UploadOut(ProfileOut):
    url: str


class HasProfileOut(BaseModel):
    has_profile: bool


class UrlOut(BaseModel):
    url: str | None


class StatusOut(BaseModel):
    has_profile: bool
    duration_seconds: float
    sample_count: int
    url: str | None


def omi_wav(data: bytes) -> np.ndarray:
    """A 16 kHz WAV of OMI_MIN_S-OMI_MAX_S as 16 kHz mono float32, else 400 with Omi's reasons. Blocking."""
    import soundfile as sf

    bad_file = "Invalid audio file: must be a valid 16 kHz WAV."
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        raise HTTPException(400, bad_file) from None
    if info.format not in ("WAV", "WAVEX") or info.channels < 1:
        raise HTTPException(400, bad_file)
    if info.samplerate != SAMPLE_RATE:
        raise HTTPException(400, f"Invalid sample rate {info.samplerate} Hz: must be a 16 kHz WAV.")
    if not OMI_MIN_S <= info.frames / SAMPLE_RATE <= OMI_MAX_S:
        raise HTTPException(400, f"Audio duration is invalid (must be {OMI_MIN_S:g}-{OMI_MAX_S:g} seconds)")
    try:
        return decode_audio_file(data, OMI_MAX_S + 1)
    except AudioFileError as exc:
        raise HTTPException(400, str(exc)) from None


@router.post("/v3/upload-audio", response_model=UploadOut, summary="Enrol the user's own voice (Omi)")
async def upload_audio(request: Request, uid: Annotated[str, Depends(user_uid)],
                       file: Annotated[UploadFile, File(description="16 kHz WAV, 5-180 s, of the user speaking")]):
    data = await read_upload(file, request.app.state.settings.max_upload_mb)
    threads = batch_threads(request.app.state)  # bulk work: low-priority threads, the live streams go first
    audio = await threads.run(omi_wav, data)
    speech = await threads.run(speech_only, request, audio)
    if len(speech) == 0:
        raise HTTPException(400, "Audio is empty")
    if len(speech) < OMI_MIN_SPEECH_S * SAMPLE_RATE:
        raise HTTPException(400, f"Too little speech: {len(speech) / SAMPLE_RATE:.1f} s found, "
                                 f"at least {OMI_MIN_SPEECH_S:g} s needed")
    profile = await enrol_user(request, uid, speech)
    url = await audio_url(request, uid)
    if url is None:
        raise HTTPException(503, "the profile audio could not be stored")
    return UploadOut(**ProfileOut.of(profile).model_dump(), url=url)


@router.get("/v3/speech-profile", response_model=HasProfileOut, summary="Whether the user has a voice profile (Omi)")
async def has_speech_profile(request: Request, uid: Annotated[str, Depends(user_uid)]):
    return HasProfileOut(has_profile=await request.app.state.storage.user_profile(uid) is not None)


@router.get("/v4/speech-profile", response_model=UrlOut, summary="The url of the user's enrolled speech (Omi)")
async def speech_profile_url(request: Request, uid: Annotated[str, Depends(user_uid)]):
    if await request.app.state.storage.user_profile(uid) is None:
        return UrlOut(url=None)
    return UrlOut(url=await audio_url(request, uid))


@router.get("/v3/speech-profile/status", response_model=StatusOut, summary="Voice profile status (Omi)")
async def speech_profile_status(request: Request, uid: Annotated[str, Depends(user_uid)]):
    profile = await request.app.state.storage.user_profile(uid)
    if profile is None:
        return StatusOut(has_profile=False, duration_seconds=0.0, sample_count=0, url=None)
    return StatusOut(has_profile=True, duration_seconds=round(profile.speech_seconds, 2), sample_count=0,
                     url=await audio_url(request, uid))


@router.get("/v4/speech-profile/audio", response_class=FileResponse,
            responses={200: {"content": {"audio/wav": {}}}}, summary="The user's enrolled speech (WAV)")
async def speech_profile_audio(request: Request,
                               token: Annotated[str | None, Query(max_length=256, description="from the url")] = None):
    """With `?token=` (the signed url that `/v4/speech-profile` and `/v3/upload-audio` return), no credentials
    needed; without it, the `Authorization` header's user's own audio."""
    store = profile_audio(request)
    if token is not None:
        try:
            key = await asyncio.to_thread(store.verified_key, token)
        except OSError:
            key = None
        if key is None:
            raise HTTPException(403, "invalid or expired link")
    else:
        key = store.key(await user_uid(await caller(request)))
    path = store.path(key)
    if not await asyncio.to_thread(path.is_file):
        raise HTTPException(404, "no speech profile audio")
    return FileResponse(path, media_type="audio/wav", headers={"Cache-Control": "private, no-store"})


@router.get("/v3/speech-profile/expand", response_model=list[str],
            summary="Extra voice samples from conversations (Omi): none are kept here")
async def expanded_samples(uid: Annotated[str, Depends(user_uid)],
                           person_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None):
    return []


@router.delete("/v3/speech-profile/expand", response_model=StatusOk,
               summary="Delete an extra voice sample (Omi): none are kept here")
async def delete_expanded_sample(uid: Annotated[str, Depends(user_uid)],
                                 memory_id: Annotated[str, Query(max_length=MAX_ID_CHARS)],
                                 segment_idx: Annotated[int, Query(ge=0)],
                                 person_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None):
    return StatusOk()


# --- ours: the user's own voice ------------------------------------------------------------------------------------


@router.post("/v1/speech-profile", response_model=ProfileOut, summary="Enrol the user's own voice")
async def upload_user_profile(request: Request, uid: Annotated[str, Depends(user_uid)],
                              file: Annotated[UploadFile, File(description="5-120 s of the user speaking")]):
    speech = await enrolment_speech(request, file, USER_PROFILE_MIN_S, USER_PROFILE_MAX_S)
    return ProfileOut.of(await enrol_user(request, uid, speech))


@router.get("/v1/speech-profile", response_model=ProfileOut, summary="The user's own voice profile")
async def get_user_profile(request: Request, uid: Annotated[str, Depends(user_uid)]):
    profile = await request.app.state.storage.user_profile(uid)
    if profile is None:
        raise HTTPException(404, "no speech profile")
    return ProfileOut.of(profile)


@router.delete("/v1/speech-profile", status_code=204, summary="Delete the user's own voice profile and audio")
async def delete_user_profile(request: Request, uid: Annotated[str, Depends(user_uid)]):
    profile = await request.app.state.storage.user_profile(uid)
    await asyncio.to_thread(profile_audio(request).delete, uid)
    if profile is None or not await request.app.state.storage.delete_profile(uid, profile.id):
        raise HTTPException(404, "no speech profile")
