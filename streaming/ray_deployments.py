"""The model pool's models as Ray Serve deployments (MODEL_POOL=ray): one VAD deployment and one speaker embedding
deployment, each an application of its own, shared by every front-end process that connects to the same Ray
cluster (RAY_ADDRESS). `streaming.ray_pool.RayModelPool` calls them.

Each replica loads the backend the local pool would (`load_vad_backend`, `load_embedder`, the same settings) and
holds no per-stream state: a VAD request carries its streams' states and gets them back advanced (as
`VadBackend.speech_probs_batch` does in process). A request is already a batch: a front-end process gathers every
stream's frames (or clips) into one call (`BatchingWorker`, as the local pool does), and `@serve.batch` merges the
calls of several front-end processes into one model call. Calls are cheap but not free (bench/ray_overhead.py), so
the batching on the caller's side is what keeps the overhead per window small.

Deploy by hand onto a cluster: `python -m streaming.ray_deployments` (reads the same settings); the first front-end
process deploys them too when they are not running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from config import Settings

log = logging.getLogger(__name__)

VAD_APP = "omi-vad"
EMBED_APP = "omi-embedder"
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _model_thread(threads: int) -> ThreadPoolExecutor:
    """The one thread a replica runs its model in, with its torch thread count set in it (a thread that did not set
    it runs small batches several times slower: bench/embeddings.py). The replica's event loop stays free to gather
    the next batch meanwhile."""

    def init() -> None:
        try:
            import torch

            torch.set_num_threads(threads or torch.get_num_threads())
        except ImportError:
            pass

    return ThreadPoolExecutor(1, thread_name_prefix="model", initializer=init)


def pack_step(states: list[Any], arrays: list[np.ndarray]) -> tuple:
    """One VAD step for the wire: the audios concatenated, and the states as one stacked array per field when they
    are all of one class whose fields are same-shape arrays (silero's, pyannote's): pickling a few large arrays
    instead of hundreds of small objects made a 256-stream step's round trip 40 ms over in-process, mostly
    serialisation (bench/ray_overhead.py). Anything else goes as the objects themselves."""
    lengths = np.array([len(a) for a in arrays], np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
    cls = type(states[0]) if states else None
    fields = getattr(states[0], "__dict__", None) if states else None
    if fields and all(type(s) is cls for s in states) and all(isinstance(v, np.ndarray) for v in fields.values()):
        try:
            stacked = {k: np.stack([getattr(s, k) for s in states]) for k in fields}
            return "stacked", cls, stacked, flat, lengths
        except (ValueError, AttributeError):  # fields of different shapes or names: send the objects
            pass
    return "objects", states, None, flat, lengths


def unpack_step(packed: tuple) -> tuple[list[Any], list[np.ndarray]]:
    kind, what, stacked, flat, lengths = packed
    arrays = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
    if kind == "objects":
        return list(what), arrays
    states = []
    for i in range(len(lengths)):
        state = object.__new__(what)
        state.__dict__.update({k: v[i].copy() for k, v in stacked.items()})
        states.append(state)
    return states, arrays


@serve.deployment(name="vad")
class VadDeployment:
    """`speech_probs_batch` for many streams of many front-end processes. A request: one process's gathered streams,
    their states and model inputs (`pack_step`); the reply: their probabilities and advanced states, packed alike."""

    def __init__(self, settings: Settings) -> None:
        from streaming.vad_loading import load_vad_backend

        self._backend = load_vad_backend(settings)
        self._backend.warm_up()
        self._thread = _model_thread(settings.torch_threads)
        self.score.set_max_batch_size(settings.ray_max_batch)
        self.score.set_batch_wait_timeout_s(settings.ray_batch_wait_ms / 1000.0)
        self.calls = 0
        self.model_calls = 0

    def info(self) -> dict[str, Any]:
        return {"name": self._backend.name, "status": getattr(self._backend, "status", "ready"), "pid": os.getpid(),
                "calls": self.calls, "model_calls": self.model_calls}

    def _score(self, requests: list[tuple]) -> list[tuple]:  # the model thread
        unpacked = [unpack_step(r) for r in requests]
        states = [s for r_states, _ in unpacked for s in r_states]
        probs = self._backend.speech_probs_batch(states, [a for _, r_audios in unpacked for a in r_audios])
        out, i = [], 0
        for r_states, _ in unpacked:
            n = len(r_states)
            out.append(pack_step(states[i : i + n], probs[i : i + n]))
            i += n
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def score(self, requests: list[tuple]) -> list[tuple]:
        self.calls += len(requests)
        self.model_calls += 1
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._score, requests)


@serve.deployment(name="embedder")
class EmbedDeployment:
    """`SpeakerEmbedder.embed_batch` for the clips of many front-end processes. A request: one process's gathered
    clips (already checked there); the reply: their (n, dim) float32 unit-norm embeddings."""

    def __init__(self, settings: Settings) -> None:
        from streaming.speaker import load_embedder

        self._embedder = load_embedder(settings)
        self._embedder.warm_up()
        self._thread = _model_thread(settings.torch_threads)
        self.embed.set_max_batch_size(settings.ray_max_batch)
        self.embed.set_batch_wait_timeout_s(settings.ray_batch_wait_ms / 1000.0)
        self.calls = 0
        self.model_calls = 0

    def info(self) -> dict[str, Any]:
        e = self._embedder
        return {"name": e.name, "dim": e.dim, "min_samples": e.min_samples, "pid": os.getpid(), "calls": self.calls,
                "model_calls": self.model_calls}

    def _embed(self, requests: list[list[np.ndarray]]) -> list[np.ndarray]:  # the model thread
        out = self._embedder.embed_batch([c for r in requests for c in r])
        split, i = [], 0
        for r in requests:
            split.append(out[i : i + len(r)])
            i += len(r)
        return split

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def embed(self, requests: list[list[np.ndarray]]) -> list[np.ndarray]:
        self.calls += len(requests)
        self.model_calls += 1
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._embed, requests)


def gpu_per_replica(settings: Settings) -> float:
    """RAY_GPU_FRACTION when the models run on CUDA (MODEL_DEVICE, auto: a GPU torch sees here), else 0."""
    return settings.ray_gpu_fraction if settings.resolved_device() == "cuda" else 0.0


def _options(settings: Settings) -> dict[str, Any]:
    return {"num_replicas": settings.ray_replicas,
            "ray_actor_options": {"num_cpus": settings.ray_cpus_per_replica, "num_gpus": gpu_per_replica(settings)},
            # a front-end process has at most one call in flight per model (its BatchingWorker); room for many
            "max_ongoing_requests": max(64, 2 * settings.ray_max_batch)}


def connect(settings: Settings) -> str:
    """Blocking: joins RAY_ADDRESS's cluster, or starts a local Ray instance when it is empty (the models' replicas
    then run on this machine, in Ray's worker processes). Returns "local" when this call started a local instance
    (this process owns it), "joined" when it joined a cluster, "" when Ray was already initialised. The replicas import
    this repository's modules: a local instance gets it on PYTHONPATH; a cluster's nodes need it installed (the
    container image)."""
    import ray

    if ray.is_initialized():
        return ""
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "namespace": "omi",
                              "runtime_env": {"env_vars": {"PYTHONPATH": REPO_ROOT}}}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **kwargs)
        return "joined"
    ray.init(address="local", **kwargs)
    return "local"


def running_apps() -> set[str]:
    """The applications Serve is running (empty when Serve is not started)."""
    try:
        status = serve.status()
    except Exception:  # Serve not started on this cluster
        return set()
    return {name for name, app in status.applications.items() if str(app.status).endswith("RUNNING")}


def deploy(settings: Settings, force: bool = False) -> None:
    """Blocking: starts Serve (no HTTP proxy: the front-ends call through handles) and deploys the two model apps
    unless they already run (`force`: redeploy anyway, e.g. after changing RAY_REPLICAS)."""
    running = set() if force else running_apps()
    if running >= {VAD_APP, EMBED_APP}:
        return
    serve.start(proxy_location="Disabled")
    opts = _options(settings)
    targets = [serve.RunTarget(VadDeployment.options(**opts).bind(settings), name=VAD_APP, route_prefix=None),
               serve.RunTarget(EmbedDeployment.options(**opts).bind(settings), name=EMBED_APP, route_prefix=None)]
    serve.run_many([t for t in targets if force or t.name not in running])  # both load at once


def handles() -> tuple[Any, Any]:
    """(VAD handle, embedder handle) of the running apps."""
    return serve.get_app_handle(VAD_APP), serve.get_app_handle(EMBED_APP)


def main() -> None:
    from config import get_settings

    settings = get_settings()
    connect(settings)
    deploy(settings, force=True)
    vad, embed = handles()
    print("deployed:", vad.info.remote().result(), embed.info.remote().result())


if __name__ == "__main__":
    main()
