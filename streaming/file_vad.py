"""`/v1/vad`'s batch mode: the merged speech regions of a whole file, in seconds, with the streaming VAD's code.

`file_speech_regions` scores the file piece by piece as it is decoded (`audiofile.iter_audio_chunks`), the VAD's
state carried from piece to piece, so memory does not grow with the file's length (bench/vad_memory.py) and the
regions equal those of the whole signal at once (`speech_regions`, `vad.detect_regions`; tested on real speech).
Blocking: call from a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from streaming.audiofile import AudioSource, iter_audio_chunks
from streaming.vad import (
    SAMPLE_RATE,
    StreamingVAD,
    VadBackend,
    VadEvent,
    VadParams,
    detect_regions,
    merged_regions,
    paired_regions,
)

CHUNK_S = 30.0  # seconds decoded and scored at a time: ~2 MB of audio plus the model's input


def speech_regions(backend: VadBackend, audio: np.ndarray, params: VadParams) -> list[dict[str, float]]:
    """The regions of a whole 16 kHz signal held in memory."""
    return _in_seconds(detect_regions(backend, audio, params))


def file_speech_regions(backend: VadBackend, source: AudioSource, params: VadParams, max_seconds: float,
                        chunk_s: float = CHUNK_S) -> list[dict[str, float]]:
    """The regions of an audio file (bytes or a seekable file), decoded and scored `chunk_s` seconds at a time.
    Raises `audiofile.AudioFileError` for an upload that is not usable audio."""
    return _in_seconds(chunked_regions(backend, iter_audio_chunks(source, max_seconds, chunk_s), params))


def chunked_regions(backend: VadBackend, chunks: Iterable[np.ndarray], params: VadParams) -> list[tuple[int, int]]:
    """`vad.detect_regions` of the signal the pieces make up, holding one piece at a time: the same VAD events
    (its state goes on from piece to piece), then the same filtering and merging."""
    vad = StreamingVAD(backend, params)
    regions = paired_regions(_events(vad, chunks))
    return merged_regions(regions, vad.position, params)  # the position once every piece went through


def _events(vad: StreamingVAD, chunks: Iterable[np.ndarray]) -> Iterator[VadEvent]:
    """The VAD's events over the pieces, then its end-of-signal flush; each piece is let go once scored."""
    for chunk in chunks:
        yield from vad.process(chunk)
    yield from vad.flush()


def _in_seconds(regions: list[tuple[int, int]]) -> list[dict[str, float]]:
    out = []
    for s, e in regions:
        start, end = round(s / SAMPLE_RATE, 3), round(e / SAMPLE_RATE, 3)
        out.append({"start": start, "end": end, "duration": round(end - start, 3)})
    return out
