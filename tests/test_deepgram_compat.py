"""Deepgram's own clients against this server's `/v1/listen`: deepgram-sdk 7.17 (Python, live and prerecorded) and
`@deepgram/sdk` 5.13 (JavaScript, tests/js), unchanged, pointed at a real `uvicorn server:app` process (embedded
defaults: silero VAD, pocketsphinx STT, resemblyzer speakers) with ADMIN_KEY set, on real speech (sample.wav: two
speakers, speech from 6.69 s). Bad credentials, parameters, frames and bodies get Deepgram's refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server
from deepgram import AsyncDeepgramClient, DeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results, ListenV1SpeechStarted, ListenV1UtteranceEnd
from reference import speech_turns
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ADMIN_KEY = "dg-compat-admin-key-0123456789abcdef"  # ADMIN_KEY_MIN_CHARS (32) or more
KEY = f"{ADMIN_KEY}user-dg"  # the credential a Deepgram client sends as its "API key": admin key + uid
FIRST_SPEECH_S = 6.69  # sample.rttm: nobody speaks before
IDLE_S = 3.0
JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start_server(tmp_path_factory.mktemp("dg-compat"), ADMIN_KEY=ADMIN_KEY, IDLE_TIMEOUT_S=str(IDLE_S))
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return b"".join(pcm16_frames(read_wav(SAMPLE_WAV)))


def environment(server) -> DeepgramClientEnvironment:
    return DeepgramClientEnvironment(base=server.http, production=server.ws, agent=server.ws, agent_rest=server.http)


def final_words(results: list) -> list:
    return [w for r in results if r.is_final for w in r.channel.alternatives[0].words]


def check_words(words, who: str) -> None:
    """Real words on the stream's clock: all inside the speech (none before 6.69 s; the STT's own clock starts at
    the first speech sent, so unmapped times would start near 0), in order, and two speakers."""
    assert len(words) >= 10, who
    starts = [w.start for w in words]
    assert min(starts) >= FIRST_SPEECH_S - 0.5 and max(w.end for w in words) <= 30.5, (who, starts[:3])
    assert starts == sorted(starts), who
    assert all(w.end >= w.start and w.word for w in words), who
    assert len({w.speaker for w in words}) >= 2, (who, {w.speaker for w in words})


async def test_python_sdk_live_stream(server, pcm):
    client = AsyncDeepgramClient(api_key=KEY, environment=environment(server))
    received = []
    async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000", channels="1",
                                        punctuate="true", diarize="true", vad_events="true",
                                        utterance_end_ms="1000") as stream:

        async def reader() -> None:
            async for message in stream:
                received.append(message)

        task = asyncio.create_task(reader())
        step = 3200  # 100 ms
        for i in range(0, len(pcm), step):
            await stream.send_media(pcm[i : i + step])
            await asyncio.sleep(0.02)
        await stream.send_finalize()
        for i in range(600):  # Finalize answered before the stream is closed; KeepAlive while waiting, as Deepgram
            if any(isinstance(m, ListenV1Results) and m.from_finalize for m in received):  # wants (IDLE_S is short)
                break
            if i % 10 == 9:
                await stream.send_keep_alive()
            await asyncio.sleep(0.1)
        await stream.send_close_stream()
        await asyncio.wait_for(task, 60)  # the server closes after Metadata

    results = [m for m in received if isinstance(m, ListenV1Results)]
    assert any(r.from_finalize for r in results), [m.type for m in received]
    assert all(r.is_final and r.speech_final for r in results)  # no interim_results asked
    check_words(final_words(results), "live")
    spans = [(r.start, r.start + r.duration) for r in results]
    assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:], strict=False))  # contiguous, in order
    started = [m for m in received if isinstance(m, ListenV1SpeechStarted)]
    assert started and FIRST_SPEECH_S - 0.5 <= started[0].timestamp <= FIRST_SPEECH_S + 0.5
    assert any(isinstance(m, ListenV1UtteranceEnd) for m in received)
    metadata = received[-1]
    assert isinstance(metadata, ListenV1Metadata), received[-1]
    assert metadata.duration == pytest.approx(30.0, abs=0.05)
    assert metadata.sha256 == hashlib.sha256(pcm).hexdigest() and metadata.channels == 1


async def test_keepalive_holds_an_idle_stream_and_finalize_without_speech(server):
    """Past the (shortened) idle timeout on KeepAlive alone; Finalize with no speech is answered at once with an
    empty from_finalize Results; CloseStream → Metadata and close 1000. Without KeepAlive: 1011 (NET-0001)."""
    url = f"{server.ws}/v1/listen?encoding=linear16&sample_rate=16000"
    headers = {"Authorization": f"Token {KEY}"}
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(bytes(3200))
        for _ in range(int(IDLE_S * 2) + 1):  # twice the idle timeout
            await asyncio.sleep(0.5)
            await ws.send(json.dumps({"type": "KeepAlive"}))
        await ws.send(json.dumps({"type": "Finalize"}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert answer["type"] == "Results" and answer["from_finalize"] is True
        assert answer["channel"]["alternatives"][0]["words"] == []
        await ws.send(json.dumps({"type": "CloseStream"}))
        metadata = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert metadata["type"] == "Metadata" and metadata["duration"] == pytest.approx(0.1)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1000
    async with connect(url, additional_headers=headers) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), IDLE_S + 10)
        assert ws.close_code == 1011 and "NET-0001" in ws.close_reason


async def test_browser_subprotocol_credentials(server):
    """Browsers cannot set headers: `token, <key>` as subprotocols; the server picks `token`, as Deepgram does."""
    url = f"{server.ws}/v1/listen?encoding=linear16&sample_rate=16000"
    async with connect(url, subprotocols=["token", KEY]) as ws:
        assert ws.subprotocol == "token"
        await ws.send(json.dumps({"type": "CloseStream"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "Metadata"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, subprotocols=["token", f"{ADMIN_KEY[:-1]}x-user"]):
            pass
    assert refused.value.response.status_code == 401


async def test_refusals_at_the_upgrade(server):
    env = environment(server)
    with pytest.raises(ApiError) as wrong_key:
        async with AsyncDeepgramClient(api_key="not-the-key", environment=env).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate="16000"):
            pass
    assert wrong_key.value.status_code == 401
    client = AsyncDeepgramClient(api_key=KEY, environment=env)
    for bad in ({"encoding": "mulaw", "sample_rate": "8000"}, {"encoding": "linear16", "sample_rate": "7"},
                {"encoding": "opus", "sample_rate": "44100"}, {"encoding": "linear16"}, {"sample_rate": "16000"},
                {"encoding": "linear16", "sample_rate": "16000", "channels": "9"}):
        with pytest.raises(ApiError) as refused:
            async with client.listen.v1.connect(model="nova-3", **bad):
                pass
        assert refused.value.status_code == 400, bad
    with pytest.raises(InvalidStatus) as raw:  # Deepgram's error body
        async with connect(f"{server.ws}/v1/listen?encoding=mulaw&sample_rate=8000",
                           additional_headers={"Authorization": f"Token {KEY}"}):
            pass
    body = json.loads(raw.value.response.body)
    assert body["err_code"] == "Bad Request" and "encoding" in body["err_msg"] and body["request_id"]


async def test_bad_messages_are_answered_and_bounded(server):
    """A frame over MAX_FRAME_BYTES is refused with an Error and not processed (the stream goes on); a text
    message that is not Deepgram's gets a SchemaError; one over uvicorn's limit closes the socket (1009)."""
    url = f"{server.ws}/v1/listen?encoding=linear16&sample_rate=16000"
    async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send(bytes(70 * 1024))
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["type"] == "Error" and "over the limit" in error["description"]
        await ws.send("not json")
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["variant"] == "SchemaError"
        await ws.send(json.dumps({"type": "Configure"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["variant"] == "SchemaError"
        await ws.send(json.dumps({"type": "CloseStream"}))
        metadata = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert metadata["type"] == "Metadata" and metadata["duration"] == 0  # the big frame was not decoded
    async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=None) as ws:
        await ws.send(bytes(2 * 1024 * 1024))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1009


def test_python_sdk_prerecorded(server, pcm):
    client = DeepgramClient(api_key=KEY, environment=environment(server))
    response = client.listen.v1.media.transcribe_file(request=SAMPLE_WAV.read_bytes(), model="nova-3",
                                                      diarize=True, utterances=True, punctuate=True)
    alternative = response.results.channels[0].alternatives[0]
    assert alternative.transcript and alternative.transcript.split()[0] == alternative.words[0].punctuated_word
    check_words(alternative.words, "prerecorded")
    assert response.metadata.duration == pytest.approx(30.0, abs=0.05)
    assert response.metadata.sha256 == hashlib.sha256(SAMPLE_WAV.read_bytes()).hexdigest()
    utterances = response.results.utterances
    assert utterances and sum(len(u.words) for u in utterances) == len(alternative.words)
    assert len({u.speaker for u in utterances}) >= 2
    turns = speech_turns(SAMPLE_WAV.with_suffix(".rttm"), "sample")
    assert all(any(s - 0.5 <= u.start <= e + 0.5 for s, e in turns) for u in utterances)
    # Raw linear16 with its encoding and rate: the same audio, the same words.
    raw = client.listen.v1.media.transcribe_file(request=pcm, encoding="linear16", request_options={
        "additional_query_parameters": {"sample_rate": "16000"}})  # the SDK has no argument of that name here
    words = raw.results.channels[0].alternatives[0].words
    assert [w.word for w in words] == [w.word for w in alternative.words]
    assert words[0].speaker is None and getattr(words[0], "punctuated_word", None) is None  # neither asked for


def test_prerecorded_refusals(server):
    url = f"{server.http}/v1/listen"
    token = {"Authorization": f"Token {KEY}"}
    with pytest.raises(ApiError) as wrong_key:
        DeepgramClient(api_key="wrong", environment=environment(server)).listen.v1.media.transcribe_file(
            request=SAMPLE_WAV.read_bytes())
    assert wrong_key.value.status_code == 401
    fetch = httpx.post(url, json={"url": "http://169.254.169.254/latest/meta-data/"}, headers=token, timeout=30)
    assert fetch.status_code == 400 and "url" in fetch.json()["err_msg"] and "forgery" in fetch.json()["err_msg"]
    for body, why in ((b"", "empty"), (b"not audio at all" * 100, "garbage")):
        bad = httpx.post(url, content=body, headers={**token, "Content-Type": "audio/wav"}, timeout=30)
        assert 400 <= bad.status_code < 500 and bad.json()["err_code"], (why, bad.text)
    bad_option = httpx.post(f"{url}?multichannel=true", content=SAMPLE_WAV.read_bytes(), headers=token, timeout=30)
    assert bad_option.status_code == 400 and "multichannel" in bad_option.json()["err_msg"]
    # A body declared over MAX_UPLOAD_MB is refused before it is read (a raw request: clients send what they declare).
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(f"POST /v1/listen HTTP/1.1\r\nHost: x\r\nAuthorization: Token {KEY}\r\n"
                    f"Content-Type: audio/wav\r\nContent-Length: {200 << 20}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")


def test_javascript_sdk_live_stream(server):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the @deepgram/sdk (JavaScript) client cannot run here")
    if not (JS_DIR / "node_modules" / "@deepgram" / "sdk").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300)
    run = subprocess.run(["node", str(JS_DIR / "deepgram_live.mjs"), server.http, KEY, str(SAMPLE_WAV)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["error"] is None and out["closeCode"] == 1000, out
    types = [m["type"] for m in out["messages"]]
    assert "SpeechStarted" in types and types[-1] == "Metadata", types
    results = [m for m in out["messages"] if m["type"] == "Results"]
    words = [w for r in results for w in r["channel"]["alternatives"][0]["words"]]
    assert len(words) >= 10 and min(w["start"] for w in words) >= FIRST_SPEECH_S - 0.5
    assert len({w["speaker"] for w in words}) >= 2 and any(r["from_finalize"] for r in results)


def test_no_conversation_is_kept(server, pcm):
    """A Deepgram-protocol stream is transcription only: the user has no conversation afterwards."""
    listed = httpx.get(f"{server.http}/v1/conversations", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert listed.status_code == 200 and listed.json() == [], listed.text

