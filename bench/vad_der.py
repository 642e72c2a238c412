"""Speech detection error of the VAD on the AMI excerpts in ../shared/data/ami-debug.

Detection error = (missed speech + false-alarm speech) / reference speech, pooled over all files, on a 10 ms grid,
no collar, inside the scored region of train.uem. Reference speech is the union of all RTTM turns (overlaps count
once).

    .venv/bin/python bench/vad_der.py                  # the configured defaults, per backend available
    .venv/bin/python bench/vad_der.py --grid           # a small parameter sweep (used to choose the defaults)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Settings  # noqa: E402
from streaming.vad import SAMPLE_RATE, VadBackend, VadParams, detect_regions, load_vad_backend  # noqa: E402

AMI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ami-debug"
STEP = 0.01  # the 10 ms grid


def read_rttm(path: Path) -> dict[str, list[tuple[float, float]]]:
    turns: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        f = line.split()
        if f and f[0] == "SPEAKER":
            start, dur = float(f[3]), float(f[4])
            turns[f[1]].append((start, start + dur))
    return turns


def read_uem(path: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        f = line.split()
        if f:
            out[f[0]] = (float(f[2]), float(f[3]))
    return out


def to_grid(regions: list[tuple[float, float]], n: int) -> np.ndarray:
    grid = np.zeros(n, bool)
    for s, e in regions:
        grid[int(round(s / STEP)) : int(round(e / STEP))] = True
    return grid


def detection_error(reference: list[tuple[float, float]], hypothesis: list[tuple[float, float]],
                    scored: tuple[float, float]) -> tuple[float, float, float]:
    """(missed, false alarm, reference speech) in seconds within the scored region."""
    n = int(round(scored[1] / STEP)) + 1
    ref, hyp = to_grid(reference, n), to_grid(hypothesis, n)
    mask = np.zeros(n, bool)
    mask[int(round(scored[0] / STEP)) : int(round(scored[1] / STEP))] = True
    missed = np.sum(ref & ~hyp & mask) * STEP
    false_alarm = np.sum(~ref & hyp & mask) * STEP
    return missed, false_alarm, np.sum(ref & mask) * STEP


def load_ami() -> list[tuple[str, np.ndarray, list[tuple[float, float]], tuple[float, float]]]:
    turns, uem = read_rttm(AMI / "train.rttm"), read_uem(AMI / "train.uem")
    files = []
    for name in sorted(uem):
        audio, sr = sf.read(AMI / f"{name}.wav", dtype="float32")
        assert sr == SAMPLE_RATE and audio.ndim == 1
        files.append((name, audio, turns[name], uem[name]))
    return files


def per_file_errors(backend: VadBackend, params: VadParams, files) -> list[tuple[float, float, float]]:
    out = []
    for _name, audio, ref, scored in files:
        regions = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in detect_regions(backend, audio, params)]
        out.append(detection_error(ref, regions, scored))
    return out


def pool(errors: list[tuple[float, float, float]]) -> dict[str, float]:
    miss, fa, total = (sum(e[i] for e in errors) for i in range(3))
    return {"error": (miss + fa) / total, "missed": miss / total, "false_alarm": fa / total, "speech_s": total}


def pooled_error(backend: VadBackend, params: VadParams, files=None) -> dict[str, float]:
    return pool(per_file_errors(backend, params, files if files is not None else load_ami()))


def silero_package_error(files) -> dict[str, float]:
    """The silero-vad package's own get_speech_timestamps at its defaults (threshold 0.5): the baseline."""
    from silero_vad import load_silero_vad
    from silero_vad.sequence_vad import get_speech_timestamps_sequence

    model = load_silero_vad(sequence=True)
    miss = fa = total = 0.0
    for _name, audio, ref, scored in files:
        stamps = get_speech_timestamps_sequence(audio, model, return_seconds=True)
        m, f, t = detection_error(ref, [(d["start"], d["end"]) for d in stamps], scored)
        miss, fa, total = miss + m, fa + f, total + t
    return {"error": (miss + fa) / total, "missed": miss / total, "false_alarm": fa / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="store_true", help="sweep thresholds and padding")
    ap.add_argument("--backend", default="silero")
    args = ap.parse_args()
    settings = Settings(vad_backend=args.backend)
    backend = load_vad_backend(settings)
    files = load_ami()
    defaults = VadParams.from_settings(settings)
    silero_stock = VadParams(onset=0.5, offset=0.35, pre_roll_ms=30, hangover_ms=100, min_speech_ms=250,
                             normalize=False)
    print(f"backend={backend.name}")
    if backend.name == "silero":
        r = silero_package_error(files)
        print(f"{'silero get_speech_timestamps':30s} error={r['error']:.4f} missed={r['missed']:.4f} "
              f"false_alarm={r['false_alarm']:.4f} (the package's defaults)")
    for label, params in [("ours, silero-like settings", silero_stock), ("ours, configured defaults", defaults)]:
        r = pooled_error(backend, params, files)
        print(f"{label:30s} error={r['error']:.4f} missed={r['missed']:.4f} false_alarm={r['false_alarm']:.4f} "
              f"({params})")
    if args.grid:
        rows = []
        for onset, gap, pre, hang, norm in itertools.product(
            [0.2, 0.3, 0.4, 0.5], [0.05, 0.1, 0.15], [0, 100, 200], [200, 400, 600], [False, True]
        ):
            params = replace(defaults, onset=onset, offset=max(0.01, onset - gap), pre_roll_ms=pre,
                             hangover_ms=hang, normalize=norm)
            rows.append((per_file_errors(backend, params, files), params))
        rows.sort(key=lambda r: pool(r[0])["error"])
        for errors, params in rows[:15]:
            print(f"{pool(errors)['error']:.4f} {params}")
        # Leave one file out: choose the parameters on eight files, score the ninth. Pooled over the nine held-out
        # files, this is the error to expect on audio the defaults were not tuned on.
        held_out = []
        for i in range(len(files)):
            best = min(rows, key=lambda r: pool(r[0][:i] + r[0][i + 1 :])["error"])
            held_out.append(best[0][i])
        print(f"leave-one-file-out error={pool(held_out)['error']:.4f}")


if __name__ == "__main__":
    main()
