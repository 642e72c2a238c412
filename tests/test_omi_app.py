"""The Omi app against a real server process, exactly as the app talks to it (tests/omi_app_client.py): its query
strings and `Bearer <ADMIN_KEY><uid>` header, its answers to `ping`, its segment merging (the 2025 app's and the
new app's), its parsers, its commands, its REST calls, and two devices of one user at once.

The transcript comes from the Deepgram-protocol test server (deterministic words `w<start>` per connection, so each
word can be checked to show exactly once); speakers from the real resemblyzer embedder on real speech."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import httpx
import numpy as np
import pytest
from audio_tools import encode_opus
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server
from deepgram_server import ThreadedDeepgramTestServer
from omi_app_client import KEEPALIVE, AppConnection, listen_query
from omi_app_conversation import parse_conversation, parse_create_response
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

SR = 16000
ADMIN_KEY = "omi-admin-key-for-tests-5c1e9a7b3d"
IDLE_S = 3.0  # the server's IDLE_TIMEOUT_S here: the app's keepalives must keep a silent connection open past it


@pytest.fixture(scope="module")
def deepgram():
    with ThreadedDeepgramTestServer(api_key="dg-key") as server:
        yield server


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, deepgram):
    server = start_server(tmp_path_factory.mktemp("omi-app"), STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url,
                          DEEPGRAM_API_KEY="dg-key", ADMIN_KEY=ADMIN_KEY, HEARTBEAT_S="0.5",
                          IDLE_TIMEOUT_S=str(IDLE_S))
    yield server
    stop_server(server)


def auth(uid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}{uid}"}  # Omi's current admin form, as its test stacks use it


def opus_frames(audio: np.ndarray) -> list[bytes]:
    return encode_opus(audio.astype(np.float32), SR, bitrate=32000)


def phone_frames(audio: np.ndarray) -> list[bytes]:
    """The phone's microphone: pcm16 at 16 kHz, 20 ms a frame."""
    return pcm16_frames(audio.astype(np.float32))


async def open_app(server, uid: str, **query) -> AppConnection:
    ws = await connect(f"{server.ws}/v4/listen?{listen_query(uid, **query)}", additional_headers=auth(uid),
                       max_size=None, open_timeout=30)
    return AppConnection(ws)


def server_words(session, per_speaker: bool = False) -> list[str]:
    return [f"{seg['speaker']}:{w}" if per_speaker else w for seg in session.raw_segments.values()
            for w in seg["text"].split()]


def assert_each_word_shown_once(session, per_speaker: bool = False) -> None:
    """Every word the server sent is shown once by each app version. With `per_speaker` (fixed speakers: one STT
    connection each, whose words are named alike) a word counts as its speaker's."""
    words = server_words(session, per_speaker)
    assert words and len(words) == len(set(words)), "the server sent a word in two segments"
    for version, app in session.apps.items():
        shown = Counter(f"{seg.speaker}:{w}" if per_speaker else w for seg in app.segments for w in seg.text.split())
        assert set(shown) == set(words), f"{version} app: words missing or extra"
        twice = [w for w, n in shown.items() if n > 1]
        assert not twice, f"{version} app shows {len(twice)} words more than once, e.g. {twice[:5]}"


