"""The Deepgram test server speaks the protocol the real deepgram-sdk (7.17) expects.

Every test drives the server with the SDK's own live client (async ``AsyncDeepgramClient`` and, for the threaded
server, sync ``DeepgramClient``) pointed at it through ``DeepgramClientEnvironment``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from deepgram import AsyncDeepgramClient, DeepgramClient, DeepgramClientEnvironment
from deepgram.core import ApiError, EventType
from deepgram.listen.v1.types import (
    ListenV1Error,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1UtteranceEnd,
)
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

try:  # tests/ may or may not become a package
    from tests.deepgram_server import DeepgramTestServer, ThreadedDeepgramTestServer
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from deepgram_server import DeepgramTestServer, ThreadedDeepgramTestServer

SAMPLE_WAV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sample.wav"
SR = 16000
CHUNK = 320  # 20 ms at 16 kHz
OMI_OPTIONS: dict[str, Any] = dict(
    model="nova-3",
    encoding="linear16",
    sample_rate=16000,
    channels=1,
    punctuate=True,
    smart_format=True,
    diarize=True,
    endpointing=300,
    language="en",
    interim_results=False,
)
EXPECTED_QUERY = {
    "model": "nova-3",
    "encoding": "linear16",
    "sample_rate": "16000",
    "channels": "1",
    "punctuate": "true",
    "smart_format": "true",
    "diarize": "true",
    "endpointing": "300",
    "language": "en",
    "interim_results": "false",
}
STRICT = {"Results": ListenV1Results, "UtteranceEnd": ListenV1UtteranceEnd, "Metadata": ListenV1Metadata}


def environment(port: int) -> DeepgramClientEnvironment:
    http, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    # `production` is the WebSocket base the listen clients use (+ "/v1/listen"); `base` is REST.
    return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)


def async_client(port: int, api_key: str = "test-key", **kwargs: Any) -> AsyncDeepgramClient:
    return AsyncDeepgramClient(api_key=api_key, environment=environment(port), **kwargs)


def speech_pcm(seconds: float = 3.2, offset_s: float = 1.0) -> bytes:
    audio, sr = sf.read(SAMPLE_WAV, dtype="int16", always_2d=False)
    assert sr == SR and audio.ndim == 1
    start = int(offset_s * SR)
    return audio[start : start + int(round(seconds * SR))].astype("<i2").tobytes()


def chunks(pcm: bytes, samples: int = CHUNK) -> list[bytes]:
    step = samples * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


@pytest_asyncio.fixture
async def dg():
    server = DeepgramTestServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def strictly_valid(payload: dict[str, Any]) -> None:
    """The reply carries every field the SDK's pydantic model requires (the SDK itself parses leniently)."""
    STRICT[payload["type"]].model_validate(payload)


