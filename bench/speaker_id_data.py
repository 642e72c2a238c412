"""The trials of bench/speaker_id_eval.py: enrolment sources and test turns cut from the shared recordings, embedded
as the server embeds them (cached under /tmp, so re-runs only score).

- Excerpts: the 9 AMI files (30 s each) and sample.wav's two halves (0-15 s, 15-30 s: its two speakers talk in both).
- Single-speaker speech: RTTM turns minus every part another speaker overlaps.
- Enrolment source: one speaker's single-speaker speech in one excerpt, concatenated, VAD-trimmed with the server's
  VAD (`uploads.speech_only`), cut into ENROL_CLIP_S pieces (a short tail joins the piece before: `embed_speech`),
  one embedding row per piece: what /v3/upload-audio stores. Sources with under MIN_ENROL_S of speech are left out.
- Test turn: a single-speaker piece of 1-5 s (RTTM duration). Stretches longer than 5 s are cut into consecutive
  pieces whose lengths follow PIECE_CYCLE_S (a leftover under 1 s is dropped): a 30 s excerpt holds few natural
  1-5 s turns without overlap (20 in all 11 excerpts), and a caller's segment of a long monologue is a turn too.
  Each is VAD-trimmed as `SegmentIdentifier` does and embedded whole; its `seconds` are the speech seconds the VAD
  kept (what the server's duration rule sees).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Settings  # noqa: E402
from streaming.speaker import SAMPLE_RATE, load_embedder  # noqa: E402
from streaming.vad import VadParams, detect_regions, load_vad_backend  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMI = DATA / "ami-debug"
CACHE = Path("/tmp/speaker_id_eval")
ENROL_CLIP_S = 3.0  # uploads.ENROL_CLIP_S (not imported: uploads pulls in the web app)
MIN_ENROL_S = 3.0  # one ENROL_CLIP_S row at least; the 30 s excerpts hold little single-speaker speech
TURN_MIN_S, TURN_MAX_S = 1.0, 5.0
PIECE_CYCLE_S = (1.2, 2.5, 1.6, 4.0, 1.0, 3.2, 2.0)  # lengths long stretches are cut into: as many short as long


@dataclass(frozen=True)
class Excerpt:
    name: str  # "trn07", "sampleA"
    wav: Path
    rttm: Path
    uri: str  # the RTTM's file id
    lo: float = 0.0
    hi: float = float("inf")


EXCERPTS = [Excerpt(f"trn0{i}", AMI / f"trn0{i}.wav", AMI / "train.rttm", f"trn0{i}") for i in range(1, 10)] + [
    Excerpt("sampleA", DATA / "sample.wav", DATA / "sample.rttm", "sample", 0.0, 15.0),
    Excerpt("sampleB", DATA / "sample.wav", DATA / "sample.rttm", "sample", 15.0, 30.0),
]


@dataclass
class Enrolment:
    excerpt: str
    speaker: str
    rows: np.ndarray  # (pieces, dim) unit rows, as a stored profile
    seconds: float


@dataclass
class Turn:
    excerpt: str
    speaker: str
    start: float
    end: float
    seconds: float  # speech the VAD kept
    embedding: np.ndarray | None  # None when the VAD kept less than the embedder's shortest clip


def rttm_turns(rttm: Path, uri: str) -> list[tuple[float, float, str]]:
    """(start, end, speaker) of `uri`'s SPEAKER lines. A plain reader (fields 2, 4, 5, 8 of the RTTM format);
    the RTTM readers of the other benches are being moved to tests/reference.py, this one is kept local on purpose
    so this bench does not depend on that move."""
    out = []
    for line in rttm.read_text(encoding="utf-8").splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER" and f[1] == uri:
            out.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return sorted(out)


def single_speaker(turns: list[tuple[float, float, str]], lo: float, hi: float) -> list[tuple[float, float, str]]:
    """The parts of each turn inside [lo, hi) where nobody else speaks."""
    out = []
    for s, e, spk in turns:
        cuts = [(max(s, lo), min(e, hi))]
        for s2, e2, spk2 in turns:
            if spk2 != spk and e2 > s and s2 < e:
                cuts = [p for a, b in cuts for p in ((a, min(b, s2)), (max(a, e2), b))]
        out += [(a, b, spk) for a, b in cuts if b > a]
    return sorted(out)


def turn_pieces(stretches: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The 1-5 s test turns of an excerpt's single-speaker stretches (see the module's docstring)."""
    out, k = [], 0
    for a, b, spk in stretches:
        if b - a < TURN_MIN_S:
            continue
        if b - a <= TURN_MAX_S:
            out.append((a, b, spk))
            continue
        while b - a >= TURN_MIN_S:
            length = min(PIECE_CYCLE_S[k % len(PIECE_CYCLE_S)], b - a)
            out.append((a, a + length, spk))
            a, k = a + length, k + 1
    return out


def speech_of(vad, params: VadParams, clip: np.ndarray) -> np.ndarray:
    regions = detect_regions(vad, clip, params) if len(clip) else []
    return np.concatenate([clip[s:e] for s, e in regions]) if regions else clip[:0]


