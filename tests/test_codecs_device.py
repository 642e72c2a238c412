"""Tests for streaming.device_codecs: the Omi app's ``aac`` (ADTS) and ``lc3_fs1030`` (LC3 10 ms / 30 bytes) codecs.

Real audio through real encoders, framed as the app frames it: ../shared/data/sample.wav (16 kHz speech) encoded by
FFmpeg's AAC encoder into an ADTS stream (PyAV's ``adts`` muxer), cut into one ADTS frame per WebSocket frame by the
header's frame length as the app's Bee connector does; and by liblc3's encoder (lc3py) into one 30-byte frame per
10 ms. The decoded audio is compared with the original after aligning the codec delay. Measured at 16 kHz (this
commit): AAC 32 kbps SNR 24.6 dB, r 0.998, delay 1024 samples (the encoder's priming); LC3 24 kbps SNR 16.7 dB,
r 0.991, delay 40 samples. A decoder that outputs nothing scores 0 dB, one at the wrong rate -2.8 dB and r 0.02.
The last tests stream both codecs through a real server process (``local_server``).
"""

from __future__ import annotations

import collections
import ctypes.util
import difflib
import time

import numpy as np
import pytest
from audio_tools import encode_aac, encode_lc3
from conftest import SAMPLE_WAV, read_wav, stream_frames
from test_codecs import aligned_correlation, aligned_snr, check_output, run_decoder
from test_server_local import check_segments, decoded, offline_words, reaches_end, streamed_words

from streaming import device_codecs
from streaming.codecs import SUPPORTED_CODECS, TARGET_RATE, DecodeError, make_decoder, resample
from streaming.device_codecs import (
    LC3_FRAME_BYTES,
    MAX_FRAMES_PER_MESSAGE,
    AacDecoder,
    Lc3Decoder,
    _LibLc3,
    _liblc3_candidates,
    liblc3_path,
    split_adts,
)

AAC_DELAY = 1024  # FFmpeg's AAC encoder primes with one frame, which the decoder outputs
LC3_DELAY_16K = 40  # liblc3's algorithmic delay at 16 kHz, 10 ms frames (2.5 ms)


# ----------------------------------------------------------------------------------------------------------------------
# real encoders, the app's framing


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_wav(SAMPLE_WAV)


@pytest.fixture(scope="module")
def aac_frames(speech: np.ndarray) -> list[bytes]:
    return encode_aac(speech, 16000)


@pytest.fixture(scope="module")
def lc3_frames(speech: np.ndarray) -> list[bytes]:
    return encode_lc3(speech)


def decode_all(codec: str, frames: list[bytes], rate: int = 16000) -> np.ndarray:
    return run_decoder(make_decoder(codec, rate, 1), frames)


# ----------------------------------------------------------------------------------------------------------------------
# parameters and the library


def test_codecs_are_supported_and_built() -> None:
    assert {"aac", "lc3_fs1030"} <= set(SUPPORTED_CODECS)
    assert isinstance(make_decoder("aac", 16000, 1), AacDecoder)
    assert isinstance(make_decoder(" LC3_FS1030 ", "16000", 1), Lc3Decoder)


@pytest.mark.parametrize(
    ("rate", "channels", "message"),
    [(44100, 1, "LC3 rate"), (22050, 1, "LC3 rate"), (16000, 2, "mono"), (96000, 1, "sample_rate")],
)
def test_lc3_bad_parameters(rate: int, channels: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_decoder("lc3_fs1030", rate, channels)


def test_lc3_without_a_library_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_codecs, "_liblc3", lambda: None)
    with pytest.raises(ValueError, match="liblc3"):
        make_decoder("lc3_fs1030", 16000, 1)


def test_liblc3_is_found_and_candidates_are_checked(tmp_path) -> None:
    candidates = _liblc3_candidates()
    assert any(".lc3py.mesonpy.libs" in c for c in candidates)  # the pinned wheel's copy is always there
    assert liblc3_path() in candidates
    if ctypes.util.find_library("lc3"):
        assert candidates[0] == ctypes.util.find_library("lc3")
    bogus = tmp_path / "liblc3.so"
    bogus.write_bytes(b"not a library")
    with pytest.raises(OSError):
        _LibLc3(str(bogus))
    with pytest.raises(AttributeError):  # loads, but it is not liblc3
        _LibLc3(ctypes.util.find_library("c"))


