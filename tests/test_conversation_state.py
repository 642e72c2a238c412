"""Conversation state that never gets stuck or is overwritten (issue 12): a close that fails midway or whose process
dies is taken again by the sweep once its lease runs out; a stream's write never reopens a conversation the sweep
closed; replicas closing the same conversation make one summary. On SQLite, a real PostgreSQL and the Firestore
fake (storage objects as the server makes them), and end to end with a real server killed by SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_conversations
from conftest import (
    SAMPLE_WAV,
    pcm16_frames,
    read_wav,
    start_server,
    stop_server,
    stream_frames,
)
from openai_server import OpenAITestServer, completion
from test_storage_contract import BACKENDS, PG_DSN, drop_schema, fresh_schema, make_store, require_postgres

from config import Settings
from conversations import ConversationService, SweepIncomplete
from jobs import JobRunner
from storage.base import Conversation, Segment, Storage
from summaries import PlainSummarizer, Summary

T0 = 1_700_000_000.0
SR = 16000
# the end-to-end test's fixtures: a Deepgram-protocol server (module-wide), a fresh SQLite or PostgreSQL database
deepgram, database = test_conversations.deepgram, test_conversations.database


class CountingSummarizer(PlainSummarizer):
    """The plain summary, counted; slow when told (so concurrent closes overlap); raises once for `fail_once` ids."""

    def __init__(self, delay_s: float = 0.0, fail_once: set[str] | None = None) -> None:
        self.delay_s, self.fail_once = delay_s, set(fail_once or ())
        self.calls: list[str] = []

    async def summarize(self, conversation: Conversation, segments: list[Segment]) -> Summary:
        self.calls.append(conversation.id)
        await asyncio.sleep(self.delay_s)
        if conversation.id in self.fail_once:
            self.fail_once.discard(conversation.id)
            raise RuntimeError("the summary step fell over")
        return await super().summarize(conversation, segments)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with make_store(request.param, tmp_path) as opened:
        yield opened


async def spoken(store: Storage, uid: str, last_activity_at: float, text: str, timeout_s: float = 60) -> Conversation:
    conv = Conversation(uid=uid, started_at=last_activity_at - 30, last_activity_at=last_activity_at,
                        timeout_s=timeout_s)
    await store.save_conversation(conv)
    await store.upsert_segments(uid, [Segment(uuid.uuid4().hex, conv.id, text, "SPEAKER_0", 0, True, None, 0, 2)])
    return conv


# -- a close that fails midway ----------------------------------------------------------------------------------------


async def test_a_close_that_raises_midway_is_retried_by_the_sweep_and_blocks_no_other(store: Storage) -> None:
    bad = await spoken(store, "ana", T0, "The first close of this one fails.")  # oldest: swept first
    good = await spoken(store, "bob", T0 + 5, "This one closes at once.")
    summarizer = CountingSummarizer(fail_once={bad.id})
    service = ConversationService(store, summarizer, close_lease_s=60)

    with pytest.raises(SweepIncomplete) as failed:
        await service.close_expired(now=T0 + 100)
    assert (failed.value.closed, failed.value.failed) == (1, [bad.id])
    assert (await store.get_conversation("bob", good.id)).status == "completed"
    left = await store.get_conversation("ana", bad.id)
    assert left.status == "processing" and left.processing_until == T0 + 160  # a state the sweep retries ...
    assert await service.close_expired(now=T0 + 159) == 0  # ... once its lease has run out
    assert await service.close_expired(now=T0 + 160) == 1
    done = await store.get_conversation("ana", bad.id)
    assert done.status == "completed" and done.title == "The first close of this one fails."
    assert done.processing_until is None and done.finished_at == T0 + 160
    assert summarizer.calls == [bad.id, good.id, bad.id]
    assert await service.close_expired(now=T0 + 10_000) == 0


async def test_the_sweep_job_records_a_failed_close_and_retakes_it_after_the_lease(tmp_path, store: Storage) -> None:
    now = time.time()
    bad = await spoken(store, "ana", now - 600, "Fails once, then completes.")
    settings = Settings(_env_file=None, data_dir=tmp_path, sweep_interval_s=3600, conversation_close_lease_s=0.5)
    runner = JobRunner(settings, store, ConversationService(store, CountingSummarizer(fail_once={bad.id}),
                                                        close_lease_s=settings.conversation_close_lease_s))
    try:
        first = await runner.run_now("sweep")
        assert not first["ok"] and first["detail"] == f"closed 0; failed 1 ({bad.id})"
        assert (await runner.run_now("sweep"))["detail"] == "closed 0"  # the lease (0.5 s) still holds
        await asyncio.sleep(0.6)
        assert (await runner.run_now("sweep"))["detail"] == "closed 1"
        assert (await store.get_conversation("ana", bad.id)).status == "completed"
    finally:
        await runner.shutdown()


# -- a stream's write never undoes a close ----------------------------------------------------------------------------


async def test_segments_recorded_while_the_sweep_closes_never_reopen_it(store: Storage) -> None:
    """The race forced: the sweep closes the conversation while `record` is between its two writes."""
    conv = await spoken(store, "ana", T0, "Before the long pause.")
    service = ConversationService(store, CountingSummarizer())
    upsert = store.upsert_segments
    swept: list[int] = []

    async def sweep_then_upsert(uid: str, segments: list[Segment]) -> None:
        swept.append(await service.close_expired(now=T0 + 10_000))  # the sweep runs while the stream awaits
        await upsert(uid, segments)

    store.upsert_segments = sweep_then_upsert  # type: ignore[method-assign]
    late = Segment(uuid.uuid4().hex, conv.id, "After it.", "SPEAKER_0", 0, True, None, 40, 42)
    await service.record(conv, [late], now=T0 + 50)
    store.upsert_segments = upsert  # type: ignore[method-assign]

    assert swept == [1]
    stored = await store.get_conversation("ana", conv.id)
    assert stored.status == "completed" and stored.title == "Before the long pause."  # not set back to in_progress
    assert await store.conversations_to_close(T0 + 20_000) == []


async def test_a_stream_end_racing_the_sweep_never_reopens_it(store: Storage) -> None:
    """The race forced: the sweep closes the conversation after the stream's end read it (a read-then-write) or
    just before its one write (a compare-and-set)."""
    conv = await spoken(store, "ana", T0, "Closed while the stream ended.")
    summarizer = CountingSummarizer()
    service = ConversationService(store, summarizer)
    read, write = store.get_conversation, store.update_open_conversation

    async def read_then_sweep(uid: str, conversation_id: str) -> Conversation | None:
        found = await read(uid, conversation_id)
        await service.close_expired(now=T0 + 10_000)
        return found

    async def sweep_then_write(uid: str, conversation_id: str, **fields: float) -> bool:
        await service.close_expired(now=T0 + 10_000)
        return await write(uid, conversation_id, **fields)

    store.get_conversation = read_then_sweep  # type: ignore[method-assign]
    store.update_open_conversation = sweep_then_write  # type: ignore[method-assign]
    await service.stream_ended(conv, 99.0)
    store.get_conversation, store.update_open_conversation = read, write  # type: ignore[method-assign]

    stored = await store.get_conversation("ana", conv.id)
    assert stored.status == "completed" and stored.title == "Closed while the stream ended."
    assert summarizer.calls == [conv.id] and await store.conversations_to_close(T0 + 20_000) == []


async def test_a_reconnect_never_continues_a_conversation_a_close_claimed(store: Storage) -> None:
    conv = await spoken(store, "ana", T0, "Claimed by a close on another replica.", timeout_s=120)
    service = ConversationService(store, CountingSummarizer())
    listed = store.list_conversations

    async def list_then_claim(uid: str, *args, **kwargs) -> list[Conversation]:
        found = await listed(uid, *args, **kwargs)
        await store.claim_close("ana", conv.id, T0 + 30, 300.0, expired_only=False)  # POST /v1/conversations
        return found

    store.list_conversations = list_then_claim  # type: ignore[method-assign]
    attached = await service.attach("ana", "en", 60, now=T0 + 30)
    store.list_conversations = listed  # type: ignore[method-assign]

    assert attached.id != conv.id and attached.status == "in_progress"
    assert (await store.get_conversation("ana", conv.id)).status == "processing"


# -- replicas ---------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_replicas(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Storage, Storage]]:
    """Two storage objects on one database, as two server processes have them."""
    if kind == "sqlite":
        from storage.sqlite import SqliteStorage

        stores = (SqliteStorage(tmp_path / "shared.sqlite3"), SqliteStorage(tmp_path / "shared.sqlite3"))
    elif kind == "postgres":
        from storage.postgres import PostgresStorage

        await require_postgres()
        schema = fresh_schema()
        stores = (PostgresStorage(PG_DSN, schema=schema), PostgresStorage(PG_DSN, schema=schema))
    else:
        from storage.firestore import FirestoreStorage
        from tests.firestore_fake import FakeAsyncClient

        client = FakeAsyncClient()
        stores = (FirestoreStorage(client), FirestoreStorage(client))
    for s in stores:
        await s.open()
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()
        if kind == "postgres":
            await drop_schema(schema)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_replicas_sweeping_together_close_each_conversation_once(kind: str, tmp_path: Path) -> None:
    async with two_replicas(kind, tmp_path) as (store_a, store_b):
        convs = [await spoken(store_a, f"user-{i}", T0 + i, f"Conversation number {i}.") for i in range(3)]
        summarizer = CountingSummarizer(delay_s=0.2)  # both replicas are inside their closes at once
        replicas = [ConversationService(s, summarizer) for s in (store_a, store_b)]
        events: list[tuple[str, str]] = []
        for service in replicas:
            for conv in convs:
                async def heard(event: dict, uid: str = conv.uid) -> None:
                    events.append((uid, event["type"]))

                service.listen(conv.uid, heard)

        closed = await asyncio.gather(*(service.close_expired(now=T0 + 1000) for service in replicas))

        assert sum(closed) == 3 and sorted(summarizer.calls) == sorted(c.id for c in convs)
        assert sorted(events) == sorted((c.uid, event) for c in convs
                                        for event in ("memory_processing_started", "memory_created"))
        for conv in convs:
            assert (await store_b.get_conversation(conv.uid, conv.id)).status == "completed"


# -- end to end: a server killed while a conversation is `processing` --------------------------------------------------


async def wait_for_status(http: httpx.Client, status: str, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = http.get("/v1/conversations", params={"statuses": "in_progress,processing,completed"}).json()
        if listed and listed[0]["status"] == status:
            return listed[0]
        await asyncio.sleep(0.1)
    return None


async def test_a_server_killed_while_summarising_leaves_the_conversation_to_the_next_sweep(tmp_path, deepgram,
                                                                                           database):
    """SIGKILL while the summary (a slow LLM) is being made: the conversation is `processing` in storage. A new
    server on the same data finishes it once the close lease runs out (the LLM asked again, answering now)."""
    headers = {"Authorization": f"Bearer kill-{uuid.uuid4().hex[:8]}"}
    lease_s = 8
    with OpenAITestServer(default=completion({"title": "Summarised after the crash", "overview": "o"})) as llm:
        llm.script(completion({"title": "never delivered"}, delay_s=300))  # the first summary hangs
        env = {**test_conversations.server_env(deepgram, database), "LLM_BASE_URL": llm.base_url,
               "LLM_TIMEOUT_S": "600", "CONVERSATION_CLOSE_LEASE_S": str(lease_s)}
        server = start_server(tmp_path, **env)
        try:
            url = f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout=2"
            audio = np.concatenate([read_wav(SAMPLE_WAV)[7 * SR: 12 * SR], np.zeros(SR, "f4")])
            spoken_back = await stream_frames(url, pcm16_frames(audio), headers=headers,
                                              until=lambda r: bool(r.segments))
            assert spoken_back.segments
            with httpx.Client(base_url=server.http, headers=headers) as http:
                processing = await wait_for_status(http, "processing", timeout_s=30)
            assert processing is not None
            for _ in range(100):  # the close asks the LLM just after it claimed the conversation
                if llm.requests:
                    break
                await asyncio.sleep(0.1)
            assert len(llm.requests) == 1  # the sweep is inside the summary
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(10)
        finally:
            if server.proc.poll() is None:
                stop_server(server)
        killed_at = time.monotonic()
        restarted = start_server(tmp_path, **env)
        try:
            with httpx.Client(base_url=restarted.http, headers=headers) as http:
                done = await wait_for_status(http, "completed", timeout_s=lease_s + 60)
                assert done is not None, http.get("/v1/conversations").json()
                assert done["id"] == processing["id"]
                assert done["structured"]["title"] == "Summarised after the crash"
        finally:
            stop_server(restarted)
        assert time.monotonic() - killed_at >= lease_s - 1  # taken again only once the dead close's lease ran out
        assert len(llm.requests) == 2
