"""Conversations end to end, on SQLite and on a real PostgreSQL: a real server process, real WebSocket clients,
real speech (the Deepgram-protocol test server transcribes). Continuation after a reconnect, the sweep closing a
conversation with `memory_created` to a connected client, and a killed server that loses no stored segment."""

from __future__ import annotations

import asyncio
import json
import signal
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
TIMEOUT_S = 4  # conversation_timeout for these tests (MIN_CONVERSATION_TIMEOUT_S lowered to allow it)


@pytest.fixture(scope="module")
def deepgram():
    with ThreadedDeepgramTestServer(api_key="dg-key") as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """Settings for a fresh database of the given kind; a new PostgreSQL database per test."""
    if request.param == "sqlite":
        yield {"DATABASE_CHOICE": "sqlite", "SQLITE_PATH": str(tmp_path / "conv.sqlite3")}
        return
    with fresh_postgres_database("conv") as url:
        yield {"DATABASE_CHOICE": "postgres", "POSTGRES_URL": url}


def server_env(deepgram, database) -> dict[str, str]:
    return {"STT_BACKEND": "deepgram", "DEEPGRAM_URL": deepgram.url, "DEEPGRAM_API_KEY": "dg-key",
            "MIN_CONVERSATION_TIMEOUT_S": "1", "SWEEP_INTERVAL_S": "0.5", **database}


def listen_url(server) -> str:
    return f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout={TIMEOUT_S}"


def words_back(expected_end: float):
    def done(result) -> bool:
        return any(s["end"] >= expected_end for s in result.segments.values())

    return done


async def test_reconnect_continues_then_sweep_completes(tmp_path, deepgram, database):
    uid = f"conv-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {uid}"}
    audio = read_wav(SAMPLE_WAV)
    first, second = audio[: 18 * SR], audio[18 * SR :]
    server = start_server(tmp_path, **server_env(deepgram, database))
    try:
        one = await stream_frames(listen_url(server), pcm16_frames(np.concatenate([first, np.zeros(SR, "f4")])),
                                  headers=headers, until=words_back(17.0))
        assert one.segments and not one.errors()
        end_one = max(s["end"] for s in one.segments.values())
        # Reconnect within the timeout: the same conversation, its clock continuing after the first stream.
        frames = pcm16_frames(np.concatenate([second, np.zeros(SR, "f4")]))
        two = await stream_frames(listen_url(server), frames, headers=headers, timeout_s=60,
                                  until=lambda r: any(e.get("type") == "memory_created" for e in r.events))
        assert not two.errors()
        new_two = {i: seg for i, seg in two.segments.items() if i not in one.segments}
        starts_two = [seg["start"] for seg in new_two.values()]
        assert starts_two and min(starts_two) >= end_one  # continuous times, no reset to 0
        for i, seg in two.segments.items():  # stream one's last segment may grow (Omi's merge rule), in place
            if i in one.segments:
                assert seg["start"] == one.segments[i]["start"] and seg["text"].startswith(one.segments[i]["text"])
        assert max(s["end"] for s in two.segments.values()) > 19 + 10  # 19 s of stream one + ~11 s of speech
        # Speaker labels are the conversation's, not the connection's: one mapping to the reference speakers fits
        # both streams (stream two's clock runs 1 s ahead of the audio: stream one ended with 1 s of silence).
        from conftest import DATA
        from test_speakers import label_agreement, rttm_turns

        shifted = [{**one.segments, **two.segments}[i] for i in one.segments] + [
            {**seg, "start": seg["start"] - 1, "end": seg["end"] - 1} for seg in new_two.values()]
        agreement, mapping = label_agreement(shifted, rttm_turns(DATA / "sample.rttm", "sample"),
                                             key=lambda s: s["speaker"])
        print(f"speaker agreement across a reconnect ({database['DATABASE_CHOICE']}): {agreement:.3f} {mapping}")
        assert agreement >= 0.75, (agreement, mapping)
        # After TIMEOUT_S without speech the sweep closed it, and the connected client heard about it.
        kinds = [e["type"] for e in two.events if e.get("type", "").startswith("memory")]
        assert kinds == ["memory_processing_started", "memory_created"]
        memory = next(e for e in two.events if e["type"] == "memory_created")["memory"]
        assert memory["status"] == "completed" and memory["structured"]["title"]
        with httpx.Client(base_url=server.http, headers=headers) as http:
            conversations = http.get("/v1/conversations").json()
            assert [c["id"] for c in conversations] == [memory["id"]]  # one conversation for both streams
            stored = http.get(f"/v1/conversations/{memory['id']}").json()
        seen = {**one.segments, **two.segments}
        stored_by_id = {s["id"]: s for s in stored["transcript_segments"]}
        assert set(seen) <= set(stored_by_id)  # every segment the client saw is stored
        for seg_id, seg in seen.items():
            kept = stored_by_id[seg_id]
            # The same, or grown after the client stopped listening (the server finishes the audio it got).
            assert kept["start"] == seg["start"] and kept["text"].startswith(seg["text"]), (kept, seg)
        assert len(stored_by_id) - len(seen) <= 1
        # The next stream starts a new conversation and is told about the last one.
        three = await stream_frames(listen_url(server), pcm16_frames(np.zeros(SR, "f4")), headers=headers)
        assert {"type": "last_memory", "memory_id": memory["id"]} in three.events
    finally:
        stop_server(server)


