"""`omi-server stream`: audio to `/v4/listen` at real time (or as fast as the server takes it), the transcript shown
as it grows, and the final transcript written with `--out`.

When the audio ends (the file's end, or Ctrl-C on the microphone) the client sends the server's `CloseStream` text
command: the server transcribes what it received, sends the last segments and closes with 1000, so the client has
the whole transcript without guessing how long decoding takes (a close of the client's own would cut it off). A
server that does not know the command is closed after `max_wait_s`. A stream the server closes early ends with the
exit code its close code means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlencode

from omi_cli import api
from omi_cli.audio_in import FRAME_MS, RATE, OpusEncoder, encoded, pcm16_frames
from omi_cli.errors import OK, REFUSED_AUTH, UNREACHABLE, CliError, code_for_close
from transcript_export import speaker_name

CLOSE_STREAM = json.dumps({"type": "CloseStream"})
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


@dataclass
class StreamOutcome:
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    updates: int = 0

    def ordered(self) -> list[dict[str, Any]]:
        return sorted(self.segments.values(), key=lambda s: (float(s["start"]), float(s["end"])))


def line_of(segment: dict[str, Any]) -> str:
    start = float(segment["start"])
    return f"[{int(start // 60):02d}:{start % 60:04.1f}] {speaker_name(segment)}: {segment['text']}"


class PlainView:
    """Not a terminal (a pipe, a log): one line per new or changed segment, as it arrives."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown: dict[str, str] = {}

    def progress(self, sent_s: float, total_s: float | None) -> None:
        return None

    def update(self, outcome: StreamOutcome, changed: Iterable[dict[str, Any]]) -> None:
        for seg in changed:
            text = line_of(seg)
            if self._shown.get(seg["id"]) != text:
                self._shown[seg["id"]] = text
                print(text, file=self._out, flush=True)

    def close(self) -> None:
        return None


class RichView:
    """A terminal: the whole transcript redrawn as it grows (a colour per speaker), under a progress bar."""

    def __init__(self, title: str, total_s: float | None) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        self._Text, self._Group = Text, Group
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[pos]}"),
                                  TimeElapsedColumn(), transient=False)
        self._task = self._progress.add_task(title, total=total_s, pos="")
        self._body = Text("")
        self._live = Live(Group(self._progress, self._body), console=Console(), refresh_per_second=8)
        self._live.start()

    def progress(self, sent_s: float, total_s: float | None) -> None:
        self._progress.update(self._task, completed=sent_s, pos=f"{sent_s:.0f}/{total_s:.0f} s" if total_s
                              else f"{sent_s:.0f} s")

    def update(self, outcome: StreamOutcome, changed: Iterable[dict[str, Any]]) -> None:
        text = self._Text()
        for seg in outcome.ordered():
            colour = "bold white" if seg.get("is_user") else COLOURS[int(seg.get("speaker_id") or 0) % len(COLOURS)]
            text.append(line_of(seg) + "\n", style=colour)
        self._body = text
        self._live.update(self._Group(self._progress, text))

    def close(self) -> None:
        self._live.stop()


async def _frames_at_pace(frames: Iterable[bytes], fast: bool, on_sent) -> AsyncIterator[bytes]:
    """Each frame at its real-time moment (an absolute schedule: no drift), or at once with `fast`."""
    start = time.monotonic()
    for i, frame in enumerate(frames):
        if not fast:
            delay = start + i * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif i % 50 == 0:
            await asyncio.sleep(0)
        on_sent(i + 1)
        yield frame


async def stream(base_url: str, token: str | None, audio_frames: AsyncIterator[bytes], *, codec: str,
                 language: str, view, total_s: float | None, max_wait_s: float = 120.0) -> StreamOutcome:
    """Streams `audio_frames` (already paced and encoded as `codec`); returns what the server sent."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    query = urlencode({"codec": codec, "sample_rate": RATE, "language": language, "channels": 1, "source": "cli"})
    url = api.ws_url(base_url, f"/v4/listen?{query}")
    outcome = StreamOutcome()
    try:
        ws = await connect(url, additional_headers=api.headers(token), max_size=2**22, open_timeout=30)
    except InvalidStatus as exc:
        status = exc.response.status_code
        code = REFUSED_AUTH if status in (401, 403) else code_for_close(None)
        raise CliError(f"the server refused the stream (HTTP {status}): check --token and --url", code) from exc
    except (OSError, TimeoutError) as exc:
        raise CliError(f"no server answers at {api.http_url(base_url, '')}: {exc}", UNREACHABLE) from exc

    async def read() -> None:
        try:
            async for message in ws:
                if message == "ping":
                    continue
                payload = json.loads(message)
                if isinstance(payload, list):
                    for seg in payload:
                        outcome.segments[seg["id"]] = seg
                    outcome.updates += 1
                    view.update(outcome, payload)
                elif isinstance(payload, dict) and payload.get("type") == "error":
                    outcome.errors.append(payload)
                    print(f"server: {payload.get('code')}: {payload.get('message')}", file=sys.stderr)
        except ConnectionClosed:
            pass

    async with ws:
        reader = asyncio.create_task(read())
        try:
            async for frame in audio_frames:
                if reader.done():
                    break
                await ws.send(frame)
            if not reader.done():
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(CLOSE_STREAM)
                done, _ = await asyncio.wait({reader}, timeout=max_wait_s)
                if not done:
                    print(f"no end from the server after {max_wait_s:.0f} s: closing", file=sys.stderr)
                    await ws.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader, timeout=30)
        finally:
            reader.cancel()
        outcome.close_code, outcome.close_reason = ws.close_code, ws.close_reason or ""
    return outcome


async def stream_file(base_url: str, token: str | None, audio, *, codec: str, language: str, fast: bool, view,
                      max_wait_s: float) -> StreamOutcome:
    """A whole signal (16 kHz float32), paced, as `codec` frames."""
    total_s = len(audio) / RATE
    frames = pcm16_frames(audio)
    if codec == "opus":
        frames = list(encoded(frames, "opus"))  # one packet per 20 ms frame: the same pacing

    def on_sent(n: int) -> None:
        view.progress(min(total_s, n * FRAME_MS / 1000), total_s)

    return await stream(base_url, token, _frames_at_pace(frames, fast, on_sent), codec=codec, language=language,
                        view=view, total_s=total_s, max_wait_s=max_wait_s)


async def encode_live(frames: AsyncIterator[bytes], codec: str) -> AsyncIterator[bytes]:
    """Microphone frames encoded as they come, until Ctrl-C (then the stream is closed properly: `CloseStream`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    encoder = OpusEncoder() if codec == "opus" else None
    try:
        async for frame in frames:
            if stop.is_set():
                break
            for packet in (encoder.encode(frame) if encoder is not None else [frame]):
                yield packet
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def finish(outcome: StreamOutcome) -> int:
    """The exit code of a finished stream: the close code's, once the client itself closed normally."""
    if outcome.close_code in (None, 1000, 1005):
        return OK
    code = code_for_close(outcome.close_code)
    if code != OK:
        print(f"the server closed the stream: {outcome.close_code} {outcome.close_reason}", file=sys.stderr)
    return code
