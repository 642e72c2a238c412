"""Speech detection error of the VAD on the AMI excerpts in ../shared/data/ami-debug, with pyannote.metrics.

Detection error = (missed speech + false-alarm speech) / reference speech (pyannote.metrics' DetectionErrorRate, no
collar, overlaps counted once), inside train.uem, pooled over the nine files (the sums of each file's missed, false
alarm and reference seconds). References are read with pyannote.database (tests/reference.py).

What it prints:
- the silero-vad package's `get_speech_timestamps` at its defaults, and "plain silero" at threshold 0.2 / 0.14
  without padding (the issue 14 baseline);
- ours, the live gate (VAD_*: the padding STT needs) and /v1/vad (VAD_BATCH_*: speech as it is), in-sample;
- leave-one-meeting-out cross-validation of /v1/vad's parameters: for each file, the parameters are chosen on the
  other eight (pooled error, averaged with the grid neighbours along each axis so a flat optimum wins over a spike),
  and scored on it; the held-out scores pooled are the figure to expect on other meetings. The parameters chosen
  the same way on all nine are the configured defaults; the gap is cross-validated minus in-sample.

The speech probabilities do not depend on the parameters: each file is scored by the model once and the sweep runs
`streaming.vad_batch.regions_from_probs`, the server's own code, on them (about 1 min on one core).

    .venv/bin/python bench/vad_der.py            # `make bench-vad`
    .venv/bin/python bench/vad_der.py --folds    # also each fold's choice and held-out error
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from pyannote.core import Annotation, Segment, Timeline  # noqa: E402
from pyannote.metrics.detection import DetectionErrorRate  # noqa: E402
from reference import AMI, DATA, annotations, scored_regions  # noqa: E402

from config import Settings  # noqa: E402
from streaming.vad import (  # noqa: E402
    SAMPLE_RATE,
    BatchVadParams,
    SileroVad,
    VadParams,
    detect_regions,
)
from streaming.vad_batch import regions_from_probs, speech_probabilities  # noqa: E402

# The cross-validated sweep: one threshold (offset = onset: hysteresis did not help, see README), regions shorter
# than 250 ms dropped (flat from 200 to 300 ms), no smoothing; the threshold, the gaps closed and the padding vary.
THRESHOLDS = (0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3)
MIN_SILENCE_MS = (600, 800, 900, 1000, 1100, 1200, 1300, 1400, 1600)
PAD_MS = (0, 50, 75, 100, 125, 150, 200)
MIN_SPEECH_MS = 250

Components = tuple[float, float, float]  # missed, false alarm, reference speech (seconds)


@dataclass
class Recording:
    name: str
    audio: np.ndarray
    reference: Annotation
    scored: Timeline


def load_ami() -> list[Recording]:
    refs, uems = annotations(AMI / "train.rttm"), scored_regions(AMI / "train.uem")
    out = []
    for name in sorted(uems):
        audio, sr = sf.read(AMI / f"{name}.wav", dtype="float32")
        assert sr == SAMPLE_RATE and audio.ndim == 1
        out.append(Recording(name, audio, refs[name], uems[name]))
    return out


_METRIC = DetectionErrorRate(collar=0.0, skip_overlap=False)


def components(rec: Recording, regions_s: list[tuple[float, float]]) -> Components:
    hypothesis = Annotation(uri=rec.name)
    for s, e in regions_s:
        hypothesis[Segment(s, e)] = "speech"
    d = _METRIC(rec.reference, hypothesis, uem=rec.scored, detailed=True)
    return d["miss"], d["false alarm"], d["total"]


def pooled(per_file: list[Components]) -> dict[str, float]:
    miss, fa, total = (sum(c[i] for c in per_file) for i in range(3))
    return {"error": (miss + fa) / total, "missed": miss / total, "false_alarm": fa / total}


def in_seconds(regions: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in regions]


def silero_package(files: list[Recording], **options: float) -> list[Components]:
    """The silero-vad package's own `get_speech_timestamps` (sequence model), with `options` over its defaults."""
    from silero_vad import load_silero_vad
    from silero_vad.sequence_vad import get_speech_timestamps_sequence

    model = load_silero_vad(sequence=True)
    out = []
    for rec in files:
        stamps = get_speech_timestamps_sequence(rec.audio, model, return_seconds=True, **options)
        out.append(components(rec, [(d["start"], d["end"]) for d in stamps]))
    return out


def grid_params() -> list[BatchVadParams]:
    return [BatchVadParams(onset=t, offset=t, min_speech_ms=MIN_SPEECH_MS, min_silence_ms=g, pad_ms=p)
            for t, g, p in itertools.product(THRESHOLDS, MIN_SILENCE_MS, PAD_MS)]


def sweep(files: list[Recording], probs: list[np.ndarray]) -> np.ndarray:
    """(thresholds, min silences, pads, files, 3) error components of every grid point on every file."""
    shape = (len(THRESHOLDS), len(MIN_SILENCE_MS), len(PAD_MS))
    out = np.zeros((*shape, len(files), 3))
    memo: dict[tuple[int, tuple[tuple[int, int], ...]], Components] = {}  # many grid points give equal regions
    for flat, params in enumerate(grid_params()):
        for i, (rec, p) in enumerate(zip(files, probs, strict=True)):
            regions = tuple(regions_from_probs(p, SileroVad.frame_samples, len(rec.audio), params))
            if (i, regions) not in memo:
                memo[(i, regions)] = components(rec, in_seconds(list(regions)))
            out[np.unravel_index(flat, shape)][i] = memo[(i, regions)]
    return out


