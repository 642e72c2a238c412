"""The storage contract: one suite, run against every backend that can run here (`BACKENDS`).

Adding a backend = one more entry in `BACKENDS` and one more branch in `make_store`. PostgreSQL runs on the local
server (TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test), each test in a fresh, randomly named
schema dropped afterwards; it is skipped when the server cannot be reached, unless CI is set (then it fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import numpy as np
import pytest

from storage.base import (
    USER_SETTING_KEY_MAX,
    USER_SETTING_VALUE_MAX,
    Conversation,
    Segment,
    SpeakerProfile,
    Storage,
    User,
)

BACKENDS = ["sqlite", "postgres", "firestore"]
PG_DSN = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
T0 = 1_700_000_000.0
DIM = 8

# -- backends --------------------------------------------------------------------------------------------------------

_pg_unreachable: list[str] = []  # the reason, once known (checked once per session)
_pg_checked = False


async def require_postgres() -> None:
    global _pg_checked
    if not _pg_checked:
        _pg_checked = True
        try:
            con = await asyncpg.connect(PG_DSN, timeout=5)
            await con.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            _pg_unreachable.append(f"PostgreSQL at TEST_POSTGRES_URL is unreachable ({type(exc).__name__})")
    if _pg_unreachable:
        if os.environ.get("CI"):
            pytest.fail(f"{_pg_unreachable[0]}, and CI is set: the postgres contract must run")
        pytest.skip(_pg_unreachable[0])


async def drop_schema(schema: str) -> None:
    con = await asyncpg.connect(PG_DSN)
    try:
        await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await con.close()


def fresh_schema() -> str:
    return f"contract_{uuid.uuid4().hex[:16]}"


@contextlib.asynccontextmanager
async def make_store(kind: str, tmp_path: Path) -> AsyncIterator[Storage]:
    """An open, empty store of this backend, closed (and its data dropped) afterwards."""
    if kind == "sqlite":
        from storage.sqlite import SqliteStorage

        store: Storage = SqliteStorage(tmp_path / "contract.sqlite3")
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    elif kind == "postgres":
        from storage.postgres import PostgresStorage

        await require_postgres()
        schema = fresh_schema()
        store = PostgresStorage(PG_DSN, schema=schema)
        try:
            await store.open()
            yield store
        finally:
            await store.close()
            await drop_schema(schema)
    elif kind == "firestore":  # against an in-memory stand-in: no Firestore emulator can run here
        from storage.firestore import FirestoreStorage
        from tests.firestore_fake import FakeAsyncClient

        store = FirestoreStorage(FakeAsyncClient())
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    else:
        raise ValueError(f"unknown backend {kind}")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with make_store(request.param, tmp_path) as opened:
        yield opened


# -- builders ----------------------------------------------------------------------------------------------------------


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def profile(uid: str, kind: str = "person", n: int = 2, seed: int = 0, **kw) -> SpeakerProfile:
    return SpeakerProfile(uid=uid, kind=kind, model="test-embedder", embeddings=unit_vectors(n, seed=seed), **kw)


def conversation(uid: str, started: float = T0, **kw) -> Conversation:
    kw.setdefault("last_activity_at", started)
    return Conversation(uid=uid, started_at=started, **kw)


def segment(conversation_id: str, sid: str, start: float, end: float | None = None, text: str = "hello",
            **kw) -> Segment:
    kw.setdefault("speaker", "SPEAKER_0")
    kw.setdefault("speaker_id", 0)
    kw.setdefault("is_user", False)
    kw.setdefault("person_id", None)
    return Segment(id=sid, conversation_id=conversation_id, text=text, start=start,
                   end=start + 1.0 if end is None else end, **kw)


def same_profile(a: SpeakerProfile, b: SpeakerProfile) -> bool:
    return (a.id, a.uid, a.kind, a.model, a.name, a.speech_seconds, a.created_at, a.updated_at) == \
        (b.id, b.uid, b.kind, b.model, b.name, b.speech_seconds, b.created_at, b.updated_at) and \
        a.embeddings.dtype == b.embeddings.dtype == np.float32 and a.embeddings.shape == b.embeddings.shape and \
        a.embeddings.tobytes() == b.embeddings.tobytes()


# -- basics ------------------------------------------------------------------------------------------------------------


async def test_ping_while_open_and_not_after_close(store: Storage) -> None:
    assert await store.ping() is True
    await store.close()
    assert await store.ping() is False


# -- speaker profiles --------------------------------------------------------------------------------------------------


async def test_profiles_save_list_get_delete(store: Storage) -> None:
    alice = profile("a", name="Alice", seed=1, speech_seconds=12.5, created_at=T0 + 1)
    bob = profile("a", name="Bob", seed=2, created_at=T0 + 2)
    me = profile("a", kind="user", seed=3, created_at=T0)
    for p in (bob, alice, me):
        await store.save_profile(p)

    listed = await store.list_profiles("a")
    assert [p.id for p in listed] == [me.id, alice.id, bob.id]  # oldest first
    assert all(same_profile(got, want) for got, want in zip(listed, (me, alice, bob), strict=True))
    assert same_profile(await store.get_profile("a", alice.id), alice)
    assert same_profile(await store.user_profile("a"), me)
    assert await store.get_profile("a", "nope") is None

    alice.name, alice.embeddings = "Alice B.", unit_vectors(1, seed=9)  # save again: replaced, embeddings too
    await store.save_profile(alice)
    assert same_profile(await store.get_profile("a", alice.id), alice)

    assert await store.delete_profile("a", alice.id) is True
    assert await store.delete_profile("a", alice.id) is False
    assert await store.get_profile("a", alice.id) is None
    assert [p.id for p in await store.list_profiles("a")] == [me.id, bob.id]


async def test_profile_without_embeddings(store: Storage) -> None:
    empty = SpeakerProfile(uid="a", kind="person", model="m", embeddings=np.zeros((0, DIM), np.float32), name="X")
    await store.save_profile(empty)
    got = await store.get_profile("a", empty.id)
    assert got.embeddings.shape == (0, DIM)
    assert await store.add_profile_embeddings("a", empty.id, unit_vectors(1), 3.0) is True
    assert (await store.get_profile("a", empty.id)).embeddings.shape == (1, DIM)


async def test_user_profile_is_replaced_by_a_new_enrolment(store: Storage) -> None:
    first = profile("a", kind="user", seed=1)
    person = profile("a", name="Pat", seed=2)
    other_user = profile("b", kind="user", seed=3)
    for p in (first, person, other_user):
        await store.save_profile(p)
    second = profile("a", kind="user", seed=4)
    await store.save_profile(second)

    assert same_profile(await store.user_profile("a"), second)
    assert await store.get_profile("a", first.id) is None
    assert {p.id for p in await store.list_profiles("a")} == {second.id, person.id}
    assert same_profile(await store.user_profile("b"), other_user)  # another uid's is untouched

    racing = [profile("a", kind="user", seed=10 + i) for i in range(5)]  # enrolments at once: one survives
    await asyncio.gather(*(store.save_profile(p) for p in racing))
    users = [p for p in await store.list_profiles("a") if p.kind == "user"]
    assert len(users) == 1 and users[0].id in {p.id for p in racing}


async def test_add_profile_embeddings_appends_and_validates(store: Storage) -> None:
    p = profile("a", n=2, seed=1, speech_seconds=10.0, updated_at=T0)
    await store.save_profile(p)
    more = unit_vectors(3, seed=2)
    assert await store.add_profile_embeddings("a", p.id, more, 7.5) is True
    got = await store.get_profile("a", p.id)
    assert got.embeddings.tobytes() == np.concatenate([p.embeddings, more]).tobytes()  # appended, in order
    assert got.speech_seconds == 17.5 and got.updated_at > T0

    with pytest.raises(ValueError):
        await store.add_profile_embeddings("a", p.id, unit_vectors(1, dim=DIM + 1), 1.0)
    assert await store.add_profile_embeddings("a", "no-such-profile", more, 1.0) is False
    assert await store.add_profile_embeddings("b", p.id, more, 1.0) is False  # another user's profile
    after = await store.get_profile("a", p.id)
    assert after.embeddings.shape == (5, DIM) and after.speech_seconds == 17.5  # nothing written by the failures


async def test_embeddings_round_trip_bit_exactly(store: Storage) -> None:
    tricky = np.array([[0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38, np.pi, 1 / 3, np.nan],
                       [np.inf, -np.inf, 1.1754942e-38, 0.1, -0.1, 2.5e-8, 7.0, -1.0]], dtype=np.float32)
    p = SpeakerProfile(uid="a", kind="person", model="m", embeddings=tricky)
    await store.save_profile(p)
    await store.add_profile_embeddings("a", p.id, tricky[::-1].copy(), 0.0)
    got = (await store.get_profile("a", p.id)).embeddings
    assert got.dtype == np.float32 and got.shape == (4, 8)
    assert got.tobytes() == np.concatenate([tricky, tricky[::-1]]).tobytes()
    got[0, 0] = 5.0  # a writable copy, not a view of the driver's buffer


async def test_profiles_are_isolated_between_users(store: Storage) -> None:
    mine = profile("a", kind="user", seed=1)
    theirs = profile("a", name="Friend", seed=2)
    await store.save_profile(mine)
    await store.save_profile(theirs)

    assert await store.list_profiles("b") == []
    assert await store.user_profile("b") is None
    assert await store.get_profile("b", theirs.id) is None
    assert await store.delete_profile("b", theirs.id) is False
    assert await store.add_profile_embeddings("b", theirs.id, unit_vectors(1), 1.0) is False
    await store.save_profile(profile("b", kind="user", seed=3))  # b's enrolment does not replace a's
    assert same_profile(await store.user_profile("a"), mine)
    assert len(await store.list_profiles("a")) == 2


async def test_saving_a_profile_with_another_users_id_is_refused(store: Storage, request) -> None:
    mine = profile("a", name="Alice", seed=1)
    await store.save_profile(mine)
    with pytest.raises(KeyError):
        await store.save_profile(profile("b", name="Mallory", seed=2, id=mine.id))
    assert same_profile(await store.get_profile("a", mine.id), mine)


# -- users -------------------------------------------------------------------------------------------------------------


async def test_users_save_get_list(store: Storage) -> None:
    assert await store.get_user("a") is None and await store.list_users() == []
    b = User(uid="b", time_zone="Europe/Paris", webhook_url="https://example.org/hook", fcm_token="tok",
             created_at=T0)
    a = User(uid="a", created_at=T0 + 1)
    await store.save_user(b)
    await store.save_user(a)
    assert await store.get_user("b") == b
    assert await store.list_users() == [a, b]  # by uid

    b.time_zone, b.webhook_url = "America/New_York", None
    await store.save_user(b)
    assert await store.get_user("b") == b
    assert len(await store.list_users()) == 2


# -- user settings -----------------------------------------------------------------------------------------------------

SETTING = {"url": "https://example.org/hook?a=1&b=\u00e9", "secret": "s3cr\u20act-\U0001f511", "enabled": True,
           "paused": False, "note": None, "count": 3, "whole": 1.0, "ratio": 0.1, "tiny": 1e-7, "huge": 1.5e300,
           "e20": 1e20, "subnormal": 5e-324, "negative": -2.5e-30,
           "max": 2**63 - 1, "min": -(2**63), "\u043a\u043b\u044e\u0447": "\u65e5\u672c\u8a9e",
           "nested": {"list": [1, "two", {"three": [3.5, None, False]}], "empty": {}, "none": [], "flags": [True]}}


def typed(value: object) -> str:
    """The value as JSON with sorted keys: unlike ==, tells True from 1 and 1.0 from 1."""
    return json.dumps(value, sort_keys=True)


async def test_user_setting_round_trips_exactly(store: Storage) -> None:
    assert await store.get_user_settings("a") == {}
    deepest: dict = {"leaf": "bottom"}
    for _ in range(15):  # 16 levels of objects, the most a value may nest
        deepest = {"down": deepest}
    longest_key = "k" * USER_SETTING_KEY_MAX
    await store.set_user_setting("a", "webhook.audio_bytes", SETTING)
    await store.set_user_setting("a", longest_key, deepest)
    got = await store.get_user_settings("a")
    assert got == {"webhook.audio_bytes": SETTING, longest_key: deepest}
    assert typed(got["webhook.audio_bytes"]) == typed(SETTING) and typed(got[longest_key]) == typed(deepest)
    got["webhook.audio_bytes"]["enabled"] = False  # a copy: changing it stores nothing
    assert (await store.get_user_settings("a"))["webhook.audio_bytes"]["enabled"] is True


async def test_user_setting_set_replaces_and_none_deletes(store: Storage) -> None:
    await store.set_user_setting("a", "notifications", {"daily": True, "hour": 8})
    await store.set_user_setting("a", "notifications", {"weekly": False})  # replaced whole, never merged
    assert await store.get_user_settings("a") == {"notifications": {"weekly": False}}
    await store.set_user_setting("a", "notifications", {})
    assert await store.get_user_settings("a") == {"notifications": {}}  # an empty object is a value, not a delete

    await store.set_user_setting("a", "notifications", None)
    assert await store.get_user_settings("a") == {}
    await store.set_user_setting("a", "notifications", None)  # deleting a missing key is fine
    await store.set_user_setting("nobody", "webhook.signing", None)
    assert await store.get_user_settings("a") == {} and await store.get_user_settings("nobody") == {}
    await store.set_user_setting("a", "notifications", {"daily": False})  # and it can be set again
    assert await store.get_user_settings("a") == {"notifications": {"daily": False}}


async def test_user_setting_keys_are_independent(store: Storage) -> None:
    await store.set_user_setting("a", "webhook.audio_bytes", {"url": "https://a.example/audio", "every_s": 5})
    await store.set_user_setting("a", "webhook.signing", {"secret": "whsec_1"})
    await store.set_user_setting("a", "webhook.audio_bytes", {"url": "https://a.example/v2"})
    assert await store.get_user_settings("a") == {"webhook.audio_bytes": {"url": "https://a.example/v2"},
                                                  "webhook.signing": {"secret": "whsec_1"}}
    await store.set_user_setting("a", "webhook.signing", None)
    assert await store.get_user_settings("a") == {"webhook.audio_bytes": {"url": "https://a.example/v2"}}

    keys = [f"concurrent:{i}" for i in range(12)]  # writers of different keys at once never undo each other
    await asyncio.gather(*(store.set_user_setting("a", k, {"i": i}) for i, k in enumerate(keys)))
    got = await store.get_user_settings("a")
    assert {k: got[k] for k in keys} == {k: {"i": i} for i, k in enumerate(keys)} and len(got) == len(keys) + 1


async def test_user_settings_are_isolated_between_users(store: Storage) -> None:
    await store.set_user_setting("a", "webhook.signing", {"secret": "a-secret"})
    await store.set_user_setting("b", "webhook.signing", {"secret": "b-secret"})
    await store.set_user_setting("b", "notifications", {"daily": True})
    assert await store.get_user_settings("a") == {"webhook.signing": {"secret": "a-secret"}}
    assert await store.get_user_settings("b") == {"webhook.signing": {"secret": "b-secret"},
                                                  "notifications": {"daily": True}}
    await store.set_user_setting("b", "webhook.signing", None)
    assert await store.get_user_settings("a") == {"webhook.signing": {"secret": "a-secret"}}
    assert await store.get_user_settings("c") == {}


async def test_user_setting_bad_keys_and_values_are_refused(store: Storage) -> None:
    await store.set_user_setting("a", "notifications", {"daily": True})
    for key in ("", "Webhook", "k" * (USER_SETTING_KEY_MAX + 1), "has space", "a/b", "\u00fcber", "_lead", ".",
                "..", "__name__", "-x", "x\x00", None, 5, b"notifications"):
        with pytest.raises(ValueError, match="key"):
            await store.set_user_setting("a", key, {"daily": False})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key"):
            await store.set_user_setting("a", key, None)  # type: ignore[arg-type]
    cycle: dict = {}
    cycle["self"] = cycle
    too_deep: dict = {}
    for _ in range(16):  # 17 levels
        too_deep = {"down": too_deep}
    for value in ([], ["daily"], "on", 1, True, b"{}", {1: "int key"}, {("t",): 1}, {"x": float("nan")},
                  {"x": float("-inf")}, {"x": {1, 2}}, {"x": (1, 2)}, {"x": b"raw"}, {"x": [[1, 2]]},
                  {"x": "nul\x00"}, {"nul\x00": 1}, {"x": 2**63}, {"x": -(2**63) - 1}, {"x": "\ud800"}, too_deep,
                  cycle, {"x": "y" * USER_SETTING_VALUE_MAX}, {"x": np.float32(1.0)}, {"x": object()}):
        with pytest.raises(ValueError, match="value"):
            await store.set_user_setting("a", "notifications", value)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as refused:  # the message never shows the value: it may be a secret
        await store.set_user_setting("a", "webhook.signing", {"secret": "hunter2-top", "x": float("nan")})
    assert "hunter2" not in str(refused.value)
    assert await store.get_user_settings("a") == {"notifications": {"daily": True}}  # nothing written


async def test_user_settings_outlive_conversation_deletes_and_retention(store: Storage) -> None:
    await store.set_user_setting("a", "webhook.audio_bytes", {"url": "https://a.example/audio"})
    c, old = conversation("a"), conversation("a", started=T0 - 100)
    for conv in (c, old):
        await store.save_conversation(conv)
    assert await store.delete_conversation("a", c.id) is True
    assert await store.delete_conversations_before(T0) == 1
    assert await store.get_user_settings("a") == {"webhook.audio_bytes": {"url": "https://a.example/audio"}}


# -- conversations -----------------------------------------------------------------------------------------------------


async def test_conversation_round_trip_and_update(store: Storage) -> None:
    c = conversation("a", language="fr", source="phone", timeout_s=45.5)
    await store.save_conversation(c)
    assert await store.get_conversation("a", c.id) == c
    assert await store.get_conversation("b", c.id) is None
    assert await store.get_conversation("a", "nope") is None

    assert (c.emoji, c.category, c.action_items, c.events) == (None, None, [], [])
    c.status, c.finished_at, c.duration_s, c.title, c.overview = "completed", T0 + 99.25, 98.5, "Title", "About"
    c.last_activity_at = T0 + 90.125
    c.emoji, c.category = "🚀", "work"  # the summary's, with Omi's structured fields
    c.action_items = [{"description": "Send the draft to Ann — today", "completed": False},
                      {"description": "Book the room", "completed": True}]
    c.events = [{"title": "Launch", "start": "2024-05-01T09:30:00+00:00", "duration": 45, "description": "",
                 "created": False}]
    await store.save_conversation(c)
    assert await store.get_conversation("a", c.id) == c
    assert await store.list_conversations("a") == [c]

    c.action_items[0]["completed"] = True  # a list is replaced as a whole on save
    c.events = []
    await store.save_conversation(c)
    assert await store.get_conversation("a", c.id) == c


async def test_updating_a_conversation_keeps_its_segments_and_speaker_state(store: Storage, request) -> None:
    c = conversation("a")
    await store.save_conversation(c)
    segments = [segment(c.id, "s1", 0.0), segment(c.id, "s2", 1.5)]
    await store.upsert_segments("a", segments)
    await store.save_speaker_state("a", c.id, b"clusters")

    c.last_activity_at, c.duration_s = T0 + 3.0, 2.5  # what every recorded segment does
    await store.save_conversation(c)
    assert await store.list_segments("a", c.id) == segments
    assert await store.load_speaker_state("a", c.id) == b"clusters"


async def test_saving_a_conversation_with_another_users_id_is_refused(store: Storage, request) -> None:
    c = conversation("a", title="mine")
    await store.save_conversation(c)
    with pytest.raises(KeyError):
        await store.save_conversation(conversation("b", title="theirs", id=c.id))
    assert await store.get_conversation("a", c.id) == c
    assert await store.get_conversation("b", c.id) is None


async def test_list_conversations_newest_first_with_filter_limit_and_paging(store: Storage) -> None:
    convs = [conversation("a", started=T0 + 10 * i, status="completed" if i % 2 else "in_progress")
             for i in range(5)]
    for c in (convs[2], convs[0], convs[4], convs[1], convs[3]):
        await store.save_conversation(c)
    await store.save_conversation(conversation("b", started=T0 + 25))

    ids = lambda cs: [c.id for c in cs]  # noqa: E731
    newest_first = ids(reversed(convs))
    assert ids(await store.list_conversations("a")) == newest_first
    assert ids(await store.list_conversations("a", status="completed")) == [convs[3].id, convs[1].id]
    assert ids(await store.list_conversations("a", status="in_progress", limit=2)) == [convs[4].id, convs[2].id]
    assert ids(await store.list_conversations("a", status="discarded")) == []
    assert ids(await store.list_conversations("a", before=T0 + 30)) == [convs[2].id, convs[1].id, convs[0].id]

    pages, before = [], None
    while page := await store.list_conversations("a", limit=2, before=before):
        pages.append(ids(page))
        before = page[-1].started_at
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    assert len(await store.list_conversations("b")) == 1


async def test_list_conversations_omi_filters_offset_and_date_range(store: Storage) -> None:
    kinds = ["in_progress", "processing", "completed", "discarded", "completed", "discarded", "completed"]
    convs = [conversation("a", started=T0 + 10 * i, status=k) for i, k in enumerate(kinds)]
    twin = conversation("a", started=T0 + 60, status="completed", id="~" + convs[6].id)  # same time: id decides
    for c in (*reversed(convs), twin):
        await store.save_conversation(c)
    await store.save_conversation(conversation("b", started=T0 + 15, status="completed"))

    ids = lambda cs: [c.id for c in cs]  # noqa: E731
    by_index = lambda *ix: [convs[i].id for i in ix]  # noqa: E731
    everything = [twin.id, *by_index(6, 5, 4, 3, 2, 1, 0)]  # newest first; equal starts by id descending
    assert ids(await store.list_conversations("a")) == everything
    assert ids(await store.list_conversations("a", statuses=["completed", "processing"])) == \
        [twin.id, *by_index(6, 4, 2, 1)]
    assert ids(await store.list_conversations("a", statuses=["completed", "discarded"], include_discarded=False)) == \
        [twin.id, *by_index(6, 4, 2)]
    assert ids(await store.list_conversations("a", include_discarded=False)) == [twin.id, *by_index(6, 4, 2, 1, 0)]
    assert await store.list_conversations("a", statuses=[]) == []
    assert await store.list_conversations("a", statuses=["failed"]) == []  # a status we never store
    assert ids(await store.list_conversations("a", status="completed", statuses=["completed", "discarded"])) == \
        [twin.id, *by_index(6, 4, 2)]
    assert await store.list_conversations("a", status="discarded", include_discarded=False) == []

    assert ids(await store.list_conversations("a", offset=2, limit=3)) == everything[2:5]
    assert ids(await store.list_conversations("a", offset=7, limit=3)) == everything[7:]
    assert await store.list_conversations("a", offset=8) == []
    pages = [ids(await store.list_conversations("a", offset=o, limit=3)) for o in range(0, 9, 3)]
    assert sum(pages, []) == everything

    assert ids(await store.list_conversations("a", started_from=T0 + 20, started_to=T0 + 40)) == by_index(4, 3, 2)
    assert ids(await store.list_conversations("a", started_from=T0 + 55)) == [twin.id, convs[6].id]
    assert ids(await store.list_conversations("a", started_to=T0 + 10)) == by_index(1, 0)
    assert ids(await store.list_conversations("a", statuses=["completed"], started_from=T0 + 15, started_to=T0 + 60,
                                              before=T0 + 60, offset=1, limit=5)) == by_index(2)
    assert ids(await store.list_conversations("b", statuses=["completed"])) != []
    assert await store.list_conversations("b", started_from=T0 + 16) == []


async def test_conversations_to_close_by_timeout_across_users(store: Storage) -> None:
    now = T0 + 1000
    stale_a = conversation("a", started=T0, last_activity_at=now - 130, timeout_s=120)
    fresh_a = conversation("a", started=T0, last_activity_at=now - 50, timeout_s=120)
    stale_b = conversation("b", started=T0, last_activity_at=now - 300, timeout_s=60)
    done_b = conversation("b", started=T0, last_activity_at=now - 900, timeout_s=60, status="completed")
    edge_c = conversation("c", started=T0, last_activity_at=now - 120, timeout_s=120)  # exactly timed out
    for c in (stale_a, fresh_a, stale_b, done_b, edge_c):
        await store.save_conversation(c)

    assert await store.conversations_to_close(now) == [stale_b, stale_a, edge_c]  # longest idle first
    assert await store.conversations_to_close(now, limit=2) == [stale_b, stale_a]
    assert await store.conversations_to_close(now - 1000) == []


async def test_delete_conversation_cascades_and_is_per_user(store: Storage) -> None:
    c, kept = conversation("a"), conversation("a", started=T0 + 5)
    for conv in (c, kept):
        await store.save_conversation(conv)
        await store.upsert_segments("a", [segment(conv.id, f"{conv.id}-1", 0.0), segment(conv.id, f"{conv.id}-2", 2)])
        await store.save_speaker_state("a", conv.id, b"state-" + conv.id.encode())

    assert await store.delete_conversation("b", c.id) is False  # not b's
    assert len(await store.list_segments("a", c.id)) == 2

    assert await store.delete_conversation("a", c.id) is True
    assert await store.get_conversation("a", c.id) is None
    assert await store.delete_conversation("a", c.id) is False
    await store.save_conversation(conversation("a", id=c.id))  # the same id again: nothing of the old one left
    assert await store.list_segments("a", c.id) == []
    assert await store.load_speaker_state("a", c.id) is None
    assert len(await store.list_segments("a", kept.id)) == 2
    assert await store.load_speaker_state("a", kept.id) == b"state-" + kept.id.encode()


async def test_retention_deletes_every_users_old_conversations(store: Storage) -> None:
    old_a, old_b = conversation("a", started=T0 - 100), conversation("b", started=T0 - 1)
    new_a, edge_b = conversation("a", started=T0 + 10), conversation("b", started=T0)  # not *before* T0
    for c in (old_a, old_b, new_a, edge_b):
        await store.save_conversation(c)
        await store.upsert_segments(c.uid, [segment(c.id, f"{c.id}-s", 0.0)])
        await store.save_speaker_state(c.uid, c.id, b"s")

    assert await store.delete_conversations_before(T0) == 2
    assert await store.delete_conversations_before(T0) == 0
    for gone in (old_a, old_b):
        assert await store.get_conversation(gone.uid, gone.id) is None
        assert await store.list_segments(gone.uid, gone.id) == []
        assert await store.load_speaker_state(gone.uid, gone.id) is None
    for kept in (new_a, edge_b):
        assert await store.get_conversation(kept.uid, kept.id) == kept
        assert len(await store.list_segments(kept.uid, kept.id)) == 1
        assert await store.load_speaker_state(kept.uid, kept.id) == b"s"


# -- segments ----------------------------------------------------------------------------------------------------------


async def test_upsert_segments_inserts_replaces_by_id_in_time_order(store: Storage) -> None:
    c = conversation("a")
    await store.save_conversation(c)
    await store.upsert_segments("a", [])  # nothing to do

    late = segment(c.id, "late", 4.0, 5.0, "later on", speaker="SPEAKER_1", speaker_id=1)
    growing = segment(c.id, "grow", 0.5, 1.0, "hel", is_user=True)
    await store.upsert_segments("a", [late, growing])
    assert await store.list_segments("a", c.id) == [growing, late]

    grown = segment(c.id, "grow", 0.5, 2.75, "hello there", is_user=True, person_id="p-1", speaker="Ann")
    middle = segment(c.id, "mid", 3.0, 3.5, "hm")
    await store.upsert_segments("a", [grown, middle])
    assert await store.list_segments("a", c.id) == [grown, middle, late]  # replaced in place, not duplicated

    again = segment(c.id, "mid", 3.0, 3.75, "hmm")
    await store.upsert_segments("a", [segment(c.id, "mid", 3.0, 3.6, "hm-"), again])  # one id twice: last wins
    assert await store.list_segments("a", c.id) == [grown, again, late]
    assert await store.list_segments("b", c.id) == []


async def test_upsert_segments_refuses_another_users_conversation(store: Storage) -> None:
    ca, cb = conversation("a"), conversation("b")
    await store.save_conversation(ca)
    await store.save_conversation(cb)
    with pytest.raises(KeyError):  # one bad segment: the whole batch is refused
        await store.upsert_segments("b", [segment(cb.id, "ok", 0.0), segment(ca.id, "sneaky", 1.0)])
    with pytest.raises(KeyError):
        await store.upsert_segments("a", [segment("no-such-conversation", "x", 0.0)])
    assert await store.list_segments("a", ca.id) == []
    assert await store.list_segments("b", cb.id) == []
    assert await store.list_segments("b", ca.id) == []


async def test_relabel_segments_by_id(store: Storage) -> None:
    c, other = conversation("a"), conversation("a", started=T0 + 5)
    for conv in (c, other):
        await store.save_conversation(conv)
    s1, s2, s3 = (segment(c.id, f"r{i}", float(i), text=f"t{i}", person_id="p-old") for i in range(3))
    theirs = segment(other.id, "r-other", 0.0)
    await store.upsert_segments("a", [s1, s2, s3])
    await store.upsert_segments("a", [theirs])

    after = await store.relabel_segments("a", c.id, ["r0", "r2", "r-other", "nope"], is_user=True, person_id=None)
    assert [(s.id, s.is_user, s.person_id) for s in after] == [("r0", True, None), ("r1", False, "p-old"),
                                                                ("r2", True, None)]
    assert await store.list_segments("a", c.id) == after
    assert (s1.text, s1.start, s1.end) == (after[0].text, after[0].start, after[0].end)  # only the labels change
    assert await store.list_segments("a", other.id) == [theirs]  # another conversation's segment is not touched

    after = await store.relabel_segments("a", c.id, ["r2"], is_user=False, person_id="p-new")
    assert [(s.id, s.is_user, s.person_id) for s in after] == [("r0", True, None), ("r1", False, "p-old"),
                                                                ("r2", False, "p-new")]
    assert await store.relabel_segments("b", c.id, ["r0"], is_user=False, person_id="x") == []  # not b's
    assert (await store.list_segments("a", c.id))[0].is_user is True


async def test_upserting_a_segment_id_of_another_user_is_refused(store: Storage, request) -> None:
    ca, cb = conversation("a"), conversation("b")
    await store.save_conversation(ca)
    await store.save_conversation(cb)
    mine = segment(ca.id, "same-id", 0.0, text="private")
    await store.upsert_segments("a", [mine])
    with pytest.raises(KeyError):
        await store.upsert_segments("b", [segment(cb.id, "same-id", 0.0, text="overwrite")])
    assert await store.list_segments("a", ca.id) == [mine]
    assert await store.list_segments("b", cb.id) == []


# -- a conversation's speaker state ------------------------------------------------------------------------------------


async def test_speaker_state_round_trip_and_overwrite(store: Storage) -> None:
    c = conversation("a")
    await store.save_conversation(c)
    assert await store.load_speaker_state("a", c.id) is None
    blob = bytes(range(256)) * 40
    await store.save_speaker_state("a", c.id, blob)
    assert await store.load_speaker_state("a", c.id) == blob
    await store.save_speaker_state("a", c.id, b"\x00newer")
    assert await store.load_speaker_state("a", c.id) == b"\x00newer"
    assert await store.load_speaker_state("b", c.id) is None


async def test_speaker_state_for_another_users_conversation_is_refused(store: Storage, request) -> None:
    c = conversation("a")
    await store.save_conversation(c)
    await store.save_speaker_state("a", c.id, b"mine")
    with pytest.raises(KeyError):
        await store.save_speaker_state("b", c.id, b"theirs")
    assert await store.load_speaker_state("a", c.id) == b"mine"


# -- conversation state: compare-and-set writes, close claims with a lease ---------------------------------------------


async def test_update_open_conversation_writes_only_while_in_progress(store: Storage) -> None:
    conv = conversation("a", last_activity_at=T0, timeout_s=120, duration_s=30.0)
    await store.save_conversation(conv)
    assert await store.update_open_conversation("a", conv.id, last_activity_at=T0 + 5, duration_s=12.0) is True
    got = await store.get_conversation("a", conv.id)
    assert (got.last_activity_at, got.duration_s, got.timeout_s) == (T0 + 5, 30.0, 120)  # duration only grows
    assert await store.update_open_conversation("a", conv.id, duration_s=45.5, timeout_s=300) is True
    got = await store.get_conversation("a", conv.id)
    assert (got.last_activity_at, got.duration_s, got.timeout_s) == (T0 + 5, 45.5, 300)
    assert await store.update_open_conversation("b", conv.id, last_activity_at=T0 + 9) is False  # another user's
    assert await store.update_open_conversation("a", "no-such-id", last_activity_at=T0 + 9) is False
    for status in ("processing", "completed", "discarded"):
        closed = conversation("a", status=status, last_activity_at=T0, duration_s=1.0)
        await store.save_conversation(closed)
        assert await store.update_open_conversation("a", closed.id, last_activity_at=T0 + 9, duration_s=9) is False
        assert await store.get_conversation("a", closed.id) == closed


async def test_a_stream_write_after_a_close_never_reopens_the_conversation(store: Storage) -> None:
    """The race a stream's read-await-write lost to the sweep, forced: the stream reads the conversation, the sweep
    closes it, then the stream writes its activity."""
    conv = conversation("a", last_activity_at=T0, timeout_s=60)
    await store.save_conversation(conv)
    seen_by_stream = await store.get_conversation("a", conv.id)
    assert seen_by_stream.status == "in_progress"
    claimed = await store.claim_close("a", conv.id, T0 + 61, 300.0, expired_only=True)
    assert claimed is not None and claimed.status == "processing" and claimed.processing_until == T0 + 361
    # between the claim and the outcome the stream writes nothing either
    assert await store.update_open_conversation("a", conv.id, last_activity_at=T0 + 62, duration_s=70) is False
    claimed.status, claimed.title, claimed.finished_at = "completed", "Closed by the sweep", T0 + 62
    claimed.overview, claimed.emoji, claimed.category = "o", "🧠", "work"
    claimed.action_items = [{"description": "call back", "completed": False}]
    assert await store.finish_close(claimed, T0 + 361) is True
    assert await store.update_open_conversation("a", conv.id, last_activity_at=T0 + 63, duration_s=80) is False
    stored = await store.get_conversation("a", conv.id)
    assert stored.status == "completed" and stored.title == "Closed by the sweep" and stored.processing_until is None
    assert (stored.last_activity_at, stored.duration_s, stored.finished_at) == (T0, 0.0, T0 + 62)
    assert stored.action_items == [{"description": "call back", "completed": False}] and stored.category == "work"
    assert await store.conversations_to_close(T0 + 10_000) == []


async def test_claim_close_respects_the_timeout_and_has_one_winner(store: Storage) -> None:
    conv = conversation("a", last_activity_at=T0, timeout_s=60)
    await store.save_conversation(conv)
    assert await store.claim_close("a", conv.id, T0 + 59, 30.0, expired_only=True) is None  # spoken to lately
    assert await store.claim_close("b", conv.id, T0 + 61, 30.0, expired_only=False) is None  # not b's
    assert (await store.get_conversation("a", conv.id)).status == "in_progress"
    claims = await asyncio.gather(*(store.claim_close("a", conv.id, T0 + 61 + i / 100, 30.0, expired_only=True)
                                    for i in range(10)))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0].processing_until == (await store.get_conversation("a", conv.id)
                                                                 ).processing_until
    # A forced close (POST /v1/conversations) needs no timeout, but never takes a close another caller holds.
    fresh = conversation("a", last_activity_at=T0 + 100, timeout_s=60)
    await store.save_conversation(fresh)
    assert (await store.claim_close("a", fresh.id, T0 + 101, 30.0, expired_only=False)).status == "processing"
    assert await store.claim_close("a", fresh.id, T0 + 102, 30.0, expired_only=False) is None


async def test_a_close_whose_lease_ran_out_is_listed_and_taken_again(store: Storage) -> None:
    conv = conversation("a", last_activity_at=T0, timeout_s=60)
    legacy = conversation("b", last_activity_at=T0, timeout_s=60, status="processing")  # no lease recorded
    await store.save_conversation(conv)
    await store.save_conversation(legacy)
    first = await store.claim_close("a", conv.id, T0 + 100, 50.0, expired_only=True)
    assert first.processing_until == T0 + 150
    assert [c.id for c in await store.conversations_to_close(T0 + 149)] == [legacy.id]  # a's lease holds
    assert await store.claim_close("a", conv.id, T0 + 149, 50.0, expired_only=True) is None
    assert sorted(c.id for c in await store.conversations_to_close(T0 + 150)) == sorted([conv.id, legacy.id])
    second = await store.claim_close("a", conv.id, T0 + 150, 50.0, expired_only=True)  # the first close died
    assert second is not None and second.processing_until == T0 + 200
    first.status = "completed"
    assert await store.finish_close(first, T0 + 150) is False  # the first closer woke up late: dropped
    assert (await store.get_conversation("a", conv.id)).status == "processing"
    second.status, second.title = "discarded", None
    assert await store.finish_close(second, T0 + 200) is True
    assert (await store.get_conversation("a", conv.id)).status == "discarded"
    assert (await store.claim_close("b", legacy.id, T0 + 1, 50.0, expired_only=True)).processing_until == T0 + 51


# -- live streams (MAX_STREAMS_PER_USER across replicas) ---------------------------------------------------------------


async def test_open_stream_keeps_the_newest_and_revokes_the_oldest(store: Storage) -> None:
    assert await store.open_stream("u1", "s1", 60.0, keep=2) == []
    await asyncio.sleep(0.01)
    assert await store.open_stream("u1", "s2", 60.0, keep=2) == []
    await asyncio.sleep(0.01)
    assert await store.open_stream("u2", "other", 60.0, keep=1) == []  # another user's streams count apart
    assert await store.open_stream("u1", "s3", 60.0, keep=2) == ["s1"]
    assert await store.live_streams("u1") == ["s2", "s3"]
    assert await store.refresh_stream("u1", "s1", 60.0) is False  # its replica stops it
    assert await store.refresh_stream("u1", "s2", 60.0) is True
    assert await store.open_stream("u1", "s4", 60.0, keep=0) == []  # no limit: nothing revoked
    assert await store.live_streams("u1") == ["s2", "s3", "s4"]
    await store.close_stream("u1", "s2")
    await store.close_stream("u1", "s1")
    assert await store.live_streams("u1") == ["s3", "s4"]
    assert await store.live_streams("u2") == ["other"]
    await store.refresh_stream("u2", "s3", 60.0)  # another user's refresh never touches this user's stream
    await store.open_stream("u2", "s5", 60.0, keep=1)
    assert await store.live_streams("u1") == ["s3", "s4"]


async def test_an_unrefreshed_stream_runs_out_and_a_refresh_registers_it_again(store: Storage) -> None:
    assert await store.open_stream("u1", "stalled", 0.2, keep=1) == []
    await asyncio.sleep(0.3)
    assert await store.live_streams("u1") == []
    assert await store.open_stream("u1", "new", 60.0, keep=1) == []  # the expired row neither counts nor is revoked
    assert await store.refresh_stream("u1", "stalled", 60.0) is True  # gone: registered again, as the newest
    assert await store.live_streams("u1") == ["new", "stalled"]


async def test_concurrent_opens_of_one_user_keep_exactly_the_limit(store: Storage) -> None:
    ids = [f"s{i}" for i in range(8)]
    revoked = await asyncio.gather(*(store.open_stream("u1", i, 60.0, keep=1) for i in ids))
    live = await store.live_streams("u1")
    assert len(live) == 1
    assert sorted(sum(revoked, []) + live) == sorted(ids)  # each other one revoked exactly once


# -- job leases --------------------------------------------------------------------------------------------------------


async def test_one_winner_among_concurrent_acquires(store: Storage) -> None:
    owners = [f"replica-{i}" for i in range(20)]
    won = await asyncio.gather(*(store.acquire_job_run("digest", "2024-05-01", o, 60.0) for o in owners))
    assert sum(won) == 1
    winner = owners[won.index(True)]
    assert await store.acquire_job_run("digest", "2024-05-02", "replica-0", 60.0) is True  # another run key
    assert await store.acquire_job_run("retention", "2024-05-01", "replica-0", 60.0) is True  # another job

    for o in owners:  # only the lease holder's result is recorded
        await store.finish_job_run("digest", "2024-05-01", o, True, o)
    last = await store.last_job_runs()
    assert last["digest"]["owner"] == winner and last["digest"]["detail"] == winner


async def test_a_finished_run_is_never_acquired_again(store: Storage) -> None:
    assert await store.acquire_job_run("digest", "k", "r1", 0.05) is True
    await store.finish_job_run("digest", "k", "r1", False, "x" * 5000)
    await asyncio.sleep(0.1)  # the lease is long gone, but a result was recorded (failed runs too)
    assert await store.acquire_job_run("digest", "k", "r2", 60.0) is False
    assert await store.acquire_job_run("digest", "k", "r1", 60.0) is False
    last = (await store.last_job_runs())["digest"]
    assert last["ok"] is False and len(last["detail"]) == 2000


async def test_an_expired_unfinished_lease_can_be_taken_over(store: Storage) -> None:
    assert await store.acquire_job_run("digest", "k", "crashed", 0.2) is True
    assert await store.acquire_job_run("digest", "k", "r2", 60.0) is False  # still held
    await asyncio.sleep(0.3)
    won = await asyncio.gather(*(store.acquire_job_run("digest", "k", f"r{i}", 60.0) for i in range(2, 12)))
    assert sum(won) == 1
    taker = f"r{2 + won.index(True)}"
    assert await store.acquire_job_run("digest", "k", "late", 60.0) is False  # the new lease holds

    await store.finish_job_run("digest", "k", "crashed", True, "zombie")  # the old holder wakes up: ignored
    assert "digest" not in await store.last_job_runs()
    await store.finish_job_run("digest", "k", taker, True, "done")
    assert (await store.last_job_runs())["digest"]["owner"] == taker


async def test_last_job_runs_reports_the_latest_finished_run_per_job(store: Storage) -> None:
    assert await store.last_job_runs() == {}
    before = time.time()
    for key, ok, detail in (("day-1", True, "sent 3"), ("day-2", False, "smtp down")):
        assert await store.acquire_job_run("digest", key, "r1", 60.0)
        await store.finish_job_run("digest", key, "r1", ok, detail)
        await asyncio.sleep(0.01)
    assert await store.acquire_job_run("digest", "day-3", "r1", 60.0)  # running: not a finished run
    assert await store.acquire_job_run("retention", "day-1", "r2", 60.0)  # never finished: no entry
    assert await store.acquire_job_run("webhooks", "t-1", "r2", 60.0)
    await store.finish_job_run("webhooks", "t-1", "r2", True, "")

    last = await store.last_job_runs()
    assert set(last) == {"digest", "webhooks"}
    digest = last["digest"]
    assert {k: digest[k] for k in ("run_key", "owner", "ok", "detail")} == \
        {"run_key": "day-2", "owner": "r1", "ok": False, "detail": "smtp down"}
    assert before - 5 <= digest["finished_at"] <= time.time() + 5
    assert last["webhooks"]["ok"] is True


async def test_prune_job_runs_keeps_each_jobs_latest_finished_run_and_live_leases(store: Storage) -> None:
    for key in ("t-1", "t-2", "t-3"):
        assert await store.acquire_job_run("sweep", key, "r1", 60.0)
        await store.finish_job_run("sweep", key, "r1", True, key)
        await asyncio.sleep(0.01)
    assert await store.acquire_job_run("retention", "d-1", "r1", 60.0)
    await store.finish_job_run("retention", "d-1", "r1", False, "only run")
    assert await store.acquire_job_run("digest", "crashed", "r1", 0.0)  # ran out unfinished
    assert await store.acquire_job_run("digest", "running", "r1", 3600.0)  # held now
    assert await store.prune_job_runs(time.time() - 3600) == 0  # nothing that old
    latest = await store.last_job_runs()

    assert await store.prune_job_runs(time.time() + 60) == 3  # sweep t-1, t-2 and the crashed lease
    assert await store.last_job_runs() == latest
    assert latest["sweep"]["run_key"] == "t-3" and latest["retention"]["run_key"] == "d-1"
    assert await store.acquire_job_run("sweep", "t-3", "r2", 60.0) is False  # kept: still done
    assert await store.acquire_job_run("digest", "running", "r2", 60.0) is False  # kept: still held
    assert await store.acquire_job_run("sweep", "t-1", "r2", 60.0) is True  # gone
    assert await store.prune_job_runs(time.time() + 30) == 0  # the new t-1 lease holds for 60 s


# -- PostgreSQL only: migrations, replicas, failures -------------------------------------------------------------------


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    await require_postgres()
    schema = fresh_schema()
    try:
        yield schema
    finally:
        await drop_schema(schema)


async def _applied(schema: str) -> list[int]:
    con = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        rows = await con.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        assert all(r["applied_at"] is not None for r in rows)
        return [r["version"] for r in rows]
    finally:
        await con.close()


async def test_postgres_migrations_are_versioned_and_idempotent(pg_schema: str, monkeypatch) -> None:
    import storage.postgres as pg

    every = list(range(1, len(pg.MIGRATIONS) + 1))
    assert len(every) >= 2
    monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:1])  # a database left by an older release
    old = pg.PostgresStorage(PG_DSN, schema=pg_schema)
    await old.open()
    await old.close()
    assert await _applied(pg_schema) == [1]

    monkeypatch.undo()
    for _ in range(2):  # upgraded once, then nothing left to do
        store = pg.PostgresStorage(PG_DSN, schema=pg_schema)
        await store.open()
        assert await store.schema_versions() == every
        await store.close()
    assert await _applied(pg_schema) == every


async def test_postgres_user_settings_migration_applies_to_an_existing_schema(pg_schema: str, monkeypatch) -> None:
    import storage.postgres as pg

    version = next(v for v, sql in enumerate(pg.MIGRATIONS, start=1) if "CREATE TABLE user_settings" in sql)
    monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:version - 1])  # the release before user settings
    old = pg.PostgresStorage(PG_DSN, schema=pg_schema)
    await old.open()
    kept = conversation("a")
    await old.save_conversation(kept)
    await old.close()
    assert await _applied(pg_schema) == list(range(1, version))

    monkeypatch.undo()
    store = pg.PostgresStorage(PG_DSN, schema=pg_schema)
    await store.open()
    try:
        assert version in await store.schema_versions()
        assert await store.get_user_settings("a") == {}
        await store.set_user_setting("a", "webhook.signing", {"secret": "x", "n": 1e20})
        assert typed(await store.get_user_settings("a")) == typed({"webhook.signing": {"secret": "x", "n": 1e20}})
        assert await store.get_conversation("a", kept.id) == kept
        async with store.pool.acquire() as con:
            value_type = await con.fetchval("SELECT data_type FROM information_schema.columns WHERE table_schema = "
                                            "$1 AND table_name = 'user_settings' AND column_name = 'value'", pg_schema)
            assert value_type == "jsonb"
            with pytest.raises(asyncpg.CheckViolationError):  # the table itself holds only JSON objects
                await con.execute("INSERT INTO user_settings VALUES ('a', 'raw', '[1]'::jsonb, 0)")
    finally:
        await store.close()


async def test_postgres_replicas_starting_together_migrate_once(pg_schema: str) -> None:
    from storage.postgres import MIGRATIONS, PostgresStorage

    replicas = [PostgresStorage(PG_DSN, schema=pg_schema, max_size=2) for _ in range(4)]
    try:
        await asyncio.gather(*(r.open() for r in replicas))
        assert await _applied(pg_schema) == list(range(1, len(MIGRATIONS) + 1))
        assert all([await r.ping() for r in replicas])
    finally:
        await asyncio.gather(*(r.close() for r in replicas))


async def test_postgres_two_replicas_race_for_job_runs(pg_schema: str) -> None:
    from storage.postgres import PostgresStorage

    one, two = PostgresStorage(PG_DSN, schema=pg_schema), PostgresStorage(PG_DSN, schema=pg_schema)
    await one.open()
    await two.open()
    try:
        keys = [f"tick-{i}" for i in range(50)]
        calls = [(key, name, store) for key in keys for name, store in (("one", one), ("two", two))
                 for _ in range(2)]  # each replica tries every key twice, all at once: 200 calls on 2 pools
        won = await asyncio.gather(*(store.acquire_job_run("tick", key, f"{name}-{uuid.uuid4().hex[:6]}", 60.0)
                                     for key, name, store in calls))
        winners: dict[str, int] = {key: 0 for key in keys}
        for (key, _, _), ok in zip(calls, won, strict=True):
            winners[key] += ok
        assert winners == {key: 1 for key in keys}
    finally:
        await one.close()
        await two.close()


async def test_postgres_schema_enforces_ownership(pg_schema: str) -> None:
    from storage.postgres import PostgresStorage

    store = PostgresStorage(PG_DSN, schema=pg_schema)
    await store.open()
    try:
        c = conversation("a")
        await store.save_conversation(c)
        async with store.pool.acquire() as con:
            with pytest.raises(asyncpg.ForeignKeyViolationError):  # a segment row must carry its conversation's uid
                await con.execute('INSERT INTO segments (id, conversation_id, uid, text, speaker, speaker_id, '
                                  'is_user, start, "end") VALUES (\'s\', $1, \'b\', \'\', \'\', 0, false, 0, 1)', c.id)
            types = {(r["table_name"], r["column_name"]): r["data_type"] for r in await con.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = $1",
                pg_schema)}
        assert types[("speaker_embeddings", "vector")] == types[("speaker_states", "state")] == "bytea"
        assert types[("segments", "is_user")] == types[("job_runs", "ok")] == "boolean"
        assert types[("conversations", "started_at")] == "double precision"
        assert types[("conversations", "action_items")] == types[("conversations", "events")] == "jsonb"
    finally:
        await store.close()


class _Relay:
    """A TCP relay in front of the server, to cut the database off mid-life."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


