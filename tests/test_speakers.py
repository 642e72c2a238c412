"""Speakers end to end on a real server process with the real resemblyzer embedder: live labels on sample.wav,
enrolled people identified across AMI recordings, the user's own profile, and the profile API."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import AMI, DATA, SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server, stream_frames
from deepgram_server import ThreadedDeepgramTestServer
from reference import speaker_turns

SR = 16000


def rttm_turns(path, name: str) -> list[tuple[float, float, str]]:
    return speaker_turns(path, name)  # (start, end, speaker), read by pyannote.database


def speaker_at(turns, t: float) -> str | None:
    """The reference speaker at time t, None in silence or overlap."""
    active = {spk for s, e, spk in turns if s <= t < e}
    return active.pop() if len(active) == 1 else None


def wav_bytes(audio: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def single_speaker_audio(audio, turns, speaker: str, until: float = 1e9) -> np.ndarray:
    """The speaker's speech where nobody else talks (10 ms grid), before `until`."""
    keep = np.zeros(len(audio), bool)
    for i in range(0, min(len(audio), int(until * SR)), 160):
        if speaker_at(turns, i / SR) == speaker:
            keep[i : i + 160] = True
    return audio[keep]


@pytest.fixture(scope="module")
def deepgram():
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.25) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, deepgram):
    proc = start_server(tmp_path_factory.mktemp("speakers"), STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url,
                        DEEPGRAM_API_KEY="dg-key")
    yield proc
    stop_server(proc)


def client(server, uid: str) -> httpx.Client:
    return httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}, timeout=120)


async def stream_and_collect(server, audio: np.ndarray, uid: str) -> list[dict]:
    frames = pcm16_frames(np.concatenate([audio, np.zeros(SR, np.float32)]))
    expected_end = len(audio) / SR - 1.0

    def done(result) -> bool:
        return any(s["end"] >= expected_end for s in result.segments.values())

    result = await stream_frames(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                 headers={"Authorization": f"Bearer {uid}"}, until=done)
    assert not result.errors(), result.errors()
    return result.ordered()


def label_agreement(segments: list[dict], turns, key) -> tuple[float, dict]:
    """Share of single-speaker reference time whose segment label maps to the right speaker (best one-to-one
    mapping), on a 10 ms grid."""
    from scipy.optimize import linear_sum_assignment

    counts: dict[tuple, float] = {}
    for seg in segments:
        for t in np.arange(seg["start"], seg["end"], 0.01):
            ref = speaker_at(turns, float(t))
            if ref is not None:
                counts[(key(seg), ref)] = counts.get((key(seg), ref), 0.0) + 0.01
    hyps = sorted({h for h, _ in counts}, key=str)
    refs = sorted({r for _, r in counts})
    m = np.array([[counts.get((h, r), 0.0) for r in refs] for h in hyps])
    rows, cols = linear_sum_assignment(-m)
    ref_total = sum(e - s for s, e, _ in turns)  # noqa: F841 (kept for the message)
    return m[rows, cols].sum() / m.sum(), {str(hyps[r]): refs[c] for r, c in zip(rows, cols, strict=True)}


async def test_live_labels_on_sample_agree_with_rttm(server):
    turns = rttm_turns(DATA / "sample.rttm", "sample")
    segments = await stream_and_collect(server, read_wav(SAMPLE_WAV), "live-user")
    labels = {s["speaker"] for s in segments}
    agreement, mapping = label_agreement(segments, turns, key=lambda s: s["speaker"])
    print(f"sample.wav live speaker agreement: {agreement:.3f} with {len(labels)} labels {mapping}")
    assert all(s["speaker"] == f"SPEAKER_{s['speaker_id']}" for s in segments)
    assert 2 <= len(labels) <= 3, labels
    assert agreement >= 0.8, (agreement, mapping)


