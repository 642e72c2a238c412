"""A transcript's segments as the files people open: JSON, plain text, SubRip (SRT), WebVTT and RTTM.

Pure functions over segment dicts in the wire shape (`{id, text, speaker, speaker_id, is_user, person_id, start,
end}`, seconds from the conversation's start), shared by `GET /v1/conversations/{id}?format=` and the CLI's
`omi-server stream --out`. Segments are written in time order; a speaker is named "You" for the user, the person's
name when the caller knows it (`names`: person id -> name), else its `SPEAKER_n` label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

FORMATS = ("json", "txt", "srt", "vtt", "rttm")
MEDIA_TYPES = {
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "rttm": "text/plain; charset=utf-8",
}


def speaker_name(segment: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
    if segment.get("is_user"):
        return "You"
    person = segment.get("person_id")
    if person and names and person in names:
        return names[person]
    label = segment.get("speaker")
    if label:
        return str(label)
    return f"SPEAKER_{int(segment.get('speaker_id') or 0)}"


def _ordered(segments: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((s for s in segments if str(s.get("text", "")).strip()),
                  key=lambda s: (float(s.get("start", 0.0)), float(s.get("end", 0.0))))


def _clock(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both SRT and WebVTT, and "-->" would read as a timing line.
    return re.sub(r"\n\s*\n", "\n", text.strip()).replace("-->", "->")


def to_json(segments: Iterable[Mapping[str, Any]], names: Mapping[str, str] | None = None) -> str:
    rows = [dict(s) | {"speaker_name": speaker_name(s, names)} for s in _ordered(segments)]
    return json.dumps({"segments": rows}, ensure_ascii=False, indent=2) + "\n"


def to_txt(segments: Iterable[Mapping[str, Any]], names: Mapping[str, str] | None = None) -> str:
    lines = [f"[{_clock(float(s['start']), '.')[:-4]}] {speaker_name(s, names)}: {str(s['text']).strip()}"
             for s in _ordered(segments)]
    return "\n".join(lines) + ("\n" if lines else "")


def to_srt(segments: Iterable[Mapping[str, Any]], names: Mapping[str, str] | None = None) -> str:
    cues = []
    for i, s in enumerate(_ordered(segments), 1):
        start, end = float(s["start"]), max(float(s["end"]), float(s["start"]))
        cues.append(f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n"
                    f"{speaker_name(s, names)}: {_cue_text(str(s['text']))}\n")
    return "\n".join(cues)


def to_vtt(segments: Iterable[Mapping[str, Any]], names: Mapping[str, str] | None = None) -> str:
    cues = ["WEBVTT\n"]
    for s in _ordered(segments):
        start, end = float(s["start"]), max(float(s["end"]), float(s["start"]))
        voice = speaker_name(s, names).replace(">", "")
        cues.append(f"{_clock(start, '.')} --> {_clock(end, '.')}\n<v {voice}>{_cue_text(str(s['text']))}\n")
    return "\n".join(cues)


def to_rttm(segments: Iterable[Mapping[str, Any]], file_id: str = "audio",
            names: Mapping[str, str] | None = None) -> str:
    """One SPEAKER line per segment (RTTM fields are space-separated, so spaces in names become underscores)."""
    uri = re.sub(r"\s+", "_", file_id) or "audio"
    lines = []
    for s in _ordered(segments):
        start, end = float(s["start"]), max(float(s["end"]), float(s["start"]))
        who = re.sub(r"\s+", "_", speaker_name(s, names))
        lines.append(f"SPEAKER {uri} 1 {start:.3f} {end - start:.3f} <NA> <NA> {who} <NA> <NA>")
    return "\n".join(lines) + ("\n" if lines else "")


def render(segments: Iterable[Mapping[str, Any]], fmt: str, file_id: str = "audio",
           names: Mapping[str, str] | None = None) -> str:
    """`fmt`: one of FORMATS (ValueError otherwise)."""
    segments = list(segments)
    if fmt == "json":
        return to_json(segments, names)
    if fmt == "txt":
        return to_txt(segments, names)
    if fmt == "srt":
        return to_srt(segments, names)
    if fmt == "vtt":
        return to_vtt(segments, names)
    if fmt == "rttm":
        return to_rttm(segments, file_id, names)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
