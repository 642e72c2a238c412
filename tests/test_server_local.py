"""End to end on the embedded defaults: a real `uvicorn server:app` process (silero VAD, pocketsphinx STT, no keys,
loopback-only auth) and a real WebSocket client streaming real speech in every codec."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from audio_tools import encode_opus
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, stream_frames

from config import Settings
from streaming.codecs import make_decoder, resample
from streaming.stt import to_pcm16
from streaming.stt_local import LocalRecognizer
from streaming.vad import SileroVad, SpeechAudio, SpeechEnd, StreamingVAD, VadParams

# sample.rttm: speech from 6.69 s to 30.0 s, nothing before.
SPEECH_START, SPEECH_END = 6.69, 30.0


def reaches_end(result) -> bool:
    """The last speech region (ending at 30 s) has come back as a segment."""
    return any(seg["end"] > 27.0 for seg in result.segments.values())


def check_segments(result, time_offset: float = 0.0, slack: float = 0.5) -> list[dict]:
    """Sane segments: the Omi fields, times inside the speech of sample.wav, ordered, real words."""
    segments = result.ordered()
    assert segments, f"no segments; events={result.events}"
    for seg in segments:
        assert set(seg) == {"id", "text", "speaker", "speaker_id", "is_user", "person_id", "start", "end"}
        assert seg["speaker"] == f"SPEAKER_{seg['speaker_id']}" and seg["is_user"] is False
        assert SPEECH_START - 0.5 - slack <= seg["start"] - time_offset < seg["end"] - time_offset <= 30.5 + slack
    for a, b in zip(segments, segments[1:], strict=False):
        assert a["end"] <= b["start"] + 1e-6
    words = " ".join(s["text"] for s in segments).split()
    assert len(words) >= 40, words  # ~23 s of conversational speech
    return segments


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return read_wav(SAMPLE_WAV)


@functools.cache
def _recognizer() -> LocalRecognizer:
    """One for the test session: its decoder lives in a worker process, started once (~1 s)."""
    return LocalRecognizer(decoders=1)


def offline_words(audio: np.ndarray) -> list[str]:
    """The same VAD and recogniser run in-process over a whole 16 kHz signal: what a stream must reproduce."""
    vad = StreamingVAD(SileroVad(), VadParams.from_settings(Settings()))
    recognizer, region, words = _recognizer(), [], []
    for ev in vad.process(audio) + vad.flush():
        if isinstance(ev, SpeechAudio):
            region.append(ev.audio)
        elif isinstance(ev, SpeechEnd):
            words += [w.text for w in recognizer.recognize(to_pcm16(np.concatenate(region)))]
            region = []
    assert len(words) >= 40
    return words


def decoded(codec: str, rate: int, frames: list[bytes]) -> np.ndarray:
    """What the server's decoder makes of these frames (decoding is deterministic)."""
    decoder = make_decoder(codec, rate, 1)
    return np.concatenate([decoder.decode(f) for f in frames] + [decoder.flush()])


def streamed_words(result) -> list[str]:
    return " ".join(s["text"] for s in result.ordered()).split()


async def test_pcm16_stream_gives_segments(local_server, sample):
    frames = pcm16_frames(sample) + silence_frames(1.5)
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                 until=reaches_end)
    assert result.statuses() == ["initiating", "stt_initiating", "ready"]
    assert not result.errors()
    check_segments(result)
    # Decoding, VAD and recognition are deterministic and chunking-invariant: the live stream gives exactly the
    # transcript of an offline run over the same audio. Lost, repeated or reordered audio would change it.
    assert streamed_words(result) == offline_words(decoded("pcm16", 16000, frames))


@pytest.mark.parametrize("path", ["/v4/listen", "/v3/listen"])
async def test_pcm8_default_codec_and_alias(local_server, sample, path):
    frames = pcm16_frames(resample(sample, 16000, 8000), rate=8000) + silence_frames(1.5, rate=8000)
    result = await stream_frames(f"{local_server.ws}{path}", frames, until=reaches_end)  # Omi defaults: pcm8, 8 kHz
    assert not result.errors()
    check_segments(result)
    assert streamed_words(result) == offline_words(decoded("pcm8", 8000, frames))


@pytest.mark.parametrize("codec", ["opus", "opus_fs320"])
async def test_opus_streams(local_server, sample, codec):
    packets = encode_opus(np.concatenate([sample, np.zeros(24000, np.float32)]), 16000, bitrate=32000)
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec={codec}&sample_rate=16000", packets,
                                 until=reaches_end)
    assert not result.errors()
    check_segments(result, slack=0.6)  # the Opus decoder adds a few ms of delay
    assert streamed_words(result) == offline_words(decoded(codec, 16000, packets))


