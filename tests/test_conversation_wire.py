"""Conversations in Omi's wire shape: what `conversation_wire` makes passes a Python port of the Omi app's parsers
(`omi_app_conversation`, current and mid-2025 app), our old shape does not; then a real server process, with real
speech through the Deepgram-protocol test server: the WebSocket's `memory_processing_started` / `memory_created`
and every conversation route (list with Omi's filters, get, finish now, assign-bulk, delete, the `/v1/memories`
aliases), each answer through the ported parser, and one user's routes never reaching another's conversations."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server
from deepgram_server import ThreadedDeepgramTestServer
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
        parse_conversation_current({**good, "structured": {**good["structured"],
                                                           "action_items": [{"completed": True}]}})
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


# -- a real server: the WebSocket events and the REST routes ------------------------------------------------------


@pytest.fixture(scope="module")
def deepgram():
    with ThreadedDeepgramTestServer(api_key="dg-key") as server:
        yield server


def listen_url(server, timeout_s: int) -> str:
    return f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout={timeout_s}"


class Stream:
    """An open stream of one user that keeps reading: segments by id, and the JSON events."""

    def __init__(self, url: str, uid: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {uid}"}
        self.segments: dict[str, dict] = {}
        self.events: list[dict] = []

    async def __aenter__(self) -> Stream:
        from websockets.asyncio.client import connect

        self._connection = connect(self.url, additional_headers=self.headers, open_timeout=30)
        self.ws = await self._connection.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await asyncio.wait_for(self._reader, 10)
        await self._connection.__aexit__(*exc)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                payload = json.loads(message) if message != "ping" else None
                if isinstance(payload, list):
                    self.segments.update({s["id"]: s for s in payload})
                elif isinstance(payload, dict):
                    self.events.append(payload)
        except ConnectionClosed:
            pass

    async def send(self, audio: np.ndarray) -> None:
        for frame in pcm16_frames(np.concatenate([audio, np.zeros(SR, "f4")])):
            await self.ws.send(frame)

    async def until(self, check, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, (self.events, list(self.segments.values())[-3:])
            await asyncio.sleep(0.1)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events if e.get("type", "").startswith("memory")]


def segment_labels(r: httpx.Response) -> dict[str, tuple[bool, str | None]]:
    assert r.status_code == 200, r.text
    return {s["id"]: (s["is_user"], s["person_id"]) for s in parse_conversation(r.json())["transcript_segments"]}


async def test_the_app_parses_every_conversation_event_and_route(tmp_path, deepgram) -> None:
    audio = read_wav(SAMPLE_WAV)
    server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key",
                          MIN_CONVERSATION_TIMEOUT_S="1", SWEEP_INTERVAL_S="0.5", DATABASE_CHOICE="sqlite",
                          SQLITE_PATH=str(tmp_path / "wire.sqlite3"))
    uid, other = f"wire-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    try:
        async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {uid}"},
                                     timeout=60) as http, \
                httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {other}"},
                                  timeout=60) as intruder:
            # 1. The sweep closes a conversation: both events reach the open stream and parse.
            async with Stream(listen_url(server, 2), uid) as one:
                await one.send(audio[: 16 * SR])  # two speakers: several segments
                await one.until(lambda: "memory_created" in one.kinds())
            assert one.kinds() == ["memory_processing_started", "memory_created"]
            started, created = (parse_message_event(e) for e in one.events if e.get("type", "").startswith("memory"))
            assert started["status"] == "processing" and started["finished_at"] is None
            assert created["status"] == "completed" and not created["discarded"] and created["structured"]["title"]
            assert created["finished_at"] is not None and created["transcript_segments"]
            swept = created["id"]
            assert {s["id"] for s in created["transcript_segments"]} >= set(one.segments)

            # 2. The app's in-progress load, then "finish now" while the stream is open.
            async with Stream(listen_url(server, 600), uid) as two:
                await two.send(audio[20 * SR: 28 * SR])
                await two.until(lambda: any(s["end"] > 6.5 for s in two.segments.values()))
                await asyncio.sleep(2)  # the last words are in: none arrive after the finish to start a new one
                r = await http.get("/v1/conversations", params={"statuses": "in_progress", "limit": 1})
                live = [parse_conversation(c) for c in r.json()]
                assert r.status_code == 200 and len(live) == 1 and live[0]["status"] == "in_progress"
                assert live[0]["transcript_segments"] and live[0]["finished_at"] is None
                assert (await intruder.post("/v1/conversations", json={})).status_code == 404  # not theirs to finish
                r = await http.post("/v1/conversations", json={})
                assert r.status_code == 200, r.text
                finished = parse_create_response(r.json())
                assert finished["id"] == live[0]["id"] and finished["status"] == "completed"
                assert r.json()["messages"] == [] and r.json()["memory"] == r.json()["conversation"]
                await two.until(lambda: "memory_created" in two.kinds())
                assert parse_message_event(two.events[-1])["id"] == finished["id"]
            r = await http.post("/v1/conversations", json={})
            assert r.status_code == 404 and r.json()["detail"]

            # 3. A stream with no speech, finished now: discarded (Omi: completed + discarded).
            async with Stream(listen_url(server, 600), uid) as three:
                await three.send(np.zeros(SR, "f4"))
                await asyncio.sleep(0.5)
                r = await http.post("/v1/memories", json={})  # the old app's path
                gone = parse_create_response(r.json())
            assert (gone["status"], gone["discarded"], gone["transcript_segments"]) == ("completed", True, [])

            # 4. Lists with Omi's filters, every item parsed; the old parameters still work.
            async def ids(path: str = "/v1/conversations", client: httpx.AsyncClient = http, **params) -> list[str]:
                r = await client.get(path, params=params)
                assert r.status_code == 200, r.text
                return [parse_conversation(c)["id"] for c in r.json()]

            newest_first = [gone["id"], finished["id"], swept]
            assert await ids() == newest_first  # every status; discarded included as Omi's default
            assert await ids("/v1/memories") == newest_first
            assert await ids(include_discarded="false") == newest_first[1:]
            assert await ids(statuses="completed", include_discarded="true", limit=2) == newest_first[:2]
            assert await ids(statuses="completed", offset=1, limit=1) == [finished["id"]]
            assert await ids(statuses="") == newest_first  # Omi's processing,completed
            assert await ids(statuses="in_progress") == []
            assert await ids(statuses="failed") == []
            assert await ids(status="discarded") == [gone["id"]]
            assert await ids(before=time.time() + 60, limit=500) == newest_first  # a large limit is clamped
            assert await ids(end_date="2001-01-01T00:00:00Z") == []
            assert await ids(start_date="2001-01-01T00:00:00", end_date="2999-01-01T00:00:00+02:00") == newest_first
            assert await ids(client=intruder) == []
            for bad in ({"limit": 0}, {"offset": -1}, {"offset": 10**6}, {"start_date": "soon"}, {"status": "x"},
                        {"statuses": "completed," * 40}, {"include_discarded": "maybe"}):
                r = await http.get("/v1/conversations", params=bad)
                assert 400 <= r.status_code < 500 and r.json()["detail"], (bad, r.status_code, r.text)

            # 5. One conversation; assign-bulk answers the conversation after, as Omi does.
            r = await http.get(f"/v1/conversations/{swept}")
            stored = parse_conversation(r.json())
            assert r.json() == (await http.get(f"/v1/memories/{swept}")).json()
            assert [s["id"] for s in stored["transcript_segments"]] == [s["id"] for s in created["transcript_segments"]]
            assert len(stored["transcript_segments"]) >= 2, stored
            first, second = (s["id"] for s in stored["transcript_segments"][:2])
            path = f"/v1/conversations/{swept}/segments/assign-bulk"
            r = await http.patch(path, json={"segment_ids": [first, second, "no-such-id"], "assign_type": "is_user",
                                             "value": "true"})
            labels = segment_labels(r)
            assert r.status_code == 200 and labels[first] == labels[second] == (True, None)
            r = await http.patch(path, json={"segment_ids": [second], "assign_type": "person_id", "value": "p-42"})
            labels = segment_labels(r)
            assert labels[first] == (True, None) and labels[second] == (False, "p-42")
            r = await http.patch(path, json={"segment_ids": [second], "assign_type": "person_id", "value": None})
            assert {s["id"]: s["person_id"] for s in r.json()["transcript_segments"]}[second] is None
            again = parse_conversation((await http.get(f"/v1/conversations/{swept}")).json())
            assert {s["id"]: s["is_user"] for s in again["transcript_segments"]}[first] is True  # stored
            for bad in ({"segment_ids": [first], "assign_type": "nobody", "value": "x"},
                        {"segment_ids": ["s"] * 1001, "assign_type": "is_user", "value": "true"},
                        {"segment_ids": "s1", "assign_type": "is_user"}, {"assign_type": "is_user"}):
                r = await http.patch(path, json=bad)
                assert r.status_code == 422 and r.json()["detail"], (bad, r.text)
            r = await http.patch(path, content=b"not json", headers={"Content-Type": "application/json"})
            assert r.status_code == 422
            r = await intruder.patch(path, json={"segment_ids": [first], "assign_type": "person_id", "value": "x"})
            assert r.status_code == 404 and r.json()["detail"]
            assert (await intruder.get(f"/v1/conversations/{swept}")).status_code == 404
            assert (await http.patch("/v1/conversations/nope/segments/assign-bulk",
                                     json={"segment_ids": [], "assign_type": "is_user"})).status_code == 404

            # 6. Delete: 204 as Omi, then gone; not another user's.
            assert (await intruder.delete(f"/v1/conversations/{swept}")).status_code == 404
            r = await http.delete(f"/v1/conversations/{swept}")
            assert r.status_code == 204 and r.content == b""
            assert (await http.get(f"/v1/conversations/{swept}")).status_code == 404
            assert (await http.delete(f"/v1/conversations/{swept}")).status_code == 404
            assert (await http.delete(f"/v1/memories/{gone['id']}")).status_code == 204
            assert await ids() == [finished["id"]]
            async with Stream(listen_url(server, 600), uid):  # an in-progress conversation
                await asyncio.sleep(0.5)
                live_id = (await http.get("/v1/conversations", params={"statuses": "in_progress"})).json()[0]["id"]
                assert await ids() == [live_id, finished["id"]]  # no statuses: any
                assert await ids(statuses="") == [finished["id"]]  # the app's empty statuses: Omi's default
    finally:
        stop_server(server)
