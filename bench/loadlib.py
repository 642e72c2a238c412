"""Building blocks of `bench/load.py`: test audio as frames, the server process and what it costs (/proc), and the
stream clients (one asyncio loop per client process). See `bench/load.py` for the method.

Clocks: every timestamp here is `time.monotonic()`, which on Linux is one system-wide clock (CLOCK_MONOTONIC), so
times taken in the client processes, the Deepgram test server thread and the orchestrator compare directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RATE = 16000
FRAME_S = 0.02  # Omi sends 20 ms frames
FRAME_SAMPLES = int(RATE * FRAME_S)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- audio ----------------------------------------------------------------------------------------------------------


def source_files() -> list[Path]:
    return [DATA / "sample.wav", *sorted((DATA / "ami-debug").glob("trn*.wav"))]


def source_audio() -> np.ndarray:
    """sample.wav and the AMI excerpts back to back: ~5 min of real 16 kHz mono speech (float32)."""
    parts = []
    for path in source_files():
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        if sr != RATE:
            raise ValueError(f"{path}: {sr} Hz, expected {RATE}")
        parts.append(audio.mean(axis=1))
    return np.concatenate(parts)


def to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16)


def encode_opus(audio: np.ndarray) -> list[bytes]:
    """Raw Opus packets, one per 20 ms frame, 16 kHz mono 32 kb/s: the tests' encoder (`tests/audio_tools.py`,
    PyAV's libopus), as Omi's firmware sends them (`codec=opus`, one packet per WebSocket frame)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from audio_tools import encode_opus as encode

    return encode(audio, RATE, bitrate=32000, frame_ms=20)


def make_frames(codec: str, silence: bool = False) -> list[bytes]:
    """The looped material of one codec: real speech (or digital silence) as 20 ms frames."""
    audio = np.zeros(RATE * 2, np.float32) if silence else source_audio()
    if codec == "pcm16":
        pcm = to_int16(audio).tobytes()
        step = FRAME_SAMPLES * 2
        return [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]
    if codec == "opus":
        return encode_opus(audio)
    raise ValueError(f"codec {codec!r}: pcm16 or opus")


def write_wav_loop(path: Path, seconds: float) -> float:
    """A WAV (16 kHz mono int16) of `seconds` of the test audio looped; returns its length in seconds."""
    audio = source_audio()
    n = int(seconds * RATE)
    reps = -(-n // len(audio))
    sf.write(path, to_int16(np.tile(audio, reps)[:n]), RATE, subtype="PCM_16")
    return n / RATE


# --- the server process and /proc -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may contain spaces


def descendants(pid: int) -> list[int]:
    """pid and every process below it (threads are already counted in their process's stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (+ reaped children's) of these processes, all their threads included."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = _stat_fields(pid)
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    """VmRSS of these processes in MB (MiB)."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
    return total_kb / 1024


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values) - idle), float(sum(values))


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:"))
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu_model": model,
            "ram_gb": round(mem_kb / 1024 / 1024, 1), "load_avg_at_start": list(os.getloadavg()),
            "python": sys.version.split()[0]}


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def start_server(workdir: Path, env: dict[str, str], timeout_s: float = 180.0, cwd: Path = REPO) -> ServerProcess:
    """`python -m uvicorn server:app` on a free loopback port with a fresh DATA_DIR; returns once /ready is 200."""
    import httpx

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("DEEPGRAM", "ADMIN_KEY", "STT_", "VAD_", "FIREBASE", "MAX_"))}
    full_env.update({"DATA_DIR": str(workdir / "data"), "PYANNOTE_METRICS_ENABLED": "false", **env})
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "server:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(port, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.http}/ready", timeout=2).status_code == 200:
                return server
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(server: ServerProcess) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


