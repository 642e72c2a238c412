"""Several replicas: two real server processes on one real PostgreSQL database, real WebSocket clients, real speech
(the Deepgram-protocol test server transcribes). What must hold across replicas: a user's streams on both share one
conversation, stored once each and in order; the sweep (run by one replica) closes it only after both went quiet, and
both clients hear `memory_created`; a close made on the other replica reaches the stream; MAX_STREAMS_PER_USER counts
the user's streams on every replica."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import httpx
import numpy as np
import pytest
from conftest import (
    SAMPLE_WAV,
    fresh_postgres_database,
    pcm16_frames,
    read_wav,
    start_server,
    stop_server,
    stream_frames,
)
from deepgram_server import ThreadedDeepgramTestServer

SR = 16000
TIMEOUT_S = 6  # conversation_timeout for these tests (MIN_CONVERSATION_TIMEOUT_S lowered to allow it)


@pytest.fixture(scope="module")
def deepgram():
    with ThreadedDeepgramTestServer(api_key="dg-key") as server:
        yield server


@pytest.fixture
def database():
    with fresh_postgres_database("replicas") as url:
        yield url


@contextlib.contextmanager
def two_replicas(tmp_path, deepgram, url: str, **extra: str):
    """Two servers on one PostgreSQL database. Only B runs the jobs (the sweep), so a close that A's streams hear
    of was made on the other replica."""
    env = {"STT_BACKEND": "deepgram", "DEEPGRAM_URL": deepgram.url, "DEEPGRAM_API_KEY": "dg-key",
           "DATABASE_CHOICE": "postgres", "POSTGRES_URL": url, "MIN_CONVERSATION_TIMEOUT_S": "1",
           "SWEEP_INTERVAL_S": "0.5", "STREAM_SYNC_S": "0.5", **extra}
    a = start_server(tmp_path / "a", **env, JOBS_ENABLED="false")
    try:
        b = start_server(tmp_path / "b", **env)
        try:
            yield a, b
        finally:
            stop_server(b)
    finally:
        stop_server(a)


def listen_url(server, timeout_s: int = TIMEOUT_S) -> str:
    return f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout={timeout_s}"


def memory_events(result) -> list[dict]:
    return [e for e in result.events if e.get("type", "").startswith("memory")]


def created(result) -> bool:
    return any(e.get("type") == "memory_created" for e in result.events)


async def test_a_users_streams_on_two_replicas_share_one_conversation_and_both_hear_its_close(
        tmp_path, deepgram, database):
    """Phone on A, desktop on B, speaking at once for longer than the conversation's timeout: one conversation,
    every segment either client saw stored once, in time order; the sweep (on B) closes it only after both went quiet,
    and both clients get `memory_created` once (A's from storage: the close was made on B)."""
    with two_replicas(tmp_path, deepgram, database) as (a, b):
        await _share_one_conversation(a, b)


async def _share_one_conversation(a, b) -> None:
    headers = {"Authorization": f"Bearer both-{uuid.uuid4().hex[:8]}"}
    audio = read_wav(SAMPLE_WAV)
    silence = np.zeros(SR, "f4")
    phone_audio, desktop_audio = audio[: 14 * SR], audio[14 * SR : 28 * SR]

    async def desktop():
        await asyncio.sleep(2.0)  # the phone's conversation is open by then: the desktop continues it
        return await stream_frames(listen_url(b), pcm16_frames(np.concatenate([desktop_audio, silence])),
                                   headers=headers, pace_s=0.02, until=created, timeout_s=60)

    phone, desk = await asyncio.gather(
        stream_frames(listen_url(a), pcm16_frames(np.concatenate([phone_audio, silence])), headers=headers,
                      pace_s=0.02, until=created, timeout_s=60),
        desktop())
    assert not phone.errors() and not desk.errors(), (phone.errors(), desk.errors(), a.log_tail(), b.log_tail())
    assert phone.segments and desk.segments
    # Both heard the close once, of the same conversation, holding both streams' segments.
    for result in (phone, desk):
        kinds = [e["type"] for e in memory_events(result)]
        assert kinds.count("memory_created") == 1 and kinds.count("memory_processing_started") <= 1, kinds
    memory = next(e for e in phone.events if e["type"] == "memory_created")["memory"]
    assert next(e for e in desk.events if e["type"] == "memory_created")["memory"]["id"] == memory["id"]
    assert memory["status"] == "completed"
    with httpx.Client(base_url=a.http, headers=headers) as http:
        listed = http.get("/v1/conversations").json()
        stored = http.get(f"/v1/conversations/{memory['id']}").json()["transcript_segments"]
    assert [c["id"] for c in listed] == [memory["id"]]  # one conversation for both streams
    ids = [s["id"] for s in stored]
    assert len(ids) == len(set(ids))  # each segment stored once
    assert [s["start"] for s in stored] == sorted(s["start"] for s in stored)  # in time order
    assert {s["id"] for s in memory["transcript_segments"]} == set(ids)  # the close saw them all: none came after
    by_id = {s["id"]: s for s in stored}
    for result in (phone, desk):
        for seg_id, seg in result.segments.items():  # what each client was sent is stored, whole
            assert seg_id in by_id, seg
            assert by_id[seg_id]["text"].startswith(seg["text"]), (by_id[seg_id], seg)
    assert not set(phone.segments) & set(desk.segments)  # neither stream rewrote the other's segment


async def test_max_streams_per_user_counts_every_replica_and_a_close_on_one_reaches_the_other(
        tmp_path, deepgram, database):
    """MAX_STREAMS_PER_USER=1: the user's stream on A is replaced (`replaced`, 1001) by their newer stream on B.
    Then a close over REST on B of the conversation A's new stream feeds: A's client gets `memory_created`, and A's
    next speech goes to a new conversation."""
    from websockets.asyncio.client import connect

    audio = read_wav(SAMPLE_WAV)
    speech = pcm16_frames(np.concatenate([audio[7 * SR : 12 * SR], np.zeros(SR, "f4")]))
    with two_replicas(tmp_path, deepgram, database, MAX_STREAMS_PER_USER="1") as (a, b):
        headers = {"Authorization": f"Bearer one-{uuid.uuid4().hex[:8]}"}

        async def newer_on_b():
            await asyncio.sleep(3.0)
            return await stream_frames(listen_url(b), speech, headers=headers, timeout_s=30,
                                       until=lambda r: r.segments and old.done())

        old = asyncio.ensure_future(stream_frames(listen_url(a), speech, headers=headers, close=False, timeout_s=30))
        new = await newer_on_b()
        old = await old
        assert old.close_code == 1001 and [e["code"] for e in old.errors()] == ["replaced"], (old.errors(),
                                                                                             old.close_code)
        assert new.segments and not new.errors() and new.close_code == 1000

        # A stream on A, its conversation closed over REST on B: A's client hears it, A's next words start anew.
        headers = {"Authorization": f"Bearer rest-{uuid.uuid4().hex[:8]}"}
        segments: dict[str, dict] = {}
        events: list[dict] = []
        async with connect(listen_url(a, timeout_s=600), additional_headers=headers) as ws:

            async def read() -> None:
                async for message in ws:
                    payload = json.loads(message) if message != "ping" else None
                    if isinstance(payload, list):
                        segments.update({s["id"]: s for s in payload})
                    elif isinstance(payload, dict):
                        events.append(payload)

            reader = asyncio.create_task(read())
            for frame in speech:
                await ws.send(frame)
            with httpx.Client(base_url=b.http, headers=headers, timeout=30) as http:

                def stored_ids() -> set[str]:  # the finals stored so far (the client also gets partials)
                    listed = http.get("/v1/conversations").json()
                    found = http.get(f"/v1/conversations/{listed[0]['id']}").json() if listed else {}
                    return {s["id"] for s in found.get("transcript_segments", []) if s["end"] >= 4.0}

                await _until(stored_ids)
                stored = stored_ids()
                closed = http.post("/v1/conversations").json()
            await _until(lambda: any(e.get("type") == "memory_created" for e in events))
            memory = next(e for e in events if e["type"] == "memory_created")["memory"]
            assert memory["id"] == closed["memory"]["id"] and memory["status"] == "completed"
            assert stored <= {s["id"] for s in memory["transcript_segments"]}
            first = set(segments)
            for frame in speech:
                await ws.send(frame)
            await _until(lambda: set(segments) - first)
            await ws.close()
            await asyncio.wait_for(reader, 10)
        with httpx.Client(base_url=a.http, headers=headers) as http:
            listed = http.get("/v1/conversations").json()
        assert listed[1]["id"] == memory["id"] and listed[0]["status"] == "in_progress"
        assert [e["type"] for e in events].count("memory_created") == 1


async def _until(condition, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")
