"""Fuzzing: bad input never crashes the process and never gives a 500.

1. The frame decoders (`streaming.codecs.make_decoder`, every codec, several rates and channel counts) get random
   bytes, odd lengths, huge frames and truncated / bit-flipped / re-framed Opus packets derived from real speech:
   `decode` returns float32 mono audio in [-1, 1] or raises `DecodeError`, nothing else, and the decoder still
   decodes real audio correctly afterwards.
2. A real `uvicorn server:app` process (the module-scoped `local_server`) gets WebSocket streams on `/v4/listen`
   mixing random binary frames, broken JSON, unknown command types, huge strings and `speaker_assigned` commands
   with wrong field types, then real audio: the stream survives (it still answers) or closes with a defined code,
   and the server log shows no unhandled exception. Random query strings and Authorization headers are refused
   with 1008 and an `error` event, or accepted (never a crash). `/health` is 200 afterwards. The Authenticator
   gets random Authorization headers and client hosts directly (a Caller or AuthError, nothing else).
   Text frames include JSON nested to any depth (up to 150000: at 6 characters a level, a frame stays under
   uvicorn's 1 MiB --ws-max-size, past which the library closes 1009 before the app sees it), bare or inside a
   command.
2b. `/v1/speaker-identification` gets random `segments` JSON (huge, infinite, NaN, negative, wrong types, nested to
   any depth, lists of 1000-30000 segments around BATCH_MAX_SEGMENTS) over real and broken audio, for a user with an
   enrolled voice and person: 200 with one answer per segment, or a 4xx.
2c. Every route that takes a body gets bodies of any length (up to 3 MB, around the JSON limit), of any content
   type, sent with an exact Content-Length, chunked, or under a Content-Length far over every limit with little
   sent, with and without credentials: an answer always comes (never a wait for a body that is not coming), never
   a 5xx, and a body over its route's limit is a 413.
3. Schemathesis runs every operation of the server's own `/openapi.json` (generated and coverage cases) against
   the same process, with a working loopback Authorization header: no 5xx, responses conform to the schema. Upload
   fields get real audio (WAV/FLAC/OGG, odd rates), truncated or garbled files, absurd WAV headers, NaN samples.

`FUZZ_SCALE=10 .venv/bin/pytest tests/test_fuzz.py` runs ten times the examples. Hypothesis keeps no example
database here (`database=None`: every run draws fresh examples; a failure prints a `@reproduce_failure` blob); its
caches land in `.hypothesis/`, which carries its own `.gitignore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import socket
import struct
import uuid
from urllib.parse import quote, urlencode

import httpx
import numpy as np
import pytest
import schemathesis
import soundfile as sf
from audio_tools import encode_aac, encode_lc3, encode_opus
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, stream_frames
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from websockets.exceptions import InvalidStatus

from auth import Authenticator, AuthError
from config import Settings
from streaming.codecs import (
    OPUS_SAMPLE_RATES,
    SUPPORTED_CODECS,
    DecodeError,
    FrameDecoder,
    make_decoder,
    resample,
)

FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))  # FUZZ_SCALE=10 for a deeper run: ten times the examples


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


AUTH = {"Authorization": "Bearer fuzz-user"}  # no ADMIN_KEY / Firebase on local_server: loopback Bearer <uid>
DEFINED_CLOSE_CODES = {1000, 1001, 1008, 1011, 1013}
MAX_FRAME_BYTES = 64 * 1024  # Settings.max_frame_bytes default
PROBE_BYTES = MAX_FRAME_BYTES + 12_345  # an oversized frame of a size no fuzz frame has: its error echoes the size
CRASH_MARKERS = ("Traceback (most recent call last)", "Exception in ASGI application")


# ----------------------------------------------------------------------------------------------------------------------
# real audio


@functools.cache
def speech() -> np.ndarray:
    return read_wav(SAMPLE_WAV)


@functools.cache
def opus_packets(rate: int, channels: int) -> tuple[bytes, ...]:
    """Real speech (10 s to 14 s of sample.wav) as 20 ms Opus packets at `rate`."""
    audio = speech()[10 * 16000 : 14 * 16000]
    if rate != 16000:
        audio = resample(audio, 16000, rate)
    return tuple(encode_opus(audio, rate, channels=channels, bitrate=32000 if channels == 1 else 48000))


@functools.cache
def pcm_bytes(rate: int, channels: int) -> bytes:
    """Real speech (10 s to 11 s) as 16-bit PCM at `rate`, interleaved when stereo."""
    audio = speech()[10 * 16000 : 11 * 16000]
    if rate != 16000:
        audio = resample(audio, 16000, rate)
    pcm = (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2")
    if channels == 2:
        pcm = np.stack([pcm, pcm // 2], axis=1).reshape(-1)
    return pcm.tobytes()


@functools.cache
def device_frames(codec: str, rate: int) -> tuple[bytes, ...]:
    """Real speech as the AAC (ADTS) or LC3 frames a wearable sends (mono, as those devices are)."""
    audio = speech()[10 * 16000 : 14 * 16000]
    if rate != 16000:
        audio = resample(audio, 16000, rate)
    return tuple(encode_aac(audio, rate) if codec == "aac" else encode_lc3(audio, rate))


def valid_frames(codec: str, rate: int, channels: int) -> list[bytes]:
    if codec.startswith("opus"):
        return list(opus_packets(rate, channels))
    if codec in ("aac", "lc3_fs1030"):
        return list(device_frames(codec, rate))
    data = pcm_bytes(rate, channels)
    step = rate // 50 * 2 * channels
    return [data[i : i + step] for i in range(0, len(data), step)]


@functools.cache
def audio_files() -> tuple[bytes, ...]:
    """Real speech in the containers uploads come in (10 s: enough for a user profile), odd rates and layouts."""
    clip = speech()[10 * 16000 : 20 * 16000]
    files = []
    for fmt, subtype, rate, channels in [("WAV", "PCM_16", 16000, 1), ("WAV", "FLOAT", 16000, 1),
                                         ("FLAC", "PCM_16", 16000, 1), ("OGG", "VORBIS", 16000, 1),
                                         ("WAV", "PCM_U8", 8000, 2), ("WAV", "PCM_24", 44100, 1)]:
        audio = clip if rate == 16000 else resample(clip, 16000, rate)
        if channels == 2:
            audio = np.stack([audio, audio * 0.5], axis=1)
        buf = io.BytesIO()
        sf.write(buf, audio, rate, format=fmt, subtype=subtype)
        files.append(buf.getvalue())
    return tuple(files)


def wav_header(rate: int, channels: int, bits: int, fmt_tag: int = 1, data_size: int | None = None,
               payload: bytes = b"") -> bytes:
    """A RIFF/WAVE file with whatever header fields it is given (they need not make sense)."""
    block = channels * bits // 8
    size = len(payload) if data_size is None else data_size
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + payload
    return b"RIFF" + struct.pack("<I", min(len(body), 0xFFFFFFFF)) + body


@st.composite
def upload_bytes(draw) -> bytes:
    """What an upload field may hold: real audio, real audio broken (truncated, header or bits garbled), WAV headers
    with absurd fields, float WAVs full of NaN/inf, random bytes, nothing."""
    kind = draw(st.sampled_from(["real", "truncated", "garbled", "header", "nonfinite", "random", "empty"]))
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "header":
        # short payloads: at a claimed 7 Hz even 3200 bytes are 4 minutes of audio to resample and VAD
        payload = draw(st.sampled_from([b"", bytes(64), audio_files()[0][44 : 44 + 3200]]))
        return wav_header(rate=draw(st.sampled_from([0, 1, 7, 8000, 16000, 384000, 2**31 - 1, 2**32 - 1])),
                          channels=draw(st.sampled_from([0, 1, 2, 255, 65535])),
                          bits=draw(st.sampled_from([0, 1, 7, 8, 16, 24, 32, 64, 65535])),
                          fmt_tag=draw(st.sampled_from([1, 3, 6, 7, 0x11, 0xFFFE, 0])),
                          data_size=draw(st.sampled_from([None, 0, 1, 0xFFFFFFFF])), payload=payload)
    if kind == "nonfinite":
        samples = np.array(draw(st.lists(st.sampled_from([0.1, -0.5, np.nan, np.inf, -np.inf, 1e30]),
                                         min_size=1, max_size=64)) * 250, "<f4")
        return wav_header(16000, 1, 32, fmt_tag=3, payload=samples.tobytes())
    data = bytearray(draw(st.sampled_from(audio_files())))
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "garbled":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, min(len(data), 128) - 1)) if draw(st.booleans()) else draw(
                st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


# ----------------------------------------------------------------------------------------------------------------------
# 1. codec decoders


def check_audio(out: object) -> None:
    assert isinstance(out, np.ndarray), type(out)
    assert out.dtype == np.float32 and out.ndim == 1, (out.dtype, out.shape)
    if out.size:
        assert np.isfinite(out).all()
        assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0


def decode_checked(decoder: FrameDecoder, frame: bytes) -> bool:
    """True when decoded; False on DecodeError; any other exception fails the test."""
    before = (decoder.decoded_frames, decoder.failed_frames)
    try:
        out = decoder.decode(frame)
    except DecodeError:
        assert (decoder.decoded_frames, decoder.failed_frames) == (before[0], before[1] + 1)
        return False
    check_audio(out)
    assert (decoder.decoded_frames, decoder.failed_frames) == (before[0] + 1, before[1])
    return True


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def assert_still_decodes(decoder: FrameDecoder, codec: str, rate: int, channels: int) -> None:
    """After the fuzz frames (and flush): real audio decodes as a fresh decoder decodes it."""
    check_audio(decoder.flush())
    frames = valid_frames(codec, rate, channels)
    fresh = make_decoder(codec, rate, channels)
    want = np.concatenate([fresh.decode(f) for f in frames] + [fresh.flush()])
    got = np.concatenate([decoder.decode(f) for f in frames] + [decoder.flush()])
    check_audio(got)
    if not codec.startswith("pcm"):
        # Codec state (Opus prediction and energy, AAC and LC3 overlap) converges within a few frames: compare the
        # second half.
        assert len(got) == len(want)
        half = len(want) // 2
        assert correlation(got[half:], want[half:]) > 0.95
    else:
        np.testing.assert_array_equal(got, want)  # PCM: bit-exact once the carried partial sample is dropped


DECODER_CONFIGS = st.one_of(
    st.tuples(st.sampled_from(["pcm8", "pcm16"]), st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
              st.sampled_from([1, 2])),
    st.tuples(st.sampled_from(["opus", "opus_fs320"]), st.sampled_from(OPUS_SAMPLE_RATES), st.sampled_from([1, 2])),
    st.tuples(st.just("aac"), st.sampled_from([16000, 44100, 48000]), st.just(1)),
    st.tuples(st.just("lc3_fs1030"), st.sampled_from([8000, 16000, 24000, 48000]), st.just(1)),
)


@st.composite
def huge_frame(draw) -> bytes:
    """Frames around and far over the server's frame limit: random noise, a repeated pattern, zeros, full scale."""
    size = draw(st.sampled_from([MAX_FRAME_BYTES - 1, MAX_FRAME_BYTES + 1, 256 * 1024, 1024 * 1024 + 3]))
    kind = draw(st.sampled_from(["random", "pattern", "zeros", "max"]))
    if kind == "random":
        return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size)
    if kind == "pattern":
        pattern = draw(st.binary(min_size=1, max_size=8))
        return (pattern * (size // len(pattern) + 1))[:size]
    return (b"\x00" if kind == "zeros" else b"\xff\x7f") * (size // (1 if kind == "zeros" else 2))


@st.composite
def garbled_opus(draw) -> bytes:
    """A real Opus packet, broken in one or more ways (RFC 6716 framing: TOC byte, frame count, lengths, padding)."""
    rate = draw(st.sampled_from(OPUS_SAMPLE_RATES))
    channels = draw(st.sampled_from([1, 2]))
    packets = opus_packets(rate, channels)
    packet = bytearray(draw(st.sampled_from(packets)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "toc", "code3", "insert", "concat", "overwrite", "cut_head"]))
        if op == "truncate" and packet:
            packet = packet[: draw(st.integers(0, len(packet) - 1))]
        elif op == "flip" and packet:
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(packet) - 1))
                packet[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "toc" and packet:
            packet[0] = draw(st.integers(0, 255))  # any config, stereo flag and frame-count code
        elif op == "code3" and packet:
            # code 3: arbitrary frame count byte (VBR flag, padding flag, M up to 63)
            packet[0] = (packet[0] & 0xFC) | 3
            packet[1:1] = bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=4))
        elif op == "insert":
            i = draw(st.integers(0, len(packet)))
            packet[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "concat":
            packet += draw(st.sampled_from(packets))
        elif op == "overwrite" and packet:
            i = draw(st.integers(0, len(packet) - 1))
            chunk = draw(st.binary(min_size=1, max_size=16))
            packet[i : i + len(chunk)] = chunk
        elif op == "cut_head" and len(packet) > 1:
            packet = packet[draw(st.integers(1, len(packet) - 1)) :]
    return bytes(packet)


FRAMES = st.one_of(
    st.binary(max_size=2048),  # random bytes, every length parity
    st.binary(min_size=1, max_size=3),  # tiny and odd
    garbled_opus(),
    huge_frame(),
)


@settings(FUZZ, max_examples=examples(300))
@given(config=DECODER_CONFIGS, frames=st.lists(FRAMES, min_size=1, max_size=12))
def test_decoders_survive_random_frames(config, frames):
    codec, rate, channels = config
    decoder = make_decoder(codec, rate, channels)
    for frame in frames:
        decode_checked(decoder, frame)
    assert decoder.decoded_frames + decoder.failed_frames == len(frames)
    assert_still_decodes(decoder, codec, rate, channels)


@settings(FUZZ, max_examples=examples(200))
@given(config=DECODER_CONFIGS, data=st.data())
def test_decoders_survive_garbage_between_real_frames(config, data):
    """Real frames with bad ones interleaved: the good ones keep decoding to valid audio."""
    codec, rate, channels = config
    decoder = make_decoder(codec, rate, channels)
    good = valid_frames(codec, rate, channels)[:25]
    for frame in good:
        if data.draw(st.booleans()):
            decode_checked(decoder, data.draw(FRAMES))
        decode_checked(decoder, frame)
    assert_still_decodes(decoder, codec, rate, channels)


@settings(FUZZ, max_examples=examples(50))
@given(frame=st.one_of(st.none(), st.text(max_size=8), st.integers(), st.lists(st.integers(0, 255), max_size=8)))
def test_non_bytes_frames_are_decode_errors(frame):
    for codec in SUPPORTED_CODECS:
        decoder = make_decoder(codec, 16000, 1)
        with pytest.raises(DecodeError):
            decoder.decode(frame)
        assert_still_decodes(decoder, codec, 16000, 1)


@settings(FUZZ, max_examples=examples(200))
@given(codec=st.one_of(st.sampled_from(SUPPORTED_CODECS), st.text(max_size=12), st.none(), st.integers()),
       rate=st.one_of(st.integers(-10, 200_000), st.text(max_size=8), st.floats(), st.none(), st.booleans()),
       channels=st.one_of(st.integers(-3, 5), st.text(max_size=3), st.none(), st.floats()))
def test_make_decoder_parameters(codec, rate, channels):
    """Any parameters: a working decoder or a ValueError with a message."""
    try:
        decoder = make_decoder(codec, rate, channels)
    except ValueError as exc:
        assert str(exc)
        return
    decode_checked(decoder, b"\x01\x02\x03")


ADMIN_KEY = "fuzz-admin-key-2b7e4c9a1f6d3e8b0a"
HEADERS = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=60),  # headers decode as latin-1
    st.text(max_size=20),  # and whatever else a caller might hand over
    st.builds(lambda scheme, value: f"{scheme} {value}", st.sampled_from(["Bearer", "bearer", "Basic", ""]),
              st.text(max_size=140)),
    st.text(max_size=40).map(lambda rest: ADMIN_KEY + rest),
    st.text(max_size=4).map(lambda rest: ADMIN_KEY[: len(ADMIN_KEY) // 2] + rest),
)
HOSTS = st.one_of(st.none(), st.sampled_from(["127.0.0.1", "::1", "10.0.0.1", "testclient", "localhost", ""]),
                  st.text(max_size=20))


@settings(FUZZ, max_examples=examples(300))
@given(header=HEADERS, host=HOSTS, admin=st.booleans())
def test_authenticator_headers(header, host, admin):
    """Any Authorization header and client host: a Caller with a well-formed uid, or AuthError; nothing else."""
    authenticator = Authenticator(Settings(_env_file=None, admin_key=ADMIN_KEY if admin else None,
                                           firebase_credentials=None, firebase_project_id=None))
    try:
        caller = asyncio.run(authenticator.caller(header, host))
    except AuthError as exc:
        assert str(exc)
        return
    assert caller.uid is None or (isinstance(caller.uid, str) and 1 <= len(caller.uid) <= 128)
    # The admin key alone or as Omi's "Bearer <ADMIN_KEY><uid>" (the header's second part starts with it)
    parts = (header or "").split()
    as_admin = bool(parts) and (header.strip().startswith(ADMIN_KEY)
                                or (len(parts) == 2 and parts[1].startswith(ADMIN_KEY)))
    assert caller.admin == (admin and as_admin)


# ----------------------------------------------------------------------------------------------------------------------
# 2. the WebSocket frame path of a real server


def json_values(max_leaves: int = 6):
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=max_leaves,
    )


