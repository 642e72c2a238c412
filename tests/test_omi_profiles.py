"""The speech-profile and people REST at the Omi app's paths and shapes, and Omi's backend as an internal caller of
`/v1/speaker-identification`, against real server processes with real speech.

Two servers: one with ADMIN_KEY and INTERNAL_NETWORKS=127.0.0.0/8 (every test client is internal by address), one
with ADMIN_KEY and INTERNAL_API_KEY (internal only with the key). Users authenticate with the admin key in Omi's
current form, `Bearer <ADMIN_KEY><uid>`, on the first server and in the bare form on the second."""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.parse
from datetime import datetime

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import AMI, DATA, SAMPLE_WAV, read_wav, start_server, stop_server
from test_speakers import enrol_people_from_trn07, rttm_turns, single_speaker_audio, speaker_at, wav_bytes

SR = 16000
ADMIN_KEY = "omi-admin-5b2f8c1d9e-7a3e0b6d4c2f18"
INTERNAL_KEY = "omi-internal-3c7a1f"


# --- the app's Person.fromJson, ported --------------------------------------------------------------------------

# Dart's DateTime.parse grammar (sdk/lib/core/date_time.dart `_parseFormat`).
_DART_DATE = re.compile(r"^([+-]?\d{4,6})-?(\d\d)-?(\d\d)(?:[ T](\d\d)(?::?(\d\d)(?::?(\d\d)(?:[.,](\d+))?)?)?"
                        r"( ?[zZ]| ?([-+])(\d\d)(?::?(\d\d))?)?)?$")


