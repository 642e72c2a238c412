"""Deepgram sockets that drop mid-stream: reconnect with backoff, replay the unacknowledged speech, keep timestamps.

The real deepgram-sdk session against the Deepgram-protocol test server (tests/deepgram_server.py), whose words
tile the audio it receives (`w<start>` every `word_s`), so holes and repeats in the transcript are exact to check.
"""

from __future__ import annotations

import asyncio
import random
import re

import numpy as np
import pytest
from conftest import SAMPLE_WAV, read_wav
from deepgram_server import DeepgramTestServer

import metrics
from config import Settings
from streaming.reconnect import ReplayBuffer, backoff_delay
from streaming.stt import SttError, Transcript, to_int16, to_pcm16
from streaming.stt_deepgram import DeepgramSession

SR = 16000
WORD_S = 0.5
CHUNK = 320  # 20 ms


# --- the pure parts -------------------------------------------------------------------------------------------


def test_replay_buffer_acks_trims_and_keeps_order():
    buf = ReplayBuffer(limit_samples=1000)
    buf.add_audio(b"\x01\x00" * 300)  # samples 0..300
    buf.add_finalize()  # at 300
    buf.add_audio(b"\x02\x00" * 300)  # 300..600
    assert (buf.start, buf.end, buf.audio_samples) == (0, 600, 600)
    buf.ack(250)  # a result covered 0..250: the first chunk keeps its last 50 samples
    items = buf.items_after()
    assert [(i.position, i.samples) for i in items] == [(250, 50), (300, 0), (300, 300)]
    assert buf.start == 250 and buf.audio_samples == 350
    buf.ack(300)  # the Finalize at 300 is not yet answered: it stays
    assert [i.audio is None for i in buf.items_after()] == [True, False]
    buf.ack_finalize()
    assert [i.position for i in buf.items_after()] == [300]
    seq = buf.items_after()[-1].seq
    buf.add_audio(b"\x03\x00" * 100)
    assert [i.position for i in buf.items_after(seq)] == [600]  # what arrived during a replay
    joined = buf.audio_between(550, 650)  # across two chunks: 50 samples of each
    assert joined == b"\x02\x00" * 50 + b"\x03\x00" * 50
    dropped = buf.add_audio(b"\x04\x00" * 700)  # 400 + 700 > 1000: the oldest 100 go
    assert dropped == 100 and buf.audio_samples == 1000 and buf.start == 400


def test_replay_buffer_later_ack_clears_an_unanswered_finalize():
    buf = ReplayBuffer(limit_samples=10_000)
    buf.add_audio(b"\x00\x00" * 100)
    buf.add_finalize()
    buf.add_audio(b"\x00\x00" * 100)
    buf.ack(150)  # audio after the Finalize was acknowledged: the Finalize was handled
    assert [(i.position, i.audio is None) for i in buf.items_after()] == [(150, False)]


def test_backoff_grows_with_jitter_and_a_cap():
    rng = random.Random(1)
    delays = [[backoff_delay(n, 0.25, 8.0, rng) for _ in range(200)] for n in range(8)]
    for n, ds in enumerate(delays):
        step = min(8.0, 0.25 * 2**n)
        assert step / 2 <= min(ds) and max(ds) <= step
        assert max(ds) - min(ds) > step / 4  # really jittered
    assert max(delays[-1]) <= 8.0


# --- the session against the test server ----------------------------------------------------------------------


def settings(dg: DeepgramTestServer, **kw) -> Settings:
    base = dict(stt_backend="deepgram", deepgram_url=dg.url, deepgram_api_key=dg.api_key,
                stt_reconnect_base_s=0.05, stt_reconnect_max_s=0.4, stt_reconnect_max_failures=5,
                stt_close_wait_s=10.0)
    return Settings(_env_file=None, **{**base, **kw})


