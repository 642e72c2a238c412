"""Calibrates the speaker decisions on real speech (../shared/data) and prints the figures behind the constants in
streaming/speaker.py.

1. Clustering thresholds: a live simulation (VAD → sent audio → the tagger's window grid → online clustering), for
   a range of assign/merge thresholds; scored as the share of single-speaker time whose cluster agrees with the
   reference speaker under the best one-to-one mapping (sample.wav and the 9 AMI files).
2. Matching rules: enrol every speaker with 3 s or more of single-speaker speech in trn07, trn06 and the first
   half of sample.wav (3 s pieces), then identify the single-speaker turns of trn08, trn09 and the second half of
   sample.wav, and of people not enrolled (trn01-trn05, other meetings). Accuracy = right person or right rejection.

    .venv/bin/python bench/speaker_calibration.py [--backend resemblyzer] [--window 1.2] [--hop 0.4]
                      [--assign 0.65,0.7,0.75,0.8] [--merge 0.8,0.85,0.9,none] [--no-matching] [--no-pad]
                      [--precision auto|float32|bfloat16] [--reference-precision float32]

`--window` / `--hop` (default: streaming/tagging.py's WINDOW_S / HOP_S) set the live grid of part 1, to see what
another grid would give (the thresholds were calibrated on the default one; `--assign` / `--merge` set the threshold
grid). Only complete windows are embedded, as the tagger does, so a file with less sent speech than one window is
left out (trn02 at 1.2 s: before, it got one window cut short and a trivial 1.00, and the default grid's mean read
0.912 instead of 0.902). Part 1 also prints the embedding cost of the grid: windows per second of sent speech and
the CPU time embedding them took, in batches of 32. `--no-matching` skips part 2.
`--no-pad` is an experiment (resemblyzer only, this script only): clips shorter than one 1.6 s partial run the LSTM
over their own mel frames instead of a partial zero-padded to 160 frames (121 steps for a 1.2 s window instead of
160), in both parts (enrolment pieces and test turns too), to see whether the padding costs or buys agreement.
`--precision` is SPEAKER_PRECISION (resemblyzer's LSTM dtype; default: the server's, auto; the resolved one is
printed). `--reference-precision P` loads a second embedder in P and compares the two: part 1 prints how far the live
windows' embeddings are from P's (max abs difference per component, cosine) and the cosine between each reference
speaker's centroid (per file) in the two; part 2 enrols the profiles in P and identifies with `--precision`
(profiles stored by a server in P, matched by one in `--precision`) and prints each profile's centroid cosine
between the two.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/reference.py

from reference import speaker_turns  # noqa: E402

from config import Settings  # noqa: E402
from streaming.profile_match import Thresholds  # noqa: E402
from streaming.speaker import (  # noqa: E402
    CLUSTER_ASSIGN_THRESHOLD,
    CLUSTER_MERGE_THRESHOLD,
    SAMPLE_RATE,
    MatchRules,
    OnlineClusters,
    ProfileIndex,
    load_embedder,
)
from streaming.stt import SentTimeline  # noqa: E402
from streaming.tagging import HOP_S, MIN_WINDOW_S, WINDOW_S  # noqa: E402
from streaming.vad import SileroVad, SpeechAudio, StreamingVAD, VadParams  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMI = DATA / "ami-debug"


def turns(rttm: Path, name: str) -> list[tuple[float, float, str]]:
    return sorted(speaker_turns(rttm, name))  # read by pyannote.database (tests/reference.py)


def single_speaker_turns(ts: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The parts of each turn where nobody else speaks."""
    out = []
    for s, e, spk in ts:
        cuts = [(s, e)]
        for s2, e2, spk2 in ts:
            if spk2 == spk or e2 <= s or s2 >= e:
                continue
            cuts = [piece for a, b in cuts for piece in ((a, min(b, s2)), (max(a, e2), b)) if piece[1] > piece[0]]
        out += [(a, b, spk) for a, b in cuts]
    return sorted(out)


def load(path: Path) -> np.ndarray:
    audio, sr = sf.read(path, dtype="float32")
    assert sr == SAMPLE_RATE
    return audio


def agreement(labels: list[int], windows: list[tuple[float, float, str]]) -> float:
    """Share of window time whose cluster maps to the reference speaker, best one-to-one mapping."""
    refs = sorted({w[2] for w in windows})
    clusters = sorted(set(labels))
    overlap = np.zeros((len(clusters), len(refs)))
    for lab, (a, b, spk) in zip(labels, windows, strict=True):
        overlap[clusters.index(lab), refs.index(spk)] += b - a
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-overlap)
    return overlap[rows, cols].sum() / overlap.sum()


