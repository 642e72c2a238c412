"""Frame decoders for the audio WebSocket: one decoder per connection, all output float32 mono at 16 kHz.

Codecs (the Omi app's names and wire contract):

- ``pcm16``: raw 16-bit little-endian signed PCM at the connection's ``sample_rate``; with ``channels=2`` the samples
  are interleaved (L R L R ...) and are downmixed to mono by averaging.
- ``pcm8``: Omi's name for 8 kHz pcm16. The bytes are identical to ``pcm16``; the connection's ``sample_rate``
  (not the codec name) decides the rate.
- ``opus``: one raw Opus packet (RFC 6716, no Ogg framing) per binary frame, decoded with libopus through PyAV.
- ``opus_fs320``: Omi's name for Opus packets that each carry a 320-sample (20 ms at 16 kHz) frame; decoded exactly
  like ``opus``.

PCM frames need not be sample-aligned: trailing bytes of a partial sample are kept and prepended to the next frame,
so nothing is lost or shifted. Everything is resampled to 16 kHz by a stateful per-decoder :class:`StreamResampler`
(python-soxr), so frame boundaries leave no clicks; at 16 kHz in, PCM passes through bit-exactly
(``int16 / 32768``). Opus is always decoded at 48 kHz (PyAV's libopus wrapper forces that) and resampled 48k -> 16k.

A frame that cannot be decoded raises :class:`DecodeError` and bumps ``failed_frames``; the decoder stays usable and
the next good frame decodes normally. Note that Opus cannot detect every corruption: many byte strings (any
single-frame packet, for instance) are syntactically valid packets and decode to noise or concealment, so only
malformed packets (bad frame lengths, oversized frames, empty frames, ...) are rejected.

Decoders hold per-stream state only; nothing module-level is mutable.
"""

from __future__ import annotations

import operator
from typing import Final

import av
import av.error
import numpy as np
import soxr

__all__ = [
    "SUPPORTED_CODECS",
    "TARGET_RATE",
    "DecodeError",
    "FrameDecoder",
    "OpusDecoder",
    "PcmDecoder",
    "StreamResampler",
    "make_decoder",
    "resample",
]

TARGET_RATE: Final = 16000
SUPPORTED_CODECS: Final = ("pcm8", "pcm16", "opus", "opus_fs320")

MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000
OPUS_SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
OPUS_DECODE_RATE: Final = 48000
RESAMPLE_QUALITY: Final = "HQ"

_EMPTY: Final = np.zeros(0, dtype=np.float32)
_EMPTY.setflags(write=False)
_PCM_SCALE: Final = np.float32(1.0 / 32768.0)
_PCM_STEREO_SCALE: Final = np.float32(1.0 / 65536.0)


class DecodeError(ValueError):
    """A single frame could not be decoded; the stream goes on."""


def _empty() -> np.ndarray:
    return _EMPTY.copy()


def _as_mono_float32(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"expected mono (1-D) audio, got shape {audio.shape}")
    return np.ascontiguousarray(audio, dtype=np.float32)


class StreamResampler:
    """Stateful streaming resampler (soxr), float32 mono in and out; a passthrough when the rates are equal.

    Feed consecutive chunks to :meth:`process`; pass ``last=True`` (possibly with an empty chunk) at the end of the
    stream to drain the filter. The output is delay-compensated: concatenated it matches :func:`resample` of the
    whole signal. After ``last=True`` the resampler is reset and can start a new stream.
    """

    def __init__(self, in_rate: int, out_rate: int = TARGET_RATE) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._stream: soxr.ResampleStream | None = None
        if self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        audio = _as_mono_float32(audio)
        if self._stream is None:
            return audio
        out = self._stream.resample_chunk(audio, last=last)
        if last:
            self._stream.clear()
        return out


def resample(audio: np.ndarray, in_rate: int, out_rate: int = TARGET_RATE) -> np.ndarray:
    """Resample a whole mono signal in one go (batch mode); returns float32."""
    audio = _as_mono_float32(audio)
    if in_rate == out_rate:
        return audio
    return np.asarray(soxr.resample(audio, in_rate, out_rate, quality=RESAMPLE_QUALITY), dtype=np.float32)


