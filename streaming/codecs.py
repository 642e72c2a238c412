"""Frame decoders for the audio WebSocket: one decoder per connection, all output float32 mono at 16 kHz.

Codecs (the Omi app's names and wire contract):

- ``pcm16``: raw 16-bit little-endian signed PCM at the connection's ``sample_rate``; with ``channels=2`` the samples
  are interleaved (L R L R ...) and are downmixed to mono by averaging.
- ``pcm8``: Omi's name for 8 kHz pcm16. The bytes are identical to ``pcm16``; the connection's ``sample_rate``
  (not the codec name) decides the rate.
- ``opus``: one raw Opus packet (RFC 6716, no Ogg framing) per binary frame, decoded with libopus (see
  :class:`OpusDecoder`).
- ``opus_fs320``: Omi's name for Opus packets that each carry a 320-sample (20 ms at 16 kHz) frame; decoded exactly
  like ``opus``.
- ``aac`` (ADTS frames) and ``lc3_fs1030`` (30-byte 10 ms LC3 frames): see :mod:`streaming.device_codecs`.

PCM frames need not be sample-aligned: trailing bytes of a partial sample are kept and prepended to the next frame,
so nothing is lost or shifted. Everything is resampled to 16 kHz by a stateful per-decoder :class:`StreamResampler`
(python-soxr), so frame boundaries leave no clicks; at 16 kHz in, PCM passes through bit-exactly
(``int16 / 32768``). Opus is decoded by libopus directly at 16 kHz (whatever rate the packets were encoded at), so
it needs no resampler; only the PyAV fallback decodes at 48 kHz (FFmpeg's libopus wrapper forces that) and resamples.

A frame that cannot be decoded raises :class:`DecodeError` and bumps ``failed_frames``; the decoder stays usable and
the next good frame decodes normally. Note that Opus cannot detect every corruption: many byte strings (any
single-frame packet, for instance) are syntactically valid packets and decode to noise or concealment, so only
malformed packets (bad frame lengths, oversized frames, empty frames, ...) are rejected.

Decoders hold per-stream state only; nothing module-level is mutable (the libopus bindings are loaded once, on first
use, and never change afterwards).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import operator
import os
import weakref
from typing import Final

import av
import av.error
import numpy as np
import soxr

from streaming.native_lib import first_loadable

__all__ = [
    "SUPPORTED_CODECS",
    "TARGET_RATE",
    "DecodeError",
    "FrameDecoder",
    "OpusDecoder",
    "libopus_version",
    "PcmDecoder",
    "StreamResampler",
    "make_decoder",
    "resample",
]

TARGET_RATE: Final = 16000
SUPPORTED_CODECS: Final = ("pcm8", "pcm16", "opus", "opus_fs320", "aac", "lc3_fs1030")

MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000
OPUS_SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
OPUS_DECODE_RATE: Final = 48000  # the PyAV fallback's rate; libopus decodes at TARGET_RATE
OPUS_MAX_FRAME: Final = TARGET_RATE * 120 // 1000  # the longest Opus packet (120 ms), in samples per channel
OPUS_BACKENDS: Final = ("libopus", "pyav")
RESAMPLE_QUALITY: Final = "HQ"

_EMPTY: Final = np.zeros(0, dtype=np.float32)
_EMPTY.setflags(write=False)
_PCM_SCALE: Final = np.float32(1.0 / 32768.0)
_PCM_STEREO_SCALE: Final = np.float32(1.0 / 65536.0)
_HALF: Final = np.float32(0.5)

log = logging.getLogger(__name__)


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
        return self._deliver(audio)

    def _deliver(self, audio: np.ndarray) -> np.ndarray:
        """A decoded frame at the decoder's rate -> float32 16 kHz in [-1, 1]."""
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
    """One raw Opus packet per frame (``opus``/``opus_fs320``), decoded at 16 kHz by libopus through ctypes.

    Opus decodes natively at 8/12/16/24/48 kHz whatever rate a packet was encoded at, so libopus decodes straight to
    16 kHz: no resampler, no frame conversion, and every packet gives exactly its duration at 16 kHz (320 samples for
    20 ms), nothing buffered. That costs less than half the old PyAV path's CPU (FFmpeg's libopus wrapper always
    decodes at 48 kHz, which then needs a 48k -> 16k resampler), and the audio is as close to the original or closer
    (CELT packets decode to the same audio; SILK's 16 kHz speech skips libopus's upsampler to 48 kHz and soxr's way
    back: 6-9 dB better SNR; see tests/test_codecs.py). The decoder has the connection's channel count; stereo
    output is averaged to mono, and a mono decoder downmixes stereo packets itself (libopus averages the channels).

    Which libopus (``backend="libopus"``, the default when one loads; see :func:`libopus_version`):

    1. the system's, found by ``ctypes.util.find_library("opus")`` (Debian's ``libopus0``): it gets the
       distribution's security updates, so it is preferred when present;
    2. otherwise the copy PyAV's wheel bundles (``av.libs/libopus-*.so*`` next to the ``av`` package, found by glob
       relative to ``av.__file__``): always there with the wheel, which the project depends on anyway.

    A candidate is used only if its symbols resolve and ``opus_get_version_string()`` names libopus. When none
    loads, the decoder falls back to PyAV (``backend="pyav"``, also selectable explicitly): libopus or FFmpeg's
    native decoder at 48 kHz, then a per-stream soxr resampler to 16 kHz (output delayed by the resampler, drained by
    :meth:`flush`).

    A negative return from ``opus_decode_float`` is a :class:`DecodeError` carrying libopus's message
    (``opus_strerror``); so is an empty frame (packet loss concealment is not used). libopus validates every packet
    (RFC 6716 framing) and is given the exact packet length and the output buffer's size (120 ms, the longest packet
    there is), so no byte string can make it read or write out of bounds. The libopus state is freed
    (``opus_decoder_destroy``) when the decoder is garbage-collected. Like every decoder it is used by one thread at
    a time; ctypes releases the GIL during the libopus calls.
    """

    def __init__(self, codec: str, sample_rate: int, channels: int, *, backend: str | None = None) -> None:
        if backend is None:
            backend = "libopus" if _libopus() is not None else "pyav"
        if backend not in OPUS_BACKENDS:
            raise ValueError(f"unknown Opus backend {backend!r}; expected one of {', '.join(OPUS_BACKENDS)}")
        lib = _libopus() if backend == "libopus" else None
        if backend == "libopus" and lib is None:
            raise ValueError("libopus backend requested but no libopus could be loaded")
        super().__init__(
            codec, sample_rate, channels, decode_rate=TARGET_RATE if lib is not None else OPUS_DECODE_RATE
        )
        self.backend = backend
        self._lib = lib
        self._ctx: av.AudioCodecContext | None = None
        if lib is None:
            self._ctx = self._open_context()
            return
        error = ctypes.c_int(0)
        state = lib.decoder_create(TARGET_RATE, channels, ctypes.byref(error))
        if error.value != 0 or not state:
            if state:
                lib.decoder_destroy(state)
            raise ValueError(f"opus_decoder_create failed: {lib.error_message(error.value)}")
        self._state = ctypes.c_void_p(state)
        self._finalizer = weakref.finalize(self, lib.decoder_destroy, self._state)  # frees it on GC
        self._pcm = np.zeros(OPUS_MAX_FRAME * channels, dtype=np.float32)
        self._pcm_ptr = ctypes.c_void_p(self._pcm.ctypes.data)

    def _open_context(self) -> av.AudioCodecContext:
        try:
            ctx = av.CodecContext.create("libopus", "r")
            ctx.options = {"request_sample_fmt": "flt"}  # libopus gives s16 unless asked for float
        except (av.error.FFmpegError, ValueError):
            ctx = av.CodecContext.create("opus", "r")  # FFmpeg's native decoder (fltp)
        ctx.sample_rate = OPUS_DECODE_RATE
        ctx.layout = "mono" if self.channels == 1 else "stereo"
        return ctx

    def _deliver(self, audio: np.ndarray) -> np.ndarray:
        if self._lib is None:
            return super()._deliver(audio)
        # libopus path: already 16 kHz, so skip the (passthrough) resampler and the base class's copies.
        np.minimum(audio, 1.0, out=audio)  # np.clip's Python wrapper costs more than the two ufuncs
        np.maximum(audio, -1.0, out=audio)
        return audio

    def _decode_libopus(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        """Decode one packet at 16 kHz into a fresh float32 mono array (not yet clipped), or raise DecodeError."""
        data = frame if isinstance(frame, bytes) else bytes(frame)
        if not data:
            raise DecodeError("empty Opus frame")  # libopus would take it as a lost packet and conceal it
        n = self._lib.decode_float(self._state, data, len(data), self._pcm_ptr, OPUS_MAX_FRAME, 0)
        if n < 0:
            raise DecodeError(f"invalid Opus packet ({len(data)} bytes): {self._lib.error_message(n)}")
        if self.channels == 1:
            return self._pcm[:n].copy()
        pcm = self._pcm[: 2 * n]
        out = pcm[0::2] + pcm[1::2]
        out *= _HALF
        return out

    def _decode_frame(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        """libopus at 16 kHz, or the PyAV path (48 kHz; `_deliver` resamples it)."""
        if self._lib is not None:
            return self._decode_libopus(frame)
        if len(frame) == 0:
            # Never hand an empty packet to FFmpeg: that means "flush" and puts the decoder into EOF state.
            raise DecodeError("empty Opus frame")
        assert self._ctx is not None
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


def libopus_version() -> str | None:
    """The version string of the libopus that :class:`OpusDecoder` uses, and where it came from; None if none loads
    (the decoders then use PyAV)."""
    lib = _libopus()
    return None if lib is None else f"{lib.version} ({lib.path})"


def _libopus_candidates() -> list[str]:
    """Paths or names to try, best first: the system's libopus, then the copy bundled in PyAV's wheel."""
    candidates = []
    system = ctypes.util.find_library("opus")
    if system:
        candidates.append(system)
    package_dir = os.path.dirname(os.path.abspath(av.__file__))
    site_dir = os.path.dirname(package_dir)
    patterns = [
        os.path.join(site_dir, "av.libs", "libopus*.so*"),  # Linux wheels (auditwheel)
        os.path.join(package_dir, ".dylibs", "libopus*.dylib"),  # macOS wheels (delocate)
        os.path.join(site_dir, "av.libs", "*opus*.dll"),  # Windows wheels (delvewheel)
        os.path.join(package_dir, "*opus*.dll"),
    ]
    for pattern in patterns:
        candidates.extend(sorted(glob.glob(pattern)))
    return candidates


class _LibOpus:
    """ctypes bindings to one loaded libopus: the few decoder calls used here. Raises OSError (not loadable, or not
    libopus) or AttributeError (a symbol is missing)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        version = lib.opus_get_version_string
        version.argtypes = []
        version.restype = ctypes.c_char_p
        self.strerror = lib.opus_strerror
        self.strerror.argtypes = [ctypes.c_int]
        self.strerror.restype = ctypes.c_char_p
        self.decoder_create = lib.opus_decoder_create  # OpusDecoder *(opus_int32 Fs, int channels, int *error)
        self.decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        self.decoder_create.restype = ctypes.c_void_p
        self.decoder_destroy = lib.opus_decoder_destroy
        self.decoder_destroy.argtypes = [ctypes.c_void_p]
        self.decoder_destroy.restype = None
        # int opus_decode_float(OpusDecoder *st, const unsigned char *data, opus_int32 len, float *pcm,
        #                       int frame_size, int decode_fec): samples per channel, or a negative error code
        self.decode_float = lib.opus_decode_float
        self.decode_float.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int
        ]
        self.decode_float.restype = ctypes.c_int
        raw = version()
        if not raw or not raw.startswith(b"libopus"):
            raise OSError(f"{path}: opus_get_version_string() gave {raw!r}, not a libopus version")
        self.version = raw.decode(errors="replace")
        self.path = path
        self._cdll = lib  # keeps the library loaded

    def error_message(self, code: int) -> str:
        message = self.strerror(code)
        return message.decode(errors="replace") if message else f"libopus error {code}"


@functools.cache
def _libopus() -> _LibOpus | None:
    """The first libopus candidate that loads and answers a version call, bound once; None when there is none."""
    lib = first_loadable(_libopus_candidates(), _LibOpus, "libopus")
    if lib is not None:
        log.info("Opus frames decoded at 16 kHz by %s from %s", lib.version, lib.path)
        return lib
    log.warning("no usable libopus found; Opus frames are decoded by PyAV at 48 kHz and resampled")
    return None


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
    if codec in ("aac", "lc3_fs1030"):
        from streaming.device_codecs import make_device_decoder  # imported here: that module imports this one

        return make_device_decoder(codec, sample_rate, channels)
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