class UnpaddedResemblyzer:
    """`--no-pad`: `ResemblyzerEmbedder.embed_batch`, except that a clip shorter than one partial (1.6 s) is one
    partial of its own mel frames (`wav_to_mel_spectrogram` of the unpadded, volume-normalised clip: 121 frames for
    1.2 s) instead of 160 frames of which the last ones are zero padding. An experiment: the production embedder
    pads, as resemblyzer's `embed_utterance` (and its training, on 1.6 s crops) does."""

    def __init__(self, embedder) -> None:
        self.inner = embedder
        self.name = embedder.name + "-unpadded"
        self.partial_samples = embedder._partial_frames * embedder._hop

    def warm_up(self) -> None:
        self.inner.warm_up()

    def embed_batch(self, clips) -> np.ndarray:
        inner = self.inner
        clips = inner.check_clips(clips)
        out = np.zeros((len(clips), inner.dim), np.float32)
        short = [i for i, c in enumerate(clips) if len(c) < self.partial_samples]
        long = [i for i in range(len(clips)) if i not in set(short)]
        if long:
            out[long] = inner.embed_batch([clips[i] for i in long])
        if short:
            n_frames = [1 + len(clips[i]) // inner._hop for i in short]  # librosa's frame count, centred
            mel, first = inner.mel_frames([clips[i] for i in short], n_frames,
                                          [inner.volume_gain(clips[i]) for i in short])
            by_len: dict[int, list[int]] = defaultdict(list)
            for j, n in enumerate(n_frames):
                by_len[n].append(j)
            for n, js in by_len.items():
                x = np.stack([mel[first[j] : first[j] + n] for j in js])
                out[[short[j] for j in js]] = inner.forward_partials(x)  # in the embedder's precision
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="resemblyzer")
    ap.add_argument("--window", type=float, default=WINDOW_S, help=f"live window, s (default {WINDOW_S})")
    ap.add_argument("--hop", type=float, default=HOP_S, help=f"live hop, s (default {HOP_S})")
    ap.add_argument("--assign", default="0.65,0.7,0.75,0.8", help="assign thresholds to try (comma-separated)")
    ap.add_argument("--merge", default="0.8,0.85,0.9,none", help="merge thresholds to try (comma-separated, none: off)")
    ap.add_argument("--no-matching", action="store_true", help="skip part 2 (matching rules)")
    ap.add_argument("--no-pad", action="store_true", help="experiment: no zero padding of clips under 1.6 s")
    precisions = ["auto", "float32", "bfloat16"]
    ap.add_argument("--precision", choices=precisions, default=Settings.model_fields["speaker_precision"].default,
                    help="SPEAKER_PRECISION (default: the server's)")
    ap.add_argument("--reference-precision", choices=precisions, default=None,
                    help="compare with embeddings in this precision; enrol the profiles of part 2 in it")
    args = ap.parse_args()
    window_s, hop_s = args.window, args.hop
    assigns = [float(x) for x in args.assign.split(",")]
    merges = [2.0 if x.strip() == "none" else float(x) for x in args.merge.split(",")]
    if args.no_pad and args.backend != "resemblyzer":
        raise SystemExit("--no-pad is a resemblyzer experiment")

    def make_embedder(precision: str):
        e = load_embedder(Settings(_env_file=None, speaker_backend=args.backend, speaker_precision=precision))
        print(f"embedder {e.name}, precision {getattr(e, 'precision', 'float32')} (SPEAKER_PRECISION={precision})")
        e = UnpaddedResemblyzer(e) if args.no_pad else e
        e.warm_up()
        return e

    embedder = make_embedder(args.precision)
    reference = make_embedder(args.reference_precision) if args.reference_precision else None

    # 1. clustering: a live simulation. The VAD picks the audio sent to STT; the tagger's fixed grid of windows
    # over that sent audio is embedded and clustered online in order; each window centre is mapped back to stream
    # time and compared with the reference speaker there (single-speaker time only).
    vad = SileroVad()
    files = [("sample", *file_audio_turns("sample"))] + [(f"trn0{i}", *file_audio_turns(f"trn0{i}"))
                                                        for i in range(1, 10)]
    sims = []
    sent_seconds, embed_cpu, n_windows = 0.0, 0.0, 0
    drift: list[tuple[float, np.ndarray]] = []  # per file: (max abs diff, cosines) against the reference precision
    centroid_cos: list[tuple[str, str, float, float]] = []  # (file, speaker, seconds, cosine of the two centroids)
    for name, audio, ts in files:
        stream = StreamingVAD(vad, VadParams())
        timeline, sent = SentTimeline(), []
        for ev in stream.process(audio) + stream.flush():
            if isinstance(ev, SpeechAudio):
                timeline.append(ev.start, len(ev.audio))
                sent.append(ev.audio)
        sent_audio = np.concatenate(sent) if sent else np.zeros(0, np.float32)
        sent_seconds += len(sent_audio) / SAMPLE_RATE
        # the grid's complete windows (as tagging.window_indices: floor, so no window is cut short)
        ks = list(range(max(0, int(np.floor((len(sent_audio) / SAMPLE_RATE - window_s) / hop_s)) + 1)))
        if not ks:
            continue
        clips = [sent_audio[round(k * hop_s * SAMPLE_RATE) : round((k * hop_s + window_s) * SAMPLE_RATE)] for k in ks]
        started = time.process_time()
        emb = np.concatenate([embedder.embed_batch(clips[i : i + 32]) for i in range(0, len(clips), 32)])
        embed_cpu += time.process_time() - started
        n_windows += len(clips)
        sims.append((name, ks, emb, timeline, ts))
        if reference is not None:
            emb_ref = np.concatenate([reference.embed_batch(clips[i : i + 32]) for i in range(0, len(clips), 32)])
            drift.append((float(np.abs(emb - emb_ref).max()), np.sum(emb * emb_ref, axis=1)))
            by_spk: dict[str, list[int]] = defaultdict(list)
            for j, k in enumerate(ks):
                spk = speaker_at(ts, timeline.to_stream(k * hop_s + window_s / 2))
                if spk is not None:
                    by_spk[spk].append(j)
            for spk, js in sorted(by_spk.items()):
                a, b = emb[js].mean(0), emb_ref[js].mean(0)
                cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
                centroid_cos.append((name, spk, len(js) * hop_s, cos))
        print(f"{name}: {len(sent_audio) / SAMPLE_RATE:.1f} s sent, {len(ks)} windows")
    used = getattr(getattr(embedder, "inner", embedder), "precision", "float32")
    print(f"embedding ({embedder.name}, {used}): {n_windows} windows over {sent_seconds:.1f} s of sent speech = "
          f"{n_windows / sent_seconds:.2f} windows per speech-second; {embed_cpu:.2f} CPU s in batches of 32 = "
          f"{1000 * embed_cpu / sent_seconds:.1f} CPU ms per speech-second")
    if reference is not None:
        cosines = np.concatenate([c for _, c in drift])
        print(f"drift from {args.reference_precision} over the {len(cosines)} live windows: max abs diff per "
              f"component {max(d for d, _ in drift):.4f}, cosine min {cosines.min():.5f} mean {cosines.mean():.5f} "
              f"(per file, min cosine: " + ", ".join(f"{s[0]} {c.min():.4f}" for s, (_, c) in zip(sims, drift,
                                                                                                    strict=True)) + ")")
        cc = np.array([c for *_, c in centroid_cos])
        print(f"per-speaker centroids of the live windows (windows centred in single-speaker time, "
              f"{len(cc)} file/speaker pairs): cosine {args.precision} vs {args.reference_precision} min "
              f"{cc.min():.5f} mean {cc.mean():.5f}; " + ", ".join(f"{f}/{spk} ({sec:.0f} s) {c:.5f}"
                                                                  for f, spk, sec, c in centroid_cos))
    print(f"clustering ({window_s} s windows every {hop_s} s): agreement with the reference, best 1:1 mapping")
    print("assign | merge | " + " | ".join(s[0] for s in sims) + " | mean")
    means: dict[tuple[float, float], float] = {}
    for assign, merge in itertools.product(assigns, merges):
        scores = []
        for _name, ks, emb, timeline, ts in sims:
            oc = OnlineClusters(assign, merge)
            labels = [oc.assign(e, window_s) for e in emb]
            labels = [oc.resolve(label) for label in labels]
            windows, kept = [], []
            for k, label in zip(ks, labels, strict=True):
                centre = timeline.to_stream(k * hop_s + window_s / 2)
                ref = speaker_at(ts, centre)
                if ref is not None:
                    windows.append((centre - hop_s / 2, centre + hop_s / 2, ref))
                    kept.append(label)
            scores.append(agreement(kept, windows) if windows else 1.0)
        print(f"{threshold_text(assign)} | {threshold_text(merge)} | " + " | ".join(f"{x:.2f}" for x in scores)
              + f" | {np.mean(scores):.3f}")
        means[(assign, merge)] = float(np.mean(scores))
    best = max(means, key=means.get)
    server = (CLUSTER_ASSIGN_THRESHOLD, CLUSTER_MERGE_THRESHOLD)
    print(f"mean agreement at the server's thresholds ({threshold_text(server[0])} / {threshold_text(server[1])}): "
          f"{means.get(server, float('nan')):.3f}; best of the grid "
          f"{means[best]:.3f} at {threshold_text(best[0])} / {threshold_text(best[1])}")

    if args.no_matching:
        return

    # 2. matching rules
    enrol = [("trn07", None, None), ("trn06", None, None), ("sample", 0.0, 15.0)]
    tests_from = [("trn08", None, None), ("trn09", None, None), ("sample", 15.0, 30.0)]
    tests_from += [(f"trn0{i}", None, None) for i in range(1, 6)]  # other meetings: nobody there is enrolled
    index, names = enrol_profiles(reference or embedder, enrol)
    if reference is not None:
        own, _ = enrol_profiles(embedder, enrol, quiet=True)
        cos = np.sum(index.centroids * own.centroids, axis=1)
        print(f"profiles enrolled in {args.reference_precision}, identified with {args.precision}; profile centroid "
              f"cosine between the precisions: " + ", ".join(f"{n} {c:.5f}" for n, c in zip(names, cos, strict=True)))
    tests = test_segments(embedder, tests_from, names)
    n_known = sum(t[2] is not None for t in tests)
    print(f"\nidentify: {n_known} single-speaker turns (>= {MIN_WINDOW_S} s) of enrolled speakers, "
          f"{len(tests) - n_known} of others")
    rows = []
    for threshold, margin, min_s in itertools.product(np.arange(0.55, 0.86, 0.05), [0.0, 0.02, 0.05, 0.1],
                                                      [0.8, 1.5, 3.0]):
        raw = Thresholds(round(float(threshold), 2), margin)
        rules = MatchRules(normalised=raw, cosine=raw, min_seconds=min_s)  # no cohort here: raw cosines
        results = [(index.match(emb, sec, rules), truth) for emb, sec, truth in tests]
        ok = [(m.profile_id if m else None) == truth for m, truth in results]
        known = [o for o, (_, t) in zip(ok, results, strict=True) if t is not None]
        others = [o for o, (_, t) in zip(ok, results, strict=True) if t is None]
        rows.append((np.mean(ok), np.mean(known), np.mean(others), rules))
    rows.sort(key=lambda r: -r[0])
    print("accuracy | enrolled identified | others rejected | rules")
    for acc, k, imp, rules in rows[:15]:
        print(f"{acc:.3f} | {k:.3f} | {imp:.3f} | {rules}")


