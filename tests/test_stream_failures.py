"""A stream's failure paths on a real server: each ends with its defined close code, logs once, and loses nothing
that was stored or could still be.

- A user's reconnect replaces their stream stuck on a client that stopped reading (MAX_STREAMS_PER_USER=1): the new
  stream is ready at once, not after the old client's send timeout; the old stream still finishes and is stored.
- The model pool full mid-stream (a real `PoolSaturated`): 1013 with an `error` event `server_full`.
- An unexpected error in the pipeline, and `Pipeline.finish()` failing: 1011 `internal_error`, one ERROR line with
  the traceback, and the stream's end (speaker state, the conversation's end, the close) still happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import (
    SAMPLE_WAV,
    ServerProcess,
    free_port,
    pcm16_frames,
    read_wav,
    silence_frames,
    start_server,
    stop_server,
    stream_frames,
)
from deepgram_server import ThreadedDeepgramTestServer
from test_backpressure import feed_speech_until, speech, transcribed_words, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

URL = "/v4/listen?codec=pcm16&sample_rate=16000"


def unsent_bytes(server_port: int, client_port: int) -> int:
    """The server side's send queue (bytes written, not yet acknowledged) of one loopback connection."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                return int(fields[4].split(":")[0], 16)
    return 0


def stored_words(server: ServerProcess, uid: str) -> int:
    with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}, timeout=30) as http:
        conversations = http.get("/v1/conversations").json()
        return sum(len(s["text"].split()) for c in conversations
                   for s in http.get(f"/v1/conversations/{c['id']}").json()["transcript_segments"])


async def test_a_reconnect_replaces_a_stream_stuck_on_its_client_at_once(tmp_path):
    """The first connection stops reading (4 KiB receive buffer, the library reads one message) while its stream
    keeps producing segments, until the server's send to it is stuck: the kernel's buffers are full (the server's
    send queue stops growing). The same user then reconnects. Before, `_admit` awaited the old client's close,
    which waited for that stuck send for WS_SLOW_CLIENT_TIMEOUT_S (10 s here); now the new stream is ready in well
    under that, and the old stream still ends as any stream: its audio transcribed and stored, its client closed
    (1008: it never read), one `stream closed` line each."""
    uid, headers = "reconnects", {"Authorization": "Bearer reconnects"}
    slow_timeout_s = 10.0
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.01, result_every_s=0.05) as deepgram:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key",
                              JOBS_ENABLED="false", MAX_STREAMS_PER_USER="1", IDLE_TIMEOUT_S="300",
                              WS_SLOW_CLIENT_TIMEOUT_S=str(slow_timeout_s), UVICORN_WS_PING_INTERVAL="600")
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            client_port = sock.getsockname()[1]
            async with connect(server.ws + URL, sock=sock, additional_headers=headers, max_queue=1,
                               compression=None, ping_interval=None, open_timeout=30, close_timeout=5) as stuck:
                stop_feeding = asyncio.Event()  # results keep coming while it is fed: the buffers fill
                feeder = asyncio.create_task(feed_speech_until(stuck, stop_feeding))
                # Stuck: the server's send queue to this client has stopped growing for 2 s while segments keep
                # coming, so what the server sends now waits in its own transport (over 64 KiB: send blocks).
                deadline, sizes = time.monotonic() + 120, []
                while len(sizes) < 4 or not (sizes[-1] == sizes[-4] > 0):
                    assert time.monotonic() < deadline, f"the server's sends never got stuck: {sizes[-5:]}"
                    await asyncio.sleep(0.5)
                    sizes.append(unsent_bytes(server.port, client_port))
                await asyncio.sleep(4.0)
                stop_feeding.set()
                await feeder

                started = time.monotonic()
                async with connect(server.ws + URL, additional_headers=headers, open_timeout=60) as again:
                    while True:
                        message = json.loads(await asyncio.wait_for(again.recv(), 60))
                        if isinstance(message, dict) and message.get("status") == "ready":
                            break
                    ready_s = time.monotonic() - started
                    await again.send(pcm16_frames(speech(1.0))[0])
                # The stuck client reads at last, after the slow-client timeout: its sends stayed stuck, so its
                # close is 1008, while its successor was served.
                await asyncio.sleep(slow_timeout_s + 3)
                async with asyncio.timeout(60):
                    with contextlib.suppress(ConnectionClosed):
                        async for _ in stuck:
                            pass
                old_close = stuck.close_code
            await wait_until(lambda: server.log().count(f"stream closed uid={uid} ") == 2, 90, "both streams' ends")
            words = stored_words(server, uid)
            sent_words = sum(transcribed_words(c) for c in deepgram.connections)
        finally:
            stop_server(server)
    print(f"the reconnect was ready {ready_s:.2f} s after it connected (WS_SLOW_CLIENT_TIMEOUT_S {slow_timeout_s:.0f}"
          f" s); the stuck client closed {old_close}; {words} words stored of {sent_words} transcribed")
    assert ready_s < slow_timeout_s / 3
    assert old_close == 1008  # its sends were stuck from before it was replaced until the slow-client timeout
    assert words == sent_words > 0  # the replaced stream finished: every word it was sent is stored
    assert "Traceback" not in server.log()


