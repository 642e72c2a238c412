"""Decoding uploads for the batch endpoints: any common audio container (WAV, FLAC, OGG, MP3, M4A, WebM...), any
rate or channel count, to 16 kHz float32 mono, with limits on duration so no upload can take unbounded memory.

`iter_audio_chunks` decodes in bounded pieces from a file (the spooled upload, never a bytes copy of it), so a
caller that consumes the pieces as they come (the `/v1/vad` VAD) holds a few seconds of audio whatever the length;
`decode_audio_file` joins them for callers that need the whole signal (enrolment: minutes at most).
Blocking: callers run both in a worker thread.

PyAV (FFmpeg) opens only the audio containers in `AUDIO_DEMUXERS`: FFmpeg also probes playlists and scripts (HLS,
`ffconcat`, DASH, image sequences...) whose demuxers open the files or URLs they name, so an upload could make the
server read its own files or fetch URLs. FFmpeg's `format_whitelist` refuses any other demuxer after probing and
before its header is read, i.e. before it opens anything.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from streaming.codecs import TARGET_RATE, StreamResampler

MIN_RATE = 1000  # no real recording is sampled slower; see _soundfile_pieces
CHUNK_S = 30.0  # default piece length of iter_audio_chunks: 1.9 MB of float32
# FFmpeg demuxer names (a container's aliases count: "mov" is also mp4/m4a, "matroska" also webm). Audio containers
# only: no playlist (hls, dash), script (concat), image sequence or network demuxer.
AUDIO_DEMUXERS = ("wav", "w64", "flac", "ogg", "mp3", "mov", "mp4", "m4a", "matroska", "webm", "aac", "aiff",
                  "caf", "amr", "au")

AudioSource = bytes | BinaryIO


class AudioFileError(ValueError):
    """The upload is not usable audio. `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_audio_file(source: AudioSource, max_seconds: float) -> np.ndarray:
    """The whole upload as one 16 kHz mono float32 array (memory: twice the result while joining)."""
    return np.concatenate(list(iter_audio_chunks(source, max_seconds)))


def iter_audio_chunks(source: AudioSource, max_seconds: float, chunk_s: float = CHUNK_S) -> Iterator[np.ndarray]:
    """The upload as 16 kHz mono float32 pieces of `chunk_s` seconds (the last one shorter), decoded as they are
    taken. `source`: bytes or a seekable binary file (read from its start). Raises AudioFileError (with the HTTP
    status) when the file is empty, not audio, longer than `max_seconds`, or holds no or non-finite samples; the
    length and sample checks happen as the pieces come, so a consumer may have taken some pieces before."""
    file = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    if file.seek(0, io.SEEK_END) == 0:
        raise AudioFileError("the file is empty", 400)
    file.seek(0)
    pieces = _soundfile_pieces(file, max_seconds)
    if pieces is None:
        file.seek(0)
        pieces = _pyav_pieces(file, max_seconds)
    yield from _fixed_size(_checked(pieces), max(1, int(chunk_s * TARGET_RATE)))


def _checked(pieces: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    total = 0
    for piece in pieces:
        if not np.all(np.isfinite(piece)):
            raise AudioFileError("the audio holds NaN or infinite samples", 422)
        total += len(piece)
        yield piece
    if total == 0:
        raise AudioFileError("the file holds no audio samples", 422)


def _fixed_size(pieces: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cuts pieces of any length into `size` samples each (the last one shorter); holds under 2 x size."""
    held: list[np.ndarray] = []
    count = 0
    for piece in pieces:
        held.append(piece)
        count += len(piece)
        if count < size:
            continue
        joined = np.concatenate(held)
        cut = len(joined) - len(joined) % size
        yield from (joined[i : i + size] for i in range(0, cut, size))
        held, count = [joined[cut:]], len(joined) - cut
    if count:
        yield np.concatenate(held)


def _too_long(frames: int, rate: int, max_seconds: float) -> None:
    if frames > max_seconds * rate:
        raise AudioFileError(f"audio longer than the limit of {max_seconds:.0f} s", 413)


def _soundfile_pieces(file: BinaryIO, max_seconds: float) -> Iterator[np.ndarray] | None:
    """libsndfile's formats (WAV, FLAC, OGG Vorbis/Opus, AIFF...), or None when it is not one of them."""
    import soundfile as sf

    try:
        info = sf.info(file)
    except Exception:
        return None  # not a libsndfile format: try PyAV
    finally:
        file.seek(0)
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioFileError("invalid audio header", 422)
    if info.samplerate < MIN_RATE:
        # A tiny file whose header claims 2 Hz "lasts" hours: refused rather than upsampled at great cost.
        raise AudioFileError(f"sample rate {info.samplerate} Hz below {MIN_RATE} Hz", 422)
    _too_long(info.frames, info.samplerate, max_seconds)
    return _soundfile_blocks(file, info.samplerate, info.channels, max_seconds)


def _soundfile_blocks(file: BinaryIO, rate: int, channels: int, max_seconds: float) -> Iterator[np.ndarray]:
    import soundfile as sf

    # Block by block, downmixed and resampled as it goes: a small FLAC of many channels at a high rate must not
    # expand to (channels x rate x duration) floats in memory.
    resampler = StreamResampler(rate, TARGET_RATE)
    block = max(1, (1 << 18) // channels)  # 1 MB of float32 a read
    total = 0
    try:
        with sf.SoundFile(file) as f:
            while len(x := f.read(block, dtype="float32", always_2d=True)):
                total += len(x)
                _too_long(total, rate, max_seconds)  # headers can lie about the length
                yield resampler.process(x.mean(axis=1, dtype=np.float32))
        yield resampler.process(np.zeros(0, np.float32), last=True)
    except AudioFileError:
        raise
    except Exception as exc:
        raise AudioFileError(f"cannot decode audio: {exc}", 422) from None


def _pyav_pieces(file: BinaryIO, max_seconds: float) -> Iterator[np.ndarray]:
    import av

    try:
        container = av.open(file, mode="r", container_options={"format_whitelist": ",".join(AUDIO_DEMUXERS)})
    except Exception:
        raise AudioFileError("not a recognised audio file (accepted containers: "
                             f"{', '.join(AUDIO_DEMUXERS)})", 415) from None
    return _pyav_frames(container, max_seconds)


def _pyav_frames(container, max_seconds: float) -> Iterator[np.ndarray]:
    import av

    with container:
        if not container.streams.audio:
            raise AudioFileError("the file has no audio stream", 415)
        stream = container.streams.audio[0]
        # The resampler does downmix and rate conversion in FFmpeg, frame by frame.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    piece = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                    total += len(piece)
                    _too_long(total, TARGET_RATE, max_seconds)
                    yield piece
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
        except AudioFileError:
            raise
        except Exception as exc:
            if not total:
                raise AudioFileError(f"cannot decode audio: {type(exc).__name__}", 422) from None
            # A truncated file: keep what decoded, as players do.
