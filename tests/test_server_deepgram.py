"""End to end through the Deepgram backend: a real `uvicorn server:app` process using the real deepgram-sdk against
the Deepgram-protocol test server on 127.0.0.1, which records every byte and control message it receives."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AMI, SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, start_server, stop_server, stream_frames
from deepgram_server import ThreadedDeepgramTestServer
from reference import speech_turns

from config import Settings
from streaming.vad import SileroVad, SpeechAudio, SpeechEnd, SpeechStart, StreamingVAD, VadParams

SR = 16000
GAP_S = 5.0  # digital silence between the two recordings
AMI_OFFSET = 30.0 + GAP_S


@pytest.fixture(scope="module")
def deepgram():
    with ThreadedDeepgramTestServer(api_key="dg-test-key-123") as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, deepgram):
    proc = start_server(tmp_path_factory.mktemp("dg"), STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url,
                        DEEPGRAM_API_KEY="dg-test-key-123", DEEPGRAM_KEEPALIVE_S="1.0")
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """sample.wav (2 speakers), 5 s of silence, AMI trn08 (4 speakers, far field, pauses), 2 s of silence."""
    parts = [read_wav(SAMPLE_WAV), np.zeros(int(GAP_S * SR), np.float32), read_wav(AMI / "trn08.wav"),
             np.zeros(2 * SR, np.float32)]
    return (np.round(np.concatenate(parts) * 32768) / 32768).astype(np.float32)  # exactly representable in pcm16


def reference_speech() -> list[tuple[float, float]]:
    turns = [(6.69, 30.0)]  # sample.rttm: continuous speech from 6.69 s
    return turns + [(AMI_OFFSET + s, AMI_OFFSET + e) for s, e in speech_turns(AMI / "train.rttm", "trn08")]


def expected_spans(audio: np.ndarray) -> tuple[list[tuple[int, np.ndarray]], int]:
    """What the server must send: the VAD's speech audio (with padding), run offline with the same settings."""
    vad = StreamingVAD(SileroVad(), VadParams.from_settings(Settings()))
    events = vad.process(audio) + vad.flush()
    spans = [(ev.start, ev.audio) for ev in events if isinstance(ev, SpeechAudio)]
    regions = sum(isinstance(ev, SpeechStart) for ev in events)
    assert regions == sum(isinstance(ev, SpeechEnd) for ev in events)
    return spans, regions


def sent_to_stream(spans: list[tuple[int, np.ndarray]], t: float) -> float:
    """Independent of the server's SentTimeline: walk the spans."""
    s = round(t * SR)
    for start, chunk in spans:
        if s < len(chunk):
            return (start + s) / SR
        s -= len(chunk)
    raise AssertionError(f"sent time {t} beyond the audio sent")


async def test_only_speech_sent_and_times_mapped_back(server, deepgram, audio):
    frames = pcm16_frames(audio)
    spans, regions = expected_spans(audio)
    before = len(deepgram.connections)
    expected_words = sum(len(c) for _, c in spans) / SR / 0.5  # the test server's words are 0.5 s long

    def all_back(result) -> bool:
        return sum(len(s["text"].split()) for s in result.segments.values()) >= int(expected_words)

    result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames, until=all_back)
    assert result.statuses() == ["initiating", "stt_initiating", "ready"] and not result.errors()

    deepgram.wait_for(lambda d: d.connections[before].closed_by is not None, timeout=15)  # the server's CloseStream
    conns = deepgram.connections[before:]
    assert len(conns) == 1
    conn = conns[0]
    # The options Omi uses, and the key in a Token header.
    assert conn.auth_scheme == "Token"
    for key, value in {"model": "nova-3", "encoding": "linear16", "sample_rate": "16000", "channels": "1",
                       "punctuate": "true", "smart_format": "true", "diarize": "true", "language": "en"}.items():
        assert conn.query[key] == value, key
    assert "endpointing" in conn.query

    # Every speech sample, exactly once, in order, and nothing else.
    received = conn.audio_samples()
    expected = np.concatenate([np.round(c * 32768).astype(np.int16) for _, c in spans])
    assert len(received) == len(expected) and np.array_equal(received, expected)
    # A Finalize per speech region, then the stream's end.
    controls = conn.control_messages()
    assert controls.count("Finalize") >= regions
    assert controls[-1] == "CloseStream"

    # No long silences: nothing from the 5 s gap beyond the hangover, much less sent than streamed.
    sent_mask = np.zeros(len(audio), bool)
    for start, chunk in spans:
        sent_mask[start : start + len(chunk)] = True
    gap = sent_mask[int(30.5 * SR) : int(AMI_OFFSET * SR) - int(0.25 * SR)]
    assert not gap.any()
    assert sent_mask.mean() < 0.8
    # ... and the reference speech did reach Deepgram (the VAD's misses on far-field AMI are small).
    ref_mask = np.zeros(len(audio), bool)
    for s, e in reference_speech():
        ref_mask[int(s * SR) : int(e * SR)] = True
    coverage = (sent_mask & ref_mask).sum() / ref_mask.sum()
    assert coverage > 0.9, coverage

    # Times: each word's text is its sent-audio start time; segments carry stream times.
    segments = result.ordered()
    words = [w for s in segments for w in s["text"].split()]
    assert len(words) >= int(expected_words)
    for seg in segments:
        first = float(seg["text"].split()[0][1:])  # rounded to 10 ms, so it may fall on either side of a gap
        candidates = [sent_to_stream(spans, first + d) for d in (-0.005, 0.0, 0.005)]
        assert any(seg["start"] == pytest.approx(c, abs=0.006) for c in candidates), (seg, candidates)
        assert seg["end"] > seg["start"]
        assert sent_mask[min(int(seg["start"] * SR), len(audio) - 1)]
    starts = [float(w[1:]) for w in words]
    assert starts == sorted(starts)  # all sent audio came back once, in order


async def test_keepalive_during_silence(server, deepgram):
    """Deepgram closes a socket that hears nothing for 10 s: during silence the server sends KeepAlive."""
    before = len(deepgram.connections)
    speech = read_wav(SAMPLE_WAV)[int(7 * SR) : int(9 * SR)]
    frames = pcm16_frames(speech) + silence_frames(3.0)
    result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames, pace_s=0.02)
    assert not result.errors()
    deepgram.wait_for(lambda d: d.connections[before].closed_by is not None, timeout=15)
    conn = deepgram.connections[before]
    assert conn.control_messages().count("KeepAlive") >= 1
    assert conn.control_messages()[-1] == "CloseStream"


async def test_deepgram_unreachable_reports_error(tmp_path):
    from conftest import free_port

    port = free_port()
    proc = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=f"http://127.0.0.1:{port}",
                        DEEPGRAM_API_KEY="sk-not-in-logs-987")
    try:
        result = await stream_frames(f"{proc.ws}/v4/listen?codec=pcm16&sample_rate=16000", [], close=False,
                                     timeout_s=30)
    finally:
        stop_server(proc)
    assert result.close_code == 1011
    assert result.errors()[0]["code"] == "stt_unavailable"
    assert str(port) not in result.errors()[0]["message"]  # the STT's address is the operator's, not the client's
    assert f"127.0.0.1:{port}" in proc.log()  # ... and is in the operator's log
    assert "sk-not-in-logs-987" not in proc.log()