def enrol_pieces(speech: np.ndarray) -> list[np.ndarray]:
    step = int(ENROL_CLIP_S * SAMPLE_RATE)
    clips = [speech[i : i + step] for i in range(0, len(speech), step)]
    if len(clips) > 1 and len(clips[-1]) < step // 2:
        clips[-2] = np.concatenate(clips[-2:])
        clips.pop()
    return clips


def build(settings: Settings) -> tuple[list[Enrolment], list[Turn]]:
    vad, params = load_vad_backend(settings), VadParams.from_settings(settings)
    embedder = load_embedder(settings)
    enrolments, turns = [], []
    for ex in EXCERPTS:
        audio, sr = sf.read(ex.wav, dtype="float32")
        assert sr == SAMPLE_RATE
        pieces = single_speaker(rttm_turns(ex.rttm, ex.uri), ex.lo, min(ex.hi, len(audio) / SAMPLE_RATE))
        for spk in sorted({p[2] for p in pieces}):
            own = np.concatenate([audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b, s in pieces if s == spk])
            speech = speech_of(vad, params, own)
            if len(speech) >= MIN_ENROL_S * SAMPLE_RATE:
                rows = embedder.embed_batch(enrol_pieces(speech))
                enrolments.append(Enrolment(ex.name, spk, rows, len(speech) / SAMPLE_RATE))
        for a, b, spk in turn_pieces(pieces):
            speech = speech_of(vad, params, audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)])
            emb = embedder.embed_batch([speech])[0] if len(speech) >= embedder.min_samples else None
            turns.append(Turn(ex.name, spk, a, b, len(speech) / SAMPLE_RATE, emb))
    return enrolments, turns


def cached(settings: Settings) -> tuple[list[Enrolment], list[Turn], str]:
    """`build`, from /tmp/speaker_id_eval when this code and these settings made it before. Also the embedder name."""
    from streaming.speaker import embedder_name

    key = hashlib.sha1((Path(__file__).read_text() + settings.speaker_backend + settings.speaker_precision
                        + settings.speechbrain_model).encode()).hexdigest()[:12]
    path = CACHE / f"{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            enrolments = [Enrolment(str(x), str(s), z[f"rows{i}"], float(sec))
                          for i, (x, s, sec) in enumerate(zip(z["e_ex"], z["e_spk"], z["e_sec"], strict=True))]
            dim = z["t_emb"].shape[1]
            turns = [Turn(str(x), str(s), float(a), float(b), float(sec), emb if ok else None)
                     for x, s, a, b, sec, emb, ok in zip(z["t_ex"], z["t_spk"], z["t_start"], z["t_end"], z["t_sec"],
                                                         z["t_emb"], z["t_ok"], strict=True)]
            assert dim
        return enrolments, turns, embedder_name(settings)
    enrolments, turns = build(settings)
    dim = enrolments[0].rows.shape[1]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, e_ex=[e.excerpt for e in enrolments], e_spk=[e.speaker for e in enrolments],
             e_sec=[e.seconds for e in enrolments], **{f"rows{i}": e.rows for i, e in enumerate(enrolments)},
             t_ex=[t.excerpt for t in turns], t_spk=[t.speaker for t in turns], t_start=[t.start for t in turns],
             t_end=[t.end for t in turns], t_sec=[t.seconds for t in turns],
             t_emb=np.stack([t.embedding if t.embedding is not None else np.zeros(dim, np.float32) for t in turns]),
             t_ok=[t.embedding is not None for t in turns])
    return enrolments, turns, embedder_name(settings)


COHORT_EXCERPTS = ("trn01", "trn02", "trn03", "trn04", "trn05", "sampleA", "sampleB")  # none of trn06-09's speakers


def write_cohort(enrolments: list[Enrolment], turns: list[Turn], model: str, path: Path) -> int:
    """The server's background cohort (streaming/profile_match.py): every enrolment row and embedded test turn of
    COHORT_EXCERPTS (3 s pieces and 1-5 s turns, as profiles and segments are), with the embedder's name. Returns
    its size."""
    rows = [r for e in enrolments if e.excerpt in COHORT_EXCERPTS for r in e.rows]
    rows += [t.embedding for t in turns if t.excerpt in COHORT_EXCERPTS and t.embedding is not None]
    speakers = sorted({e.speaker for e in enrolments if e.excerpt in COHORT_EXCERPTS}
                      | {t.speaker for t in turns if t.excerpt in COHORT_EXCERPTS})
    np.savez_compressed(path, model=np.array(model), embeddings=np.stack(rows).astype(np.float32),
                        source=np.array(f"bench/speaker_id_data.py --write-cohort: {', '.join(COHORT_EXCERPTS)} "
                                        f"of the shared data; {len(speakers)} speakers"))
    return len(rows)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    es, ts, name = cached(Settings())
    if "--write-cohort" in sys.argv:
        from streaming.profile_match import COHORT_PATH

        print(f"wrote {COHORT_PATH}: {write_cohort(es, ts, name, COHORT_PATH)} embeddings")
    print(f"{name}: {len(es)} enrolment sources, {len(ts)} turns of 1-5 s ({time.perf_counter() - t0:.1f} s)")
    for e in es:
        print(f"  enrol {e.excerpt} {e.speaker}: {e.seconds:.1f} s, {len(e.rows)} rows")
