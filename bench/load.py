"""Load generator: how many concurrent `/v4/listen` streams one server process carries in real time, at what latency,
CPU and memory; and the batch endpoints' throughput.

    .venv/bin/python bench/load.py                                # 10,25,50,100 streams x pcm16+opus, 60 s each
    .venv/bin/python bench/load.py --streams 2,4 --duration 15 --codec pcm16 --idle-streams 4 --batch-seconds 120
    .venv/bin/python bench/load.py --json load.json --plot load.png

Set-up. A real server process, `python -m uvicorn server:app` on a free loopback port, fresh `DATA_DIR` in a temp
dir, `STT_BACKEND=deepgram` pointed at the Deepgram-protocol test server (`tests/deepgram_server.py`, run on a thread
of this process, `keep_audio=False`) with a fixed reply delay (`--reply-delay`, 0.1 s), words of `--word-s` and a
result every `--result-every-s` of audio (0.25 s both, so little time is spent waiting for audio to accumulate),
`JOBS_ENABLED=false`, `LOG_LEVEL=WARNING`, no auth configured (loopback mode: `Authorization: Bearer load-<tag>-<i>`,
one distinct user per stream). By default every step gets a fresh server (clean memory figures, empty database);
`--reuse-server` keeps one. Each server first serves a 4 s warm-up stream (first-use allocations), then its memory
base is read.

A step (N streams, one codec). N WebSockets `/v4/listen?codec=pcm16|opus&sample_rate=16000` from `--client-procs`
client processes (default one per 100 streams; each one asyncio loop). Every stream connects, waits for the `ready`
status and sends digital silence while the others connect; then, at a common start plus a stagger (stream i at
i/N s), `--duration` seconds of real speech: sample.wav and the AMI excerpts of ../shared/data looped, each stream from
a different offset (golden-ratio spacing), in 20 ms frames (pcm16: 640 bytes; opus: one raw Opus packet per frame,
16 kHz mono 32 kb/s, PyAV's libopus as in tests/audio_tools.py, as Omi sends them), one binary WebSocket message
each. Frame k goes at anchor + k x 20 ms (an absolute schedule: one late frame does not delay the rest). websockets
does each stream's handshake, reads what the server sends and does the close handshake; the frames are encoded
once per client process as complete masked WebSocket frames and written straight to the connections' transports by
one task per process, which wakes every 5 ms and writes every frame that is due (the anchors are on those ticks,
spread over 4 ticks per 20 ms, so a process's streams send in 4 bursts of N/4 frames per 20 ms; see
`loadlib._Sender`). The first `--warmup` seconds (5) after the last stream started are not measured; the steady
window runs from there to the end of the first stream's audio.

Latency ("ours"). The test server's results cover exactly the audio it was sent, and the server maps those times back
to stream time, so a segment's `end` is a stream time whose audio the server had forwarded. For each message with a
new largest `end` on its stream (re-sends of older segments, e.g. relabels, do not count), latency = arrival time -
send time of the frame holding the last sample before `end` (frame ceil(end / 20 ms) - 1) - the reply delay. It
counts decode, resampling, VAD (including its hangover: a region's last words wait for the VAD to close it), the hop
to STT, speaker tagging on the shared model pool, storage and the send back. The wait for a result's audio to
accumulate at the STT is not counted: the frame that completed it is the reference. Only frames sent in the steady
window count. Percentiles are pooled over all streams.

Server cost. CPU: utime+stime of the server process (all its threads, and any child processes) from /proc over the
steady window, divided by the stream-seconds of audio sent in it (N x seconds). Memory: VmRSS at the base (after the
warm-up, no streams), with the N streams open and idle (connected, sending silence), and the peak while streaming;
MB/stream = (peak - base) / N. Idle streams: `--idle-streams` M streams that only ever send digital silence, on
their own fresh server; MB per idle stream = (RSS after `--idle-duration` s - base) / M.

Real time. "Real time" means no growing backlog. GET /metrics has only process-wide counters (no per-stream audio
progress), so the backlog is read from the latency trend: p95 of the last third of the window against the first
third; it grows by more than max(250 ms, half the first third's p95) -> not real time. Also not real time: a stream
that could not connect or was closed by the server, `error` events, or counter increments of
ws_slow_clients_closed_total, stt_gave_up_total, stt_buffer_overflow_seconds_total, or more
than 10% of the streams with no new segment in the window. The client measures itself so that a slow client is not
taken for a slow server: send lag (frame written to the connection's transport - its scheduled time: the client
loop's wake-up delay, and it grows when the server stops reading: a connection whose transport buffer is over
websockets' high-water mark, 32 KiB, gets no frame until it has drained, as `ws.send` would wait, so TCP
back-pressure shows) and the lag of a 10 ms ticker on each client loop (only the client's own CPU). Loop lag p95
over 50 ms marks the step "client-limited" (*): its figures are not the server's.

The issue's criterion: the largest N that is real time with p95 < 1 s. The target: 100 streams real time with p95
of our added latency < 300 ms, and < 5 MB per idle stream.

Batch (`--batch-seconds`, 3600; 0 skips): one WAV of that length (the test audio looped) to `POST /v1/vad`
(multipart `file`), and to `POST /v1/speaker-identification` (multipart `audio_file`, form `segments`: one every
5 s) after enrolling the user's voice (`/v1/speech-profile`, sample.wav) and one person (`/v1/people`, trn07).
Speed = audio seconds / wall seconds of the request (upload and decoding included).

The client processes and the test server share the machine with the server under test: their CPU is reported
per stream-second of audio sent (`bench (clients + test STT)`: the client processes and this process; of it the
client processes alone, the test STT's thread, and this whole process), and on a small machine it is part of what
limits N.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import loadlib  # noqa: E402
from deepgram_server import ThreadedDeepgramTestServer  # noqa: E402
from loadlib import FRAME_S, ServerProcess, StreamOutcome, StreamSpec, WorkerJob, WorkerReport  # noqa: E402

GOLDEN = 0.6180339887498949
BAD_COUNTERS = ("omi_ws_slow_clients_closed_total", "omi_stt_gave_up_total",
                "omi_stt_buffer_overflow_seconds_total")
TARGET_STREAMS, TARGET_P95_S, TARGET_IDLE_MB = 100, 0.300, 5.0
CRITERION_P95_S = 1.0
LOOP_LAG_LIMIT_S = 0.050


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: np.ndarray | list[float], q: float) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def ms(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds * 1000:.0f}"


# --- sampling the server while a step runs ----------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    server_cpu: float
    server_rss: float
    machine_busy: float
    machine_total: float
    bench_cpu: float  # the client processes + this (orchestrator) process
    client_cpu: float  # the client processes alone
    stt_cpu: float  # the Deepgram test server's thread (part of this process)
    server_threads: dict[str, float]  # the server's CPU by thread role (loadlib.threads_cpu_seconds)


class Sampler(threading.Thread):
    """Reads /proc every `every_s`: the server's CPU and RSS, the whole machine's CPU, this benchmark's CPU (client
    processes, this process, and of it the test STT's thread)."""

    def __init__(self, server_pids: list[int], client_pids: list[int], stt_tid: int | None,
                 every_s: float = 0.25) -> None:
        super().__init__(name="sampler", daemon=True)
        self.server_pids, self.client_pids, self.stt_tid, self.every_s = server_pids, client_pids, stt_tid, every_s
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def take(self) -> Sample:
        busy, total = loadlib.machine_cpu()
        clients, own = loadlib.cpu_seconds(self.client_pids), loadlib.cpu_seconds([os.getpid()])
        stt = loadlib.thread_cpu_seconds(os.getpid(), self.stt_tid) if self.stt_tid else float("nan")
        return Sample(time.monotonic(), loadlib.cpu_seconds(self.server_pids), loadlib.rss_mb(self.server_pids),
                      busy, total, clients + own, clients, stt, loadlib.threads_cpu_seconds(self.server_pids[0]))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(self.take())
            self._stop_event.wait(self.every_s)

    def stop(self) -> list[Sample]:
        self._stop_event.set()
        self.join()
        self.samples.append(self.take())
        return self.samples

    @staticmethod
    def window(samples: list[Sample], t0: float, t1: float) -> tuple[Sample, Sample] | None:
        inside = [s for s in samples if t0 <= s.t <= t1]
        return (inside[0], inside[-1]) if len(inside) >= 2 else None


