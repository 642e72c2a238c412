"""Speaker embeddings per second on this machine: one-at-a-time model calls vs the shared model pool's batching.

    .venv/bin/python bench/embeddings.py [--backend resemblyzer|speechbrain] [--clips 128] [--seconds 2.0]
                                         [--device cpu] [--repeats 2] [--threads N] [--batches 1,8,32]
                                         [--precision auto|float32|bfloat16]

For each batch size B in `--batches` (default 1, 8, 32):
  (a) one at a time: `embedder.embed_batch([clip])` in a loop over all clips, in one worker thread (what a server
      without a pool does: one `asyncio.to_thread` call per window per stream);
  (b) through the pool: `ModelPool` with `pool_max_batch=B` and B concurrent requesters (asyncio tasks standing in
      for B streams), each awaiting `pool.embed(clip)` for its share of the clips, so batches of about B form.
Clips are real speech: `--seconds`-long windows (hop half that) inside the reference speaker turns (RTTM) of
../shared/data/sample.wav and the AMI excerpts in ../shared/data/ami-debug. Each figure is the best of `--repeats`
runs. The pool's embeddings are checked against the one-at-a-time ones (max abs diff). Prints a markdown table and
the machine. Takes under a minute on 2 cores with the defaults.

Both (a) and (b) set torch's thread count in the thread that runs the model (the pool does so in its worker):
torch.set_num_threads in the main thread alone leaves other threads running small batches several times slower.
`--threads N` sets that count (default: torch's, one per core); on a 2-core machine 1 beat 2 at every batch size.
`--precision` is SPEAKER_PRECISION (resemblyzer's LSTM dtype; default: the server's, auto); the precision it
resolved to is printed. Per-window cost in milliseconds is 1000 / the emb/s figure, printed alongside.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/reference.py

from reference import annotations, speech_turns  # noqa: E402

from config import Settings  # noqa: E402
from streaming.pool import ModelPool  # noqa: E402
from streaming.speaker import SAMPLE_RATE, SpeakerEmbedder, load_embedder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMI = DATA / "ami-debug"
BATCH_SIZES = (1, 8, 32)


def rttm_turns(rttm: Path) -> dict[str, list[tuple[float, float]]]:
    """Every file's reference turns, read by pyannote.database (tests/reference.py)."""
    return {name: speech_turns(rttm, name) for name in annotations(rttm)}


def speech_clips(n: int, seconds: float) -> list[np.ndarray]:
    """Up to n clips of `seconds`, cut back to back from reference turns at least that long, taken round-robin
    over the files so every recording contributes."""
    sources = [(DATA / "sample.wav", rttm_turns(DATA / "sample.rttm").get("sample", []))]
    ami = rttm_turns(AMI / "train.rttm")
    sources += [(AMI / f"{name}.wav", ami[name]) for name in sorted(ami)]
    length = int(seconds * SAMPLE_RATE)
    per_file: list[list[np.ndarray]] = []
    for path, turns in sources:
        audio, sr = sf.read(path, dtype="float32")
        if sr != SAMPLE_RATE or audio.ndim != 1:
            raise SystemExit(f"{path}: need 16 kHz mono")
        clips = []
        for start, end in sorted(turns):
            a = int(start * SAMPLE_RATE)
            while a + length <= min(int(end * SAMPLE_RATE), len(audio)):
                clips.append(audio[a : a + length].copy())
                a += length // 2
        per_file.append(clips)
    out: list[np.ndarray] = []
    for k in range(max(map(len, per_file))):
        out += [clips[k] for clips in per_file if k < len(clips)]
    if len(out) < n:
        print(f"note: only {len(out)} clips of {seconds:g} s in the reference turns; using all of them")
    return out[:n]


def one_at_a_time(embedder: SpeakerEmbedder, clips: list[np.ndarray], threads: int) -> tuple[float, np.ndarray]:
    """In a fresh thread, as `asyncio.to_thread` would run it (with the same torch thread setup as the pool's)."""
    import torch

    def run() -> tuple[float, np.ndarray]:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        out = np.stack([embedder.embed_batch([c])[0] for c in clips])
        return len(clips) / (time.perf_counter() - started), out

    with ThreadPoolExecutor(1) as executor:
        return executor.submit(run).result()