def deep_json(max_depth: int = 150_000):
    """JSON nested to any depth (past Python's recursion limit from about 1000), closed or not, bare or inside a
    command: the parser must refuse it as a clear error, never a RecursionError escaping a handler. At most 6
    characters a level: 150000 levels stay under the WebSocket's 1 MiB message limit (200000 `{"a":` levels, closed,
    were 1.2 MB: the stream closed 1009, which the stream fuzz does not expect of a frame the app should see)."""
    return st.builds(
        lambda depth, opener, closed, wrap: wrap.replace("@", opener * depth + (("]" if opener == "[" else "}")
                                                                                   * depth if closed else "")),
        st.integers(1, max_depth), st.sampled_from(["[", '{"a":']), st.booleans(),
        st.sampled_from(["@", '{"type": "speaker_assigned", "speaker_id": @}', '{"type": @}']))


PERSON = "@PERSON@"  # replaced by the id of a person enrolled for fuzz-user: assignments that get through
SPEAKER_ASSIGNED = st.fixed_dictionaries(
    {"type": st.just("speaker_assigned")},
    optional={
        "speaker_id": st.one_of(st.integers(0, 3), json_values(), st.integers(-(2**70), 2**70)),
        "person_id": st.one_of(st.just(PERSON), json_values(), st.text(max_size=300)),
        "person_name": json_values(),
        "segment_ids": st.one_of(json_values(), st.lists(st.text(max_size=10), max_size=5)),
    },
).map(json.dumps)

