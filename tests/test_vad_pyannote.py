"""The pyannote VAD backend with its real loader, on a small untrained segmentation model the test builds and saves.

No weights are downloaded: the checkpoint is a tiny `PyanNet` with segmentation-3.0's powerset specification (3
speakers, at most 2 at once), saved by a lightning `Trainer` in the format `Model.from_pretrained` loads. An untrained
model's decisions are meaningless, so nothing here asserts on quality: only on shapes, ranges, determinism, streaming
equals batch, stream isolation and the loader's errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["PYANNOTE_METRICS_ENABLED"] = "false"  # before pyannote is imported anywhere: no telemetry
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the project root, for `.venv/bin/pytest` as is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shutil
import time

import numpy as np
import pytest
import soundfile as sf

from config import Settings
from streaming.vad import (
    BatchVadParams,
    PyannoteVad,
    SpeechAudio,
    SpeechEnd,
    SpeechStart,
    StreamingVAD,
    VadParams,
    batch_regions,
    load_vad_backend,
)
from streaming.vad_batch import speech_probabilities

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sample.wav"
WINDOW_S = 5.0  # model duration: the streaming window (segmentation-3.0 uses 10 s)
CHUNK = PyannoteVad.chunk_samples


def _small_pyannet(problem: str = "powerset"):
    import torch
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.segmentation import PyanNet

    torch.manual_seed(0)
    model = PyanNet(lstm={"hidden_size": 16, "num_layers": 1}, linear={"hidden_size": 16, "num_layers": 1})
    classes = ["speaker#1", "speaker#2", "speaker#3"]
    if problem == "powerset":  # like pyannote/segmentation-3.0
        specs = Specifications(
            problem=Problem.MONO_LABEL_CLASSIFICATION,
            resolution=Resolution.FRAME,
            duration=WINDOW_S,
            classes=classes,
            powerset_max_classes=2,
            permutation_invariant=True,
        )
    else:  # like pyannote/segmentation (2.x)
        specs = Specifications(
            problem=Problem.MULTI_LABEL_CLASSIFICATION,
            resolution=Resolution.FRAME,
            duration=WINDOW_S,
            classes=classes,
            permutation_invariant=True,
        )
    model.specifications = specs
    model.build()  # adds the classifier and activation the specification asks for
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lightning checkpoint as training writes it (state_dict, hyper_parameters, and the "pyannote.audio" entry
    `Model.on_save_checkpoint` adds: versions, architecture, specifications)."""
    import lightning

    root = tmp_path_factory.mktemp("pyannote")
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.strategy.connect(_small_pyannet())
    path = root / "segmentation.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def vad(checkpoint: Path) -> PyannoteVad:
    return PyannoteVad.load(str(checkpoint), token=None, device="cpu")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio, rate = sf.read(SAMPLE, dtype="float32", frames=10 * 16000)
    assert rate == 16000
    return audio


def test_load_file_and_directory(vad: PyannoteVad, checkpoint: Path, tmp_path: Path, speech: np.ndarray) -> None:
    assert isinstance(vad, PyannoteVad)
    assert (vad.frame_samples, vad.chunk_samples, vad.window) == (160, 8000, int(WINDOW_S * 16000))
    # a directory holding pytorch_model.bin (the Hugging Face layout) is the same checkpoint under another name
    shutil.copy(checkpoint, tmp_path / "pytorch_model.bin")
    from_dir = PyannoteVad.load(str(tmp_path), token=None, device="cpu")
    audio = speech[: 4 * CHUNK]
    np.testing.assert_array_equal(
        vad.speech_probs(vad.new_state(), audio), from_dir.speech_probs(from_dir.new_state(), audio)
    )


