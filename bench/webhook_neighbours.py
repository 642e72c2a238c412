"""Developer webhooks off the stream's path: slow and hanging receivers must not move other users' delivery times
nor the live streams' segment latency. Three steps side by side on one server, figures printed (not a test).

    .venv/bin/python bench/webhook_neighbours.py --streams 6 --duration 25
    .venv/bin/python bench/webhook_neighbours.py --streams 4 --duration 20 --server-env WEBHOOK_MAX_CONCURRENT=2

(The second: two shared request slots, which the slow and hanging users' requests hold for WEBHOOK_SLOW_AFTER_S
(2 s) each before the slow lane takes them: what the limit, 64 by default, is at scale. Add
`--server-env WEBHOOK_SLOW_AFTER_S=0.3` to see the slow lane keep the others' deliveries on time with 2 slots.)

One real server process, `bench/load.py`'s set-up (the Deepgram-protocol test server with a fixed reply delay, N
streams of real speech at real time, pcm16, latency "ours" as load.py measures it), run with
WEBHOOK_ALLOW_PRIVATE=true (the receivers are on 127.0.0.1) and WEBHOOK_SETTINGS_CACHE_S=0. Stream i of a step
with tag T is user `load-T-i` (load.py's `run_streams`); before each step every one of its users gets the
realtime_transcript and audio_bytes (`,--audio-interval` s, default 1) webhooks, set through
`POST /v1/users/developer/webhook/{wtype}`, each user to a receiver of their own (`Receiver` below: a real HTTP
server on its own port in a thread of this process; its own here because the tests' receivers live inside a test
module), paths /transcript and /audio.

- "all fast": every user's receivers answer 200 at once.
- "bad neighbours": the even streams (the "observed" users) keep fast receivers; the odd ones point at slow
  (answer after `--slow-s`, 2 s) and hanging (never answer) receivers, alternately. Those receivers stay up (and
  hanging) until the end of the run, so their retries overlap the next step, as a real bad neighbour's would.
- "all fast again": as the first, so that a drift of the shared machine shows.

In every step the webhook figures are the even streams' (the same stream positions, offsets and staggers), so the
steps compare like for like; the live latency is all streams'.

Audio delivery lag (observed users): arrival of an audio chunk at the receiver - the time the client sent the
frame holding the chunk's last sample. The send times are load.py's own (each client's `StreamOutcome.send_times`,
one shared monotonic clock): this script wraps `load.analyse` to keep each step's outcomes, so the measure is
absolute and needs no "lag relative to the first chunk" fallback. The server taps the decoded audio from the
stream's first frame on (the silence sent while the other streams connect included), so the chunks' cumulative
bytes / 640 give the frame each one ends on; each chunk's last 20 ms are checked against the frame the client sent
there (`misaligned` counts chunks whose bytes do not match: a lost chunk or a different tap would show). Only full
chunks (not the last partial one, flushed at the stream's end) whose last frame was sent after the common start
count. It includes the server's decode/VAD batching, the dispatcher's queue and the HTTP request.

Transcript (observed users): lag = arrival of a request whose segments carry a new largest `end` - send time of
the frame holding that end - the test STT's reply delay (load.py's latency, at the receiver instead of the
client; it includes the at-most-once-a-second pacing, WEBHOOK_REALTIME_INTERVAL_S), and the gaps between a user's
consecutive requests. Deliveries: `omi_webhook_deliveries_total{type,outcome}` from /metrics, the difference from
before the step's webhooks were set to after it settled (the observed users' audio all in, or `--settle-max` s);
with the bad receivers still up, the third step's counts include the second step's users' late failures.

Printed: per step the live p50/p95, the observed users' audio lag p50/p95/max, transcript lag and gaps, and the
delivery counts; then live p95(bad neighbours) / p95(the lower all-fast step), and the same ratio of the observed
users' audio lag p95.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pickle
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402
import load  # noqa: E402
import loadlib  # noqa: E402
from batch_vs_live import step_figures  # noqa: E402
from deepgram_server import ThreadedDeepgramTestServer  # noqa: E402
from loadlib import FRAME_SAMPLES, StreamOutcome  # noqa: E402

TARGET_RATIO = 1.20
FRAME_BYTES = FRAME_SAMPLES * 2  # pcm16
DELIVERIES = "omi_webhook_deliveries_total"
STEPS = (("all_fast", "fast1", False), ("bad_neighbours", "bad", True), ("all_fast_again", "fast2", False))


class OutcomeCapture:
    """Stands in for `load.analyse`: keeps the step's common start and stream outcomes (the frames' send times),
    then returns load.py's own analysis."""

    def __init__(self) -> None:
        self.analyse = load.analyse
        self.t0 = math.nan
        self.outcomes: list[StreamOutcome] = []

    def __call__(self, args: argparse.Namespace, n: int, codec: str, silent: bool, t0: float, audio_s: float,
                 outcomes: list[StreamOutcome], *rest: Any) -> dict[str, Any]:
        self.t0, self.outcomes = t0, outcomes
        return self.analyse(args, n, codec, silent, t0, audio_s, outcomes, *rest)


