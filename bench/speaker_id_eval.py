"""Speaker identification on short turns, cross-validated: EER, precision and recall of the server's rule and of
the alternatives it was chosen from (issue 14).

    PYANNOTE_METRICS_ENABLED=false .venv/bin/python bench/speaker_id_eval.py [--cohort-file] [--verbose]

Trials (bench/speaker_id_data.py; embeddings cached in /tmp/speaker_id_eval): each enrolment source (one speaker's
single-speaker speech in one excerpt, >= 4 s, stored as 3 s rows as /v3/upload-audio does) is asked about every
1-5 s single-speaker turn of every OTHER excerpt, scored as the one profile of its user.

- "meeting" trials: the turns of excerpts where the enrolled speaker also speaks (trn01/02, trn01/03, trn06/09,
  trn07/08, sample's halves): targets (the enrolled speaker's turns) and the other people in that meeting. This is
  the issue's scenario; precision and recall are counted on these.
- "stranger" trials: the turns of excerpts the enrolled speaker is not in: all non-targets; their false-accept rate
  is printed separately (a high one would mean precision falls with more strangers).

Cross-validation: leave one test excerpt out. A fold's threshold (and the duration rule's slope) is chosen on the
trials that touch neither that excerpt as enrolment nor as test audio, then applied to the held-out excerpt's
trials; every trial is scored once, by a fold that never saw its audio. The choice: the highest training recall
whose training precision (meeting trials) is >= 0.95 and whose training stranger false-accept rate is <= 1 %
(ties: the higher threshold). EER is threshold-free, on all trials pooled.

Cohort (s-norm): for a trial of enrolment excerpt X and test excerpt Y, the background embeddings come from the
excerpts other than X and Y, from speakers who speak in neither X nor Y (no speaker of the trial, nor anyone in
their meetings, is in the cohort). `--cohort-file` instead uses the cohort the server ships
(streaming/speaker_cohort.npz, built from trn01-trn05 and sample.wav) and scores only trials from trn06-trn09,
whose speakers are not in it.

A do-nothing answer ("never the user") has recall 0 and precision undefined (printed as 0): the "never" row checks it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speaker_id_data import Enrolment, Turn, cached  # noqa: E402
from config import Settings  # noqa: E402
from streaming.profile_match import MATCH_RULES, ProfileIndex  # noqa: E402

PRECISION_TARGET = 0.95
STRANGER_FAR_MAX = 0.01


@dataclass
class Trials:
    enrol_ex: np.ndarray  # (n,) str
    test_ex: np.ndarray
    target: np.ndarray  # bool
    meeting: np.ndarray  # bool: the enrolled speaker speaks in the test excerpt
    seconds: np.ndarray  # the turn's speech seconds (after VAD)
    enrol_idx: np.ndarray  # int: index into enrolments
    turn_idx: np.ndarray


def make_trials(enrolments: list[Enrolment], turns: list[Turn], excerpts: set[str] | None = None) -> Trials:
    speakers_in: dict[str, set[str]] = {}
    for t in turns:
        speakers_in.setdefault(t.excerpt, set()).add(t.speaker)
    for e in enrolments:
        speakers_in.setdefault(e.excerpt, set()).add(e.speaker)
    rows = []
    for i, e in enumerate(enrolments):
        for j, t in enumerate(turns):
            if t.excerpt == e.excerpt or (excerpts is not None and {t.excerpt, e.excerpt} - excerpts):
                continue
            rows.append((e.excerpt, t.excerpt, t.speaker == e.speaker, e.speaker in speakers_in[t.excerpt],
                         t.seconds, i, j))
    cols = list(zip(*rows, strict=True))
    return Trials(*(np.array(c) for c in cols))


# --- scores ---------------------------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


@dataclass
class Cohort:
    """Background embeddings with where they come from (for leaving a trial's excerpts and speakers out)."""

    embeddings: np.ndarray  # (m, dim) unit
    excerpts: np.ndarray  # (m,) str
    speakers: np.ndarray  # (m,) str


def cohort_of(enrolments: list[Enrolment], turns: list[Turn]) -> Cohort:
    """Every enrolment row and every embedded test turn: 3 s pieces and 1-5 s turns, as profiles and segments are."""
    emb, ex, spk = [], [], []
    for e in enrolments:
        emb += list(e.rows)
        ex += [e.excerpt] * len(e.rows)
        spk += [e.speaker] * len(e.rows)
    for t in turns:
        if t.embedding is not None:
            emb.append(t.embedding)
            ex.append(t.excerpt)
            spk.append(t.speaker)
    return Cohort(np.stack(emb), np.array(ex), np.array(spk))


def raw_scores(profile_rows: np.ndarray, embedding: np.ndarray, how: str) -> float:
    """One profile against one embedding: "mean" (cosine to the rows' centroid: the old rule), "max" (best row),
    "top2" (mean of the best two rows)."""
    if how == "mean":
        return float(unit(profile_rows.mean(0)) @ embedding)
    s = np.sort(profile_rows @ embedding)[::-1]
    return float(s[0] if how == "max" else s[:2].mean())


def profile_vs_cohort(profile_rows: np.ndarray, cohort: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return cohort @ unit(profile_rows.mean(0))
    s = np.sort(cohort @ profile_rows.T, axis=1)[:, ::-1]
    return s[:, 0] if how == "max" else s[:, :2].mean(1)


def top_stats(scores: np.ndarray, k: int | None) -> tuple[float, float]:
    """Mean and std of the k highest (adaptive s-norm), all when k is None."""
    s = np.sort(scores)[::-1][:k] if k else scores
    return float(s.mean()), float(max(s.std(), 1e-3))


def trial_scores(trials: Trials, enrolments: list[Enrolment], turns: list[Turn], cohort: Cohort | None,
                 fixed_cohort: np.ndarray | None, how: str, norm: str, k: int | None) -> np.ndarray:
    """Per trial: the raw score (norm "none") or its s-norm against the trial's cohort. -inf: no embedding."""
    speakers_in: dict[str, set[str]] = {}
    for t in turns:
        speakers_in.setdefault(t.excerpt, set()).add(t.speaker)
    for e in enrolments:
        speakers_in.setdefault(e.excerpt, set()).add(e.speaker)
    out = np.full(len(trials.target), -np.inf)
    for n, (i, j) in enumerate(zip(trials.enrol_idx, trials.turn_idx, strict=True)):
        e, t = enrolments[i], turns[j]
        if t.embedding is None:
            continue
        raw = raw_scores(e.rows, t.embedding, how)
        if norm == "none":
            out[n] = raw
            continue
        if fixed_cohort is not None:
            c = fixed_cohort
        else:
            assert cohort is not None
            banned = speakers_in[e.excerpt] | speakers_in[t.excerpt]
            keep = ~np.isin(cohort.excerpts, [e.excerpt, t.excerpt]) & ~np.isin(cohort.speakers, list(banned))
            c = cohort.embeddings[keep]
        mp, sp = top_stats(profile_vs_cohort(e.rows, c, how), k)
        mt, st = top_stats(c @ t.embedding, k)
        out[n] = 0.5 * ((raw - mp) / sp + (raw - mt) / st)
    return out


# --- decisions, cross-validation ----------------------------------------------------------------------------------


def eer(scores: np.ndarray, target: np.ndarray) -> float:
    """Equal error rate: where the miss rate meets the false-accept rate (interpolated on the sorted scores)."""
    best = 1.0
    for th in np.unique(scores[np.isfinite(scores)]):
        miss = np.mean(scores[target] < th)
        fa = np.mean(scores[~target] >= th)
        best = min(best, max(miss, fa))
    return float(best)


def counts(accept: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """(true accepts, false accepts, targets)."""
    return int((accept & target).sum()), int((accept & ~target).sum()), int(target.sum())


def precision_recall(accept: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    tp, fp, n = counts(accept, target)
    return (tp / (tp + fp) if tp + fp else 0.0), (tp / n if n else 0.0)


def duration_threshold(th: float, slope: float, seconds: np.ndarray, knee_s: float) -> np.ndarray:
    """th for turns of knee_s or more speech; below, th + slope per second short of knee_s."""
    return th + slope * np.maximum(0.0, knee_s - seconds)


Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (scores, seconds) -> accept


def choose(scores: np.ndarray, seconds: np.ndarray, target: np.ndarray, stranger: np.ndarray,
           slopes: tuple[float, ...], knee_s: float, min_s: float) -> tuple[float, float]:
    """(threshold, slope) with the highest recall whose precision >= PRECISION_TARGET and stranger false-accept rate
    <= STRANGER_FAR_MAX on these trials; ties go to the stricter threshold."""
    finite = scores[np.isfinite(scores)]
    best, best_key = (float(finite.max()) + 1e-6, slopes[0]), (-1.0, 0.0)
    for slope in slopes:
        margin = slope * np.maximum(0.0, knee_s - seconds)
        for th in np.unique(finite - margin[np.isfinite(scores)]):
            accept = (scores >= duration_threshold(th, slope, seconds, knee_s)) & (seconds >= min_s)
            p, r = precision_recall(accept, target)
            far = float(accept[stranger].mean()) if stranger.any() else 0.0
            if p >= PRECISION_TARGET and far <= STRANGER_FAR_MAX and (r, th) > best_key:
                best, best_key = (float(th), slope), (r, th)
    return best


def cross_validate(trials: Trials, scores: np.ndarray, slopes: tuple[float, ...], knee_s: float,
                   min_s: float) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Accept decisions for every trial, each made with the (threshold, slope) chosen without its test excerpt."""
    accept = np.zeros(len(scores), bool)
    chosen = []
    stranger = ~trials.meeting
    for held in sorted(set(trials.test_ex)):
        test = trials.test_ex == held
        train = (trials.test_ex != held) & (trials.enrol_ex != held)
        th, slope = choose(scores[train], trials.seconds[train], trials.target[train], stranger[train], slopes,
                           knee_s, min_s)
        accept[test] = (scores[test] >= duration_threshold(th, slope, trials.seconds[test], knee_s)) & (
            trials.seconds[test] >= min_s)
        chosen.append((held, th, slope))
    return accept, chosen


def interval(k: int, n: int) -> str:
    """95 % Clopper-Pearson interval of k successes in n."""
    from scipy.stats import beta

    if n == 0:
        return "[-]"
    lo = beta.ppf(0.025, k, n - k + 1) if k else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return f"[{lo:.2f}-{hi:.2f}]"


def report(name: str, trials: Trials, lengths: np.ndarray, scores: np.ndarray, accept: np.ndarray,
           chosen: str) -> None:
    t = trials.target
    tp, fp, n = counts(accept, t)
    p, r = precision_recall(accept, t)
    fp_meeting = int((accept & ~t & trials.meeting).sum())
    fp_strangers = int((accept & ~trials.meeting).sum())
    short, long = lengths < 2.0, lengths >= 2.0
    _, r_short = precision_recall(accept[short], t[short])
    _, r_long = precision_recall(accept[long], t[long])
    print(f"{name:<34} | {eer(scores, t):.3f} | {p:.3f} ({tp}/{tp + fp}) {interval(tp, tp + fp)} | "
          f"{r:.3f} ({tp}/{n}) {interval(tp, n)} | {r_short:.2f} ({int(t[short].sum())}) | "
          f"{r_long:.2f} ({int(t[long].sum())}) | {fp_meeting}/{int((~t & trials.meeting).sum())} | "
          f"{fp_strangers}/{int((~trials.meeting).sum())} | {chosen}")


METHODS = [  # (name, how, norm, adaptive top-k, duration slopes tried)
    ("mean, fixed threshold", "mean", "none", None, (0.0,)),
    ("max row", "max", "none", None, (0.0,)),
    ("top-2 rows", "top2", "none", None, (0.0,)),
    ("mean + duration", "mean", "none", None, (0.0, 0.02, 0.04, 0.06, 0.08, -0.02)),
    ("max + duration", "max", "none", None, (0.0, 0.02, 0.04, 0.06, 0.08, -0.02)),
    ("mean, s-norm", "mean", "snorm", None, (0.0,)),
    ("mean, as-norm top-20", "mean", "snorm", 20, (0.0,)),
    ("max, s-norm", "max", "snorm", None, (0.0,)),
    ("max, as-norm top-20", "max", "snorm", 20, (0.0,)),
    ("mean, s-norm + duration", "mean", "snorm", None, (0.0, 0.2, 0.4, 0.6, -0.2)),
    ("mean, as-norm top-20 + duration", "mean", "snorm", 20, (0.0, 0.2, 0.4, 0.6, -0.2)),
    ("max, as-norm top-20 + duration", "max", "snorm", 20, (0.0, 0.2, 0.4, 0.6, -0.2)),
]
KNEE_S = 3.0  # the duration rule's threshold is constant from this much speech up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort-file", action="store_true", help="s-norm against the shipped cohort, trn06-09 only")
    args = ap.parse_args()
    enrolments, turns, model = cached(Settings())
    fixed = None
    excerpts = None
    if args.cohort_file:
        from streaming.profile_match import load_cohort

        loaded = load_cohort(model)
        assert loaded is not None, f"no shipped cohort for {model}"
        fixed, excerpts = loaded, {"trn06", "trn07", "trn08", "trn09"}
    trials = make_trials(enrolments, turns, excerpts)
    cohort = cohort_of(enrolments, turns)
    lengths = np.array([turns[j].end - turns[j].start for j in trials.turn_idx])
    n_t = int(trials.target.sum())
    print(f"{model}: {len(enrolments)} enrolment sources, {len(turns)} test turns of 1-5 s; {len(trials.target)} "
          f"trials: {n_t} target, {int((trials.meeting & ~trials.target).sum())} non-target in the same meeting, "
          f"{int((~trials.meeting).sum())} strangers (other meetings)")
    print("method | EER | precision (CV) | recall (CV) | recall 1-2 s | recall 2-5 s | FA meeting | FA strangers "
          "| chosen per fold")
    never = np.zeros(len(trials.target), bool)
    report("never the user (do-nothing)", trials, lengths, np.zeros(len(never)), never, "-")
    old = trial_scores(trials, enrolments, turns, None, None, "mean", "none", None)
    report("old rule: mean >= 0.80, >= 1.5 s", trials, lengths, old, (old >= 0.80) & (trials.seconds >= 1.5),
           "fixed")
    for name, how, norm, k, slopes in METHODS:
        scores = trial_scores(trials, enrolments, turns, cohort, fixed, how, norm, k)
        accept, chosen = cross_validate(trials, scores, slopes, KNEE_S, 1.0)
        ths = [c[1] for c in chosen]
        text = f"threshold {np.median(ths):.2f} ({min(ths):.2f}-{max(ths):.2f})"
        if len(slopes) > 1:
            text += " slope " + ",".join(f"{c[2]:g}" for c in chosen)
        report(name, trials, lengths, scores, accept, text)
    scores, accept = server_rule(trials, enrolments, turns, cohort, fixed, normalised=False, min_seconds=1.0)
    report("cosine >= 0.80 from 1 s (not kept)", trials, lengths, scores, accept, "fixed (MATCH_RULES)")
    scores, accept = server_rule(trials, enrolments, turns, cohort, fixed, normalised=True, min_seconds=1.0)
    report("s-norm >= 3.6 from 1 s (not shipped)", trials, lengths, scores, accept, "fixed (MATCH_RULES)")


def server_rule(trials: Trials, enrolments: list[Enrolment], turns: list[Turn], cohort: Cohort,
                fixed: np.ndarray | None, normalised: bool, min_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """The server's own code on every trial: a one-profile `ProfileIndex` (the enrolment's centroid) and
    `MATCH_RULES`; `normalised`: with the trial's cohort (as `trial_scores` leaves it out) or the shipped one, else
    without a cohort (what the server runs)."""
    speakers_in: dict[str, set[str]] = {}
    for t in turns:
        speakers_in.setdefault(t.excerpt, set()).add(t.speaker)
    scores = np.full(len(trials.target), -np.inf)
    accept = np.zeros(len(trials.target), bool)
    for n, (i, j) in enumerate(zip(trials.enrol_idx, trials.turn_idx, strict=True)):
        e, t = enrolments[i], turns[j]
        if fixed is None:
            banned = list(speakers_in.get(e.excerpt, set()) | {e.speaker} | speakers_in[t.excerpt])
            c = cohort.embeddings[~np.isin(cohort.excerpts, [e.excerpt, t.excerpt])
                                  & ~np.isin(cohort.speakers, banned)]
        else:
            c = fixed
        index = ProfileIndex(["p"], ["user"], unit(e.rows.mean(0))[None].astype(np.float32), c if normalised else None)
        if t.embedding is not None:
            scores[n] = float(index.scores(t.embedding)[0])
            rules = dataclasses.replace(MATCH_RULES, min_seconds=min_seconds)
            accept[n] = index.match(t.embedding, t.seconds, rules) is not None
    return scores, accept


if __name__ == "__main__":
    main()
