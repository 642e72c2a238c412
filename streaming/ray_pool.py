"""MODEL_POOL=ray: `RayModelPool`, the model pool whose models run in Ray Serve deployments
(streaming/ray_deployments.py) shared by every front-end process that connects to the same cluster (RAY_ADDRESS).

It is `ModelPool` with remote stand-ins for the two models, so everything the app relies on stays as it is: the
bounded queues and `PoolSaturated` (a stream is refused rather than queued without bound), the live and batch
lanes, the stats, `model_status`. Each `BatchingWorker` still gathers this process's requests into one batch (every
stream's frames of a step, every clip waiting), prepares them in its thread (the frames' decoding stays here, next to
the stream's decoder), and then makes one blocking handle call from that thread for the whole batch (never on the
event loop): one Ray call per batch, not per window, because a call costs ~1 ms of overhead
(bench/ray_overhead.py). `@serve.batch` in the replicas merges the calls of several front-end processes.

No per-stream state is shared: a VAD call carries its streams' states and brings them back advanced; they are
copied into the stream's own state object (`_adopt`), which nothing else touches while its job is out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from config import Settings
from streaming.embedders import SpeakerEmbedder
from streaming.pool import ModelPool
from streaming.ray_deployments import pack_step, unpack_step
from streaming.vad_backends import VadBackend

log = logging.getLogger(__name__)


def _adopt(local: Any, remote: Any) -> None:
    """Copies a state that came back from a replica into the stream's own state object, in place (the stream's
    `StreamingVAD` keeps that object). Plain objects and `__slots__` classes (a `LazyVadBackend`'s state)."""
    if hasattr(local, "__dict__"):
        local.__dict__.update(remote.__dict__)
    for cls in type(local).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot != "__dict__" and hasattr(remote, slot):
                setattr(local, slot, getattr(remote, slot))


class RemoteVadBackend(VadBackend):
    """The VAD deployment as a `VadBackend` for the pool's VAD worker: `speech_probs_batch` is one blocking call for
    all the streams of a step. `new_state` and the sizes are the local backend's (the streams make their states with
    it, and the replica loads the same backend from the same settings)."""

    def __init__(self, local: VadBackend, handle: Any, timeout_s: float) -> None:
        self._local = local
        self._handle = handle
        self._timeout_s = timeout_s
        self.name = local.name
        self.frame_samples = local.frame_samples
        self.chunk_samples = local.chunk_samples

    @property
    def status(self) -> str:
        return "ready"

    def new_state(self) -> Any:
        return self._local.new_state()

    def speech_probs(self, state: Any, audio: np.ndarray) -> np.ndarray:
        return self.speech_probs_batch([state], [audio])[0]

    def speech_probs_batch(self, states: list[Any], audios: list[np.ndarray]) -> list[np.ndarray]:
        if not states:
            return []
        reply = self._handle.score.remote(pack_step(states, audios)).result(timeout_s=self._timeout_s)
        advanced, probs = unpack_step(reply)
        for local, remote in zip(states, advanced, strict=True):
            _adopt(local, remote)
        return probs

    def warm_up(self) -> None:
        self.speech_probs_batch([self.new_state()], [np.zeros(self.chunk_samples, np.float32)])


class RemoteEmbedder(SpeakerEmbedder):
    """The embedding deployment as a `SpeakerEmbedder`: clips are checked here (one bad clip fails its own request,
    before any call), `embed_batch` is one blocking call for the worker's batch."""

    def __init__(self, info: dict[str, Any], handle: Any, timeout_s: float) -> None:
        self.name, self.dim, self.min_samples = info["name"], int(info["dim"]), int(info["min_samples"])
        self._handle = handle
        self._timeout_s = timeout_s

    def embed_batch(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        checked = self.check_clips(clips)
        if not checked:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._handle.embed.remote(checked).result(timeout_s=self._timeout_s), np.float32)

    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:  # embed_batch does it all
        raise NotImplementedError

    def warm_up(self) -> None:
        pass  # the replica warmed its model up when it loaded


class RayModelPool(ModelPool):
    """`ModelPool` on Ray Serve (see the module docstring). Same interface; `stats()` adds "ray"."""

    _ray = ""  # what `ray_deployments.connect` did: "local" (this process's own instance), "joined", or ""

    @classmethod
    async def create(cls, settings: Settings, embedder: Any | None = None, torch_threads: int | None = None,
                     vad_backend: VadBackend | None = None) -> RayModelPool:
        """Connects to RAY_ADDRESS (or starts a local Ray), deploys the model apps unless they run already, and
        starts the pool's workers with the remote models. `vad_backend`: this process's backend, for the streams'
        states and sizes (and whatever else the app runs on it locally)."""
        how, vad_handle, embed_handle, info = await asyncio.to_thread(cls._connect, settings)
        remote_vad = (RemoteVadBackend(vad_backend, vad_handle, settings.ray_call_timeout_s)
                      if vad_backend is not None else None)
        remote_embedder = RemoteEmbedder(info, embed_handle, settings.ray_call_timeout_s)
        pool = await super().create(settings, embedder=remote_embedder, torch_threads=torch_threads,
                                    vad_backend=remote_vad)
        pool._ray = how
        pool._handles = (vad_handle, embed_handle)
        log.info("model pool on Ray Serve (%s): speaker %s, %d replica(s) each",
                 settings.ray_address or "local instance", info["name"], settings.ray_replicas)
        return pool  # type: ignore[return-value]

    @staticmethod
    def _connect(settings: Settings) -> tuple[str, Any, Any, dict[str, Any]]:
        from streaming import ray_deployments as rd

        how = rd.connect(settings)
        rd.deploy(settings)
        vad, embed = rd.handles()
        info = embed.info.remote().result(timeout_s=120)
        return how, vad, embed, info

    def ray_stats(self) -> dict[str, Any]:
        """Blocking: each deployment's counters (front-end calls, model calls) from one of its replicas."""
        vad, embed = self._handles
        return {"vad": vad.info.remote().result(timeout_s=10), "speaker": embed.info.remote().result(timeout_s=10)}

    async def close(self) -> None:
        await super().close()
        if self._ray:
            await asyncio.to_thread(self._shutdown_ray, self._ray == "local")

    @staticmethod
    def _shutdown_ray(own: bool) -> None:
        """Leaves the cluster; the deployments stay for the other front-ends, unless this process started the
        local instance they run in (nobody else uses it)."""
        import ray
        from ray import serve

        try:
            if own:
                serve.shutdown()
        finally:
            ray.shutdown()
