"""MODEL_POOL=ray on a real local Ray instance (one per module: num_cpus=2, no dashboard): the VAD and speaker models
in Ray Serve deployments (streaming/ray_deployments.py) give the same results as the in-process pool on real audio
(sample.wav), and a real server process with MODEL_POOL=ray streams sample.wav into transcript segments with its
VAD and speaker calls going through the deployments (their replicas count them)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -r requirements-ray.txt)")

from conftest import SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, start_server, stream_frames  # noqa: E402
from server_process import stop_server  # noqa: E402

from config import Settings  # noqa: E402
from streaming import ray_deployments as rd  # noqa: E402
from streaming.pool import BATCH, LIVE, ModelPool, PoolSaturated, create_pool  # noqa: E402
from streaming.ray_pool import RayModelPool  # noqa: E402
from streaming.vad import SileroVad, StreamingVAD, VadParams  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with the model apps deployed, for the whole module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="omi",
             runtime_env={"env_vars": {"PYTHONPATH": rd.REPO_ROOT}})
    try:
        rd.deploy(Settings(model_device="cpu"))
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return read_wav(SAMPLE_WAV)


class _Job:
    """A `VadJob`: one stream's next audio through its own `StreamingVAD`; resolves to the probabilities."""

    def __init__(self, vad: StreamingVAD, audio: np.ndarray) -> None:
        self.vad, self.audio = vad, audio

    def prepare(self):
        return self.vad, self.vad.take(self.audio)

    def complete(self, probs: np.ndarray) -> np.ndarray:
        self.vad.decide(probs)
        return np.asarray(probs)


async def _stream_probs(pool: ModelPool, backend: SileroVad, audio: np.ndarray, step: int) -> np.ndarray:
    vad = StreamingVAD(backend, VadParams.from_settings(Settings()))
    out = [await pool.run_vad(_Job(vad, audio[i : i + step])) for i in range(0, len(audio), step)]
    return np.concatenate(out)


async def _through(pool: ModelPool, backend: SileroVad, sample: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    # 14 streams at once (the batched steps cross SileroVad.TORCH_MIN_STREAMS), each 8 s of sample.wav from its own
    # offset, fed in steps of 20 to 200 ms (several frames per job, a frame's remainder carried over)
    streams = [sample[16000 * k : 16000 * (k + 8)] for k in range(14)]
    probs = await asyncio.gather(*(_stream_probs(pool, backend, s, 320 * (1 + k % 10)) for k, s in enumerate(streams)))
    clips = [sample[int(16000 * t) : int(16000 * (t + d))] for t, d in ((7.0, 1.5), (12.0, 3.0), (20.0, 2.2))]
    live = await pool.embed_many(clips, LIVE)
    bulk = await pool.embed_many(clips, BATCH)
    np.testing.assert_allclose(live, bulk, atol=1e-5)
    return list(probs), live


async def test_ray_pool_gives_the_in_process_results(ray_cluster, sample):
    settings = Settings(model_device="cpu", model_pool="ray", ray_address=ray_cluster)
    backend = SileroVad()
    backend.warm_up()
    local = await ModelPool.create(Settings(model_device="cpu"), vad_backend=backend)
    try:
        local_probs, local_emb = await _through(local, backend, sample)
    finally:
        await local.close()
    pool = await create_pool(settings, vad_backend=backend)
    assert isinstance(pool, RayModelPool)
    try:
        before = await asyncio.to_thread(pool.ray_stats)
        ray_probs, ray_emb = await _through(pool, backend, sample)
        after = await asyncio.to_thread(pool.ray_stats)
        assert pool.embedder_name == "resemblyzer" and pool.embedding_dim == 256
        assert pool.model_status() == {"speaker": "ready", "vad": "ready"}
        stats = pool.stats()
    finally:
        await pool.close()
    for a, b in zip(local_probs, ray_probs, strict=True):
        assert a.shape == b.shape == (8 * 16000 // 512,)
        np.testing.assert_allclose(a, b, atol=1e-4)
    cosine = np.sum(local_emb * ray_emb, axis=1)
    assert (cosine > 0.999).all(), cosine
    # the work went through the replicas, batched on this side: far fewer calls than windows
    windows = sum(len(p) for p in ray_probs)
    vad_calls = after["vad"]["calls"] - before["vad"]["calls"]
    assert 0 < vad_calls == stats["vad"]["batches"] < windows / 4
    assert after["speaker"]["calls"] - before["speaker"]["calls"] == stats["speaker"]["batches"] + \
        stats["speaker_batch"]["batches"]


async def test_ray_pool_refuses_when_its_queue_is_full(ray_cluster, sample):
    """Back-pressure as in process: the local queue in front of the deployment is bounded."""
    settings = Settings(model_device="cpu", model_pool="ray", ray_address=ray_cluster, pool_queue_size=4)
    pool = await create_pool(settings, vad_backend=SileroVad())
    try:
        clip = sample[100000:124000]
        outcomes = await asyncio.gather(*(pool.embed_many([clip]) for _ in range(12)), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, PoolSaturated)]
        served = [o for o in outcomes if isinstance(o, np.ndarray)]
        assert refused and served and len(refused) + len(served) == 12, outcomes
        with pytest.raises(ValueError, match="shorter"):  # checked here: a bad clip fails its own request
            await pool.embed_many([sample[:100]])
        assert len(await pool.embed_many([sample[100000:124000]])) == 1  # and the pool goes on
    finally:
        await pool.close()


async def test_server_with_ray_pool_streams_sample(ray_cluster, sample, tmp_path):
    vad, embed = rd.handles()
    before = (await vad.info.remote())["calls"]
    server = await asyncio.to_thread(start_server, tmp_path, MODEL_POOL="ray", RAY_ADDRESS=ray_cluster,
                                     MODEL_DEVICE="cpu")
    try:
        frames = pcm16_frames(sample) + silence_frames(1.5)
        result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                     until=lambda r: any(s["end"] > 27.0 for s in r.segments.values()))
        import httpx

        async with httpx.AsyncClient() as client:
            ready = (await client.get(f"{server.http}/ready")).json()
    finally:
        await asyncio.to_thread(stop_server, server)
    segments = result.ordered()
    assert segments, (result.events, server.log_tail())
    assert len(" ".join(s["text"] for s in segments).split()) >= 40
    assert ready["models"]["speaker"] == "ready" and ready["pool"]["vad"]["batches"] > 0
    assert (await vad.info.remote())["calls"] - before >= ready["pool"]["vad"]["batches"]
