"""Secrets never reach logs (Omi printed its STT key, issue #2175): a full session on a real server process with
every secret set, at DEBUG level, including failures that put credentials near error paths. Each secret is one the
server under test really uses (checked: the Deepgram key and the LLM key arrive at their test servers, the database
is the PostgreSQL of POSTGRES_URL, the internal key admits Omi's backend), and the Hugging Face token goes to a
model download that fails (no network here), whose error the log keeps."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
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
from openai_server import OpenAITestServer, completion, raw
from websockets.exceptions import InvalidStatus

PG_PASSWORD = "pg-pass-7d1e9a"  # the test server trusts loopback: the password is sent, and ignored
SECRETS = {
    "ADMIN_KEY": "adm-9f3c1e5d7b-0a4b8c2e6f1d3a5b7c9e",
    "DEEPGRAM_API_KEY": "dg-5b8e2a41c7d6",
    "INTERNAL_API_KEY": "int-3c9a7e1f55",
    "LLM_API_KEY": "sk-llm-8e2d4b6a0c",
}
HF_TOKEN = "hf_QwErTy1234567890"


def _postgres_url(url: str) -> str:
    """The fresh database's URL with a password in it (so the server holds a secret in POSTGRES_URL)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PG_PASSWORD}@", 1)


async def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return predicate()


@pytest.fixture
def pg_url():
    with fresh_postgres_database("secrets") as url:  # asyncio.run inside: not from the async test's loop
        yield url


async def test_a_full_session_logs_no_secret(tmp_path, pg_url):
    with ThreadedDeepgramTestServer(api_key=SECRETS["DEEPGRAM_API_KEY"]) as deepgram, OpenAITestServer() as llm:
        # The summary's first call fails (an error path near the key), the retry or the next close succeeds.
        llm.script(raw(500, {"error": {"message": "boom", "type": "server_error"}}),
                   *[completion({"title": "Secrets", "overview": "o", "emoji": "🔑", "category": "other",
                                 "action_items": []})] * 4)
        secrets = {**SECRETS, "POSTGRES_URL": _postgres_url(pg_url)}
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, LOG_LEVEL="DEBUG",
                              DATABASE_CHOICE="postgres", LLM_BASE_URL=llm.base_url, MIN_CONVERSATION_TIMEOUT_S="1",
                              SWEEP_INTERVAL_S="1", **secrets)
        admin = {"Authorization": f"{SECRETS['ADMIN_KEY']}secret-user"}
        try:
            audio = read_wav(SAMPLE_WAV)[6 * 16000 : 16 * 16000]
            result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout=2",
                                         pcm16_frames(audio), headers=admin,
                                         until=lambda r: len(r.segments) > 0, timeout_s=60)
            assert result.segments and not result.errors()
            # The conversation closes 2 s after its speech: the summary goes to the LLM with the key.
            assert await _wait_for(lambda: len(llm.requests) >= 1, 60), server.log_tail()
            # Refusals and failures: a wrong admin key, a key as a bearer token, bad uploads, an admin-only route.
            for refused in (f"Bearer {SECRETS['ADMIN_KEY']}", f"Bearer x{SECRETS['ADMIN_KEY']}secret-user"):
                with pytest.raises(InvalidStatus):  # refused at the upgrade (no uid; not the key)
                    await stream_frames(f"{server.ws}/v4/listen", [], close=False, timeout_s=10,
                                        headers={"Authorization": refused})
            with httpx.Client(base_url=server.http, timeout=60) as http:
                assert http.get("/v1/jobs", headers=admin).status_code == 200
                assert http.get("/v1/jobs", headers={"Authorization": "adm-wrong"}).status_code == 401
                r = http.post("/v1/vad", headers=admin, files={"file": ("x.wav", b"RIFF....junk", "audio/wav")})
                assert r.status_code in (415, 422)
                assert http.get("/v1/people", headers=admin).status_code == 200
                for key, statuses in (("int-wrong", {401}), (SECRETS["INTERNAL_API_KEY"], {415, 422})):
                    r = http.post("/v1/speaker-identification?uid=secret-user", headers={"X-Internal-Key": key},
                                  files={"audio_file": ("x.wav", b"RIFF....junk", "audio/wav")},
                                  data={"segments": "[]"})  # Omi's backend's call: the key, then a bad file
                    assert r.status_code in statuses, r.text
            conn = await asyncpg.connect(pg_url)  # the server's database really is this one
            try:
                assert await conn.fetchval("SELECT count(*) FROM conversations WHERE uid = 'secret-user'") >= 1
            finally:
                await conn.close()
        finally:
            stop_server(server)
        connection = deepgram.connections[0]
    assert llm.requests[0].headers.get("authorization") == f"Bearer {SECRETS['LLM_API_KEY']}"
    log = server.log()
    assert "stream open uid=secret-user" in log  # the log is really being written, at DEBUG
    for name, secret in SECRETS.items():
        assert secret not in log, f"{name} appeared in the server log"
    assert PG_PASSWORD not in log
    assert connection.auth_scheme == "Token"  # the key did reach Deepgram, in the header only


