"""The shared model pool: one per process, one batching worker (`streaming.batching.BatchingWorker`) per model and
kind of work, shared by every connection.

`ModelPool` owns the workers and holds no per-stream state: each request carries its own data and future. A VAD
request carries one stream's own decoder and VAD state (`VadJob`); a stream has at most one request in flight, so
while it is queued or computed only the worker thread touches that state.

Two kinds of speaker work, each with its own worker thread and bounded queue: LIVE (the streams' windows, and what a
user waits on) and BATCH (the batch endpoints' bulk work, e.g. `/v1/speaker-identification`'s segments). The batch
worker's thread runs at the lowest priority (`lower_thread_priority`) in small model calls, so bulk work takes only
the CPU the live streams leave and never delays a live window behind one of its calls; its queue never counts as
live saturation (`saturation`, `saturated`). Both call the same embedder, which must allow concurrent inference
calls from two threads (torch modules in eval mode under no_grad do: no state changes in forward).
Measured (bench/batch_vs_live.py, 4 live streams, 4 batch clients with 96 segments each, 2 shared cores): live p95
335 ms quiet vs 1676 ms under batch load with bulk work served by the live worker between live batches; 195 vs
209 ms (x1.07) with its own low-priority worker and the batch threads of `batch_threads`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from config import Settings
from streaming.batching import (  # noqa: F401 (PoolSaturated, PoolClosed: re-exported for the callers)
    BatchingWorker,
    ItemFailed,
    PoolClosed,
    PoolSaturated,
    lower_thread_priority,
)
from streaming.model_source import redactor
from streaming.vad import StreamingVAD, VadBackend

log = logging.getLogger(__name__)

SATURATED_AT = 0.9  # ModelPool.saturated: new streams are refused from this queue fill on
LIVE, BATCH = "live", "batch"  # the kinds of speaker work (ModelPool.embed_many)


class VadJob(Protocol):
    """One stream's step on the VAD worker: its frames to decode and score. Both methods run in the worker thread,
    one job of a stream at a time (see `Pipeline`): they may touch that stream's decoder and VAD state only."""

    def prepare(self) -> tuple[StreamingVAD, np.ndarray]:
        """Decodes the frames; returns the stream's VAD and the model input of `StreamingVAD.take` (maybe empty)."""

    def complete(self, probs: np.ndarray) -> Any:
        """The probabilities of `prepare`'s model input; returns what the stream's request resolves to."""


def run_vad_jobs(backend: VadBackend, jobs: Sequence[VadJob]) -> list[Any]:
    """Blocking: prepares every job, scores all of them in one `speech_probs_batch`, completes them. A job whose
    `prepare` or `complete` raises gets an `ItemFailed`; a model error fails the whole call."""
    results: list[Any] = [None] * len(jobs)
    scoring: list[tuple[int, StreamingVAD, np.ndarray]] = []
    for i, job in enumerate(jobs):
        try:
            vad, model_in = job.prepare()
        except Exception as exc:
            results[i] = ItemFailed(exc)
            continue
        scoring.append((i, vad, model_in))
    probs = backend.speech_probs_batch([vad.state for _, vad, _ in scoring], [m for _, _, m in scoring])
    for (i, _, _), p in zip(scoring, probs, strict=True):
        try:
            results[i] = jobs[i].complete(p)
        except Exception as exc:
            results[i] = ItemFailed(exc)
    return results


