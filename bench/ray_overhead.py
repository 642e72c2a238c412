"""The overhead of one call to the Ray Serve model deployments (MODEL_POOL=ray), against the same work in process.

Starts a local Ray (num_cpus=2, no dashboard), deploys the two model apps (streaming/ray_deployments.py), and times:
- an empty VAD call (no streams) and an empty-ish one (1 stream, 1 frame) through the handle, one at a time: the
  round trip a front-end pays per call;
- one VAD step of S streams (1 frame each, as `RayModelPool` sends a gathered step) through Ray vs the same
  `speech_probs_batch` in process: the overhead per call and per window;
- one embedding call of C clips of 1.5 s through Ray vs in process.

    .venv/bin/python bench/ray_overhead.py [--repeat 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Settings  # noqa: E402
from streaming import ray_deployments as rd  # noqa: E402
from streaming.embedders import SAMPLE_RATE  # noqa: E402
from streaming.ray_deployments import pack_step, unpack_step  # noqa: E402
from streaming.speaker import load_embedder  # noqa: E402
from streaming.vad import SileroVad  # noqa: E402


def _timed(fn, repeat: int) -> dict[str, float]:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p95_ms": round(times[int(0.95 * len(times)) - 1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import ray

    settings = Settings(_env_file=None, model_device="cpu", torch_threads=1)
    t = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="omi",
             runtime_env={"env_vars": {"PYTHONPATH": rd.REPO_ROOT}})
    rd.deploy(settings)
    vad_h, emb_h = rd.handles()
    ready_s = time.monotonic() - t
    backend = SileroVad()
    backend.warm_up()
    embedder = load_embedder(settings)
    embedder.warm_up()
    rng = np.random.default_rng(0)
    out: dict = {"ready_s": round(ready_s, 1), "repeat": args.repeat}

    def vad_remote(states, audios):
        return lambda: unpack_step(vad_h.score.remote(pack_step(states, audios)).result())

    out["vad_empty_call"] = _timed(vad_remote([], []), args.repeat)
    for streams in (1, 16, 64, 256):
        audios = [0.05 * rng.standard_normal(512).astype(np.float32) for _ in range(streams)]
        states = [backend.new_state() for _ in range(streams)]
        local = _timed(lambda a=audios, s=states: backend.speech_probs_batch(s, a), args.repeat)
        remote = _timed(vad_remote(states, audios), args.repeat)
        over = remote["median_ms"] - local["median_ms"]
        out[f"vad_step_{streams}_streams"] = {"in_process": local, "ray": remote, "overhead_ms": round(over, 3),
                                              "overhead_per_window_us": round(1000 * over / streams, 1)}
    for clips in (1, 8):
        batch = [0.05 * rng.standard_normal(int(1.5 * SAMPLE_RATE)).astype(np.float32) for _ in range(clips)]
        repeat = max(10, args.repeat // 10)
        local = _timed(lambda b=batch: embedder.embed_batch(b), repeat)
        remote = _timed(lambda b=batch: emb_h.embed.remote(b).result(), repeat)
        out[f"embed_{clips}_clips"] = {"in_process": local, "ray": remote,
                                       "overhead_ms": round(remote["median_ms"] - local["median_ms"], 3)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
