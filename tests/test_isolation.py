"""No user can read or write another user's data: a real `uvicorn server:app` process, real speech, real streams.

Auth is the production shape: `ADMIN_KEY` set and Firebase ID tokens verified by firebase-admin, so every uid comes
from a verified credential (a bare `Bearer <uid>` is refused). The tokens are Firebase Auth *emulator* tokens
(`FIREBASE_AUTH_EMULATOR_HOST`): firebase-admin then checks project, issuer, audience and subject but not the
signature (Google's keys need the network). Nothing contacts the emulator host.

User B owns a speech profile (speaker90 of sample.wav), a person (speaker91) and a conversation streamed through
`/v4/listen` with the local STT backend; user A owns a person of their own. A tries every user-data route against
B's ids; each answer must be 404 with a JSON `detail` (the same answer as for an id that never existed, so ids do
not leak), and B's data, re-read as B, must be unchanged. The conversations part also runs on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid

import asyncpg
import httpx
import numpy as np
import pytest
from conftest import (
    DATA,
    PG_ADMIN,
    SAMPLE_WAV,
    fresh_postgres_database,
    pcm16_frames,
    read_wav,
    silence_frames,
    start_server,
    stop_server,
    stream_frames,
)
from test_speakers import rttm_turns, single_speaker_audio, wav_bytes

SR = 16000
PROJECT = "isolation-test"
ADMIN_KEY = "iso-admin-4f9c2e7b1d-8a0c6e2f4b1d3e5a"
A, B, D = "user-a", "user-b", "user-d"
LISTEN = "/v4/listen?codec=pcm16&sample_rate=16000&conversation_timeout=3600"  # no sweep closes it mid-test

# Every HTTP operation the app serves, by who may use it. A new route fails test_every_route_is_classified until it
# is added here (and, if it touches user data, to the isolation tests below).
USER_ROUTES = {
    ("POST", "/v1/speaker-identification"),
    ("POST", "/v1/speech-profile"),
    ("POST", "/v3/upload-audio"),
    ("GET", "/v1/speech-profile"),
    ("DELETE", "/v1/speech-profile"),
    ("POST", "/v1/people"),
    ("GET", "/v1/people"),
    ("GET", "/v1/people/{person_id}"),
    ("POST", "/v1/people/{person_id}/samples"),
    ("DELETE", "/v1/people/{person_id}"),
    ("GET", "/v1/conversations"),
    ("GET", "/v1/conversations/{conversation_id}"),
    ("DELETE", "/v1/conversations/{conversation_id}"),
    ("POST", "/v1/conversations"),  # these two's isolation: test_conversation_wire.py
    ("PATCH", "/v1/conversations/{conversation_id}/segments/assign-bulk"),
    # Omi's paths for people and the speech profile (their isolation: test_omi_profiles.py)
    ("GET", "/v1/users/people"),
    ("POST", "/v1/users/people"),
    ("GET", "/v1/users/people/{person_id}"),
    ("PATCH", "/v1/users/people/{person_id}/name"),
    ("DELETE", "/v1/users/people/{person_id}"),
    ("DELETE", "/v1/users/people/{person_id}/speech-samples/{sample_index}"),
    ("GET", "/v3/speech-profile"),
    ("GET", "/v3/speech-profile/status"),
    ("GET", "/v3/speech-profile/expand"),
    ("DELETE", "/v3/speech-profile/expand"),
    ("GET", "/v4/speech-profile"),
    ("GET", "/v4/speech-profile/audio"),
    # developer webhooks and notification settings at Omi's paths (isolation: test_a_cannot_read_or_change_b_settings)
    ("POST", "/v1/users/developer/webhook/{wtype}"),
    ("GET", "/v1/users/developer/webhook/{wtype}"),
    ("POST", "/v1/users/developer/webhook/{wtype}/enable"),
    ("POST", "/v1/users/developer/webhook/{wtype}/disable"),
    ("GET", "/v1/users/developer/webhooks/status"),
    ("POST", "/v1/users/developer/webhook-signing-secret"),
    ("GET", "/v1/users/developer/webhook-signing-secret"),
    ("DELETE", "/v1/users/developer/webhook-signing-secret"),
    ("POST", "/v1/users/fcm-token"),
    ("GET", "/v1/users/daily-summary-settings"),
    ("PATCH", "/v1/users/daily-summary-settings"),
}
ADMIN_ROUTES = {("GET", "/v1/jobs")}
PUBLIC_ROUTES = {("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")}  # no credentials, no user data
CALLER_ROUTES = {("POST", "/v1/vad")}  # any verified caller (a user, the admin key, the internal caller); no user data
# Deepgram's prerecorded API: any verified user, nothing read or stored; refusals in Deepgram's error shape.
DEEPGRAM_ROUTES = {("POST", "/v1/listen")}


# --- credentials ---------------------------------------------------------------------------------------------------


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def id_token(uid: str, project: str = PROJECT) -> str:
    """A Firebase Auth emulator ID token (unsigned, as the emulator issues them) for `uid`."""
    now = int(time.time())
    claims = {"iss": f"https://securetoken.google.com/{project}", "aud": project, "sub": uid, "user_id": uid,
              "iat": now, "auth_time": now, "exp": now + 3600, "firebase": {"sign_in_provider": "password"}}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


def bearer(uid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {id_token(uid)}"}


def client(server, uid: str | None = None, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=server.http, headers=headers if headers is not None else bearer(uid), timeout=120)


def assert_not_found(r: httpx.Response) -> dict:
    assert r.status_code == 404, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body


# --- audio -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voices() -> dict[str, bytes]:
    audio, turns = read_wav(SAMPLE_WAV), rttm_turns(DATA / "sample.rttm", "sample")
    return {"speaker90": wav_bytes(single_speaker_audio(audio, turns, "speaker90")),
            "speaker91": wav_bytes(single_speaker_audio(audio, turns, "speaker91"))}


def wav_file(data: bytes) -> dict:
    return {"file": ("voice.wav", data, "audio/wav")}


# --- servers ---------------------------------------------------------------------------------------------------------


def server_env(**extra: str) -> dict[str, str]:
    return {"ADMIN_KEY": ADMIN_KEY, "FIREBASE_PROJECT_ID": PROJECT, "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9",
            "STT_BACKEND": "local", **extra}


async def stream_speech(server, uid: str, audio: np.ndarray, commands: tuple[str, ...] = (),
                       path: str = LISTEN) -> object:
    """Streams `audio` (then 1 s of silence, then `commands`) as `uid` until the last speech comes back."""
    frames = pcm16_frames(np.concatenate([audio, np.zeros(SR, np.float32)]))
    expected_end = len(audio) / SR - 3.0

    def done(result) -> bool:
        return any(s["end"] >= expected_end for s in result.segments.values()) and (
            not commands or bool(result.errors()))

    return await stream_frames(f"{server.ws}{path}", [*frames, *commands], headers=bearer(uid), until=done,
                               timeout_s=60)


def settled_conversation(http: httpx.Client, conversation_id: str) -> dict:
    """The stored conversation once the server has finished the audio it got (two equal reads in a row)."""
    last = None
    for _ in range(60):
        r = http.get(f"/v1/conversations/{conversation_id}")
        assert r.status_code == 200, r.text
        if r.json() == last:
            return last
        last = r.json()
        time.sleep(0.5)
    raise AssertionError("conversation did not settle")


def owner_conversation(server, uid: str) -> tuple[str, dict]:
    """Streams 14 s of real speech as `uid` (a conversation with a transcript); its id and stored form."""
    result = asyncio.run(stream_speech(server, uid, read_wav(SAMPLE_WAV)[5 * SR : 19 * SR]))
    assert result.segments and not result.errors(), result.events
    with client(server, uid) as http:
        listed = http.get("/v1/conversations").json()
        assert len(listed) == 1, listed
        cid = listed[0]["id"]
        stored = settled_conversation(http, cid)
    assert stored["transcript_segments"], stored
    return cid, stored


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start_server(tmp_path_factory.mktemp("isolation"), **server_env())
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def world(server, voices) -> dict:
    """B's profile, person and conversation, and A's own person; ids and B's data as B reads it."""
    with client(server, B) as b, client(server, A) as a:
        r = b.post("/v3/upload-audio", files=wav_file(voices["speaker90"]))
        assert r.status_code == 200, r.text
        carol = b.post("/v1/people", json={"name": "Carol"}).json()["id"]
        r = b.post(f"/v1/people/{carol}/samples", files=wav_file(voices["speaker91"]))
        assert r.status_code == 200, r.text
        dave = a.post("/v1/people", json={"name": "Dave"}).json()["id"]
    cid, _ = owner_conversation(server, B)
    return {"carol": carol, "dave": dave, "conversation": cid, "snapshot": snapshot(server, B, cid)}


