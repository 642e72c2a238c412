"""Limits on a real server process: streams per process and per user, frame size. Each has a setting, a clear
error and a defined close code."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from conftest import pcm16_frames, silence_frames, start_server, stop_server, stream_frames
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

URL = "/v4/listen?codec=pcm16&sample_rate=16000"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # MAX_STREAMS_PER_USER=1: the opt-in limit (the default, as Omi, is none: test_omi_app.py streams two at once)
    proc = start_server(tmp_path_factory.mktemp("limits"), MAX_STREAMS="2", MAX_FRAME_BYTES="1000",
                        MAX_STREAMS_PER_USER="1")
    yield proc
    stop_server(proc)


async def events_until_closed(ws) -> list[dict]:
    out = []
    async for message in ws:
        if message != "ping":
            payload = json.loads(message)
            if isinstance(payload, dict):
                out.append(payload)
    return out


async def ready(ws) -> None:
    while True:
        payload = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if isinstance(payload, dict) and payload.get("status") == "ready":
            return


async def test_a_users_newer_stream_replaces_the_older(server):
    headers = {"Authorization": "Bearer one-device"}
    async with connect(server.ws + URL, additional_headers=headers) as first:
        await ready(first)
        await first.send(silence_frames(0.2)[0])
        second = await stream_frames(server.ws + URL, silence_frames(0.5), headers=headers,
                                     until=lambda r: "ready" in r.statuses())
        events = await asyncio.wait_for(events_until_closed(first), 30)
        assert first.close_code == 1001 and "replaced" in first.close_reason
    assert [e["code"] for e in events if e.get("type") == "error"] == ["replaced"]
    assert "ready" in second.statuses() and not second.errors() and second.close_code == 1000


async def test_a_full_server_takes_a_users_reconnect_in_place_of_their_old_stream(server):
    """MAX_STREAMS=2, both taken (users a and b): a's reconnect replaces a's stream instead of being refused."""
    async with full_server(server, "full-a", "full-b") as (a, _):
        again = await stream_frames(server.ws + URL, silence_frames(0.5), headers={"Authorization": "Bearer full-a"},
                                    until=lambda r: "ready" in r.statuses(), timeout_s=20)
        events = await asyncio.wait_for(events_until_closed(a), 30)
        assert a.close_code == 1001
    assert "ready" in again.statuses() and not again.errors() and again.close_code == 1000
    assert [e["code"] for e in events if e.get("type") == "error"] == ["replaced"]


async def no_streams(server) -> None:
    """Wait until the server has finished every earlier stream (it processes their audio after the close)."""
    import httpx

    for _ in range(100):
        if httpx.get(f"{server.http}/ready", timeout=5).json().get("active_streams") == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("streams still open")


@contextlib.asynccontextmanager
async def full_server(server, *uids: str):
    """Once earlier streams are done, a ready stream for each of `uids` (MAX_STREAMS of them: the server is full)."""
    await no_streams(server)
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(connect(server.ws + URL,
                                                           additional_headers={"Authorization": f"Bearer {uid}"}))
                   for uid in uids]
        for ws in streams:
            await ready(ws)
        yield streams


async def test_streams_beyond_max_streams_are_refused_with_1013(server):
    async with full_server(server, "a", "b"):
        third = await stream_frames(server.ws + URL, [], headers={"Authorization": "Bearer c"}, close=False,
                                    timeout_s=20)
    assert third.close_code == 1013 and [e["code"] for e in third.errors()] == ["server_full"]
    statuses: list[str] = []
    for _ in range(20):  # room again once the server has finished the other two
        await asyncio.sleep(0.5)
        try:
            again = await stream_frames(server.ws + URL, silence_frames(0.2), headers={"Authorization": "Bearer c"},
                                        until=lambda r: "ready" in r.statuses())
        except ConnectionClosed:  # still full: refused while we were sending
            continue
        statuses = again.statuses()
        if "ready" in statuses:
            break
    assert "ready" in statuses


async def test_oversized_frames_are_refused_and_the_stream_goes_on(server):
    frames = [bytes(2000)] + pcm16_frames(__import__("numpy").zeros(8000, "f4")) + [bytes(5000)]
    result = await stream_frames(server.ws + URL, frames, until=lambda r: len(r.errors()) >= 2, timeout_s=30)
    codes = [e["code"] for e in result.errors()]
    assert codes == ["frame_too_large", "frame_too_large"] and result.close_code == 1000


async def test_a_message_over_the_ws_max_size_closes_1009_before_it_is_buffered(server):
    """uvicorn runs with --ws-max-size 1 MiB (as `make run` and the image start it): a frame past it closes the
    stream with 1009 (its default of 16 MiB would buffer it whole first); one under it but over MAX_FRAME_BYTES is
    the app's `frame_too_large` and the stream goes on. The server serves the next stream. Each stream starts once
    the earlier ones are finished (MAX_STREAMS=2: a stream still finishing made the next one `server_full`)."""
    await no_streams(server)
    under = await stream_frames(server.ws + URL, [bytes(900 * 1024), "x" * (900 * 1024)],
                                until=lambda r: len(r.errors()) >= 1, timeout_s=30)
    assert [e["code"] for e in under.errors()] == ["frame_too_large"] and under.close_code == 1000
    for frame in (bytes(2 * 1024 * 1024), "x" * (2 * 1024 * 1024)):
        await no_streams(server)
        over = await stream_frames(server.ws + URL, [frame], close=False, timeout_s=30)
        assert over.close_code == 1009, (over.close_code, over.close_reason)
    await no_streams(server)
    after = await stream_frames(server.ws + URL, silence_frames(0.2), until=lambda r: "ready" in r.statuses())
    assert "ready" in after.statuses()
