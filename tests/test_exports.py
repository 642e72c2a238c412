"""`GET /v1/conversations/{id}?format=json|txt|srt|vtt|rttm` on a real server after a real stream, and the renderers
of `transcript_export.py` on the edge cases a file format breaks on (cue separators, hours, names with spaces)."""

from __future__ import annotations

import re
import uuid

import httpx
import numpy as np
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, stream_frames

from transcript_export import render, to_srt, to_vtt

SR = 16000


def _cues(text: str) -> list[list[str]]:
    return [block.splitlines() for block in text.strip().split("\n\n") if block.strip()]


async def test_a_streamed_conversation_exports_in_every_format(local_server):
    uid = f"export-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {uid}"}
    audio = np.concatenate([read_wav(SAMPLE_WAV), np.zeros(2 * SR, "f4")])
    streamed = await stream_frames(f"{local_server.ws}/v4/listen?codec=pcm16&sample_rate=16000", pcm16_frames(audio),
                                   headers=headers, pace_s=0.0, timeout_s=90,
                                   until=lambda r: sum(len(s["text"].split()) for s in r.segments.values()) > 20)
    assert streamed.segments, streamed.events
    async with httpx.AsyncClient(base_url=local_server.http, headers=headers, timeout=60) as http:
        finished = await http.post("/v1/conversations")
        assert finished.status_code == 200, finished.text
        conversation = finished.json()["conversation"]
        cid = conversation["id"]
        segments = [s for s in conversation["transcript_segments"] if s["text"].strip()]
        assert segments
        # A person named on one segment: the files say the person's name, not a label.
        person = (await http.post("/v1/users/people", json={"name": "Grace Hopper"})).json()
        await http.patch(f"/v1/conversations/{cid}/segments/assign-bulk",
                         json={"segment_ids": [segments[0]["id"]], "assign_type": "person_id", "value": person["id"]})
        omi = await http.get(f"/v1/conversations/{cid}")
        assert omi.headers["content-type"].startswith("application/json") and omi.json()["id"] == cid
        segments = sorted((s for s in omi.json()["transcript_segments"] if s["text"].strip()),
                          key=lambda s: (s["start"], s["end"]))
        files = {}
        for fmt in ("json", "txt", "srt", "vtt", "rttm"):
            r = await http.get(f"/v1/conversations/{cid}", params={"format": fmt})
            assert r.status_code == 200, r.text
            assert f'filename="{cid}.{fmt}"' in r.headers["content-disposition"]
            files[fmt] = r.text
        bad = await http.get(f"/v1/conversations/{cid}", params={"format": "docx"})
        assert bad.status_code == 422 and bad.json()["detail"]
    async with httpx.AsyncClient(base_url=local_server.http, timeout=30,
                                 headers={"Authorization": "Bearer someone-else"}) as other:
        assert (await other.get(f"/v1/conversations/{cid}", params={"format": "srt"})).status_code == 404

    exported = __import__("json").loads(files["json"])["segments"]
    assert [s["id"] for s in exported] == [s["id"] for s in segments]
    assert exported[0]["speaker_name"] == "Grace Hopper"
    srt = _cues(files["srt"])
    assert [int(c[0]) for c in srt] == list(range(1, len(segments) + 1))
    for cue, seg in zip(srt, segments, strict=True):
        start, end = cue[1].split(" --> ")
        h, m, rest = start.split(":")
        assert abs(int(h) * 3600 + int(m) * 60 + float(rest.replace(",", ".")) - seg["start"]) < 0.002
        assert cue[2].endswith(seg["text"].strip())
    assert srt[0][2].startswith("Grace Hopper: ")
    vtt = files["vtt"]
    assert vtt.startswith("WEBVTT\n") and len(_cues(vtt)) == len(segments) + 1
    assert "<v Grace Hopper>" in vtt
    rttm = [line.split() for line in files["rttm"].splitlines()]
    assert len(rttm) == len(segments)
    for row, seg in zip(rttm, segments, strict=True):
        assert row[0] == "SPEAKER" and row[1] == cid
        assert abs(float(row[3]) - seg["start"]) < 0.002 and abs(float(row[4]) - (seg["end"] - seg["start"])) < 0.002
    assert rttm[0][7] == "Grace_Hopper"
    txt = files["txt"].splitlines()
    assert len(txt) == len(segments) and all(re.match(r"\[\d\d:\d\d:\d\d\] .+: ", line) for line in txt)


def test_cue_text_cannot_break_the_file():
    segments = [{"id": "a", "text": "one\n\ntwo --> three", "speaker_id": 1, "is_user": False, "start": 3725.5,
                 "end": 3727.25},
                {"id": "b", "text": "   ", "speaker_id": 0, "start": 0.0, "end": 1.0},  # empty: left out
                {"id": "c", "text": "me", "speaker_id": 0, "is_user": True, "start": 1.0, "end": 0.5}]
    srt = _cues(to_srt(segments))
    assert len(srt) == 2  # the blank line inside the text did not start a new cue
    assert srt[0][1] == "00:00:01,000 --> 00:00:01,000"  # an end before the start is clamped
    assert srt[0][2] == "You: me"
    assert srt[1][1] == "01:02:05,500 --> 01:02:07,250"
    assert "-->" not in srt[1][2] + "".join(srt[1][3:])
    vtt = to_vtt(segments)
    assert "01:02:05.500 --> 01:02:07.250" in vtt and "<v SPEAKER_1>" in vtt
    assert render([], "srt") == "" and render([], "rttm") == ""