@pytest.mark.asyncio
async def test_sdk_live_session_round_trip(dg: DeepgramTestServer, caplog: pytest.LogCaptureFixture) -> None:
    pcm = speech_pcm(3.2)
    assert len(pcm) == 3.2 * SR * 2
    received: list[Any] = []
    events: list[str] = []
    errors: list[Any] = []

    caplog.set_level(logging.WARNING, logger="deepgram")
    client = async_client(dg.port)
    async with client.listen.v1.connect(**OMI_OPTIONS) as socket:
        socket.on(EventType.OPEN, lambda _: events.append("open"))
        socket.on(EventType.MESSAGE, received.append)
        socket.on(EventType.ERROR, errors.append)
        socket.on(EventType.CLOSE, lambda _: events.append("close"))
        listener = asyncio.create_task(socket.start_listening())
        for chunk in chunks(pcm):
            await socket.send_media(chunk)
        await socket.send_keep_alive()
        await socket.send_finalize()
        await socket.send_close_stream()
        await asyncio.wait_for(listener, 5)
        close_code = socket._websocket.close_code  # the legacy websockets protocol under the SDK

    assert events == ["open", "close"]
    assert errors == []
    assert close_code == 1000
    assert not [r for r in caplog.records if "Skipping unknown" in r.getMessage()]

    # Typed messages, in order: three 1 s finals, the Finalize result, UtteranceEnd, Metadata.
    assert [type(m) for m in received] == [ListenV1Results] * 4 + [ListenV1UtteranceEnd, ListenV1Metadata]
    for m in received:  # the SDK's objects are complete (a lenient parse would have left fields out)
        type(m).model_validate(m.model_dump())
    results = received[:4]
    assert [(r.start, r.duration) for r in results] == [
        (0.0, 1.0),
        (1.0, 1.0),
        (2.0, 1.0),
        (3.0, pytest.approx(0.2)),
    ]
    assert [r.is_final for r in results] == [True] * 4
    assert [r.speech_final for r in results] == [False, False, False, True]
    assert [r.from_finalize for r in results] == [False, False, False, True]
    assert all(r.channel_index == [0, 1] for r in results)
    assert {r.metadata.model_info.arch for r in results} == {"nova-3"}

    words = [w for r in results for w in r.channel.alternatives[0].words]
    starts = [w.start for w in words]
    ends = [w.end for w in words]
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert ends == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.2]
    assert all(a.end == b.start for a, b in zip(words, words[1:], strict=False))  # tiles exactly, no gaps or overlaps
    assert [w.word for w in words] == [f"w{s:.2f}" for s in starts]
    assert all(w.punctuated_word == w.word and w.speaker == 0 and w.confidence == 0.99 for w in words)
    assert all(w.speaker_confidence == 0.99 for w in words)  # extra field, kept by the SDK model
    assert results[1].channel.alternatives[0].transcript == "w1.00 w1.50"

    utterance_end, metadata = received[4], received[5]
    assert utterance_end.channel == [0, 1] and utterance_end.last_word_end == 3.2
    assert metadata.duration == pytest.approx(3.2) and metadata.channels == 1
    assert metadata.sha256 == hashlib.sha256(pcm).hexdigest()
    assert metadata.request_id == results[0].metadata.request_id
    assert metadata.models == [results[0].metadata.model_uuid]

    (conn,) = dg.connections
    assert bytes(conn.audio) == pcm
    assert np.array_equal(conn.audio_samples(), np.frombuffer(pcm, dtype="<i2"))
    assert conn.query == EXPECTED_QUERY
    assert conn.auth_scheme == "Token"
    assert conn.headers["Authorization"] == "<redacted>"
    assert conn.control_messages() == ["KeepAlive", "Finalize", "CloseStream"]
    kinds = [m.kind for m in conn.messages]
    assert kinds == ["audio"] * 160 + ["KeepAlive", "Finalize", "CloseStream"]
    assert all(m.nbytes == 640 for m in conn.messages[:160])
    times = [m.t for m in conn.messages]
    assert times == sorted(times)
    assert conn.closed_by == "server" and conn.close_code == 1000 and conn.close_reason == "CloseStream"
    assert conn.reply_types() == ["Results"] * 4 + ["UtteranceEnd", "Metadata"]
    for reply in conn.replies:
        strictly_valid(reply.payload)
    assert [a.status for a in dg.attempts] == [101]


@pytest.mark.asyncio
async def test_async_iteration_and_odd_messages(dg: DeepgramTestServer) -> None:
    """Async iteration over the socket; Finalize with nothing pending; an unknown control message."""
    received: list[Any] = []
    async with async_client(dg.port).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000) as s:
        await s.send_finalize()  # nothing sent yet: an empty from_finalize result, no UtteranceEnd
        await s._send({"type": "Bogus"})
        pcm = speech_pcm(0.7)
        for chunk in chunks(pcm):
            await s.send_media(chunk)
        await s.send_close_stream()
        async for message in s:  # ends normally when the server closes with 1000
            received.append(message)
    assert [type(m) for m in received] == [ListenV1Results, ListenV1Error, ListenV1Results, ListenV1Metadata]
    empty, error, tail, _ = received
    assert empty.from_finalize and empty.channel.alternatives[0].words == [] and empty.duration == 0.0
    assert error.variant == "SchemaError"
    # CloseStream flushes pending audio: the 0.5 s word and the 0.2 s remainder, then Metadata.
    assert [(w.start, w.end) for w in tail.channel.alternatives[0].words] == [(0.0, 0.5), (0.5, pytest.approx(0.7))]
    assert tail.speech_final and not tail.from_finalize
    # diarize not requested: no speaker fields, as with the real API
    assert tail.channel.alternatives[0].words[0].speaker is None
    conn = dg.connections[0]
    assert conn.control_messages() == ["Finalize", "Bogus", "CloseStream"]
    for reply in conn.replies:
        if reply.type in STRICT:
            strictly_valid(reply.payload)