def snapshot(server, uid: str, conversation_id: str | None = None) -> dict:
    """Everything `uid` can read of their own data."""
    with client(server, uid) as http:
        people = http.get("/v1/people").json()
        out = {"profile": http.get("/v1/speech-profile").json(), "people": people,
               "each": [http.get(f"/v1/people/{p['id']}").json() for p in people],
               "conversations": http.get("/v1/conversations").json()}
        if conversation_id:
            out["conversation"] = http.get(f"/v1/conversations/{conversation_id}").json()
    return out


def assert_b_unchanged(server, world) -> None:
    assert snapshot(server, B, world["conversation"]) == world["snapshot"]


# --- the tests -------------------------------------------------------------------------------------------------------


def test_every_route_is_classified(server):
    paths = httpx.get(f"{server.http}/openapi.json").json()["paths"]
    served = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    known = USER_ROUTES | ADMIN_ROUTES | PUBLIC_ROUTES | CALLER_ROUTES | DEEPGRAM_ROUTES
    assert served == known, served ^ known


@pytest.mark.parametrize("credential", ["none", "bare-uid", "other-project", "admin-lookalike"])
def test_deepgram_prerecorded_refuses_unverified_credentials(server, world, voices, credential):
    headers = {
        "none": {},
        "bare-uid": {"Authorization": f"Token {B}"},
        "other-project": {"Authorization": f"Token {id_token(B, project='someone-else')}"},
        "admin-lookalike": {"Authorization": "Token " + ADMIN_KEY[:-1] + "X" + B},
    }[credential]
    r = httpx.post(f"{server.http}/v1/listen", content=voices["speaker90"],
                   headers={**headers, "Content-Type": "audio/wav"}, timeout=60)
    assert r.status_code == 401, (r.status_code, r.text)
    assert ADMIN_KEY not in r.text and B not in r.text
    assert_b_unchanged(server, world)


