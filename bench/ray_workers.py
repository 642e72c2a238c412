"""Two uvicorn workers (`--workers 2`, MODEL_POOL=ray) against one Ray deployment: 4 concurrent streams of
sample.wav, the words each got, the worker processes, and the calls the one VAD replica served.

    .venv/bin/python bench/ray_workers.py
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import ray  # noqa: E402
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, silence_frames, stream_frames  # noqa: E402
from ray import serve  # noqa: E402
from server_process import start_server, stop_server  # noqa: E402

from config import Settings  # noqa: E402
from streaming import ray_deployments as rd  # noqa: E402

URL = "/v4/listen?codec=pcm16&sample_rate=16000"


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="omi",
             runtime_env={"env_vars": {"PYTHONPATH": rd.REPO_ROOT}})
    try:
        rd.deploy(Settings(_env_file=None, model_device="cpu"))
        vad, _ = rd.handles()
        before = vad.info.remote().result()
        t = time.monotonic()
        env = {"MODEL_POOL": "ray", "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MODEL_DEVICE": "cpu"}
        server = start_server(Path(tempfile.mkdtemp()), env, extra_args=["--workers", "2"])
        print("2 workers ready in", round(time.monotonic() - t, 1), "s")
        frames = pcm16_frames(read_wav(SAMPLE_WAV)) + silence_frames(1.5)

        async def streams():
            return await asyncio.gather(*(
                stream_frames(server.ws + URL, frames, pace_s=0.004,
                              until=lambda r: any(s["end"] > 27.0 for s in r.segments.values()))
                for _ in range(4)))

        try:
            results = asyncio.run(streams())
        finally:
            stop_server(server)
        after = vad.info.remote().result()
        print("words per stream:", [len(" ".join(s["text"] for s in r.ordered()).split()) for r in results])
        print("worker processes:", sorted(set(re.findall(r"Started server process \[(\d+)\]", server.log()))))
        print("VAD replica (pid", after["pid"], "): calls", after["calls"] - before["calls"], "model calls",
              after["model_calls"] - before["model_calls"])
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
