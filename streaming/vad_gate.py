"""The live VAD gate: `StreamingVAD`, the per-connection state machine, and its parameters.

`StreamingVAD` turns per-frame speech probabilities into speech regions with hysteresis (enter at `onset`, leave
after `hangover` below `offset`), pre-roll (audio before the onset is included so word onsets are not clipped) and
hangover (the trailing silence is included so word endings are not clipped). Regions never overlap. That padding
is what STT needs; `/v1/vad` reports speech as it is instead (`streaming.vad_batch`, its own parameters).
`detect_regions` runs the gate over a whole clip for the callers that cut audio with it (speaker samples,
identification), so they cut what a live stream would send.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from config import Settings
from streaming.vad_backends import SAMPLE_RATE, VadBackend


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
    """The live gate over a whole clip: its speech regions as (start, end) sample pairs, padded as a stream's
    (the clips speaker samples and identification cut; `/v1/vad` answers `vad_batch` instead).

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
