"""Peak memory of `/v1/vad` on a 1 h and a 4 h upload: the piecewise path the route runs now, against the whole-file
path it ran before (kept callable here only). Each run is a fresh Python process (so each peak is its own): it loads
the VAD, notes its RSS, handles the upload as the route does, and prints its peak RSS (`ru_maxrss`).

The uploads repeat ../shared/data/sample.wav (30 s, 23 s of speech) in Ogg Opus at 16 kbit/s (1 h: ~7 MB, 4 h:
~29 MB), built once into --workdir (the first run spends a few minutes encoding).

    .venv/bin/python bench/vad_memory.py [--hours 1 4] [--workdir /tmp/vad_memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_WAV = REPO.parent / "shared" / "data" / "sample.wav"
sys.path.insert(0, str(REPO))


def build_upload(hours: float, path: Path) -> Path:
    """`hours` of sample.wav repeated, as Ogg Opus (16 kbit/s, 16 kHz mono)."""
    import av
    import soundfile as sf

    if path.exists():
        return path
    speech, rate = sf.read(SAMPLE_WAV, dtype="float32")
    repeats = int(hours * 3600 / (len(speech) / rate))
    tmp = path.with_suffix(".part")
    with av.open(str(tmp), mode="w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 16000
        stream.options = {"compression_level": "0"}  # the fastest encoding: hours of audio in seconds
        pts = 0
        for _ in range(repeats):
            frame = av.AudioFrame.from_ndarray(speech[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, pts
            pts += len(speech)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    tmp.rename(path)
    return path


def _rss_mb(kb: int) -> float:
    return kb / 1024  # ru_maxrss is in KiB on Linux


def child(path: str, mode: str) -> None:
    """One upload, as the route handles it; prints a JSON line of figures."""
    from config import Settings
    from streaming.audiofile import decode_audio_file
    from streaming.file_vad import file_speech_regions, speech_regions
    from streaming.vad import BatchVadParams, SileroVad

    settings = Settings(_env_file=None)
    backend, params = SileroVad(), BatchVadParams.from_settings(settings)
    backend.warm_up()
    ready_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if mode == "whole":  # before: the upload read into bytes, decoded whole, scored whole
        data = Path(path).read_bytes()
        regions = speech_regions(backend, decode_audio_file(data, settings.max_upload_seconds), params)
    else:  # now: decoded from the (spooled) file and scored piece by piece
        with open(path, "rb") as f:
            regions = file_speech_regions(backend, f, params, settings.max_upload_seconds)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ready_mb": _rss_mb(ready_kb), "peak_mb": _rss_mb(peak_kb), "seconds": seconds,
                      "regions": len(regions), "speech_s": round(sum(r["duration"] for r in regions))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vad_memory"))
    parser.add_argument("--modes", nargs="+", default=["whole", "pieces"], choices=["whole", "pieces"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'upload':>14} {'path':>7} {'RSS ready':>10} {'peak RSS':>9} {'growth':>8} {'time':>7} {'regions':>8}")
    for hours in args.hours:
        upload = build_upload(hours, args.workdir / f"speech_{hours:g}h.ogg")
        size_mb = upload.stat().st_size / 1e6
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--child", str(upload), mode], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{hours:>3g} h {size_mb:>5.1f} MB {mode:>7} {r['ready_mb']:>7.0f} MB {r['peak_mb']:>6.0f} MB "
                  f"{r['peak_mb'] - r['ready_mb']:>5.0f} MB {r['seconds']:>6.1f}s {r['regions']:>8}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        np.seterr(all="ignore")
        main()
