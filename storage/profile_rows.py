"""What one speaker profile keeps: the rule every storage backend applies on each write (`save_profile`,
`add_profile_embeddings`), so no route, command or future caller can store more.

A profile is matched by the centroid of its rows (`SpeakerProfile.centroid`). Each write goes through
`merge_profile_embeddings`:

1. Thin: when a write offers more rows than `max_embeddings`, evenly spaced ones are taken (by position, so the
   same offer always thins to the same rows), and a long conversation's speaker is represented across the whole
   conversation rather than by its last minute. Thinning comes first: the other order let a repeated offer churn
   (its rows thinned away last time counted as new and pushed the kept ones out; 200 repeated `speaker_assigned`
   counted 1238 s of speech for a 20 s cluster).
2. De-duplicate: an offered row whose cosine to a kept row (or to an offered row already taken) is at least
   `dedup_cosine` (PROFILE_DEDUP_COSINE, 0.98) is not added. The same conversation cluster assigned twice returns the
   same window embeddings (cosine 1.0): it adds nothing, and its speech seconds are not counted again. Two different
   windows of one voice score about 0.75-0.95 (streaming/speaker.py), so real new speech still gets in.
3. Cap: of the kept rows followed by the new ones, the newest `max_embeddings` (PROFILE_MAX_EMBEDDINGS, 64) stay, the
   oldest go first. Recent speech matches the microphone and room the user has now, and a wrong assignment ages out
   instead of weighing on the centroid forever. 64 rows is 3 min of enrolment clips (3 s each) or about 26 s of
   stream windows; a centroid of that many rows hardly moves as more are added.

Rows keep their order (oldest first) and their exact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from storage.base import SpeakerProfile


@dataclass(frozen=True)
class ProfileLimits:
    max_embeddings: int = 64
    dedup_cosine: float = 0.98


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # rows with inf/nan compare as nothing (nan cosines are never >= a threshold)
        norms = np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)


def merge_profile_embeddings(kept: np.ndarray, new: np.ndarray, limits: ProfileLimits) -> tuple[np.ndarray, int]:
    """(the profile's rows after adding `new` to `kept` (both (n, dim), oldest first), how many of `new` were added)."""
    offered = np.arange(len(new))
    if len(offered) > limits.max_embeddings:  # evenly spaced over the offer, the last one included
        offered = np.linspace(0, len(new) - 1, limits.max_embeddings).round().astype(int)
    taken: list[int] = []
    reference = _unit_rows(kept)
    candidates = _unit_rows(new)
    with np.errstate(all="ignore"):
        for i in offered:
            row = candidates[i]
            if len(reference) and float(np.nanmax(reference @ row, initial=-1.0)) >= limits.dedup_cosine:
                continue
            taken.append(int(i))
            reference = np.vstack([reference, row[None]])
    rows = np.concatenate([kept, new[taken]]) if taken else kept
    return rows[-limits.max_embeddings:], len(taken)


def added_seconds(seconds: float, offered: int, added: int) -> float:
    """The speech seconds to count for a write that added `added` of `offered` rows (none for duplicates)."""
    return float(seconds) * added / offered if offered else float(seconds)


def profile_centroid(profile: SpeakerProfile, rows: np.ndarray) -> SpeakerProfile:
    """The profile with `rows`' centroid as its only row (what matching reads: `Storage.matching_profiles`)."""
    mean = rows.mean(axis=0)
    profile.embeddings = (mean / max(float(np.linalg.norm(mean)), 1e-9)).astype(np.float32)[None]
    return profile
