"""Decoders for the Omi app's device codecs ``aac`` and ``lc3_fs1030`` (see :mod:`streaming.codecs` for the rest).

Both output float32 mono 16 kHz like every :class:`~streaming.codecs.FrameDecoder`; a frame they cannot decode raises
:class:`~streaming.codecs.DecodeError` and the stream goes on. Wire formats, as Omi's sources define them:

- ``aac``: one complete ADTS frame (7- or 9-byte header + raw AAC data) per binary WebSocket frame. The app's
  AAC device (``app/lib/services/devices/connectors/bee_connection.dart``, ``processAudioPacket``) reassembles BLE
  notifications into whole ADTS frames by the header's 13-bit frame length and forwards each one; Omi's backend
  hands each WebSocket frame to FFmpeg's ``aac`` decoder with no extradata (``backend/utils/aac.py``, "Decode one
  AAC frame with ADTS header"), so raw AAC without ADTS headers is not decodable by Omi either and is refused here
  (DecodeError). The audio's rate and channel count come from the ADTS header, not from the connection's
  ``sample_rate``/``channels`` (Omi resamples the decoded audio *to* ``sample_rate``; we always go to 16 kHz). A
  frame may hold several whole ADTS frames back to back (up to :data:`MAX_FRAMES_PER_MESSAGE`); a truncated one, a
  missing sync word or a bad header is a DecodeError before FFmpeg sees anything.
- ``lc3_fs1030``: LC3 (Bluetooth LE Audio codec) with 10 ms frames of 30 bytes (24 kbps), mono, at the
  connection's ``sample_rate`` (the app sends 16000: ``mapCodecToSampleRate`` in
  ``app/lib/backend/schema/bt_device/bt_device.dart``). Omi's backend maps the name to ``lc3_frame_duration_us=10000``
  and ``lc3_chunk_size=30`` (``backend/utils/transcribe_decisions.py`` ``normalize_codec_frame``) and decodes each
  WebSocket frame as one LC3 frame with ``lc3py`` (``backend/routers/listen/receiver.py``); its replay harness
  sends one 30-byte frame per WebSocket message, 320 bytes of 16-bit PCM out each. Here a binary frame carries one
  or more whole 30-byte LC3 frames; any other length is a DecodeError.

LC3 is decoded by liblc3 (Google's reference implementation) through ctypes, not through ``lc3py``'s classes: those
leak each decoder's state (their ``__del__`` builds a generator that never runs ``free``) and hide liblc3's "this
frame was corrupt, packet loss concealment ran instead" return code, which here is a DecodeError. Which liblc3:

1. the system's, found by ``ctypes.util.find_library("lc3")`` (Debian's ``liblc3-0``, whose 1.0.1 decodes
   sample.wav as well as the wheel's copy: 16.7 dB), preferred for the same reason as the system libopus in
   :mod:`streaming.codecs` (the distribution's security updates);
2. otherwise the copy ``lc3py`` (pinned in requirements.txt) ships in its wheel, ``.lc3py.mesonpy.libs/liblc3*``
   next to ``lc3.py``, found without importing ``lc3``.

When none loads, ``make_decoder("lc3_fs1030", ...)`` raises ValueError (the server refuses the stream with
``bad_parameters``). liblc3 is given the exact frame length and an output buffer of exactly one frame, so no byte
string can make it read or write out of bounds; its state lives in a numpy buffer owned by the decoder object.
liblc3 can only upsample while decoding (output rate >= coded rate), so 8 and 16 kHz LC3 decode straight to 16 kHz
and only 24/32/48 kHz go through the soxr resampler. Like Opus, LC3 cannot detect every corruption: about a third of
random 30-byte strings are well-formed frames and decode to noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import logging
import os
from typing import Final

import av
import av.error
import numpy as np

from streaming.codecs import TARGET_RATE, DecodeError, FrameDecoder, StreamResampler, _audio_frame_to_mono
from streaming.native_lib import first_loadable

__all__ = ["AacDecoder", "Lc3Decoder", "liblc3_path", "make_device_decoder"]

MAX_FRAMES_PER_MESSAGE: Final = 64  # bounds the work one WebSocket message can cause (64 LC3 frames = 640 ms)

ADTS_HEADER_BYTES: Final = 7
ADTS_CRC_BYTES: Final = 2
ADTS_SAMPLE_RATE_INDICES: Final = 13  # indices 13-15 are reserved (ISO 14496-3, samplingFrequencyIndex)

LC3_FRAME_US: Final = 10000
LC3_FRAME_BYTES: Final = 30
LC3_SAMPLE_RATES: Final = (8000, 16000, 24000, 32000, 48000)
LC3_PCM_FORMAT_S16: Final = 0  # enum lc3_pcm_format: S16 exists in every liblc3 release (FLOAT came later)

_PCM_SCALE: Final = np.float32(1.0 / 32768.0)

log = logging.getLogger(__name__)


def make_device_decoder(codec: str, sample_rate: int, channels: int) -> FrameDecoder:
    """An ``aac`` or ``lc3_fs1030`` decoder; ValueError for parameters (or a missing liblc3) that cannot work."""
    if codec == "aac":
        return AacDecoder(codec, sample_rate, channels)
    if codec == "lc3_fs1030":
        return Lc3Decoder(codec, sample_rate, channels)
    raise ValueError(f"not a device codec: {codec!r}")


# ----------------------------------------------------------------------------------------------------------------------
# AAC (ADTS)


def split_adts(data: bytes) -> list[bytes]:
    """Split a message into whole ADTS frames by their headers; DecodeError for anything else."""
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(frames) == MAX_FRAMES_PER_MESSAGE:
            raise DecodeError(f"more than {MAX_FRAMES_PER_MESSAGE} ADTS frames in one message")
        length = _adts_frame_length(data, pos)
        frames.append(data[pos : pos + length])
        pos += length
    if not frames:
        raise DecodeError("empty AAC frame")
    return frames


def _adts_frame_length(data: bytes, pos: int) -> int:
    """The length of the ADTS frame whose header starts at ``pos``, checked against the bytes there."""
    header = data[pos : pos + ADTS_HEADER_BYTES]
    if len(header) < ADTS_HEADER_BYTES:
        raise DecodeError(f"truncated ADTS header ({len(header)} bytes at offset {pos})")
    if header[0] != 0xFF or header[1] & 0xF6 != 0xF0:  # 12-bit sync word, then MPEG version (any) and layer 0
        raise DecodeError(f"no ADTS sync word at offset {pos} (raw AAC without ADTS headers is not supported)")
    if (header[2] >> 2) & 0x0F >= ADTS_SAMPLE_RATE_INDICES:
        raise DecodeError(f"reserved ADTS sampling frequency index at offset {pos}")
    length = ((header[3] & 0x03) << 11) | (header[4] << 3) | (header[5] >> 5)
    minimum = ADTS_HEADER_BYTES + (0 if header[1] & 0x01 else ADTS_CRC_BYTES)  # protection_absent=0: a CRC follows
    if length <= minimum:
        raise DecodeError(f"ADTS frame length {length} too short at offset {pos}")
    if pos + length > len(data):
        raise DecodeError(f"truncated ADTS frame: header says {length} bytes, {len(data) - pos} left")
    return length


class AacDecoder(FrameDecoder):
    """ADTS AAC frames (``aac``), decoded by FFmpeg's native ``aac`` decoder through PyAV.

    The decoded rate is whatever the ADTS headers say (HE-AAC doubles it); a stateful soxr resampler per rate takes
    it to 16 kHz, and a change of rate mid-stream drains the old resampler before the new one starts. Stereo (or
    more) is averaged to mono. AAC decoders output the encoder's priming samples (1024 for FFmpeg's encoder), so the
    audio starts ~64 ms late at 16 kHz, as it does for Omi.
    """

    def __init__(self, codec: str, sample_rate: int, channels: int) -> None:
        # decode_rate is a placeholder: the first decoded frame sets the real one (see _to_target_rate).
        super().__init__(codec, sample_rate, channels, decode_rate=TARGET_RATE)
        self._ctx = av.CodecContext.create("aac", "r")

    def _decode_frame(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        """All ADTS frames of the message, already at 16 kHz (``_deliver`` then only clips)."""
        parts = [self._decode_adts(adts) for adts in split_adts(bytes(frame))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _deliver(self, audio: np.ndarray) -> np.ndarray:
        return self._finish(audio)

    def _decode_adts(self, adts: bytes) -> np.ndarray:
        try:
            decoded = self._ctx.decode(av.Packet(adts))
        except av.error.EOFError as exc:  # defensive: a drained context decodes nothing more, so start a new one
            self._ctx = av.CodecContext.create("aac", "r")
            raise DecodeError(f"AAC decoder reached end of stream, reopened: {exc}") from exc
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise DecodeError(f"invalid AAC frame ({len(adts)} bytes): {exc}") from exc
        parts = [self._to_target_rate(_audio_frame_to_mono(f), f.sample_rate) for f in decoded]
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _to_target_rate(self, audio: np.ndarray, rate: int) -> np.ndarray:
        if rate == self._resampler.in_rate:
            return self._resampler.process(audio)
        if not 0 < rate <= 96000:
            raise DecodeError(f"unexpected AAC output rate {rate}")
        tail = self._resampler.process(np.zeros(0, dtype=np.float32), last=True)  # the old rate's last samples
        self._resampler = StreamResampler(rate, TARGET_RATE)
        return np.concatenate([tail, self._resampler.process(audio)])


# ----------------------------------------------------------------------------------------------------------------------
# LC3


class Lc3Decoder(FrameDecoder):
    """``lc3_fs1030``: whole 30-byte, 10 ms LC3 frames, decoded by liblc3 (see the module docstring)."""

    def __init__(self, codec: str, sample_rate: int, channels: int) -> None:
        lib = _liblc3()
        if lib is None:
            raise ValueError(
                "lc3_fs1030 needs liblc3, and none could be loaded: install the pinned lc3py (requirements.txt) "
                "or the system's liblc3"
            )
        if sample_rate not in LC3_SAMPLE_RATES:
            raise ValueError(f"sample_rate {sample_rate} is not an LC3 rate; expected one of "
                             f"{', '.join(map(str, LC3_SAMPLE_RATES))}")
        if channels != 1:
            raise ValueError(f"lc3_fs1030 is mono (as Omi decodes it), got channels={channels}")
        pcm_rate = max(sample_rate, TARGET_RATE)  # liblc3 upsamples while decoding but never downsamples
        super().__init__(codec, sample_rate, channels, decode_rate=pcm_rate)
        self._lib = lib
        # Pointer-aligned decoder state (liblc3's requirement), owned by this object: nothing to free by hand.
        self._mem = np.zeros(-(-lib.decoder_size(LC3_FRAME_US, pcm_rate) // 8), dtype=np.uint64)
        self._state = lib.setup_decoder(LC3_FRAME_US, sample_rate, pcm_rate, self._mem.ctypes.data)
        if not self._state:
            raise ValueError(f"lc3_setup_decoder refused {LC3_FRAME_US} us at {sample_rate} Hz")
        self._pcm = np.zeros(lib.frame_samples(LC3_FRAME_US, pcm_rate), dtype=np.int16)
        self._pcm_ptr = ctypes.c_void_p(self._pcm.ctypes.data)

    def _decode_frame(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        data = bytes(frame)
        count, extra = divmod(len(data), LC3_FRAME_BYTES)
        if extra or not count:
            raise DecodeError(f"LC3 frame of {len(data)} bytes; expected whole {LC3_FRAME_BYTES}-byte frames")
        if count > MAX_FRAMES_PER_MESSAGE:
            raise DecodeError(f"more than {MAX_FRAMES_PER_MESSAGE} LC3 frames in one message")
        out = np.empty(count * self._pcm.size, dtype=np.float32)
        for i in range(count):
            self._decode_one(data[i * LC3_FRAME_BYTES : (i + 1) * LC3_FRAME_BYTES])
            np.multiply(self._pcm, _PCM_SCALE, out=out[i * self._pcm.size : (i + 1) * self._pcm.size])
        return out

    def _decode_one(self, lc3_frame: bytes) -> None:
        """One frame into ``self._pcm``; liblc3 returns 0 (decoded), 1 (corrupt: concealment ran) or -1."""
        ret = self._lib.decode(self._state, lc3_frame, len(lc3_frame), LC3_PCM_FORMAT_S16, self._pcm_ptr, 1)
        if ret == 1:
            raise DecodeError("corrupt LC3 frame (liblc3 could not parse its bitstream)")
        if ret != 0:
            raise DecodeError(f"liblc3 rejected the LC3 frame (error {ret})")


def liblc3_path() -> str | None:
    """Where the liblc3 that :class:`Lc3Decoder` uses came from; None when none loads (``lc3_fs1030`` refused)."""
    lib = _liblc3()
    return None if lib is None else lib.path


def _liblc3_candidates() -> list[str]:
    """Paths or names to try, best first: the system's liblc3, then the copy in lc3py's wheel."""
    candidates = []
    system = ctypes.util.find_library("lc3")
    if system:
        candidates.append(system)
    spec = importlib.util.find_spec("lc3")  # lc3py's module; not imported, only located
    if spec is not None and spec.origin:
        libs = os.path.join(os.path.dirname(spec.origin), ".lc3py.mesonpy.libs")
        candidates.extend(sorted(glob.glob(os.path.join(libs, "*lc3*.so*")) + glob.glob(os.path.join(libs, "*.dylib"))
                                 + glob.glob(os.path.join(libs, "*lc3*.dll"))))
    return candidates


class _LibLc3:
    """ctypes bindings to one loaded liblc3: the decoder calls of its 1.0 API. Raises OSError (not loadable, or not
    liblc3) or AttributeError (a symbol is missing)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.frame_samples = lib.lc3_frame_samples  # int (int dt_us, int sr_hz): samples per frame, or -1
        self.frame_samples.argtypes = [ctypes.c_int, ctypes.c_int]
        self.frame_samples.restype = ctypes.c_int
        self.decoder_size = lib.lc3_decoder_size  # unsigned (int dt_us, int sr_hz): bytes of state
        self.decoder_size.argtypes = [ctypes.c_int, ctypes.c_int]
        self.decoder_size.restype = ctypes.c_uint
        # lc3_decoder_t lc3_setup_decoder(int dt_us, int sr_hz, int sr_pcm_hz, void *mem): NULL on bad parameters
        self.setup_decoder = lib.lc3_setup_decoder
        self.setup_decoder.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.setup_decoder.restype = ctypes.c_void_p
        # int lc3_decode(lc3_decoder_t, const void *in, int nbytes, enum lc3_pcm_format, void *pcm, int stride)
        self.decode = lib.lc3_decode
        self.decode.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int
        ]
        self.decode.restype = ctypes.c_int
        if self.frame_samples(LC3_FRAME_US, TARGET_RATE) != TARGET_RATE * LC3_FRAME_US // 1_000_000:
            raise OSError(f"{path}: lc3_frame_samples gave a wrong answer; not liblc3")
        self.path = path
        self._cdll = lib  # keeps the library loaded


@functools.cache
def _liblc3() -> _LibLc3 | None:
    """The first liblc3 candidate that loads and answers sanely, bound once; None when there is none."""
    lib = first_loadable(_liblc3_candidates(), _LibLc3, "liblc3")
    if lib is not None:
        log.info("LC3 frames decoded by liblc3 from %s", lib.path)
        return lib
    log.warning("no usable liblc3 found; lc3_fs1030 streams will be refused")
    return None