def axis_neighbour_mean(err: np.ndarray) -> np.ndarray:
    """Each grid point's error averaged with its neighbours one step along each axis: a flat optimum beats a spike."""
    total, count = err.copy(), np.ones_like(err)
    for axis in range(err.ndim):
        for step in (-1, 1):
            shifted = np.full_like(err, np.nan)
            src = [slice(None)] * err.ndim
            dst = [slice(None)] * err.ndim
            src[axis] = slice(max(0, step), err.shape[axis] + min(0, step))
            dst[axis] = slice(max(0, -step), err.shape[axis] + min(0, -step))
            shifted[tuple(dst)] = err[tuple(src)]
            total += np.nan_to_num(shifted)
            count += ~np.isnan(shifted)
    return total / count


def choose(grid: np.ndarray, files: list[int]) -> tuple[int, ...]:
    """The grid index chosen on `files`: lowest neighbour-averaged pooled error."""
    s = grid[..., files, :].sum(axis=-2)
    err = (s[..., 0] + s[..., 1]) / s[..., 2]
    return tuple(int(i) for i in np.unravel_index(np.argmin(axis_neighbour_mean(err)), err.shape))


def described(index: tuple[int, ...]) -> str:
    t, g, p = THRESHOLDS[index[0]], MIN_SILENCE_MS[index[1]], PAD_MS[index[2]]
    return f"threshold {t}, min silence {g} ms, pad {p} ms, min speech {MIN_SPEECH_MS} ms"


def line(label: str, r: dict[str, float], note: str = "") -> None:
    print(f"{label:44s} error={r['error']:.4f} missed={r['missed']:.4f} false_alarm={r['false_alarm']:.4f} {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folds", action="store_true", help="print each fold's choice and held-out error")
    args = ap.parse_args()
    settings = Settings(_env_file=None)
    backend = SileroVad()
    files = load_ami()
    print(f"{len(files)} AMI excerpts, {sum(len(f.audio) for f in files) / SAMPLE_RATE:.0f} s; DetectionErrorRate "
          "(pyannote.metrics), no collar, inside train.uem, pooled")
    line("silero get_speech_timestamps, defaults", pooled(silero_package(files)), "(threshold 0.5, pad 30 ms)")
    line("silero get_speech_timestamps, 0.2/0.14", pooled(silero_package(
        files, threshold=0.2, neg_threshold=0.14, speech_pad_ms=0)), "(no padding)")
    live = VadParams.from_settings(settings)
    line("ours, live gate (VAD_*)", pooled([components(r, in_seconds(detect_regions(backend, r.audio, live)))
                                            for r in files]),
         f"(onset {live.onset}, offset {live.offset}, pre-roll {live.pre_roll_ms}, hangover {live.hangover_ms} ms)")
    probs = [speech_probabilities(backend, [r.audio]) for r in files]
    batch = BatchVadParams.from_settings(settings)
    in_sample = pooled([components(r, in_seconds(regions_from_probs(p, backend.frame_samples, len(r.audio), batch)))
                        for r, p in zip(files, probs, strict=True)])
    line("ours, /v1/vad (VAD_BATCH_*), in-sample", in_sample, f"({batch})")

    grid = sweep(files, probs)
    everyone = list(range(len(files)))
    held_out, picks = [], []
    for i, rec in enumerate(files):
        pick = choose(grid, [j for j in everyone if j != i])
        picks.append(pick)
        held_out.append(tuple(grid[pick][i]))
        if args.folds:
            m, f, t = held_out[-1]
            print(f"  fold {rec.name}: {described(pick)}; held-out error {(m + f) / t:.4f} ({t:.1f} s of speech)")
    cv = pooled(held_out)
    chosen = choose(grid, everyone)
    s = grid[chosen].sum(axis=0)
    chosen_in_sample = (s[0] + s[1]) / s[2]
    line(f"leave-one-meeting-out ({len(grid_params())}-point sweep)", cv,
         f"({len({*picks})} distinct choices in {len(files)} folds)")
    print(f"chosen on all {len(files)}: {described(chosen)}; in-sample error {chosen_in_sample:.4f}; "
          f"gap (cross-validated - in-sample) {cv['error'] - chosen_in_sample:.4f}")

    sample_ref = annotations(DATA / "sample.rttm")["sample"]
    sample_audio, _ = sf.read(DATA / "sample.wav", dtype="float32")
    sample = Recording("sample", sample_audio, sample_ref, Timeline([Segment(0, len(sample_audio) / SAMPLE_RATE)]))
    sample_regions = regions_from_probs(speech_probabilities(backend, [sample_audio]), backend.frame_samples,
                                        len(sample_audio), batch)
    line("sample.wav (not a meeting; not in the sweep)", pooled([components(sample, in_seconds(sample_regions))]),
         "(/v1/vad defaults, whole file scored)")


if __name__ == "__main__":
    main()