ASSIGN_ENROLLED = st.builds(  # well-typed, for the enrolled person: cluster 0 exists, the others do not
    lambda sid, ids: json.dumps({"type": "speaker_assigned", "speaker_id": sid, "person_id": PERSON,
                                 "segment_ids": ids}),
    st.sampled_from([0, 0, 1, -1, 2**63]) | st.integers(-(2**70), 2**70), st.lists(st.text(max_size=8), max_size=3))

TEXT_FRAMES = st.one_of(
    st.text(max_size=200),  # mostly broken JSON
    st.sampled_from(["{", "[", "null", "true", "1e999", '"x"', "{}", "[]", '{"type": null}', "ping", "\x00"]),
    json_values().map(json.dumps),
    st.fixed_dictionaries({"type": st.text(max_size=30)}, optional={"x": json_values()}).map(json.dumps),
    SPEAKER_ASSIGNED,
    # huge strings, past the 256 KiB a command may have, under uvicorn's --ws-max-size (1 MiB; past it the library
    # closes with 1009 before the app sees the frame: tests/test_limits.py)
    st.sampled_from([300_000, 1_000_000]).map(lambda n: "A" * n),
    st.sampled_from([100_000]).map(lambda n: json.dumps({"type": "speaker_assigned", "speaker_id": 1,
                                                         "person_id": "p" * n, "segment_ids": ["s" * 50] * 1000})),
    deep_json(),
)