async def test_postgres_ping_is_false_when_the_server_is_unreachable(pg_schema: str) -> None:
    from storage.postgres import PostgresStorage

    url = urlsplit(PG_DSN)
    relay = _Relay(url.hostname or "127.0.0.1", url.port or 5432)
    port = await relay.start()
    auth = url.netloc.rsplit("@", 1)[0] + "@" if "@" in url.netloc else ""
    store = PostgresStorage(f"postgresql://{auth}127.0.0.1:{port}{url.path}", schema=pg_schema)
    await store.open()
    try:
        assert await store.ping() is True
        await relay.stop()
        assert await store.ping(timeout=5) is False  # the pooled connection is dead
        assert await store.ping(timeout=5) is False  # and a new one is refused
    finally:
        await asyncio.wait_for(store.close(), 10)


async def test_postgres_dsn_secret_is_never_shown(caplog) -> None:
    from storage.postgres import PostgresStorage

    with socket_port() as dead_port:
        store = PostgresStorage(f"postgresql+asyncpg://postgres:s3cret-pw@127.0.0.1:{dead_port}/test")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(OSError) as failure:
        await store.open()
    assert await store.ping() is False
    shown = str(failure.value) + repr(failure.value) + repr(store) + caplog.text
    assert "s3cret-pw" not in shown