async def test_app_session_end_to_end(app_server):
    """One conversation as the app lives it: connect with -1 (4 h), stream the phone's microphone with the commands
    the app sends, load the in-progress conversation on the first segment, tag a speaker as the user, finish the
    conversation by REST and parse every conversation the server hands back."""
    uid = f"app-{uuid.uuid4().hex[:8]}"
    audio = read_wav(SAMPLE_WAV)
    frames = phone_frames(np.concatenate([np.zeros(SR // 2, np.float32), audio[: 20 * SR]]))
    app = await open_app(app_server, uid, conversation_timeout=-1, source="phone", language="auto", codec="pcm16")
    http = httpx.AsyncClient(base_url=app_server.http, headers=auth(uid), timeout=30)
    try:
        assert await app.wait_for(lambda s: any(e.get("status") == "ready" for e in s.events), 30)
        for i in range(0, len(frames), 50):
            await app.send_audio(frames[i : i + 50], pace_s=0.004)
            await app.send_json({"type": "image_chunk", "id": "p1", "index": 0, "total": 3, "data": "aGk="})
            await app.send_json({"type": "suggested_transcript", "segments": [], "stt_provider": "phone"})
            await app.ws.send('{"type": "skip_question"}')
            await app.ws.send("not json at all")
        await app.send_audio(phone_frames(np.zeros(SR, np.float32)))
        assert await app.wait_for(lambda s: s.first_segment.is_set(), 60)

        # The app's first-segment call: the in-progress conversation, which its parser must accept.
        listed = (await http.get("/v1/conversations", params={"statuses": "in_progress", "limit": 1})).json()
        assert len(listed) == 1 and listed[0]["status"] == "in_progress" and listed[0]["source"] == "phone"
        parse_conversation(listed[0])
        conversation_id = listed[0]["id"]

        # The transcript of 20 s of speech (the words end near 20.5 s of stream time).
        assert await app.wait_for(lambda s: any(seg["end"] >= 19.0 for seg in s.raw_segments.values()), 60)
        assert not [e for e in app.session.events if e.get("type") == "error"]
        assert_each_word_shown_once(app.session)

        # The user tags the first segment's speaker as themselves, the way the app does: assign-bulk, then the command.
        first = min(app.session.raw_segments.values(), key=lambda seg: seg["start"])
        other = [seg for seg in app.session.raw_segments.values() if seg["speaker_id"] != first["speaker_id"]]
        bulk = await http.patch(f"/v1/conversations/{conversation_id}/segments/assign-bulk",
                                json={"segment_ids": [first["id"]], "assign_type": "is_user", "value": "true"})
        assert bulk.status_code == 200, bulk.text
        await app.send_json({"type": "speaker_assigned", "speaker_id": first["speaker_id"], "person_id": "user",
                             "person_name": "Me", "segment_ids": [first["id"]]})
        assert await app.wait_for(lambda s: s.raw_segments[first["id"]]["is_user"], 10)
        assert all(app.session.apps[v].segments[0].is_user for v in app.session.apps)

        # More speech: the tagged speaker's new words are the user's, the tag survives, words still show once.
        await app.send_audio(phone_frames(np.concatenate([audio[20 * SR :], np.zeros(SR, np.float32)])),
                             pace_s=0.004)
        assert await app.wait_for(lambda s: any(seg["end"] >= 29.0 for seg in s.raw_segments.values()), 60)
        segments = app.session.raw_segments
        assert segments[first["id"]]["is_user"] and segments[first["id"]]["person_id"] is None
        assert any(seg["is_user"] for seg in segments.values() if seg["start"] > 20.5)
        if other:  # the other speaker was not tagged
            assert not all(seg["is_user"] for seg in segments.values())
        assert_each_word_shown_once(app.session)

        # Silence but for the app's keepalives, longer than IDLE_TIMEOUT_S: the connection stays open.
        await asyncio.sleep(IDLE_S + 2)
        assert not app.closed and app.session.pings > 0 and app.session.keepalives_sent > 0

        # The user ends the conversation in the app: POST /v1/conversations processes it now.
        created = await http.post("/v1/conversations", json={})
        assert created.status_code == 200, created.text
        memory = parse_create_response(created.json())
        assert memory["id"] == conversation_id
        assert await app.wait_for(lambda s: s.of_type("memory_created"), 30)
        assert app.session.of_type("memory_processing_started")
        event = app.session.of_type("memory_created")[0]
        assert event["memory"]["id"] == conversation_id and event["memory"]["status"] == "completed"
        assert event["memory"]["structured"]["title"]
        assert event["memory"]["transcript_segments"]
        got = await http.get(f"/v1/conversations/{conversation_id}")
        assert got.status_code == 200
        stored = parse_conversation(got.json())
        assert stored["id"] == conversation_id
        assert any(seg["is_user"] for seg in got.json()["transcript_segments"])
    finally:
        await app.close()
        await http.aclose()

    # The next session hears of that conversation first (last_memory), and its GET parses.
    again = await open_app(app_server, uid)
    try:
        assert await again.wait_for(lambda s: s.of_type("last_memory"), 30)
        assert again.session.of_type("last_memory")[0]["memory_id"] == conversation_id
    finally:
        await again.close()


async def test_keepalives_are_not_audio(app_server):
    """A wearable's Opus stream with the app's `8a 00` answers to every ping, and a burst of them before the speech:
    as Opus each would decode to 10 ms of concealment (1000 of them: 10 s), moving every time after them."""
    uid = f"keep-{uuid.uuid4().hex[:8]}"
    audio = read_wav(SAMPLE_WAV)
    app = await open_app(app_server, uid, codec="opus", sample_rate=16000, source="omi")
    try:
        assert await app.wait_for(lambda s: any(e.get("status") == "ready" for e in s.events), 30)
        for _ in range(1000):
            await app.ws.send(KEEPALIVE)
        await app.send_audio(opus_frames(np.concatenate([audio[: 10 * SR], np.zeros(SR, np.float32)])),
                             pace_s=0.004)
        assert await app.wait_for(lambda s: any(seg["end"] >= 8.5 for seg in s.raw_segments.values()), 60)
        first_start = min(seg["start"] for seg in app.session.raw_segments.values())
        # sample.wav's first turn starts at 6.69 s (sample.rttm): without the shift the first words come before 9 s.
        assert first_start < 9.0, f"keepalive frames moved the stream's clock to {first_start}"
        assert max(seg["end"] for seg in app.session.raw_segments.values()) < 11.5
        assert not [e for e in app.session.events if e.get("type") == "error"]
        assert_each_word_shown_once(app.session)
    finally:
        await app.close()


async def test_phone_and_desktop_stream_at_once(app_server):
    """Omi has no per-user limit: a user's desktop app opening a stream must not close the phone's, nor the other
    way round, however long both stream."""
    uid = f"two-{uuid.uuid4().hex[:8]}"
    audio = read_wav(SAMPLE_WAV)
    phone = await open_app(app_server, uid, source="phone")
    desktop = await open_app(app_server, uid, source="desktop", codec="opus")
    try:
        frames = opus_frames(audio[: 12 * SR])
        for i in range(0, len(frames), 25):  # interleaved, as two devices would send
            await phone.send_audio(frames[i : i + 25], pace_s=0.01)
            await desktop.send_audio(frames[i : i + 25], pace_s=0.01)
        await phone.send_audio(opus_frames(np.zeros(SR, np.float32)))
        await desktop.send_audio(opus_frames(np.zeros(SR, np.float32)))
        for device in (phone, desktop):
            assert await device.wait_for(lambda s: any(seg["end"] >= 10.0 for seg in s.raw_segments.values()), 60)
        assert not phone.closed and not desktop.closed
        for device in (phone, desktop):
            assert not [e for e in device.session.events if e.get("type") == "error"], device.session.events
            assert_each_word_shown_once(device.session)
    finally:
        await phone.close()
        await desktop.close()
    assert phone.session.close_code == 1000 and desktop.session.close_code == 1000


@pytest.mark.parametrize("timeout", [-1, 60, 1, 300, 100000])
async def test_conversation_timeout_values_are_accepted(app_server, timeout):
    """The app's choices (-1 = 4 h) and values below the minimum (raised to it) open a stream, as in Omi."""
    app = await open_app(app_server, f"to-{uuid.uuid4().hex[:8]}", conversation_timeout=timeout)
    try:
        assert await app.wait_for(lambda s: any(e.get("status") == "ready" for e in s.events), 30)
        assert not app.closed
    finally:
        await app.close()


@pytest.mark.parametrize("language", ["auto", "multi", "en", "pt-BR"])
async def test_languages_the_app_sends(app_server, language):
    app = await open_app(app_server, f"lang-{uuid.uuid4().hex[:8]}", language=language)
    try:
        assert await app.wait_for(lambda s: any(e.get("status") == "ready" for e in s.events), 30)
    finally:
        await app.close()


@pytest.mark.parametrize("header", [None, "Bearer not-a-valid-token", f"Bearer wrong{ADMIN_KEY}uid1",
                                    f"{ADMIN_KEY[:-1]}uid1"])
async def test_bad_credentials_are_refused_at_the_upgrade(app_server, header):
    """As Omi's TestListenAuth expects: the upgrade fails (HTTP 403 under uvicorn), no message comes first, so the
    app's token refresh runs instead of a reconnect loop on a socket that looked open."""
    headers = {"Authorization": header} if header else {}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{app_server.ws}/v4/listen?{listen_query('uid1')}", additional_headers=headers,
                           open_timeout=30):
            pass
    assert refused.value.response.status_code in (401, 403)


async def test_speaker_assigned_to_a_person(app_server):
    """speaker_assigned with an id from /v1/users/people labels that speaker's segments with the person, and an
    unknown person id or a malformed command gets no error (Omi never answers one)."""
    uid = f"person-{uuid.uuid4().hex[:8]}"
    http = httpx.AsyncClient(base_url=app_server.http, headers=auth(uid), timeout=30)
    audio = read_wav(SAMPLE_WAV)
    app = await open_app(app_server, uid)
    try:
        person = (await http.post("/v1/users/people", json={"name": "Ann"})).json()
        await app.send_audio(opus_frames(np.concatenate([audio[: 12 * SR], np.zeros(SR, np.float32)])),
                             pace_s=0.004)
        assert await app.wait_for(lambda s: any(seg["end"] >= 10.0 for seg in s.raw_segments.values()), 60)
        last = max(app.session.raw_segments.values(), key=lambda seg: seg["start"])
        await app.send_json({"type": "speaker_assigned", "speaker_id": 999, "person_id": "nobody-known",
                             "person_name": "X", "segment_ids": ["not-a-segment"]})
        await app.send_json({"type": "speaker_assigned", "speaker_id": "zero", "person_id": None})
        await app.send_json({"type": "speaker_assigned", "speaker_id": last["speaker_id"],
                             "person_id": person["id"], "person_name": "Ann", "segment_ids": [last["id"]]})
        assert await app.wait_for(lambda s: s.raw_segments[last["id"]]["person_id"] == person["id"], 10)
        tagged = [seg for seg in app.session.raw_segments.values() if seg["speaker_id"] == last["speaker_id"]]
        assert all(seg["person_id"] == person["id"] and not seg["is_user"] for seg in tagged)
        assert not [e for e in app.session.events if e.get("type") == "error"]
        assert not app.closed
    finally:
        await app.close()
        await http.aclose()


async def test_two_channels_mic_and_remote(app_server, deepgram):
    """channels=2 as the newer backend reads it: a channel byte per frame, 0x01 the microphone (the user) and 0x02
    the remote side; each channel transcribed on its own, frames of another channel byte ignored."""
    from conftest import AMI

    uid = f"chan-{uuid.uuid4().hex[:8]}"
    mic = read_wav(SAMPLE_WAV)[6 * SR : 16 * SR]
    remote = read_wav(AMI / "trn09.wav")[: 10 * SR]  # a meeting with speech all through its first 10 s
    silence = np.zeros(SR, np.float32)
    mic_frames = phone_frames(np.concatenate([mic, silence]))
    remote_frames = phone_frames(np.concatenate([remote, silence]))
    before = len(deepgram.connections)
    app = await open_app(app_server, uid, codec="pcm16", channels=2, source="desktop")
    try:
        assert await app.wait_for(lambda s: any(e.get("status") == "ready" for e in s.events), 30)
        for i, (m, r) in enumerate(zip(mic_frames, remote_frames, strict=False)):
            await app.ws.send(b"\x01" + m)
            await app.ws.send(b"\x02" + r)
            if i % 100 == 0:
                await app.ws.send(b"\x03" + m)  # no such channel: ignored
                await asyncio.sleep(0.01)
        assert await app.wait_for(
            lambda s: {seg["speaker"] for seg in s.raw_segments.values() if seg["end"] >= 8} >= {"SPEAKER_0",
                                                                                                  "SPEAKER_1"}, 60)
        segments = list(app.session.raw_segments.values())
        assert all(seg["is_user"] == (seg["speaker"] == "SPEAKER_0") for seg in segments)
        assert {seg["speaker"] for seg in segments} == {"SPEAKER_0", "SPEAKER_1"}
        assert not [e for e in app.session.events if e.get("type") == "error"]
        assert_each_word_shown_once(app.session, per_speaker=True)
    finally:
        await app.close()
    streams = deepgram.connections[before:]
    assert len(streams) == 2 and all(c.audio_bytes > SR * 2 for c in streams)  # one STT per channel, each heard speech


async def test_hostile_text_frames_are_ignored(app_server):
    """JSON nested past Python's recursion limit, a 1 MB text frame and a `type` that is no string: ignored like any
    unknown text, the stream goes on (before, the nesting raised RecursionError out of the stream's handler, and a
    list as `type` a TypeError, found by tests/test_fuzz.py)."""
    app = await open_app(app_server, f"text-{uuid.uuid4().hex[:8]}", codec="pcm16")
    try:
        assert await app.wait_for(lambda s: any(e.get("status") == "ready" for e in s.events), 30)
        await app.ws.send("[" * 100_000)
        await app.ws.send('{"type": ["speaker_assigned"]}')
        await app.ws.send('{"type": {"speaker_assigned": 1}}')
        await app.ws.send('{"type": "image_chunk", "data": "' + "A" * 1_000_000 + '"}')
        await app.send_audio(phone_frames(np.concatenate([read_wav(SAMPLE_WAV)[6 * SR : 12 * SR],
                                                          np.zeros(SR, np.float32)])))
        assert await app.wait_for(lambda s: any(seg["end"] >= 5.0 for seg in s.raw_segments.values()), 60)
        assert not app.closed and not [e for e in app.session.events if e.get("type") == "error"]
    finally:
        await app.close()
