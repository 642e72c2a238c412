"""Building blocks of `bench/load.py`: test audio as frames, the server process and what it costs (/proc), and the
stream clients (one asyncio loop per client process, one task in it writing all its streams' frames: `_Sender`).
See `bench/load.py` for the method.

Clocks: every timestamp here is `time.monotonic()`, which on Linux is one system-wide clock (CLOCK_MONOTONIC), so
times taken in the client processes, the Deepgram test server thread and the orchestrator compare directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import os
import pickle
import sys
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

if str(Path(__file__).resolve().parents[1] / "tests") not in sys.path:  # the tests' server process helper
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import server_process  # noqa: E402
from server_process import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RATE = 16000
FRAME_S = 0.02  # Omi sends 20 ms frames
FRAME_SAMPLES = int(RATE * FRAME_S)
TICK_S = 0.005  # the client's sender wakes on multiples of this (monotonic clock)
SLOTS = round(FRAME_S / TICK_S)
LAG_TICK_S = 0.010  # the loop-lag ticker's period (a multiple of TICK_S)
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
    for path in (str(REPO), str(REPO / "tests")):  # audio_tools imports the app's streaming.device_codecs
        if path not in sys.path:
            sys.path.insert(0, path)
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


def threads_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of a process's threads by role: "event loop" (the main thread), the model pool's workers (by
    the OS thread names streaming/pool.py gives them, "pool-vad", "pool-speaker"), and "other threads"."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = Path(f"/proc/{pid}/task/{entry.name}/stat").read_text()
                comm = text[text.index("(") + 1 : text.rindex(")")]
                f = text[text.rindex(")") + 2 :].split()
                role = "event loop" if int(entry.name) == pid else comm if comm.startswith("pool-") else "other threads"
                out[role] = out.get(role, 0.0) + (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread of a process (/proc/<pid>/task/<tid>/stat)."""
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return float("nan")
    f = text[text.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


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


def start_server(workdir: Path, env: dict[str, str], cwd: Path = REPO) -> ServerProcess:
    """`python -m uvicorn server:app` from `cwd` (tests/server_process.py), given 180 s to load its models."""
    return server_process.start_server(workdir, env, cwd=cwd, timeout_s=180.0)


def stop_server(server: ServerProcess) -> None:
    server_process.stop_server(server, timeout_s=40.0)


def pool_mean_batch(http: str) -> dict[str, float]:
    """Mean batch of each model pool worker since the server started (GET /ready); {} when it cannot be read."""
    import httpx

    try:
        pool = httpx.get(f"{http}/ready", timeout=5).json().get("pool", {})
    except (httpx.HTTPError, ValueError):
        return {}
    return {k: v["mean_batch"] for k, v in pool.items() if isinstance(v, dict) and "mean_batch" in v}


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


def ws_binary_frames(payloads: list[bytes]) -> list[bytes]:
    """Each payload as one complete client-to-server WebSocket message on the wire (RFC 6455 5.2: FIN + opcode 0x2,
    the MASK bit, the payload length (7 bits, or 126 + 16 bits for 126..65535), a 4-byte masking key, the masked
    payload), serialised by websockets' own `Frame.serialize`, so it is byte for byte what `ws.send(payload)` would
    write. The masking key is the client's choice: websockets draws a random one per frame here, once per client
    process, and a frame that is sent again when the material loops carries the same key. RFC 6455 wants keys that
    intermediaries cannot predict (against cache poisoning through proxies); for a test client on loopback a
    re-used key is valid protocol: the server unmasks each frame with the key in it."""
    from websockets.frames import Frame, Opcode

    return [Frame(Opcode.BINARY, p).serialize(mask=True) for p in payloads]


class _Stream:
    """One `/v4/listen` connection: websockets does the handshake, parses what the server sends (`_read`) and the
    close handshake; the audio frames are written by the process's `_Sender`."""

    def __init__(self, spec: StreamSpec, job: WorkerJob) -> None:
        self.spec = spec
        self.job = job
        self.out = StreamOutcome(spec.index)
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()  # set by the sender: no more frames for this stream
        self.last_message = time.monotonic()
        self.best_end = -1.0
        self.recv_t: list[float] = []
        self.recv_end: list[float] = []
        self.sent = array("d")  # monotonic time frame k was written to the transport
        self.done_sending = False
        # the sender's state for this stream
        self.ws: Any = None
        self.transport: Any = None
        self.anchor = 0.0  # frame k is due at anchor + k * 20 ms
        self.k = 0  # the next frame
        self.start = self.end = float("inf")  # material from `start` on (set at "go"); nothing from `end` on

    async def run(self, sem: asyncio.Semaphore, sender: _Sender, connected: asyncio.Queue[int]) -> None:
        from websockets.asyncio.client import connect

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
        sender.add(self, ws)
        await self.finished.wait()
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
        o.send_times = np.frombuffer(self.sent, dtype=np.float64).copy()
        o.due_times = self.anchor + np.arange(o.send_times.size) * FRAME_S  # the same floats the sender compared
        o.new_end_recv, o.new_end = np.array(self.recv_t), np.array(self.recv_end)
        return o


class _Sender:
    """Writes the audio frames of all the streams of a client process, from one task. (The old way, one task per
    stream, each `await asyncio.sleep` + `await ws.send(frame)` 50 times a second, cost about 2.5x the CPU at 100
    streams: on a small VM every wake-up of a process is dear, and websockets' send path is Python per frame.)

    Frame k of a stream is due at anchor + k x 20 ms (an absolute schedule: a late frame does not delay the next
    ones): silence until the stream's start (common start + its stagger), then `audio_s` of material, then stop.
    The task wakes on ticks, origin + m x `TICK_S` (5 ms) of the shared monotonic clock, and each time writes every
    frame whose due time has passed, each with one `transport.write` of its pre-encoded wire bytes (`ws_binary_frames`:
    no masking, framing or websockets protocol machinery per frame), and records the time it handed the frame over
    (`time.monotonic()` just before the write). The anchors are on the ticks: a stream's first frame goes at the
    first 20 ms boundary (from the origin) after it is ready plus `slot` ticks, slot = its position in the process
    mod 4, so frames are due exactly on ticks (they go with the loop's own wake-up delay, not up to a tick late) and
    a process's N streams send in 4 bursts of N/4 frames per 20 ms, not in one. Each process has its own origin (a
    fraction of a tick from its first stream's index), so the bursts of several processes interleave. The task sleeps
    until the tick of the next due frame (heap by due time), so it wakes at most 200 times a second, and the
    loop-lag ticker (every 10 ms, on the same ticks) wakes with it.

    Nothing else can split a frame: `transport.write` of a whole frame is atomic with respect to the other writes of
    the loop (websockets' own frames, pongs and the close frame, are also written whole, each in one synchronous
    call). A stream whose connection is no longer OPEN (the server sent or the client answered a close frame, or the
    connection is gone) gets no more frames, so no data frame follows a close frame, and counts as closed by the
    server, as `ws.send` would have raised `ConnectionClosed`.

    Back-pressure: websockets' `ws.send` writes and then waits in `drain()` while the transport's buffer is over its
    high-water mark (`write_limit`, 32 KiB, until it is down to a quarter of it). Here a stream whose connection is
    paused that way (`ws.paused`, the flag `drain()` waits on) gets no frame written: its due frames wait, are
    written (each with the time it really went) on the first tick after the buffer has drained. So when the server
    stops reading, TCP back-pressure shows in the send lag (write time - due time) as it did with `ws.send`. As
    before, every frame due before the stream's end goes, however late.
    """

    def __init__(self, job: WorkerJob, material: list[bytes], silence: list[bytes]) -> None:
        self.job = job
        self.material = material
        self.silence = silence
        self.streams: list[_Stream] = []
        self.heap: list[tuple[float, int, _Stream]] = []
        self.t0: float | None = None
        # this process's ticks: origin + m x TICK_S (a different origin per process: their bursts interleave)
        self.origin = ((job.streams[0].index * 0.6180339887498949) % 1.0) * TICK_S if job.streams else 0.0
        self._added = asyncio.Event()

    def add(self, stream: _Stream, ws: Any) -> None:
        stream.ws, stream.transport = ws, ws.transport
        now, origin = time.monotonic(), self.origin
        slot = len(self.streams) % SLOTS
        stream.anchor = origin + math.ceil((now - origin) / FRAME_S) * FRAME_S + slot * TICK_S
        if self.t0 is not None:
            self._set_times(stream)
        self.streams.append(stream)
        heapq.heappush(self.heap, (stream.anchor, stream.spec.index, stream))
        self._added.set()

    def go(self, t0: float) -> None:
        """The common start: each stream's material starts at t0 + its stagger."""
        self.t0 = t0
        for stream in self.streams:
            self._set_times(stream)

    def _set_times(self, stream: _Stream) -> None:
        assert self.t0 is not None
        stream.start = self.t0 + stream.spec.stagger_s
        stream.end = stream.start + self.job.audio_s

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException:  # cancelled at the end, or a bug: no stream may wait for frames that never come
            for stream in self.streams:
                stream.finished.set()
            raise

    async def _run(self) -> None:
        from websockets.protocol import State

        open_ = State.OPEN
        heap, mono, origin = self.heap, time.monotonic, self.origin
        heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
        silent = self.job.silent
        material = self.silence if silent else self.material
        silence = self.silence
        n_material, n_silence = len(material), len(silence)
        while True:
            if not heap:
                self._added.clear()
                await self._added.wait()
            woke = now = mono()
            paused = []
            while heap and heap[0][0] <= now:
                entry = heap[0]
                due, _, s = entry
                ws = s.ws
                if due >= s.end or ws.protocol.state is not open_:
                    heappop(heap)
                    if due < s.end:  # the connection closed under us
                        s.out.closed_by_server = True
                    s.finished.set()
                    continue
                if ws.paused:  # the transport's buffer is over the high-water mark: the frame waits
                    paused.append(heappop(heap))
                    continue
                k = s.k
                if due >= s.start:
                    out = s.out
                    if out.audio_from < 0:
                        out.audio_from = k
                    frame = material[(s.spec.offset + k - out.audio_from) % n_material]
                else:
                    frame = silence[k % n_silence]
                now = mono()
                try:
                    s.transport.write(frame)
                except Exception:  # e.g. written after EOF: the connection is going; the state check ends it
                    heappop(heap)
                    s.out.closed_by_server = True
                    s.finished.set()
                    continue
                s.sent.append(now)
                s.k = k = k + 1
                due = s.anchor + k * FRAME_S
                if due >= s.end:  # that was the last frame
                    heappop(heap)
                    s.finished.set()
                else:
                    heapreplace(heap, (due, entry[1], s))
            for entry in paused:
                heappush(heap, entry)
            if heap:
                # the first tick (origin + m x TICK_S) at or after the next due frame
                wake = origin + math.ceil((max(heap[0][0], woke + 1e-6) - origin) / TICK_S - 1e-6) * TICK_S
                await asyncio.sleep(max(wake - mono(), 0.0))


async def _ticker(lags: list[float], stop: asyncio.Event, origin: float) -> None:
    """Every 10 ms (on the sender's ticks, so that the two wake up together), how late the loop ran it."""
    mono = time.monotonic
    while not stop.is_set():
        due = origin + (math.floor((mono() - origin) / LAG_TICK_S) + 1) * LAG_TICK_S
        await asyncio.sleep(due - mono())
        lags.append(mono() - due)


async def _worker_main(job: WorkerJob, conn: Connection) -> None:
    material = ws_binary_frames(pickle.loads(Path(job.frames_path).read_bytes()))
    silence = ws_binary_frames(pickle.loads(Path(job.silence_path).read_bytes()))
    streams = [_Stream(spec, job) for spec in job.streams]
    sender = _Sender(job, material, silence)
    sending = asyncio.create_task(sender.run())
    connected: asyncio.Queue[int] = asyncio.Queue()
    sem = asyncio.Semaphore(job.connect_concurrency)
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop, sender.origin))
    tasks = [asyncio.create_task(s.run(sem, sender, connected)) for s in streams]
    ok = 0
    for _ in streams:
        ok += await connected.get()
    conn.send(("connected", ok))
    message = await asyncio.to_thread(conn.recv)
    lags.clear()  # the connect phase is not the measurement
    sender.go(float(message[1]))
    await asyncio.gather(*tasks, return_exceptions=True)
    if sending.done() and sending.exception() is not None:
        raise RuntimeError(f"the sender failed: {sending.exception()!r}")
    sending.cancel()
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
