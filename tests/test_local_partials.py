"""Partial transcripts of the local STT backend, end to end: a real server on the embedded defaults (silero VAD,
pocketsphinx), a client streaming a 29 s monologue at real time, the messages timed as they arrive.

The monologue: AMI trn03.wav from 1.184 s to its end (30 s), where MÉO069 speaks alone (train.rttm: the only other
speaker, MEE067, stops at 1.184 s), then 2 s of silence so the region closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from conftest import AMI, SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, start_server, stop_server, stream_frames
from omi_app_client import AppTranscript
from test_server_local import decoded, offline_words, streamed_words

from config import Settings
from streaming.segments import SegmentBuilder, SegmentTail
from streaming.stt import SentTimeline, Transcript, Word
from streaming.tagging import SpeakerLabel

SR = 16000
FRAME_S = 0.02
MONOLOGUE_FROM_S = 1.184  # train.rttm: MEE067 until 1.184 s, then MÉO069 alone to 30 s


@dataclass
class TimedStream:
    """What the client received: (seconds since the first frame was sent, payload), and the apps' merges."""

    messages: list[tuple[float, object]] = field(default_factory=list)
    apps: dict[str, AppTranscript] = field(default_factory=lambda: {v: AppTranscript(v) for v in ("2025", "new")})
    latest: dict[str, dict] = field(default_factory=dict)  # each id's last version

    def updates(self) -> list[tuple[float, list[dict]]]:
        return [(t, p) for t, p in self.messages if isinstance(p, list) and p]


async def stream_at_real_time(server, audio: np.ndarray, uid: str, settle_s: float = 90.0) -> TimedStream:
    """Sends `audio` as 20 ms pcm16 frames on a real-time schedule, then CloseStream; returns once the server closed."""
    from websockets.asyncio.client import connect

    frames = pcm16_frames(audio)
    result = TimedStream()
    async with connect(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                       additional_headers={"Authorization": f"Bearer {uid}"}, max_size=None, open_timeout=30) as ws:
        t0 = 0.0

        async def reader() -> None:
            async for message in ws:
                if message == "ping":
                    continue
                payload = json.loads(message)
                result.messages.append((time.monotonic() - t0, payload))
                if isinstance(payload, list):
                    for app in result.apps.values():
                        app.apply(payload)
                    for seg in payload:
                        result.latest[seg["id"]] = seg
                elif payload.get("type") == "segments_deleted":
                    for app in result.apps.values():
                        app.delete(payload["segment_ids"])

        while True:  # the stream is ready before the clock starts
            payload = json.loads(await ws.recv())
            if payload.get("status") == "ready":
                break
        task = asyncio.create_task(reader())
        t0 = time.monotonic()
        for i, frame in enumerate(frames):
            await ws.send(frame)
            delay = t0 + (i + 1) * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        # CloseStream: the server sends every final, then closes 1000. (Waiting for a final that arrives after the
        # last frame missed one that came sooner, on a quick machine, and waited out the idle timeout.)
        await ws.send('{"type": "CloseStream"}')
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=settle_s)
    return result


@pytest.fixture(scope="module")
def monologue() -> np.ndarray:
    audio = read_wav(AMI / "trn03.wav")[int(MONOLOGUE_FROM_S * SR):]
    return np.concatenate([audio, np.zeros(2 * SR, np.float32)])


@pytest.fixture(scope="module")
def partial_server(tmp_path_factory):
    # test servers turn partials off unless asked (tests/server_process.py): here the default interval
    server = start_server(tmp_path_factory.mktemp("partials"),
                          LOCAL_PARTIAL_INTERVAL_S=str(Settings.model_fields["local_partial_interval_s"].default))
    yield server
    stop_server(server)


async def stored_segments(server, uid: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}) as http:
        listed = (await http.get("/v1/conversations", params={"statuses": "in_progress", "limit": 1})).json()
    assert len(listed) == 1, listed
    return listed[0]["transcript_segments"]


def timing(stream: TimedStream, stored: dict[str, dict], speech_end_s: float) -> dict[str, list[float]]:
    """While the monologue is spoken (updates up to 0.5 s after its end):
    - gaps: seconds between consecutive updates;
    - partial_lags: for each partial (an update of a segment whose text is not its stored final text), seconds
      from the end of its newest word (stream time) to its arrival;
    - word_lags: for consecutive partials at most 1.5 s apart (one region, one look after the other), arrival
      minus the end of the newest word the previous one showed: a bound on how long any word the later one adds
      took to show."""
    during = [(t, p) for t, p in stream.updates() if t <= speech_end_s + 0.5]
    partials = [(t, max(seg["end"] for seg in p)) for t, p in during
                if any(seg["id"] in stored and seg["text"] != stored[seg["id"]]["text"] for seg in p)]
    return {
        "gaps": [b[0] - a[0] for a, b in zip(during, during[1:], strict=False)],
        "partial_lags": [t - end for t, end in partials],
        "word_lags": [b[0] - a[1] for a, b in zip(partials, partials[1:], strict=False) if b[0] - a[0] <= 1.5],
    }