def _call(http: httpx.Client, method: str, path: str, voice: bytes, ids: dict) -> httpx.Response:
    url = path.format(person_id=ids["carol"], conversation_id=ids["conversation"], sample_index=0,
                      wtype="realtime_transcript")
    if path == "/v1/speaker-identification":
        return http.post(url, files={"audio_file": ("a.wav", voice, "audio/wav")}, data={"segments": "[]"})
    if method == "POST" and path == "/v1/people":
        return http.post(url, json={"name": "Mallory"})
    if method == "POST":
        return http.post(url, files=wav_file(voice))
    return http.request(method, url)


@pytest.mark.parametrize("credential", ["none", "bare-uid", "other-project", "admin-lookalike", "empty-bearer"])
def test_user_routes_refuse_missing_or_unverified_credentials(server, world, voices, credential):
    """401 with a JSON detail on every user-data route (B's ids in the path) and on `/v1/vad`; nothing changes."""
    headers = {
        "none": {},
        "bare-uid": {"Authorization": f"Bearer {B}"},  # the loopback dev mode's form: not a verified credential
        "other-project": {"Authorization": f"Bearer {id_token(B, project='someone-else')}"},
        "admin-lookalike": {"Authorization": ADMIN_KEY[:-1] + "X" + B},
        "empty-bearer": {"Authorization": "Bearer"},
    }[credential]
    with client(server, headers=headers) as http:
        for method, path in sorted(USER_ROUTES | CALLER_ROUTES):
            r = _call(http, method, path, voices["speaker90"], world)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert isinstance(r.json()["detail"], str)
            assert ADMIN_KEY not in r.text and B not in r.text
    assert_b_unchanged(server, world)


