"""Where `omi-server stream` gets its audio: a file (any container FFmpeg or libsndfile reads) or the microphone,
as 16 kHz mono pcm16 frames of FRAME_MS, optionally encoded as Opus packets (what Omi devices send)."""

from __future__ import annotations

import asyncio
import fractions
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np

from omi_cli.errors import BAD_INPUT, NOT_FOUND, CliError

RATE = 16000
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000
MAX_FILE_SECONDS = 4 * 3600.0


def load_file(path: Path) -> np.ndarray:
    """The whole file as 16 kHz mono float32 (decoded with the server's own decoder)."""
    from streaming.audiofile import AudioFileError, decode_audio_file

    try:
        with path.open("rb") as f:
            return decode_audio_file(f, MAX_FILE_SECONDS)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", NOT_FOUND) from exc
    except AudioFileError as exc:
        raise CliError(f"{path}: {exc}", BAD_INPUT) from exc


def pcm16_frames(audio: np.ndarray) -> list[bytes]:
    ints = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    return [ints[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(ints), FRAME_SAMPLES)]


class OpusEncoder:
    """FFmpeg's libopus through PyAV: one raw Opus packet per 20 ms frame, as `codec=opus` expects."""

    def __init__(self, bitrate: int = 32000) -> None:
        import av

        self._av = av
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = RATE
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.bit_rate = bitrate
        self._codec.time_base = fractions.Fraction(1, RATE)
        self._codec.options = {"frame_duration": str(FRAME_MS), "application": "voip"}
        self._codec.open()
        self._pts = 0

    def encode(self, pcm16: bytes) -> list[bytes]:
        samples = np.frombuffer(pcm16, dtype="<i2")
        if len(samples) < FRAME_SAMPLES:  # the encoder takes whole frames only
            samples = np.concatenate([samples, np.zeros(FRAME_SAMPLES - len(samples), dtype="<i2")])
        frame = self._av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        self._pts += FRAME_SAMPLES
        return [bytes(p) for p in self._codec.encode(frame)]

    def flush(self) -> list[bytes]:
        return [bytes(p) for p in self._codec.encode(None)]


def encoded(frames: list[bytes], codec: str) -> Iterator[bytes]:
    """pcm16 frames as they go on the wire for `codec` (pcm16 or opus)."""
    if codec == "pcm16":
        yield from frames
        return
    encoder = OpusEncoder()
    for frame in frames:
        yield from encoder.encode(frame)
    yield from encoder.flush()


async def microphone_frames(device: str | None = None) -> AsyncIterator[bytes]:
    """pcm16 frames from the system's default microphone (PulseAudio, else ALSA) through FFmpeg's input devices,
    read in a thread. Raises CliError when no capture device can be opened."""
    import av

    container = None
    errors = []
    for fmt, name in (("pulse", device or "default"), ("alsa", device or "default")):
        try:
            container = av.open(name, format=fmt, options={"sample_rate": str(RATE), "channels": "1"})
            break
        except Exception as exc:  # FFmpeg raises per-device errors (no server, no card, format unknown)
            errors.append(f"{fmt}: {exc}")
    if container is None:
        raise CliError("no microphone could be opened (" + "; ".join(errors) + ")", NOT_FOUND)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=500)
    stop = threading.Event()

    def read() -> None:
        from streaming.codecs import StreamResampler

        resampler = StreamResampler(container.streams.audio[0].rate or RATE, RATE)
        pending = np.zeros(0, dtype=np.float32)
        try:
            for frame in container.decode(audio=0):
                if stop.is_set():
                    break
                data = frame.to_ndarray().astype(np.float32)
                if data.dtype.kind == "i" or np.abs(data).max(initial=0) > 1.5:
                    data = data / 32768.0
                mono = data.reshape(len(frame.layout.channels), -1).mean(axis=0) if data.ndim > 1 else data
                pending = np.concatenate([pending, resampler.process(mono)])
                while len(pending) >= FRAME_SAMPLES:
                    chunk, pending = pending[:FRAME_SAMPLES], pending[FRAME_SAMPLES:]
                    loop.call_soon_threadsafe(queue.put_nowait, pcm16_frames(chunk)[0])
        finally:
            container.close()
            loop.call_soon_threadsafe(queue.put_nowait, None)

    thread = threading.Thread(target=read, name="microphone", daemon=True)
    thread.start()
    try:
        while (frame := await queue.get()) is not None:
            yield frame
    finally:
        stop.set()
