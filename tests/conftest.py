"""Shared test fixtures: real audio from ../shared/data, a real `uvicorn server:app` process, a WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import server_process
import soundfile as sf
from server_process import ServerProcess, free_port, stop_server  # noqa: F401 (the tests import them from here)

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAMPLE_WAV = DATA / "sample.wav"
AMI = DATA / "ami-debug"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_wav(path: Path) -> np.ndarray:
    audio, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and audio.ndim == 1
    return audio


def to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16)


PG_ADMIN = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server (TEST_POSTGRES_URL), dropped afterwards: its URL. Raises
    OSError or asyncpg.PostgresError at the start when there is no server."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        con = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await con.execute(sql)
        finally:
            await con.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def start_server(tmp_path: Path, **env: str) -> ServerProcess:
    """Runs `uvicorn server:app` as a separate process on a free loopback port, waits for /ready."""
    return server_process.start_server(tmp_path, env)


@pytest.fixture(scope="module")
def local_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The embedded defaults: silero VAD, pocketsphinx STT, no keys, no auth configured (loopback only)."""
    server = start_server(tmp_path_factory.mktemp("local"))
    yield server
    stop_server(server)


@dataclass
class StreamResult:
    segments: dict[str, dict] = field(default_factory=dict)  # upserted by id, in first-seen order
    events: list[dict] = field(default_factory=list)
    pings: int = 0
    close_code: int | None = None
    close_reason: str = ""

    def statuses(self) -> list[str]:
        return [e["status"] for e in self.events if e.get("type") == "service_status"]

    def errors(self) -> list[dict]:
        return [e for e in self.events if e.get("type") == "error"]

    def ordered(self) -> list[dict]:
        return sorted(self.segments.values(), key=lambda s: s["start"])


async def stream_frames(url: str, frames: list[bytes | str], headers: dict[str, str] | None = None,
                        pace_s: float = 0.0, until=None, timeout_s: float = 90.0, close: bool = True) -> StreamResult:
    """Connects, sends frames (bytes = audio, str = text), waits until `until(result)` holds (or the server
    closes, or timeout_s passes), then closes and collects what the server sent until it closed.
    With close=False the client never closes: it waits for the server to (idle and refusal tests)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    result = StreamResult()
    # A fresh user per stream unless told: a user's next stream continues their conversation (and its clock).
    headers = {"Authorization": f"Bearer user-{uuid.uuid4().hex[:12]}"} if headers is None else headers
    changed = asyncio.Event()
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=30) as ws:

        async def reader() -> None:
            try:
                async for message in ws:
                    if message == "ping":
                        result.pings += 1
                        continue
                    payload = json.loads(message)
                    if isinstance(payload, list):
                        for seg in payload:
                            result.segments[seg["id"]] = seg
                    else:
                        result.events.append(payload)
                    changed.set()
            except ConnectionClosed:
                pass
            changed.set()

        task = asyncio.create_task(reader())
        try:
            for frame in frames:
                if task.done():
                    break
                try:
                    await ws.send(frame)
                except ConnectionClosed:  # the server closed mid-stream: collect what it said
                    break
                if pace_s:
                    await asyncio.sleep(pace_s)
            deadline = asyncio.get_running_loop().time() + timeout_s
            while not task.done() and not (until is not None and until(result)):
                if until is None and close:
                    break
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=remaining)
            if close and not task.done():
                await ws.close()
            await asyncio.wait_for(task, timeout=30)
        finally:
            task.cancel()
        result.close_code = ws.close_code
        result.close_reason = ws.close_reason or ""
    return result


def silence_frames(seconds: float, rate: int = 16000, frame_ms: int = 20) -> list[bytes]:
    return pcm16_frames(np.zeros(int(seconds * rate), np.float32), frame_ms, rate)


def pcm16_frames(audio: np.ndarray, frame_ms: int = 20, rate: int = 16000) -> list[bytes]:
    pcm = to_int16(audio).tobytes()
    step = rate * frame_ms // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]
