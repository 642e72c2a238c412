"""The Omi app's side of `/v4/listen`, ported to Python, to drive a real server exactly as the app does.

Ported from BasedHardware/omi (read with the search tool; paths in that repository):
- the query the app builds (`app/lib/services/sockets/transcription_service.dart@020ad86d`) and its
  `Authorization: Bearer <token>` header (`app/lib/backend/http/shared.dart`);
- its answer to the server's text frame `ping`: the binary frame `8a 00` (`pure_socket.dart@019283de`);
- how each app version applies a segment array (`transcript_segment.dart@a2db53f6`, `updateSegments` and
  `combineSegments`; capture_provider `_processNewSegmentReceived`):
  - "2025": replace the segments it holds by id, then combine the rest: adjacent new segments of the same
    `speaker` and `is_user` join into one, and the first joins the app's last segment when speaker and is_user are
    the same and it starts < 30 s after that one ends; a joined segment's id is dropped;
  - "new": replace by id, append the rest; `segments_deleted` removes ids;
- its parsers: segments through `segment_2025` / `generated_transcript_segment`, conversations through the port in
  `omi_app_conversation.py`.

What the app shows is `AppTranscript.segments`: the tests check that each word the STT produced is shown once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

from omi_app_conversation import generated_transcript_segment, parse_message_event, segment_2025

KEEPALIVE = b"\x8a\x00"  # the app's answer to "ping"
APP_MERGE_GAP_S = 30  # combineSegments' withinThreshold

AppVersion = Literal["2025", "new"]


def listen_query(uid: str, *, codec: str = "opus", sample_rate: int = 16000, language: str = "en",
                 conversation_timeout: int = 120, source: str | None = "phone", stt_service: str = "soniox",
                 include_speech_profile: bool = True, custom_stt: bool = False, channels: int | None = None) -> str:
    """The query string as transcription_service.dart builds it (uid included: the server must ignore it)."""
    params: dict[str, Any] = {
        "language": language, "sample_rate": sample_rate, "codec": codec, "uid": uid,
        "include_speech_profile": str(include_speech_profile).lower(), "stt_service": stt_service,
        "conversation_timeout": conversation_timeout,
    }
    if source:
        params["source"] = source
    if custom_stt:
        params["custom_stt"] = "enabled"
    if channels is not None:
        params["channels"] = channels
    return urlencode(params)


@dataclass
class AppSegment:
    id: str
    text: str
    speaker: str
    is_user: bool
    person_id: str | None
    start: float
    end: float


def parse_segment(raw: Any, version: AppVersion) -> AppSegment:
    """TranscriptSegment.fromJson of that version (raises where the Dart code would throw)."""
    if version == "2025":
        j = segment_2025(raw)
    else:
        j = generated_transcript_segment(raw)
        j = {**j, "id": j["id"] or "", "speaker": j["speaker"] or "SPEAKER_00"}
    return AppSegment(j["id"], j["text"], j["speaker"], j["is_user"], j["person_id"], j["start"], j["end"])


class AppTranscript:
    """The transcript one app version shows for a conversation, from the messages of `/v4/listen`."""

    def __init__(self, version: AppVersion) -> None:
        self.version = version
        self.segments: list[AppSegment] = []

    def load(self, segments: list[dict]) -> None:
        """The in-progress conversation loaded by REST on the session's first segment."""
        self.segments = [parse_segment(s, self.version) for s in segments]

    def apply(self, payload: list[Any]) -> None:
        new = [parse_segment(s, self.version) for s in payload]
        remaining = self._update(new)
        if self.version == "new":
            self.segments.extend(remaining)
        else:
            self._combine(remaining)

    def delete(self, ids: list[str]) -> None:
        if self.version == "new":
            gone = set(ids)
            self.segments = [s for s in self.segments if s.id not in gone]

    def _update(self, new: list[AppSegment]) -> list[AppSegment]:
        if not new:
            return []
        if not self.segments:
            return new
        by_id = {s.id: s for s in new}
        for i, seg in enumerate(self.segments):
            if seg.id in by_id:
                self.segments[i] = by_id.pop(seg.id)
        return [s for s in new if s.id in by_id]

    def _combine(self, new: list[AppSegment]) -> None:
        joined: list[AppSegment] = []
        for seg in new:
            if joined and joined[-1].is_user == seg.is_user and joined[-1].speaker == seg.speaker:
                joined[-1].text += f" {seg.text}"
                joined[-1].end = seg.end
            else:
                joined.append(seg)
        if not joined:
            return
        last = self.segments[-1] if self.segments else None
        if (last is not None and last.is_user == joined[0].is_user and last.speaker == joined[0].speaker
                and joined[0].start - last.end < APP_MERGE_GAP_S):
            last.text += f" {joined[0].text}"
            last.end = joined[0].end
            joined.pop(0)
        self.segments.extend(joined)


@dataclass
class AppSession:
    """What one app connection saw."""

    apps: dict[str, AppTranscript] = field(default_factory=lambda: {v: AppTranscript(v) for v in ("2025", "new")})
    events: list[dict] = field(default_factory=list)
    raw_segments: dict[str, dict] = field(default_factory=dict)  # the server's latest version of each id
    pings: int = 0
    keepalives_sent: int = 0
    first_segment: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind]


class AppConnection:
    """One app connection to `/v4/listen`: answers pings, applies segments in each app version, parses events."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.session = AppSession()
        self.changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        s = self.session
        try:
            async for message in self.ws:
                if message == "ping":
                    s.pings += 1
                    await self.ws.send(KEEPALIVE)
                    s.keepalives_sent += 1
                    continue
                payload = json.loads(message)
                if isinstance(payload, list):
                    for app in s.apps.values():
                        app.apply(payload)
                    for seg in payload:
                        s.raw_segments[seg["id"]] = seg
                    if payload:
                        s.first_segment.set()
                else:
                    if payload.get("type") in ("memory_processing_started", "memory_created"):
                        parse_message_event(payload)  # raises where the app's parser would throw
                    if payload.get("type") == "segments_deleted":
                        for app in s.apps.values():
                            app.delete(payload["segment_ids"])
                    s.events.append(payload)
                self.changed.set()
        except ConnectionClosed:
            pass
        finally:
            s.close_code = self.ws.close_code
            self.changed.set()

    async def wait_for(self, condition, timeout_s: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition(self.session):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or self._reader.done():
                return condition(self.session)
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=remaining)
        return True

    async def send_audio(self, frames: list[bytes], pace_s: float = 0.0) -> None:
        for frame in frames:
            await self.ws.send(frame)
            if pace_s:
                await asyncio.sleep(pace_s)

    async def send_json(self, command: dict) -> None:
        await self.ws.send(json.dumps(command))

    async def close(self) -> AppSession:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, timeout=30)
        return self.session

    @property
    def closed(self) -> bool:
        return self._reader.done()
