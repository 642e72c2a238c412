"""Secrets never reach logs (Omi printed its STT key, issue #2175): a full session on a real server process with
every secret set, at DEBUG level, including failures that put credentials near error paths."""

from __future__ import annotations

import httpx
import pytest
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server, stream_frames
from deepgram_server import ThreadedDeepgramTestServer
from websockets.exceptions import InvalidStatus

SECRETS = {
    "ADMIN_KEY": "adm-9f3c1e5d7b",
    "DEEPGRAM_API_KEY": "dg-5b8e2a41c7d6",
    "HUGGINGFACE_TOKEN": "hf_QwErTy1234567890",
    "POSTGRES_URL": "postgresql://svc:pg-pass-7d1e9a@127.0.0.1:5432/test",
    "INTERNAL_API_KEY": "int-3c9a7e1f55",
    "LLM_API_KEY": "sk-llm-8e2d4b6a0c",
}


async def test_a_full_session_logs_no_secret(tmp_path):
    with ThreadedDeepgramTestServer(api_key=SECRETS["DEEPGRAM_API_KEY"]) as deepgram:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, LOG_LEVEL="DEBUG",
                              **SECRETS)
        admin = {"Authorization": f"{SECRETS['ADMIN_KEY']}secret-user"}
        try:
            audio = read_wav(SAMPLE_WAV)[6 * 16000 : 16 * 16000]
            result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                                         pcm16_frames(audio), headers=admin,
                                         until=lambda r: len(r.segments) > 0, timeout_s=60)
            assert result.segments and not result.errors()
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
        finally:
            stop_server(server)
        connection = deepgram.connections[0]
    log = server.log()
    assert "stream open uid=secret-user" in log  # the log is really being written, at DEBUG
    for name, secret in SECRETS.items():
        assert secret not in log, f"{name} appeared in the server log"
    assert "pg-pass-7d1e9a" not in log
    assert connection.auth_scheme == "Token"  # the key did reach Deepgram, in the header only
