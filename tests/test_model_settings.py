"""MODEL_CACHE_DIR and LAZY_MODELS (the migration guide's "models are cached under ./pretrained_models/ and loaded
lazily on first use").

No network: Hugging Face ids resolve against a hub cache the test lays out itself (refs/main → snapshots/<commit>/,
as `huggingface_hub` writes it) under a temporary MODEL_CACHE_DIR, with the hub offline and its default cache pointed
at an empty directory, so a loader that ignored MODEL_CACHE_DIR would not find them. The models are the small ones
tests/test_vad_pyannote.py and tests/test_speaker_backends.py build.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

os.environ["PYANNOTE_METRICS_ENABLED"] = "false"  # before pyannote is imported anywhere: no telemetry
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the project root, for `.venv/bin/pytest` as is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import pytest
from conftest import SAMPLE_WAV, read_wav, start_server, stop_server
from test_speaker_backends import SMALL_ECAPA_YAML, build_small_ecapa
from test_vad_pyannote import _small_pyannet

from config import Settings
from streaming.file_vad import speech_regions
from streaming.model_source import redactor
from streaming.pool import ModelPool
from streaming.speaker import SpeechBrainEmbedder, load_embedder
from streaming.vad import (
    BatchVadParams,
    LazyVadBackend,
    PyannoteVad,
    SileroVad,
    StreamingVAD,
    VadParams,
    load_vad_backend,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SEGMENTATION_ID = "acme/tiny-segmentation"
ECAPA_ID = "acme/tiny-ecapa"


def fake_hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A model repo as `huggingface_hub` caches it (a snapshot per commit, refs/main naming the commit): its
    snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    return snapshot


@pytest.fixture
def hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The hub offline, its default cache an empty directory: only MODEL_CACHE_DIR can hold a model."""
    import huggingface_hub.constants

    default = tmp_path / "default-hf-cache"
    default.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(default))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(default))
    return default


def save_segmentation(path: Path):
    """A lightning checkpoint of a small powerset PyanNet (what `Model.from_pretrained` loads); returns the model."""
    import lightning

    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    model = _small_pyannet()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return model


@pytest.fixture(scope="module")
def segmentation_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segmentation") / "pytorch_model.bin"
    save_segmentation(path)
    return path


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return read_wav(SAMPLE_WAV)


# --- MODEL_CACHE_DIR ------------------------------------------------------------------------------------------------


def test_pyannote_hub_id_loads_from_model_cache_dir(tmp_path: Path, hub_offline: Path, segmentation_ckpt: Path,
                                                    sample: np.ndarray) -> None:
    cache = tmp_path / "pretrained"
    fake_hub_repo(cache, SEGMENTATION_ID, {"pytorch_model.bin": segmentation_ckpt})
    settings = Settings(_env_file=None, vad_backend="pyannote", pyannote_segmentation=SEGMENTATION_ID,
                        model_cache_dir=cache, model_device="cpu", huggingface_token="hf_NotARealToken000")
    backend = load_vad_backend(settings)
    assert isinstance(backend, PyannoteVad)
    local = PyannoteVad.load(str(segmentation_ckpt), device="cpu")  # the same checkpoint, loaded where it is
    audio = sample[: 4 * PyannoteVad.chunk_samples]
    np.testing.assert_array_equal(backend.speech_probs(backend.new_state(), audio),
                                  local.speech_probs(local.new_state(), audio))
    assert not any(hub_offline.iterdir())  # nothing went to the hub's default cache
    # A revision pin resolves in the same cache; without MODEL_CACHE_DIR's copy the id is not found anywhere.
    pinned = PyannoteVad.load(f"{SEGMENTATION_ID}@{COMMIT}", device="cpu", cache_dir=cache)
    assert pinned.window == backend.window
    with pytest.raises(RuntimeError, match=SEGMENTATION_ID):
        PyannoteVad.load(SEGMENTATION_ID, device="cpu", cache_dir=tmp_path / "elsewhere")