async def test_killed_server_loses_no_stored_segment(tmp_path, deepgram, database):
    uid = f"kill-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {uid}"}
    env = server_env(deepgram, database)
    server = start_server(tmp_path, **env)
    seen: dict[str, dict] = {}
    try:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        async with connect(listen_url(server), additional_headers=headers) as ws:
            for frame in pcm16_frames(read_wav(SAMPLE_WAV)[: 20 * SR]):
                await ws.send(frame)
            try:
                while not any(s["end"] > 12 for s in seen.values()):
                    message = await asyncio.wait_for(ws.recv(), 20)
                    payload = json.loads(message) if message != "ping" else None
                    if isinstance(payload, list):
                        seen.update({s["id"]: s for s in payload})
                server.proc.send_signal(signal.SIGKILL)  # no shutdown, no flush
                server.proc.wait(10)
            except ConnectionClosed:
                pass
    finally:
        if server.proc.poll() is None:
            stop_server(server)
    assert seen
    restarted = start_server(tmp_path, **env)
    try:
        with httpx.Client(base_url=restarted.http, headers=headers) as http:
            conversation = None
            for _ in range(100):  # the sweep finishes what the dead server left in progress
                listed = http.get("/v1/conversations").json()
                if listed and listed[0]["status"] == "completed":
                    conversation = listed[0]
                    break
                await asyncio.sleep(0.2)
            assert conversation is not None, listed
            stored = http.get(f"/v1/conversations/{conversation['id']}").json()["transcript_segments"]
        stored_by_id = {s["id"]: s for s in stored}
        for seg_id, seg in seen.items():  # everything the client was sent had been stored first
            assert seg_id in stored_by_id and stored_by_id[seg_id]["text"].startswith(seg["text"][:20])
    finally:
        stop_server(restarted)


async def test_speech_after_the_sweep_starts_a_new_conversation_on_the_same_stream(tmp_path, deepgram, database):
    """A long silence on an open stream: the sweep closes the conversation (the client hears `memory_created`), and
    the next speech starts a new conversation whose clock starts again."""
    from websockets.asyncio.client import connect

    uid = f"gap-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {uid}"}
    audio = read_wav(SAMPLE_WAV)
    server = start_server(tmp_path, **server_env(deepgram, database))
    segments: dict[str, dict] = {}
    events: list[dict] = []
    try:
        async with connect(listen_url(server), additional_headers=headers) as ws:

            async def read() -> None:
                async for message in ws:
                    payload = json.loads(message) if message != "ping" else None
                    if isinstance(payload, list):
                        segments.update({s["id"]: s for s in payload})
                    elif isinstance(payload, dict):
                        events.append(payload)

            reader = asyncio.create_task(read())
            for frame in pcm16_frames(np.concatenate([audio[7 * SR : 12 * SR], np.zeros(SR, "f4")])):
                await ws.send(frame)
            for _ in range(200):  # silence (nothing sent) until the sweep has closed it
                if any(e.get("type") == "memory_created" for e in events):
                    break
                await asyncio.sleep(0.1)
            first_ids = set(segments)
            assert first_ids and any(e.get("type") == "memory_created" for e in events)
            for frame in pcm16_frames(np.concatenate([audio[20 * SR : 25 * SR], np.zeros(SR, "f4")])):
                await ws.send(frame)
            for _ in range(200):
                if set(segments) - first_ids:
                    break
                await asyncio.sleep(0.1)
            await ws.close()
            await asyncio.wait_for(reader, 10)
        later = [s for i, s in segments.items() if i not in first_ids]
        assert later and min(s["start"] for s in later) == 0.0  # the new conversation's clock
        with httpx.Client(base_url=server.http, headers=headers) as http:
            conversations = http.get("/v1/conversations").json()
            assert len(conversations) == 2 and conversations[1]["status"] == "completed"
            newest = http.get(f"/v1/conversations/{conversations[0]['id']}").json()
        assert {s["id"] for s in newest["transcript_segments"]} >= {s["id"] for s in later}
    finally:
        stop_server(server)
