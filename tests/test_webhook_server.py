"""Developer webhooks delivered by a real server process to real HTTP receivers on 127.0.0.1, while real speech
streams through `/v4/listen` (local STT): four users at once, whose receivers are fast, slow, failing and hanging.

- the fast user's audio chunks arrive in order and are exactly the audio streamed (pcm16 16 kHz in, so the decoded
  audio is the same bytes), one second each (`url,1`), with Omi's query (`sample_rate`, `uid`);
- their real-time transcript requests (Omi's `{"segments", "session_id"}`), at most about one a second, together
  end as the transcript the client saw; the finished conversation arrives as `memory_created`;
- every request is signed (`X-Omi-Signature`) and verifies with the user's secret;
- the failing receiver gets each delivery WEBHOOK_MAX_ATTEMPTS times (same delivery id), then it counts as failed in
  `/metrics`; the hanging receiver's deliveries time out and count as failed; neither holds up the fast user;
- the stream itself is not held up either: every user's stream ends with its whole transcript.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server, stream_frames
from test_webhook_dispatch import Receivers, hang, slow, status

from webhooks.signing import verify

SR = 16000
LISTEN = "/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout=3600"
ATTEMPTS = 3
MODES = ("fast", "slow", "failing", "hanging")


class Receiver:
    """One mode's paths on the shared real receiver (`Receivers` from test_webhook_dispatch.py)."""

    def __init__(self, rx: Receivers, mode: str) -> None:
        self.rx, self.mode, self.url = rx, mode, f"{rx.base}/{mode}"
        behaviour = {"slow": slow(1.5), "failing": status(500), "hanging": hang}.get(mode)
        for path in ("/rt", "/audio", "/memory"):
            if behaviour is not None:
                rx.routes[f"/{mode}{path}"] = behaviour

    def received(self, path: str) -> list:
        return self.rx.at(f"/{self.mode}{path}")

    def wait_for(self, count: int, path: str, timeout_s: float = 30.0, distinct: bool = False) -> list:
        """`count` requests (with `distinct`: deliveries, `once_each`) to `path`, once they are there."""
        deadline = time.monotonic() + timeout_s
        while len(got := (once_each if distinct else list)(self.received(path))) < count:
            assert time.monotonic() < deadline, f"{len(got)} of {count} requests to {self.mode}{path}"
            time.sleep(0.02)
        return got


@pytest.fixture(scope="module")
def receivers():
    with Receivers() as rx:
        yield {mode: Receiver(rx, mode) for mode in MODES}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start_server(tmp_path_factory.mktemp("webhooks"), STT_BACKEND="local", WEBHOOK_ALLOW_PRIVATE="true",
                        WEBHOOK_SETTINGS_CACHE_S="0", WEBHOOK_MAX_ATTEMPTS=str(ATTEMPTS), WEBHOOK_BACKOFF_S="0.05",
                        WEBHOOK_BACKOFF_MAX_S="0.2", WEBHOOK_BREAKER_FAILURES="1000", HTTP_GET_TIMEOUT="2")
    yield proc
    stop_server(proc)


def user(mode: str) -> str:
    return f"webhook-{mode}"


