"""Deepgram's JSON shapes, as deepgram-sdk 7.17 (`deepgram.listen.v1.types`, `deepgram.types.listen_v1response`)
and `@deepgram/sdk` 5.13 parse them; the same shapes the tests' stand-in for Deepgram (tests/deepgram_server.py)
sends. Pure: no I/O."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from deepgram_compat.options import ListenOptions
from streaming.stt import Word

CHANNEL_INDEX = [0, 1]  # (channel, of channels): one transcript
_BARE = re.compile(r"[^\w'-]+")


@dataclass(frozen=True)
class ModelInfo:
    """What the responses say transcribed the audio: this server's STT backend, not a Deepgram model."""

    uuid: str
    name: str
    arch: str
    version: str = "omi-unified"

    @classmethod
    def for_backend(cls, backend: str, requested_model: str) -> ModelInfo:
        model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"omi-unified-server/{backend}/{requested_model}"))
        return cls(model_uuid, f"omi-{backend}", backend)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "arch": self.arch}


@dataclass(frozen=True)
class TimedWord:
    """A word on the stream's (or file's) clock, with its speaker when diarization ran."""

    word: Word
    start: float
    end: float
    speaker: int | None = None


def created_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def word_json(w: TimedWord, options: ListenOptions) -> dict[str, Any]:
    """`word` is the bare lower-case word; `punctuated_word` as the STT wrote it (punctuation and case) when
    punctuate or smart_format asked for it, as Deepgram does."""
    text = w.word.text.strip()
    bare = _BARE.sub("", text).lower() or text.lower()
    out: dict[str, Any] = {"word": bare, "start": round(w.start, 3), "end": round(w.end, 3),
                           "confidence": round(float(w.word.confidence), 4)}
    if options.punctuated:
        out["punctuated_word"] = text
    if options.diarize:
        out["speaker"] = w.speaker if w.speaker is not None else 0
        out["speaker_confidence"] = 1.0 if w.speaker is not None else 0.0
    return out


def transcript_text(words: Sequence[dict[str, Any]]) -> str:
    return " ".join(w.get("punctuated_word", w["word"]) for w in words)


def mean_confidence(words: Sequence[dict[str, Any]]) -> float:
    return round(sum(w["confidence"] for w in words) / len(words), 4) if words else 0.0


def results(words: Sequence[TimedWord], options: ListenOptions, *, start: float, end: float, is_final: bool,
            speech_final: bool, from_finalize: bool, request_id: str, model: ModelInfo) -> dict[str, Any]:
    """A live `Results` message covering stream seconds [start, end)."""
    items = [word_json(w, options) for w in words]
    return {
        "type": "Results",
        "channel_index": CHANNEL_INDEX,
        "duration": round(max(end - start, 0.0), 3),
        "start": round(start, 3),
        "is_final": is_final,
        "speech_final": speech_final,
        "from_finalize": from_finalize,
        "channel": {"alternatives": [{"transcript": transcript_text(items), "confidence": mean_confidence(items),
                                      "words": items}]},
        "metadata": {"request_id": request_id, "model_info": model.as_dict(), "model_uuid": model.uuid},
    }


def metadata(*, request_id: str, sha256: str, created: str, duration: float, channels: int,
             model: ModelInfo) -> dict[str, Any]:
    """The live stream's last message, after `CloseStream`."""
    return {"type": "Metadata", "transaction_key": "deprecated", "request_id": request_id, "sha256": sha256,
            "created": created, "duration": round(duration, 3), "channels": channels, "models": [model.uuid],
            "model_info": {model.uuid: model.as_dict()}}


def utterance_end(last_word_end: float) -> dict[str, Any]:
    return {"type": "UtteranceEnd", "channel": CHANNEL_INDEX, "last_word_end": round(last_word_end, 3)}


def speech_started(timestamp: float) -> dict[str, Any]:
    return {"type": "SpeechStarted", "channel": CHANNEL_INDEX, "timestamp": round(timestamp, 3)}


def error(description: str, variant: str = "Error") -> dict[str, Any]:
    """A live `Error` message (the socket may stay open: e.g. `SchemaError` for a client message not understood)."""
    return {"type": "Error", "variant": variant, "description": description}


def http_error(err_code: str, err_msg: str, request_id: str) -> dict[str, str]:
    """Deepgram's error body for an HTTP refusal (the upgrade's or a prerecorded request's)."""
    return {"err_code": err_code, "err_msg": err_msg, "request_id": request_id}


def _utterances(words: Sequence[TimedWord], options: ListenOptions, regions: Sequence[tuple[float, float]],
                ) -> list[dict[str, Any]]:
    """Deepgram's utterances: runs of words of one speaker within one speech region."""
    out: list[dict[str, Any]] = []
    run: list[TimedWord] = []

    def region_of(w: TimedWord) -> int:
        return next((i for i, (s, e) in enumerate(regions) if s <= w.start < e), -1)

    def close() -> None:
        if run:
            items = [word_json(w, options) for w in run]
            out.append({"start": items[0]["start"], "end": items[-1]["end"], "confidence": mean_confidence(items),
                        "channel": 0, "transcript": transcript_text(items), "words": items,
                        "speaker": run[0].speaker if run[0].speaker is not None else 0, "id": str(uuid.uuid4())})
            run.clear()

    for w in words:
        if run and (w.speaker != run[-1].speaker or region_of(w) != region_of(run[-1])):
            close()
        run.append(w)
    close()
    return out


def prerecorded_response(words: Sequence[TimedWord], options: ListenOptions, *, duration: float, sha256: str,
                         request_id: str, model: ModelInfo,
                         regions: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """`POST /v1/listen`'s answer: metadata, results.channels[0].alternatives[0], and utterances when asked."""
    items = [word_json(w, options) for w in words]
    body: dict[str, Any] = {
        "metadata": {"transaction_key": "deprecated", "request_id": request_id, "sha256": sha256,
                     "created": created_now(), "duration": round(duration, 3), "channels": 1,
                     "models": [model.uuid], "model_info": {model.uuid: model.as_dict()}},
        "results": {"channels": [{"alternatives": [{"transcript": transcript_text(items),
                                                    "confidence": mean_confidence(items), "words": items}]}]},
    }
    if options.utterances:
        body["results"]["utterances"] = _utterances(words, options, regions)
    return body