BINARY_FRAMES = st.one_of(
    st.binary(max_size=1500),
    st.binary(min_size=1, max_size=3),
    garbled_opus(),
    st.sampled_from([MAX_FRAME_BYTES + 1, 200_000]).map(bytes),  # over max_frame_bytes: frame_too_large
)


def probe_answered(result) -> bool:
    return any(e.get("code") == "frame_too_large" and f"frame of {PROBE_BYTES} bytes" in e.get("message", "")
               for e in result.errors())


def log_tail(server, start: int) -> str:
    return server.log()[start:]


@pytest.fixture(scope="module")
def server_log_checked(local_server):
    """The server process must stay alive and log no unhandled exception during the whole module."""
    start = len(local_server.log())
    yield local_server
    tail = log_tail(local_server, start)
    assert local_server.proc.poll() is None, tail[-5000:]
    assert httpx.get(f"{local_server.http}/health", timeout=10).status_code == 200
    for marker in CRASH_MARKERS:
        assert marker not in tail, tail[tail.index(marker) - 2000 : tail.index(marker) + 5000]


@pytest.fixture(scope="module")
def fuzz_user(server_log_checked) -> str:
    """fuzz-user gets a voice profile and an enrolled person, so matching and `speaker_assigned` run for real.
    Returns the person's id."""
    http = server_log_checked.http
    r = httpx.post(f"{http}/v1/speech-profile", headers=AUTH, files={"file": ("me.wav", audio_files()[0])},
                   timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{http}/v1/people", headers=AUTH, json={"name": "Fuzz Person"}, timeout=30)
    assert r.status_code == 201, r.text
    person = r.json()["id"]
    sample = audio_files()[2]
    r = httpx.post(f"{http}/v1/people/{person}/samples", headers=AUTH, files={"file": ("p.flac", sample)},
                   timeout=120)
    assert r.status_code == 200, r.text
    # 10 s of speech then silence (ends the region), so fuzz-user's conversation has a speaker cluster (0) that
    # `speaker_assigned` can name: the assignment path runs, not only its refusals
    frames = pcm16_frames(speech()[7 * 16000 : 17 * 16000]) + silence_frames(1.5)
    result = asyncio.run(stream_frames(f"{server_log_checked.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                       headers=AUTH, until=lambda res: bool(res.segments), timeout_s=90))
    assert result.segments, result.events
    return person


@settings(FUZZ, max_examples=examples(40))
@given(codec=st.sampled_from(SUPPORTED_CODECS),
       frames=st.lists(st.one_of(BINARY_FRAMES, TEXT_FRAMES, ASSIGN_ENROLLED), min_size=1, max_size=20))
def test_stream_survives_bad_frames(server_log_checked, fuzz_user, codec, frames):
    """fuzz-user's streams continue one conversation, so its speaker clusters (and valid speaker_ids) carry over."""
    server = server_log_checked
    start = len(server.log())
    url = f"{server.ws}/v4/listen?codec={codec}&sample_rate=16000"
    if any(isinstance(f, str) and f.startswith('{"type": "speaker_assigned", "speaker_id": 0, "person_id": "@')
           for f in frames):
        event("assigns cluster 0 to the enrolled person")
    frames = [f.replace(json.dumps(PERSON), json.dumps(fuzz_user)) if isinstance(f, str) else f for f in frames]
    probe = bytes(PROBE_BYTES)
    all_frames = [*frames, *valid_frames(codec, 16000, 1)[:50], probe]  # then 1 s of real speech, then the probe
    result = asyncio.run(stream_frames(url, all_frames, headers=AUTH, until=probe_answered, timeout_s=30))
    tail = log_tail(server, start)
    for marker in CRASH_MARKERS:
        assert marker not in tail, tail
    assert result.statuses()[:3] == ["initiating", "stt_initiating", "ready"], result.events
    survived = probe_answered(result)  # the server still answered after everything: then the client closed (1000)
    event(f"survived: {survived}")
    assert result.close_code in DEFINED_CLOSE_CODES, (result.close_code, result.close_reason)
    assert server.proc.poll() is None
    n_bad_binary = sum(isinstance(f, bytes) and len(f) > MAX_FRAME_BYTES for f in frames)
    too_large = [e for e in result.errors() if e.get("code") == "frame_too_large"]
    if survived:
        assert len(too_large) == n_bad_binary + 1
    for error in result.errors():
        assert error.get("code") in {"bad_frame", "frame_too_large", "bad_command"}, error
        event(f"{error['code']}: {' '.join(error['message'].split()[:2])[:30]}")
    event(f"segments: {bool(result.segments)}")


QUERY_KEYS = st.sampled_from(["language", "sample_rate", "codec", "channels", "include_speech_profile",
                              "conversation_timeout", "stt_service", "uid", "", "x"])
QUERY_VALUES = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", "en", "multi", "en-US", "0", "-1", "8000", "16000", "48000", "44100", "7999", "48001",
                     "1e4", "16000.0", "2", "3", "true", "false", "yes", "119", "120", "14401", "pcm8", "pcm16",
                     "opus", "opus_fs320", "OPUS", " pcm16", "99999999999999999999999"]),
    st.integers(-(2**40), 2**40).map(str),
    st.integers(7000, 50_000).map(str),  # any rate in and around the PCM range
)
RAW_QUERIES = st.text(alphabet="abcodeglnrstu_0123456789%=&;+-.", max_size=60)  # raw: no space (invalid HTTP)
AUTH_HEADERS = st.one_of(
    st.just(None),  # a fresh valid uid
    st.just({}),  # no Authorization
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
        lambda v: {"Authorization": v}),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200).map(
        lambda v: {"Authorization": f"Bearer {v}"}),
)


