"""Graceful shutdown: SIGTERM to a real server process mid-stream. It stops, finishes the STT of the audio it
already received, stores the segments and closes the client (uvicorn sends 1012, "service restart")."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server
from deepgram_server import ThreadedDeepgramTestServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def test_sigterm_mid_stream_keeps_the_received_audio(tmp_path):
    headers = {"Authorization": "Bearer sigterm-user"}
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.5) as deepgram:
        env = {"STT_BACKEND": "deepgram", "DEEPGRAM_URL": deepgram.url, "DEEPGRAM_API_KEY": "dg-key"}
        server = start_server(tmp_path, **env)
        seen: dict[str, dict] = {}
        try:
            async with connect(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                               additional_headers=headers) as ws:
                for frame in pcm16_frames(read_wav(SAMPLE_WAV)[: 15 * 16000]):  # speech runs to the end
                    await ws.send(frame)
                await asyncio.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
                try:
                    async for message in ws:
                        payload = json.loads(message) if message != "ping" else None
                        if isinstance(payload, list):
                            seen.update({s["id"]: s for s in payload})
                except ConnectionClosed:
                    pass
                assert ws.close_code in (1001, 1012)
            assert server.proc.wait(30) is not None
        finally:
            if server.proc.poll() is None:
                stop_server(server)
        received = deepgram.connections[0]
        # Every speech sample received was sent on, then Finalize and CloseStream: the last words were not dropped.
        assert received.control_messages()[-2:] == ["Finalize", "CloseStream"]
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