# --- failures of the pipeline --------------------------------------------------------------------------------------


async def test_a_full_model_pool_mid_stream_ends_the_stream_with_1013(tmp_path):
    """A real `PoolSaturated` in a real server process: the VAD queue holds one request (POOL_QUEUE_SIZE=1) and
    its worker waits 300 ms to batch (VAD_MAX_WAIT_MS), so a stream's frames that come while another stream's wait
    find it full. Each stream so ended gets an `error` event `server_full` and close 1013 (try again later), and
    the server logs one ERROR line for it, without a traceback (a known condition). Before, the error escaped the
    receive loop with a traceback and the stream closed 1000."""
    server = start_server(tmp_path, POOL_QUEUE_SIZE="1", VAD_MAX_WAIT_MS="300", JOBS_ENABLED="false")
    try:
        url = server.ws + URL
        results = await asyncio.gather(*(
            stream_frames(url, silence_frames(6.0), pace_s=0.02, until=lambda r: False, timeout_s=3)
            for _ in range(3)))
        log_text = server.log()
    finally:
        stop_server(server)
    ended = [r for r in results if r.close_code == 1013]
    assert ended, [(r.close_code, r.errors()) for r in results]
    for result in ended:
        assert [e["code"] for e in result.errors()] == ["server_full"]
    assert all(r.close_code in (1000, 1013) for r in results)
    assert log_text.count("ERROR server: stream of ") == len(ended)
    assert "saturated" in log_text and "Traceback" not in log_text


@contextlib.asynccontextmanager
async def in_process_server(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Any, str]]:
    """The app under uvicorn in this test's own event loop, so that a test can make one part of a real stream's
    pipeline fail: (the app, its ws:// base URL). Models load lazily; local STT (pocketsphinx); SQLite."""
    import uvicorn

    from config import Settings
    from server import create_app

    app = create_app(Settings(_env_file=None, data_dir=tmp_path, stt_backend="local", lazy_models=True,
                              jobs_enabled=False, **settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, ws_ping_interval=None))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.05)
        yield app, f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


def stream_errors(caplog: pytest.LogCaptureFixture, uid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and uid in r.getMessage()]


async def stream_end_was_stored(app: Any, uid: str, caplog: pytest.LogCaptureFixture) -> None:
    """The stream's end reached storage: the conversation's clock is at the end of the audio the stream decoded
    (`stream_ended`; its segments alone put it at their last word's end), and the speaker state is saved."""
    [closed] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"stream closed uid={uid} ")]
    stream_s = float(closed.rsplit(" of ", 1)[1].rstrip("s"))
    storage = app.state.storage
    [conversation] = await storage.list_conversations(uid)
    assert stream_s > 0.5 and conversation.duration_s == pytest.approx(stream_s, abs=0.05)  # some audio went in
    assert await storage.load_speaker_state(uid, conversation.id) is not None


SPEECH_THEN_SILENCE = pcm16_frames(np.concatenate([read_wav(SAMPLE_WAV)[6 * 16000 : 9 * 16000],
                                                   np.zeros(2 * 16000, np.float32)]))


async def test_an_unexpected_pipeline_error_closes_1011_and_the_stream_still_ends(tmp_path, caplog):
    """The VAD model raises mid-stream (its batch call fails on the 80th call; in process: no real fault makes the
    VAD fail in a server process). The stream ends with an `error` event `internal_error` (no details) and close
    1011, the server logs one ERROR line with the traceback, and the stream's end is stored as on any end. Before,
    the error escaped the receive loop (logged twice with tracebacks) and the stream closed 1000."""
    caplog.set_level(logging.INFO)
    uid = "vad-fails"
    async with in_process_server(tmp_path) as (app, base):
        backend = app.state.pool.vad_backend
        real, calls = backend.speech_probs_batch, []

        def failing(*args: Any) -> Any:
            calls.append(1)
            if len(calls) >= 80:  # a call may score less than a frame step of this stream: no fixed time
                raise RuntimeError("the VAD model failed")
            return real(*args)

        backend.speech_probs_batch = failing
        result = await stream_frames(base + URL, SPEECH_THEN_SILENCE, headers={"Authorization": f"Bearer {uid}"},
                                     pace_s=0.01, close=False, timeout_s=30)
        backend.speech_probs_batch = real
        await stream_end_was_stored(app, uid, caplog)
    assert result.close_code == 1011
    assert [e["code"] for e in result.errors()] == ["internal_error"]
    assert "VAD" not in json.dumps(result.errors())  # the client is not told internals
    [record] = stream_errors(caplog, uid)
    assert record.exc_info is not None and "the VAD model failed" in str(record.exc_info[1])


