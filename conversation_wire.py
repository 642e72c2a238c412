"""Conversations in Omi's wire shape (`backend/models/conversation.py`), the one the Omi app's
`ServerConversation.fromJson` parses: the WebSocket's `memory_processing_started` / `memory_created` events and the
REST routes send exactly this.

What the app's parsers require, current (`GeneratedConversation.fromJson`) and mid-2025 (hand-written `fromJson`):
ISO 8601 times with a zone (a number throws), `started_at` / `finished_at` present even when null (the current
parser requires the keys), the summary under `structured` with every field a string (the mid-2025 parser throws on a
null title, overview, emoji or category), `transcript_segments` a list, speakers `SPEAKER_<n>` (the mid-2025 app
parses the number), and lists where lists are read. Our stored status "discarded" is Omi's `completed` with
`discarded: true`; the app knows no other discarded state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from storage.base import Conversation, Segment

WIRE_STATUSES = ("in_progress", "processing", "completed", "failed")  # Omi's ConversationStatus
DEFAULT_EMOJI = "🧠"  # Omi's default for a conversation with no emoji of its own
DEFAULT_CATEGORY = "other"
_SPEAKER = re.compile(r"SPEAKER_-?\d+")
_SOURCE = re.compile(r"[a-z0-9_]{1,32}")


def iso(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC with its offset (Dart's DateTime.parse reads it, microseconds included)."""
    return None if t is None else datetime.fromtimestamp(t, tz=UTC).isoformat()


def wire_source(source: str | None) -> str:
    """A conversation's `source` as the app expects an enum name; anything else is shown as the wearable's."""
    return source if source and _SOURCE.fullmatch(source) else "omi"


def wire_status(conversation: Conversation) -> tuple[str, bool]:
    """(Omi's status, discarded)."""
    if conversation.status == "discarded":
        return "completed", True
    return conversation.status, False


def storage_statuses(statuses: Iterable[str], include_discarded: bool) -> set[str]:
    """The stored statuses that Omi's `statuses` filter selects: `completed` is also our "discarded" (Omi's
    completed + discarded) unless discarded ones are left out; `failed` and unknown names select nothing."""
    wanted = {s.strip() for s in statuses}
    chosen = wanted & {"in_progress", "processing", "completed"}
    if "completed" in wanted and include_discarded:
        chosen.add("discarded")
    return chosen


def segment_json(segment: Segment) -> dict[str, Any]:
    """A stored segment as the app's TranscriptSegment (the same fields the live stream sends, plus the defaults
    Omi's model has)."""
    speaker = segment.speaker if _SPEAKER.fullmatch(segment.speaker or "") else f"SPEAKER_{segment.speaker_id}"
    return {"id": segment.id, "text": segment.text, "speaker": speaker, "speaker_id": int(segment.speaker_id),
            "is_user": bool(segment.is_user), "person_id": segment.person_id, "start": float(segment.start),
            "end": float(segment.end), "translations": [], "speech_profile_processed": True, "stt_provider": None}


def _action_item(item: dict) -> dict[str, Any] | None:
    description = item.get("description") if isinstance(item, dict) else None
    if not isinstance(description, str) or not description.strip():
        return None  # the app requires a string description; an empty one is no action item
    return {"description": description, "completed": bool(item.get("completed", False)), "deleted": False}


def _event(item: dict) -> dict[str, Any] | None:
    """Omi's Event, or None for a stored one the app could not parse (a title and an ISO start are required)."""
    if not isinstance(item, dict) or not isinstance(item.get("title"), str) or not isinstance(item.get("start"), str):
        return None
    try:
        datetime.fromisoformat(item["start"])
    except ValueError:
        return None
    duration = item.get("duration", 30)
    return {"title": item["title"], "start": item["start"],
            "duration": duration if isinstance(duration, int) and not isinstance(duration, bool) else 30,
            "description": item.get("description") if isinstance(item.get("description"), str) else "",
            "created": bool(item.get("created", False))}


def structured_json(conversation: Conversation) -> dict[str, Any]:
    """Omi's Structured. A conversation without a summary yet (in progress, discarded) has empty strings, which
    both parsers accept and the app shows as an untitled conversation."""
    return {
        "title": conversation.title or "",
        "overview": conversation.overview or "",
        "emoji": conversation.emoji or DEFAULT_EMOJI,
        "category": conversation.category or DEFAULT_CATEGORY,
        "action_items": [a for a in map(_action_item, conversation.action_items) if a is not None],
        "events": [e for e in map(_event, conversation.events) if e is not None],
    }


def conversation_json(conversation: Conversation, segments: Iterable[Segment]) -> dict[str, Any]:
    """Omi's Conversation. `created_at` is when the conversation started (we create it then); `finished_at` is null
    until it is closed."""
    status, discarded = wire_status(conversation)
    return {
        "id": conversation.id,
        "created_at": iso(conversation.started_at),
        "started_at": iso(conversation.started_at),
        "finished_at": iso(conversation.finished_at),
        "source": wire_source(conversation.source),
        "language": conversation.language,
        "structured": structured_json(conversation),
        "transcript_segments": [segment_json(s) for s in segments],
        "geolocation": None,
        "photos": [],
        "audio_files": [],
        "apps_results": [],
        "plugins_results": [],
        "suggested_summarization_apps": [],
        "external_data": None,
        "status": status,
        "discarded": discarded,
        "deleted": False,
        "visibility": "private",
        "is_locked": False,
        "starred": False,
        "folder_id": None,
        "processing_memory_id": None,
    }


def memory_event(kind: str, conversation: Conversation, segments: Iterable[Segment]) -> dict[str, Any]:
    """`memory_processing_started` or `memory_created` (the latter with Omi's `messages`: apps' replies, none
    here)."""
    event: dict[str, Any] = {"type": kind, "memory": conversation_json(conversation, segments)}
    if kind == "memory_created":
        event["messages"] = []
    return event