def dart_datetime_parse(value) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"DateTime.parse needs a String, got {type(value).__name__}")
    m = _DART_DATE.match(value)
    if m is None:
        raise ValueError(f"Invalid date format {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))


def _as(value, kind: type, field: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{field}: expected {kind.__name__}, got {value!r}")
    return value


def person_from_json(j: dict) -> dict:
    """Both of the app's parsers: the 2024 `Person.fromJson` (`json['id']` into a String, `DateTime.parse(
    json['created_at'])`, `List<String>.from(json['speech_samples'])`, `json['color_idx']` into an int?), and the
    2026 one (`GeneratedPerson.fromJson` + `fromGenerated`: id and name required, created_at and updated_at required
    and parseable, speech_samples_version an int, 3 when absent). Raises on anything either would throw on."""
    out = {"id": _as(j.get("id"), str, "id"), "name": _as(j.get("name"), str, "name"),
           "created_at": dart_datetime_parse(j.get("created_at")),
           "updated_at": dart_datetime_parse(j.get("updated_at"))}
    samples = j.get("speech_samples")
    out["speech_samples"] = [_as(s, str, "speech_samples[]") for s in _as(samples, list, "speech_samples")] \
        if samples is not None else []
    if j.get("color_idx") is not None:
        _as(j["color_idx"], int, "color_idx")
    transcripts = j.get("speech_sample_transcripts")
    if transcripts is not None:
        _as(transcripts, list, "speech_sample_transcripts")
    version = j.get("speech_samples_version", 3)
    out["speech_samples_version"] = _as(version, int, "speech_samples_version")
    return out


def test_person_from_json_port_rejects_what_the_app_rejects():
    good = {"id": "p", "name": "A", "created_at": "2026-01-02T03:04:05.123456Z",
            "updated_at": "2026-01-02T03:04:05+00:00", "speech_samples": [], "speech_samples_version": 3}
    assert person_from_json(good)["name"] == "A"
    for broken in ({"created_at": None}, {"updated_at": 12}, {"created_at": "yesterday"}, {"id": 5},
                   {"name": None}, {"speech_samples": ["a", 1]}, {"speech_samples": "a"},
                   {"speech_samples_version": "3"}):
        with pytest.raises((TypeError, ValueError)):
            person_from_json({**good, **broken})


# --- servers and clients ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("omi-net")
    server = start_server(workdir, ADMIN_KEY=ADMIN_KEY, INTERNAL_NETWORKS="127.0.0.0/8")
    server.data_dir = workdir / "data"  # type: ignore[attr-defined]
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def key_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("omi-key"), ADMIN_KEY=ADMIN_KEY, INTERNAL_API_KEY=INTERNAL_KEY)
    yield server
    stop_server(server)


def omi_client(server, uid: str) -> httpx.Client:
    """As the app authenticates, with the admin key in Omi's current form."""
    return httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {ADMIN_KEY}{uid}"}, timeout=120)


def bare_client(server, uid: str) -> httpx.Client:
    return httpx.Client(base_url=server.http, headers={"Authorization": f"{ADMIN_KEY}{uid}"}, timeout=120)


def wav16(audio: np.ndarray, rate: int = SR, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def upload(http: httpx.Client, data: bytes, path: str = "/v3/upload-audio") -> httpx.Response:
    return http.post(path, files={"file": ("profile.wav", data, "audio/wav")})


def detail_of(r: httpx.Response) -> str:
    body = r.json()
    assert isinstance(body.get("detail"), str | list), body
    return json.dumps(body["detail"])


def speaker90_speech() -> np.ndarray:
    audio, turns = read_wav(SAMPLE_WAV), rttm_turns(DATA / "sample.rttm", "sample")
    return single_speaker_audio(audio, turns, "speaker90")


# --- people ----------------------------------------------------------------------------------------------------


def test_people_at_omi_paths_parse_in_the_app(net_server):
    with omi_client(net_server, "people-a") as a, omi_client(net_server, "people-b") as b:
        r = a.post("/v1/users/people", json={"name": "Carol"})
        assert r.status_code == 200, r.text
        carol = person_from_json(r.json())
        assert carol["name"] == "Carol" and carol["speech_samples"] == [] and carol["speech_samples_version"] == 3
        again = a.post("/v1/users/people", json={"name": "Carol"})  # Omi: idempotent by name
        assert again.status_code == 200 and again.json()["id"] == carol["id"]
        for bad in ({"name": "C"}, {"name": "x" * 41}, {"name": "  "}, {}, {"name": 5}):
            r = a.post("/v1/users/people", json=bad)
            assert r.status_code == 422 and detail_of(r), (bad, r.text)
        ours = a.post("/v1/people", json={"name": "Dave"}).json()["id"]  # our path: the same people
        listed = a.get("/v1/users/people", params={"include_speech_samples": "true"})
        assert listed.status_code == 200
        people = [person_from_json(p) for p in listed.json()]
        assert {p["name"] for p in people} == {"Carol", "Dave"} and {p["id"] for p in people} == {carol["id"], ours}
        single = a.get(f"/v1/users/people/{carol['id']}", params={"include_speech_samples": "false"})
        assert single.status_code == 200 and person_from_json(single.json())["id"] == carol["id"]

        r = a.patch(f"/v1/users/people/{carol['id']}/name", params={"value": "Caroline"})
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        renamed = person_from_json(a.get(f"/v1/users/people/{carol['id']}").json())
        assert renamed["name"] == "Caroline" and renamed["updated_at"] >= renamed["created_at"]
        assert a.get("/v1/people").json()[0]["name"] in {"Caroline", "Dave"}
        for params in ({"value": ""}, {"value": "x" * 41}, {}):
            r = a.patch(f"/v1/users/people/{carol['id']}/name", params=params)
            assert r.status_code == 422 and detail_of(r)
        r = a.patch("/v1/users/people/nobody/name", params={"value": "Zed"})
        assert r.status_code == 404 and r.json()["detail"] == "Person not found"
        assert a.get("/v1/users/people/" + "x" * 300).status_code == 404
        r = a.delete(f"/v1/users/people/{carol['id']}/speech-samples/0")
        assert r.status_code == 404 and r.json()["detail"]

        # Another user sees none of them and changes nothing.
        assert b.get("/v1/users/people").json() == []
        assert b.get(f"/v1/users/people/{carol['id']}").status_code == 404
        assert b.patch(f"/v1/users/people/{carol['id']}/name", params={"value": "Mallory"}).status_code == 404
        assert b.delete(f"/v1/users/people/{carol['id']}").status_code == 204  # Omi: 204 for any id
        assert a.get(f"/v1/users/people/{carol['id']}").json()["name"] == "Caroline"

        assert a.delete(f"/v1/users/people/{carol['id']}").status_code == 204
        assert a.delete(f"/v1/users/people/{carol['id']}").status_code == 204
        r = a.get(f"/v1/users/people/{carol['id']}")
        assert r.status_code == 404 and r.json()["detail"] == "Person not found"
        assert [p["id"] for p in a.get("/v1/users/people").json()] == [ours]
    assert httpx.get(f"{net_server.http}/v1/users/people").status_code == 401  # internal by address: not for this


# --- the user's own voice ----------------------------------------------------------------------------------------


def test_upload_audio_returns_a_url_to_the_trimmed_speech(net_server):
    speech = speaker90_speech()
    silence = np.zeros(3 * SR, np.float32)
    recording = np.concatenate([silence, speech[: 40 * SR], silence])  # 46 s or less, 6 s of it silence
    profiles = net_server.data_dir / "speech_profiles"
    with omi_client(net_server, "voice-user") as http, omi_client(net_server, "other-user") as other:
        assert http.get("/v3/speech-profile").json() == {"has_profile": False}
        assert http.get("/v4/speech-profile").json() == {"url": None}
        r = upload(http, wav16(recording))
        assert r.status_code == 200, r.text
        body = r.json()
        url = body["url"]
        assert url.startswith(f"{net_server.http}/v4/speech-profile/audio?token=")
        assert body["kind"] == "user" and 5 < body["speech_seconds"] < len(recording) / SR - 4

        # The app plays the url as it is, with no credentials.
        audio = httpx.get(url, timeout=30)
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
        info = sf.info(io.BytesIO(audio.content))
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert abs(info.frames / SR - body["speech_seconds"]) < 0.05
        played, _ = sf.read(io.BytesIO(audio.content), dtype="float32")
        assert np.sqrt(np.mean(played**2)) > 0.01  # speech, not silence

        # Kept under DATA_DIR/speech_profiles, named by a hash of the uid, never the uid.
        files = sorted(p.name for p in profiles.glob("*.wav"))
        assert files == [hashlib.sha256(b"omi-speech-profile\0voice-user").hexdigest() + ".wav"]
        assert not any("voice-user" in p.name for p in profiles.iterdir())

        assert http.get("/v3/speech-profile").json() == {"has_profile": True}
        url2 = http.get("/v4/speech-profile").json()["url"]
        assert url2.startswith(f"{net_server.http}/v4/speech-profile/audio?token=")
        status = http.get("/v3/speech-profile/status").json()
        assert status["has_profile"] and status["url"] and status["duration_seconds"] == body["speech_seconds"]
        assert http.get("/v1/speech-profile").json()["id"] == body["id"]
        assert http.get("/v4/speech-profile/audio").content == audio.content  # the owner's credentials work too
        assert other.get("/v4/speech-profile/audio").status_code == 404  # their own: none
        assert other.get("/v3/speech-profile").json() == {"has_profile": False}

        token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
        key, expires, signature = token.split(".")
        for forged in (f"{key}.{int(expires) + 1}.{signature}", f"{key}.{expires}.{'0' * 64}",
                       f"{'a' * 64}.{expires}.{signature}", "garbage", f"{key}.1.{signature}"):
            r = httpx.get(f"{net_server.http}/v4/speech-profile/audio", params={"token": forged})
            assert r.status_code == 403 and r.json()["detail"], forged
        assert httpx.get(f"{net_server.http}/v4/speech-profile/audio").status_code == 401

        # Deleting the profile deletes the audio.
        assert http.delete("/v1/speech-profile").status_code == 204
        assert list(profiles.glob("*.wav")) == []
        assert http.get("/v3/speech-profile").json() == {"has_profile": False}
        assert http.get("/v4/speech-profile").json() == {"url": None}
        assert httpx.get(url).status_code == 404


def test_our_speech_profile_path_keeps_its_rules_and_keeps_the_audio(net_server):
    speech = speaker90_speech()
    with omi_client(net_server, "v1-user") as http:
        r = upload(http, wav16(speech[: 2 * SR]), "/v1/speech-profile")
        assert r.status_code == 422 and "at least 5" in r.json()["detail"]
        r = upload(http, wav16(speech[: 30 * SR]), "/v1/speech-profile")
        assert r.status_code == 200 and "url" not in r.json() and r.json()["kind"] == "user"
        url = http.get("/v4/speech-profile").json()["url"]
        assert url and httpx.get(url).status_code == 200
        assert http.delete("/v1/speech-profile").status_code == 204
        assert http.delete("/v1/speech-profile").status_code == 404


def test_upload_audio_refusals_are_400_with_detail(net_server):
    speech = speaker90_speech()
    cases = {
        "not audio": (b"RIFF not really a wav file", "Invalid audio file"),
        "empty": (b"", "Invalid audio file"),
        "flac": (wav16(speech[: 10 * SR], fmt="FLAC"), "Invalid audio file"),
        "8 kHz": (wav16(speech[: 10 * SR : 2], rate=8000), "sample rate"),
        "too short": (wav16(speech[: 4 * SR]), "duration is invalid"),
        "too long": (wav16(np.resize(speech, 181 * SR)), "duration is invalid"),
        "silence": (wav16(np.zeros(8 * SR, np.float32)), "Audio is empty"),
        "too little speech": (wav16(np.concatenate([speech[: SR], np.zeros(6 * SR, np.float32)])), "speech|empty"),
    }
    with omi_client(net_server, "refused-user") as http:
        for name, (data, expected) in cases.items():
            r = upload(http, data)
            assert r.status_code == 400, (name, r.status_code, r.text)
            assert re.search(expected, r.json()["detail"]), (name, r.text)
        assert http.post("/v3/upload-audio").status_code == 422  # no file at all
        assert http.get("/v3/speech-profile").json() == {"has_profile": False}
    assert httpx.post(f"{net_server.http}/v3/upload-audio",
                      files={"file": ("p.wav", wav16(speech[: 10 * SR]), "audio/wav")}).status_code == 401


def test_expand_samples_are_honestly_empty(net_server):
    with omi_client(net_server, "expand-user") as http:
        assert http.get("/v3/speech-profile/expand").json() == []
        assert http.get("/v3/speech-profile/expand", params={"person_id": "p1"}).json() == []
        r = http.delete("/v3/speech-profile/expand", params={"memory_id": "m1", "segment_idx": 0, "person_id": "null"})
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = http.delete("/v3/speech-profile/expand", params={"memory_id": "m1"})
        assert r.status_code == 422 and detail_of(r)


# --- Omi's backend as an internal caller of /v1/speaker-identification ------------------------------------------


def identify(server, uid: str | None, audio: np.ndarray, spans, headers: dict[str, str] | None = None):
    url = f"{server.http}/v1/speaker-identification" + (f"?uid={uid}" if uid is not None else "")
    return httpx.post(url, headers=headers or {}, timeout=120,
                      files={"audio_file": ("a.wav", wav_bytes(audio), "audio/wav")},
                      data={"segments": json.dumps([{"start": s, "end": e, "text": "x"} for s, e in spans])})


def test_internal_network_caller_identifies_people_for_a_uid(net_server):
    with omi_client(net_server, "ami-net") as http:
        ids = enrol_people_from_trn07(http)
    assert set(ids) == {"FEE087", "MEO086"}
    audio, turns = read_wav(AMI / "trn08.wav"), rttm_turns(AMI / "train.rttm", "trn08")
    segments = [(s, e, spk) for s, e, spk in turns if e - s >= 1.0]
    r = identify(net_server, "ami-net", audio, [(s, e) for s, e, _ in segments])  # no Authorization: as Omi
    assert r.status_code == 200, r.text
    answers = r.json()
    right = sum(a["person_id"] == ids.get(spk) and not a["is_user"] for a, (_, _, spk) in zip(answers, segments,
                                                                                                  strict=True))
    enrolled = [(a, spk) for a, (_, _, spk) in zip(answers, segments, strict=True) if spk in ids]
    found = sum(a["person_id"] == ids[spk] for a, spk in enrolled)
    print(f"internal caller, trn07 → trn08: {right}/{len(segments)} right, {found}/{len(enrolled)} enrolled found")
    assert right / len(segments) >= 0.6, answers
    assert found >= 1, answers  # most turns are strangers': an identifier answering "nobody" must still fail
    # Someone else's uid finds none of these people.
    assert all(a["person_id"] is None for a in identify(net_server, "stranger", audio, [(s, e) for s, e, _ in
                                                                                       segments]).json())
    # The rules for callers with credentials are unchanged.
    assert identify(net_server, None, audio, [(0, 1)]).status_code == 400  # internal, but whose profiles?
    assert identify(net_server, "bad/uid", audio, [(0, 1)]).status_code == 400
    user = {"Authorization": f"Bearer {ADMIN_KEY[:-1]}xuser"}
    assert identify(net_server, "ami-net", audio, [(0, 1)], headers=user).status_code == 401  # a bad header counts
    with omi_client(net_server, "someone") as http:
        r = http.post("/v1/speaker-identification?uid=ami-net", data={"segments": "[]"},
                      files={"audio_file": ("a.wav", wav_bytes(audio[: SR]), "audio/wav")})
        assert r.status_code == 200  # the admin key (Bearer form) may name a uid


def test_internal_key_caller_identifies_the_user(key_server):
    audio, turns = read_wav(SAMPLE_WAV), rttm_turns(DATA / "sample.rttm", "sample")
    with bare_client(key_server, "key-user") as http:  # the bare admin form still works
        r = upload(http, wav16(speaker90_speech()[:60 * SR]))
        assert r.status_code == 200, r.text
    spans = [(s, e) for s, e, _ in turns if e - s >= 1.5]
    internal = {"X-Internal-Key": INTERNAL_KEY}
    r = identify(key_server, "key-user", audio, spans, headers=internal)
    assert r.status_code == 200, r.text
    right = sum(a["is_user"] == (speaker_at(turns, (s + e) / 2) == "speaker90") and a["person_id"] is None
                for a, (s, e) in zip(r.json(), spans, strict=True))
    mine = [a["is_user"] for a, (s, e) in zip(r.json(), spans, strict=True)
            if speaker_at(turns, (s + e) / 2) == "speaker90"]
    print(f"internal key caller, sample.wav is_user: {right}/{len(spans)} right, {sum(mine)}/{len(mine)} of the "
          "user's found")
    assert right / len(spans) >= 0.7, r.json()
    assert any(mine), r.json()  # an identifier answering "not the user" must fail
    # Not internal: no key, a wrong key, or a key with a bad Authorization header.
    for headers in ({}, {"X-Internal-Key": INTERNAL_KEY + "x"}, {"X-Internal-Key": ""},
                    {**internal, "Authorization": "Bearer nobody"}):
        r = identify(key_server, "key-user", audio[: 2 * SR], [(0, 1)], headers=headers)
        assert r.status_code == 401 and INTERNAL_KEY not in r.text, (headers, r.text)
    # The key is for speaker identification only.
    assert httpx.get(f"{key_server.http}/v3/speech-profile", headers=internal).status_code == 401
    # /v1/vad: Omi's backend calls it without user credentials, so with auth configured it must be the internal caller.
    files = {"file": ("a.wav", wav_bytes(audio[: 5 * SR]), "audio/wav")}
    assert httpx.post(f"{key_server.http}/v1/vad", files=files).status_code == 401
    vad = httpx.post(f"{key_server.http}/v1/vad", files=files, headers=internal)
    assert vad.status_code == 200 and isinstance(vad.json(), list)


def test_no_internal_configuration_means_401(local_server):
    """A server with neither INTERNAL_API_KEY nor INTERNAL_NETWORKS: Omi's backend gets 401 (and so no speakers)."""
    r = identify(local_server, "anyone", np.zeros(SR, np.float32), [(0, 1)], headers={"X-Internal-Key": "guess"})
    assert r.status_code == 401 and r.json()["detail"]
