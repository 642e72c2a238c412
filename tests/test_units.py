"""Unit tests of the pure parts: the sent-audio timeline, segment building, the VAD state machine, settings."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_WAV, read_wav

from config import Settings
from streaming.segments import SegmentBuilder, SegmentTail
from streaming.stt import SentTimeline, Transcript, Word
from streaming.tagging import SpeakerLabel
from streaming.vad import SileroVad, SpeechAudio, SpeechEnd, SpeechStart, StreamingVAD, VadBackend, VadParams

SR = 16000


# --- SentTimeline: Deepgram's clock counts only the audio sent ------------------------------------------------------


def test_timeline_maps_across_gaps_of_known_length():
    tl = SentTimeline()
    tl.append(2 * SR, 3 * SR)  # stream 2..5 s  -> sent 0..3 s
    tl.append(9 * SR, 1 * SR)  # stream 9..10 s -> sent 3..4 s   (a 4 s gap)
    tl.append(10 * SR, SR // 2)  # contiguous: extends the span, sent 4..4.5 s
    tl.append(30 * SR, 2 * SR)  # stream 30..32 s -> sent 4.5..6.5 s (a 19.5 s gap)
    assert tl.sent_samples == int(6.5 * SR)
    assert tl.to_stream(0.0) == 2.0
    assert tl.to_stream(1.25) == 3.25
    assert tl.to_stream(3.0) == 9.0  # a start on a boundary belongs to the later span
    assert tl.to_stream(3.0, is_end=True) == 5.0  # an end on a boundary belongs to the earlier span
    assert tl.to_stream(4.25) == 10.25
    assert tl.to_stream(4.5) == 30.0
    assert tl.to_stream(4.5, is_end=True) == 10.5
    assert tl.to_stream(6.5, is_end=True) == 32.0
    assert tl.to_stream(7.0, is_end=True) == 32.0  # past the end: clamped to the last sent sample
    assert tl.to_stream(3.0 + 1 / SR) == pytest.approx(9.0 + 1 / SR)  # exact to the sample


def test_timeline_empty_is_identity():
    assert SentTimeline().to_stream(1.5) == 1.5


# --- SegmentBuilder ------------------------------------------------------------------------------------------------


def test_segments_grow_and_merge_as_omi_merges():
    """A segment grows with its speaker's words; after speech_final a new utterance of the same speaker less than
    30 s after it (Omi's combine_segments rule) extends it under the same id; a later one starts a new segment."""
    tl = SentTimeline()
    tl.append(10 * SR, 4 * SR)  # sent 0..4 s = stream 10..14 s
    tl.append(20 * SR, 2 * SR)  # sent 4..6 s = stream 20..22 s
    tl.append(60 * SR, 2 * SR)  # sent 6..8 s = stream 60..62 s
    sb = SegmentBuilder(tl)
    first = sb.add(Transcript((Word("Hello", 0.5, 0.9), Word("there.", 1.0, 1.4)), True, False))
    assert [s.text for s in first] == ["Hello there."]
    seg_id = first[0].id
    grown = sb.add(Transcript((Word("How", 2.0, 2.3),), True, True))
    assert grown[0].id == seg_id and grown[0].text == "Hello there. How"
    assert (grown[0].start, grown[0].end) == (10.5, 12.3)
    merged = sb.add(Transcript((Word("Fine", 4.0, 4.5),), True, True))  # 7.7 s after: the same segment
    assert merged[0].id == seg_id and merged[0].text == "Hello there. How Fine" and merged[0].end == 20.5
    later = sb.add(Transcript((Word("Later", 6.0, 6.5),), True, True))  # 39.5 s after: a new segment
    assert later[0].id != seg_id and (later[0].start, later[0].end) == (60.0, 60.5)
    assert sb.add(Transcript((), True, True)) == []  # an empty Finalize answer changes nothing
    assert sb.add(Transcript((Word("interim", 7.0, 7.2),), False, False)) == []  # only finals make segments
    assert [s.text for s in sb.segments] == ["Hello there. How Fine", "Later"]


def test_segments_of_other_speakers_and_of_the_user():
    """Another speaker starts a new segment; two labels that are both the user merge (Omi: same speaker or both
    is_user); a tagged segment keeps its tag through relabels; channels share the last segment (SegmentTail)."""
    tl = SentTimeline()
    tl.append(0, 20 * SR)
    sb = SegmentBuilder(tl)
    a, b = SpeakerLabel(0, is_user=True), SpeakerLabel(1)
    one = sb.add(Transcript((Word("mine", 0.0, 0.5),), True, True), [a])[0]
    two = sb.add(Transcript((Word("yours", 1.0, 1.5),), True, True), [b])[0]
    assert two.id != one.id and two.speaker == "SPEAKER_1"
    three = sb.add(Transcript((Word("again", 2.0, 2.5),), True, True), [SpeakerLabel(2, is_user=True)])[0]
    assert three.id != two.id  # the last segment is SPEAKER_1's: no merge across it
    four = sb.add(Transcript((Word("more", 3.0, 3.5),), True, True), [a])[0]
    assert four.id == three.id and four.text == "again more"  # both the user
    assert sb.tag([two.id], is_user=False, person_id="p1") == [two]
    assert sb.relabel(1, SpeakerLabel(1, person_id="p2")) == []  # the tagged segment keeps its tag
    assert two.person_id == "p1"

    tail = SegmentTail()
    mic = SegmentBuilder(tl, tail=tail, default_label=SpeakerLabel(0, is_user=True))
    remote = SegmentBuilder(tl, tail=tail, default_label=SpeakerLabel(1))
    m1 = mic.add(Transcript((Word("hi", 0.0, 0.5),), True, True))[0]
    r1 = remote.add(Transcript((Word("hello", 1.0, 1.5),), True, True))[0]
    m2 = mic.add(Transcript((Word("bye", 2.0, 2.5),), True, True))[0]
    assert m1.is_user and not r1.is_user and r1.speaker == "SPEAKER_1"
    assert m2.id != m1.id  # the remote side spoke in between: a new segment, as the app would show it


# --- StreamingVAD ---------------------------------------------------------------------------------------------------


class ScriptedVad(VadBackend):
    """A backend whose probabilities come from a script (one per 512-sample frame): tests the state machine alone."""

    name = "scripted"
    frame_samples = 512
    chunk_samples = 512

    def __init__(self, probs: list[float]) -> None:
        self.probs = probs

    def new_state(self) -> list[int]:
        return [0]

    def speech_probs(self, state: list[int], audio: np.ndarray) -> np.ndarray:
        n = len(audio) // self.frame_samples
        out = np.array([self.probs[i] if i < len(self.probs) else 0.0 for i in range(state[0], state[0] + n)])
        state[0] += n
        return out.astype(np.float32)


def run_vad(vad: StreamingVAD, audio: np.ndarray, step: int) -> list:
    events = []
    for i in range(0, len(audio), step):
        events += vad.process(audio[i : i + step])
    return events + vad.flush()


def summarize(events: list) -> tuple[list, np.ndarray]:
    marks = [(type(e).__name__, e.sample) for e in events if not isinstance(e, SpeechAudio)]
    audio = [e for e in events if isinstance(e, SpeechAudio)]
    for a, b in zip(audio, audio[1:], strict=False):
        assert a.start + len(a.audio) <= b.start  # never overlapping, never reordered
    return marks, np.concatenate([e.audio for e in audio]) if audio else np.zeros(0)


def test_hysteresis_pre_roll_and_hangover():
    f = 512
    # 10 frames silence, 10 speech, 2 "unsure" (between offset and onset: still speech), 30 silence
    probs = [0.0] * 10 + [0.9] * 10 + [0.35] * 2 + [0.0] * 30
    params = VadParams(onset=0.5, offset=0.3, pre_roll_ms=64, hangover_ms=320, min_speech_ms=0)
    audio = np.arange(len(probs) * f, dtype=np.float32) / 1e6  # distinct samples to check positions
    marks, sent = summarize(run_vad(StreamingVAD(ScriptedVad(probs), params), audio, 320))
    pre, hang = 2 * f, 10 * f  # 64 ms = 2 frames; 320 ms = 10 frames of silence close the region
    start = 10 * f - pre
    end = 22 * f + hang
    assert marks == [("SpeechStart", start), ("SpeechEnd", end)]
    assert np.array_equal(sent, audio[start:end])  # exactly the region, padding included


@pytest.mark.parametrize("step", [1, 320, 511, 512, 4000, 10**6])
def test_chunking_does_not_change_decisions(step):
    audio = read_wav(SAMPLE_WAV)[: 12 * SR]
    backend = SileroVad()
    reference = summarize(run_vad(StreamingVAD(backend, VadParams()), audio, len(audio)))
    if step == 1:
        step = 7  # one sample at a time would take long; 7 is as awkward
    marks, sent = summarize(run_vad(StreamingVAD(backend, VadParams()), audio, step))
    assert marks == reference[0] and np.array_equal(sent, reference[1])


def test_streams_do_not_share_state():
    """Two streams on one backend, interleaved frame by frame, decide exactly as each would alone."""
    backend = SileroVad()
    a, b = read_wav(SAMPLE_WAV)[: 10 * SR], read_wav(SAMPLE_WAV)[15 * SR : 25 * SR][::-1].copy()
    alone = [summarize(run_vad(StreamingVAD(backend, VadParams()), x, 320)) for x in (a, b)]
    va, vb = StreamingVAD(backend, VadParams()), StreamingVAD(backend, VadParams())
    ea, eb = [], []
    for i in range(0, len(a), 320):
        ea += va.process(a[i : i + 320])
        eb += vb.process(b[i : i + 320])
    together = [summarize(ea + va.flush()), summarize(eb + vb.flush())]
    for (m1, s1), (m2, s2) in zip(alone, together, strict=True):
        assert m1 == m2 and np.array_equal(s1, s2)


@pytest.mark.parametrize("streams", [5, 20])  # 20: the steps with 12 streams or more run on TorchScript
def test_silero_batch_equals_one_stream_calls(streams):
    """The batched exports (many streams per call, ragged frame counts, carried state) give each stream the
    probabilities of the one-stream export."""
    backend = SileroVad()
    audio = np.concatenate([read_wav(SAMPLE_WAV)] * 2)
    n = 187 * 512  # about 6 s, whole frames
    signals = [audio[i * SR * 27 // 10 : i * SR * 27 // 10 + n] for i in range(streams)]
    alone = [backend.speech_probs(backend.new_state(), x) for x in signals]
    states = [backend.new_state() for _ in signals]
    got: list[list[np.ndarray]] = [[] for _ in signals]
    pos = [0] * len(signals)
    rng = np.random.default_rng(1)
    while any(p < n for p in pos):
        steps = [int(rng.integers(0, 4)) * 512 for _ in signals]  # 0-3 frames each, some streams idle this round
        parts = [x[p : p + n] for x, p, n in zip(signals, pos, steps, strict=True)]
        for out, probs in zip(got, backend.speech_probs_batch(states, parts), strict=True):
            out.append(probs)
        pos = [p + len(part) for p, part in zip(pos, parts, strict=True)]
    for expected, pieces in zip(alone, got, strict=True):
        np.testing.assert_allclose(np.concatenate(pieces), expected, atol=1e-5)
    # and a stream can move between the exports at any point: their states are the same
    state = backend.new_state()
    first = backend.speech_probs_batch([state, backend.new_state()], [signals[0][: 64 * 512], signals[1][:512]])[0]
    rest = backend.speech_probs(state, signals[0][64 * 512 :])
    np.testing.assert_allclose(np.concatenate((first, rest)), alone[0], atol=1e-5)


async def test_streams_batched_on_the_pool_decide_as_each_alone():
    """Pipelines' frame jobs through the pool's VAD worker (one model call for all streams per step) give every
    stream the events it gets alone; a job that fails fails only its own stream."""
    from streaming.codecs import make_decoder
    from streaming.pipeline import FrameJob, SpeechPcm
    from streaming.pool import ModelPool

    backend = SileroVad()
    audio = read_wav(SAMPLE_WAV)
    signals = [audio[i * 2 * SR : i * 2 * SR + 8 * SR] for i in range(6)]
    alone = [summarize(run_vad(StreamingVAD(backend, VadParams()), x, 320)) for x in signals]
    pool = await ModelPool.create(Settings(_env_file=None, lazy_models=True), vad_backend=backend)
    try:
        decoders = [make_decoder("pcm16", SR, 1) for _ in signals]
        vads = [StreamingVAD(backend, VadParams()) for _ in signals]
        events: list[list] = [[] for _ in signals]
        pcm = [(np.clip(x, -1, 32767 / 32768) * 32768).astype("<i2").tobytes() for x in signals]

        async def stream(i: int) -> None:
            for k, offset in enumerate(range(0, len(pcm[i]), 640 * 3)):  # three 20 ms frames per job
                frames = [(k * 3 + j, pcm[i][offset + j * 640 : offset + (j + 1) * 640]) for j in range(3)]
                job = await pool.run_vad(FrameJob(decoders[i], vads[i], [f for f in frames if f[1]]))
                events[i] += [SpeechAudio(e.start, e.pcm / 32768.0) if isinstance(e, SpeechPcm) else e
                              for e in job.events]  # the int16 the pipeline forwards, as float again
            events[i] += vads[i].flush()

        class Broken(FrameJob):
            def prepare(self):
                raise RuntimeError("broken stream")

        async def broken() -> None:
            with pytest.raises(RuntimeError, match="broken stream"):
                await pool.run_vad(Broken(make_decoder("pcm16", SR, 1), StreamingVAD(backend), [(0, b"\0" * 640)]))

        import asyncio

        await asyncio.gather(broken(), *(stream(i) for i in range(len(signals))))
        assert pool.stats()["vad"]["mean_batch"] > 1.5  # the streams really shared model calls
    finally:
        await pool.close()
    for (m1, s1), ev in zip(alone, events, strict=True):
        m2, s2 = summarize(ev)
        assert m1 == m2
        np.testing.assert_array_equal(s2, np.round(s1 * 32768) / 32768)  # pcm16 in, int16 out: exact


def test_max_speech_cuts_long_regions():
    probs = [0.9] * 200
    params = VadParams(onset=0.5, offset=0.3, pre_roll_ms=0, hangover_ms=100, min_speech_ms=0, max_speech_s=1.0)
    events = run_vad(StreamingVAD(ScriptedVad(probs), params), np.zeros(200 * 512, np.float32), 512)
    starts = [e.sample for e in events if isinstance(e, SpeechStart)]
    ends = [e.sample for e in events if isinstance(e, SpeechEnd)]
    assert len(starts) == len(ends) >= 6
    assert all(e - s <= SR + 512 for s, e in zip(starts, ends, strict=True))
    assert starts[1:] == ends[:-1]  # cut and restarted with no audio lost


def test_vad_defaults_match_settings():
    assert VadParams.from_settings(Settings(_env_file=None)) == VadParams()


def test_settings_derive_ws_url_and_stt_default():
    s = Settings(_env_file=None, deepgram_url="https://dg.example.com/")
    assert s.deepgram_ws_url == "wss://dg.example.com" and s.stt_backend == "local"
    s = Settings(_env_file=None, deepgram_url="http://127.0.0.1:8765", deepgram_api_key="k")
    assert s.deepgram_ws_url == "ws://127.0.0.1:8765" and s.stt_backend == "deepgram"
    with pytest.raises(ValueError):
        Settings(_env_file=None, vad_onset=0.2, vad_offset=0.5)


def test_env_template_lists_every_setting_and_loads_as_the_defaults():
    import re

    from conftest import REPO

    template = (REPO / ".env.template").read_text(encoding="utf-8")
    keys = set(re.findall(r"^([A-Z0-9_]+)=", template, re.M))
    assert keys == {name.upper() for name in Settings.model_fields}
    assert Settings(_env_file=REPO / ".env.template") == Settings(_env_file=None)


def test_uploads_claiming_a_tiny_sample_rate_are_refused():
    """32 kB whose header says 2 Hz would 'last' 2 hours: refused at once, not upsampled (found by fuzzing)."""
    import io

    import soundfile as sf

    from streaming.audiofile import AudioFileError, decode_audio_file

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 2, format="WAV")
    with pytest.raises(AudioFileError) as err:
        decode_audio_file(buf.getvalue(), max_seconds=4 * 3600)
    assert err.value.status == 422 and "2 Hz" in str(err.value)


def test_audio_ring_slices_across_the_wrap():
    """The ring returns exactly the sent audio of any span it still holds, wrapped round its end or not."""
    from streaming.tagging import AudioRing

    ring = AudioRing(seconds=1.0)  # 16000 samples
    rng = np.random.default_rng(3)
    sent = np.round(rng.uniform(-0.5, 0.5, 120_000) * 32768) / 32768  # exactly representable in int16
    pos = 0
    for n in rng.integers(1, 3000, 40):
        ring.append(np.round(sent[pos : pos + n] * 32768).astype(np.int16))
        pos += int(n)
        for start, stop in ((pos - 16000, pos), (pos - 700, pos - 100), (pos - 9000, pos - 8000), (pos - 5, pos + 9)):
            lo, hi = max(start, pos - 16000, 0), min(stop, pos)
            expected = sent[lo:hi] if hi > lo else sent[:0]
            np.testing.assert_array_equal(ring.slice(start, stop), expected.astype(np.float32))
    assert ring.slice(pos - 20000, pos - 17000).size == 0  # no longer held