@settings(FUZZ, max_examples=examples(60))
@given(params=st.dictionaries(QUERY_KEYS, QUERY_VALUES, max_size=6), raw=st.one_of(st.none(), RAW_QUERIES),
       headers=AUTH_HEADERS)
def test_random_query_strings_and_auth(server_log_checked, params, raw, headers):
    server = server_log_checked
    query = raw if raw is not None else urlencode(params, quote_via=quote)
    headers = {"Authorization": f"Bearer fuzz-{uuid.uuid4().hex[:8]}"} if headers is None else headers
    start = len(server.log())
    note(f"query={query!r} headers={headers!r}")

    def settled(r) -> bool:  # a refusal is left to the server to close (the client closing first would race it)
        return "ready" in r.statuses()

    try:
        result = asyncio.run(stream_frames(f"{server.ws}/v4/listen?{query}", [], headers=headers, until=settled,
                                           timeout_s=30))
    except InvalidStatus as refused:  # bad credentials are refused at the upgrade, before any message (as Omi)
        assert refused.response.status_code == 403
        assert not any(v.startswith("Bearer fuzz-") for v in headers.values())  # a valid uid is never refused
        result = None
    tail = log_tail(server, start)
    for marker in CRASH_MARKERS:
        assert marker not in tail, tail
    if result is not None and result.errors():
        errors = result.errors()
        assert errors[0]["code"] == "bad_parameters", errors
        assert isinstance(errors[0]["message"], str) and errors[0]["message"]
        assert result.close_code == 1008, (result.close_code, errors)
    elif result is not None:
        assert result.statuses()[-1] == "ready", result.events
        assert result.close_code == 1000
    assert server.proc.poll() is None