def threshold_text(x: float) -> str:
    """0.75 as "0.75", 0.875 as "0.875", a merge threshold above 1 (merging off) as "none"."""
    return "none" if x > 1 else f"{x:.2f}" if round(x, 2) == x else f"{x:.3f}"


def speaker_at(ts, t: float) -> str | None:
    active = {spk for s, e, spk in ts if s <= t < e}
    return active.pop() if len(active) == 1 else None


def file_audio_turns(name: str):
    if name == "sample":
        return load(DATA / "sample.wav"), turns(DATA / "sample.rttm", "sample")
    return load(AMI / f"{name}.wav"), turns(AMI / "train.rttm", name)


def enrol_profiles(embedder, sources, quiet: bool = False) -> tuple[ProfileIndex, list[str]]:
    """A profile per speaker with at least 3 s of single-speaker speech in the enrolment parts (3 s pieces)."""
    by_spk: dict[str, list[np.ndarray]] = defaultdict(list)
    for name, lo, hi in sources:
        audio, ts = file_audio_turns(name)
        for s, e, spk in single_speaker_turns(ts):
            if lo is not None and (s < lo or e > hi):
                continue
            by_spk[spk].append(audio[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)])
    names, centroids = [], []
    for spk, pieces in sorted(by_spk.items()):
        speech = np.concatenate(pieces)
        if len(speech) < 3 * SAMPLE_RATE:
            continue
        step = 3 * SAMPLE_RATE
        clips = [speech[i : i + step] for i in range(0, len(speech), step) if len(speech[i : i + step]) >= SAMPLE_RATE]
        emb = embedder.embed_batch(clips).mean(0)
        names.append(spk)
        centroids.append(emb / np.linalg.norm(emb))
        if not quiet:
            print(f"enrolled {spk}: {len(speech) / SAMPLE_RATE:.1f} s in {len(clips)} pieces")
    return ProfileIndex(names, ["person"] * len(names), np.stack(centroids)), names


def test_segments(embedder, sources, enrolled: list[str]):
    out = []  # (embedding, seconds, truth: enrolled name or None)
    for name, lo, hi in sources:
        audio, ts = file_audio_turns(name)
        for s, e, spk in single_speaker_turns(ts):
            if e - s < MIN_WINDOW_S or (lo is not None and (s < lo or e > hi)):
                continue
            emb = embedder.embed_batch([audio[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)]])[0]  # as the API does
            out.append((emb, e - s, spk if spk in enrolled else None))
    return out


if __name__ == "__main__":
    main()