@contextlib.contextmanager
def socket_port():
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


# -- SQLite only: a database file made before the structured columns -------------------------------------------------


async def test_sqlite_file_from_an_older_release_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    from storage.sqlite import SqliteStorage

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the conversations table as the first release made it
        db.execute("CREATE TABLE conversations (id TEXT PRIMARY KEY, uid TEXT NOT NULL, status TEXT NOT NULL, "
                   "language TEXT NOT NULL, source TEXT NOT NULL, started_at REAL NOT NULL, "
                   "last_activity_at REAL NOT NULL, timeout_s REAL NOT NULL, finished_at REAL, "
                   "duration_s REAL NOT NULL, title TEXT, overview TEXT)")
        db.execute("INSERT INTO conversations VALUES ('old', 'a', 'completed', 'en', 'omi', ?, ?, 120, ?, 5, "
                   "'Old', 'kept')", (T0, T0, T0 + 9))
    store = SqliteStorage(path)
    await store.open()
    try:
        old = await store.get_conversation("a", "old")
        assert (old.title, old.emoji, old.category, old.action_items, old.events) == ("Old", None, None, [], [])
        old.emoji, old.action_items = "🧠", [{"description": "x", "completed": False}]
        await store.save_conversation(old)
    finally:
        await store.close()
    again = SqliteStorage(path)  # migrated once: nothing left to do, nothing lost
    await again.open()
    try:
        assert await again.get_conversation("a", "old") == old
    finally:
        await again.close()


async def test_sqlite_file_from_before_user_settings_gains_the_table(tmp_path: Path) -> None:
    import sqlite3

    from storage.sqlite import SqliteStorage

    path = tmp_path / "old.sqlite3"
    old = SqliteStorage(path)
    await old.open()
    kept = conversation("a")
    await old.save_conversation(kept)
    await old.close()
    with sqlite3.connect(path) as db:  # as a release before user settings left it
        db.execute("DROP TABLE user_settings")
    store = SqliteStorage(path)
    await store.open()
    try:
        assert await store.get_user_settings("a") == {}
        await store.set_user_setting("a", "webhook.signing", {"secret": "x"})
        assert await store.get_user_settings("a") == {"webhook.signing": {"secret": "x"}}
        assert await store.get_conversation("a", kept.id) == kept
    finally:
        await store.close()