def test_a_failed_model_download_logs_no_token(tmp_path):
    """HUGGINGFACE_TOKEN goes to the pyannote download, which fails here (no network): the start fails, and the
    error the log keeps names the model, not the token."""
    with pytest.raises(RuntimeError) as failed:
        start_server(tmp_path, VAD_BACKEND="pyannote", PYANNOTE_SEGMENTATION="pyannote/segmentation-3.0",
                     HUGGINGFACE_TOKEN=HF_TOKEN, MODEL_CACHE_DIR=str(tmp_path / "models"), LOG_LEVEL="DEBUG")
    log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("server-*.log"))
    assert "could not load pyannote segmentation model 'pyannote/segmentation-3.0'" in log, str(failed.value)
    assert HF_TOKEN not in log


async def test_the_openai_stt_key_is_never_logged(tmp_path):
    """STT_BACKEND=openai at DEBUG (httpx logs every request): the key reaches the transcription server in the
    header, a 500 before it is retried, and a 401 whose message repeats the key (as OpenAI echoes a masked one)
    makes the stream give up: the key is in none of the server's log lines."""
    from openai_stt_server import Fault, OpenAISttTestServer

    key = "sk-openai-stt-4c8e1a9b27"
    with OpenAISttTestServer(api_key=key) as stt:
        stt.script(Fault(status=500))
        server = start_server(tmp_path, STT_BACKEND="openai", OPENAI_STT_URL=stt.base_url, OPENAI_STT_API_KEY=key,
                              LOG_LEVEL="DEBUG", STT_RECONNECT_BASE_S="0.05")
        try:
            audio = read_wav(SAMPLE_WAV)[6 * 16000 : 13 * 16000]
            url = f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000"
            result = await stream_frames(url, pcm16_frames(audio), until=lambda r: len(r.segments) > 0, timeout_s=60)
            assert result.segments and not result.errors(), server.log_tail()
            stt.api_key = "sk-the-server-wants-another"  # the next request is refused, its message holds our key
            await stream_frames(url, pcm16_frames(audio), timeout_s=20,
                                until=lambda r: any(q.status == 401 for q in stt.requests))
        finally:
            stop_server(server)
    assert [q.status for q in stt.requests][:2] == [500, 200] and 401 in [q.status for q in stt.requests]
    assert all(q.headers["authorization"] == f"Bearer {key}" for q in stt.requests)  # the key was really used
    assert any(key in q.answer["error"]["message"] for q in stt.requests if q.status == 401)
    log = server.log()
    assert "HTTP 500" in log and "HTTP 401" in log  # the error paths were logged ...
    assert key not in log  # ... without the key
