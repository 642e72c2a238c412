"""Voice activity detection: backends behind one interface, and `StreamingVAD`, the per-connection state machine.

Backends are shared by all connections and hold no per-stream state: each stream asks its backend for a
`new_state()` and passes it back on every call (the silero LSTM state, the pyannote context window). That is what
keeps one stream's VAD from leaking into another's, a bug peers shipped.

`StreamingVAD` turns per-frame speech probabilities into speech regions with hysteresis (enter at `onset`, leave
after `hangover` below `offset`), pre-roll (audio before the onset is included so word onsets are not clipped) and
hangover (the trailing silence is included so word endings are not clipped). Regions never overlap. The same class
runs over a whole file for `/v1/vad`, so batch and streaming answers agree.

Shapes: audio is float32 mono at 16 kHz, shape (samples,); probabilities are float32, shape (frames,), one per
`backend.frame_samples` samples.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from config import Settings
from streaming.model_source import hub_cache_dir, looks_like_local_path, redactor, split_revision

log = logging.getLogger(__name__)

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


# --- the streaming state machine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VadParams:
    """The defaults equal config.Settings' (a test checks); the server always builds these from settings."""

    onset: float = 0.4
    offset: float = 0.3
    pre_roll_ms: int = 200
    hangover_ms: int = 400
    min_speech_ms: int = 100
    max_speech_s: float = 30.0
    normalize: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> VadParams:
        return cls(
            onset=s.vad_onset,
            offset=s.vad_offset,
            pre_roll_ms=s.vad_pre_roll_ms,
            hangover_ms=s.vad_hangover_ms,
            min_speech_ms=s.vad_min_speech_ms,
            max_speech_s=s.vad_max_speech_s,
            normalize=s.vad_normalize,
        )


@dataclass(frozen=True)
class SpeechStart:
    sample: int  # stream sample where the region (with its pre-roll) begins


@dataclass(frozen=True)
class SpeechAudio:
    start: int  # stream sample of audio[0]
    audio: np.ndarray


@dataclass(frozen=True)
class SpeechEnd:
    sample: int  # stream sample where the region (with its hangover) ends, exclusive


VadEvent = SpeechStart | SpeechAudio | SpeechEnd


class LevelNormalizer:
    """Slow automatic gain for the VAD's input only (the audio sent to STT is never changed).

    Far-field meeting audio (AMI) peaks around -12 dBFS with speech RMS near -38 dBFS; silero's probabilities drop
    on such quiet input. The gain follows the loud frames (fast attack, slow release of a level estimate) and is
    capped so that silence is never blown up into noise that looks like speech.
    """

    TARGET_RMS = 0.1  # about -20 dBFS: the level of close-talk speech silero is trained on mostly
    MAX_GAIN = 8.0  # +18 dB; more turns room noise into false alarms on the AMI excerpts
    FLOOR_RMS = 0.003  # below this a frame is treated as silence and does not lower the level estimate
    RELEASE = 0.995  # per 32 ms frame: the estimate falls by half in about 4.4 s of quieter speech

    def __init__(self) -> None:
        self.level = self.TARGET_RMS

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """frames: (n_frames, frame_samples) → the same, scaled per frame."""
        rms = np.sqrt(np.mean(frames * frames, axis=1) + 1e-12)
        gains = np.empty(len(frames), np.float32)
        level = self.level
        for i, r in enumerate(rms):  # one step per 32 ms frame, not per sample
            if r > level:
                level = float(r)
            elif r > self.FLOOR_RMS:
                level = max(level * self.RELEASE, float(r))
            gains[i] = min(self.MAX_GAIN, max(1.0, self.TARGET_RMS / level))
        self.level = level
        return frames * gains[:, None]