@dataclass
class Received:
    path: str
    body: bytes
    at: float  # time.monotonic() when the request had been read


class Receiver:
    """One user's webhook receiver: a ThreadingHTTPServer on 127.0.0.1 (its own port, so its own connections from
    the server) in a thread, recording every request; "fast" answers 200 at once, "slow" after `slow_s`, "hanging"
    reads the request and never answers (until closed: then it drops the connection)."""

    def __init__(self, mode: str, slow_s: float) -> None:
        self.mode = mode
        self.requests: list[Received] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        rx = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the server's client reuses its connections

            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with rx._lock:
                    rx.requests.append(Received(urlsplit(self.path).path, body, time.monotonic()))
                if rx.mode == "hanging":
                    rx.released.wait()
                    self.close_connection = True
                    return
                if rx.mode == "slow":
                    rx.released.wait(slow_s)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def receiver(stack: contextlib.ExitStack, mode: str, slow_s: float) -> Receiver:
    rx = Receiver(mode, slow_s)
    stack.callback(rx.close)
    return rx


def set_webhooks(http: str, uid: str, rx: Receiver, interval_s: int) -> None:
    with httpx.Client(base_url=http, headers={"Authorization": f"Bearer {uid}"}, timeout=10) as c:
        for wtype, url in (("realtime_transcript", f"{rx.url}/transcript"),
                           ("audio_bytes", f"{rx.url}/audio,{interval_s}")):
            c.post(f"/v1/users/developer/webhook/{wtype}", json={"url": url}).raise_for_status()


def deliveries(http: str) -> dict[str, float]:
    return {k: v for k, v in loadlib.scrape_metrics(http).items() if k.startswith(DELIVERIES)}


def delivery_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, int]]:
    """{type: {outcome: count}} of what changed."""
    out: dict[str, dict[str, int]] = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta:
            labels = dict(part.split("=", 1) for part in key[key.index("{") + 1 : -1].split(","))
            out.setdefault(labels["type"].strip('"'), {})[labels["outcome"].strip('"')] = int(delta)
    return out


def frame_sent(o: StreamOutcome, k: int, material: list[bytes], offset: int) -> bytes:
    """The pcm16 bytes of frame k as the client sent it (silence before its material started)."""
    if o.audio_from < 0 or k < o.audio_from:
        return bytes(FRAME_BYTES)
    return material[(offset + k - o.audio_from) % len(material)]


def audio_lags(o: StreamOutcome, got: list[Any], t0: float, interval_s: int, material: list[bytes],
               offset: int) -> tuple[list[float], int, int]:
    """(lags of the full chunks ending after t0, bytes received, misaligned chunks) of one observed stream."""
    full = interval_s * 16000 * 2
    lags, cum, misaligned = [], 0, 0
    for r in sorted(got, key=lambda r: r.at):
        cum += len(r.body)
        j = cum // FRAME_BYTES - 1
        if j >= o.send_times.size or (len(r.body) >= FRAME_BYTES
                                      and r.body[-FRAME_BYTES:] != frame_sent(o, j, material, offset)):
            misaligned += 1
            continue
        if len(r.body) == full and o.send_times[j] >= t0:
            lags.append(r.at - float(o.send_times[j]))
    return lags, cum, misaligned