def enrol_people_from_trn07(http: httpx.Client) -> dict[str, str]:
    """A person per trn07 speaker with 3 s or more of turns, enrolled from the audio of their turns (as a user
    would upload a recording of them: the server VAD-trims it). Returns speaker → person id."""
    audio, turns = read_wav(AMI / "trn07.wav"), rttm_turns(AMI / "train.rttm", "trn07")
    ids = {}
    for spk in sorted({t[2] for t in turns}):
        pieces = [audio[int(s * SR) : int(e * SR)] for s, e, who in turns if who == spk]
        speech = np.concatenate([np.concatenate([p, np.zeros(SR // 4, np.float32)]) for p in pieces])
        if sum(len(p) for p in pieces) < 3 * SR:
            continue
        person = http.post("/v1/people", json={"name": spk})
        assert person.status_code == 201, person.text
        pid = person.json()["id"]
        r = http.post(f"/v1/people/{pid}/samples", files={"file": ("s.wav", wav_bytes(speech), "audio/wav")})
        assert r.status_code == 200, r.text
        assert r.json()["samples"] >= 1
        ids[spk] = pid
    return ids


def test_people_enrolled_from_trn07_identified_in_trn08(server):
    with client(server, "ami-user") as http:
        ids = enrol_people_from_trn07(http)
        assert set(ids) == {"FEE087", "MEO086"}  # the others speak under 2 s in trn07: too little to enrol
        assert {p["name"] for p in http.get("/v1/people").json()} == set(ids)
        audio, turns = read_wav(AMI / "trn08.wav"), rttm_turns(AMI / "train.rttm", "trn08")
        segments = [(s, e, spk) for s, e, spk in turns if e - s >= 1.0]
        r = http.post("/v1/speaker-identification",
                      files={"audio_file": ("trn08.wav", wav_bytes(audio), "audio/wav")},
                      data={"segments": json.dumps([{"start": s, "end": e, "text": "x"} for s, e, _ in segments])})
        assert r.status_code == 200, r.text
        answers = r.json()
    assert len(answers) == len(segments)
    for a, (s, e, spk) in zip(answers, segments, strict=True):
        print(f"{s:7.2f}-{e:7.2f} {spk}: {a}")
    recall, precision, named = identification_scores(answers, [spk for _, _, spk in segments], ids)
    print(f"trn07 → trn08: recall {recall:.3f} over the enrolled people's turns, precision {precision:.3f} "
          f"over {named} answers naming a person")
    assert not any(a["is_user"] for a in answers)
    # Recall on these overlapped turns is poor today (issue 14 targets >= 0.9 on 1-5 s turns); the floor makes an
    # identifier that never names anyone fail, and a wrong name costs precision.
    assert recall >= 0.3 and precision >= 0.75, answers


def identification_scores(answers: list[dict], speakers: list[str], ids: dict[str, str]) -> tuple[float, float, int]:
    """(recall over the turns of enrolled speakers, precision over the answers that name a person, how many named
    one). Scored apart, so that answering "nobody" everywhere (right on every stranger's turn) scores zero recall."""
    enrolled = [(a, spk) for a, spk in zip(answers, speakers, strict=True) if spk in ids]
    found = sum(a["person_id"] == ids[spk] for a, spk in enrolled)
    named = [(a, spk) for a, spk in zip(answers, speakers, strict=True) if a["person_id"] is not None]
    precision = sum(a["person_id"] == ids.get(spk) for a, spk in named) / len(named) if named else 0.0
    return (found / len(enrolled) if enrolled else 0.0), precision, len(named)


async def test_user_profile_flow_on_sample(server):
    """The user (speaker90 of sample.wav) enrols with /v3/upload-audio; their live segments come back is_user."""
    audio, turns = read_wav(SAMPLE_WAV), rttm_turns(DATA / "sample.rttm", "sample")
    speech = single_speaker_audio(audio, turns, "speaker90")
    with client(server, "profile-user") as http:
        r = http.post("/v3/upload-audio", files={"file": ("me.wav", wav_bytes(speech), "audio/wav")})
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "user" and r.json()["speech_seconds"] >= 5
        assert http.get("/v1/speech-profile").json()["id"] == r.json()["id"]
    segments = await stream_and_collect(server, audio, "profile-user")
    agreement, _ = label_agreement(segments, turns, key=lambda s: s["is_user"])
    user_time = {True: 0.0, False: 0.0}
    for seg in segments:
        user_time[seg["is_user"]] += seg["end"] - seg["start"]
    print(f"sample.wav is_user agreement: {agreement:.3f} ({user_time})")
    assert user_time[True] > 0 and agreement >= 0.75


def test_profile_api_errors_and_isolation(server):
    with client(server, "alice") as alice, client(server, "bob") as bob:
        short = wav_bytes(read_wav(SAMPLE_WAV)[7 * SR : 9 * SR])
        r = alice.post("/v1/speech-profile", files={"file": ("short.wav", short, "audio/wav")})
        assert r.status_code == 422 and "at least 5" in r.json()["detail"]
        assert alice.post("/v1/speech-profile", files={"file": ("x.wav", b"not audio", "audio/wav")}).status_code == 415
        assert alice.get("/v1/speech-profile").status_code == 404
        pid = alice.post("/v1/people", json={"name": "Carol"}).json()["id"]
        assert alice.post("/v1/people", json={"name": ""}).status_code == 422
        # Bob sees none of Alice's people and cannot touch them.
        assert bob.get("/v1/people").json() == []
        assert bob.get(f"/v1/people/{pid}").status_code == 404
        assert bob.delete(f"/v1/people/{pid}").status_code == 404
        assert bob.post(f"/v1/people/{pid}/samples", files={"file": ("s.wav", short, "audio/wav")}).status_code == 404
        assert alice.get(f"/v1/people/{pid}").json()["name"] == "Carol"
        assert alice.delete(f"/v1/people/{pid}").status_code == 204
        assert alice.get(f"/v1/people/{pid}").status_code == 404
        # ?uid= is for the admin key only
        r = alice.post("/v1/speaker-identification?uid=bob", files={"audio_file": ("s.wav", short, "audio/wav")},
                       data={"segments": "[]"})
        assert r.status_code == 403
        r = alice.post("/v1/speaker-identification", files={"audio_file": ("s.wav", short, "audio/wav")},
                       data={"segments": "{bad json"})
        assert r.status_code == 422
    assert httpx.get(f"{server.http}/v1/people").status_code == 401


def test_short_and_silent_segments_are_unknown(server):
    """Too short, silent and past-the-end segments are nobody; beside them, in the same request, a long turn of an
    enrolled person is named (so an identifier that always answers "nobody" fails here)."""
    with client(server, "ami-user-2") as http:
        ids = enrol_people_from_trn07(http)
        audio = np.concatenate([read_wav(AMI / "trn08.wav"), np.zeros(3 * SR, np.float32)])
        spans = [{"start": 30.5, "end": 32.5}, {"start": 10.0, "end": 10.3}, {"start": 40.0, "end": 41.0},
                 {"start": 5.04, "end": 8.61}]  # the last: FEE087's turn, found in the trn08 test above
        r = http.post("/v1/speaker-identification", files={"audio_file": ("a.wav", wav_bytes(audio), "audio/wav")},
                      data={"segments": json.dumps(spans)})
        assert r.status_code == 200, r.text
        assert r.json() == [{"is_user": False, "person_id": None}] * 3 + [
            {"is_user": False, "person_id": ids["FEE087"]}]


async def test_speaker_assigned_names_a_cluster_and_enrols_its_voice(server):
    """Omi's `speaker_assigned`: the cluster's segments come back with the person, for the rest of the
    conversation, and the person's profile gains the cluster's voice."""
    import asyncio

    from websockets.asyncio.client import connect

    with client(server, "assign-user") as http:
        bob = http.post("/v1/people", json={"name": "Bob"}).json()["id"]
    frames = pcm16_frames(read_wav(SAMPLE_WAV)[: 20 * SR])
    segments: dict[str, dict] = {}
    errors: list[dict] = []
    async with connect(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                       additional_headers={"Authorization": "Bearer assign-user"}) as ws:

        async def read() -> None:
            async for message in ws:
                if message == "ping":
                    continue
                payload = json.loads(message)
                if isinstance(payload, list):
                    segments.update({s["id"]: s for s in payload})
                elif payload.get("type") == "error":
                    errors.append(payload)

        reader = asyncio.create_task(read())
        for f in frames:
            await ws.send(f)
        for _ in range(100):
            if any(s["end"] > 15 for s in segments.values()):
                break
            await asyncio.sleep(0.1)
        target = max(segments.values(), key=lambda s: s["end"] - s["start"])["speaker_id"]
        await ws.send(json.dumps({"type": "speaker_assigned", "speaker_id": 99, "person_id": bob}))
        await ws.send(json.dumps({"type": "speaker_assigned", "speaker_id": target, "person_id": "nobody"}))
        mine = [i for i, s in segments.items() if s["speaker_id"] == target]
        await ws.send(json.dumps({"type": "speaker_assigned", "speaker_id": target, "person_id": bob,
                                  "person_name": "Bob", "segment_ids": mine}))
        for _ in range(100):
            tagged = [s for s in segments.values() if s["speaker_id"] == target]
            if tagged and all(s["person_id"] == bob for s in tagged):
                break
            await asyncio.sleep(0.1)
        await ws.close()
        await asyncio.wait_for(reader, 10)
    tagged = [s for s in segments.values() if s["speaker_id"] == target]
    assert tagged and all(s["person_id"] == bob and not s["is_user"] for s in tagged)
    assert all(segments[i]["person_id"] == bob for i in mine)  # the segments the user tagged
    # The rest: a segment the client listed may have changed speaker meanwhile, so only those it did not list.
    assert all(s["person_id"] is None for i, s in segments.items() if s["speaker_id"] != target and i not in mine)
    assert errors == []  # Omi never answers speaker_assigned with an error: unknown speakers and people are ignored
    with client(server, "assign-user") as http:
        assert http.get(f"/v1/people/{bob}").json()["samples"] > 0