async def through_pool(embedder: SpeakerEmbedder, clips: list[np.ndarray], batch: int, wait_ms: float,
                       threads: int) -> tuple[float, np.ndarray, dict]:
    settings = Settings(_env_file=None, pool_max_batch=batch, pool_max_wait_ms=wait_ms,
                        pool_queue_size=max(2048, len(clips)))
    pool = await ModelPool.create(settings, embedder=embedder, torch_threads=threads)
    out: list[np.ndarray | None] = [None] * len(clips)

    async def requester(r: int) -> None:  # one stream: asks for its windows one after the other
        for k in range(r, len(clips), batch):
            out[k] = await pool.embed(clips[k])

    try:
        started = time.perf_counter()
        await asyncio.gather(*(requester(r) for r in range(batch)))
        rate = len(clips) / (time.perf_counter() - started)
        return rate, np.stack(out), pool.stats()["speaker"]
    finally:
        await pool.close()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["resemblyzer", "speechbrain"], default="resemblyzer")
    ap.add_argument("--clips", type=int, default=128, help="clips per run (default 128)")
    ap.add_argument("--seconds", type=float, default=2.0, help="clip length in seconds (default 2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="runs per figure, best kept (default 2)")
    ap.add_argument("--wait-ms", type=float, default=Settings.model_fields["pool_max_wait_ms"].default,
                    help="pool_max_wait_ms (default: the server's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--batches", default=",".join(map(str, BATCH_SIZES)),
                    help="pool batch sizes to run (comma-separated, default 1,8,32)")
    ap.add_argument("--precision", choices=["auto", "float32", "bfloat16"],
                    default=Settings.model_fields["speaker_precision"].default,
                    help="SPEAKER_PRECISION (default: the server's)")
    args = ap.parse_args()

    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    clips = speech_clips(args.clips, args.seconds)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    settings = Settings(_env_file=None, speaker_backend=args.backend, model_device=args.device,
                        speaker_precision=args.precision)
    t0 = time.perf_counter()
    embedder = load_embedder(settings)
    embedder.warm_up()
    embedder.embed_batch(clips[:8])
    precision = getattr(embedder, "precision", "float32")
    print(f"loaded and warmed up {embedder.name} ({embedder.dim}-d, {precision}) in {time.perf_counter() - t0:.1f} s")
    print(f"{len(clips)} clips of {args.seconds:g} s of real speech (sample.wav + AMI), best of {args.repeats}")
    print()

    rows = []
    worst_diff = 0.0
    for batch in batch_sizes:
        single_rate, pool_rate, mean_batch = 0.0, 0.0, 0.0
        for _ in range(args.repeats):
            rate, reference = one_at_a_time(embedder, clips, threads)
            single_rate = max(single_rate, rate)
            rate, pooled, stats = asyncio.run(through_pool(embedder, clips, batch, args.wait_ms, threads))
            if rate > pool_rate:
                pool_rate, mean_batch = rate, stats["mean_batch"]
            worst_diff = max(worst_diff, float(np.abs(pooled - reference).max()))
        rows.append((batch, single_rate, pool_rate, mean_batch))

    print("| batch size | one-at-a-time emb/s | pool emb/s | pool ms/clip | speed-up | mean pool batch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch, single_rate, pool_rate, mean_batch in rows:
        print(f"| {batch} | {single_rate:.1f} | {pool_rate:.1f} | {1000 / pool_rate:.2f} | "
              f"{pool_rate / single_rate:.2f}x | {mean_batch:.1f} |")
    print()
    print(f"pool vs one-at-a-time embeddings: max abs diff {worst_diff:.2e}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {os.cpu_count()} cores ({affinity} usable), {cpu_model()}, torch {torch.__version__} "
          f"threads {torch.get_num_threads()}, device {args.device}, precision {precision}, "
          f"Python {platform.python_version()}")


if __name__ == "__main__":
    main()
