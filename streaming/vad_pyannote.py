"""The pyannote segmentation backend of the VAD (`VAD_BACKEND=pyannote`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streaming.model_source import hub_cache_dir, looks_like_local_path, redactor, split_revision
from streaming.vad_backends import SAMPLE_RATE, VadBackend

log = logging.getLogger(__name__)


@dataclass
class _PyannoteState:
    window: np.ndarray  # the last `window` seconds of the stream, zeros before it started


class PyannoteVad(VadBackend):
    """A pyannote segmentation model (`pyannote/segmentation-3.0` in production) as a streaming VAD.

    Every 0.5 s chunk is scored by one model call over the `window` seconds of audio ending at the chunk's end (the
    model's training duration, 10 s for segmentation-3.0; zeros before the stream starts), and only that window's last
    0.5 s is kept: the chunk gets up to 9.5 s of left context and none to its right, so it is final as soon as it has
    arrived. The per-stream state is that window. All chunks of one call are stacked into batches of `max_batch`
    windows, so a whole file in batch mode is a few forward passes.

    Speech probability per frame: for a powerset model (segmentation-3.0), 1 - P(no speaker); for a multi-label
    model, the highest speaker activation. The model's own frames (about 17 ms for segmentation-3.0) are linearly
    interpolated onto a 10 ms grid (`frame_samples = 160`).

    The model is only read (eval mode, `torch.inference_mode`), so one instance serves every stream from any thread.
    """

    name = "pyannote"
    frame_samples = 160  # 10 ms
    chunk_samples = 8000  # 0.5 s: one window (one batch row) per chunk
    max_batch = 32  # windows per forward pass

    def __init__(self, model: Any, device: str = "cpu") -> None:
        import torch
        from pyannote.audio.core.task import Problem

        specs = model.specifications
        if isinstance(specs, tuple):
            raise ValueError("multi-task pyannote models are not supported as VAD")
        if model.hparams.sample_rate != SAMPLE_RATE:
            rate = model.hparams.sample_rate
            raise ValueError(f"pyannote model expects {rate} Hz audio, the VAD runs at {SAMPLE_RATE}")
        if specs.powerset:
            self._powerset = True
        elif specs.problem in (Problem.MULTI_LABEL_CLASSIFICATION, Problem.BINARY_CLASSIFICATION):
            self._powerset = False
        else:
            raise ValueError(f"pyannote model solves {specs.problem.name}; need a powerset or multi-label segmentation")
        self.window = int(round(specs.duration * SAMPLE_RATE))
        if self.window < self.chunk_samples:
            raise ValueError(
                f"pyannote model window {specs.duration} s is shorter than one {self.chunk_samples}-sample chunk"
            )
        self.device = torch.device(device)
        self._model = model.eval().requires_grad_(False).to(self.device)

        # One dry run: checks the output and gives the number of model frames per window.
        with torch.inference_mode():
            scores = self._model(torch.zeros((1, 1, self.window), device=self.device))
        num_frames = scores.shape[1]
        try:  # frame centres in samples from the window start
            rf = self._model.receptive_field
            centres = (rf.start + rf.step * np.arange(num_frames) + rf.duration / 2) * SAMPLE_RATE
        except Exception:  # a model without receptive-field arithmetic: frames evenly cover the window
            centres = (np.arange(num_frames) + 0.5) * self.window / num_frames
        fs = self.frame_samples
        targets = self.window - self.chunk_samples + np.arange(self.chunk_samples // fs) * fs + fs / 2
        pos = np.interp(targets, centres, np.arange(num_frames, dtype=np.float64))  # clamped at both ends
        self._lo = np.floor(pos).astype(np.int64)
        self._hi = np.minimum(self._lo + 1, num_frames - 1)
        self._w = (pos - self._lo).astype(np.float32)

    @classmethod
    def load(cls, source: str, token: str | None = None, device: str = "cpu",
             cache_dir: str | Path | None = None) -> PyannoteVad:
        """`source`: a Hugging Face id ("pyannote/segmentation-3.0", optionally "@revision"), a checkpoint file (a
        lightning `.ckpt` or `pytorch_model.bin`), or a directory holding `pytorch_model.bin`.

        `cache_dir`: the Hugging Face cache a hub id is downloaded into and found again in (MODEL_CACHE_DIR; None:
        the hub's default). A local checkpoint is loaded where it is and never touches the network.

        Raises ValueError for a local path that is not there, RuntimeError when loading fails (gated model without
        a token, no network, a bad file); messages name the source, never the token.
        """
        import os

        # pyannote.audio 4 sends usage telemetry unless told not to; a server should not phone home by default.
        os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
        from pyannote.audio import Model

        path = Path(source).expanduser()
        revision = None
        hub_cache = None
        if path.is_dir():
            if not (path / "pytorch_model.bin").is_file():
                raise ValueError(f"pyannote segmentation directory {source!r} has no pytorch_model.bin")
            checkpoint = str(path)
        elif path.is_file():
            checkpoint = str(path)
        elif looks_like_local_path(source):
            raise ValueError(f"pyannote segmentation checkpoint {source!r} not found")
        else:
            checkpoint, revision = split_revision(source)
            hub_cache = str(hub_cache_dir(cache_dir)) if cache_dir is not None else None

        scrub = redactor(token)

        try:
            model = Model.from_pretrained(checkpoint, revision=revision, token=token, cache_dir=hub_cache)
        except Exception as e:
            hint = (
                ""
                if path.exists()
                else " (a gated model needs its conditions accepted on hf.co and HUGGINGFACE_TOKEN set; without"
                " network, download it beforehand or point PYANNOTE_SEGMENTATION at a local checkpoint)"
            )
            msg = scrub(f"could not load pyannote segmentation model {source!r}: {type(e).__name__}: {e}{hint}")
            raise RuntimeError(msg) from e
        if model is None:
            raise RuntimeError(f"could not load pyannote segmentation model {source!r}")
        log.info("pyannote VAD: loaded %s on %s%s", source, device, f" (cache {hub_cache})" if hub_cache else "")
        return cls(model, device=device)

    def new_state(self) -> _PyannoteState:
        return _PyannoteState(np.zeros(self.window, np.float32))

    def speech_probs(self, state: _PyannoteState, audio: np.ndarray) -> np.ndarray:
        import torch

        chunk = self.chunk_samples
        audio = np.asarray(audio, np.float32).reshape(-1)
        if len(audio) % chunk:
            raise ValueError(f"audio length {len(audio)} is not a multiple of {chunk}")
        n_chunks = len(audio) // chunk
        if not n_chunks:
            return np.zeros(0, np.float32)
        buf = np.concatenate((state.window, audio))
        # windows[k] = the `window` samples ending at the end of chunk k
        windows = np.lib.stride_tricks.sliding_window_view(buf, self.window)[chunk::chunk]
        out = np.empty((n_chunks, chunk // self.frame_samples), np.float32)
        with torch.inference_mode():
            for s in range(0, n_chunks, self.max_batch):
                batch = torch.from_numpy(np.array(windows[s : s + self.max_batch]))  # a writable copy
                scores = self._model(batch[:, None].to(self.device))
                if self._powerset:  # softmax also turns the model's log-softmax output back into probabilities
                    speech = 1.0 - torch.softmax(scores.float(), dim=-1)[..., 0]
                else:  # multi-label: activations are already sigmoids
                    speech = scores.float().amax(dim=-1)
                p = speech.cpu().numpy()
                out[s : s + len(p)] = p[:, self._lo] * (1.0 - self._w) + p[:, self._hi] * self._w
        state.window = buf[-self.window :].copy()
        return np.clip(out.reshape(-1), 0.0, 1.0)
