"""Live stream latency with and without batch load, side by side on one server (issue 12: batch work must never
starve live streams; the target is live p95 moving by no more than 20 %).

    .venv/bin/python bench/batch_vs_live.py --streams 10 --duration 40
    .venv/bin/python bench/batch_vs_live.py --streams 4 --duration 30 --server-env BATCH_MAX_CONCURRENT=1

One real server process (`bench/load.py`'s set-up: the Deepgram-protocol test server with a fixed reply delay, real
speech at real time from `--streams` N streams, latency "ours" as load.py measures it). Step "quiet": N streams, no
batch requests. Step "batch": the same N streams while `--batch-clients` threads post `/v1/speaker-identification`
back to back (`--batch-audio-s` of real speech, a 5 s segment every 5 s, repeated `--segment-repeat` times so that
each request embeds many clips, as a long conversation does), the user's voice enrolled so that every request does
its VAD and embeddings. More clients than BATCH_MAX_CONCURRENT keep the admission full (the rest get 429) and the
speaker pool's batch lane busy all the time. Then "quiet" again, so that a drift of the shared machine shows.
Printed: p50/p95 of each step, the batch requests' outcomes and the batch lane's use, and p95(batch) / p95(quiet).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402
import load  # noqa: E402
import loadlib  # noqa: E402
from deepgram_server import ThreadedDeepgramTestServer  # noqa: E402

TARGET_RATIO = 1.20
BATCH_USER = "load-batch"


class BatchLoad:
    """Threads posting /v1/speaker-identification back to back until stopped; counts the answers."""

    def __init__(self, http: str, wav: bytes, segments: list[dict], clients: int) -> None:
        self.http, self.wav, self.clients = http, wav, clients
        self.segments = json.dumps(segments)
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.seconds: list[float] = []  # wall time of each 200
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.http, headers={"Authorization": f"Bearer {BATCH_USER}"}, timeout=600) as c:
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    r = c.post("/v1/speaker-identification", files={"audio_file": ("b.wav", self.wav, "audio/wav")},
                               data={"segments": self.segments})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == 200:
                        self.seconds.append(time.monotonic() - t)
                if status in (429, 503):
                    self.stop.wait(0.5)  # as a client told Retry-After would, but sooner: keep the pressure on

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(600)


def speaker_lane(http: str) -> dict[str, Any]:
    """The speaker pool's batch worker's stats."""
    return httpx.get(f"{http}/ready", timeout=10).json().get("pool", {}).get("speaker_batch", {})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=10, help="live streams N (10)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of speech per stream and step (40)")
    p.add_argument("--batch-clients", type=int, default=4, help="threads posting batch requests (4)")
    p.add_argument("--batch-audio-s", type=float, default=120.0, help="audio per batch request (120 s)")
    p.add_argument("--segment-repeat", type=int, default=4, help="each 5 s segment this many times (4)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    return load.one_step_args(args, args.server_env)


def step_figures(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("n", "latency_samples", "p50_s", "p95_s", "p99_s", "realtime", "reason",
                                  "server_cores_used", "machine_cpu_util", "error_events", "closed_by_server")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.streams_n
    dg = ThreadedDeepgramTestServer(api_key="load-key", word_s=args.word_s, result_every_s=args.result_every_s,
                                    reply_delay_s=args.reply_delay, keep_audio=False)
    dg.start()
    out: dict[str, Any] = {"machine": loadlib.machine_info(), "config": {
        "streams": n, "duration": args.duration, "batch_clients": args.batch_clients,
        "batch_audio_s": args.batch_audio_s, "segment_repeat": args.segment_repeat, "server_env": args.server_env}}
    try:
        with tempfile.TemporaryDirectory(prefix="omi-batch-live-") as tmp:
            bench = load.Bench(args, Path(tmp), dg)
            server = bench.start_server()
            try:
                bench.warm_up(server, "pcm16")
                wav_path = Path(tmp) / "batch.wav"
                length = loadlib.write_wav_loop(wav_path, args.batch_audio_s)
                segments = [{"start": float(s), "end": float(s + 5)} for s in range(0, int(length) - 4, 5)]
                segments *= args.segment_repeat
                with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {BATCH_USER}"},
                                  timeout=120) as http:
                    sample = (loadlib.DATA / "sample.wav").read_bytes()
                    http.post("/v1/speech-profile", files={"file": ("s.wav", sample, "audio/wav")}).raise_for_status()
                steps = {}
                load.log(f"step quiet: {n} streams, no batch requests")
                steps["quiet"] = bench.run_streams(server, "pcm16", n, args.duration, silent=False, tag="quiet")
                lane0 = speaker_lane(server.http)
                batch = BatchLoad(server.http, wav_path.read_bytes(), segments, args.batch_clients)
                load.log(f"step batch: {n} streams, {args.batch_clients} clients posting {len(segments)} segments")
                batch.start()
                time.sleep(5.0)  # the first requests past their upload and VAD: the lane is in use
                steps["batch"] = bench.run_streams(server, "pcm16", n, args.duration, silent=False, tag="batch")
                lane1 = speaker_lane(server.http)
                batch.finish()
                load.log(f"step quiet again: {n} streams")
                steps["quiet_again"] = bench.run_streams(server, "pcm16", n, args.duration, silent=False,
                                                         tag="quiet2")
                out["steps"] = {k: step_figures(v) for k, v in steps.items()}
                out["batch"] = {"statuses": batch.statuses, "request_s": batch.seconds,
                                "lane_items_during_step": lane1.get("items", 0) - lane0.get("items", 0),
                                "max_batch_queued": lane1.get("max_queued"),
                                "batch_queue_size": lane1.get("queue_size")}
            finally:
                loadlib.stop_server(server)
    finally:
        dg.stop()
    quiet = [out["steps"][k]["p95_s"] for k in ("quiet", "quiet_again")]
    ratio = out["steps"]["batch"]["p95_s"] / max(min(quiet), 1e-9)
    out["p95_ratio_batch_over_quiet"] = ratio
    print(f"\nlive streams: {n}, {args.duration:g} s each; batch: {args.batch_clients} clients, "
          f"{len(segments)} segments of {length:.0f} s audio per request")
    print(f"{'step':<12} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'samples':>8}  realtime")
    for name, r in out["steps"].items():
        print(f"{name:<12} {load.ms(r['p50_s']):>8} {load.ms(r['p95_s']):>8} {load.ms(r['p99_s']):>8} "
              f"{r['latency_samples']:>8}  {r['realtime']}")
    b = out["batch"]
    print(f"batch answers {b['statuses']}, clips embedded by the batch worker during the step "
          f"{b['lane_items_during_step']}, lane max queued {b['max_batch_queued']} of {b['batch_queue_size']}")
    print(f"p95 batch / p95 quiet (the lower quiet step) = {ratio:.2f} (target <= {TARGET_RATIO:.2f}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(load._clean(out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