async def test_partials_show_words_while_they_are_spoken(partial_server, monologue):
    uid = f"user-{uuid.uuid4().hex[:12]}"
    stream = await stream_at_real_time(partial_server, monologue, uid)
    speech_end = len(monologue) / SR - 2.0
    updates = stream.updates()
    assert updates, f"no segments; {stream.messages[:5]}"
    assert not [p for _, p in stream.messages if isinstance(p, dict) and p.get("type") == "error"]

    stored = {seg["id"]: seg for seg in await stored_segments(partial_server, uid)}
    figures = timing(stream, stored, speech_end)
    first_t, first = updates[0]
    first_start = min(seg["start"] for seg in first)
    print(f"\nfirst words on the client at {first_t:.2f} s (spoken from {first_start:.2f} s); "
          + "; ".join(f"{name} median {statistics.median(v):.2f} s max {max(v):.2f} s ({len(v)})" if v
                      else f"{name}: none" for name, v in figures.items()))
    # The first words are on the client within 2 s of being spoken (their segment starts when they do).
    assert first_t - first_start <= 2.0, (first_t, first_start)
    # While the speaker talks: an update at least every ~2 s (more between regions: a pause, then the next
    # region's first words), partials about once a second, showing words within 2 s of their end.
    assert max(figures["gaps"]) <= 3.0 and statistics.median(figures["gaps"]) <= 1.2, figures["gaps"]
    assert len(figures["partial_lags"]) >= speech_end * 0.6, figures["partial_lags"]
    assert max(figures["partial_lags"]) <= 2.0, figures["partial_lags"]
    # (an upper bound: it counts the new words' own length; about the interval plus the partial's lag)
    assert statistics.median(figures["word_lags"]) <= 1.5 and max(figures["word_lags"]) <= 2.5, figures["word_lags"]

    # The finals replaced the partials: every id the client holds is a stored segment (or was emptied and deleted),
    # and each app version shows exactly the stored words, each once.
    stored_by_id = stored
    stored = list(stored.values())
    assert stored and all(seg["text"] for seg in stored)
    for seg_id, seg in stream.latest.items():
        assert seg_id in stored_by_id or not seg["text"], f"a partial was left on the client: {seg}"
        if seg_id in stored_by_id:
            assert seg["text"] == stored_by_id[seg_id]["text"]
    stored_words = " ".join(seg["text"] for seg in sorted(stored, key=lambda s: s["start"])).split()
    for version, app in stream.apps.items():
        shown = " ".join(seg.text for seg in app.segments if seg.text).split()
        assert shown == stored_words, f"{version} app: {len(shown)} words shown, {len(stored_words)} stored"


async def test_finals_with_partials_are_the_finals_without(partial_server):
    """Partials never change a final: sample.wav sent as fast as the server takes it, partials on, gives exactly
    the words of the offline decode (the same VAD and batch recogniser in process), and partials were sent."""
    frames = pcm16_frames(read_wav(SAMPLE_WAV)) + silence_frames(1.5)
    expected = offline_words(decoded("pcm16", 16000, frames))
    seen: list[str] = []

    def final(result) -> bool:
        seen.extend(seg["text"] for seg in result.segments.values())
        return streamed_words(result) == expected

    result = await stream_frames(f"{partial_server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames, pace_s=0.005,
                                 until=final)
    assert streamed_words(result) == expected
    finals = {seg["text"] for seg in result.segments.values()}
    assert [text for text in seen if text not in finals], "no partial was sent"


# --- SegmentBuilder's partials, pure: the cases a live stream seldom hits -------------------------------------------

def words(*spec: tuple[str, float]) -> tuple[Word, ...]:
    return tuple(Word(text, start, start + 0.3) for text, start in spec)


def builder() -> SegmentBuilder:
    timeline = SentTimeline()
    timeline.append(0, 100 * SR)  # sent audio is stream audio
    return SegmentBuilder(timeline, tail=SegmentTail())