def test_pyannote_relative_model_cache_dir(tmp_path: Path, hub_offline: Path, segmentation_ckpt: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The default MODEL_CACHE_DIR is relative ("pretrained_models"): it is found from the working directory."""
    fake_hub_repo(tmp_path / "pretrained_models", SEGMENTATION_ID, {"pytorch_model.bin": segmentation_ckpt})
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None, vad_backend="pyannote", pyannote_segmentation=SEGMENTATION_ID,
                        model_device="cpu")
    assert settings.model_cache_dir == Path("pretrained_models")
    assert isinstance(load_vad_backend(settings), PyannoteVad)


def test_speechbrain_hub_id_downloads_into_model_cache_dir(tmp_path: Path, hub_offline: Path,
                                                          sample: np.ndarray) -> None:
    source = tmp_path / "built"
    saved = build_small_ecapa(source)
    # The hub repo's hyperparams.yaml points `pretrained_path` at the repo itself, as speechbrain's own repos do.
    yaml = source / "hyperparams.yaml"
    yaml.write_text(SMALL_ECAPA_YAML.replace("speechbrain/spkrec-ecapa-voxceleb", ECAPA_ID), encoding="utf-8")
    cache = tmp_path / "pretrained"
    snapshot = fake_hub_repo(cache, ECAPA_ID, {p.name: p for p in source.iterdir()})
    shutil.rmtree(source)  # only the cache holds it now
    token = "hf_SecretTokenThatMustNotLeak456"
    settings = Settings(_env_file=None, speaker_backend="speechbrain", speechbrain_model=ECAPA_ID,
                        model_cache_dir=cache, data_dir=tmp_path / "data", model_device="cpu",
                        huggingface_token=token)
    embedder = load_embedder(settings)
    assert isinstance(embedder, SpeechBrainEmbedder) and embedder.name == f"speechbrain:{ECAPA_ID}"
    loaded = embedder._model.mods.embedding_model.state_dict()
    for key, value in saved.items():
        assert np.array_equal(loaded[key].cpu().numpy(), value.numpy()), key
    # SpeechBrain's savedir: MODEL_CACHE_DIR/speechbrain/<id>, its files links into the hub cache beside it.
    savedir = cache / "speechbrain" / "acme--tiny-ecapa"
    for name in ("hyperparams.yaml", "embedding_model.ckpt", "mean_var_norm_emb.ckpt"):
        assert (savedir / name).resolve() == (snapshot / name).resolve(), name
    assert not (tmp_path / "data").exists() and not any(hub_offline.iterdir())
    assert embedder.embed_batch([sample[7 * 16000 : 9 * 16000]]).shape == (1, 32)

    # Not in MODEL_CACHE_DIR: a clear error that names the source, never the token.
    with pytest.raises(RuntimeError) as info:
        load_embedder(settings.model_copy(update={"model_cache_dir": tmp_path / "elsewhere"}))
    assert ECAPA_ID in str(info.value) and token not in str(info.value) and token not in repr(info.value.__cause__)


def test_local_models_never_touch_model_cache_dir_for_pyannote(tmp_path: Path, segmentation_ckpt: Path) -> None:
    """A local checkpoint is loaded where it is: nothing is written to MODEL_CACHE_DIR."""
    cache = tmp_path / "pretrained"
    settings = Settings(_env_file=None, vad_backend="pyannote", pyannote_segmentation=str(segmentation_ckpt),
                        model_cache_dir=cache, model_device="cpu")
    assert isinstance(load_vad_backend(settings), PyannoteVad)
    assert not cache.exists()


# --- LAZY_MODELS: the VAD backend ---------------------------------------------------------------------------------


def test_lazy_vad_backend_loads_on_first_use(tmp_path: Path, segmentation_ckpt: Path, sample: np.ndarray) -> None:
    settings = Settings(_env_file=None, vad_backend="pyannote", pyannote_segmentation=str(segmentation_ckpt),
                        model_device="cpu", lazy_models=True)
    lazy = load_vad_backend(settings)
    assert isinstance(lazy, LazyVadBackend) and not lazy.loaded and lazy.status == "lazy"
    lazy.warm_up()  # what the lifespan calls: nothing is loaded yet
    assert not lazy.loaded
    assert (lazy.name, lazy.frame_samples, lazy.chunk_samples) == ("pyannote", 160, 8000)
    stream = StreamingVAD(lazy, VadParams())  # a stream opens before the model is there
    assert not lazy.loaded

    eager = PyannoteVad.load(str(segmentation_ckpt), device="cpu")
    audio = sample[: 6 * PyannoteVad.chunk_samples]
    want = eager.speech_probs(eager.new_state(), audio)
    model_in = stream.take(audio)
    got = lazy.speech_probs_batch([stream.state], [model_in])[0]  # the first call loads it (any thread)
    assert lazy.loaded and lazy.status == "ready"
    np.testing.assert_array_equal(got, want)
    # the stream's state went on: the next chunk equals the eager backend's continuation
    eager_state = eager.new_state()
    eager.speech_probs(eager_state, audio)
    more = sample[len(audio) : len(audio) + PyannoteVad.chunk_samples]
    np.testing.assert_array_equal(lazy.speech_probs(stream.state, more), eager.speech_probs(eager_state, more))


def test_lazy_vad_backend_loads_once_across_threads(sample: np.ndarray) -> None:
    loads = []

    def load() -> SileroVad:
        loads.append(threading.get_ident())
        time.sleep(0.2)
        return SileroVad()

    lazy = LazyVadBackend("silero", load)
    audio = sample[6 * 16000 :][: 60 * 512]
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(lazy.speech_probs(lazy.new_state(), audio)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(results) == 4
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_lazy_vad_backend_failed_load_is_not_retried_at_once() -> None:
    attempts = []
    token = "hf_SecretTokenThatMustNotLeak789"

    def load() -> SileroVad:
        attempts.append(1)
        if len(attempts) == 1:  # an error text that echoes the token (hubs do)
            raise RuntimeError(f"could not load 'x/y': no network, token {token} unused")
        return SileroVad()

    lazy = LazyVadBackend("silero", load, scrub=redactor(token))
    with pytest.raises(RuntimeError, match="no network"):
        lazy.speech_probs(lazy.new_state(), np.zeros(512, np.float32))
    assert lazy.status == "failed: could not load 'x/y': no network, token *** unused"
    with pytest.raises(RuntimeError, match="not available.*no network") as info:  # at once, no second attempt
        lazy.speech_probs(lazy.new_state(), np.zeros(512, np.float32))
    assert len(attempts) == 1 and token not in str(info.value)
    lazy.retry_after_s = 0.0
    assert lazy.status == "lazy, last load failed: could not load 'x/y': no network, token *** unused"
    assert lazy.speech_probs(lazy.new_state(), np.zeros(512, np.float32)).shape == (1,)  # the next use retries
    assert len(attempts) == 2 and lazy.status == "ready"


# --- LAZY_MODELS: the speaker embedder ------------------------------------------------------------------------------


async def test_lazy_pool_knows_the_embedder_name_before_loading(tmp_path: Path) -> None:
    """Profiles are matched by the embedder's name; a lazy pool must give the loaded model's name before the first
    embedding (else a stream opened before it would ignore every enrolled profile)."""
    model_dir = tmp_path / "small-ecapa"
    build_small_ecapa(model_dir)
    settings = Settings(_env_file=None, speaker_backend="speechbrain", speechbrain_model=str(model_dir),
                        model_cache_dir=tmp_path / "models", model_device="cpu", lazy_models=True)
    pool = await ModelPool.create(settings)
    try:
        assert not pool.loaded and pool.model_status() == {"speaker": "lazy"}
        before = pool.embedder_name
        assert before == "speechbrain:small-ecapa"
        await pool.embed(np.full(16000, 1e-2, np.float32))
        assert pool.loaded and pool.embedder_name == before and pool.model_status() == {"speaker": "ready"}
    finally:
        await pool.close()


async def test_lazy_pool_failed_load_fails_fast_then_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None, speaker_backend="speechbrain", speechbrain_model=str(tmp_path / "missing"),
                        model_cache_dir=tmp_path / "models", model_device="cpu", lazy_models=True)
    pool = await ModelPool.create(settings)
    try:
        with pytest.raises(ValueError, match="not found"):
            await pool.embed(np.ones(16000, np.float32))
        assert pool.model_status()["speaker"].startswith("failed: ") and pool.models_failed
        calls = []
        monkeypatch.setattr("streaming.speaker.load_embedder", lambda s: calls.append(s))
        with pytest.raises(RuntimeError, match="not available"):
            await pool.embed(np.ones(16000, np.float32))
        assert not calls  # no second attempt within LOAD_RETRY_AFTER_S
        monkeypatch.setattr(pool, "LOAD_RETRY_AFTER_S", 0.0)
        assert pool.model_status()["speaker"].startswith("lazy, last load failed: ") and not pool.models_failed
        with pytest.raises(AttributeError):  # the next use retries (the stand-in loader returns None)
            await pool.embed(np.ones(16000, np.float32))
        assert len(calls) == 1
    finally:
        await pool.close()


# --- LAZY_MODELS: a real server --------------------------------------------------------------------------------------


async def test_lazy_server_loads_on_first_use(tmp_path: Path, sample: np.ndarray) -> None:
    from test_server_local import test_pcm16_stream_gives_segments

    cache = tmp_path / "pretrained"
    started = time.monotonic()
    server = start_server(tmp_path, LAZY_MODELS="true", MODEL_CACHE_DIR=str(cache))
    try:
        startup_s = time.monotonic() - started
        assert httpx.get(f"{server.http}/health", timeout=5).json() == {"status": "ok"}
        ready = httpx.get(f"{server.http}/ready", timeout=5)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        # /ready tells what is loaded: nothing yet (it loads on first use)
        assert body["pool"]["models"] == {"speaker": "lazy", "vad": "lazy"}, body
        assert body["vad"] == "silero" and body["speaker"] == "resemblyzer" and not body["pool"]["loaded"]

        # The first /v1/vad loads the VAD and answers as the eager in-process code does.
        expected = speech_regions(SileroVad(), sample, BatchVadParams.from_settings(Settings(_env_file=None)))
        r = httpx.post(f"{server.http}/v1/vad", files={"file": ("sample.wav", SAMPLE_WAV.read_bytes(), "audio/wav")},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json() == expected and expected
        assert httpx.get(f"{server.http}/ready", timeout=5).json()["pool"]["models"]["vad"] == "ready"

        # The first stream, checked as on the eager server (the same transcript as an offline run of the same VAD
        # and recogniser); its speaker tagging loads the embedder.
        await test_pcm16_stream_gives_segments(server, sample)
        models = httpx.get(f"{server.http}/ready", timeout=5).json()["pool"]["models"]
        assert models == {"speaker": "ready", "vad": "ready"}, models
        log = server.log()
        assert "VAD backend silero loaded on first use" in log
    finally:
        stop_server(server)
    print(f"lazy server ready in {startup_s:.1f} s")
