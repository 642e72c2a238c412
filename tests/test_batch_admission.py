"""Batch requests cannot take the server down (issue 12): `/v1/speaker-identification`'s work is capped before it
is done, at most BATCH_MAX_CONCURRENT batch requests run at once (429 with Retry-After beyond), and its embeddings
go into the speaker pool's own batch lane, so live streams are still admitted and served while it is full (a full
lane answers 503 with Retry-After). Real server processes, real speech from ../shared/data; `BatchAdmission`'s
waiting rules as a unit."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import AMI, SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server, stream_frames

from batch_admission import BatchAdmission

SR = 16000
AUTH = {"Authorization": "Bearer batch-user"}


def wav_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """Two minutes of real conversation: four AMI excerpts back to back."""
    return np.concatenate([read_wav(AMI / f"trn0{i}.wav") for i in (1, 2, 3, 4)])


def enrol(http: httpx.Client) -> None:
    """The user's voice profile: with no profile the server skips the embeddings altogether."""
    r = http.post("/v1/speech-profile", files={"file": ("sample.wav", SAMPLE_WAV.read_bytes(), "audio/wav")})
    assert r.status_code in (200, 201), r.text


def identify(http: httpx.Client, audio: bytes, segments: list[dict] | str, timeout: float = 300) -> httpx.Response:
    return http.post("/v1/speaker-identification", files={"audio_file": ("a.wav", audio, "audio/wav")},
                     data={"segments": segments if isinstance(segments, str) else json.dumps(segments)},
                     timeout=timeout)


def every_5s(length_s: float) -> list[dict]:
    return [{"start": float(s), "end": float(s + 5)} for s in range(0, int(length_s) - 4, 5)]


# --- limits of one request (default settings: they must not refuse a real conversation) -------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("batch-defaults"))
    with httpx.Client(base_url=server.http, headers=AUTH, timeout=120) as http:
        enrol(http)
    yield server
    stop_server(server)


@pytest.mark.parametrize("segments, detail", [
    # 20001 segments over the whole file: hours of VAD and embeddings before the limits
    ([{"start": 0, "end": 30}] * 20_001, "BATCH_MAX_SEGMENTS"),
    # 600 overlapping 60 s segments: 10 h of segment time over a 30 s file (overlaps count fully)
    ([{"start": 0, "end": 60}] * 600, "BATCH_MAX_SEGMENT_SECONDS"),
    ([{"start": 0, "end": 1e308}], "BATCH_MAX_SEGMENT_SECONDS"),
    ([{"start": 10, "end": 5}], "ends (5) before it starts (10)"),
    ('[{"start": 0, "end": Infinity}]', "finite"),
    ('[{"start": NaN, "end": 3}]', "finite"),
])
def test_oversized_or_broken_segment_lists_are_refused_fast_before_decoding(default_server, segments, detail):
    with httpx.Client(base_url=default_server.http, headers=AUTH) as http:
        started = time.monotonic()
        # Not audio at all: had the server decoded it first, the answer would be 415 about the audio.
        r = identify(http, b"not audio " * 1000, segments, timeout=60)
        assert r.status_code == 422, r.text[:300]
        assert detail in r.json()["detail"]
        r = identify(http, SAMPLE_WAV.read_bytes(), segments, timeout=60)  # real speech: the same, at once
        assert r.status_code == 422 and detail in r.json()["detail"], r.text[:300]
        assert time.monotonic() - started < 20  # generous: the work refused would take minutes to hours
    assert default_server.proc.poll() is None


def test_a_segments_field_over_starlettes_part_limit_is_a_4xx(default_server):
    """starlette's form parser bounds a field at 1 MB: beyond, a 400 with a JSON detail, not a 500."""
    segments = json.dumps([{"start": 0, "end": 1, "pad": "x" * 100}] * 12_000)  # ~1.5 MB
    with httpx.Client(base_url=default_server.http, headers=AUTH) as http:
        r = identify(http, SAMPLE_WAV.read_bytes(), segments, timeout=60)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert isinstance(r.json()["detail"], str)


def test_a_4h_conversation_of_segments_is_within_the_default_limits(default_server):
    """What Omi's backend sends for a long conversation passes the limits: 4 h of segments every 2 s, checked
    over a short file (segments past its end are empty: nobody)."""
    segments = [{"start": float(s), "end": float(s + 2)} for s in range(0, 4 * 3600, 2)]  # 7200 segments
    with httpx.Client(base_url=default_server.http, headers=AUTH) as http:
        r = identify(http, wav_bytes(read_wav(SAMPLE_WAV)[: 6 * SR]), segments, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()) == len(segments)


# --- admission: BATCH_MAX_CONCURRENT ------------------------------------------------------------------------------