class StreamingVAD:
    """Per-connection VAD: feed 16 kHz float32 audio of any length, get speech events back.

    Not thread-safe; owned by one `Pipeline`. Calls the backend (a model) synchronously: callers on the event loop
    run `process` in a worker thread.
    """

    def __init__(self, backend: VadBackend, params: VadParams = VadParams()) -> None:  # noqa: B008 (frozen)
        self.backend = backend
        self.params = params
        self._state = backend.new_state()
        self._normalizer = LevelNormalizer() if params.normalize else None
        fs = backend.frame_samples
        self._pending = np.zeros(0, np.float32)  # audio not yet given to the backend
        self._position = 0  # stream sample of _pending[0]
        self._pre_roll = int(params.pre_roll_ms * SAMPLE_RATE / 1000)
        self._hangover_frames = max(1, round(params.hangover_ms * SAMPLE_RATE / 1000 / fs))
        self._max_region = int(params.max_speech_s * SAMPLE_RATE)
        self._history = np.zeros(0, np.float32)  # up to _pre_roll samples of non-speech just before _position
        self._scoring = np.zeros(0, np.float32)  # audio handed out by `take`, waiting for its probabilities
        self.in_speech = False
        self._region_start = 0
        self._silent_frames = 0

    @property
    def position(self) -> int:
        """Stream samples consumed so far (processed or pending)."""
        return self._position + len(self._pending)

    def process(self, audio: np.ndarray) -> list[VadEvent]:
        """Blocking (one model call): the whole step for one stream."""
        model_in = self.take(audio)
        return self.decide(self.backend.speech_probs(self._state, model_in)) if len(model_in) else []

    def take(self, audio: np.ndarray) -> np.ndarray:
        """First half of `process`, for a caller that scores many streams in one model call: queues `audio` and
        returns the model input for the whole chunks now available (maybe empty). Score it with
        `backend.speech_probs(vad.state, ...)` (or `speech_probs_batch`), then hand the probabilities to `decide`
        before the next `take`."""
        buf = np.concatenate((self._pending, audio.astype(np.float32, copy=False)))
        chunk = self.backend.chunk_samples
        usable = len(buf) - len(buf) % chunk
        self._pending = buf[usable:]
        self._scoring = buf[:usable]
        if not usable or self._normalizer is None:
            return self._scoring
        return self._normalizer(self._scoring.reshape(-1, self.backend.frame_samples)).reshape(-1)

    def decide(self, probs: np.ndarray) -> list[VadEvent]:
        """Second half of `process`: the events for the audio the last `take` returned, given its probabilities."""
        audio, self._scoring = self._scoring, self._scoring[:0]
        return self._decide(audio, probs) if len(audio) else []

    @property
    def state(self) -> Any:
        """The backend's state for this stream (passed to the backend with `take`'s output)."""
        return self._state

    def flush(self) -> list[VadEvent]:
        """End of stream: classify what is pending (zero-padded) and close an open region."""
        events: list[VadEvent] = []
        tail = len(self._pending)
        if tail:
            chunk = self.backend.chunk_samples
            padded = np.zeros(chunk * -(-tail // chunk), np.float32)
            padded[:tail] = self._pending
            self._pending = np.zeros(0, np.float32)
            events = self._run(padded, valid=tail)
        if self.in_speech:
            events.append(SpeechEnd(self._position))
            self.in_speech = False
        return events

    def _run(self, audio: np.ndarray, valid: int | None = None) -> list[VadEvent]:
        fs = self.backend.frame_samples
        model_in = self._normalizer(audio.reshape(-1, fs)).reshape(-1) if self._normalizer else audio
        probs = self.backend.speech_probs(self._state, model_in)
        valid = len(audio) if valid is None else valid
        return self._decide(audio[:valid], probs)

    def _decide(self, audio: np.ndarray, probs: np.ndarray) -> list[VadEvent]:
        """The hysteresis state machine over frames; emits contiguous speech audio per call."""
        p = self.params
        fs = self.backend.frame_samples
        base = self._position
        events: list[VadEvent] = []
        span_start: int | None = 0 if self.in_speech else None  # offset in `audio` of audio to emit

        def close_span(end: int) -> None:
            nonlocal span_start
            if span_start is not None and end > span_start:
                events.append(SpeechAudio(base + span_start, audio[span_start:end]))
            span_start = None

        for i, prob in enumerate(probs):
            lo = i * fs
            if lo >= len(audio):
                break
            hi = min(lo + fs, len(audio))
            if not self.in_speech:
                if prob >= p.onset:
                    pre = self._history
                    self._region_start = base + lo - len(pre)
                    events.append(SpeechStart(self._region_start))
                    if len(pre):
                        events.append(SpeechAudio(self._region_start, pre))
                    self._history = np.zeros(0, np.float32)
                    self.in_speech = True
                    self._silent_frames = 0
                    span_start = lo
                else:
                    if self._pre_roll:
                        self._history = np.concatenate((self._history, audio[lo:hi]))[-self._pre_roll :]
                    continue
            # in speech
            self._silent_frames = self._silent_frames + 1 if prob < p.offset else 0
            too_long = base + hi - self._region_start >= self._max_region
            if self._silent_frames >= self._hangover_frames or too_long:
                close_span(hi)
                events.append(SpeechEnd(base + hi))
                self.in_speech = False
                if too_long and prob >= p.onset:  # still talking: start the next region right here
                    self._region_start = base + hi
                    events.append(SpeechStart(self._region_start))
                    self.in_speech = True
                    self._silent_frames = 0
                    span_start = hi
        if self.in_speech:
            close_span(len(audio))
        self._position = base + len(audio)
        return events


def detect_regions(
    backend: VadBackend,
    audio: np.ndarray,
    params: VadParams = VadParams(),  # noqa: B008 (frozen dataclass)
) -> list[tuple[int, int]]:
    """Batch mode: speech regions of a whole signal as (start, end) sample pairs, same code as streaming.

    Regions shorter than `min_speech_ms` (without their padding) are dropped here; a live stream cannot take back
    audio it already sent, so streaming keeps them. Touching regions (speech resumed right where the hangover of
    the last one ended, or a region cut at `max_speech_s`) are merged.
    """
    vad = StreamingVAD(backend, params)
    return merged_regions(paired_regions(vad.process(audio) + vad.flush()), len(audio), params)


def paired_regions(events: Iterable[VadEvent]) -> list[tuple[int, int]]:
    """(start, end) sample pairs of a VAD's SpeechStart/SpeechEnd events, in order."""
    regions: list[tuple[int, int]] = []
    start = None
    for ev in events:
        if isinstance(ev, SpeechStart):
            start = ev.sample
        elif isinstance(ev, SpeechEnd) and start is not None:
            regions.append((start, ev.sample))
            start = None
    return regions


def merged_regions(regions: list[tuple[int, int]], length: int, params: VadParams) -> list[tuple[int, int]]:
    """Batch mode's regions: ends clipped to the signal's `length` (the flush's padding may pass it), regions shorter
    than `min_speech_ms` plus their padding dropped, touching ones joined."""
    pad = int((params.pre_roll_ms + params.hangover_ms) * SAMPLE_RATE / 1000)
    min_len = int(params.min_speech_ms * SAMPLE_RATE / 1000) + pad
    merged: list[tuple[int, int]] = []
    for s, e in regions:
        e = min(e, length)
        if e - s < min_len:
            continue
        if merged and s <= merged[-1][1]:  # touching: speech resumed right at the end of the hangover
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


# --- loading ---------------------------------------------------------------------------------------------------

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