# ----------------------------------------------------------------------------------------------------------------------
# 2b. batch REST: `segments` of /v1/speaker-identification (a JSON string schemathesis cannot shape)


TIMES = st.one_of(
    st.floats(min_value=0),  # includes inf and huge values
    st.floats(0, 12),  # inside the 10 s file
    st.sampled_from([0, 0.5, 1.2, 2.5, 6, 9.9, 1e-9, 1e308, float("inf")]),
    st.integers(0, 2**70),
)


def segment_lists(numbers):
    return st.lists(st.fixed_dictionaries({"start": numbers, "end": numbers}, optional={
        "speaker": json_values(), "text": st.text(max_size=10)}), max_size=6).map(
        lambda v: json.dumps(v, allow_nan=True))  # NaN / Infinity: JSON to Python's json.loads


def huge_segment_lists():
    """Thousands of segments, around BATCH_MAX_SEGMENTS (20000): past the file (cheap to answer, the work being
    bounded anyway) or long enough that their total passes BATCH_MAX_SEGMENT_SECONDS (28800 s): 200 with one
    answer each, or 422 before any decoding."""
    return st.builds(lambda n, start, length: json.dumps([{"start": start, "end": start + length}] * n),
                     st.integers(1000, 30_000), st.sampled_from([1e6, 20.0]), st.sampled_from([0.5, 2.0, 5.0]))


