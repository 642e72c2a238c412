"""Conversations in Omi's wire shape: what `conversation_wire` makes passes a Python port of the Omi app's parsers
(`omi_app_conversation`, current and mid-2025 app), our old shape does not; then a real server process, with real
speech through the Deepgram-protocol test server: the WebSocket's `memory_processing_started` / `memory_created`
and every conversation route (list with Omi's filters, get, finish now, assign-bulk, delete, the `/v1/memories`
aliases), each answer through the ported parser, and one user's routes never reaching another's conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omi_app_conversation import (
    DartError,
    DartFormatException,
    DartRangeError,
    DartTypeError,
    parse_conversation,
    parse_conversation_2025,
    parse_conversation_current,
    parse_create_response,
    parse_message_event,
)

from conversation_wire import conversation_json, memory_event, storage_statuses
from conversations import ConversationService
from storage.base import Conversation, Segment
from storage.sqlite import SqliteStorage
from summaries import Summarizer, Summary

SR = 16000
T0 = 1_714_560_000.25  # 2024-05-01T10:40:00.25Z


def seg(cid: str, sid: str, start: float, text: str = "hello there", speaker_id: int = 0, **kw) -> Segment:
    return Segment(sid, cid, text, kw.pop("speaker", f"SPEAKER_{speaker_id}"), speaker_id, kw.pop("is_user", False),
                   kw.pop("person_id", None), start, start + 1.5)


def completed(**kw) -> Conversation:
    fields = {"uid": "u", "status": "completed", "started_at": T0, "finished_at": T0 + 95.5, "title": "Launch plan",
              "overview": "Agreed to ship Friday.", "emoji": "🚀", "category": "work", "source": "phone",
              "action_items": [{"description": "Fix the login bug", "completed": False}], **kw}
    return Conversation(**fields)


# -- the shape, against the ported parsers ------------------------------------------------------------------------


def test_completed_conversation_passes_both_app_parsers() -> None:
    c = completed(events=[{"title": "Ship", "start": "2024-05-03T09:00:00+00:00", "duration": 60}])
    segments = [seg(c.id, "s1", 0.0, is_user=True), seg(c.id, "s2", 2.0, speaker_id=1, person_id="p-9")]
    body = json.loads(json.dumps(conversation_json(c, segments)))  # as the app receives it
    parsed = parse_conversation(body)
    assert parsed["id"] == c.id and parsed["status"] == "completed" and parsed["discarded"] is False
    assert body["created_at"] == body["started_at"] == "2024-05-01T10:40:00.250000+00:00"
    assert parsed["finished_at"].timestamp() == pytest.approx(T0 + 95.5)
    s = parsed["structured"]
    assert (s["title"], s["overview"], s["emoji"], s["category"]) == ("Launch plan", "Agreed to ship Friday.", "🚀",
                                                                      "work")
    assert [(a["description"], a["completed"]) for a in s["action_items"]] == [("Fix the login bug", False)]
    assert [(e["title"], e["duration"]) for e in s["events"]] == [("Ship", 60)]
    assert [(t["id"], t["speaker"], t["speaker_id"], t["is_user"], t["person_id"]) for t in
            parsed["transcript_segments"]] == [("s1", "SPEAKER_0", 0, True, None), ("s2", "SPEAKER_1", 1, False, "p-9")]
    assert parsed["source"] == "phone" and parsed["language"] == "en"
    old = parse_conversation_2025(body)
    assert old["structured"]["title"] == "Launch plan" and old["transcript_segments"][1]["speaker_id"] == 1


def test_in_progress_and_discarded_conversations_parse() -> None:
    live = Conversation(uid="u", started_at=T0)  # no summary, not finished, no segments yet
    body = conversation_json(live, [])
    assert body["finished_at"] is None and body["transcript_segments"] == [] and body["status"] == "in_progress"
    parsed = parse_conversation(body)
    assert parsed["structured"]["title"] == "" and parsed["structured"]["emoji"] == "🧠"
    assert parse_conversation_2025(body)["structured"]["category"] == "other"

    gone = Conversation(uid="u", status="discarded", started_at=T0, finished_at=T0 + 5)
    parsed = parse_conversation(conversation_json(gone, []))
    assert (parsed["status"], parsed["discarded"]) == ("completed", True)  # Omi's only discarded state


def test_stored_oddities_are_made_parsable() -> None:
    c = completed(source="Some Device!", action_items=[{"description": ""}, {"completed": True}, {"description": "ok"}],
                  events=[{"title": "no start"}, {"title": "bad", "start": "soon"}, "junk"])
    segments = [seg(c.id, "s1", 0.0, speaker="Ann", speaker_id=3)]  # a speaker the mid-2025 app cannot parse
    body = conversation_json(c, segments)
    parsed = parse_conversation(body)
    assert body["source"] == "omi" and [a["description"] for a in parsed["structured"]["action_items"]] == ["ok"]
    assert parsed["structured"]["events"] == [] and parsed["transcript_segments"][0]["speaker"] == "SPEAKER_3"


def old_shape(c: Conversation, segments: list[Segment]) -> dict:
    """What conversations.conversation_event sent before: float epoch times, the title at the top level."""
    return {"id": c.id, "status": c.status, "started_at": c.started_at, "finished_at": c.finished_at, "title": c.title,
            "overview": c.overview, "language": c.language, "source": c.source,
            "transcript_segments": [{"id": s.id, "text": s.text, "speaker": s.speaker, "speaker_id": s.speaker_id,
                                     "is_user": s.is_user, "person_id": s.person_id, "start": s.start, "end": s.end}
                                    for s in segments]}


def test_our_old_shape_fails_both_parsers() -> None:
    c = completed()
    old = old_shape(c, [seg(c.id, "s1", 0.0)])
    with pytest.raises(DartTypeError, match="created_at"):  # DateTime.parse(null)
        parse_conversation_2025(old)
    with pytest.raises(DartFormatException, match="created_at|structured|started_at"):
        parse_conversation_current(old)
    # Each fault on its own is fatal: float times, and no `structured`.
    good = conversation_json(c, [])
    for key, value in (("started_at", T0), ("finished_at", T0 + 9), ("created_at", T0)):
        with pytest.raises(DartError):
            parse_conversation_2025({**good, key: value})
        with pytest.raises(DartError):
            parse_conversation_current({**good, key: value})
    without = {k: v for k, v in good.items() if k != "structured"}
    for parse in (parse_conversation_2025, parse_conversation_current):
        with pytest.raises(DartError):
            parse(without)


def test_the_port_is_as_strict_as_the_dart_code() -> None:
    c = completed()
    good = conversation_json(c, [seg(c.id, "s1", 0.0)])
    segment = good["transcript_segments"][0]

    def with_segment(**change) -> dict:
        return {**good, "transcript_segments": [{k: v for k, v in {**segment, **change}.items() if v != "DROP"}]}

    with pytest.raises(DartFormatException, match="is_user"):  # required by the generated parser
        parse_conversation_current(with_segment(is_user="DROP"))
    with pytest.raises(DartRangeError):  # mid-2025: int.parse(speaker.split('_')[1])
        parse_conversation_2025(with_segment(speaker="S1"))
    with pytest.raises(DartFormatException):
        parse_conversation_2025(with_segment(speaker="SPEAKER_x"))
    with pytest.raises(DartTypeError):  # (json['text'] as String)
        parse_conversation_2025(with_segment(text=None))
    with pytest.raises(DartFormatException, match="finished_at"):  # the key is required, even when null
        parse_conversation_current({k: v for k, v in good.items() if k != "finished_at"})
    with pytest.raises(DartTypeError, match="title"):  # Structured(json['title'], ...) with null
        parse_conversation_2025({**good, "structured": {**good["structured"], "title": None}})
    with pytest.raises(DartTypeError):
        parse_conversation_2025({**good, "transcript_segments": None, "photos": {}})
    with pytest.raises(DartFormatException, match="description"):
        parse_conversation_current({**good, "structured": {**good["structured"], "action_items": [{"completed": True}]}})
    with pytest.raises(DartTypeError, match="discarded"):
        parse_conversation_2025({**good, "discarded": "no"})
    with pytest.raises(DartError):
        parse_create_response({"conversation": good, "messages": []})  # older apps read only `memory`


def test_memory_events_and_status_mapping() -> None:
    c = completed(status="processing", title=None, overview=None, finished_at=None)
    started = memory_event("memory_processing_started", c, [seg(c.id, "s1", 0.0)])
    assert set(started) == {"type", "memory"} and parse_message_event(started)["status"] == "processing"
    created = memory_event("memory_created", completed(), [])
    assert created["messages"] == [] and parse_message_event(json.loads(json.dumps(created)))["status"] == "completed"

    assert storage_statuses(["processing", "completed"], True) == {"processing", "completed", "discarded"}
    assert storage_statuses(["completed"], False) == {"completed"}
    assert storage_statuses(["in_progress", " failed", "merging", "junk"], True) == {"in_progress"}
    assert storage_statuses(["failed"], True) == set()


class _Fixed(Summarizer):
    async def summarize(self, conversation, segments) -> Summary:
        return Summary("Beta launch", "Ship Friday.", "🚀", "work", ("Fix login", "  ", "Email Ann"))


async def test_closing_saves_the_summary_and_sends_parsable_events(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "close.sqlite3")
    await store.open()
    events: list[dict] = []
    try:
        service = ConversationService(store, summarizer=_Fixed())

        async def listener(event: dict) -> None:
            events.append(json.loads(json.dumps(event)))

        service.listen("u1", listener)
        conv = await service.attach("u1", "en", 120.0, now=T0, source="desktop")
        again = await service.attach("u1", "en", 120.0, now=T0 + 5, source="phone")  # continued: keeps its source
        assert again.id == conv.id and again.source == "desktop"
        await service.record(conv, [seg(conv.id, "a", 0.0, "We ship."), seg(conv.id, "b", 1.6, "On Friday.")],
                             now=T0 + 3)
        closed = await service.close(conv, now=T0 + 200)
        stored = await store.get_conversation("u1", conv.id)
        assert stored == closed and (stored.emoji, stored.category) == ("🚀", "work")
        assert stored.action_items == [{"description": "Fix login", "completed": False},
                                       {"description": "Email Ann", "completed": False}]
        assert [e["type"] for e in events] == ["memory_processing_started", "memory_created"]
        memory = parse_message_event(events[1])
        assert memory["structured"]["title"] == "Beta launch" and len(memory["structured"]["action_items"]) == 2
        # The stored segments, with the ids the stream used (REST returns the same ones).
        assert [s["id"] for s in memory["transcript_segments"]] == ["a", "b"]
        assert parse_message_event(events[0])["transcript_segments"][0]["id"] == "a"

        odd = await service.attach("u2", "en", 120.0, now=T0, source="x" * 99)
        assert odd.source == "omi"
    finally:
        await store.close()
