"""Wire messages of `/v4/listen` (Omi-compatible) as pydantic models.

Server → client: a bare JSON array of `TranscriptSegment`s (upserted by `id`; the last one may grow), and event
objects with a `type`. Client → server: binary audio frames, and JSON text commands with a `type`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from streaming.codecs import SUPPORTED_CODECS

ServiceStatus = Literal["initiating", "stt_initiating", "ready"]


class ListenParams(BaseModel):
    """Query parameters of `/v4/listen`, defaults as in Omi."""

    language: str = Field("en", min_length=2, max_length=16, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$|^multi$")
    sample_rate: int = Field(8000, ge=8000, le=48000)
    codec: str = "pcm8"
    channels: int = Field(1, ge=1, le=2)
    include_speech_profile: bool = True
    conversation_timeout: int = Field(120, ge=1, le=4 * 3600)  # the floor is MIN_CONVERSATION_TIMEOUT_S
    stt_service: str | None = None  # accepted for compatibility; the server's STT_BACKEND decides

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        if v not in SUPPORTED_CODECS:
            raise ValueError(f"codec must be one of {', '.join(SUPPORTED_CODECS)}")
        return v


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


class SpeakerAssigned(BaseModel):
    """Client command (Omi): a conversation cluster is this person. Handled by speaker tagging (issue 3)."""

    type: Literal["speaker_assigned"]
    speaker_id: int
    person_id: str
    person_name: str | None = None
    segment_ids: list[str] = []


class CloseCode:
    """Close codes of `/v4/listen`; each refusal or forced end also sends an `error` event with a machine code."""

    NORMAL = 1000
    GOING_AWAY = 1001  # idle; replaced by a newer stream; the server shutting down ("shutting_down", after the
    #                    stream's audio was finished and stored)
    POLICY = 1008  # auth, bad parameters; a slow client ("slow_client": it did not read its messages, see
    #                server._Client; its transcript is stored, re-read it from /v1/conversations)
    SERVER_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # server full ("server_full"); storage down; a new stream while the server shuts down
    #                         ("shutting_down": reconnect, the load balancer sends it elsewhere)