def test_a_cannot_read_or_list_b_profiles(server, world):
    carol = world["carol"]
    with client(server, A) as a:
        people = a.get("/v1/people").json()
        assert [p["id"] for p in people] == [world["dave"]]
        assert a.get(f"/v1/people?uid={B}").json() == people  # a uid parameter is never the caller
        assert_not_found(a.get("/v1/speech-profile"))  # A has none; B's is not shown
        assert_not_found(a.get(f"/v1/speech-profile?uid={B}"))
        # B's person answers exactly as an id that never existed.
        assert assert_not_found(a.get(f"/v1/people/{carol}")) == assert_not_found(a.get(f"/v1/people/{uuid.uuid4()}"))
        assert_not_found(a.get(f"/v1/people/{carol}?uid={B}"))
    with client(server, B) as b:  # the positive control: B does see them
        assert [p["id"] for p in b.get("/v1/people").json()] == [carol]
        assert b.get(f"/v1/people/{carol}").json()["samples"] >= 1
        assert_not_found(b.get(f"/v1/people/{world['dave']}"))
    assert_b_unchanged(server, world)


def test_a_cannot_write_b_people(server, world, voices):
    carol = world["carol"]
    with client(server, A) as a:
        # Add a voice sample to B's person, delete it: the same 404 as for an unknown id.
        r = a.post(f"/v1/people/{carol}/samples", files=wav_file(voices["speaker90"]))
        assert assert_not_found(r) == assert_not_found(
            a.post(f"/v1/people/{uuid.uuid4()}/samples", files=wav_file(voices["speaker90"])))
        assert assert_not_found(a.delete(f"/v1/people/{carol}")) == assert_not_found(
            a.delete(f"/v1/people/{uuid.uuid4()}"))
        assert_not_found(a.delete(f"/v1/people/{carol}?uid={B}"))
        # Rename: no such route today (405 for every id alike); if one appears it must answer 404 here.
        paths = a.get("/openapi.json").json()["paths"]
        for method in ("put", "patch"):
            r = a.request(method.upper(), f"/v1/people/{carol}", json={"name": "Mallory"})
            if method in paths["/v1/people/{person_id}"]:
                assert_not_found(r)
            else:
                assert r.status_code == 405, r.text
        # Creating a person with B's id or uid in the body makes A's own, new person.
        r = a.post("/v1/people", json={"name": "Mallory", "id": carol, "uid": B})
        assert r.status_code == 201, r.text
        mallory = r.json()["id"]
        assert mallory != carol
        assert {p["id"] for p in a.get("/v1/people").json()} == {world["dave"], mallory}
        assert a.delete(f"/v1/people/{mallory}").status_code == 204
    assert_b_unchanged(server, world)


def test_a_enrolling_and_deleting_own_voice_leaves_b_profile(server, world, voices):
    b_profile = world["snapshot"]["profile"]
    with client(server, A) as a:
        for path in ("/v3/upload-audio", "/v1/speech-profile"):  # with B's own voice and B's uid in the query
            r = a.post(f"{path}?uid={B}", files=wav_file(voices["speaker90"]), data={"uid": B})
            assert r.status_code == 200, r.text
            assert r.json()["id"] != b_profile["id"]
            assert a.get("/v1/speech-profile").json()["id"] == r.json()["id"]
        assert a.delete(f"/v1/speech-profile?uid={B}").status_code == 204  # A's own
        assert_not_found(a.get("/v1/speech-profile"))
        assert_not_found(a.delete("/v1/speech-profile"))  # nothing left for A; B's is not the next in line
    assert_b_unchanged(server, world)


def _segments_of(speaker: str) -> list[dict]:
    turns = rttm_turns(DATA / "sample.rttm", "sample")
    return [{"start": s, "end": e} for s, e, who in turns if who == speaker and e - s >= 2.0]


