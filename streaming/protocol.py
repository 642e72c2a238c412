"""Wire messages of `/v4/listen` (Omi-compatible) as pydantic models.

Server → client: a bare JSON array of `TranscriptSegment`s (upserted by `id`; the last one may grow), and event
objects with a `type`. Client → server: binary audio frames, and JSON text commands with a `type`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from streaming.codecs import SUPPORTED_CODECS

ServiceStatus = Literal["initiating", "stt_initiating", "ready"]


FOUR_HOURS_S = 4 * 3600  # Omi's "4 hours" choice, sent as conversation_timeout=-1


class ListenParams(BaseModel):
    """Query parameters of `/v4/listen`, defaults and coercions as in Omi (`transcribe.py`, `listen/contracts.py`).

    Unknown parameters are ignored (the app also sends `uid`, which is never trusted: identity comes from the
    Authorization header; the newer backend's `onboarding`, `speaker_auto_assign`, `vad_gate`, `call_id`,
    `client_conversation_id` are accepted and have no effect here)."""

    language: str = Field("en", min_length=2, max_length=16,
                          pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$|^multi$|^auto$")
    sample_rate: int = Field(8000, ge=8000, le=48000)
    codec: str = "pcm8"
    channels: int = Field(1, ge=1, le=2)
    include_speech_profile: bool = True
    # -1 is the app's "4 hours"; values below the server's minimum are raised to it (`effective_timeout`)
    conversation_timeout: int = Field(120, ge=-(2**31), le=2**31)
    stt_service: str | None = Field(None, max_length=64)  # accepted; the server's STT_BACKEND decides
    # Where the audio comes from (the conversation's `source`: omi, phone, desktop, ...); odd values become "omi"
    source: str | None = Field(None, max_length=64)
    # "enabled": the app transcribes on the phone and sends `suggested_transcript`; not built here, so the server
    # transcribes as Omi does with it off
    custom_stt: str | None = Field(None, max_length=32)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        if v not in SUPPORTED_CODECS:
            raise ValueError(f"codec must be one of {', '.join(SUPPORTED_CODECS)}")
        return v

    @field_validator("language")
    @classmethod
    def _auto_is_multi(cls, v: str) -> str:
        return "multi" if v == "auto" else v  # Omi rewrites auto to multi (language detection)

    @field_validator("source")
    @classmethod
    def _plain_source(cls, v: str | None) -> str | None:
        return v.lower() if v is not None and re.fullmatch(r"[A-Za-z0-9_\-]{1,32}", v) else None

    def effective_timeout(self, minimum_s: int) -> int:
        """Seconds of silence that end the conversation: -1 is 4 h, below `minimum_s` is raised to it, above 4 h
        is lowered to 4 h (Omi's rules)."""
        if self.conversation_timeout == -1:
            return FOUR_HOURS_S
        return min(max(self.conversation_timeout, minimum_s), FOUR_HOURS_S)


class TranscriptSegment(BaseModel):
    id: str
    text: str
    speaker: str = "SPEAKER_0"
    speaker_id: int = 0
    is_user: bool = False
    person_id: str | None = None
    start: float
    end: float


class ServiceStatusEvent(BaseModel):
    type: Literal["service_status"] = "service_status"
    status: ServiceStatus
    status_text: str | None = None


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    code: str  # machine-readable: bad_frame, bad_command, stt_unavailable, ...
    message: str


USER_PERSON_ID = "user"  # speaker_assigned's person_id for the wearer (Omi: is_user true, person_id null)


class SpeakerAssigned(BaseModel):
    """Client command (Omi): a speaker of this conversation is the user (`person_id: "user"`) or a person (an id
    from `/v1/users/people`); `segment_ids` are the segments the user tagged. Omi acts when person_id is set and
    never answers with an error; neither does this server (a command it cannot apply is logged and ignored)."""

    type: Literal["speaker_assigned"]
    speaker_id: int | None = Field(None, ge=0, le=1_000_000)
    person_id: str = Field(min_length=1, max_length=128)
    person_name: str | None = Field(None, max_length=512)
    segment_ids: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=5000)

    @property
    def is_user(self) -> bool:
        return self.person_id == USER_PERSON_ID


class CloseCode:
    """Close codes of `/v4/listen`; each refusal or forced end also sends an `error` event with a machine code."""

    NORMAL = 1000
    GOING_AWAY = 1001  # idle; replaced by a newer stream; the server shutting down ("shutting_down", after the
    #                    stream's audio was finished and stored)
    POLICY = 1008  # auth, bad parameters; a slow client ("slow_client": it did not read its messages, see
    #                server._Client; its transcript is stored, re-read it from /v1/conversations)
    MESSAGE_TOO_BIG = 1009  # a frame over uvicorn's --ws-max-size (1 MiB as `make run` and the image start it):
    #                         closed by the WebSocket library before the frame reaches the app, no error event
    SERVER_ERROR = 1011  # STT gave up ("stt_unavailable"); any other failure of the stream ("internal_error")
    TRY_AGAIN_LATER = 1013  # server full ("server_full", also the model pool's queue full mid-stream); storage down
    #                         ("storage_unavailable"); the models stopped ("server_unavailable"); a new stream while
    #                         the server shuts down ("shutting_down": reconnect, the load balancer sends it elsewhere)
