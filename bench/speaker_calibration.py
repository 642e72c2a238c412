"""Calibrates the speaker decisions on real speech (../shared/data) and prints the figures behind the constants in
streaming/speaker.py.

1. Clustering thresholds: a live simulation (VAD → sent audio → the tagger's window grid → online clustering), for
   a range of assign/merge thresholds; scored as the share of single-speaker time whose cluster agrees with the
   reference speaker under the best one-to-one mapping (sample.wav and the 9 AMI files).
2. Matching rules: enrol every speaker with 3 s or more of single-speaker speech in trn07, trn06 and the first
   half of sample.wav (3 s pieces), then identify the single-speaker turns of trn08, trn09 and the second half of
   sample.wav, and of people not enrolled (trn01-trn05, other meetings). Accuracy = right person or right rejection.

    .venv/bin/python bench/speaker_calibration.py [--backend resemblyzer]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Settings  # noqa: E402
from streaming.speaker import SAMPLE_RATE, MatchRules, OnlineClusters, ProfileIndex, load_embedder  # noqa: E402
from streaming.stt import SentTimeline  # noqa: E402
from streaming.tagging import HOP_S, MIN_WINDOW_S, WINDOW_S  # noqa: E402
from streaming.vad import SileroVad, SpeechAudio, StreamingVAD, VadParams  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMI = DATA / "ami-debug"


def turns(rttm: Path, name: str) -> list[tuple[float, float, str]]:
    out = []
    for line in rttm.read_text(encoding="utf-8").splitlines():
        f = line.split()
        if f and f[1] == name:
            out.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return sorted(out)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="resemblyzer")
    args = ap.parse_args()
    embedder = load_embedder(Settings(_env_file=None, speaker_backend=args.backend))
    embedder.warm_up()

    # 1. clustering: a live simulation. The VAD picks the audio sent to STT; the tagger's fixed grid of windows
    # over that sent audio is embedded and clustered online in order; each window centre is mapped back to stream
    # time and compared with the reference speaker there (single-speaker time only).
    vad = SileroVad()
    files = [("sample", *file_audio_turns("sample"))] + [(f"trn0{i}", *file_audio_turns(f"trn0{i}"))
                                                        for i in range(1, 10)]
    sims = []
    for name, audio, ts in files:
        stream = StreamingVAD(vad, VadParams())
        timeline, sent = SentTimeline(), []
        for ev in stream.process(audio) + stream.flush():
            if isinstance(ev, SpeechAudio):
                timeline.append(ev.start, len(ev.audio))
                sent.append(ev.audio)
        sent_audio = np.concatenate(sent) if sent else np.zeros(0, np.float32)
        ks = list(range(max(0, int((len(sent_audio) / SAMPLE_RATE - WINDOW_S) / HOP_S) + 1)))
        if not ks:
            continue
        clips = [sent_audio[round(k * HOP_S * SAMPLE_RATE) : round((k * HOP_S + WINDOW_S) * SAMPLE_RATE)] for k in ks]
        sims.append((name, ks, embedder.embed_batch(clips), timeline, ts))
    print(f"clustering ({WINDOW_S} s windows every {HOP_S} s): agreement with the reference, best 1:1 mapping")
    print("assign | merge | " + " | ".join(s[0] for s in sims) + " | mean")
    for assign, merge in itertools.product([0.65, 0.7, 0.75, 0.8], [0.8, 0.85, 0.9, 2.0]):
        scores = []
        for _name, ks, emb, timeline, ts in sims:
            oc = OnlineClusters(assign, merge)
            labels = [oc.assign(e, WINDOW_S) for e in emb]
            labels = [oc.resolve(label) for label in labels]
            windows, kept = [], []
            for k, label in zip(ks, labels, strict=True):
                centre = timeline.to_stream(k * HOP_S + WINDOW_S / 2)
                ref = speaker_at(ts, centre)
                if ref is not None:
                    windows.append((centre - HOP_S / 2, centre + HOP_S / 2, ref))
                    kept.append(label)
            scores.append(agreement(kept, windows) if windows else 1.0)
        merge_text = "none" if merge > 1 else f"{merge:.2f}"
        print(f"{assign:.2f} | {merge_text} | " + " | ".join(f"{x:.2f}" for x in scores) + f" | {np.mean(scores):.3f}")

    # 2. matching rules
    enrol = [("trn07", None, None), ("trn06", None, None), ("sample", 0.0, 15.0)]
    tests_from = [("trn08", None, None), ("trn09", None, None), ("sample", 15.0, 30.0)]
    tests_from += [(f"trn0{i}", None, None) for i in range(1, 6)]  # other meetings: nobody there is enrolled
    index, names = enrol_profiles(embedder, enrol)
    tests = test_segments(embedder, tests_from, names)
    n_known = sum(t[2] is not None for t in tests)
    print(f"\nidentify: {n_known} single-speaker turns (>= {MIN_WINDOW_S} s) of enrolled speakers, "
          f"{len(tests) - n_known} of others")
    rows = []
    for threshold, margin, min_s in itertools.product(np.arange(0.55, 0.86, 0.05), [0.0, 0.02, 0.05, 0.1],
                                                      [0.8, 1.5, 3.0]):
        rules = MatchRules(round(float(threshold), 2), margin, min_s)
        results = [(index.match(emb, sec, rules), truth) for emb, sec, truth in tests]
        ok = [(m.profile_id if m else None) == truth for m, truth in results]
        known = [o for o, (_, t) in zip(ok, results, strict=True) if t is not None]
        others = [o for o, (_, t) in zip(ok, results, strict=True) if t is None]
        rows.append((np.mean(ok), np.mean(known), np.mean(others), rules))
    rows.sort(key=lambda r: -r[0])
    print("accuracy | enrolled identified | others rejected | rules")
    for acc, k, imp, rules in rows[:15]:
        print(f"{acc:.3f} | {k:.3f} | {imp:.3f} | {rules}")


def speaker_at(ts, t: float) -> str | None:
    active = {spk for s, e, spk in ts if s <= t < e}
    return active.pop() if len(active) == 1 else None


def file_audio_turns(name: str):
    if name == "sample":
        return load(DATA / "sample.wav"), turns(DATA / "sample.rttm", "sample")
    return load(AMI / f"{name}.wav"), turns(AMI / "train.rttm", name)


def enrol_profiles(embedder, sources) -> tuple[ProfileIndex, list[str]]:
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
