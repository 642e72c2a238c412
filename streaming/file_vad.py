"""`/v1/vad`'s batch mode: the speech regions of a whole file, in seconds, speech as it is (`streaming.vad_batch`:
no live-gate padding, its own VAD_BATCH_* parameters).

`file_speech_regions` scores the file piece by piece as it is decoded (`audiofile.iter_audio_chunks`), the VAD's
state carried from piece to piece, so memory does not grow with the file's length beyond its probabilities (one float
per 32 ms; bench/vad_memory.py) and the regions equal those of the whole signal at once (`speech_regions`; tested
on real speech). Blocking: call from a worker thread.
"""

from __future__ import annotations

import numpy as np

from streaming.audiofile import AudioSource, iter_audio_chunks
from streaming.vad_backends import SAMPLE_RATE, VadBackend
from streaming.vad_batch import BatchVadParams, batch_regions

CHUNK_S = 30.0  # seconds decoded and scored at a time: ~2 MB of audio plus the model's input


def speech_regions(backend: VadBackend, audio: np.ndarray, params: BatchVadParams) -> list[dict[str, float]]:
    """The regions of a whole 16 kHz signal held in memory."""
    return _in_seconds(batch_regions(backend, [audio], params))


def file_speech_regions(backend: VadBackend, source: AudioSource, params: BatchVadParams, max_seconds: float,
                        chunk_s: float = CHUNK_S) -> list[dict[str, float]]:
    """The regions of an audio file (bytes or a seekable file), decoded and scored `chunk_s` seconds at a time.
    Raises `audiofile.AudioFileError` for an upload that is not usable audio."""
    return _in_seconds(batch_regions(backend, iter_audio_chunks(source, max_seconds, chunk_s), params))


def _in_seconds(regions: list[tuple[int, int]]) -> list[dict[str, float]]:
    out = []
    for s, e in regions:
        start, end = round(s / SAMPLE_RATE, 3), round(e / SAMPLE_RATE, 3)
        out.append({"start": start, "end": end, "duration": round(end - start, 3)})
    return out
