"""Graceful shutdown: SIGTERM to a real server process mid-stream. `/ready` answers 503 and new streams are refused
(error `shutting_down`, 1013) while it finishes the STT of the audio it already received, stores the segments and
closes the client with 1001 ("server shutting down"); then it exits."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
from conftest import (
    SAMPLE_WAV,
    ServerProcess,
    StreamResult,
    pcm16_frames,
    read_wav,
    start_server,
    stop_server,
    stream_frames,
)
from deepgram_server import ThreadedDeepgramTestServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def a_new_stream_while_draining(server: ServerProcess) -> tuple[dict, StreamResult]:
    """Waits for `/ready` to say the server is shutting down, then opens a stream."""
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as http:
        for _ in range(100):
            response = await http.get("/ready")
            if response.status_code == 503:
                break
            await asyncio.sleep(0.05)
    refused = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", [],
                                  headers={"Authorization": "Bearer newcomer"}, close=False, timeout_s=10)
    return response.json(), refused


async def test_sigterm_mid_stream_keeps_the_received_audio(tmp_path):
    headers = {"Authorization": "Bearer sigterm-user"}
    # Replies come 1 s late, so the stream's end (CloseStream answered) takes a while: the drain lasts long enough
    # for the newcomer to be refused.
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.5, reply_delay_s=1.0) as deepgram:
        env = {"STT_BACKEND": "deepgram", "DEEPGRAM_URL": deepgram.url, "DEEPGRAM_API_KEY": "dg-key"}
        server = start_server(tmp_path, **env)
        seen: dict[str, dict] = {}
        events: list[dict] = []
        try:
            async with connect(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                               additional_headers=headers) as ws:
                for frame in pcm16_frames(read_wav(SAMPLE_WAV)[: 15 * 16000]):  # speech runs to the end
                    await ws.send(frame)
                await asyncio.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
                newcomer = asyncio.create_task(a_new_stream_while_draining(server))
                try:
                    async for message in ws:
                        payload = json.loads(message) if message != "ping" else None
                        if isinstance(payload, list):
                            seen.update({s["id"]: s for s in payload})
                        elif isinstance(payload, dict):
                            events.append(payload)
                except ConnectionClosed:
                    pass
                assert (ws.close_code, ws.close_reason) == (1001, "server shutting down")
                ready, refused = await newcomer
            assert server.proc.wait(30) is not None
        finally:
            if server.proc.poll() is None:
                stop_server(server)
        received = deepgram.connections[0]
        # Every speech sample received was sent on, then Finalize and CloseStream: the last words were not dropped.
        assert received.control_messages()[-2:] == ["Finalize", "CloseStream"]
    assert [e["code"] for e in events if e.get("type") == "error"] == ["shutting_down"]
    assert ready["reason"] == "shutting_down"
    assert refused.close_code == 1013 and [e["code"] for e in refused.errors()] == ["shutting_down"]
    assert "shutting down: all streams finished" in server.log()
    restarted = start_server(tmp_path, **env, JOBS_ENABLED="false")
    try:
        with httpx.Client(base_url=restarted.http, headers=headers) as http:
            conversation = http.get("/v1/conversations").json()[0]
            stored = http.get(f"/v1/conversations/{conversation['id']}").json()["transcript_segments"]
    finally:
        stop_server(restarted)
    assert set(seen) <= {s["id"] for s in stored}
    words = " ".join(s["text"] for s in stored).split()
    sent_s = len(received.audio_samples()) / 16000
    assert len(words) == int(-(-sent_s // 0.5))  # the test server's 0.5 s words tile all the audio it got
    assert max(s["end"] for s in stored) >= 14.5  # up to the end of the stream, not where the signal came