def test_one_batch_slot_two_concurrent_requests_one_gets_429_with_retry_after(tmp_path, speech):
    server = start_server(tmp_path, BATCH_MAX_CONCURRENT="1", BATCH_ADMISSION_WAIT_S="0")
    try:
        with httpx.Client(base_url=server.http, headers=AUTH, timeout=300) as http:
            enrol(http)
            minute = wav_bytes(speech[: 60 * SR])
            # the long one: 100 segments over the whole minute (100 min of VAD and embeddings; 20 took under 3 s
            # on a quiet CI machine, so the second request came after it)
            long_job: dict[str, httpx.Response] = {}
            runner = threading.Thread(target=lambda: long_job.update(r=identify(http, minute, [
                {"start": 0, "end": 60}] * 100)))
            runner.start()
            time.sleep(3.0)  # its upload is in and its work begun (it takes far longer)
            assert runner.is_alive(), long_job
            started = time.monotonic()
            r = identify(http, minute, every_5s(60))
            assert r.status_code == 429, r.text[:300]
            assert int(r.headers["Retry-After"]) > 0 and "at most 1" in r.json()["detail"]
            r = http.post("/v1/vad", files={"file": ("a.wav", minute, "audio/wav")})  # the other batch route
            assert r.status_code == 429 and "Retry-After" in r.headers, r.text[:300]
            assert time.monotonic() - started < 10  # refused at once
            runner.join(300)
            assert long_job["r"].status_code == 200, long_job["r"].text[:300]
            assert http.post("/v1/vad", files={"file": ("a.wav", minute, "audio/wav")}).status_code == 200
    finally:
        stop_server(server)


# --- the speaker pool's batch lane ---------------------------------------------------------------------------------


async def live_stream_gets_segments(server) -> dict:
    """A new /v4/listen stream of sample.wav: admitted, and its transcript segments come."""
    frames = pcm16_frames(read_wav(SAMPLE_WAV))
    result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames, pace_s=0.005,
                                 until=lambda r: len(r.segments) >= 1, timeout_s=120)
    return {"statuses": result.statuses(), "segments": len(result.segments), "close": result.close_code}


def test_full_batch_lane_keeps_live_streams_admitted_and_answers_503(tmp_path, speech):
    """POOL_QUEUE_SIZE=16: before the batch lane, 40 clips of one request went into the live queue (a 500 for more
    than it holds; /ready 503 and new streams refused at 90 %). Now they go into a lane of 2, one clip per model
    call: four such requests at once keep it full, /ready stays 200, a new stream is admitted and transcribed,
    and a request that finds the lane full gets 503 with Retry-After."""
    server = start_server(tmp_path, POOL_QUEUE_SIZE="16", POOL_BATCH_QUEUE_SIZE="2", POOL_BATCH_MAX_BATCH="1",
                          BATCH_MAX_CONCURRENT="4")
    try:
        with httpx.Client(base_url=server.http, headers=AUTH, timeout=300) as http:
            enrol(http)
            audio = wav_bytes(speech[: 100 * SR])
            answers: list[httpx.Response] = []
            segments = every_5s(100) * 4  # 80 clips of about 5 s
            runners = [threading.Thread(target=lambda: answers.append(identify(http, audio, segments)))
                       for _ in range(4)]
            for t in runners:
                t.start()
            deadline = time.monotonic() + 120
            busy = 0
            while busy < 5 and time.monotonic() < deadline and any(t.is_alive() for t in runners):
                ready = http.get("/ready")
                lane = ready.json()["pool"]["speaker_batch"]
                if lane["queued"] > 0:
                    busy += 1
                    assert ready.status_code == 200 and not ready.json()["pool_saturated"], ready.text
                time.sleep(0.05)
            assert busy == 5, "the batch lane was never seen in use"
            assert any(t.is_alive() for t in runners)
            live = asyncio.run(live_stream_gets_segments(server))  # admitted while the batch requests go on
            for t in runners:
                t.join(300)
            statuses = sorted(r.status_code for r in answers)
            assert live["statuses"][-1] == "ready" and live["segments"] >= 1 and live["close"] == 1000, live
            assert http.get("/ready").json()["pool"]["speaker_batch"]["items"] > 0
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        for r in answers:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) > 0 and "batch queue is full" in r.json()["detail"]
            else:
                assert len(r.json()) == len(segments)
        assert "Traceback" not in server.log()
    finally:
        stop_server(server)


# --- BatchAdmission's rules ----------------------------------------------------------------------------------------


async def test_admission_waits_in_order_bounded_in_number_and_time():
    admission = BatchAdmission(limit=1, wait_s=0.5)  # at most 1 waiting
    assert await admission.acquire()
    waiter = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0.05)
    assert admission.waiting == 1
    assert await admission.acquire() is False  # a second waiter: refused at once
    admission.release()  # the slot passes to the waiter
    assert await waiter is True and admission.active == 1
    started = time.monotonic()
    assert await admission.acquire() is False  # waited its 0.5 s, then refused
    assert 0.4 < time.monotonic() - started < 3
    admission.release()
    assert admission.active == 0 and admission.waiting == 0
    assert admission.stats()["refused"] == 2


async def test_a_waiter_that_goes_away_passes_no_slot_and_loses_none():
    admission = BatchAdmission(limit=1, wait_s=5)
    assert await admission.acquire()
    waiter = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0.05)
    waiter.cancel()  # the client went away while waiting
    with pytest.raises(asyncio.CancelledError):
        await waiter
    admission.release()
    assert admission.active == 0 and admission.waiting == 0
    assert await admission.acquire() and admission.active == 1