SEGMENTS = st.one_of(
    segment_lists(TIMES),  # valid to the schema: 200
    segment_lists(TIMES | st.floats() | st.integers(-(2**70), 2**70)),  # some negative or NaN: 422
    st.lists(st.dictionaries(st.sampled_from(["start", "end", "x"]), json_values()), max_size=4).map(json.dumps),
    json_values().map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(["[" * 100_000, '[{"start": 0, "end": ' + "[" * 50_000 + "]"]),  # past the recursion limit
    deep_json(50_000),
    huge_segment_lists(),
)


@settings(FUZZ, max_examples=examples(60))
@given(segments=SEGMENTS, audio=st.one_of(st.integers(0, 5), upload_bytes().map(lambda b: b or b"x")))
def test_speaker_identification_segments(server_log_checked, fuzz_user, segments, audio):
    """Random `segments` (huge, infinite, NaN, negative, reversed, wrong types) over real or broken audio."""
    data = audio_files()[audio] if isinstance(audio, int) else audio
    r = httpx.post(f"{server_log_checked.http}/v1/speaker-identification", headers=AUTH, timeout=120,
                   files={"audio_file": ("a.wav", data)}, data={"segments": segments})
    event(f"status {r.status_code}")
    note(f"segments={segments!r} -> {r.status_code} {r.text[:300]}")
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 200:
        body = r.json()
        assert len(body) == len(json.loads(segments))
        assert all(set(x) == {"is_user", "person_id"} for x in body)
    else:
        assert isinstance(r.json()["detail"], (str, list))