def test_shape_range_deterministic(vad: PyannoteVad, speech: np.ndarray) -> None:
    audio = speech[: 6 * CHUNK]
    probs = vad.speech_probs(vad.new_state(), audio)
    assert probs.dtype == np.float32
    assert probs.shape == (len(audio) // 160,)
    assert np.all((probs >= 0) & (probs <= 1))
    assert probs.std() > 0  # not a constant: the audio reaches the model
    np.testing.assert_array_equal(probs, vad.speech_probs(vad.new_state(), audio))
    assert vad.speech_probs(vad.new_state(), np.zeros(0, np.float32)).shape == (0,)
    with pytest.raises(ValueError):
        vad.speech_probs(vad.new_state(), audio[:1000])


def test_matches_the_model_on_the_window(vad: PyannoteVad, speech: np.ndarray) -> None:
    """Reference: run the model on the zero-padded window, 1 - P(no speaker), interpolated at 10 ms centres."""
    import torch

    model = vad._model
    window = np.zeros(vad.window, np.float32)
    window[-CHUNK:] = speech[:CHUNK]
    with torch.inference_mode():
        log_probs = model(torch.from_numpy(window)[None, None])[0].numpy()
    ref = 1 - np.exp(log_probs[:, 0])  # class 0 of the powerset is the empty set
    rf = model.receptive_field
    centres = (rf.start + rf.step * np.arange(len(ref)) + rf.duration / 2) * 16000
    targets = vad.window - CHUNK + np.arange(50) * 160 + 80
    probs = vad.speech_probs(vad.new_state(), speech[:CHUNK])
    np.testing.assert_allclose(probs, np.interp(targets, centres, ref), atol=1e-5)


def test_multilabel_model(speech: np.ndarray) -> None:
    import torch

    model = _small_pyannet("multilabel")
    vad = PyannoteVad(model, device="cpu")
    probs = vad.speech_probs(vad.new_state(), speech[: vad.window])  # exactly one full window: last chunk = its end
    window = torch.from_numpy(speech[: vad.window])[None, None]
    with torch.inference_mode():
        ref = model(window)[0].numpy().max(axis=1)  # sigmoid activations, max over speakers
    last = probs[-50:]
    assert np.all((probs >= 0) & (probs <= 1))
    assert ref[-40:].min() - 1e-6 <= last.min() and last.max() <= ref[-40:].max() + 1e-6


def test_streaming_equals_batch(vad: PyannoteVad, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad, "max_batch", 8)  # 20 chunks: several forward passes, the last one partial
    whole = vad.speech_probs(vad.new_state(), speech)
    state = vad.new_state()
    streamed = np.concatenate([vad.speech_probs(state, speech[i : i + CHUNK]) for i in range(0, len(speech), CHUNK)])
    assert whole.shape == streamed.shape == (len(speech) // 160,)
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    # mixed call sizes too
    state = vad.new_state()
    mixed = np.concatenate(
        [vad.speech_probs(state, speech[a:b]) for a, b in ((0, CHUNK), (CHUNK, 7 * CHUNK), (7 * CHUNK, len(speech)))]
    )
    np.testing.assert_allclose(mixed, whole, atol=1e-5)


def test_streams_are_independent(vad: PyannoteVad, speech: np.ndarray) -> None:
    a, b = speech[: 5 * 16000], speech[5 * 16000 :][::-1].copy()
    alone_a = vad.speech_probs(vad.new_state(), a)
    alone_b = vad.speech_probs(vad.new_state(), b)
    sa, sb = vad.new_state(), vad.new_state()
    out_a, out_b = [], []
    for i in range(0, len(a), CHUNK):
        out_a.append(vad.speech_probs(sa, a[i : i + CHUNK]))
        out_b.append(vad.speech_probs(sb, b[i : i + CHUNK]))
    np.testing.assert_allclose(np.concatenate(out_a), alone_a, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(out_b), alone_b, atol=1e-5)
    assert not np.allclose(alone_a, alone_b)  # the two streams really differ


def test_streaming_vad_runs(vad: PyannoteVad, speech: np.ndarray) -> None:
    for params in (VadParams(), VadParams(onset=0.0, offset=0.0)):  # the second is always in speech
        stream = StreamingVAD(vad, params)
        events = []
        step = 4800  # 0.3 s pieces: not aligned with the 0.5 s chunks
        for i in range(0, len(speech), step):
            events += stream.process(speech[i : i + step])
        events += stream.flush()
        assert stream.position == len(speech)
        assert all(isinstance(ev, SpeechStart | SpeechAudio | SpeechEnd) for ev in events)
        starts = [ev for ev in events if isinstance(ev, SpeechStart)]
        ends = [ev for ev in events if isinstance(ev, SpeechEnd)]
        assert len(starts) == len(ends)
        for s, e in zip(starts, ends, strict=True):
            assert 0 <= s.sample < e.sample <= len(speech)
    assert starts and sum(len(ev.audio) for ev in events if isinstance(ev, SpeechAudio)) == len(speech)


def test_batch_vad_runs(vad: PyannoteVad, speech: np.ndarray) -> None:
    """/v1/vad's path on the pyannote backend (0.5 s chunks, 10 ms frames): pieces that cut its chunks give the
    probabilities of the whole signal, and the decision maps its frames back onto the signal's samples."""
    whole = speech_probabilities(vad, [speech])
    assert len(whole) == -(-len(speech) // CHUNK) * CHUNK // vad.frame_samples
    step = 4801  # not a multiple of the chunk or the frame
    pieces = speech_probabilities(vad, [speech[i : i + step] for i in range(0, len(speech), step)])
    np.testing.assert_allclose(pieces, whole, atol=1e-5)
    everything = BatchVadParams(onset=0.0, offset=0.0, min_speech_ms=0, min_silence_ms=0, pad_ms=0)
    assert batch_regions(vad, [speech], everything) == [(0, len(speech))]
    threshold = float(np.median(whole))  # an untrained model: about half its frames above, in many runs
    bare = BatchVadParams(onset=threshold, offset=threshold, min_speech_ms=0, min_silence_ms=0, pad_ms=0)
    regions = batch_regions(vad, [speech], bare)
    assert len(regions) > 1
    for s, e in regions:
        assert s % vad.frame_samples == 0 and whole[s // vad.frame_samples] >= threshold
        assert e == len(speech) or whole[e // vad.frame_samples] < threshold


def test_hub_id_offline_fails_fast_without_leaking_the_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # a cached copy must not be found
    token = "hf_SecretTokenThatMustNotLeak123"
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        PyannoteVad.load("pyannote/segmentation-3.0", token=token, device="cpu")
    assert time.monotonic() - started < 10
    assert "pyannote/segmentation-3.0" in str(err.value)
    assert token not in str(err.value) and token not in repr(err.value)
    out = capsys.readouterr()
    assert token not in out.out + out.err


def test_missing_local_checkpoint(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="not found"):
        PyannoteVad.load(missing, token=None, device="cpu")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        PyannoteVad.load(str(tmp_path), token=None, device="cpu")  # a directory without the checkpoint


def test_load_vad_backend(checkpoint: Path) -> None:
    settings = Settings(
        _env_file=None, vad_backend="pyannote", pyannote_segmentation=str(checkpoint), model_device="cpu"
    )
    backend = load_vad_backend(settings)
    assert isinstance(backend, PyannoteVad)
    assert backend.name == "pyannote"


def test_one_instance_serves_threads(vad: PyannoteVad, speech: np.ndarray) -> None:
    from concurrent.futures import ThreadPoolExecutor

    signals = [np.roll(speech, k * 16000) for k in range(4)]
    expected = [vad.speech_probs(vad.new_state(), x) for x in signals]

    def stream(x: np.ndarray) -> np.ndarray:
        state = vad.new_state()
        return np.concatenate([vad.speech_probs(state, x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, signals))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