def test_speaker_identification_matches_only_the_callers_profiles(server, world):
    """B's voices match for B and for the admin key naming B; A naming B is refused, A alone matches nothing."""
    audio = wav_bytes(read_wav(SAMPLE_WAV))
    spans = _segments_of("speaker90") + _segments_of("speaker91")
    n90 = len(_segments_of("speaker90"))
    assert n90 >= 1 and len(spans) > n90

    def identify(http: httpx.Client, query: str = "") -> httpx.Response:
        return http.post(f"/v1/speaker-identification{query}", files={"audio_file": ("a.wav", audio, "audio/wav")},
                         data={"segments": json.dumps(spans)})

    with client(server, B) as b:
        own = identify(b)
    assert own.status_code == 200, own.text
    matched = own.json()
    # The positive control: a match is visible. speaker90 is B, speaker91 is B's person Carol.
    assert sum(m["is_user"] for m in matched[:n90]) >= 1, matched
    assert any(m["person_id"] == world["carol"] for m in matched[n90:]), matched
    with client(server, headers={"Authorization": ADMIN_KEY}) as admin:
        assert identify(admin, f"?uid={B}").json() == matched  # `?uid=` is honoured for the admin key
    with client(server, A) as a:
        refused = identify(a, f"?uid={B}")
        assert refused.status_code == 403 and isinstance(refused.json()["detail"], str), refused.text
        # The same refusal whether or not the named uid exists: no probing for users.
        assert identify(a, f"?uid=nobody-{uuid.uuid4().hex[:8]}").json() == refused.json()
        alone = identify(a)
        assert alone.status_code == 200, alone.text
        assert alone.json() == [{"is_user": False, "person_id": None}] * len(spans)
    assert_b_unchanged(server, world)


def test_a_stream_cannot_assign_b_person_or_touch_b_conversation(server, world):
    """A streams speech and sends `speaker_assigned` with B's person id: ignored (no error event, as Omi never sends
    one; B's id never lands in A's transcript); A gets a conversation of their own, is never told of B's, and a
    third user's open stream is not replaced."""
    carol, cid = world["carol"], world["conversation"]
    command = json.dumps({"type": "speaker_assigned", "speaker_id": 0, "person_id": carol, "person_name": "Carol"})

    async def both():
        bystander = asyncio.create_task(stream_frames(f"{server.ws}{LISTEN}", silence_frames(6.0), pace_s=0.02,
                                                      headers=bearer(D)))
        await asyncio.sleep(1.0)
        # On the /v3 alias, naming B in the query: identity comes from the token only.
        mine = await stream_speech(server, A, read_wav(SAMPLE_WAV)[19 * SR : 28 * SR], (command,),
                                   path=LISTEN.replace("/v4/", "/v3/") + f"&uid={B}")
        return mine, await bystander

    mine, bystander = asyncio.run(both())
    assert mine.errors() == [], mine.events
    assert cid not in json.dumps(mine.events) and carol not in json.dumps(mine.segments)
    assert all(s["person_id"] is None for s in mine.segments.values())
    assert bystander.errors() == [] and bystander.close_code == 1000, (bystander.events, bystander.close_code)
    with client(server, A) as a:
        listed = a.get("/v1/conversations").json()
        assert len(listed) == 1 and listed[0]["id"] != cid, listed
        stored = a.get(f"/v1/conversations/{listed[0]['id']}").json()["transcript_segments"]
        assert mine.segments and set(mine.segments) <= {s["id"] for s in stored}  # A's speech went to A's own
    assert_b_unchanged(server, world)


# --- conversations, on SQLite (the module server) and on PostgreSQL --------------------------------------------------


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_postgres_database("iso"))
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.skip(f"no PostgreSQL at {PG_ADMIN}: {exc}")
        proc = start_server(tmp_path_factory.mktemp("isolation-pg"),
                            **server_env(DATABASE_CHOICE="postgres", POSTGRES_URL=url))
        try:
            cid, _ = owner_conversation(proc, B)
            yield proc, {"conversation": cid, "snapshot": snapshot(proc, B, cid)}
        finally:
            stop_server(proc)