BODY_ROUTES = [("POST", "/v1/vad"), ("POST", "/v1/speaker-identification"), ("POST", "/v1/people"),
               ("POST", "/v1/users/people"), ("POST", "/v3/upload-audio"), ("POST", "/v1/speech-profile"),
               ("POST", "/v1/people/nobody/samples"), ("POST", "/v1/conversations"),
               ("PATCH", "/v1/conversations/nobody/segments/assign-bulk"), ("POST", "/v1/unknown")]
BODY_TYPES = ["multipart/form-data; boundary=fuzzb", "application/json", "application/octet-stream", None]
JSON_LIMIT = 1024 * 1024  # MAX_JSON_BODY_KB default
BODY_LIMIT_DECLARED = 200 * 1024 * 1024  # over every route's limit (MAX_UPLOAD_MB 100 + 1 MB of form)


def raw_exchange(port: int, method: str, path: str, headers: dict[str, str], body: bytes, framing: str) -> int:
    """Sends one request over a raw socket and returns the status of the answer. `framing`: "exact"
    (Content-Length of the body), "chunked", or "declared" (a Content-Length far over every limit, and only
    `body` sent: the answer must come without the rest)."""
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    if framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        piece = 256 * 1024
        payload = b"".join(f"{len(body[i:i + piece]):x}\r\n".encode() + body[i:i + piece] + b"\r\n"
                           for i in range(0, len(body), piece)) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body) if framing == 'exact' else BODY_LIMIT_DECLARED}")
        payload = body
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        with contextlib.suppress(OSError):  # the server may answer (and stop reading) before it all went
            sock.sendall(payload)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed without an answer: {data[:200]!r}")
            data += chunk
    return int(data.split()[1])


@settings(FUZZ, max_examples=examples(40))
@given(route=st.sampled_from(BODY_ROUTES), content_type=st.sampled_from(BODY_TYPES),
       framing=st.sampled_from(["exact", "chunked", "declared"]), authorized=st.booleans(),
       size=st.one_of(st.integers(0, 4096), st.integers(JSON_LIMIT - 4096, JSON_LIMIT + 4096),
                      st.integers(0, 3 * JSON_LIMIT)),
       filler=st.sampled_from([b"\x00", b"[", b"A", b"--fuzzb\r\n"]))
def test_request_bodies_of_any_length(server_log_checked, route, content_type, framing, authorized, size, filler):
    """Any route that takes a body, any framing (exact, chunked, a Content-Length far over the limits with little
    sent), any length around the JSON limit, deeply nested or garbage: an answer always comes, never a 5xx; a
    body over its route's limit is a 413 (or the route's refusal before reading it)."""
    method, path = route
    headers = {**(AUTH if authorized else {}), **({"Content-Type": content_type} if content_type else {})}
    body = (filler * (size // len(filler) + 1))[:size]
    status = raw_exchange(server_log_checked.port, method, path, headers, body, framing)
    event(f"{framing}: {status}")
    note(f"{method} {path} {content_type} {framing} {size} bytes of {filler!r} -> {status}")
    assert status < 500
    json_route = path in ("/v1/people", "/v1/users/people", "/v1/conversations") or path.endswith("assign-bulk")
    if authorized and status not in (404, 405) and (framing == "declared" or (json_route and size > JSON_LIMIT)):
        assert status == 413, status


# ----------------------------------------------------------------------------------------------------------------------
# 3. schemathesis over the server's own OpenAPI schema (runs last: it may delete fuzz-user's profile)


@pytest.fixture(scope="module")
def api_schema(server_log_checked):
    # Upload fields (`format: binary`) get audio-shaped data rather than schemathesis' sample images only.
    schemathesis.openapi.format("binary", upload_bytes())
    return schemathesis.openapi.from_url(f"{server_log_checked.http}/openapi.json", timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(FUZZ, max_examples=examples(30))
def test_openapi_operations(case):
    response = case.call(headers=AUTH, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                             content_type_conformance], headers=AUTH)


def test_server_alive_after_fuzzing(server_log_checked):
    assert server_log_checked.proc.poll() is None
    assert httpx.get(f"{server_log_checked.http}/health", timeout=10).status_code == 200