async def test_a_failing_finish_still_stores_the_end_and_closes_1011(tmp_path, caplog):
    """`Pipeline.finish()` fails: the STT session's close raises (after closing; in process: no real fault makes
    it raise in a server process). The stream was ending on idle (IDLE_TIMEOUT_S 2 s); the last segments are
    stored, the speaker state and the conversation's end are saved, the client gets `idle`, then `internal_error`
    and close 1011, and the server logs one ERROR line with the traceback. Before, the exception skipped the
    state, the conversation's end and the close."""
    caplog.set_level(logging.INFO)
    uid = "finish-fails"
    async with in_process_server(tmp_path, idle_timeout_s=2.0) as (app, base):
        factory = app.state.stt_factory
        real_session = factory.session

        def session(*args: Any, **kwargs: Any) -> Any:
            stt = real_session(*args, **kwargs)
            real_close = stt.close

            async def close() -> None:
                await real_close()
                raise RuntimeError("the STT session failed to close")

            stt.close = close
            return stt

        factory.session = session
        result = await stream_frames(base + URL, SPEECH_THEN_SILENCE, headers={"Authorization": f"Bearer {uid}"},
                                     pace_s=0.01, close=False, timeout_s=60)
        await stream_end_was_stored(app, uid, caplog)
        [conversation] = await app.state.storage.list_conversations(uid)
        stored = await app.state.storage.list_segments(uid, conversation.id)
    assert result.close_code == 1011
    assert [e["code"] for e in result.errors()] == ["idle", "internal_error"]
    assert stored and {s.id for s in stored} == set(result.segments)  # the last segments were stored and sent
    [record] = stream_errors(caplog, uid)
    assert record.exc_info is not None and "failed to close" in str(record.exc_info[1])


async def test_a_closed_model_pool_mid_stream_ends_the_stream_with_1013(tmp_path, caplog):
    """The model pool stops under a live stream (`ModelPool.close`, as at the server's shutdown; in process: a
    server process closes its pool only after its streams ended). The stream ends with an `error` event
    `server_unavailable` and close 1013 (try again later: another replica), one ERROR line without a traceback,
    and its end is stored (the VAD flush at the end runs without the pool)."""
    caplog.set_level(logging.INFO)
    uid = "pool-closed"
    async with in_process_server(tmp_path) as (app, base):
        frames = SPEECH_THEN_SILENCE

        async def close_pool_midway() -> None:  # once the VAD has scored some of the stream's frames
            while app.state.pool.stats()["vad"]["items"] < 60:  # a job per frame at least: 1.2 s
                await asyncio.sleep(0.05)
            await app.state.pool.close()

        closer = asyncio.create_task(close_pool_midway())
        result = await stream_frames(base + URL, frames, headers={"Authorization": f"Bearer {uid}"}, pace_s=0.01,
                                     close=False, timeout_s=30)
        await closer
        await stream_end_was_stored(app, uid, caplog)
    assert result.close_code == 1013
    assert [e["code"] for e in result.errors()] == ["server_unavailable"]
    [record] = stream_errors(caplog, uid)
    assert record.exc_info is None and "model pool vad" in record.getMessage()


async def test_a_failure_setting_the_stream_up_closes_1011_with_one_log_line(tmp_path, caplog):
    """Making the stream's STT session raises (in process: the factory fails for this stream). The stream ends with
    `internal_error` and 1011 and one ERROR line with the traceback; before, the exception left the handler (a
    traceback from uvicorn, no event for the client)."""
    caplog.set_level(logging.INFO)
    uid = "setup-fails"
    async with in_process_server(tmp_path) as (app, base):

        def session(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no STT session for this stream")

        app.state.stt_factory.session = session
        result = await stream_frames(base + URL, [], headers={"Authorization": f"Bearer {uid}"}, close=False,
                                     timeout_s=30)
    assert result.close_code == 1011
    assert [e["code"] for e in result.errors()] == ["internal_error"]
    [record] = stream_errors(caplog, uid)
    assert record.exc_info is not None and "no STT session" in str(record.exc_info[1])
