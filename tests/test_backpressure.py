"""Backpressure on a real server process, both directions.

- A client that sends faster than real time is paced by TCP (the server reads a frame only after the previous one
  went through decode and VAD): every frame is processed, none dropped.
- A client that stops reading its messages does not grow the server's memory: its messages wait in a bounded queue
  (pings dropped, queued versions of a segment replaced by newer ones); when the queue overflows or nothing could be
  sent for WS_SLOW_CLIENT_TIMEOUT_S it is closed with 1008 (error event `slow_client`). Its stream still finishes
  and stores every segment, and other clients are served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
from conftest import (
    SAMPLE_WAV,
    ServerProcess,
    pcm16_frames,
    read_wav,
    start_server,
    stop_server,
    stream_frames,
)
from deepgram_server import RecordedConnection, ThreadedDeepgramTestServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

URL = "/v4/listen?codec=pcm16&sample_rate=16000"


def speech(seconds: float) -> np.ndarray:
    """`seconds` of real speech: sample.wav (30 s, speech up to its last sample) looped."""
    audio = read_wav(SAMPLE_WAV)
    n = int(seconds * 16000)
    return np.tile(audio, -(-n // len(audio)))[:n]


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1)) / 1024


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    match = re.search(rf"^omi_{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


def stored_segments(server: ServerProcess, headers: dict[str, str]) -> list[dict]:
    with httpx.Client(base_url=server.http, headers=headers, timeout=30) as http:
        conversation = http.get("/v1/conversations").json()[0]
        return http.get(f"/v1/conversations/{conversation['id']}").json()["transcript_segments"]


def transcribed_words(connection: RecordedConnection) -> int:
    """Words the Deepgram test server sent back on one connection (its final results)."""
    return sum(len(r.payload["channel"]["alternatives"][0]["words"]) for r in connection.replies
               if r.type == "Results")


def stream_closed_line(server: ServerProcess, uid: str) -> str:
    lines = [line for line in server.log().splitlines() if f"stream closed uid={uid} " in line]
    assert len(lines) == 1, server.log()[-3000:]
    return lines[0]


async def feed_speech_until(ws, stop: asyncio.Event) -> None:
    """Real speech at 4x real time, looped, until `stop` is set."""
    frames = pcm16_frames(speech(90.0))
    for i in itertools.count():
        if stop.is_set():
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frames[i % len(frames)])
        if i % 10 == 9:
            await asyncio.sleep(0.05)


async def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# --- the outbound queue on its own (ws_client.WsClient over a fake socket) ----------------------------------------


class FakeSocket:
    """`send_text` waits while `gate` is clear: a peer that does not read."""

    def __init__(self) -> None:
        from starlette.websockets import WebSocketState

        self.sent: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed: tuple[int, str] | None = None
        self.application_state = WebSocketState.CONNECTED

    async def send_text(self, text: str) -> None:
        await self.gate.wait()
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        from starlette.websockets import WebSocketState

        self.closed = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED


def seg(segment_id: str, text: str) -> dict:
    return {"id": segment_id, "text": text, "start": 0.0, "end": 1.0}


async def test_queued_segment_versions_coalesce_in_place_and_pings_are_dropped():
    import metrics
    from ws_client import WsClient

    ws = FakeSocket()
    client = WsClient(ws, queue_max=10, slow_timeout_s=5)
    dropped = metrics.value("ws_messages_dropped_total")
    ws.gate.clear()
    await client.send_json({"type": "service_status", "status": "ready"})
    await asyncio.sleep(0.01)  # the sender took it and waits on the socket
    await client.send_json([seg("a", "one")])
    await client.send_json([seg("b", "x")])
    client.send_ping()  # dropped: messages are waiting
    await client.send_json([seg("a", "one two"), seg("c", "y")])  # a's newer version moves into the first list
    await client.send_json([seg("b", "x z")])  # nothing left of it: dropped
    await client.send_json({"type": "memory_created"})
    await client.send_json([seg("a", "one two three")])  # never moved past an event
    ws.gate.set()
    await client.close(1000)
    assert [json.loads(m) for m in ws.sent] == [
        {"type": "service_status", "status": "ready"},
        [seg("a", "one two")],
        [seg("b", "x z")],
        [seg("c", "y")],
        {"type": "memory_created"},
        [seg("a", "one two three")],
    ]
    assert ws.closed == (1000, "")
    assert metrics.value("ws_messages_dropped_total") - dropped == 2


async def test_a_queue_over_its_bound_closes_the_client_with_1008():
    import metrics
    from ws_client import WsClient

    ws = FakeSocket()
    client = WsClient(ws, queue_max=3, slow_timeout_s=5)
    slow = metrics.value("ws_slow_clients_closed_total")
    ws.gate.clear()
    for i in range(5):
        await client.send_json({"type": "event", "n": i})
        await asyncio.sleep(0.01)  # the first one is in flight; 1..4 wait, the 4th is one too many
    assert client.slow and client.stop_code == 1008
    ws.gate.set()
    await client.close(1000)  # the stream's own close code gives way to the slow-client one
    events = [json.loads(m) for m in ws.sent]
    assert events[0] == {"type": "event", "n": 0}  # in flight when the queue overflowed
    assert [e.get("code") for e in events[1:]] == ["slow_client"]
    assert ws.closed is not None and ws.closed[0] == 1008
    assert metrics.value("ws_slow_clients_closed_total") - slow == 1


async def test_a_send_stuck_past_the_timeout_closes_the_client_and_close_is_bounded():
    from ws_client import WsClient

    ws = FakeSocket()
    client = WsClient(ws, queue_max=100, slow_timeout_s=0.3)
    ws.gate.clear()  # never opens
    await client.send_json([seg("a", "one")])
    started = time.monotonic()
    await asyncio.wait_for(client.close(1001, "server shutting down"), 5)
    assert time.monotonic() - started < 2.5  # 0.3 s stuck, then the error event gets 1 s, then the close
    assert client.slow and ws.closed is not None and ws.closed[0] == 1008 and ws.sent == []


# --- real server processes -------------------------------------------------------------------------------------


async def test_a_client_sending_faster_than_real_time_has_every_frame_processed(tmp_path):
    uid = "fast-sender"
    headers = {"Authorization": f"Bearer {uid}"}
    frames = pcm16_frames(speech(60.0))
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.5) as deepgram:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key",
                              JOBS_ENABLED="false")
        try:
            started = time.monotonic()
            result = await stream_frames(server.ws + URL, frames, headers=headers)  # as fast as it can, then closes
            send_s = time.monotonic() - started
            await wait_until(lambda: "stream closed uid=fast-sender " in server.log(), 60, "the stream to close")
            closed = stream_closed_line(server, uid)
            stored = stored_segments(server, headers)
            received = deepgram.connections[0]
        finally:
            stop_server(server)
    assert result.close_code == 1000 and not result.errors()
    # Every frame was read and decoded: the whole 60 s, not a sample less.
    assert f"frames={len(frames)} bad=0 " in closed and closed.endswith("of 60.0s"), closed
    sent_s = float(re.search(r"sent=([\d.]+)s", closed).group(1))
    # ...every speech sample VAD passed on reached the STT service, and every word it returned is stored.
    assert abs(len(received.audio_samples()) / 16000 - sent_s) < 0.06
    words = " ".join(s["text"] for s in stored).split()
    assert len(words) == transcribed_words(received) > 0
    assert max(s["end"] for s in stored) >= 59.5  # the transcript reaches the end of the audio
    print(f"60 s of speech sent in {send_s:.1f} s (paced by the server); {closed}")


async def test_a_client_that_never_reads_is_closed_and_the_server_stays_bounded(tmp_path):
    """The slow client's socket has an 8 KiB receive buffer, it turns compression off (so the bytes are real) and
    its library reads one message, then stops: once the kernel's buffers are full (about 2.8 MB on loopback), the
    server's sends block. Many messages wait for it: a ping every 20 ms and a growing segment every 50 ms of audio
    (the Deepgram test server's 10 ms words)."""
    slow_uid, slow_headers = "never-reads", {"Authorization": "Bearer never-reads"}
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.01, result_every_s=0.05) as deepgram:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key",
                              JOBS_ENABLED="false", HEARTBEAT_S="0.02", WS_SEND_QUEUE_MAX="64",
                              WS_SLOW_CLIENT_TIMEOUT_S="3", IDLE_TIMEOUT_S="300",
                              UVICORN_WS_PING_INTERVAL="600")  # uvicorn's ping timeout would close it (1011) first
        rss = [rss_mb(server.proc.pid)]

        async def sample_rss() -> None:
            while True:
                rss.append(rss_mb(server.proc.pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            async with connect(server.ws + URL, sock=sock, additional_headers=slow_headers, max_queue=1,
                               compression=None, ping_interval=None, open_timeout=30, close_timeout=5) as slow:
                closed_slow = asyncio.Event()
                # Until the server gives up on the client: results keep coming, so the buffers fill however fast
                # the server works (ping bytes alone would take minutes).
                feeder = asyncio.create_task(feed_speech_until(slow, closed_slow))
                await asyncio.sleep(10)
                # Another client meanwhile, in real time: served as usual.
                other = await stream_frames(server.ws + URL, pcm16_frames(speech(12.0)), pace_s=0.02)
                try:
                    await wait_until(lambda: metric(server, "ws_slow_clients_closed_total") >= 1, 180,
                                     "slow-client close")
                finally:
                    closed_slow.set()
                    feeder.cancel()  # a send may be blocked: the server stopped reading
                    with contextlib.suppress(asyncio.CancelledError):
                        await feeder
                # The client reads at last: what the buffers held, then the server's error event and close code.
                events: list[dict] = []
                async with asyncio.timeout(60):
                    try:
                        async for message in slow:
                            if message != "ping" and isinstance(payload := json.loads(message), dict):
                                events.append(payload)
                    except ConnectionClosed:
                        pass
                close_code, close_reason = slow.close_code, slow.close_reason
            await wait_until(lambda: f"stream closed uid={slow_uid} " in server.log(), 60, "the stream to close")
            closed = stream_closed_line(server, slow_uid)
            stored = stored_segments(server, slow_headers)
            slow_connection = deepgram.connections[0]  # the slow stream opened first
            dropped = metric(server, "ws_messages_dropped_total")
        finally:
            sampler.cancel()
            stop_server(server)
    print(f"slow client: RSS {rss[0]:.0f} MB before, {max(rss):.0f} MB max, {rss[-1]:.0f} MB at the end; "
          f"{dropped:.0f} messages dropped; close {close_code} {close_reason!r}; {closed}")
    assert other.segments and not other.errors() and other.close_code == 1000
    assert close_code == 1008 and "slow client" in close_reason
    assert [e["code"] for e in events if e.get("type") == "error"] == ["slow_client"]  # it got through, last
    assert events[-1]["code"] == "slow_client"
    assert dropped > 0  # pings (and superseded segment versions) were dropped, not kept
    assert max(rss) - rss[0] < 150
    # The slow stream's processing finished: every word the STT service returned for it is stored.
    assert re.search(r"frames=\d+ bad=0 ", closed)
    words = " ".join(s["text"] for s in stored).split()
    assert len(words) == transcribed_words(slow_connection) > 0