class FrameDecoder:
    """Base class: decodes one connection's frames into float32 mono 16 kHz audio in [-1, 1].

    ``decoded_frames`` counts frames accepted (including empty PCM frames), ``failed_frames`` frames that raised
    :class:`DecodeError`.
    """

    codec: str
    sample_rate: int
    channels: int

    def __init__(self, codec: str, sample_rate: int, channels: int, decode_rate: int) -> None:
        self.codec = codec
        self.sample_rate = sample_rate
        self.channels = channels
        self.decoded_frames = 0
        self.failed_frames = 0
        self._resampler = StreamResampler(decode_rate, TARGET_RATE)

    def decode(self, frame: bytes) -> np.ndarray:
        """Decode one frame; may return an empty array (bytes buffered, resampler filling up)."""
        try:
            if not isinstance(frame, (bytes, bytearray, memoryview)):
                raise DecodeError(f"expected a binary frame, got {type(frame).__name__}")
            audio = self._decode_frame(frame)
        except DecodeError:
            self.failed_frames += 1
            raise
        self.decoded_frames += 1
        return self._finish(self._resampler.process(audio))

    def flush(self) -> np.ndarray:
        """End of stream: drop incomplete bytes and drain the resampler. The decoder may then be reused."""
        self._reset_partial()
        return self._finish(self._resampler.process(_EMPTY, last=True))

    def _decode_frame(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        """Return float32 mono audio at the decoder's native rate, or raise DecodeError."""
        raise NotImplementedError

    def _reset_partial(self) -> None:
        """Forget any buffered partial input (end of stream)."""

    @staticmethod
    def _finish(audio: np.ndarray) -> np.ndarray:
        if audio.size == 0:
            return _empty()
        if not audio.flags.writeable or not audio.flags.owndata:
            audio = audio.copy()
        return np.clip(audio, -1.0, 1.0, out=audio)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(codec={self.codec!r}, sample_rate={self.sample_rate}, channels={self.channels}, "
            f"decoded_frames={self.decoded_frames}, failed_frames={self.failed_frames})"
        )


class PcmDecoder(FrameDecoder):
    """16-bit little-endian PCM (``pcm16``/``pcm8``), interleaved when stereo; partial samples carry over."""

    def __init__(self, codec: str, sample_rate: int, channels: int) -> None:
        super().__init__(codec, sample_rate, channels, decode_rate=sample_rate)
        self._bytes_per_frame = 2 * channels
        self._carry = b""

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete sample held back for the next frame."""
        return len(self._carry)

    def _reset_partial(self) -> None:
        self._carry = b""

    def _decode_frame(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        data: bytes | bytearray | memoryview = frame
        if self._carry:
            data = self._carry + bytes(frame)
        size = len(data)
        usable = size - size % self._bytes_per_frame
        self._carry = bytes(data[usable:]) if usable < size else b""
        if usable == 0:
            return _EMPTY
        samples = np.frombuffer(data, dtype="<i2", count=usable // 2)
        if self.channels == 1:
            return samples.astype(np.float32) * _PCM_SCALE
        pairs = samples.reshape(-1, 2).astype(np.float32)
        return (pairs[:, 0] + pairs[:, 1]) * _PCM_STEREO_SCALE  # exact: int sums and power-of-two scales


class OpusDecoder(FrameDecoder):
    """One raw Opus packet per frame (``opus``/``opus_fs320``), decoded by PyAV at 48 kHz then resampled."""

    def __init__(self, codec: str, sample_rate: int, channels: int) -> None:
        super().__init__(codec, sample_rate, channels, decode_rate=OPUS_DECODE_RATE)
        self._ctx = self._open_context()

    def _open_context(self) -> av.AudioCodecContext:
        try:
            ctx = av.CodecContext.create("libopus", "r")
            ctx.options = {"request_sample_fmt": "flt"}  # libopus gives s16 unless asked for float
        except (av.error.FFmpegError, ValueError):
            ctx = av.CodecContext.create("opus", "r")  # FFmpeg's native decoder (fltp)
        ctx.sample_rate = OPUS_DECODE_RATE
        ctx.layout = "mono" if self.channels == 1 else "stereo"
        return ctx

    def _decode_frame(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        if len(frame) == 0:
            # Never hand an empty packet to FFmpeg: that means "flush" and puts the decoder into EOF state.
            raise DecodeError("empty Opus frame")
        try:
            frames = self._ctx.decode(av.Packet(bytes(frame)))
        except av.error.EOFError as exc:  # defensive: the context is drained and cannot decode anything more
            self._ctx = self._open_context()
            raise DecodeError(f"Opus decoder reached end of stream, reopened: {exc}") from exc
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise DecodeError(f"invalid Opus packet ({len(frame)} bytes): {exc}") from exc
        if not frames:
            return _EMPTY
        parts = []
        for audio_frame in frames:
            if audio_frame.sample_rate != OPUS_DECODE_RATE:
                raise DecodeError(f"unexpected Opus output rate {audio_frame.sample_rate}")
            parts.append(_audio_frame_to_mono(audio_frame))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _audio_frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Any PyAV audio frame (packed or planar, int or float) -> float32 mono."""
    arr = frame.to_ndarray()
    if arr.dtype.kind in "iu":
        if arr.dtype == np.uint8:
            arr = (arr.astype(np.float32) - 128.0) / 128.0
        else:
            arr = arr.astype(np.float32) / np.float32(2 ** (8 * arr.dtype.itemsize - 1))
    elif arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if frame.format.is_planar:  # (channels, samples)
        return arr[0] if arr.shape[0] == 1 else arr.mean(axis=0, dtype=np.float32)
    channels = frame.layout.nb_channels
    flat = arr.reshape(-1)  # packed: (1, samples * channels), interleaved
    return flat if channels == 1 else flat.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def make_decoder(codec: str, sample_rate: int, channels: int) -> FrameDecoder:
    """Build a fresh per-connection decoder; ValueError (with a clear message) for bad parameters."""
    if not isinstance(codec, str) or codec.strip().lower() not in SUPPORTED_CODECS:
        raise ValueError(f"unsupported codec {codec!r}; expected one of {', '.join(SUPPORTED_CODECS)}")
    codec = codec.strip().lower()
    sample_rate = _as_int("sample_rate", sample_rate)
    channels = _as_int("channels", channels)
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got {sample_rate}")
    if codec.startswith("opus"):
        if sample_rate not in OPUS_SAMPLE_RATES:
            rates = ", ".join(map(str, OPUS_SAMPLE_RATES))
            raise ValueError(f"sample_rate {sample_rate} is not an Opus rate; expected one of {rates}")
        return OpusDecoder(codec, sample_rate, channels)
    return PcmDecoder(codec, sample_rate, channels)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"{name} must be an integer, got {value!r}")
