"""STT_BACKEND=openai: the real session and its real httpx client against the OpenAI-protocol test server on
127.0.0.1 (tests/openai_stt_server.py), which checks each multipart request as OpenAI does and transcribes the
uploaded audio with pocketsphinx. So every word the session delivers came through a real request carrying that
region's speech, and a session that sends nothing (or the wrong audio, or drops a region) has no words to show.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
import pytest
from conftest import SAMPLE_WAV, read_wav
from openai_stt_server import Fault, OpenAISttTestServer

import metrics
from config import Settings
from streaming.openai_transcriber import OpenAiTranscriber, words_from_verbose_json
from streaming.stt import SttError, Transcript, to_int16
from streaming.stt_openai import OpenAiSession

SR = 16000
CHUNK = 320  # 20 ms
KEY = "sk-stt-7f3a9c2e1d"


def clip(start_s: float, end_s: float) -> np.ndarray:
    return to_int16(read_wav(SAMPLE_WAV)[int(start_s * SR) : int(end_s * SR)])


REGION_A = (7.5, 9.5)  # "hello ..." in sample.wav
REGION_B = (10.0, 11.5)


def settings(srv: OpenAISttTestServer, **kw) -> Settings:
    base = dict(stt_backend="openai", openai_stt_url=srv.base_url, openai_stt_api_key=KEY,
                stt_reconnect_base_s=0.05, stt_reconnect_max_s=0.4, stt_reconnect_max_failures=5,
                stt_close_wait_s=60.0)
    return Settings(_env_file=None, **{**base, **kw})


class Collector:
    def __init__(self) -> None:
        self.transcripts: list[Transcript] = []
        self.errors: list[tuple[str, str]] = []

    async def on_transcript(self, t: Transcript) -> None:
        self.transcripts.append(t)

    async def on_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))

    @property
    def words(self) -> list:
        return [w for t in self.transcripts for w in t.words]


async def send_region(session: OpenAiSession, pcm: np.ndarray, finalize: bool = True) -> None:
    for i in range(0, len(pcm), CHUNK):
        await session.send(pcm[i : i + CHUNK])
    if finalize:
        await session.finalize()


def expected_words(srv: OpenAISttTestServer, pcm: np.ndarray, offset_s: float) -> list[tuple[str, float, float]]:
    return [(w["word"], w["start"] + offset_s, w["end"] + offset_s) for w in srv.recognize(pcm.tobytes())]


def as_tuples(words) -> list[tuple[str, float, float]]:
    return [(w.text, round(w.start, 4), round(w.end, 4)) for w in words]


def approx(words: list[tuple[str, float, float]]):
    return [(t, pytest.approx(s, abs=1e-3), pytest.approx(e, abs=1e-3)) for t, s, e in words]


async def until(predicate, timeout_s: float) -> bool:
    """Waits on the event loop (the session's requests go on meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
def srv():
    with OpenAISttTestServer(api_key=KEY) as server:
        yield server


async def run_session(srv, regions: list[np.ndarray], language: str = "en", **kw) -> tuple[Collector, OpenAiSession]:
    got = Collector()
    s = settings(srv, **kw)
    transcriber = OpenAiTranscriber(s)
    session = OpenAiSession(got.on_transcript, s, language, transcriber, got.on_error)
    await session.start()
    try:
        for pcm in regions:
            await send_region(session, pcm)
        await session.close()
    finally:
        await transcriber.aclose()
    return got, session


# --- the request, the words, the clock ---------------------------------------------------------------------------


async def test_each_region_is_one_checked_request_and_words_land_on_the_sent_clock(srv):
    a, b = clip(*REGION_A), clip(*REGION_B)
    got, _ = await run_session(srv, [a, b], language="en-US")
    requests = srv.requests
    assert [r.status for r in requests] == [200, 200]
    for request, pcm in zip(requests, (a, b), strict=True):
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.value("model") == "whisper-1"
        assert request.value("response_format") == "verbose_json"
        assert request.fields["timestamp_granularities[]"] == ["word"]
        assert request.value("language") == "en"  # en-US as ISO-639-1
        assert (request.filename, request.file_content_type) == ("speech.wav", "audio/wav")
        assert (request.sample_rate, request.channels, request.subtype) == (SR, 1, "PCM_16")
        assert request.pcm == pcm.tobytes()  # exactly the region's speech, nothing more
        assert set(request.answer) >= {"task", "language", "duration", "text", "words"}
    want = expected_words(srv, a, 0.0) + expected_words(srv, b, len(a) / SR)  # b starts where a's samples end
    assert len(want) >= 6
    assert as_tuples(got.words) == approx(want)
    assert all(t.is_final and t.speech_final for t in got.transcripts) and len(got.transcripts) == 2
    assert got.errors == []


async def test_multi_language_lets_the_server_detect(srv):
    got, _ = await run_session(srv, [clip(*REGION_B)], language="multi")
    assert "language" not in srv.requests[0].fields and got.words


async def test_results_stay_in_region_order_when_an_earlier_answer_is_slow(srv):
    a, b = clip(*REGION_A), clip(*REGION_B)
    srv.recognize(a.tobytes()), srv.recognize(b.tobytes())  # decoded up front: answer times are the delays alone
    srv.script(Fault(delay_s=2.0))  # the first request's answer is held back
    got, _ = await run_session(srv, [a, b])
    first, second = srv.requests
    assert first.pcm == a.tobytes() and second.pcm == b.tobytes()
    assert second.done_at < first.done_at  # b was answered first ...
    assert [t.words[0].text for t in got.transcripts] == [expected_words(srv, a, 0)[0][0],
                                                          expected_words(srv, b, 0)[0][0]]  # ... a delivered first
    starts = [w.start for w in got.words]
    assert starts == sorted(starts)


async def test_requests_in_flight_are_capped_for_the_whole_process(srv):
    """Two streams share one transcriber capped at 2: with every answer held 0.4 s, six regions never have more than
    two requests at the server at once, and each stream still gets its words in order."""
    pcm = clip(10.0, 10.6)
    srv.recognize(pcm.tobytes())  # decoded once up front: the answers take the scripted delay, not the decoding
    srv.default = Fault(delay_s=0.4)
    s = settings(srv, openai_stt_max_concurrent=2)
    transcriber = OpenAiTranscriber(s)
    streams = [Collector(), Collector()]
    sessions = [OpenAiSession(c.on_transcript, s, "en", transcriber, c.on_error) for c in streams]

    async def three_regions(session: OpenAiSession) -> None:
        for _ in range(3):
            await send_region(session, pcm)
        await session.close()

    await asyncio.gather(*(three_regions(session) for session in sessions))
    await transcriber.aclose()
    spans = [(r.at, r.done_at) for r in srv.requests]
    assert len(spans) == 6 and all(r.status == 200 for r in srv.requests)
    overlap = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert overlap == 2
    one = expected_words(srv, pcm, 0.0)
    for got in streams:
        want = [(w, a + i * len(pcm) / SR, b + i * len(pcm) / SR) for i in range(3) for w, a, b in one]
        assert as_tuples(got.words) == approx(want) and want


# --- failures ------------------------------------------------------------------------------------------------------


async def test_retries_after_500_429_a_drop_and_a_timeout_with_nothing_lost(srv):
    a = clip(*REGION_A)
    want = expected_words(srv, a, 0.0)  # decoded now: the answers below come within the 1.5 s timeout
    srv.script(Fault(status=500), Fault(status=429, retry_after="0.6"), Fault(drop=True), Fault(delay_s=3.0))
    before = metrics.snapshot()
    got, session = await run_session(srv, [a], openai_stt_timeout_s=1.5)
    requests = srv.requests
    assert len(requests) == 5 and all(r.pcm == a.tobytes() for r in requests)  # the same region each time
    assert [r.status for r in requests] == [500, 429, None, 200, 200]  # None: dropped before the body
    assert requests[2].at - requests[1].at >= 0.6  # Retry-After is respected (the backoff alone is <= 0.1 s)
    assert as_tuples(got.words) == approx(want) and got.words
    assert got.errors == []
    session.check()  # recovered: still usable
    after = metrics.snapshot()
    assert after["stt_reconnect_failures_total"] - before["stt_reconnect_failures_total"] == 4
    assert after["stt_reconnects_total"] - before["stt_reconnects_total"] == 1


async def test_gives_up_after_max_failures_with_an_error(srv):
    srv.default = Fault(status=503)
    got = Collector()
    s = settings(srv, stt_reconnect_max_failures=3)
    transcriber = OpenAiTranscriber(s)
    session = OpenAiSession(got.on_transcript, s, "en", transcriber, got.on_error)
    before = metrics.snapshot()
    await send_region(session, clip(*REGION_B))
    assert await until(lambda: len(srv.requests) >= 3, 10)
    with pytest.raises(SttError, match="failed 3 times in a row .HTTP 503"):
        for _ in range(200):
            session.check()
            await asyncio.sleep(0.02)
    with pytest.raises(SttError):  # the pipeline's next frame ends the stream (stt_unavailable, 1011)
        await session.send(clip(*REGION_A)[:CHUNK])
    await session.close()
    await transcriber.aclose()
    assert len(srv.requests) == 3 and got.words == []
    assert metrics.value("stt_gave_up_total") - before["stt_gave_up_total"] == 1
    assert metrics.value("stt_lost_seconds_total") - before["stt_lost_seconds_total"] == pytest.approx(1.5, abs=0.01)


async def test_a_wrong_key_gives_up_at_once_and_never_logs_the_key(srv, caplog):
    srv.api_key = "sk-the-right-one"  # the server echoes the key it was sent in its 401 message
    caplog.set_level(logging.DEBUG)
    got = Collector()
    s = settings(srv)
    transcriber = OpenAiTranscriber(s)
    session = OpenAiSession(got.on_transcript, s, "en", transcriber, got.on_error)
    await send_region(session, clip(*REGION_B))
    assert await until(lambda: srv.requests and srv.requests[0].status == 401, 10)
    with pytest.raises(SttError, match=r"refused the request \(HTTP 401\)") as refused:
        for _ in range(200):
            session.check()
            await asyncio.sleep(0.02)
    await session.close()
    await transcriber.aclose()
    assert len(srv.requests) == 1  # not retried
    assert KEY in srv.requests[0].answer["error"]["message"]  # the body really carried it ...
    assert "Incorrect API key provided: ***" in caplog.text  # ... and the log has the server's words, redacted
    assert KEY not in caplog.text and KEY not in str(refused.value)


async def test_a_refused_region_is_skipped_with_an_error_and_the_next_one_transcribed(srv):
    short, b = clip(8.0, 8.05), clip(*REGION_B)  # 50 ms: OpenAI refuses audio under 0.1 s (400)
    got, session = await run_session(srv, [short, b])
    assert [r.status for r in srv.requests] == [400, 200]
    assert [code for code, _ in got.errors] == ["stt_rejected"]
    assert as_tuples(got.words) == approx(expected_words(srv, b, len(short) / SR))
    session.check()


async def test_held_speech_is_bounded_the_oldest_dropped_counted_and_told(srv):
    """The server fails while four 1.5 s regions close; 3.5 s may be held: the oldest two go (one error event),
    and once the server answers again the two kept regions are transcribed at their own times."""
    regions = [clip(7.5, 9.0), clip(10.0, 11.5), clip(13.0, 14.5), clip(20.0, 21.5)]
    srv.default = Fault(status=503)
    got = Collector()
    s = settings(srv, stt_replay_buffer_s=3.5, stt_reconnect_max_failures=1000, stt_reconnect_max_s=0.2)
    transcriber = OpenAiTranscriber(s)
    session = OpenAiSession(got.on_transcript, s, "en", transcriber, got.on_error)
    before = metrics.snapshot()
    for pcm in regions:
        await send_region(session, pcm)
    srv.default = Fault()  # back
    await session.close()
    await transcriber.aclose()
    assert [code for code, _ in got.errors] == ["stt_buffer_full"]
    dropped = metrics.value("stt_buffer_overflow_seconds_total") - before["stt_buffer_overflow_seconds_total"]
    assert dropped == pytest.approx(3.0, abs=0.01)
    offsets = np.cumsum([0] + [len(r) for r in regions]) / SR
    want = expected_words(srv, regions[2], offsets[2]) + expected_words(srv, regions[3], offsets[3])
    assert as_tuples(got.words) == approx(want)
    answered = {r.pcm for r in srv.requests if r.status == 200}
    assert answered == {regions[2].tobytes(), regions[3].tobytes()}


async def test_a_region_over_the_upload_limit_is_cut_into_requests(srv):
    pcm = clip(7.5, 12.0)  # 4.5 s; a limit of 2 s per file: 2 + 2 + 0.5 s
    for i in range(3):  # decoded up front (cached by audio): the test's time goes to the session, not pocketsphinx
        srv.recognize(pcm[i * 2 * SR : (i + 1) * 2 * SR].tobytes())
    got = Collector()
    s = settings(srv)
    transcriber = OpenAiTranscriber(s)
    session = OpenAiSession(got.on_transcript, s, "en", transcriber, got.on_error, max_file_bytes=44 + 2 * SR * 2)
    await send_region(session, pcm)
    await session.close()
    await transcriber.aclose()
    parts = [r.pcm for r in srv.requests]
    assert [len(p) // 2 for p in parts] == [2 * SR, 2 * SR, SR // 2]
    assert b"".join(parts) == pcm.tobytes()
    assert all(r.file_bytes <= 44 + 2 * SR * 2 for r in srv.requests)
    want = []
    for i, part in enumerate(parts):
        want += expected_words(srv, np.frombuffer(part, np.int16), 2.0 * i)
    assert as_tuples(got.words) == approx(want)
    assert [t.speech_final for t in got.transcripts] == [False, False, True]


async def test_stream_end_waits_close_wait_then_counts_the_unanswered_speech(srv):
    pcm = clip(*REGION_B)
    srv.recognize(pcm.tobytes())  # decoded up front: pocketsphinx in the server's thread holds the GIL while it runs
    srv.default = Fault(delay_s=4.0)
    got = Collector()
    s = settings(srv, stt_close_wait_s=0.5)
    transcriber = OpenAiTranscriber(s)
    session = OpenAiSession(got.on_transcript, s, "en", transcriber, got.on_error)
    before = metrics.snapshot()
    await send_region(session, pcm, finalize=False)  # the region is still open: close() sends it
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await session.close()
    waited = loop.time() - t0
    await transcriber.aclose()
    assert 0.5 <= waited < 2.0 and got.transcripts == []
    assert await until(lambda: len(srv.requests) == 1 and srv.requests[0].pcm == pcm.tobytes(), 5)
    assert metrics.value("stt_lost_seconds_total") - before["stt_lost_seconds_total"] == pytest.approx(1.5, abs=0.01)


def test_other_servers_word_layouts_are_read():
    """whisper.cpp puts words in segments; a server without word times still gives words, spread over the segment;
    times past the audio are clamped to it."""
    words = [{"word": " hi", "start": 0.1, "end": 0.4, "probability": 0.9},
             {"word": " there", "start": 0.5, "end": 1.4}]
    nested = {"text": "hi there", "segments": [{"start": 0.0, "end": 1.0, "text": "hi there", "words": words}]}
    assert [(w.text, w.start, w.end, w.confidence) for w in words_from_verbose_json(nested, 1.2)] == [
        ("hi", 0.1, 0.4, 0.9), ("there", 0.5, 1.2, 1.0)]
    plain = {"text": "a b", "segments": [{"start": 1.0, "end": 2.0, "text": " a b"}]}
    assert [(w.text, w.start, w.end) for w in words_from_verbose_json(plain, 3.0)] == [("a", 1.0, 1.5),
                                                                                        ("b", 1.5, 2.0)]
    with pytest.raises(ValueError):
        words_from_verbose_json(["not", "a", "transcription"], 1.0)


# --- end to end: a real server process ------------------------------------------------------------------------


async def test_server_streams_through_the_openai_backend(tmp_path):
    from conftest import pcm16_frames, start_server, stop_server, stream_frames

    audio = np.concatenate([read_wav(SAMPLE_WAV)[: 13 * SR], np.zeros(2 * SR, np.float32)])
    audio = (np.round(audio * 32768) / 32768).astype(np.float32)
    streamed = to_int16(audio).tobytes()
    with OpenAISttTestServer(api_key=KEY) as stt:
        server = start_server(tmp_path, STT_BACKEND="openai", OPENAI_STT_URL=stt.base_url, OPENAI_STT_API_KEY=KEY,
                              STT_CLOSE_WAIT_S="60")  # pocketsphinx in the test server is slow on a busy machine
        try:
            # CloseStream: the server sends every region's words before it closes (waiting for words already
            # answered could close between two regions' requests, and the second's words would come too late).
            frames: list[bytes | str] = [*pcm16_frames(audio), '{"type": "CloseStream"}']
            result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                         pace_s=0.002, close=False, timeout_s=120)
        finally:
            stop_server(server)
        log = server.log()
    assert result.errors() == [] and stt.requests and result.close_code == 1000
    assert all(r.status == 200 and r.value("model") == "whisper-1" for r in stt.requests)
    # Only speech was sent, each request a contiguous piece of the stream; its words come back at stream times.
    server_words = []
    for request in stt.requests:
        at = streamed.find(request.pcm)
        assert at >= 0 and at % 2 == 0
        start_s = at / 2 / SR
        server_words += [(w["word"], start_s + w["start"]) for w in request.answer["words"]]
    assert sum(len(r.pcm) for r in stt.requests) < len(streamed)  # silence was not sent
    segments = result.ordered()
    got_text = " ".join(s["text"] for s in segments).split()
    assert Counter(got_text) == Counter(w for w, _ in server_words)  # every word answered, once (speaker turns may
    # regroup them)
    assert segments[0]["start"] == pytest.approx(min(t for _, t in server_words), abs=0.05)  # the stream's clock
    assert segments[0]["start"] > 6.0  # sample.wav's speech starts at 6.7 s
    assert KEY not in log
