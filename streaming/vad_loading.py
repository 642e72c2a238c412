"""Loading the configured VAD backend once per process, or lazily on first use (`LAZY_MODELS`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from config import Settings
from streaming.model_source import redactor
from streaming.vad_backends import SileroVad, VadBackend
from streaming.vad_pyannote import PyannoteVad

log = logging.getLogger(__name__)

_BACKEND_CLASSES: dict[str, type[VadBackend]] = {"silero": SileroVad, "pyannote": PyannoteVad}


def _load_now(settings: Settings) -> VadBackend:
    if settings.vad_backend == "silero":
        return SileroVad()
    if settings.vad_backend == "pyannote":
        return PyannoteVad.load(
            settings.pyannote_segmentation,
            token=settings.huggingface_token.get_secret_value() if settings.huggingface_token else None,
            device=settings.resolved_device(),
            cache_dir=settings.model_cache_dir,
        )
    raise ValueError(f"unknown VAD_BACKEND {settings.vad_backend!r}")


def load_vad_backend(settings: Settings) -> VadBackend:
    """The backend `VAD_BACKEND` names, loaded once per process (by the app lifespan). With `LAZY_MODELS` a
    `LazyVadBackend` that loads it on first use instead (nothing is loaded here, and its `warm_up` does nothing
    until then). Hugging Face ids are downloaded into and loaded from MODEL_CACHE_DIR."""
    if settings.vad_backend not in _BACKEND_CLASSES:
        raise ValueError(f"unknown VAD_BACKEND {settings.vad_backend!r}")
    if settings.lazy_models:
        token = settings.huggingface_token.get_secret_value() if settings.huggingface_token else None
        return LazyVadBackend(settings.vad_backend, lambda: _load_now(settings), scrub=redactor(token))
    return _load_now(settings)


class _LazyState:
    """A stream's state on a `LazyVadBackend`: the real backend's state, made on the stream's first model call (a
    pyannote state needs the model's window, which is only known once the model is loaded)."""

    __slots__ = ("inner",)

    def __init__(self) -> None:
        self.inner: Any = None


class LazyVadBackend(VadBackend):
    """LAZY_MODELS: stands in for a VAD backend that is loaded (and warmed up) on its first model call, in the
    thread that makes it (the model pool's VAD worker, or the thread a batch request runs in): never at start-up and
    never on the event loop. `new_state`, `name`, `frame_samples` and `chunk_samples` need no model (the backend
    class's constants), so streams open before the model is there.

    A load that failed is not retried for `retry_after_s`: calls in between fail at once with the same error
    (instead of every stream's every step paying for another attempt); the first call after it tries again.
    Thread-safe: one load, under a lock. `scrub` hides the secret token in the error text it keeps."""

    retry_after_s = 30.0

    def __init__(self, name: str, load: Callable[[], VadBackend],
                 scrub: Callable[[str], str] = lambda text: text) -> None:
        cls = _BACKEND_CLASSES[name]
        self.name = name
        self.frame_samples = cls.frame_samples
        self.chunk_samples = cls.chunk_samples
        self._load = load
        self._scrub = scrub
        self._lock = threading.Lock()
        self._backend: VadBackend | None = None
        self._loading = False
        self._error: str | None = None
        self._failed_at = 0.0

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    @property
    def status(self) -> str:
        """"ready", "loading", "lazy" (loads on first use), "failed: <error>" (a failed load, for `retry_after_s`),
        then "lazy, last load failed: <error>" (the next use retries)."""
        if self._backend is not None:
            return "ready"
        if self._loading:
            return "loading"
        if self._error is None:
            return "lazy"
        if time.monotonic() - self._failed_at < self.retry_after_s:
            return f"failed: {self._error}"
        return f"lazy, last load failed: {self._error}"

    def backend(self) -> VadBackend:
        """The real backend, loaded and warmed up on the first call. Blocking (seconds the first time)."""
        backend = self._backend
        if backend is not None:
            return backend
        with self._lock:
            if self._backend is not None:
                return self._backend
            if self._error is not None and time.monotonic() - self._failed_at < self.retry_after_s:
                raise RuntimeError(f"VAD backend {self.name} is not available: {self._error}")
            self._loading = True
            started = time.monotonic()
            try:
                backend = self._load()
                backend.warm_up()
            except Exception as e:
                self._error, self._failed_at = self._scrub(str(e) or type(e).__name__), time.monotonic()
                log.error("VAD backend %s failed to load on first use: %s", self.name, self._error)
                raise
            finally:
                self._loading = False
            self._backend, self._error = backend, None
            log.info("VAD backend %s loaded on first use in %.1f s", self.name, time.monotonic() - started)
            return backend

    def new_state(self) -> _LazyState:
        return _LazyState()

    @staticmethod
    def _inner(backend: VadBackend, state: _LazyState) -> Any:
        if state.inner is None:
            state.inner = backend.new_state()
        return state.inner

    def speech_probs(self, state: _LazyState, audio: np.ndarray) -> np.ndarray:
        backend = self.backend()
        return backend.speech_probs(self._inner(backend, state), audio)

    def speech_probs_batch(self, states: list[_LazyState], audios: list[np.ndarray]) -> list[np.ndarray]:
        backend = self.backend()
        return backend.speech_probs_batch([self._inner(backend, s) for s in states], audios)

    def warm_up(self) -> None:
        """Nothing before the first use (the load warms the backend up); afterwards the backend's own warm-up."""
        if self._backend is not None:
            self._backend.warm_up()
