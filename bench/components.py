"""Where a live stream's CPU goes: each pipeline stage alone, as CPU seconds per second of streamed audio.

    .venv/bin/python bench/components.py [--seconds 60]

Runs each stage in this process over the same real speech (../shared/data/sample.wav and the AMI excerpts, looped
to `--seconds`), 20 ms frames as a wearable sends them, and measures process CPU time (all threads):
  decode pcm16 / opus      the per-connection FrameDecoder (opus: libopus at 16 kHz, and the PyAV fallback)
  to_thread per frame      asyncio.to_thread round trips, one per frame (what Pipeline.feed does)
  VAD (silero), per frame  StreamingVAD.process on each 20 ms frame (one ONNX call per 32 ms chunk)
  embeddings               the live tagger's windows (WINDOW_S every HOP_S of speech), batched 32 at a time, for
                           the speech the VAD passed
  storage                  one segment upsert + conversation update per second of speech (SQLite, like a final
                           result per second), through ConversationService.record
The sum is a cost model for one stream; `bench/load.py` measures the real thing end to end. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from config import Settings  # noqa: E402
from streaming.codecs import OpusDecoder, make_decoder  # noqa: E402
from streaming.speaker import load_embedder  # noqa: E402
from streaming.tagging import HOP_S, WINDOW_S  # noqa: E402
from streaming.vad import SileroVad, SpeechAudio, StreamingVAD, VadParams  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SR = 16000
FRAME = 320


def speech(seconds: float) -> np.ndarray:
    parts = [sf.read(DATA / "sample.wav", dtype="float32")[0]]
    parts += [sf.read(p, dtype="float32")[0] for p in sorted((DATA / "ami-debug").glob("*.wav"))]
    audio = np.concatenate(parts)
    reps = int(np.ceil(seconds * SR / len(audio)))
    return np.tile(audio, reps)[: int(seconds * SR)]


def cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    audio = speech(args.seconds)
    pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2")
    frames = [pcm[i : i + FRAME].tobytes() for i in range(0, len(pcm) - FRAME + 1, FRAME)]
    seconds = len(frames) * FRAME / SR
    rows: list[tuple[str, float, str]] = []

    def per_s(cost: float) -> float:
        return cost / seconds

    dec = make_decoder("pcm16", 16000, 1)
    rows.append(("decode pcm16", per_s(cpu(lambda: [dec.decode(f) for f in frames])), f"{len(frames)} frames"))

    from audio_tools import encode_opus

    packets = encode_opus(audio, 16000)
    odec = make_decoder("opus", 16000, 1)
    rows.append(("decode opus", per_s(cpu(lambda: [odec.decode(p) for p in packets])),
                 f"{len(packets)} packets, {odec.backend} at 16 kHz" if odec.backend == "libopus"
                 else f"{len(packets)} packets, PyAV at 48 kHz + resampling (no libopus found)"))
    if odec.backend == "libopus":  # the fallback, for comparison
        pdec = OpusDecoder("opus", 16000, 1, backend="pyav")
        rows.append(("decode opus (PyAV fallback)", per_s(cpu(lambda: [pdec.decode(p) for p in packets])),
                     "PyAV's libopus at 48 kHz, then soxr 48k -> 16k"))

    async def hop() -> None:
        for _ in frames:
            await asyncio.to_thread(int, 0)

    rows.append(("to_thread per frame", per_s(cpu(lambda: asyncio.run(hop()))), "one round trip per frame"))

    backend = SileroVad()
    vad = StreamingVAD(backend, VadParams.from_settings(Settings(_env_file=None)))
    decoded = [dec.decode(f) for f in frames]
    events: list = []
    rows.append(("VAD silero per frame", per_s(cpu(lambda: [events.extend(vad.process(a)) for a in decoded])),
                 "StreamingVAD.process"))
    sent = np.concatenate([e.audio for e in events if isinstance(e, SpeechAudio)])
    speech_share = len(sent) / len(audio)

    embedder = load_embedder(Settings(_env_file=None))
    win, hop_n = int(WINDOW_S * SR), int(HOP_S * SR)
    windows = [sent[i : i + win] for i in range(0, len(sent) - win + 1, hop_n)]
    embedder.embed_batch(windows[:4])  # warm-up

    def embed_all() -> None:
        for i in range(0, len(windows), 32):
            embedder.embed_batch(windows[i : i + 32])

    rows.append((f"embeddings ({embedder.name})", per_s(cpu(embed_all)),
                 f"{len(windows)} windows of {WINDOW_S} s every {HOP_S} s of sent speech ({speech_share:.0%})"))

    async def store() -> float:
        from conversations import ConversationService
        from storage.base import Segment
        from storage.sqlite import SqliteStorage

        with tempfile.TemporaryDirectory() as tmp:
            storage = SqliteStorage(Path(tmp) / "bench.sqlite3")
            await storage.open()
            service = ConversationService(storage)
            conv = await service.attach("bench", "en", 120)
            n = int(len(sent) / SR)
            t0 = time.process_time()
            for i in range(n):
                seg = Segment(f"s{i // 5}", conv.id, "words " * (i % 5 + 1), "SPEAKER_0", 0, False, None,
                              float(i // 5 * 5), float(i + 1))
                await service.record(conv, [seg])
            spent = time.process_time() - t0
            await storage.close()
            return spent

    rows.append(("storage (SQLite)", per_s(asyncio.run(store())), "one segment write per second of speech"))

    total = sum(r[1] for r in rows if not r[0].startswith("decode opus"))
    print(f"\n{seconds:.0f} s of audio, {speech_share:.0%} of it sent as speech; CPU s per stream-second:\n")
    print("| stage | CPU s / stream-s | note |\n|---|---:|---|")
    for name, cost, note in rows:
        print(f"| {name} | {cost:.4f} | {note} |")
    print(f"| **sum (pcm16)** | **{total:.4f}** | streams per core at this cost: {1 / total:.0f} |")


if __name__ == "__main__":
    main()