@pytest.fixture(params=["sqlite", "postgres"])
def conversations(request):
    """(server, B's conversation id, B's snapshot) on each storage."""
    if request.param == "sqlite":
        world = request.getfixturevalue("world")
        return request.getfixturevalue("server"), world
    return request.getfixturevalue("pg_world")


def test_a_cannot_read_list_or_delete_b_conversations(conversations):
    server, world = conversations
    cid = world["conversation"]
    with client(server, A) as a:
        for query in ("", f"?uid={B}", "?status=in_progress", "?limit=200", f"?before={time.time() + 1e6}"):
            r = a.get(f"/v1/conversations{query}")
            assert r.status_code == 200, r.text
            assert cid not in {c["id"] for c in r.json()}, (query, r.json())
        other = str(uuid.uuid4())
        assert assert_not_found(a.get(f"/v1/conversations/{cid}")) == assert_not_found(
            a.get(f"/v1/conversations/{other}"))
        assert_not_found(a.get(f"/v1/conversations/{cid}?uid={B}"))
        assert assert_not_found(a.delete(f"/v1/conversations/{cid}")) == assert_not_found(
            a.delete(f"/v1/conversations/{other}"))
        assert_not_found(a.delete(f"/v1/conversations/{cid}?uid={B}"))
    with client(server, B) as b:  # still there, with its transcript, for its owner
        assert [c["id"] for c in b.get("/v1/conversations").json()] == [cid]
        assert b.get(f"/v1/conversations/{cid}").json() == world["snapshot"]["conversation"]
    assert snapshot(server, B, cid) == world["snapshot"]


def test_public_routes_hold_no_user_data(server, world):
    """The routes that need no credentials (health, readiness, metrics) show nothing of anyone's data; `/v1/vad`
    needs a caller (401 without) and answers one with speech regions only."""
    secrets = [B, A, world["carol"], world["dave"], world["conversation"], world["snapshot"]["profile"]["id"]]
    for path in ("/health", "/ready", "/metrics"):
        r = httpx.get(f"{server.http}{path}")
        assert r.status_code == 200, (path, r.text)
        assert not [s for s in secrets if s in r.text], (path, r.text)
    upload = {"file": ("a.wav", wav_bytes(read_wav(SAMPLE_WAV)[: 8 * SR]), "audio/wav")}
    assert httpx.post(f"{server.http}/v1/vad", files=upload, timeout=60).status_code == 401
    with client(server, D) as d:
        r = d.post("/v1/vad", files=upload)
    assert r.status_code == 200 and r.json() and not [s for s in secrets if s in r.text], r.text


# --- admin only -------------------------------------------------------------------------------------------------------


def test_jobs_are_admin_only(server):
    assert httpx.get(f"{server.http}/v1/jobs").status_code == 401
    with client(server, A) as a:
        r = a.get("/v1/jobs")
        assert r.status_code == 403 and isinstance(r.json()["detail"], str), r.text
    with client(server, headers={"Authorization": ADMIN_KEY}) as admin:
        r = admin.get("/v1/jobs")
        assert r.status_code == 200 and isinstance(r.json(), list), r.text


def test_the_apps_firebase_token_on_the_websocket(server):
    """The app's own credential on /v4/listen: a valid Firebase ID token streams; a token of another project is
    refused at the upgrade (HTTP 403), before any message. (Expiry is not checked by firebase-admin's emulator
    mode: the 4001 for an expired token is tested in test_auth.py.)"""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    async def first_receive(token: str):
        async with connect(f"{server.ws}{LISTEN}", additional_headers={"Authorization": f"Bearer {token}"},
                           open_timeout=30) as ws:
            try:
                return await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed:
                return ws.close_code

    first = asyncio.run(first_receive(id_token(A)))
    assert json.loads(first)["type"] == "service_status"  # streaming: the server's first message
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(first_receive(id_token(A, project="someone-else")))
    assert refused.value.response.status_code == 403