async def test_bad_frames_reported_and_stream_goes_on(local_server, sample):
    packets = encode_opus(np.concatenate([sample, np.zeros(24000, np.float32)]), 16000)
    bad = [b"\xff" * 2000, bytes([0x03, 0x00, 0x00])]  # oversized frame, zero frame count (RFC 6716)
    # The app's keepalive answers to "ping" (8a 00) and empty frames are not audio: skipped without an error (as
    # Opus, 8a 00 would decode to 10 ms of concealment and shift the transcript's times).
    keepalives = [b"\x8a\x00", b"", b"\x00"]
    frames: list[bytes | str] = []
    sent_bad = 0
    for i, p in enumerate(packets):
        frames.append(p)
        if i % 300 == 150:
            frames.append(bad[(i // 300) % len(bad)])
            sent_bad += 1
        if i % 50 == 25:
            frames.append(keepalives[(i // 50) % len(keepalives)])
    frames.insert(10, "{not json")  # broken text is ignored, not fatal
    frames.insert(11, '{"type": "something_new"}')
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec=opus&sample_rate=16000", frames,
                                 until=reaches_end)
    errors = result.errors()
    assert sent_bad >= 4 and len(errors) == sent_bad and all(e["code"] == "bad_frame" for e in errors), errors
    check_segments(result, slack=0.6)
    # The bad frames were skipped, the good ones all decoded: the same transcript as without the bad frames.
    assert streamed_words(result) == offline_words(decoded("opus", 16000, packets))


async def test_odd_length_pcm_frames_lose_nothing(local_server, sample):
    pcm = to_pcm16(sample) + bytes(48000)
    frames = [pcm[i : i + 641] for i in range(0, len(pcm), 641)]  # odd sizes: every frame splits a sample in two
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                 until=reaches_end)
    assert not result.errors()
    check_segments(result)
    assert streamed_words(result) == offline_words(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768)


@pytest.mark.parametrize(
    "query",
    ["codec=mp3", "sample_rate=1000", "channels=3", "conversation_timeout=abc", "language=%3Cscript%3E",
     "sample_rate=abc", "codec=opus&sample_rate=22050"],
)
async def test_bad_parameters_close_1008(local_server, query):
    result = await stream_frames(f"{local_server.ws}/v4/listen?{query}", [], close=False, timeout_s=10)
    assert result.close_code == 1008
    assert [e["code"] for e in result.errors()] == ["bad_parameters"]


async def test_missing_auth_is_refused_at_the_upgrade(local_server):
    """As Omi: no message before the refusal, the client's first receive fails (uvicorn answers HTTP 403)."""
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        await stream_frames(f"{local_server.ws}/v4/listen", [], headers={}, close=False, timeout_s=10)
    assert refused.value.response.status_code == 403


async def test_idle_stream_closed_1001(tmp_path, sample):
    from conftest import start_server, stop_server

    server = start_server(tmp_path, IDLE_TIMEOUT_S="1.5", HEARTBEAT_S="0.5")
    try:
        result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                                     silence_frames(0.5), close=False, timeout_s=20)
    finally:
        stop_server(server)
    assert result.close_code == 1001
    assert result.pings >= 2  # the text frame "ping" every HEARTBEAT_S
    assert result.errors()[-1]["code"] == "idle"


def test_test_servers_do_not_read_the_checkouts_env_file(local_server):
    """The settings read `.env` from the working directory: a test server runs in its own directory, so a
    developer's `.env` in the checkout cannot change what the tests test."""
    import os
    from pathlib import Path

    cwd = Path(os.readlink(f"/proc/{local_server.proc.pid}/cwd"))
    assert cwd != Path(__file__).resolve().parents[1]
    assert cwd == local_server.log_path.parent


async def test_close_stream_sends_the_last_segments_then_closes_1000(local_server):
    """`CloseStream` after a file with no trailing silence: the open region is transcribed and sent before the
    server closes 1000. Ignoring the command would leave the stream open until the client's own timeout."""
    frames: list[bytes | str] = [*pcm16_frames(read_wav(SAMPLE_WAV)), '{"type": "CloseStream"}']
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                 close=False, timeout_s=60)
    assert result.close_code == 1000, (result.close_code, result.close_reason)
    segments = result.ordered()
    assert sum(len(s["text"].split()) for s in segments) > 20, segments
    assert max(s["end"] for s in segments) > 25  # the region still open at the file's end came back
    assert not result.errors()


def test_a_dead_decoder_process_is_replaced(sample):
    """The finals' decoders live in worker processes: one killed (out of memory, an operator) breaks the process
    pool; the next utterance starts new processes and is recognised as before, instead of every final failing."""
    import os
    import signal
    import time

    recognizer = LocalRecognizer(decoders=1)
    try:
        pcm = to_pcm16(sample[int(SPEECH_START * 16000) : int((SPEECH_START + 6) * 16000)])
        before = [w.text for w in recognizer.recognize(pcm)]
        assert len(before) >= 5
        for pid in list(recognizer._pool._processes):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert [w.text for w in recognizer.recognize(pcm)] == before
    finally:
        recognizer.close()