@pytest.mark.asyncio
async def test_wrong_key_is_refused_with_401(dg: DeepgramTestServer) -> None:
    with pytest.raises(ApiError) as info:
        async with async_client(dg.port, api_key="wrong-key").listen.v1.connect(**OMI_OPTIONS):
            pass
    assert info.value.status_code == 401
    assert dg.connections == []
    assert [(a.status, a.auth_scheme) for a in dg.attempts] == [(401, "Token")]


@pytest.mark.asyncio
async def test_bearer_access_token_is_accepted_and_recorded(dg: DeepgramTestServer) -> None:
    client = AsyncDeepgramClient(access_token="test-key", environment=environment(dg.port))
    async with client.listen.v1.connect(model="nova-3") as socket:
        await socket.send_close_stream()
        async for _ in socket:
            pass
    assert dg.connections[0].auth_scheme == "Bearer"


@pytest.mark.asyncio
async def test_idle_timeout_closes_with_1011_net0001() -> None:
    async with DeepgramTestServer(idle_timeout_s=0.3) as dg:
        async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS) as socket:
            # KeepAlive (or audio) keeps the socket open past the timeout ...
            for _ in range(5):
                await socket.send_keep_alive()
                await asyncio.sleep(0.1)
            assert dg.connections[0].is_open
            # ... silence closes it.
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosedError) as info:
                async for _ in socket:
                    pass
            waited = time.monotonic() - t0
        assert info.value.rcvd.code == 1011 and "net0001" in info.value.rcvd.reason
        assert 0.15 < waited < 2.0
        conn = dg.connections[0]
        assert conn.event_names() == ["idle_timeout"]
        assert conn.closed_by == "server" and conn.close_code == 1011
        assert conn.control_messages() == ["KeepAlive"] * 5


@pytest.mark.asyncio
async def test_drop_after_bytes_closes_abruptly_with_1011() -> None:
    async with DeepgramTestServer(drop_after_bytes=6400) as dg:
        closed: list[ConnectionClosed] = []
        async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS) as socket:

            async def listen() -> None:
                try:
                    async for _ in socket:
                        pass
                except ConnectionClosed as exc:
                    closed.append(exc)

            listener = asyncio.create_task(listen())
            with pytest.raises(ConnectionClosed):
                for chunk in chunks(speech_pcm(3.2)):
                    await socket.send_media(chunk)
                    await asyncio.sleep(0.002)
            await asyncio.wait_for(listener, 5)
        assert closed and closed[0].rcvd.code == 1011
        conn = dg.connections[0]
        assert conn.audio_bytes == 6400 and len(conn.audio) == 6400
        assert conn.event_names() == ["drop_after_bytes"]
        assert conn.closed_by == "server" and conn.close_code == 1011
        assert conn.reply_types() == []  # 0.2 s of audio: no result was due


@pytest.mark.asyncio
async def test_refuse_connections_gives_503_then_recovers() -> None:
    async with DeepgramTestServer() as dg:
        dg.refuse_connections = 2
        for _ in range(2):
            with pytest.raises(ApiError) as info:
                async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS):
                    pass
            assert info.value.status_code == 503
        async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS) as socket:
            await socket.send_close_stream()
            async for _ in socket:
                pass
        assert [a.status for a in dg.attempts] == [503, 503, 101]
        assert len(dg.connections) == 1 and dg.refuse_connections == 0