# --- one step: N streams ------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    dg: ThreadedDeepgramTestServer
    frames_paths: dict[tuple[str, bool], str] = field(default_factory=dict)
    frame_counts: dict[str, int] = field(default_factory=dict)
    servers_started: int = 0

    def frames_path(self, codec: str, silence: bool) -> str:
        key = (codec, silence)
        if key not in self.frames_paths:
            path = self.tmp / f"frames-{codec}-{'silence' if silence else 'speech'}.pkl"
            frames = loadlib.make_frames(codec, silence)
            path.write_bytes(pickle.dumps(frames))
            self.frame_counts[str(path)] = len(frames)
            self.frames_paths[key] = str(path)
        return self.frames_paths[key]

    def server_env(self) -> dict[str, str]:
        a = self.args
        return {
            "STT_BACKEND": "deepgram", "DEEPGRAM_URL": self.dg.url, "DEEPGRAM_API_KEY": self.dg.api_key,
            "JOBS_ENABLED": "false", "LOG_LEVEL": "WARNING",
            "MAX_STREAMS": str(max([*a.streams, a.idle_streams]) + 10),
            "MAX_UPLOAD_MB": str(max(200, int(a.batch_seconds * 16000 * 2 / 1e6 * 1.2) + 10)),
            "MAX_UPLOAD_SECONDS": str(max(4 * 3600, int(a.batch_seconds) + 60)),
            **dict(kv.split("=", 1) for kv in a.server_env),
        }

    def start_server(self) -> ServerProcess:
        self.servers_started += 1
        log(f"starting server #{self.servers_started}")
        t = time.monotonic()
        server = loadlib.start_server(self.tmp / f"server{self.servers_started}", self.server_env(),
                                      cwd=self.args.server_dir)
        log(f"server ready in {time.monotonic() - t:.1f} s (pid {server.proc.pid})")
        return server

    def warm_up(self, server: ServerProcess, codec: str) -> tuple[float, float]:
        """One short stream (first-use allocations), then the base RSS and the CPU (cores) with no stream open."""
        self.run_streams(server, codec, 1, 4.0, silent=False, tag="warm", quiet=True)
        time.sleep(1.0)
        return self.at_rest(server)

    @staticmethod
    def at_rest(server: ServerProcess, seconds: float = 3.0) -> tuple[float, float]:
        """(RSS MB, CPU cores used) of the server with no stream open."""
        pids = loadlib.descendants(server.proc.pid)
        cpu0, t0 = loadlib.cpu_seconds(pids), time.monotonic()
        time.sleep(seconds)
        return loadlib.rss_mb(pids), (loadlib.cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)

    def dg_tid(self) -> int | None:
        """The Linux thread id of the Deepgram test server's thread (its CPU is read from /proc/self/task)."""
        thread = self.dg._thread
        return thread.native_id if thread is not None else None

    def clear_dg(self) -> None:
        self.dg.server.connections.clear()
        self.dg.server.attempts.clear()

    def run_streams(self, server: ServerProcess, codec: str, n: int, audio_s: float, *, silent: bool, tag: str,
                    quiet: bool = False) -> dict[str, Any]:
        a = self.args
        self.clear_dg()
        procs = a.client_procs or max(1, math.ceil(n / 100))
        procs = min(procs, n)
        specs = [StreamSpec(i, f"load-{tag}-{i}", 0, i / n * a.stagger) for i in range(n)]
        speech, silence = self.frames_path(codec, False), self.frames_path(codec, True)
        n_frames = self.frame_counts[speech]
        for s in specs:
            s.offset = int((((s.index + 1) * GOLDEN) % 1.0) * n_frames)
        url = f"{server.ws}/v4/listen?codec={codec}&sample_rate=16000&language=en"
        ctx = mp.get_context("spawn")
        conns: list[Connection] = []
        workers: list[Any] = []
        metrics_before = loadlib.scrape_metrics(server.http)
        for w in range(procs):
            job = WorkerJob(url, speech, silence, specs[w::procs], audio_s, silent=silent,
                            drain_gap_s=a.drain_gap, drain_max_s=a.drain_max)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadlib.client_worker, args=(job, child), daemon=True, name=f"client{w}")
            p.start()
            child.close()
            conns.append(parent)
            workers.append(p)
        server_pids = loadlib.descendants(server.proc.pid)
        sampler = Sampler(server_pids, [p.pid for p in workers if p.pid is not None], self.dg_tid())
        try:
            t_connect = time.monotonic()
            connected = sum(_expect(conns, "connected", 120 + n))
            connect_s = time.monotonic() - t_connect
            if not quiet:
                log(f"{connected}/{n} streams connected in {connect_s:.1f} s ({procs} client processes)")
            if connected == 0:
                raise RuntimeError(f"no stream could connect to the server; its log ends:\n{server.log_tail()}")
            sampler.start()
            time.sleep(2.0)
            rss_open = loadlib.rss_mb(server_pids)
            t0 = time.monotonic() + 0.5
            for c in conns:
                c.send(("go", t0))
            reports: list[WorkerReport] = _expect(conns, "done", audio_s + a.stagger + a.drain_max + 120)
        finally:
            samples = sampler.stop() if sampler.is_alive() else []
            for p in workers:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
        metrics_after = loadlib.scrape_metrics(server.http)
        if quiet:
            got = sum(r.outcomes[0].new_end.size for r in reports if r.outcomes)
            if not got:
                raise RuntimeError(f"the warm-up stream got no segment; the server log ends:\n{server.log_tail()}")
            return {}
        stt_audio_s = sum(c.audio_bytes for c in list(self.dg.server.connections)) / 32000
        outcomes = sorted((o for r in reports for o in r.outcomes), key=lambda o: o.index)
        loop_lag = np.concatenate([r.loop_lag for r in reports]) if reports else np.zeros(0)
        deltas = {k: metrics_after[k] - metrics_before.get(k, 0.0) for k in metrics_after
                  if k.endswith("_total") and metrics_after[k] != metrics_before.get(k, 0.0)}
        result = analyse(self.args, n, codec, silent, t0, audio_s, outcomes, samples, loop_lag, rss_open, deltas,
                         connect_s, stt_audio_s)
        result["pool_mean_batch"] = loadlib.pool_mean_batch(server.http)
        return result


