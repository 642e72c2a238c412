"""Audio helpers shared by tests and benchmarks."""

from __future__ import annotations

import fractions
import io

import av
import lc3
import numpy as np

from streaming.device_codecs import LC3_FRAME_BYTES


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


def adts_frames(data: bytes) -> list[bytes]:
    """An ADTS stream cut into frames by the 13-bit frame length, as the app's Bee connector does."""
    frames, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0xFF and data[pos + 1] & 0xF0 == 0xF0
        length = ((data[pos + 3] & 0x03) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        frames.append(data[pos : pos + length])
        pos += length
    return frames


def encode_aac(audio: np.ndarray, rate: int, bitrate: int = 32000, channels: int = 1) -> list[bytes]:
    """FFmpeg's AAC-LC encoder through PyAV's ``adts`` muxer: one ADTS frame per 1024 samples."""
    layout = "mono" if channels == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate, layout=layout)
        stream.bit_rate = bitrate
        for start in range(0, len(audio) - 1023, 1024):
            block = np.tile(audio[start : start + 1024].astype(np.float32), (channels, 1))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return adts_frames(buffer.getvalue())


def encode_lc3(audio: np.ndarray, rate: int = 16000) -> list[bytes]:
    """liblc3's encoder (lc3py): one 30-byte frame per 10 ms, what ``lc3_fs1030`` devices send."""
    encoder = lc3.Encoder(10000, rate)
    step = rate // 100
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    frames = [encoder.encode(pcm[i : i + step].tobytes(), LC3_FRAME_BYTES, bit_depth=16)
              for i in range(0, len(pcm) - step + 1, step)]
    assert {len(f) for f in frames} == {LC3_FRAME_BYTES}
    return frames