def test_aac_accepts_any_connection_rate_and_channels(aac_frames: list[bytes]) -> None:
    # The ADTS header, not the query, says the rate: Omi resamples to sample_rate, we always go to 16 kHz.
    a = decode_all("aac", aac_frames[:100], rate=8000)
    b = run_decoder(make_decoder("aac", 48000, 2), aac_frames[:100])
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------------
# decoding real speech


def test_aac_decodes_speech(speech: np.ndarray, aac_frames: list[bytes]) -> None:
    out = decode_all("aac", aac_frames)
    assert len(out) == 1024 * len(aac_frames)
    lag, r = aligned_correlation(speech, out)
    _, snr = aligned_snr(speech, out)
    assert lag == AAC_DELAY
    assert r > 0.99 and snr > 20.0, (r, snr)  # measured 0.998, 24.6 dB


@pytest.mark.parametrize(("rate", "bitrate", "min_snr"), [(48000, 64000, 16.0), (44100, 64000, 12.0)])
def test_aac_other_rates_resampled(speech: np.ndarray, rate: int, bitrate: int, min_snr: float) -> None:
    out = decode_all("aac", encode_aac(resample(speech, 16000, rate), rate, bitrate))
    lag, r = aligned_correlation(speech, out)
    _, snr = aligned_snr(speech, out)
    assert abs(lag - AAC_DELAY * 16000 / rate) <= 2
    assert r > 0.98 and snr > min_snr, (r, snr)  # measured 0.995 / 20.0 dB (48k), 0.985 / 15.2 dB (44.1k)