class Collector:
    def __init__(self) -> None:
        self.words: list = []
        self.errors: list[tuple[str, str]] = []

    async def on_transcript(self, t: Transcript) -> None:
        self.words.extend(t.words)

    async def on_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))


def speech(seconds: float) -> np.ndarray:
    return read_wav(SAMPLE_WAV)[int(7 * SR) : int((7 + seconds) * SR)]


async def stream(session: DeepgramSession, audio: np.ndarray, pace_s: float = 0.002, finalize_every: int = 0):
    for i in range(0, len(audio), CHUNK):
        await session.send(to_int16(audio[i : i + CHUNK]))
        if finalize_every and (i // CHUNK + 1) % finalize_every == 0:
            await session.finalize()
        await asyncio.sleep(pace_s)
    await session.finalize()
    await session.close()


def assert_tiles(words: list, total_s: float) -> None:
    """The words cover 0..total_s with no hole and no repeat (each word is `w<its own start>`)."""
    words = sorted(words, key=lambda w: w.start)
    assert words[0].start == pytest.approx(0.0, abs=1e-3)
    for a, b in zip(words, words[1:], strict=False):
        assert b.start == pytest.approx(a.end, abs=1e-3), (a, b)
    assert words[-1].end == pytest.approx(total_s, abs=1e-3)
    for w in words:  # the name is the start on that socket's clock; the shift puts it on the session's clock
        assert w.end > w.start


def assert_each_connection_got_a_clean_slice(dg: DeepgramTestServer, sent: bytes) -> list[int]:
    """Every sample a connection received is the sent audio from some position on, once, in order. Returns the
    start position (in samples) of each connection's slice."""
    bases = []
    for conn in dg.connections:
        got = bytes(conn.audio)
        base = sent.find(got[: 2 * SR]) if got else 0  # 1 s of real speech does not repeat elsewhere
        assert base >= 0 and base % 2 == 0
        assert sent[base : base + len(got)] == got
        bases.append(base // 2)
    return bases


async def test_drop_mid_stream_replays_the_unacknowledged_speech_once():
    audio = speech(10.0)
    async with DeepgramTestServer(word_s=WORD_S, result_every_s=1.0) as dg:
        dg.drop_after_bytes, dg.drops_left = 3 * SR * 2 + 1000, 1  # once, 3 s in (between two results)
        got = Collector()
        session = DeepgramSession(got.on_transcript, settings(dg), "en", got.on_error)
        before = metrics.snapshot()
        await session.start()
        await stream(session, audio)
    assert session.connections == 2 and got.errors == []
    sent = to_pcm16(audio)
    bases = assert_each_connection_got_a_clean_slice(dg, sent)
    first, second = dg.connections
    assert first.event_names() == ["drop_after_bytes"]
    # The second socket starts where the first socket's results ended: audio after that was replayed.
    acked_s = max(r.payload["start"] + r.payload["duration"] for r in first.replies if r.type == "Results")
    assert bases == [0, round(acked_s * SR)]
    assert len(first.audio) > 2 * bases[1]  # some audio really was sent twice (once per connection)
    assert bases[1] * 2 + len(second.audio) == len(sent)  # ...and the second socket got all the rest
    assert second.control_messages()[-2:] == ["Finalize", "CloseStream"]
    assert_tiles(got.words, len(audio) / SR)
    after = metrics.snapshot()
    assert after["stt_reconnects_total"] - before["stt_reconnects_total"] == 1
    replayed = after["stt_replayed_seconds_total"] - before["stt_replayed_seconds_total"]
    assert replayed == pytest.approx(len(first.audio) / 2 / SR - acked_s, abs=0.05)


async def test_unanswered_finalize_is_sent_again():
    """A Finalize sent just before the drop gets no answer: it is replayed at the same point of the audio."""
    audio = speech(6.0)
    async with DeepgramTestServer(word_s=WORD_S, result_every_s=10.0, reply_delay_s=0.3) as dg:
        dg.drop_after_bytes, dg.drops_left = 4 * SR * 2, 1
        got = Collector()
        session = DeepgramSession(got.on_transcript, settings(dg), "en", got.on_error)
        await session.start()
        await stream(session, audio, finalize_every=50)  # a Finalize each second
    first, second = dg.connections
    assert first.control_messages().count("Finalize") >= 3
    assert second.control_messages()[0] == "Finalize" or "Finalize" in second.control_messages()
    assert_tiles(got.words, len(audio) / SR)


async def test_refused_reconnects_back_off_then_recover():
    audio = speech(8.0)
    async with DeepgramTestServer(word_s=WORD_S) as dg:
        dg.drop_after_bytes, dg.drops_left = 2 * SR * 2 + 500, 1
        dg.refuse_connections = 0
        got = Collector()
        session = DeepgramSession(got.on_transcript, settings(dg), "en", got.on_error)
        before = metrics.snapshot()
        await session.start()
        dg.refuse_connections = 3  # the next three upgrades get 503
        await stream(session, audio, pace_s=0.005)
    refused = [a for a in dg.attempts if a.status == 503]
    assert len(refused) == 3 and session.connections == 2
    gaps = np.diff([a.t for a in dg.attempts[1:]])  # each retry waits longer than the one before (base 0.05 s)
    assert all(g >= 0.025 for g in gaps)
    assert_each_connection_got_a_clean_slice(dg, to_pcm16(audio))
    assert_tiles(got.words, len(audio) / SR)
    assert metrics.value("stt_reconnect_failures_total") - before["stt_reconnect_failures_total"] == 3


async def test_gives_up_after_quick_failures_and_says_so():
    audio = speech(6.0)
    async with DeepgramTestServer(word_s=WORD_S) as dg:
        got = Collector()
        session = DeepgramSession(got.on_transcript, settings(dg, stt_reconnect_max_failures=3), "en", got.on_error)
        before = metrics.snapshot()
        await session.start()
        dg.drop_after_bytes, dg.refuse_connections = 2 * SR * 2, 1000
        with pytest.raises(SttError, match="reconnects failed"):
            for i in range(0, len(audio), CHUNK):
                await session.send(to_int16(audio[i : i + CHUNK]))
                await asyncio.sleep(0.01)
            for _ in range(500):  # speech ended; the stream goes on in silence until the check fails
                session.check()
                await asyncio.sleep(0.01)
        await session.close()
    assert len(dg.attempts) == 4  # the first socket, then three refused
    assert metrics.value("stt_gave_up_total") - before["stt_gave_up_total"] == 1
    assert metrics.value("stt_lost_seconds_total") > before["stt_lost_seconds_total"]


async def test_full_buffer_tells_the_client_and_counts_the_loss():
    audio = speech(6.0)
    async with DeepgramTestServer(word_s=WORD_S) as dg:
        got = Collector()
        session = DeepgramSession(got.on_transcript, settings(dg, stt_replay_buffer_s=1.0,
                                                              stt_reconnect_max_failures=50), "en", got.on_error)
        before = metrics.snapshot()
        await session.start()
        dg.drop_after_bytes, dg.drops_left = 1 * SR * 2, 1
        dg.refuse_connections = 6  # ~2 s of backoff at most: the 1 s buffer overflows meanwhile
        await stream(session, audio, pace_s=0.02)
    assert [code for code, _ in got.errors] == ["stt_buffer_full"]
    dropped = metrics.value("stt_buffer_overflow_seconds_total") - before["stt_buffer_overflow_seconds_total"]
    assert dropped > 0.2
    words = sorted(got.words, key=lambda w: w.start)
    ends = [0.0] + [w.end for w in words]
    holes = [round(w.start - end, 3) for w, end in zip(words, ends, strict=False) if w.start - end > 1e-3]
    assert holes == [pytest.approx(dropped, abs=1e-3)]  # the only gap in the transcript is the speech dropped
    assert words[-1].end == pytest.approx(len(audio) / SR, abs=1e-3)


# --- end to end: a real server process ------------------------------------------------------------------------


def global_word_starts(segments: list[dict]) -> list[float]:
    """Words in transcript order, each `w<t>` with t on its own socket's clock; a socket change shows as t going
    back. Returns (socket index, t) pairs."""
    out, socket, last = [], 0, -1.0
    for seg in segments:
        for word in seg["text"].split():
            t = float(word[1:])
            if t < last:
                socket += 1
            out.append((socket, t))
            last = t
    return out


async def test_server_keeps_every_second_of_speech_through_a_drop(tmp_path):
    from conftest import pcm16_frames, start_server, stop_server, stream_frames
    from deepgram_server import ThreadedDeepgramTestServer
    from test_server_deepgram import expected_spans

    audio = np.concatenate([read_wav(SAMPLE_WAV), np.zeros(2 * SR, np.float32)])  # the silence ends the region
    audio = (np.round(audio * 32768) / 32768).astype(np.float32)
    spans, _ = expected_spans(audio)
    sent = np.concatenate([np.round(c * 32768).astype("<i2") for _, c in spans]).tobytes()
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=WORD_S) as dg:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=dg.url, DEEPGRAM_API_KEY="dg-key",
                              STT_RECONNECT_BASE_S="0.2")
        try:
            dg.drop_connections(after_bytes=8 * SR * 2 + 640, times=1)  # mid-speech, between two results
            words_expected = int(np.ceil(len(sent) / 2 / SR / WORD_S))

            def all_back(result) -> bool:
                return sum(len(s["text"].split()) for s in result.segments.values()) >= words_expected

            result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                                         pcm16_frames(audio), pace_s=0.005, until=all_back)
            dg.wait_for(lambda d: len(d.connections) == 2 and d.connections[1].closed_by is not None, timeout=20)
            metrics_text = __import__("httpx").get(f"{server.http}/metrics").text
        finally:
            stop_server(server)
        assert result.errors() == [] and result.close_code in (1000, None)
        assert_each_connection_got_a_clean_slice(dg, sent)
        first, second = dg.connections
        assert first.event_names() == ["drop_after_bytes"]
        assert second.control_messages()[-1] == "CloseStream"
    # The transcript: words from both sockets, on one clock, no repeat and no hole.
    bases = assert_each_connection_got_a_clean_slice(dg, sent)
    starts = [bases[k] / SR + t for k, t in global_word_starts(result.ordered())]
    assert starts[0] == 0.0 and all(0 < b - a <= WORD_S + 1e-6 for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1] >= len(sent) / 2 / SR - WORD_S
    assert re.search(r"^omi_stt_reconnects_total 1(\.0)?$", metrics_text, re.M), metrics_text
    assert "dg-key" not in server.log()


async def test_server_ends_the_stream_clearly_when_deepgram_stays_down(tmp_path):
    """Reconnects keep failing: the client gets `stt_unavailable` and close 1011, never a hang or a crash."""
    from conftest import pcm16_frames, start_server, stop_server, stream_frames
    from deepgram_server import ThreadedDeepgramTestServer

    speech_audio = read_wav(SAMPLE_WAV)[int(7 * SR) : int(20 * SR)]
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=WORD_S) as dg:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=dg.url, DEEPGRAM_API_KEY="dg-key",
                              STT_RECONNECT_BASE_S="0.05", STT_RECONNECT_MAX_FAILURES="2")
        try:
            dg.drop_after_bytes = 3 * SR * 2
            dg.refuse_connections = 1000
            result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                                         pcm16_frames(speech_audio), pace_s=0.01, close=False, timeout_s=30)
            alive = __import__("httpx").get(f"{server.http}/health").status_code
        finally:
            stop_server(server)
    assert result.close_code == 1011
    assert [e["code"] for e in result.errors()] == ["stt_unavailable"]
    assert alive == 200
