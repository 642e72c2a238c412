"""The query parameters of Deepgram's `/v1/listen` that this server acts on, checked.

Deepgram's SDKs send booleans as "true"/"false" strings and numbers as strings; pydantic coerces both. Parameters
this server does not implement (keywords, redact, search, ...) are accepted and ignored, as the features they ask
for are extras on top of a transcript; `multichannel=true` is refused, as its results would not be per channel.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streaming.codecs import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

# Deepgram's encoding names → this server's decoders. `opus`: one raw Opus packet per binary message (as Omi devices
# send it), not an Ogg stream.
ENCODINGS = {"linear16": "pcm16", "opus": "opus"}


class OptionsError(ValueError):
    """A query parameter Deepgram would refuse (HTTP 400); the message says which and why."""


class ListenOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field("nova-3", min_length=1, max_length=64)  # reported back; the server's STT_BACKEND decides
    language: str = Field("en", min_length=2, max_length=16,
                          pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$|^multi$")
    encoding: Literal["linear16", "opus"] | None = None
    sample_rate: int | None = Field(None, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)
    channels: int = Field(1, ge=1, le=2)  # two channels are mixed down to one transcript
    multichannel: bool = False
    punctuate: bool = False
    smart_format: bool = False
    diarize: bool = False
    interim_results: bool = False
    vad_events: bool = False
    utterances: bool = False
    utterance_end_ms: int | None = Field(None, ge=1, le=60_000)
    # Accepted: a region's end (speech_final) comes from this server's VAD gate (VAD_HANGOVER_MS), not from it.
    endpointing: int | Literal[False] | None = None

    @field_validator("endpointing", mode="before")
    @classmethod
    def _endpointing(cls, v: object) -> object:
        return False if isinstance(v, str) and v.lower() == "false" else v

    @field_validator("multichannel")
    @classmethod
    def _one_transcript(cls, v: bool) -> bool:
        if v:
            raise ValueError("multichannel=true is not supported: send one channel (or two, mixed down)")
        return v

    @property
    def punctuated(self) -> bool:
        return self.punctuate or self.smart_format  # Deepgram's smart_format punctuates too

    @property
    def codec(self) -> str:
        """This server's decoder for the live stream's `encoding` (checked by `live_options`)."""
        assert self.encoding is not None
        return ENCODINGS[self.encoding]


def parse_options(query: dict[str, str]) -> ListenOptions:
    try:
        return ListenOptions(**query)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'query'}: {e['msg']}" for e in exc.errors())
        raise OptionsError(problems) from None


def live_options(query: dict[str, str]) -> ListenOptions:
    """A live stream's options: raw audio needs its `encoding` and `sample_rate` (containerized audio, which
    Deepgram detects when no encoding is given, is not decoded on the live stream here)."""
    options = parse_options(query)
    if options.encoding is None:
        raise OptionsError("encoding is required on the live stream: linear16 or opus (containerized audio such as "
                           "WAV or MP3 is only taken by POST /v1/listen)")
    if options.sample_rate is None:
        raise OptionsError(f"sample_rate is required with encoding={options.encoding}")
    return options