def transcript_figures(o: StreamOutcome, got: list[Any], reply_delay: float, t0: float) -> tuple[list[float],
                                                                                                  list[float]]:
    """(lags of requests with a new largest segment end after t0, gaps between consecutive requests)."""
    got = sorted(got, key=lambda r: r.at)
    lags, best = [], -1.0
    for r in got:
        try:
            segments = json.loads(r.body)["segments"]
            end = max((float(s.get("end", -1.0)) for s in segments), default=-1.0)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if end <= best + 1e-6:
            continue
        best = end
        j = load._last_frame_before(end)
        if j < o.send_times.size and o.send_times[j] >= t0:
            lags.append(r.at - float(o.send_times[j]) - reply_delay)
    return lags, [b.at - a.at for a, b in zip(got, got[1:], strict=False)]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_s": load.pct(values, 50), "p95_s": load.pct(values, 95),
            "max_s": max(values) if values else math.nan}


def run_step(bench: load.Bench, server: Any, capture: OutcomeCapture, name: str, tag: str, bad: bool,
             stack: contextlib.ExitStack) -> dict[str, Any]:
    a = bench.args
    n = a.streams_n
    modes = ["fast" if not bad or i % 2 == 0 else ("slow" if i % 4 == 1 else "hanging") for i in range(n)]
    receivers = [receiver(stack, mode, a.slow_s) for mode in modes]
    before = deliveries(server.http)
    for i, r in enumerate(receivers):
        set_webhooks(server.http, f"load-{tag}-{i}", r, a.audio_interval)
    load.log(f"step {name}: {n} streams, receivers {', '.join(f'{m} x{modes.count(m)}' for m in sorted(set(modes)))}")
    live = bench.run_streams(server, "pcm16", n, a.duration, silent=False, tag=tag)
    t0, outcomes = capture.t0, capture.outcomes
    observed = [o for o in outcomes if o.index % 2 == 0 and o.connected]
    sent = {o.index: o.send_times.size * FRAME_BYTES for o in observed}
    deadline = time.monotonic() + a.settle_max
    while time.monotonic() < deadline:  # the last (partial) chunks after the streams closed
        if all(sum(len(x.body) for x in receivers[i].at("/audio")) >= b for i, b in sent.items()):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    after = deliveries(server.http)
    material = pickle.loads(Path(bench.frames_path("pcm16", False)).read_bytes())
    n_frames = len(material)
    audio, tr_lags, gaps = [], [], []
    received_bytes = misaligned = tr_requests = 0
    for o in observed:
        offset = int((((o.index + 1) * load.GOLDEN) % 1.0) * n_frames)  # as load.run_streams sets it
        rec = receivers[o.index]
        lags, got_bytes, bad_chunks = audio_lags(o, rec.at("/audio"), t0, a.audio_interval, material, offset)
        audio += lags
        received_bytes += got_bytes
        misaligned += bad_chunks
        transcripts = rec.at("/transcript")
        tr_requests += len(transcripts)
        lag, gap = transcript_figures(o, transcripts, a.reply_delay, t0)
        tr_lags += lag
        gaps += gap
    return {
        "live": step_figures(live), "modes": modes,
        "observed": [o.index for o in observed],
        "audio_lag": summary(audio), "audio_bytes_sent": sum(sent.values()), "audio_bytes_received": received_bytes,
        "misaligned_chunks": misaligned,
        "transcript_lag": summary(tr_lags), "transcript_gap": summary(gaps), "transcript_requests": tr_requests,
        "deliveries": delivery_deltas(before, after),
        "bad_receivers_got": {m: sum(len(r.requests) for r, mode in zip(receivers, modes, strict=True) if mode == m)
                              for m in ("slow", "hanging") if m in modes},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=6, help="live streams N, one user each (6)")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of speech per stream and step (25)")
    p.add_argument("--audio-interval", type=int, default=1, help="audio_bytes seconds per request (1)")
    p.add_argument("--slow-s", type=float, default=2.0, help="the slow receivers answer after this long (2 s)")
    p.add_argument("--settle-max", type=float, default=10.0, help="after a step, wait this long at most for the "
                   "observed users' last audio (10 s)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.streams < 2:
        p.error("--streams: at least 2 (half of them are observed)")
    env = ["WEBHOOK_ALLOW_PRIVATE=true", "WEBHOOK_SETTINGS_CACHE_S=0", *args.server_env]  # the caller's win
    return load.one_step_args(args, env)


def ratio(out: dict[str, Any], figure: str) -> float:
    def p95(step: str) -> float:
        value = out["steps"][step][figure]["p95_s"]
        return math.nan if value is None else float(value)

    fast = [v for v in (p95("all_fast"), p95("all_fast_again")) if math.isfinite(v)]
    return p95("bad_neighbours") / max(min(fast), 1e-9) if fast else math.nan


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    ms = load.ms
    n = args.streams_n
    print(f"\n{n} streams x {args.duration:g} s of speech per step; webhooks realtime_transcript + audio_bytes "
          f"({args.audio_interval} s chunks); observed users: the {len(range(0, n, 2))} even streams; slow receivers "
          f"answer after {args.slow_s:g} s")
    print(f"{'step':<15} {'live p50':>8} {'p95':>6} {'samples':>7} {'rt':>3} | {'audio lag p50':>13} {'p95':>6} "
          f"{'max':>6} {'chunks':>6} {'bytes in/sent':>13} | {'transcr lag p50':>15} {'p95':>6} {'gap p50':>7} "
          f"{'max':>6} {'reqs':>5}")
    for name, s in out["steps"].items():
        live, au, tr, gap = s["live"], s["audio_lag"], s["transcript_lag"], s["transcript_gap"]
        rate = s["audio_bytes_received"] / max(s["audio_bytes_sent"], 1)
        print(f"{name:<15} {ms(live['p50_s']):>8} {ms(live['p95_s']):>6} {live['latency_samples']:>7} "
              f"{'yes' if live['realtime'] else 'no':>3} | {ms(au['p50_s']):>13} {ms(au['p95_s']):>6} "
              f"{ms(au['max_s']):>6} {au['n']:>6} {rate:>12.1%} | {ms(tr['p50_s']):>15} {ms(tr['p95_s']):>6} "
              f"{ms(gap['p50_s']):>7} {ms(gap['max_s']):>6} {s['transcript_requests']:>5}")
    print("(ms; audio lag = arrival at the receiver - send time of the chunk's last frame; transcript lag = arrival"
          " - send time of the frame holding the new end - STT reply delay; gap = between a user's requests)")
    for name, s in out["steps"].items():
        d = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                      for t, c in sorted(s["deliveries"].items())) or "none counted"
        extra = f"; bad receivers got {s['bad_receivers_got']} requests" if s["bad_receivers_got"] else ""
        warn = f"; {s['misaligned_chunks']} MISALIGNED chunks" if s["misaligned_chunks"] else ""
        live = s["live"]
        why = "" if live["realtime"] else f"; not real time: {live['reason']}"
        print(f"  {name}: deliveries {d}{extra}{warn}{why}")
    for key, label in (("live", "live segment latency"), ("audio_lag", "observed users' audio delivery lag")):
        r = out[f"p95_ratio_{key}"]
        verdict = "met" if r <= TARGET_RATIO else "NOT met"
        print(f"{label}: p95 bad neighbours / p95 all fast (the lower) = {r:.2f} (target <= {TARGET_RATIO:.2f}: "
              f"{verdict})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {"streams": args.streams_n, "duration": args.duration, "audio_interval_s": args.audio_interval,
              "slow_s": args.slow_s, "server_env": args.server_env}
    out: dict[str, Any] = {"machine": loadlib.machine_info(), "config": config, "steps": {}}
    capture = OutcomeCapture()
    dg = ThreadedDeepgramTestServer(api_key="load-key", word_s=args.word_s, result_every_s=args.result_every_s,
                                    reply_delay_s=args.reply_delay, keep_audio=False)
    dg.start()
    load.analyse = capture  # run_streams calls it by its module name
    try:
        # the receivers close (the hanging ones let go) after the server has stopped
        with tempfile.TemporaryDirectory(prefix="omi-webhooks-") as tmp, contextlib.ExitStack() as receivers:
            bench = load.Bench(args, Path(tmp), dg)
            server = bench.start_server()
            try:
                set_webhooks(server.http, "load-warm-0", receiver(receivers, "fast", 0),  # the sender's first use too
                             args.audio_interval)
                bench.warm_up(server, "pcm16")
                for name, tag, bad in STEPS:
                    out["steps"][name] = run_step(bench, server, capture, name, tag, bad, receivers)
            finally:
                loadlib.stop_server(server)
    finally:
        load.analyse = capture.analyse
        dg.stop()
    out["p95_ratio_live"] = ratio(out, "live")
    out["p95_ratio_audio_lag"] = ratio(out, "audio_lag")
    report(out, args)
    if args.json:
        args.json.write_text(json.dumps(load._clean(out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