def scrape_metrics(http: str) -> dict[str, float]:
    """GET /metrics (Prometheus text) → {name: value}; {} when it cannot be read."""
    import httpx

    try:
        text = httpx.get(f"{http}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# --- the stream clients ---------------------------------------------------------------------------------------------


@dataclass
class StreamSpec:
    index: int
    uid: str
    offset: int  # first frame of the looped material this stream sends
    stagger_s: float  # its audio starts this long after the common start


@dataclass
class WorkerJob:
    url: str  # ws://.../v4/listen?codec=...&sample_rate=16000
    frames_path: str  # pickled list[bytes]: the looped material
    silence_path: str  # pickled list[bytes]: digital silence in the same codec
    streams: list[StreamSpec]
    audio_s: float  # seconds of material each stream sends after its start
    silent: bool = False  # idle streams: only silence, also after the start
    drain_gap_s: float = 1.5  # after the last frame, wait until no message came for this long ...
    drain_max_s: float = 15.0  # ... or this long at most, then close
    connect_timeout_s: float = 60.0
    connect_concurrency: int = 16


@dataclass
class StreamOutcome:
    index: int
    connected: bool = False
    error: str = ""
    audio_from: int = -1  # index of the first frame of material (frames before it were silence while waiting)
    send_times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # monotonic time each frame was handed over
    due_times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # when each frame was scheduled
    new_end_recv: np.ndarray = field(default_factory=lambda: np.zeros(0))  # arrival of a message with a new end
    new_end: np.ndarray = field(default_factory=lambda: np.zeros(0))  # that end (stream seconds)
    segment_messages: int = 0
    errors: list[str] = field(default_factory=list)  # `error` event codes
    close_code: int | None = None
    closed_by_server: bool = False  # the server closed before the client was done


@dataclass
class WorkerReport:
    outcomes: list[StreamOutcome]
    loop_lag: np.ndarray  # lateness of a 10 ms ticker on the client's event loop (seconds)
    cpu_s: float


class _Stream:
    def __init__(self, spec: StreamSpec, job: WorkerJob, frames: list[bytes], silence: list[bytes]) -> None:
        self.spec = spec
        self.job = job
        self.frames = frames
        self.silence = silence
        self.out = StreamOutcome(spec.index)
        self.ready = asyncio.Event()
        self.last_message = time.monotonic()
        self.best_end = -1.0
        self.recv_t: list[float] = []
        self.recv_end: list[float] = []
        self.sent: list[float] = []
        self.due: list[float] = []
        self.done_sending = False

    async def run(self, sem: asyncio.Semaphore, go: asyncio.Future[float], connected: asyncio.Queue[int]) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        headers = {"Authorization": f"Bearer {self.spec.uid}"}
        try:
            async with sem:
                ws = await connect(self.job.url, additional_headers=headers, max_size=None, compression=None,
                                   ping_interval=None, open_timeout=self.job.connect_timeout_s)
                reader = asyncio.create_task(self._read(ws))
                try:
                    await asyncio.wait_for(self.ready.wait(), self.job.connect_timeout_s)
                except TimeoutError:
                    self.out.error = f"no 'ready' status in {self.job.connect_timeout_s:.0f} s"
        except Exception as exc:
            self.out.error = self.out.error or f"{type(exc).__name__}: {exc}"
            await connected.put(0)
            return
        if self.out.error or reader.done():
            self.out.error = self.out.error or f"closed before ready ({ws.close_code})"
            self.out.close_code = ws.close_code
            await connected.put(0)
            reader.cancel()
            await ws.close()
            return
        self.out.connected = True
        await connected.put(1)
        try:
            await self._send(ws, go)
        except ConnectionClosed:
            self.out.closed_by_server = True
        self.done_sending = True
        deadline = time.monotonic() + self.job.drain_max_s
        while not reader.done() and time.monotonic() < deadline:
            if time.monotonic() - self.last_message >= self.job.drain_gap_s:
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(Exception):
            await ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader, 30)
        self.out.close_code = ws.close_code

    async def _send(self, ws: Any, go: asyncio.Future[float]) -> None:
        """Frame k at anchor + k * 20 ms (absolute schedule: a late frame does not delay the next ones). Silence
        until this stream's start (common start + stagger), then `audio_s` of material, then stop."""
        loop = asyncio.get_running_loop()
        anchor = time.monotonic()
        start = end = float("inf")
        k = 0
        material = self.silence if self.job.silent else self.frames
        while True:
            due = anchor + k * FRAME_S
            if go.done() and start == float("inf"):
                start = go.result() + self.spec.stagger_s
                end = start + self.job.audio_s
            if due >= end:
                return
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if due >= start:
                if self.out.audio_from < 0:
                    self.out.audio_from = k
                frame = material[(self.spec.offset + k - self.out.audio_from) % len(material)]
            else:
                frame = self.silence[k % len(self.silence)]
            t = time.monotonic()
            await ws.send(frame)
            self.sent.append(t)
            self.due.append(due)
            k += 1

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in ws:
                now = time.monotonic()
                self.last_message = now
                if message == "ping":
                    continue
                payload = json.loads(message)
                if isinstance(payload, list):
                    self.out.segment_messages += 1
                    end = max((float(s.get("end", 0.0)) for s in payload), default=-1.0)
                    if end > self.best_end + 1e-6:  # a new end: not a re-send (relabel) of older segments
                        self.best_end = end
                        self.recv_t.append(now)
                        self.recv_end.append(end)
                elif isinstance(payload, dict):
                    if payload.get("type") == "service_status" and payload.get("status") == "ready":
                        self.ready.set()
                    elif payload.get("type") == "error":
                        self.out.errors.append(str(payload.get("code")))
        except ConnectionClosed:
            pass
        if not self.done_sending and self.out.connected:
            self.out.closed_by_server = True

    def outcome(self) -> StreamOutcome:
        o = self.out
        o.send_times, o.due_times = np.array(self.sent), np.array(self.due)
        o.new_end_recv, o.new_end = np.array(self.recv_t), np.array(self.recv_end)
        return o


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + 0.01
        await asyncio.sleep(0.01)
        lags.append(loop.time() - due)


async def _worker_main(job: WorkerJob, conn: Connection) -> None:
    frames = pickle.loads(Path(job.frames_path).read_bytes())
    silence = pickle.loads(Path(job.silence_path).read_bytes())
    loop = asyncio.get_running_loop()
    streams = [_Stream(spec, job, frames, silence) for spec in job.streams]
    go: asyncio.Future[float] = loop.create_future()
    connected: asyncio.Queue[int] = asyncio.Queue()
    sem = asyncio.Semaphore(job.connect_concurrency)
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    tasks = [asyncio.create_task(s.run(sem, go, connected)) for s in streams]
    ok = 0
    for _ in streams:
        ok += await connected.get()
    conn.send(("connected", ok))
    message = await asyncio.to_thread(conn.recv)
    lags.clear()  # the connect phase is not the measurement
    go.set_result(float(message[1]))
    await asyncio.gather(*tasks, return_exceptions=True)
    stop.set()
    await ticker
    conn.send(("done", WorkerReport([s.outcome() for s in streams], np.array(lags), time.process_time())))


def client_worker(job: WorkerJob, conn: Connection) -> None:
    """Entry point of a client process (multiprocessing, spawn): connect, report, wait for "go", stream, report."""
    try:
        asyncio.run(_worker_main(job, conn))
    except Exception as exc:  # reported to the orchestrator, which stops the run
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
