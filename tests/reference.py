"""Reference speech of the shared test audio (../shared/data), read with pyannote.database's RTTM and UEM loaders:
one reader for the tests and the benches (bench/ puts tests/ on its path), instead of a hand-written parser each.

RTTM lines are `SPEAKER <file> 1 <start s> <duration s> <NA> <NA> <speaker> <NA> <NA>`; UEM lines
`<file> NA <start s> <end s>` (the scored region).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")  # pyannote 4 sends usage telemetry unless told not to

from pyannote.core import Annotation, Timeline  # noqa: E402
from pyannote.database.util import load_rttm, load_uem  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMI = DATA / "ami-debug"


@cache
def annotations(rttm: Path) -> dict[str, Annotation]:
    """Every file's reference turns in an RTTM, by file name (pyannote's uri). Shared: do not modify."""
    return load_rttm(str(rttm))


@cache
def scored_regions(uem: Path) -> dict[str, Timeline]:
    """Every file's scored region in a UEM, by file name. Shared: do not modify."""
    return load_uem(str(uem))


def speaker_turns(rttm: Path, name: str) -> list[tuple[float, float, str]]:
    """(start, end, speaker) of one file's reference turns, in time order; overlapping turns are all there."""
    return [(seg.start, seg.end, str(spk)) for seg, _, spk in annotations(rttm)[name].itertracks(yield_label=True)]


def speech_turns(rttm: Path, name: str) -> list[tuple[float, float]]:
    """(start, end) of one file's reference turns, whoever speaks, in time order."""
    return [(s, e) for s, e, _ in speaker_turns(rttm, name)]
