"""Whole-file decoding for the batch endpoints: any common container (WAV, FLAC, OGG, MP3, M4A, WebM...), any
rate or channel count, to 16 kHz float32 mono, with limits on size and duration so no upload can take unbounded
memory. Blocking: callers run `decode_audio_file` in a worker thread.
"""

from __future__ import annotations

import io

import numpy as np

from streaming.codecs import TARGET_RATE, StreamResampler, resample

MIN_RATE = 1000  # no real recording is sampled slower; see _decode_soundfile


class AudioFileError(ValueError):
    """The upload is not usable audio. `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_audio_file(data: bytes, max_seconds: float) -> np.ndarray:
    if not data:
        raise AudioFileError("the file is empty", 400)
    audio, rate = _decode_soundfile(data, max_seconds)
    if audio is None:
        audio, rate = _decode_pyav(data, max_seconds)
    if audio.size == 0:
        raise AudioFileError("the file holds no audio samples", 422)
    if not np.all(np.isfinite(audio)):
        raise AudioFileError("the audio holds NaN or infinite samples", 422)
    return resample(audio, rate, TARGET_RATE) if rate != TARGET_RATE else audio


def _too_long(frames: int, rate: int, max_seconds: float) -> None:
    if frames > max_seconds * rate:
        raise AudioFileError(f"audio longer than the limit of {max_seconds:.0f} s", 413)


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray | None, int]:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        return None, 0  # not a libsndfile format: try PyAV
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioFileError("invalid audio header", 422)
    if info.samplerate < MIN_RATE:
        # A tiny file whose header claims 2 Hz "lasts" hours: refused rather than upsampled at great cost.
        raise AudioFileError(f"sample rate {info.samplerate} Hz below {MIN_RATE} Hz", 422)
    _too_long(info.frames, info.samplerate, max_seconds)
    # Block by block, downmixed and resampled as it goes: a small FLAC of many channels at a high rate must not
    # expand to (channels x rate x duration) floats in memory; peak memory is the 16 kHz mono result.
    resampler = StreamResampler(info.samplerate, TARGET_RATE)
    block = max(1, (1 << 20) // info.channels)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            while len(x := f.read(block, dtype="float32", always_2d=True)):
                total += len(x)
                _too_long(total, info.samplerate, max_seconds)  # headers can lie about the length
                chunks.append(resampler.process(x.mean(axis=1, dtype=np.float32)))
        chunks.append(resampler.process(np.zeros(0, np.float32), last=True))
    except AudioFileError:
        raise
    except Exception as exc:
        raise AudioFileError(f"cannot decode audio: {exc}", 422) from None
    return np.concatenate(chunks), TARGET_RATE


def _decode_pyav(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:
        raise AudioFileError("not a recognised audio file", 415) from None
    with container:
        if not container.streams.audio:
            raise AudioFileError("the file has no audio stream", 415)
        stream = container.streams.audio[0]
        # The resampler does downmix and rate conversion in ffmpeg, chunk by chunk, so memory stays bounded by
        # the duration limit rather than the source's channel count or rate.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    total += len(chunk)
                    _too_long(total, TARGET_RATE, max_seconds)
                    chunks.append(chunk)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except AudioFileError:
            raise
        except Exception as exc:
            if not chunks:
                raise AudioFileError(f"cannot decode audio: {type(exc).__name__}", 422) from None
            # A truncated file: keep what decoded, as players do.
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return audio, TARGET_RATE