def test_aac_stereo_downmixed_and_rate_change_drains(speech: np.ndarray) -> None:
    first, second = speech[: 10 * 16000], speech[10 * 16000 : 20 * 16000]
    first_frames = encode_aac(resample(first, 16000, 48000), 48000, 96000, channels=2)
    second_frames = encode_aac(second, 16000)
    out = decode_all("aac", first_frames + second_frames)
    # The 48 kHz resampler is drained when the rate changes: every sample of both parts comes out, at 16 kHz.
    boundary = len(first_frames) * 1024 // 3
    assert abs(len(out) - (boundary + 1024 * len(second_frames))) <= 1
    lag, r = aligned_correlation(first, out[:boundary])
    assert abs(lag - AAC_DELAY // 3) <= 1 and r > 0.98, (lag, r)
    lag, r = aligned_correlation(second, out[boundary:])
    assert abs(lag - AAC_DELAY) <= 1 and r > 0.99, (lag, r)


@pytest.mark.parametrize("rate", [16000, 8000, 24000, 48000])
def test_lc3_decodes_speech(speech: np.ndarray, rate: int) -> None:
    frames = encode_lc3(resample(speech, 16000, rate), rate)
    out = decode_all("lc3_fs1030", frames, rate=rate)
    assert len(out) == TARGET_RATE // 100 * len(frames)
    lag, r = aligned_correlation(speech, out)
    _, snr = aligned_snr(speech, out)
    assert lag == LC3_DELAY_16K
    # measured: 16.7 dB r 0.991 (16 kHz), 14.7 dB r 0.985 (8 kHz, band-limited to 4 kHz), 16.5 dB (24k, 48k)
    assert r > 0.98 and snr > 13.0, (rate, r, snr)


def test_several_whole_frames_per_message_decode_the_same(aac_frames: list[bytes], lc3_frames: list[bytes]) -> None:
    for codec, frames, group in (("aac", aac_frames[:60], 3), ("lc3_fs1030", lc3_frames[:300], 7)):
        joined = [b"".join(frames[i : i + group]) for i in range(0, len(frames), group)]
        np.testing.assert_array_equal(decode_all(codec, frames), decode_all(codec, joined))


# ----------------------------------------------------------------------------------------------------------------------
# bad frames


def test_split_adts_rejects_what_is_not_whole_adts(aac_frames: list[bytes]) -> None:
    good = aac_frames[10]
    reserved_rate = good[:2] + bytes([good[2] | 0x3C]) + good[3:]  # samplingFrequencyIndex 15
    short = good[:3] + bytes([good[3] & 0xFC, 0, good[5] & 0x1F]) + good[6:]  # frame length 0
    bad = {"empty": b"", "raw AAC": good[7:], "header only": good[:7], "cut short": good[: len(good) // 2],
           "cut header": good[:5], "reserved rate": reserved_rate, "zero length": short,
           "garbage after": good + b"\x00" * 20}
    too_many = bytes([0xFF, 0xF1, good[2], good[3] & 0xFC, 1, 0x3F, 0xFC, 0, 0])  # whole 9-byte ADTS frames
    bad["too many"] = too_many * (MAX_FRAMES_PER_MESSAGE + 1)
    assert len(split_adts(too_many * MAX_FRAMES_PER_MESSAGE)) == MAX_FRAMES_PER_MESSAGE
    for name, frame in bad.items():
        with pytest.raises(DecodeError):
            split_adts(frame)
            pytest.fail(f"{name}: accepted")  # not a DecodeError, so it escapes pytest.raises and names the case


@pytest.mark.parametrize("codec", ["aac", "lc3_fs1030"])
def test_rejected_frames_leave_the_stream_as_it_was(codec: str, aac_frames: list[bytes],
                                                    lc3_frames: list[bytes]) -> None:
    """Frames refused before the codec sees them change nothing: the good frames decode bit-identically."""
    frames = (aac_frames if codec == "aac" else lc3_frames)[:400]
    first = frames[0]
    bad = [b"", b"\x00" * 100, first[:-1], first + first[:5], "text", 12345] if codec == "aac" else \
        [b"", first[:-1], first + b"\x01", b"\x00" * 19, b"\x00" * 31, "text", None]
    decoder = make_decoder(codec, 16000, 1)
    outs, failures = [], 0
    for i, frame in enumerate(frames):
        outs.append(decoder.decode(frame))
        if i % 20 == 5:
            with pytest.raises(DecodeError):
                decoder.decode(bad[(i // 20) % len(bad)])
            failures += 1
    outs.append(decoder.flush())
    np.testing.assert_array_equal(np.concatenate(outs), decode_all(codec, frames))
    assert decoder.failed_frames == failures and decoder.decoded_frames == len(frames)


def test_corrupt_lc3_frames_are_decode_errors(speech: np.ndarray, lc3_frames: list[bytes]) -> None:
    """liblc3 parses the bitstream: most corrupt frames are caught (it would conceal them) and the stream recovers."""
    rng = np.random.default_rng(3)
    decoder = make_decoder("lc3_fs1030", 16000, 1)
    caught = 0
    for _ in range(300):
        try:
            check_output(decoder.decode(rng.bytes(LC3_FRAME_BYTES)))
        except DecodeError:
            caught += 1
    assert caught > 150, caught  # measured ~2/3; the rest are well-formed frames of noise, as with Opus
    out = np.concatenate([decoder.decode(f) for f in lc3_frames] + [decoder.flush()])
    lag, r = aligned_correlation(speech, out)
    assert lag == LC3_DELAY_16K and r > 0.98


@pytest.mark.parametrize("codec", ["aac", "lc3_fs1030"])
def test_random_garbage_never_breaks_the_stream(codec: str, speech: np.ndarray, aac_frames: list[bytes],
                                                lc3_frames: list[bytes]) -> None:
    frames = aac_frames if codec == "aac" else lc3_frames
    rng = np.random.default_rng(7)
    decoder = make_decoder(codec, 16000, 1)
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(2000):
        size = int(rng.integers(1, 400))
        junk = bytearray(rng.bytes(size))
        if codec == "aac" and i % 2:  # a plausible ADTS header with the right length: the payload reaches FFmpeg
            junk = bytearray(frames[i % len(frames)][:7]) + junk
            junk[3] = (junk[3] & 0xFC) | (len(junk) >> 11)
            junk[4], junk[5] = (len(junk) >> 3) & 0xFF, ((len(junk) & 7) << 5) | (junk[5] & 0x1F)
        elif codec == "lc3_fs1030" and i % 2:
            junk = junk[: LC3_FRAME_BYTES * (1 + size // 100)].ljust(LC3_FRAME_BYTES, b"\0")
        try:
            check_output(decoder.decode(bytes(junk)))
            outcomes["decoded"] += 1
        except DecodeError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 1000, outcomes
    # Garbage that decoded disturbs the codec's state for a frame or two at most: real speech decodes well after it.
    out = np.concatenate([decoder.decode(f) for f in frames] + [decoder.flush()])
    lag, r = aligned_correlation(speech, out)
    assert r > 0.98, (lag, r)


@pytest.mark.parametrize("codec", ["aac", "lc3_fs1030"])
def test_huge_messages_are_rejected_quickly(codec: str) -> None:
    decoder = make_decoder(codec, 16000, 1)
    messages = [np.random.default_rng(1).bytes(1 << 20), b"\xff\xf1\x50\x80\x01\x3f\xfc\x00\x00" * 100_000,
                bytes(LC3_FRAME_BYTES * (MAX_FRAMES_PER_MESSAGE + 1))]
    for message in messages:
        start = time.perf_counter()
        with pytest.raises(DecodeError):
            decoder.decode(message)
        assert time.perf_counter() - start < 0.5


# ----------------------------------------------------------------------------------------------------------------------
# end to end: a real server process


def padded(speech: np.ndarray) -> np.ndarray:
    return np.concatenate([speech, np.zeros(24000, np.float32)])  # 1.5 s of silence ends the last speech region


@pytest.fixture(scope="module")
def pcm16_words(speech: np.ndarray) -> list[str]:
    return offline_words(padded(speech))


def word_similarity(words: list[str], reference: list[str]) -> float:
    """difflib's ratio of the two word sequences: 2 * (words matched in order) / (total words).

    pocketsphinx is brittle, so codec artefacts change many words. Measured against the pcm16 transcript of sample.wav:
    Opus 32 kbps 0.55, AAC 32 kbps 0.43, LC3 24 kbps 0.45; audio at the wrong rate (16 kHz played as 14 kHz) 0.17,
    the sample reversed 0.09.
    """
    return difflib.SequenceMatcher(None, words, reference, autojunk=False).ratio()


@pytest.mark.parametrize("codec", ["aac", "lc3_fs1030"])
async def test_device_codec_streams(local_server, speech: np.ndarray, pcm16_words: list[str], codec: str) -> None:
    audio = padded(speech)
    frames = encode_aac(audio, 16000) if codec == "aac" else encode_lc3(audio)
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec={codec}&sample_rate=16000", frames,
                                 until=reaches_end)
    assert result.statuses() == ["initiating", "stt_initiating", "ready"]
    assert not result.errors()
    check_segments(result, slack=0.6)  # AAC's priming delays the audio by 64 ms
    words = streamed_words(result)
    # Nothing lost, repeated or reordered on the way: exactly the offline transcript of the decoder's output ...
    assert words == offline_words(decoded(codec, 16000, frames))
    # ... and that is substantially the transcript of the uncompressed audio.
    similarity = word_similarity(words, pcm16_words)
    assert similarity > 0.3, (similarity, words, pcm16_words)


async def test_bad_device_frames_reported_and_stream_goes_on(local_server, lc3_frames: list[bytes]) -> None:
    frames = list(lc3_frames) + encode_lc3(np.zeros(24000, np.float32))
    for position in (1000, 2000):
        frames.insert(position, b"\x00" * 7)
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec=lc3_fs1030&sample_rate=16000", frames,
                                 until=reaches_end)
    assert [e["code"] for e in result.errors()] == ["bad_frame", "bad_frame"]
    check_segments(result, slack=0.6)


@pytest.mark.parametrize("query", ["codec=lc3_fs1030&sample_rate=44100", "codec=lc3_fs1030&sample_rate=22050"])
async def test_bad_device_parameters_close_1008(local_server, query: str) -> None:
    result = await stream_frames(f"{local_server.ws}/v4/listen?{query}", [], close=False, timeout_s=10)
    assert result.close_code == 1008
    assert [e["code"] for e in result.errors()] == ["bad_parameters"]
