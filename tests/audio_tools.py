"""Audio helpers shared by tests and benchmarks."""

from __future__ import annotations

import fractions

import av
import numpy as np


def encode_opus(audio: np.ndarray, rate: int, channels: int = 1, bitrate: int = 32000, frame_ms: int = 20):
    """Encode mono float audio at `rate` into raw Opus packets (one per frame) with PyAV's libopus encoder."""
    layout = "mono" if channels == 1 else "stereo"
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = rate
    enc.layout = layout
    enc.format = "flt"
    enc.bit_rate = bitrate
    enc.time_base = fractions.Fraction(1, rate)
    enc.options = {"frame_duration": str(frame_ms)}
    enc.open()
    n = enc.frame_size
    assert n == rate * frame_ms // 1000
    packets: list[bytes] = []
    for start in range(0, len(audio) - n + 1, n):
        block = audio[start : start + n].astype(np.float32)
        if channels == 2:  # left = signal, right = the signal at half level: downmix is 0.75 * signal
            block = np.stack([block, 0.5 * block], axis=1).reshape(-1)
        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="flt", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        packets.extend(bytes(p) for p in enc.encode(frame))
    packets.extend(bytes(p) for p in enc.encode(None))
    return packets