class ModelPool:
    """One per process, created in the app lifespan; holds no per-stream state. Owns the speaker embedder and the
    VAD backend, each with its batching worker."""

    def __init__(self, settings: Settings, torch_threads: int | None = None,
                 vad_backend: VadBackend | None = None) -> None:
        self._settings = settings
        self._embedder = None
        self._load_lock = asyncio.Lock()
        self._loading = False
        self._load_error: str | None = None  # the last failed load of the embedder, and when (monotonic)
        self._load_failed_at = 0.0
        self.torch_threads = torch_threads
        self.vad_backend = vad_backend
        self._speaker = BatchingWorker("speaker", self._embed_batch, settings.pool_max_batch,
                                       settings.pool_max_wait_ms, settings.pool_queue_size,
                                       thread_init=self._init_worker_thread)
        # Bulk work: taken at once (no wait to fill a batch: a request's clips arrive together), small calls.
        self._speaker_bulk = BatchingWorker("speaker-batch", self._embed_batch, settings.pool_batch_max_batch, 0.0,
                                            settings.pool_batch_queue_size, thread_init=self._init_bulk_thread)
        self._vad = BatchingWorker("vad", self._vad_batch, settings.vad_max_batch, settings.vad_max_wait_ms,
                                   settings.pool_queue_size, thread_init=self._init_worker_thread)

    @classmethod
    async def create(cls, settings: Settings, embedder: Any | None = None, torch_threads: int | None = None,
                     vad_backend: VadBackend | None = None) -> ModelPool:
        """Loads (`streaming.speaker.load_embedder`, in a thread) and warms up the embedder unless
        `settings.lazy_models`; starts the workers.

        `embedder`: an already loaded and warmed-up `SpeakerEmbedder` to use instead (tests, benchmarks).
        `torch_threads`: torch intra-op threads in the worker threads; default: `settings.torch_threads` (0: the
        process-wide `torch.get_num_threads()`), applied in each worker thread because a thread that did not set it
        itself runs small batches several times slower (measured, bench/embeddings.py).
        `vad_backend`: the live streams' VAD (`run_vad`); without it `run_vad` raises PoolClosed."""
        pool = cls(settings, torch_threads if torch_threads is not None else (settings.torch_threads or None),
                   vad_backend)
        if embedder is not None:
            pool._embedder = embedder
        elif not settings.lazy_models:
            await pool.ensure_loaded()
        pool._speaker.start()
        pool._speaker_bulk.start()
        if vad_backend is not None:
            pool._vad.start()
        return pool

    LOAD_RETRY_AFTER_S = 30.0  # a failed lazy load is not retried before this: callers meanwhile fail at once

    async def ensure_loaded(self) -> None:
        """Loads and warms up the speaker embedder once (at start-up, or on first use with LAZY_MODELS), in a thread.
        After a failed load, callers get RuntimeError at once for `LOAD_RETRY_AFTER_S`, then the next one retries
        (so a hundred streams waiting on a model that cannot load do not each pay for an attempt)."""
        if self._embedder is not None:
            return
        async with self._load_lock:
            if self._embedder is not None:
                return
            if self._load_error is not None and time.monotonic() - self._load_failed_at < self.LOAD_RETRY_AFTER_S:
                raise RuntimeError(f"speaker embedder {self._settings.speaker_backend} is not available: "
                                   f"{self._load_error}")
            from streaming.speaker import load_embedder

            self._loading = True
            started = time.monotonic()
            try:
                embedder = await asyncio.to_thread(load_embedder, self._settings)
                # resemblyzer's first call compiles (numba) for seconds: not on the first user's time
                await asyncio.to_thread(embedder.warm_up)
            except Exception as e:
                token = self._settings.huggingface_token
                scrub = redactor(token.get_secret_value() if token else None)
                self._load_error, self._load_failed_at = scrub(str(e) or type(e).__name__), time.monotonic()
                log.error("speaker embedder %s failed to load: %s", self._settings.speaker_backend, self._load_error)
                raise
            finally:
                self._loading = False
            self._embedder, self._load_error = embedder, None
            log.info("speaker embedder ready: %s (dim %d) in %.1f s", embedder.name, embedder.dim,
                     time.monotonic() - started)

    def model_status(self) -> dict[str, str]:
        """Each model's state: "ready", "loading", "lazy" (LAZY_MODELS: loads on first use), "failed: <error>" (a
        load that failed, for `LOAD_RETRY_AFTER_S`), then "lazy, last load failed: <error>" (the next use retries).
        `/ready` reports it (in the pool's stats)."""
        if self._embedder is not None:
            speaker = "ready"
        elif self._loading:
            speaker = "loading"
        elif self._load_error is None:
            speaker = "lazy"
        elif time.monotonic() - self._load_failed_at < self.LOAD_RETRY_AFTER_S:
            speaker = f"failed: {self._load_error}"
        else:
            speaker = f"lazy, last load failed: {self._load_error}"
        out = {"speaker": speaker}
        if self.vad_backend is not None:
            out["vad"] = getattr(self.vad_backend, "status", "ready")  # a LazyVadBackend knows; others are loaded
        return out

    @property
    def models_failed(self) -> bool:
        """A model's load failed less than its retry delay ago: requests that need it fail meanwhile."""
        return any(v.startswith("failed") for v in self.model_status().values())

    def _init_worker_thread(self) -> None:  # worker thread
        import torch

        torch.set_num_threads(self.torch_threads or torch.get_num_threads())

    def _init_bulk_thread(self) -> None:  # the batch worker's thread
        self._init_worker_thread()
        lower_thread_priority()

    def _embed_batch(self, clips: list[np.ndarray]) -> np.ndarray:  # worker thread
        return self._embedder.embed_batch(clips)

    def _vad_batch(self, jobs: list[VadJob]) -> list[Any]:  # worker thread
        return run_vad_jobs(self.vad_backend, jobs)

    async def run_vad(self, job: VadJob) -> Any:
        """One stream's frames through decode and VAD, batched with every other stream's (one model call per 32 ms
        frame step for all of them). The caller must not touch the stream's decoder or VAD until this returns.
        Raises PoolSaturated, PoolClosed, or what the job raised."""
        return await self._vad.submit(job)

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    @property
    def embedder_name(self) -> str:
        """The model that makes (and may match) embeddings; profiles record it."""
        if self._embedder is not None:
            return self._embedder.name
        from streaming.speaker import embedder_name

        return embedder_name(self._settings)  # LAZY_MODELS: the name the embedder will have once loaded

    @property
    def embedding_dim(self) -> int:
        if self._embedder is None:
            raise RuntimeError("the speaker embedder is not loaded yet")
        return self._embedder.dim

    @property
    def saturation(self) -> float:
        return self._speaker.saturation

    @property
    def saturated(self) -> bool:
        """The live queue is (nearly) full: new streams are refused. Bulk work never makes it true."""
        return self._speaker.saturation >= SATURATED_AT

    def stats(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "models": self.model_status(), "speaker": self._speaker.stats(),
                "speaker_batch": self._speaker_bulk.stats(), "vad": self._vad.stats()}

    async def embed(self, clip: np.ndarray) -> np.ndarray:
        """One (dim,) embedding."""
        return (await self.embed_many([clip]))[0]

    async def embed_many(self, clips: Sequence[np.ndarray], lane: str = LIVE) -> np.ndarray:
        """(n, dim) float32 embeddings, unit norm; the clips join batches with every other connection's.

        `lane`: LIVE (streams, and what a user waits on) or BATCH (the batch endpoints' bulk work: the low-priority
        worker, never counted as live saturation). Submitted in chunks of up to two model batches (the next one is
        queued while one is computed; any number of clips, a request never holds more than its share of a queue).

        Raises ValueError for an unusable clip (checked here, so it fails only its own request, not a whole batch),
        PoolSaturated when the queue has no room for a chunk, PoolClosed after `close()`."""
        await self.ensure_loaded()
        embedder = self._embedder
        if not len(clips):
            return np.zeros((0, embedder.dim), np.float32)
        checked = embedder.check_clips(clips)
        if lane not in (LIVE, BATCH):
            raise ValueError(f"no lane {lane!r}")
        worker = self._speaker if lane == LIVE else self._speaker_bulk
        chunk = max(1, min(2 * worker.max_batch, worker.queue_size))
        out: list[np.ndarray] = []
        for i in range(0, len(checked), chunk):
            out += await worker.submit_many(checked[i : i + chunk])
        return np.stack(out)

    async def close(self) -> None:
        await asyncio.to_thread(self._speaker.stop)
        await asyncio.to_thread(self._speaker_bulk.stop)
        await asyncio.to_thread(self._vad.stop)


async def create_pool(settings: Settings, vad_backend: VadBackend | None = None) -> ModelPool:
    """The pool MODEL_POOL names: "local" (this process's `ModelPool`) or "ray" (`streaming.ray_pool.RayModelPool`,
    the models in Ray Serve deployments shared by every front-end process on RAY_ADDRESS)."""
    if settings.model_pool == "ray":
        from streaming.ray_pool import RayModelPool

        return await RayModelPool.create(settings, vad_backend=vad_backend)
    return await ModelPool.create(settings, vad_backend=vad_backend)
