"""`/v1/vad`'s decision: speech as it is, from a whole file's speech probabilities, without the live gate's padding.

The live gate (`streaming.vad_gate`) pads every region with pre-roll and hangover so STT never clips a word; on
`/v1/vad` that padding is reported as speech and scored as false alarm. Here a file is scored first (probabilities
are one float per 32 ms frame, 450 kB an hour, so they are all kept) and then decided in one pass:

1. optional median smoothing of the probabilities over `smooth_frames` frames;
2. hysteresis: a run of frames at or above `offset` is speech when one of its frames reaches `onset`;
3. gaps shorter than `min_silence_ms` are closed, then regions shorter than `min_speech_ms` are dropped;
4. each region is widened by `pad_ms` on both sides (within the file), overlapping ones joined.

`regions_from_probs` is a pure function of the probabilities, so bench/vad_der.py sweeps and cross-validates the
parameters on cached probabilities with the very code the server runs. The defaults (config.py, VAD_BATCH_*) are
the parameters leave-one-meeting-out cross-validation chooses on the AMI excerpts (README "Voice activity
detection").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

from config import Settings
from streaming.vad_backends import SAMPLE_RATE, VadBackend


@dataclass(frozen=True)
class BatchVadParams:
    """The defaults equal config.Settings' VAD_BATCH_* (a test checks); the server builds these from settings."""

    onset: float = 0.15
    offset: float = 0.15
    min_speech_ms: int = 250
    min_silence_ms: int = 1100
    pad_ms: int = 125
    smooth_frames: int = 1  # odd; 1: no smoothing

    @classmethod
    def from_settings(cls, s: Settings) -> BatchVadParams:
        return cls(onset=s.vad_batch_onset, offset=s.vad_batch_offset, min_speech_ms=s.vad_batch_min_speech_ms,
                   min_silence_ms=s.vad_batch_min_silence_ms, pad_ms=s.vad_batch_pad_ms,
                   smooth_frames=s.vad_batch_smooth_frames)


def speech_probabilities(backend: VadBackend, chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The backend's probabilities over the signal the pieces make up, one stream state carried from piece to piece
    (so any cut gives the same result); the last partial chunk is zero-padded. Holds one piece at a time.
    Shape (ceil(samples / chunk_samples) * chunk_samples / frame_samples,)."""
    state = backend.new_state()
    chunk = backend.chunk_samples
    pending = np.zeros(0, np.float32)
    out: list[np.ndarray] = []
    for piece in chunks:
        buf = np.concatenate((pending, np.asarray(piece, np.float32).reshape(-1)))
        usable = len(buf) - len(buf) % chunk
        if usable:
            out.append(backend.speech_probs(state, buf[:usable]))
        pending = buf[usable:]
    if len(pending):
        padded = np.zeros(chunk, np.float32)
        padded[: len(pending)] = pending
        out.append(backend.speech_probs(state, padded))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _hysteresis(probs: np.ndarray, onset: float, offset: float) -> list[tuple[int, int]]:
    """(first, last + 1) frame pairs of the runs at or above `offset` that hold a frame at or above `onset`."""
    keep = probs >= offset
    edges = np.diff(np.concatenate(([0], keep.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return []
    # A run holds an onset frame iff the count of onset frames before its end exceeds that before its start.
    above = np.concatenate(([0], np.cumsum(probs >= onset)))
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True) if above[e] > above[s]]


def regions_from_probs(probs: np.ndarray, frame_samples: int, length: int,
                       params: BatchVadParams) -> list[tuple[int, int]]:
    """Speech regions as (start, end) sample pairs of a signal of `length` samples, from its frame probabilities."""
    if params.smooth_frames > 1 and len(probs):
        probs = median_filter(probs, size=params.smooth_frames, mode="nearest")
    min_gap = params.min_silence_ms * SAMPLE_RATE / 1000
    min_len = params.min_speech_ms * SAMPLE_RATE / 1000
    pad = int(params.pad_ms * SAMPLE_RATE / 1000)
    closed: list[tuple[int, int]] = []
    for first, stop in _hysteresis(np.asarray(probs), params.onset, params.offset):
        s, e = first * frame_samples, min(stop * frame_samples, length)
        if s >= e:
            continue
        if closed and s - closed[-1][1] < min_gap:
            closed[-1] = (closed[-1][0], e)
        else:
            closed.append((s, e))
    out: list[tuple[int, int]] = []
    for s, e in closed:
        if e - s < min_len:
            continue
        s, e = max(0, s - pad), min(length, e + pad)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def batch_regions(backend: VadBackend, chunks: Iterable[np.ndarray], params: BatchVadParams) -> list[tuple[int, int]]:
    """`/v1/vad`'s regions of the signal the pieces make up, as (start, end) samples."""
    length = 0

    def counted() -> Iterable[np.ndarray]:
        nonlocal length
        for piece in chunks:
            length += len(piece)
            yield piece

    probs = speech_probabilities(backend, counted())
    return regions_from_probs(probs, backend.frame_samples, length, params)