def headers(uid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {uid}"}  # the loopback-only mode: the bearer is the uid


def configure(server, receivers) -> dict[str, str]:
    """Each user's three stream webhooks to their receiver, and a signing secret; returns the secrets."""
    secrets = {}
    for mode, receiver in receivers.items():
        with httpx.Client(base_url=server.http, headers=headers(user(mode)), timeout=10) as http:
            for wtype, path in (("realtime_transcript", "/rt"), ("audio_bytes", "/audio,1"),
                                ("memory_created", "/memory")):
                r = http.post(f"/v1/users/developer/webhook/{wtype}", json={"url": receiver.url + path})
                assert r.status_code == 200, r.text
            secrets[mode] = http.post("/v1/users/developer/webhook-signing-secret").json()["secret"]
    return secrets


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"omi_{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


async def stream_speech(server, uid: str, audio: np.ndarray):
    frames = pcm16_frames(audio)
    expected_end = len(audio) / SR - 3.0
    return await stream_frames(server.ws + LISTEN, frames, headers=headers(uid), timeout_s=90,
                               until=lambda r: any(s["end"] >= expected_end for s in r.segments.values()))


def once_each(requests) -> list:
    """The requests in arrival order, each delivery once: a try whose answer came after HTTP_GET_TIMEOUT is sent
    again with the same delivery id (`Idempotency-Key`), which a receiver uses to drop the repeat (at least once)."""
    seen: set[str] = set()
    out = []
    for r in sorted(requests, key=lambda r: r.at):
        if r.headers["idempotency-key"] not in seen:
            seen.add(r.headers["idempotency-key"])
            out.append(r)
    return out


def merged(requests) -> dict[str, dict]:
    """The transcript the receiver has after every request in arrival order (a later version of a segment wins)."""
    out: dict[str, dict] = {}
    for r in requests:
        for seg in json.loads(r.body)["segments"]:
            out[seg["id"]] = seg
    return out


def test_four_users_fast_slow_failing_hanging(server, receivers):
    secrets = configure(server, receivers)
    audio = read_wav(SAMPLE_WAV)[5 * SR: 17 * SR]  # 12 s of two people talking
    audio = np.concatenate([audio, np.zeros(SR // 2, np.float32)])
    sent = b"".join(pcm16_frames(audio))

    async def all_streams():
        return await asyncio.gather(*(stream_speech(server, user(mode), audio) for mode in MODES))

    results = dict(zip(MODES, asyncio.run(all_streams()), strict=True))
    streams_done = time.monotonic()  # every stream closed: its last audio chunk was queued by then
    for mode, result in results.items():  # no receiver held up any stream
        assert result.segments and not result.errors() and result.close_code == 1000, (mode, result.events)

    fast = receivers["fast"]
    # audio: 12.5 s in 1 s chunks, the last one partial; exactly the bytes streamed, in order
    chunks = fast.wait_for(13, "/audio", distinct=True)
    assert b"".join(c.body for c in chunks) == sent, [(len(c.body), c.headers["x-omi-delivery"][:6], round(c.at, 2))
                                                      for c in chunks]
    assert [len(c.body) for c in chunks[:-1]] == [2 * SR] * 12
    assert all(c.query == {"sample_rate": ["16000"], "uid": [user("fast")]} for c in chunks)
    assert all(c.headers["content-type"] == "application/octet-stream" for c in chunks)

    # real-time transcript: Omi's shape, coalesced to about one request a second, ending as the client's transcript
    def transcript_done() -> bool:
        got = merged(fast.received("/rt"))
        return all(got.get(i, {}).get("text") == s["text"] for i, s in results["fast"].segments.items())

    for _ in range(200):
        if transcript_done():
            break
        time.sleep(0.05)
    transcript = fast.received("/rt")
    assert transcript_done(), (merged(transcript), results["fast"].segments)
    assert all(json.loads(r.body)["session_id"] == user("fast") and r.query == {"uid": [user("fast")]}
               for r in transcript)
    gaps = np.diff([r.at for r in transcript])
    assert (gaps >= 0.8).all(), gaps  # WEBHOOK_REALTIME_INTERVAL_S=1 (the receiver's clock, some slack)

    # signed: every request verifies with the fast user's secret, and not with another user's
    for r in chunks + transcript:
        assert verify(r.headers, r.body, secrets["fast"], uid=user("fast")), r.headers
        assert not verify(r.headers, r.body, secrets["slow"], uid=user("fast"))

    # the conversation's close: memory_created carries the same Conversation the app gets
    with httpx.Client(base_url=server.http, headers=headers(user("fast")), timeout=60) as http:
        closed = http.post("/v1/conversations", json={}).json()
    [memory] = fast.wait_for(1, "/memory")
    body = json.loads(memory.body)
    assert body["id"] == closed["memory"]["id"] and body["status"] == "completed"
    assert [s["id"] for s in body["transcript_segments"]] == [s["id"] for s in closed["memory"]["transcript_segments"]]
    assert memory.query == {"uid": [user("fast")]} and verify(memory.headers, memory.body, secrets["fast"],
                                                            uid=user("fast"))

    # the slow receiver gets everything too, later
    slow_chunks = receivers["slow"].wait_for(13, "/audio", timeout_s=60, distinct=True)
    assert b"".join(c.body for c in slow_chunks) == sent, [
        (len(c.body), c.headers["x-omi-delivery"][:6], round(c.at, 2)) for c in slow_chunks]

    # the failing receiver: every delivery tried ATTEMPTS times with one delivery id, then counted failed
    def counted() -> tuple[float, float]:
        return (metric(server, "webhook_deliveries_total", type="audio_bytes", outcome="failed"),
                metric(server, "webhook_deliveries_total", type="audio_bytes", outcome="delivered"))

    for _ in range(600):  # the last answers (the slow receiver's, the failing one's last try) come a little later
        if counted()[0] >= 13 and counted()[1] >= 26:
            break
        time.sleep(0.1)
    assert counted()[0] >= 13 and counted()[1] >= 26, counted()  # failing; fast + slow
    tries: dict[str, int] = {}
    for r in receivers["failing"].received("/audio"):
        tries[r.headers["x-omi-delivery"]] = tries.get(r.headers["x-omi-delivery"], 0) + 1
    # (a try can die on a reused connection the receiver just closed, before it arrives: at most one here)
    assert len(tries) == 13 and max(tries.values()) == ATTEMPTS and sum(tries.values()) >= 13 * ATTEMPTS - 1, tries
    assert metric(server, "webhook_retries_total", type="audio_bytes") >= 13 * (ATTEMPTS - 1)
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    assert re.search(r"^omi_webhook_queued \d+(\.0)?$", text, re.M), text  # the hanging user's deliveries, still queued

    # the hanging receiver got requests, which time out (HTTP_GET_TIMEOUT=2 s) and are retried
    assert receivers["hanging"].wait_for(2, "/audio", timeout_s=30)
    # while it hangs (each of its deliveries takes ATTEMPTS x 2 s), the fast user's last chunk came right after the
    # streams ended: behind the hanging or slow deliveries it would have waited many seconds
    assert max(c.at for c in chunks) < streams_done + 2.0, max(c.at for c in chunks) - streams_done
    log = server.log_path.read_text()
    assert "Traceback" not in log
    for secret in secrets.values():
        assert secret not in log