def test_partial_extends_the_segment_the_final_extends_and_the_final_replaces_it():
    b = builder()
    [first] = b.add(Transcript(words(("hello", 1.0)), True, True))
    [shown] = b.preview(Transcript(words(("how", 2.0), ("are", 2.4)), False, False), SpeakerLabel(0))
    assert shown.id == first.id and shown.text == "hello how are" and b.segments[0].text == "hello"
    sent = b.add(Transcript(words(("how", 2.0), ("is", 2.4), ("it", 2.8)), True, True))
    assert [s.id for s in sent] == [first.id] and sent[0].text == "hello how is it"
    assert b.settle(sent) == []  # the final sent the segment the partial showed


def test_a_segment_the_partial_showed_and_the_final_did_not_touch_is_sent_as_stored():
    b = builder()
    [first] = b.add(Transcript(words(("hello", 1.0)), True, True), [SpeakerLabel(0)])
    b.preview(Transcript(words(("noise", 2.0)), False, False), SpeakerLabel(0))
    sent = b.add(Transcript(words(("other", 2.0)), True, True), [SpeakerLabel(1)])  # tagged as someone else
    assert sent[0].id != first.id
    [settled] = b.settle(sent)
    assert settled.id == first.id and settled.text == "hello"


def test_a_new_segment_the_final_dropped_is_emptied_and_its_id_kept_for_the_next():
    b = builder()
    [shown] = b.preview(Transcript(words(("uh", 1.0)), False, False), SpeakerLabel(0))
    assert b.add(Transcript((), True, True)) == []  # the final heard no words
    [settled] = b.settle([])
    assert settled.id == shown.id and settled.text == "" and SegmentBuilder.retracted([settled]) == [shown.id]
    [later] = b.add(Transcript(words(("hello", 5.0)), True, True))
    assert later.id == shown.id  # the app holds that id (emptied): the next segment replaces it, never joins it
    assert b.segments == [later]


def test_a_partial_that_shrinks_to_nothing_takes_its_words_back():
    b = builder()
    [first] = b.add(Transcript(words(("hello", 1.0)), True, True))
    b.preview(Transcript(words(("a", 2.0)), False, False), SpeakerLabel(0))
    [back] = b.preview(Transcript((), False, False), SpeakerLabel(0))
    assert back.id == first.id and back.text == "hello"


async def test_partials_go_to_the_client_only(monologue):
    """A real pipeline (silero VAD, pocketsphinx finals and partials) with its three outlets recorded: storage
    (`persist`), the webhook-tapped `emit`, and `emit_partial`. Only finals are stored or tapped: every text there
    is a word prefix of the offline decode's transcript (one speaker, so one growing segment), while partials
    (which pocketsphinx's live search hears differently) go to `emit_partial` alone."""
    from streaming.codecs import make_decoder
    from streaming.pipeline import Pipeline
    from streaming.protocol import TranscriptSegment
    from streaming.stt import SttFactory
    from streaming.vad import SileroVad, VadParams

    audio = np.concatenate([monologue[: 20 * SR], np.zeros(2 * SR, np.float32)])
    frames = pcm16_frames(audio)
    expected = " ".join(offline_words(decoded("pcm16", 16000, frames)))
    settings = Settings(stt_backend="local", local_partial_interval_s=0.2, local_partial_decoders=1)
    stored: list[str] = []
    tapped: list[str] = []
    partial: list[str] = []

    async def persist(segments: list[TranscriptSegment]) -> None:
        stored.extend(s.text for s in segments)

    async def emit(message) -> None:
        tapped.extend(s["text"] for s in message if isinstance(message, list))

    async def emit_partial(message) -> None:
        if isinstance(message, list):
            partial.extend(s["text"] for s in message)

    pipeline = Pipeline(decoder=make_decoder("pcm16", 16000, 1), vad_backend=SileroVad(),
                        vad_params=VadParams.from_settings(settings), stt_factory=SttFactory(settings),
                        language="en", emit=emit, emit_partial=emit_partial, persist=persist)
    await pipeline.start()
    for i, frame in enumerate(frames):
        await pipeline.feed(frame)
        if i % 10 == 9:
            await asyncio.sleep(0.05)  # 200 ms of audio per 50 ms: partials come on the wall clock
    await pipeline.finish()

    def is_final(text: str) -> bool:
        return expected == text or expected.startswith(text + " ")

    assert stored and tapped and all(map(is_final, stored)) and all(map(is_final, tapped)), (stored, tapped)
    assert stored[-1] == tapped[-1] == expected
    assert [text for text in partial if not is_final(text)], "no partial was sent"