def _expect(conns: list[Connection], kind: str, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    out = []
    for c in conns:
        if not c.poll(max(deadline - time.monotonic(), 0.0)):
            raise RuntimeError(f"a client process sent no '{kind}' within {timeout_s:.0f} s")
        message = c.recv()
        if message[0] != kind:
            raise RuntimeError(f"client process: {message}")
        out.append(message[1])
    return out


def _last_frame_before(end: float) -> int:
    """Index of the 20 ms frame that holds the last sample before stream time `end`."""
    return max(0, math.ceil(end / FRAME_S - 1e-6) - 1)


def analyse(args: argparse.Namespace, n: int, codec: str, silent: bool, t0: float, audio_s: float,
            outcomes: list[StreamOutcome], samples: list[Sample], loop_lag: np.ndarray, rss_open: float,
            deltas: dict[str, float], connect_s: float, stt_audio_s: float) -> dict[str, Any]:
    w0, w1 = t0 + args.stagger + args.warmup, t0 + audio_s
    third = (w1 - w0) / 3
    lat, lat_t, lags = [], [], []
    frames_in_window, beyond, quiet_streams = 0, 0, 0
    for o in outcomes:
        st = o.send_times
        if not o.connected or not st.size:
            continue
        mask = (st >= w0) & (st <= w1)
        lags.append((st - o.due_times)[mask])
        frames_in_window += int(mask.sum())
        got = 0
        for recv, end in zip(o.new_end_recv, o.new_end, strict=True):
            j = _last_frame_before(float(end))
            if j >= st.size:
                beyond += 1
                continue
            if j < o.audio_from or not w0 <= st[j] <= w1:
                continue
            lat.append(recv - st[j] - args.reply_delay)
            lat_t.append(st[j])
            got += 1
        quiet_streams += got == 0
    lat_a, lat_ta = np.array(lat), np.array(lat_t)
    lag_a = np.concatenate(lags) if lags else np.zeros(0)
    first, last = lat_a[lat_ta < w0 + third], lat_a[lat_ta >= w1 - third]

    win = Sampler.window(samples, w0, w1)
    cpu_per_stream_s = machine_util = bench_cpu_per_stream_s = float("nan")
    client_cpu_per_stream_s = stt_cpu_per_stream_s = float("nan")
    server_threads: dict[str, float] = {}  # cores used by each of the server's thread roles
    if win is not None:
        a, b = win
        stream_s = sum(int(((o.send_times >= a.t) & (o.send_times <= b.t)).sum()) for o in outcomes) * FRAME_S
        if stream_s > 0:
            cpu_per_stream_s = (b.server_cpu - a.server_cpu) / stream_s
            bench_cpu_per_stream_s = (b.bench_cpu - a.bench_cpu) / stream_s
            client_cpu_per_stream_s = (b.client_cpu - a.client_cpu) / stream_s
            stt_cpu_per_stream_s = (b.stt_cpu - a.stt_cpu) / stream_s
        if b.t > a.t:
            server_threads = {k: round((v - a.server_threads.get(k, 0.0)) / (b.t - a.t), 3)
                              for k, v in sorted(b.server_threads.items())}
        if b.machine_total > a.machine_total:
            machine_util = (b.machine_busy - a.machine_busy) / (b.machine_total - a.machine_total)
    rss_stream = [s.server_rss for s in samples if t0 <= s.t <= w1 + args.drain_max]
    rss_peak = max(rss_stream) if rss_stream else float("nan")
    before_close = [s.server_rss for s in samples if s.t <= w1]
    rss_end = before_close[-1] if before_close else float("nan")
    connected = sum(o.connected for o in outcomes)
    closed = [o for o in outcomes if o.closed_by_server]
    errors: dict[str, int] = {}
    for o in outcomes:
        for code in o.errors:
            errors[code] = errors.get(code, 0) + 1
    result: dict[str, Any] = {
        "n": n, "codec": codec, "silent": silent, "audio_s": audio_s, "window_s": round(w1 - w0, 2),
        "connected": connected, "connect_s": round(connect_s, 2),
        "cpu_s_per_stream_s": cpu_per_stream_s, "server_cores_used": cpu_per_stream_s * n,
        "machine_cpu_util": machine_util, "bench_cpu_s_per_stream_s": bench_cpu_per_stream_s,
        "client_cpu_s_per_stream_s": client_cpu_per_stream_s, "stt_cpu_s_per_stream_s": stt_cpu_per_stream_s,
        "server_thread_cores": server_threads,
        "rss_open_mb": rss_open, "rss_peak_mb": rss_peak, "rss_end_mb": rss_end,
        "latency_samples": int(lat_a.size), "p50_s": pct(lat_a, 50), "p95_s": pct(lat_a, 95), "p99_s": pct(lat_a, 99),
        "min_s": float(lat_a.min()) if lat_a.size else float("nan"),
        "max_s": float(lat_a.max()) if lat_a.size else float("nan"),
        "p95_first_third_s": pct(first, 95), "p95_last_third_s": pct(last, 95),
        "send_lag_p50_s": pct(lag_a, 50), "send_lag_p95_s": pct(lag_a, 95),
        "send_lag_max_s": float(lag_a.max()) if lag_a.size else float("nan"),
        "loop_lag_p95_s": pct(loop_lag, 95), "loop_lag_max_s": float(loop_lag.max()) if loop_lag.size else math.nan,
        "frames_in_window": frames_in_window, "streams_without_segments": quiet_streams,
        "segments_beyond_sent_audio": beyond, "closed_by_server": len(closed),
        "close_codes": sorted({o.close_code for o in closed if o.close_code is not None}),
        "error_events": errors, "counter_deltas": deltas, "stt_audio_s": round(stt_audio_s, 1),
        "connect_errors": sorted({o.error for o in outcomes if o.error})[:5],
    }
    if not silent:
        verdict(result)
    return result


def verdict(r: dict[str, Any]) -> None:
    """Sets realtime (bool), client_limited (bool), reason (str) and meets_criterion."""
    problems = []
    n = r["n"]
    if r["connected"] < n:
        problems.append(f"{n - r['connected']} of {n} streams not connected ({'; '.join(r['connect_errors'])})")
    if r["closed_by_server"]:
        problems.append(f"{r['closed_by_server']} streams closed by the server (codes {r['close_codes']})")
    if r["error_events"]:
        problems.append(f"error events {r['error_events']}")
    bad = {k: v for k, v in r["counter_deltas"].items() if k in BAD_COUNTERS and v > 0}
    if bad:
        problems.append(f"counters {bad}")
    if r["latency_samples"] == 0:
        problems.append("no segment measured")
    else:
        p_first, p_last = r["p95_first_third_s"], r["p95_last_third_s"]
        if math.isfinite(p_first) and math.isfinite(p_last) and p_last - p_first > max(0.25, 0.5 * p_first):
            problems.append(f"backlog: p95 grew from {ms(p_first)} to {ms(p_last)} ms over the window")
        elif r["p50_s"] > CRITERION_P95_S:  # steady but far behind: the backlog built up before the window
            problems.append(f"backlog: half the segments over {ms(r['p50_s'])} ms late")
    if r["streams_without_segments"] > 0.1 * n:
        problems.append(f"{r['streams_without_segments']} streams got no new segment in the window")
    client_limited = math.isfinite(r["loop_lag_p95_s"]) and r["loop_lag_p95_s"] > LOOP_LAG_LIMIT_S
    r["realtime"] = not problems
    r["client_limited"] = client_limited
    trend = f"p95 first/last third {ms(r['p95_first_third_s'])}/{ms(r['p95_last_third_s'])} ms"
    reason = "; ".join(problems) if problems else f"no backlog ({trend}), no refusals or errors"
    if client_limited:
        reason += f"; CLIENT-LIMITED: client loop lag p95 {ms(r['loop_lag_p95_s'])} ms"
    r["reason"] = reason
    r["meets_criterion"] = bool(r["realtime"] and r["p95_s"] < CRITERION_P95_S)


# --- batch endpoints --------------------------------------------------------------------------------------------


def run_batch(bench: Bench, server: ServerProcess) -> dict[str, Any]:
    import httpx

    seconds = bench.args.batch_seconds
    wav = bench.tmp / "batch.wav"
    log(f"building {seconds:.0f} s of audio for the batch endpoints")
    length = loadlib.write_wav_loop(wav, seconds)
    pids = loadlib.descendants(server.proc.pid)
    headers = {"Authorization": "Bearer load-batch"}
    out: dict[str, Any] = {"audio_s": length, "wav_mb": round(wav.stat().st_size / 1e6, 1)}
    with httpx.Client(base_url=server.http, headers=headers, timeout=None) as http:
        sample = (loadlib.DATA / "sample.wav").read_bytes()
        r = http.post("/v1/speech-profile", files={"file": ("sample.wav", sample, "audio/wav")})
        r.raise_for_status()
        person = http.post("/v1/people", json={"name": "trn07"})
        person.raise_for_status()
        trn07 = (loadlib.DATA / "ami-debug" / "trn07.wav").read_bytes()
        r = http.post(f"/v1/people/{person.json()['id']}/samples", files={"file": ("trn07.wav", trn07, "audio/wav")})
        r.raise_for_status()

        log("POST /v1/vad")
        cpu0, t = loadlib.cpu_seconds(pids), time.monotonic()
        with open(wav, "rb") as fh:
            r = http.post("/v1/vad", files={"file": ("batch.wav", fh, "audio/wav")})
        wall, cpu = time.monotonic() - t, loadlib.cpu_seconds(pids) - cpu0
        r.raise_for_status()
        regions = r.json()
        out["vad"] = {"wall_s": wall, "server_cpu_s": cpu, "x_realtime": length / wall, "regions": len(regions),
                      "speech_s": round(sum(x["duration"] for x in regions), 1)}

        segments = [{"start": float(s), "end": float(min(s + 5, length))} for s in range(0, int(length), 5)]
        log(f"POST /v1/speaker-identification ({len(segments)} segments)")
        cpu0, t = loadlib.cpu_seconds(pids), time.monotonic()
        with open(wav, "rb") as fh:
            r = http.post("/v1/speaker-identification", files={"audio_file": ("batch.wav", fh, "audio/wav")},
                          data={"segments": json.dumps(segments)})
        wall, cpu = time.monotonic() - t, loadlib.cpu_seconds(pids) - cpu0
        r.raise_for_status()
        ids = r.json()
        if len(ids) != len(segments):
            raise RuntimeError(f"speaker-identification: {len(ids)} answers for {len(segments)} segments")
        out["speaker_identification"] = {
            "wall_s": wall, "server_cpu_s": cpu, "x_realtime": length / wall, "segments": len(segments),
            "segments_per_s": len(segments) / wall, "is_user": sum(x["is_user"] for x in ids),
            "person": sum(x["person_id"] is not None for x in ids)}
    out["rss_after_mb"] = loadlib.rss_mb(pids)
    return out


# --- reporting ----------------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    a = results["config"]
    lines = [
        f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu_model']}, {m['ram_gb']} GB RAM; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}",
        f"test STT: reply delay {a['reply_delay']:g} s (subtracted), words {a['word_s']:g} s, a result every "
        f"{a['result_every_s']:g} s of audio; {a['duration']:g} s of speech per stream per step, first "
        f"{a['stagger'] + a['warmup']:g} s not measured",
        "latency = segment arrival - send time of the frame holding its end - reply delay (new ends only; the wait "
        "for STT audio to accumulate is not counted)",
        "",
        f"{'N':>4} {'codec':>6} {'CPU s/stream-s':>14} {'RSS MB':>7} {'MB/stream':>9} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'send lag p95':>12} {'machine CPU':>11} {'realtime':>8}",
    ]
    notes = []
    for r in results["steps"]:
        per = (r["rss_peak_mb"] - r["base_rss_mb"]) / r["n"]
        rt = ("yes" if r["realtime"] else "no") + ("*" if r["client_limited"] else "")
        lines.append(
            f"{r['n']:>4} {r['codec']:>6} {r['cpu_s_per_stream_s']:>14.4f} {r['rss_peak_mb']:>7.0f} {per:>9.2f} "
            f"{ms(r['p50_s']):>7} {ms(r['p95_s']):>7} {ms(r['p99_s']):>7} {ms(r['send_lag_p95_s']):>12} "
            f"{r['machine_cpu_util'] * 100:>10.0f}% {rt:>8}")
        notes.append(f"  N={r['n']} {r['codec']}: {r['reason']}. {r['latency_samples']} latencies; base RSS "
                     f"{r['base_rss_mb']:.0f} MB, {r['rss_open_mb']:.0f} MB with the streams open and silent; "
                     f"server uses {r['server_cores_used']:.2f} cores ({r['rest_cores']:.3f} at rest); "
                     "bench (clients + test STT) "
                     f"{r['bench_cpu_s_per_stream_s']:.4f} CPU s/stream-s (client processes "
                     f"{r['client_cpu_s_per_stream_s']:.4f}, test STT thread {r['stt_cpu_s_per_stream_s']:.4f}, "
                     f"orchestrator in all {r['bench_cpu_s_per_stream_s'] - r['client_cpu_s_per_stream_s']:.4f}); "
                     "client loop lag p95 "
                     f"{ms(r['loop_lag_p95_s'])} ms; {r['stt_audio_s']:.0f} s of audio reached STT; connect "
                     f"{r['connect_s']:.1f} s" + (f"; counters {r['counter_deltas']}" if r["counter_deltas"] else "")
                     + "; server cores by thread: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                               r.get("server_thread_cores", {}).items())
                     + "; pool mean batch: " + ", ".join(f"{k} {v}" for k, v in r.get("pool_mean_batch", {}).items()))
    lines += ["", "per step:", *notes]
    if any(r["client_limited"] for r in results["steps"]):
        lines.append("  * client-limited: the generator's own loop lagged; more --client-procs or a bigger machine")
    idle = results.get("idle")
    if idle:
        lines += ["", f"idle streams: {idle['n']} x {idle['codec']} silence for {idle['audio_s']:g} s: base "
                      f"{idle['base_rss_mb']:.0f} MB, {idle['rss_end_mb']:.0f} MB with them open -> "
                      f"{idle['mb_per_idle_stream']:.2f} MB per idle stream; {idle['cpu_s_per_stream_s']:.4f} CPU "
                      f"s/stream-s; {idle['connected']}/{idle['n']} connected"]
    batch = results.get("batch")
    if batch:
        v, s = batch["vad"], batch["speaker_identification"]
        lines += ["", f"batch on {batch['audio_s']:.0f} s of audio ({batch['wav_mb']} MB WAV):",
                  f"  /v1/vad: {v['wall_s']:.1f} s wall, {v['x_realtime']:.0f}x real time, server CPU "
                  f"{v['server_cpu_s']:.1f} s, {v['regions']} regions",
                  f"  /v1/speaker-identification: {s['wall_s']:.1f} s wall, {s['x_realtime']:.0f}x real time, "
                  f"{s['segments_per_s']:.1f} segments/s ({s['segments']} of 5 s), server CPU "
                  f"{s['server_cpu_s']:.1f} s"]
    lines += ["", *results["summary"]]
    return "\n".join(lines)


def summarise(results: dict[str, Any]) -> list[str]:
    out = []
    steps = results["steps"]
    for codec in sorted({r["codec"] for r in steps}):
        ok = [r["n"] for r in steps if r["codec"] == codec and r["meets_criterion"]]
        best = max(ok) if ok else None
        out.append(f"{codec}: largest N real time with p95 < {CRITERION_P95_S * 1000:.0f} ms: "
                   + (str(best) if best is not None else "none of those tried"))
    idle = results.get("idle")
    idle_ok = idle is not None and idle["mb_per_idle_stream"] < TARGET_IDLE_MB
    for codec in sorted({r["codec"] for r in steps}):
        at = [r for r in steps if r["codec"] == codec and r["n"] >= TARGET_STREAMS]
        met = any(r["realtime"] and not r["client_limited"] and r["p95_s"] < TARGET_P95_S for r in at)
        status = ("not measured (no step with N >= 100)" if not at else "met" if met and idle_ok
                  else "not met")
        idle_text = "idle not measured" if idle is None else f"{idle['mb_per_idle_stream']:.2f} MB/idle stream"
        out.append(f"target ({TARGET_STREAMS} streams real time, p95 < {TARGET_P95_S * 1000:.0f} ms, < "
                   f"{TARGET_IDLE_MB:g} MB/idle stream) with {codec}: {status} ({idle_text})")
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for codec in sorted({r["codec"] for r in results["steps"]}):
        rs = sorted((r for r in results["steps"] if r["codec"] == codec), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [_num(r["p50_s"]) * 1000 for r in rs], "o-", label=f"{codec} p50")
        ax1.plot(ns, [_num(r["p95_s"]) * 1000 for r in rs], "s--", label=f"{codec} p95")
        ax2.plot(ns, [_num(r["cpu_s_per_stream_s"]) for r in rs], "o-", label=codec)
    ax1.axhline(TARGET_P95_S * 1000, color="grey", lw=0.8, ls=":", label="target p95")
    ax1.axhline(CRITERION_P95_S * 1000, color="red", lw=0.8, ls=":", label="criterion p95")
    ax1.set(xlabel="concurrent streams", ylabel="added latency (ms)", title="Latency (ours)")
    ax2.set(xlabel="concurrent streams", ylabel="server CPU s per stream-second", title="Server CPU")
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"{m['cores']} cores, {m['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# --- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="10,25,50,100", help="comma-separated N per step (default 10,25,50,100)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of speech per stream per step (60)")
    p.add_argument("--codec", choices=("pcm16", "opus", "both"), default="both")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds not measured after the last stream started (5)")
    p.add_argument("--stagger", type=float, default=1.0, help="stream starts spread over this many seconds (1)")
    p.add_argument("--client-procs", type=int, default=0, help="client processes (0: one per 100 streams)")
    p.add_argument("--reply-delay", type=float, default=0.1, help="test STT reply delay, subtracted (0.1 s)")
    p.add_argument("--word-s", type=float, default=0.5, help="test STT word length (0.5 s)")
    # Deepgram's final results (interim_results=false) come about once a second of speech, or at a Finalize.
    p.add_argument("--result-every-s", type=float, default=1.0, help="test STT result cadence (1 s of audio)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the server under test (repeatable), e.g. POOL_MAX_WAIT_MS=40")
    p.add_argument("--server-dir", type=Path, default=loadlib.REPO,
                   help="the checkout whose server.py runs (A/B against another commit; default this one)")
    p.add_argument("--drain-gap", type=float, default=1.5, help="after the last frame, close once quiet this long")
    p.add_argument("--drain-max", type=float, default=15.0, help="... or after this long at most")
    p.add_argument("--idle-streams", type=int, default=100, help="M silent streams: MB per idle stream (0: skip)")
    p.add_argument("--idle-duration", type=float, default=20.0, help="seconds the idle streams stay open (20)")
    p.add_argument("--batch-seconds", type=float, default=3600.0, help="audio for the batch endpoints (0: skip)")
    p.add_argument("--reuse-server", action="store_true", help="one server for all steps (faster, dirtier memory)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG of latency and CPU against N (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        args.streams = sorted({int(x) for x in args.streams.split(",") if x.strip()})
    except ValueError:
        p.error("--streams: comma-separated integers")
    if not args.streams or min(args.streams) < 1:
        p.error("--streams: at least one N >= 1")
    if args.duration - args.warmup - args.stagger < 3:
        p.error("--duration must leave at least 3 s after --warmup and --stagger")
    if args.idle_streams and args.idle_duration - args.warmup - args.stagger < 1:
        p.error("--idle-duration must be longer than --warmup + --stagger")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: add it to requirements-dev.txt and reinstall (make test does)")
    return args


def one_step_args(args: argparse.Namespace, server_env: list[str]) -> argparse.Namespace:
    """`args` of a script that runs `Bench` steps of `args.streams` pcm16 streams (batch_vs_live.py,
    webhook_neighbours.py), completed with this script's defaults for everything it does not set, and `server_env`
    (KEY=VALUE) as the server's settings; `streams_n` is N, `streams` the one-step list `Bench` takes."""
    base = parse_args(["--streams", str(args.streams), "--duration", str(args.duration), "--codec", "pcm16",
                       "--idle-streams", "0", "--batch-seconds", "0", *[f"--server-env={kv}" for kv in server_env]])
    for k, v in vars(base).items():
        if not hasattr(args, k) or k == "server_env":
            setattr(args, k, v)
    args.streams_n = args.streams
    args.streams = [args.streams]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codecs = ["pcm16", "opus"] if args.codec == "both" else [args.codec]
    results: dict[str, Any] = {"machine": loadlib.machine_info(),
                               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "steps": []}
    dg = ThreadedDeepgramTestServer(api_key="load-key", word_s=args.word_s, result_every_s=args.result_every_s,
                                    reply_delay_s=args.reply_delay, keep_audio=False)
    dg.start()
    live: list[ServerProcess] = []
    try:
        with tempfile.TemporaryDirectory(prefix="omi-load-") as tmp:
            bench = Bench(args, Path(tmp), dg)

            def server_for_phase(codec: str) -> tuple[ServerProcess, tuple[float, float]]:
                """A fresh, warmed-up server, its base RSS and CPU at rest (or the shared one with --reuse-server)."""
                if live and args.reuse_server:
                    return live[0], bench.at_rest(live[0])
                live.append(bench.start_server())
                return live[-1], bench.warm_up(live[-1], codec)

            def done_with(server: ServerProcess) -> None:
                if not args.reuse_server:
                    loadlib.stop_server(server)
                    live.remove(server)

            try:
                for codec in codecs:
                    for n in args.streams:
                        server, (base, rest) = server_for_phase(codec)
                        log(f"step: {n} x {codec}, {args.duration:g} s (base RSS {base:.0f} MB, {rest:.3f} cores "
                            "at rest)")
                        r = bench.run_streams(server, codec, n, args.duration, silent=False, tag=f"{codec}{n}")
                        r["base_rss_mb"], r["rest_cores"] = base, rest
                        results["steps"].append(r)
                        log(f"  p50/p95/p99 {ms(r['p50_s'])}/{ms(r['p95_s'])}/{ms(r['p99_s'])} ms, CPU "
                            f"{r['cpu_s_per_stream_s']:.4f} s/stream-s, realtime {r['realtime']}: {r['reason']}")
                        done_with(server)
                if args.idle_streams > 0:
                    server, (base, rest) = server_for_phase(codecs[0])
                    log(f"idle: {args.idle_streams} silent streams for {args.idle_duration:g} s")
                    r = bench.run_streams(server, codecs[0], args.idle_streams, args.idle_duration, silent=True,
                                          tag="idle")
                    r["base_rss_mb"], r["rest_cores"] = base, rest
                    r["mb_per_idle_stream"] = (r["rss_end_mb"] - base) / args.idle_streams
                    results["idle"] = r
                    done_with(server)
                if args.batch_seconds > 0:
                    server, _ = server_for_phase(codecs[0])
                    results["batch"] = run_batch(bench, server)
                    done_with(server)
            except Exception as exc:  # report what was measured before it
                results["aborted"] = str(exc)
                log(f"ABORTED: {exc}")
            finally:
                for server in live:
                    loadlib.stop_server(server)
    finally:
        dg.stop()
    results["summary"] = summarise(results)
    if "aborted" in results:
        results["summary"].append(f"ABORTED (see the log above): {results['aborted'].splitlines()[0]}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(_clean(results), indent=2))
        log(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        log(f"wrote {args.plot}")
    return 1 if "aborted" in results else 0


if __name__ == "__main__":
    sys.exit(main())
