"""VAD backends: frame-level speech probabilities behind one interface (`VadBackend`), and silero's.

Backends are shared by all connections and hold no per-stream state: each stream asks its backend for a
`new_state()` and passes it back on every call (the silero LSTM state, the pyannote context window). That is what
keeps one stream's VAD from leaking into another's, a bug peers shipped.

Shapes: audio is float32 mono at 16 kHz, shape (samples,); probabilities are float32, shape (frames,), one per
`backend.frame_samples` samples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

SAMPLE_RATE = 16000


class VadBackend(ABC):
    """Frame-level speech probabilities. Thread-safe: one instance serves every stream, state is passed in."""

    name: str
    frame_samples: int  # probability resolution, samples per probability
    chunk_samples: int  # smallest amount of new audio worth one call (a multiple of frame_samples)

    @abstractmethod
    def new_state(self) -> Any:
        """Fresh per-stream state."""

    @abstractmethod
    def speech_probs(self, state: Any, audio: np.ndarray) -> np.ndarray:
        """audio: (n,) with n a multiple of chunk_samples, continuing the stream `state` describes.
        Returns (n // frame_samples,) probabilities and advances `state`."""

    def warm_up(self) -> None:
        """One call of each kind the streams will make, so the first stream does not pay for allocation."""
        self.speech_probs(self.new_state(), np.zeros(self.chunk_samples, np.float32))

    def speech_probs_batch(self, states: list[Any], audios: list[np.ndarray]) -> list[np.ndarray]:
        """Many streams at once (the model pool's VAD worker): `speech_probs(states[i], audios[i])` for each i, in
        as few model calls as the backend can. The results equal the one-stream calls (float rounding aside).
        This default calls the model once per stream."""
        return [self.speech_probs(state, audio) for state, audio in zip(states, audios, strict=True)]


@dataclass
class _SileroState:
    lstm: np.ndarray = field(default_factory=lambda: np.zeros((2, 128), np.float32))  # the LSTM's (h, c)
    context: np.ndarray = field(default_factory=lambda: np.zeros(64, np.float32))  # the last frame's tail


class SileroVad(VadBackend):
    """Silero VAD v6 (weights ship in the `silero-vad` wheel), run through onnxruntime.

    Two exports of the same weights, with the LSTM state as explicit inputs (so the state lives with the stream):
    - "sequence" (`speech_probs`, one stream): many 32 ms frames of one stream per call; what batch mode uses on a
      whole file (one call per hour of audio would be fine);
    - "op15" (`speech_probs_batch`, many streams): one frame of each of many streams per call, their states stacked
      as (2, streams, 128). A live stream brings one or two frames per request; a call per frame and stream costs
      ~100 us, a frame in a batch of 8 or more ~55 us (measured on this machine's CPU, one thread).
    Both give identical probabilities from identical states (checked in tests/test_units.py). A step with many
    streams runs instead on the TorchScript export of the same weights in the wheel (`silero_vad.jit`, its 16 kHz
    model called with the state explicit): 22-25 us a frame at 64-128 streams against ONNX's 55, but 48 us at 16 and
    300 us alone, so below TORCH_MIN_STREAMS a step stays on ONNX (probabilities equal to 2e-6).
    """

    name = "silero"
    frame_samples = 512
    chunk_samples = 512
    _context_samples = 64
    TORCH_MIN_STREAMS = 12  # measured crossover: ONNX 61 vs TorchScript 72 us a frame at 8 streams, 56 vs 32 at 32

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the op15 export's unused initialisers would log a warning each at load
        data = resources.files("silero_vad.data")
        # onnxruntime's InferenceSession.run is thread-safe, so one session serves every stream.
        self._session = ort.InferenceSession(str(data.joinpath("silero_vad_16k_sequence.onnx")),
                                             sess_options=options, providers=["CPUExecutionProvider"])
        self._batched = ort.InferenceSession(str(data.joinpath("silero_vad_16k_op15.onnx")),
                                             sess_options=options, providers=["CPUExecutionProvider"])
        self._rate = np.array(SAMPLE_RATE, np.int64)
        self._torch_model: Any = None  # loaded on the first step with many streams (`_torch_step`)

    def new_state(self) -> _SileroState:
        return _SileroState()

    def warm_up(self) -> None:
        super().warm_up()
        n = self.TORCH_MIN_STREAMS
        for _ in range(3):  # TorchScript's profiling executor optimises the graph over its first calls
            silence = [np.zeros(self.chunk_samples, np.float32)] * n
            self.speech_probs_batch([self.new_state() for _ in range(n)], silence)

    def _blocks(self, state: _SileroState, audio: np.ndarray) -> np.ndarray:
        """(frames, 64 + 512): each frame after the last 64 samples before it (the model's context)."""
        frames = audio.reshape(-1, self.frame_samples)
        ctx = self._context_samples
        block = np.empty((len(frames), ctx + self.frame_samples), np.float32)
        block[:, ctx:] = frames
        if len(frames):
            block[0, :ctx] = state.context
            block[1:, :ctx] = frames[:-1, -ctx:]
            state.context = frames[-1, -ctx:].copy()
        return block

    def speech_probs(self, state: _SileroState, audio: np.ndarray) -> np.ndarray:
        block = self._blocks(state, audio)
        if not len(block):
            return np.zeros(0, np.float32)
        h, c = state.lstm[:, None, None]
        probs, h, c = self._session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
        state.lstm = np.concatenate((h[0], c[0]))
        return np.asarray(probs, np.float32).reshape(-1)

    def speech_probs_batch(self, states: list[_SileroState], audios: list[np.ndarray]) -> list[np.ndarray]:
        """Step j runs frame j of every stream that has one, in one call. Streams are ordered by frame count
        (most first), so the streams of step j are a prefix and their stacked state is a slice."""
        counts = [len(a) // self.frame_samples for a in audios]
        live = [i for i in sorted(range(len(audios)), key=counts.__getitem__, reverse=True) if counts[i]]
        out = [np.zeros(counts[i], np.float32) for i in range(len(audios))]
        if len(live) <= 1:  # one stream: the sequence export takes all its frames in one call
            for i in live:
                out[i] = self.speech_probs(states[i], audios[i])
            return out
        steps = counts[live[0]]
        width = self._context_samples + self.frame_samples
        blocks = np.zeros((len(live), steps, width), np.float32)
        lstm = np.empty((2, len(live), 128), np.float32)
        for row, i in enumerate(live):
            blocks[row, : counts[i]] = self._blocks(states[i], audios[i])
            lstm[:, row] = states[i].lstm
        active = [sum(1 for i in live if counts[i] > j) for j in range(steps)]
        probs = np.zeros((len(live), steps), np.float32)
        for j, rows in enumerate(active):
            step_in, step_state = np.ascontiguousarray(blocks[:rows, j]), np.ascontiguousarray(lstm[:, :rows])
            if rows >= self.TORCH_MIN_STREAMS:
                p, lstm[:, :rows] = self._torch_step(step_in, step_state)
            else:
                p, lstm[:, :rows] = self._batched.run(["output", "stateN"], {
                    "input": step_in, "state": step_state, "sr": self._rate})
            probs[:rows, j] = p[:, 0]
        for row, i in enumerate(live):
            states[i].lstm = lstm[:, row].copy()
            out[i] = probs[row, : counts[i]]
        return out

    def _torch_step(self, blocks: np.ndarray, lstm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame of many streams on the TorchScript model: blocks (streams, 576), lstm (2, streams, 128) →
        probabilities (streams, 1) and the new states. Runs in the calling thread with its torch thread count."""
        import torch

        if self._torch_model is None:
            import warnings

            with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export (same file)
                warnings.simplefilter("ignore", FutureWarning)
                path = resources.files("silero_vad.data").joinpath("silero_vad.jit")
                self._torch_model = torch.jit.load(str(path), map_location="cpu").eval()._model
        with torch.inference_mode():
            p, state = self._torch_model(torch.from_numpy(blocks), torch.from_numpy(lstm))
        return p.numpy(), state.numpy()
