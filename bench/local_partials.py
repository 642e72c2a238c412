"""The CPU cost of the local STT backend's partial transcripts (issue 14), on real speech.

Prints, for one speech region (default: AMI trn03.wav from 1.184 s, a 29 s monologue):
- the final's batch decode (what every region costs without partials), CPU seconds per second of speech;
- the partial decoder as the server runs it (`sphinx_partials`: fwdtree only, maxhmmpf 3000; audio fed in 100 ms
  pieces, the hypothesis read every second), CPU per second of speech, and with pocketsphinx's default search;
- the alternative without a held decoder: the whole region so far decoded again every second (grows with the
  square of the region's length);
- the event loop's worst stall while one final is decoded: a decoder called in a thread (pocketsphinx holds the
  GIL) against `LocalRecognizer` (a worker process);
- how many streams' partials the machine carries: N threads, each an incremental decoder fed as fast as it
  takes, speech seconds decoded per wall second (pocketsphinx releases the GIL while it decodes, or not: this
  shows it), and so how many real-time streams that is.

    .venv/bin/python bench/local_partials.py [--wav PATH --from-s S] [--threads 1,2,4]

CPU figures are `time.process_time` of this process (thread CPU for the threaded runs comes from wall time and
the count of threads). Other load on the machine slows the wall-clock figures: the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming.sphinx_partials import PARTIAL_MAX_HMM_PER_FRAME, decoder_words  # noqa: E402
from streaming.stt import SAMPLE_RATE, to_int16  # noqa: E402
from streaming.stt_local import LocalRecognizer  # noqa: E402

AMI_TRN03 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ami-debug" / "trn03.wav"
PIECE = SAMPLE_RATE // 10  # 100 ms of audio per process_raw call, as the VAD hands speech on


def make_decoder(partial: bool):
    from pocketsphinx import Decoder

    extra = dict(fwdflat=False, bestpath=False, maxhmmpf=PARTIAL_MAX_HMM_PER_FRAME) if partial else {}
    return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", **extra)


def batch_decode(decoder, pcm: np.ndarray) -> None:
    decoder.reinit_feat()
    decoder.start_utt()
    decoder.process_raw(pcm.tobytes(), full_utt=True)
    decoder.end_utt()


def incremental_decode(decoder, pcm: np.ndarray, look_every_s: float = 1.0) -> int:
    """As `PartialRegion`: 100 ms pieces, the hypothesis read every `look_every_s`. Returns how many looks."""
    decoder.reinit_feat()
    decoder.start_utt()
    looks, next_look = 0, look_every_s * SAMPLE_RATE
    for i in range(0, len(pcm), PIECE):
        decoder.process_raw(pcm[i : i + PIECE].tobytes(), full_utt=False)
        if i + PIECE >= next_look:
            decoder_words(decoder)
            looks += 1
            next_look += look_every_s * SAMPLE_RATE
    decoder.end_utt()
    return looks


def cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def threaded_throughput(pcm: np.ndarray, threads: int) -> tuple[float, float]:
    """Speech seconds decoded incrementally per wall second with `threads` decoders at once, and the CPUs this
    process kept busy meanwhile (about 1.0 however many threads: pocketsphinx holds the GIL)."""
    decoders = [make_decoder(partial=True) for _ in range(threads)]
    start, start_cpu = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=incremental_decode, args=(d, pcm)) for d in decoders]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    return threads * len(pcm) / SAMPLE_RATE / wall, (time.process_time() - start_cpu) / wall


async def worst_loop_stall(decode) -> tuple[float, float]:
    """`decode` in a worker thread; the event loop meanwhile wakes every 10 ms. Returns (wall s, worst gap s)."""
    task = asyncio.create_task(asyncio.to_thread(decode))
    start = last = time.perf_counter()
    worst = 0.0
    while not task.done():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    await task
    return last - start, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wav", type=Path, default=AMI_TRN03)
    parser.add_argument("--from-s", type=float, default=1.184)
    parser.add_argument("--threads", default="1,2,4")
    args = parser.parse_args()
    audio, rate = sf.read(args.wav, dtype="float32")
    assert rate == SAMPLE_RATE and audio.ndim == 1
    pcm = to_int16(audio[int(args.from_s * SAMPLE_RATE):])
    seconds = len(pcm) / SAMPLE_RATE
    print(f"{args.wav.name} from {args.from_s} s: one region of {seconds:.1f} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    final, partial, default = make_decoder(False), make_decoder(True), make_decoder(False)
    batch_decode(final, pcm[:SAMPLE_RATE])  # first-call costs out of the way
    final_cpu = cpu(lambda: batch_decode(final, pcm))
    partial_cpu = cpu(lambda: incremental_decode(partial, pcm))
    default_cpu = cpu(lambda: incremental_decode(default, pcm))
    whole_cpu = cpu(lambda: [batch_decode(final, pcm[: int(t * SAMPLE_RATE)]) for t in range(1, int(seconds) + 1)])
    rows = [
        ("final (batch decode at the region's end)", final_cpu),
        ("partials, incremental, as the server runs them", partial_cpu),
        ("partials, incremental, pocketsphinx's default search", default_cpu),
        ("partials by decoding the whole region again every second", whole_cpu),
    ]
    print(f"{'decode':58} {'CPU s':>7} {'per speech s':>13}")
    for name, value in rows:
        print(f"{name:58} {value:7.2f} {value / seconds:13.3f}")
    print(f"final + partials: x{(final_cpu + partial_cpu) / final_cpu:.2f} the CPU of finals alone")

    recognizer = LocalRecognizer(decoders=1)  # its worker process started (and warmed on 0.1 s of silence)
    print(f"\n{'one final decode, from a worker thread':58} {'wall s':>7} {'worst event-loop stall s':>25}")
    for name, decode in (("pocketsphinx called in the thread", lambda: batch_decode(final, pcm)),
                         ("LocalRecognizer (a worker process)", lambda: recognizer.recognize(pcm.tobytes()))):
        wall, worst = asyncio.run(worst_loop_stall(decode))
        print(f"{name:58} {wall:7.2f} {worst:25.3f}")
    recognizer.close()

    print(f"\n{'threads':>7} {'speech s / wall s':>18} {'CPUs busy':>10}  (partial decoders at once, each fed as "
          "fast as it takes)")
    for n in (int(x) for x in args.threads.split(",")):
        rate, busy = threaded_throughput(pcm, n)
        print(f"{n:7d} {rate:18.1f} {busy:10.2f}")
    print("A real-time stream needs 1 speech s / wall s while it talks (less: only speech goes to STT, and only while "
          "a region is open); its final needs the 'final' row's CPU on top.")


if __name__ == "__main__":
    main()