def b_settings(server) -> dict:
    """B's webhook and notification settings as B reads them, and B's stored push token and time zone."""
    import sqlite3

    with client(server, B) as b:
        out = {t: b.get(f"/v1/users/developer/webhook/{t}").json() for t in WEBHOOK_TYPES}
        out["status"] = b.get("/v1/users/developer/webhooks/status").json()
        out["secret"] = b.get("/v1/users/developer/webhook-signing-secret").json()
        out["daily"] = b.get("/v1/users/daily-summary-settings").json()
    db = sqlite3.connect(f"file:{server.log_path.parent / 'data' / 'omi.sqlite3'}?mode=ro", uri=True)
    try:
        out["user"] = db.execute("SELECT fcm_token, time_zone FROM users WHERE uid = ?", (B,)).fetchall()
    finally:
        db.close()
    return out


WEBHOOK_TYPES = ("audio_bytes", "memory_created", "realtime_transcript", "day_summary")


def test_a_cannot_read_or_change_b_settings(server):
    """B's developer webhooks, signing secret, push token and day-summary settings: A sees only A's own (the
    defaults), and A's writes, with B's uid anywhere in the request, change only A's."""
    with client(server, B) as b:
        assert b.post("/v1/users/developer/webhook/realtime_transcript",
                      json={"url": "https://hooks.example.com/b?key=b-private"}).status_code == 200
        assert b.post("/v1/users/developer/webhook/audio_bytes",
                      json={"url": "https://hooks.example.com/b-audio,7"}).status_code == 200
        assert b.post("/v1/users/developer/webhook/day_summary/disable").status_code == 200
        secret = b.post("/v1/users/developer/webhook-signing-secret").json()["secret"]
        assert b.post("/v1/users/fcm-token", json={"fcm_token": "b-push-token", "time_zone": "Asia/Tokyo"}).json() \
            == {"status": "Ok"}
        assert b.patch("/v1/users/daily-summary-settings", json={"enabled": False, "hour": 7}).status_code == 200
    before = b_settings(server)
    assert before["realtime_transcript"] == {"url": "https://hooks.example.com/b?key=b-private"}
    assert before["status"] == {"audio_bytes": True, "memory_created": False, "realtime_transcript": True,
                                "day_summary": False}
    assert before["secret"]["configured"] is True and secret not in json.dumps(before)
    assert before["daily"] == {"enabled": False, "hour": 7} and before["user"] == [("b-push-token", "Asia/Tokyo")]
    with client(server, A) as a:
        for query in ("", f"?uid={B}"):
            for t in WEBHOOK_TYPES:
                assert a.get(f"/v1/users/developer/webhook/{t}{query}").json() == {"url": ""}
            assert a.get(f"/v1/users/developer/webhooks/status{query}").json() == dict.fromkeys(WEBHOOK_TYPES, False)
            assert a.get(f"/v1/users/developer/webhook-signing-secret{query}").json() == {"configured": False}
            assert a.get(f"/v1/users/daily-summary-settings{query}").json()["enabled"] is True
        # A's own writes, B's uid in the query and the body: only A's settings change.
        assert a.post(f"/v1/users/developer/webhook/realtime_transcript?uid={B}",
                      json={"url": "https://hooks.example.com/a", "uid": B}).status_code == 200
        assert a.post(f"/v1/users/developer/webhook/realtime_transcript/disable?uid={B}").status_code == 200
        assert a.post(f"/v1/users/developer/webhook/audio_bytes/enable?uid={B}").status_code == 200
        assert a.post(f"/v1/users/developer/webhook-signing-secret?uid={B}").status_code == 200
        assert a.delete(f"/v1/users/developer/webhook-signing-secret?uid={B}").status_code == 200
        assert a.post(f"/v1/users/fcm-token?uid={B}",
                      json={"fcm_token": "a-token", "time_zone": "UTC", "uid": B}).status_code == 200
        assert a.patch(f"/v1/users/daily-summary-settings?uid={B}", json={"hour": 9, "uid": B}).status_code == 200
        assert a.get("/v1/users/developer/webhook/realtime_transcript").json() == {"url": "https://hooks.example.com/a"}
        assert a.get("/v1/users/developer/webhooks/status").json()["realtime_transcript"] is False
        assert a.get("/v1/users/daily-summary-settings").json() == {"enabled": True, "hour": 9}
    assert b_settings(server) == before
