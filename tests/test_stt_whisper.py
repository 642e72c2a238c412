"""STT_BACKEND=whisper on a tiny random Whisper model this module builds offline (tests/whisper_tiny.py): the real
loader (a local directory, and a Hugging Face id read from a hub cache with HF_HUB_OFFLINE=1), the cross-stream
batching (a batch gives each region exactly the words it gets alone), the session's order and clock, long regions,
and a real server streaming real speech. The model's text is random: these check plumbing, never words."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, stream_frames
from server_process import start_server, stop_server
from whisper_tiny import build_tiny_whisper

from config import Settings
from streaming.stt import SAMPLE_RATE, Transcript, to_int16
from streaming.stt_whisper import RegionItem, WhisperRecognizer, WhisperSession, whisper_language

# Speech turns of sample.wav (its reference, sample.rttm/.stm), seconds: what the regions are cut from.
TURNS = [(6.69, 7.16), (8.43, 9.80), (9.84, 10.78), (12.54, 14.18), (14.44, 17.77), (21.93, 23.98), (24.06, 28.43)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper-tiny"), seed=0)


def settings(model: str | Path, **overrides) -> Settings:
    # float32 on CPU, one thread: exact, so a batch and a single call can be compared word for word
    values = dict(stt_backend="whisper", whisper_model=str(model), model_device="cpu", whisper_compute_type="float32",
                  whisper_cpu_threads=1, whisper_batch_size=8, whisper_max_wait_ms=20.0, lazy_models=False)
    return Settings(_env_file=None, **{**values, **overrides})


@pytest.fixture(scope="module")
def recognizer(tiny_model) -> WhisperRecognizer:
    r = WhisperRecognizer(settings(tiny_model))
    yield r
    r.close()


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return read_wav(SAMPLE_WAV)


def regions(sample: np.ndarray) -> list[np.ndarray]:
    return [sample[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in TURNS]


def as_tuples(words) -> list[tuple[str, float, float, float]]:
    return [(w.text, w.start, w.end, w.confidence) for w in words]


def test_loads_a_local_directory(tiny_model, tmp_path):
    r = WhisperRecognizer(settings(tiny_model))
    try:
        assert r.status == "ready" and r.device == "cpu" and r.compute_type == "float32"
    finally:
        r.close()
    lazy = WhisperRecognizer(settings(tiny_model, lazy_models=True))
    try:
        assert lazy.status == "lazy"  # loads with its first batch
    finally:
        lazy.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no model.bin"):
        WhisperRecognizer(settings(empty))
    with pytest.raises(ValueError, match="not found"):
        WhisperRecognizer(settings(tmp_path / "missing" / "dir"))


def test_compute_type_auto_is_int8_on_cpu(tiny_model):
    r = WhisperRecognizer(settings(tiny_model, whisper_compute_type="auto"))
    try:
        assert r.compute_type == "int8"
        words = r.transcribe_batch([RegionItem(np.zeros(SAMPLE_RATE, np.float32), "en")])[0]
        assert isinstance(words, list)
    finally:
        r.close()


def test_loads_a_hugging_face_id_from_the_hub_cache_offline(tiny_model, tmp_path, monkeypatch, sample):
    """MODEL_CACHE_DIR laid out as the hub lays out a download (refs/main → snapshots/<commit>): with
    HF_HUB_OFFLINE=1 the id resolves there and nothing is fetched; an id not in the cache fails with its name."""
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--faster-whisper-tiny-random"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = WhisperRecognizer(settings("tiny-org/faster-whisper-tiny-random", model_cache_dir=cache,
                                   huggingface_token="hf_secret_token_value"))
    try:
        audio = regions(sample)[1]
        local = WhisperRecognizer(settings(tiny_model))
        try:
            assert as_tuples(r.transcribe_batch([RegionItem(audio, "en")])[0]) == as_tuples(
                local.transcribe_batch([RegionItem(audio, "en")])[0])
        finally:
            local.close()
    finally:
        r.close()
    with pytest.raises(RuntimeError, match="tiny-org/not-in-cache") as err:
        WhisperRecognizer(settings("tiny-org/not-in-cache", model_cache_dir=cache,
                                   huggingface_token="hf_secret_token_value"))
    assert "hf_secret_token_value" not in str(err.value)


def test_batched_regions_get_the_words_they_get_alone(recognizer, sample):
    items = [RegionItem(a, "en") for a in regions(sample)]
    alone = [recognizer.transcribe_batch([item])[0] for item in items]
    batched = recognizer.transcribe_batch(items)
    reversed_batch = recognizer.transcribe_batch(items[::-1])[::-1]
    for k, (one, many, rev) in enumerate(zip(alone, batched, reversed_batch, strict=True)):
        assert as_tuples(one) == as_tuples(many) == as_tuples(rev), k
        duration = len(items[k].audio) / SAMPLE_RATE
        assert one, f"region {k} gave no words"
        assert all(0.0 <= w.start <= w.end <= duration + 1e-6 for w in one), (k, as_tuples(one))
    # the model's output depends on the audio: a batch that mixed items up would not pass the check above
    assert len({tuple(w.text for w in words) for words in alone}) > 1 or len(
        {tuple(w.end for w in words) for words in alone}) > 1


async def test_streams_share_batches(tiny_model, sample):
    """Regions submitted by different sessions at once are decoded in one model call, each with its own words."""
    r = WhisperRecognizer(settings(tiny_model, whisper_max_wait_ms=500.0))
    try:
        audios = regions(sample)[:4]
        alone = [r.transcribe_batch([RegionItem(a, "en")])[0] for a in audios]
        together = await asyncio.gather(*(r.transcribe(a, "en") for a in audios))
        assert [as_tuples(w) for w in together] == [as_tuples(w) for w in alone]
        stats = r.stats()
        assert stats["items"] == 4 and stats["batches"] == 1, stats
    finally:
        r.close()


async def test_long_region_is_cut_into_30_s_windows(recognizer, sample):
    audio = sample[int(2 * SAMPLE_RATE) : int(37 * SAMPLE_RATE)]  # 35 s: a 30 s window and a 5 s one
    words = await recognizer.transcribe(audio, "en")
    first, second = recognizer.transcribe_batch([RegionItem(audio[: 30 * SAMPLE_RATE], "en"),
                                                 RegionItem(audio[30 * SAMPLE_RATE :], "en")])
    expected = as_tuples(first) + [(t, s + 30, e + 30, c) for t, s, e, c in as_tuples(second)]
    assert as_tuples(words) == pytest.approx(expected)


async def test_session_delivers_in_region_order_on_the_sent_clock(recognizer, sample):
    got: list[Transcript] = []

    async def on_transcript(t: Transcript) -> None:
        got.append(t)

    audios = regions(sample)[:4]
    session = WhisperSession(on_transcript, recognizer, "en-US")
    await session.start()
    sent = 0
    starts = []
    for audio in audios:
        pcm = to_int16(audio)
        starts.append(sent / SAMPLE_RATE)
        for i in range(0, len(pcm), 1600):  # 100 ms sends, as the pipeline does
            await session.send(pcm[i : i + 1600])
        sent += len(pcm)
        await session.finalize()
    await session.close()
    assert len(got) == len(audios) and all(t.is_final and t.speech_final for t in got)
    for k, (t, audio, start) in enumerate(zip(got, audios, starts, strict=True)):
        pcm_audio = to_int16(audio).astype(np.float32) / 32768.0  # what the session decodes
        alone = recognizer.transcribe_batch([RegionItem(pcm_audio, "en")])[0]
        assert [(w.text, w.start, w.end) for w in t.words] == pytest.approx(
            [(w.text, w.start + start, w.end + start) for w in alone]), k


def test_language_parameter():
    assert whisper_language("en") == "en" and whisper_language("en-US") == "en" and whisper_language("de") == "de"
    assert whisper_language("multi") is None and whisper_language("xx") is None


async def test_server_streams_sample_through_whisper(tiny_model, tmp_path, sample):
    server = start_server(tmp_path, {"STT_BACKEND": "whisper", "WHISPER_MODEL": str(tiny_model),
                                     "MODEL_DEVICE": "cpu", "WHISPER_COMPUTE_TYPE": "float32",
                                     "WHISPER_CPU_THREADS": "1"})
    try:
        ready = __import__("httpx").get(f"{server.http}/ready", timeout=10).json()
        assert ready["stt"] == "whisper" and ready["models"]["stt"] == "ready", ready
        frames = pcm16_frames(sample) + silence_frames(1.5)
        # The live VAD makes two regions of sample.wav: the first "Hello?" (6.5-7.5 s) and 8.2-30.4 s (its pauses
        # are shorter than the hangover). The random model gives each a word or a few anywhere inside it, so a
        # segment starting after 8 s means the last region has been transcribed.
        result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000&language=en", frames,
                                     until=lambda r: any(s["start"] > 8.0 for s in r.segments.values()))
    finally:
        stop_server(server)
    assert not result.errors(), result.errors()
    segments = result.ordered()
    assert segments, result.events
    assert all(s["text"].strip() for s in segments)
    assert segments[0]["end"] < 8.0 < segments[-1]["start"], segments  # words of both regions
    for s in segments:  # sample.rttm: speech from 6.69 s to 30.0 s; the VAD pads regions by up to 0.5 s
        assert 6.69 - 0.6 <= s["start"] < s["end"] <= 30.0 + 0.6, s