@pytest.mark.asyncio
async def test_reply_delay_does_not_block_receipt() -> None:
    async with DeepgramTestServer(reply_delay_s=0.3) as dg:
        async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS) as socket:
            pcm = speech_pcm(1.0)
            for chunk in chunks(pcm):
                await socket.send_media(chunk)
            t_sent = time.monotonic()
            await dg.wait_for(lambda s: s.connections[0].audio_bytes == len(pcm), timeout=1.0)
            assert time.monotonic() - t_sent < 0.3  # all audio received before the first reply is due
            assert dg.connections[0].replies == []
            message = await asyncio.wait_for(socket.recv(), 2)
            assert isinstance(message, ListenV1Results)
            assert time.monotonic() - t_sent >= 0.25
            await socket.send_close_stream()
            async for _ in socket:
                pass
        assert dg.connections[0].reply_types() == ["Results", "Metadata"]


@pytest.mark.asyncio
async def test_client_disconnect_and_server_stop_are_recorded() -> None:
    dg = DeepgramTestServer()
    await dg.start()
    # The client leaves without CloseStream: its close frame (1000) is recorded.
    async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS) as socket:
        await socket.send_media(speech_pcm(0.1))
    await dg.wait_for(lambda s: not s.connections[0].is_open)
    first = dg.connections[0]
    assert (first.closed_by, first.close_code) == ("client", 1000)
    # The server stops under an open connection: closed by the server with 1001 ("going away").
    async with async_client(dg.port).listen.v1.connect(**OMI_OPTIONS) as socket:
        await dg.wait_for(lambda s: len(s.connections) == 2)
        await dg.stop()
        with pytest.raises(ConnectionClosed):
            await socket.recv()
    second = dg.connections[1]
    assert (second.closed_by, second.close_code) == ("server", 1001)
    assert second.event_names() == ["server_stop"]


def test_threaded_server_with_sync_client() -> None:
    pcm = speech_pcm(1.5)
    with ThreadedDeepgramTestServer(word_s=0.25, result_every_s=0.5) as dg:
        assert dg.url == f"http://127.0.0.1:{dg.port}"
        client = DeepgramClient(api_key="test-key", environment=environment(dg.port))
        received: list[Any] = []
        with client.listen.v1.connect(**OMI_OPTIONS) as socket:
            for chunk in chunks(pcm):
                socket.send_media(chunk)
            socket.send_finalize()
            socket.send_close_stream()
            for message in socket:  # the sync client: plain iteration, ends on close 1000
                received.append(message)
        dg.wait_for(lambda s: not s.connections[0].is_open)
        (conn,) = dg.connections
    names = [type(m).__name__ for m in received]
    assert names == ["ListenV1Results"] * 4 + ["ListenV1UtteranceEnd", "ListenV1Metadata"]
    words = [w for r in received[:4] for w in r.channel.alternatives[0].words]
    assert [w.start for w in words] == [i * 0.25 for i in range(6)]
    assert words[-1].end == 1.5
    assert received[3].from_finalize and received[3].channel.alternatives[0].words == []
    assert bytes(conn.audio) == pcm and conn.closed_by == "server" and conn.close_code == 1000
    conn.audio.clear()  # a snapshot: changing it does not touch the server's record


def test_runs_as_a_script() -> None:
    script = Path(__file__).with_name("deepgram_server.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Deepgram test server listening on http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        client = DeepgramClient(api_key="test-key", environment=environment(port))
        with client.listen.v1.connect(**OMI_OPTIONS) as socket:
            for chunk in chunks(speech_pcm(1.0)):
                socket.send_media(chunk)
            socket.send_close_stream()
            types = [type(m).__name__ for m in socket]
        assert types == ["ListenV1Results", "ListenV1Metadata"]
    finally:
        proc.terminate()
        proc.wait(10)
