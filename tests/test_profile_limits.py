"""What a voice profile keeps (storage.profile_rows): capped rows, no near-duplicates, a capped person sample, and
a stream start that reads one centroid per profile. The rule is checked on every backend (SQLite, real PostgreSQL,
the Firestore stand-in), then on a real server: 200 `speaker_assigned` over a real stream, over-long samples."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE_WAV, pcm16_frames, read_wav, start_server, stop_server
from test_storage_contract import BACKENDS, make_store

from storage.base import SpeakerProfile, Storage
from storage.profile_rows import ProfileLimits

DIM = 32  # random unit vectors in 32 dimensions are far apart (cosine rarely above 0.7): only planted ones are close
CAP = 16


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with make_store(request.param, tmp_path) as opened:
        opened.profile_limits = ProfileLimits(max_embeddings=CAP, dedup_cosine=0.98)
        yield opened


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def empty_person(store: Storage, uid: str = "u", model: str = "m") -> SpeakerProfile:
    p = SpeakerProfile(uid=uid, kind="person", model=model, embeddings=np.zeros((0, DIM), np.float32), name="P")
    await store.save_profile(p)
    return p


async def rows_of(store: Storage, p: SpeakerProfile) -> np.ndarray:
    return (await store.get_profile(p.uid, p.id)).embeddings


async def test_the_same_rows_added_again_add_nothing(store: Storage) -> None:
    p = await empty_person(store)
    voice = unit_vectors(5, seed=1)
    assert await store.add_profile_embeddings("u", p.id, voice, 6.0) is True
    for _ in range(20):  # the same cluster assigned again and again
        assert await store.add_profile_embeddings("u", p.id, voice, 6.0) is True
    got = await store.get_profile("u", p.id)
    assert got.embeddings.tobytes() == voice.tobytes()
    assert got.speech_seconds == pytest.approx(6.0)  # counted once


async def test_near_duplicates_are_dropped_and_new_voices_kept(store: Storage) -> None:
    p = await empty_person(store)
    base = unit_vectors(4, seed=2)
    await store.add_profile_embeddings("u", p.id, base, 4.0)
    near = base + 0.01 * unit_vectors(4, seed=3)  # cosine > 0.99 to its original
    fresh = unit_vectors(2, seed=4)
    await store.add_profile_embeddings("u", p.id, np.concatenate([near, fresh]), 6.0)
    got = await store.get_profile("u", p.id)
    assert got.embeddings.tobytes() == np.concatenate([base, fresh]).tobytes()
    assert got.speech_seconds == pytest.approx(4.0 + 6.0 * 2 / 6)  # seconds in proportion to the rows added


async def test_rows_are_capped_keeping_the_newest(store: Storage) -> None:
    p = await empty_person(store)
    batches = [unit_vectors(7, seed=10 + i) for i in range(5)]  # 35 distinct rows, cap 16
    for batch in batches:
        await store.add_profile_embeddings("u", p.id, batch, 7.0)
    assert (await rows_of(store, p)).tobytes() == np.concatenate(batches)[-CAP:].tobytes()
    many = unit_vectors(200, seed=20)  # one batch larger than the cap: evenly spaced rows of it, first and last
    await store.add_profile_embeddings("u", p.id, many, 240.0)
    got = await rows_of(store, p)
    assert len(got) == CAP
    assert got[0].tobytes() == many[0].tobytes() and got[-1].tobytes() == many[-1].tobytes()
    assert {r.tobytes() for r in got} <= {r.tobytes() for r in many}


async def test_an_offer_larger_than_the_cap_repeated_adds_nothing(store: Storage) -> None:
    """A cluster with more windows than the cap, assigned again and again: thinned the same way each time, its rows
    are all kept already (before, the rows thinned away last time counted as new: the profile churned and its
    seconds grew with every repeat)."""
    p = await empty_person(store)
    cluster = unit_vectors(3 * CAP, seed=30)
    await store.add_profile_embeddings("u", p.id, cluster, 30.0)
    first = await store.get_profile("u", p.id)
    for _ in range(5):
        await store.add_profile_embeddings("u", p.id, cluster, 30.0)
    again = await store.get_profile("u", p.id)
    assert again.embeddings.tobytes() == first.embeddings.tobytes() and len(first.embeddings) == CAP
    assert again.speech_seconds == pytest.approx(first.speech_seconds)


async def test_save_profile_keeps_at_most_the_cap(store: Storage) -> None:
    rows = unit_vectors(100, seed=5)
    p = SpeakerProfile(uid="u", kind="user", model="m", embeddings=rows)
    await store.save_profile(p)
    assert len(await rows_of(store, p)) == CAP


async def test_matching_profiles_reads_one_centroid_of_the_running_model(store: Storage) -> None:
    alice = SpeakerProfile(uid="u", kind="person", model="m", embeddings=unit_vectors(12, seed=6), name="A",
                           created_at=1.0)
    other_model = SpeakerProfile(uid="u", kind="person", model="other", embeddings=unit_vectors(3, seed=7),
                                 created_at=2.0)
    me = SpeakerProfile(uid="u", kind="user", model="m", embeddings=unit_vectors(6, seed=8), created_at=3.0)
    theirs = SpeakerProfile(uid="v", kind="user", model="m", embeddings=unit_vectors(6, seed=9), created_at=0.5)
    for p in (alice, other_model, me, theirs):
        await store.save_profile(p)
    voiceless = await empty_person(store)
    store.profile_limits = ProfileLimits(max_embeddings=4)  # as for a profile stored before a lower cap
    found = await store.matching_profiles("u", "m")
    assert [(p.id, p.kind) for p in found] == [(alice.id, "person"), (me.id, "user")]
    assert voiceless.id not in {p.id for p in found}
    for got, stored in zip(found, (alice, me), strict=True):
        mean = stored.embeddings[-4:].mean(axis=0)
        assert got.embeddings.shape == (1, DIM)
        np.testing.assert_allclose(got.embeddings[0], mean / np.linalg.norm(mean), atol=1e-5)


# --- a real server ----------------------------------------------------------------------------------------------------

SERVER_CAP = 12
SAMPLE_MAX_S = 8.0


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("limits"), PROFILE_MAX_EMBEDDINGS=str(SERVER_CAP),
                          PERSON_SAMPLE_MAX_S=str(SAMPLE_MAX_S))
    yield server
    stop_server(server)


def client(server, uid: str) -> httpx.Client:
    return httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}, timeout=120)


def wav(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


async def test_repeated_speaker_assigned_keeps_at_most_the_cap(limits_server):
    """200 `speaker_assigned` of one speaker over a real stream: each returns the cluster's windows (dozens), which
    unbounded grew the person by dozens of rows a command."""
    from websockets.asyncio.client import connect

    uid = "assign-many"
    with client(limits_server, uid) as http:
        bob = http.post("/v1/people", json={"name": "Bob"}).json()["id"]
    segments: dict[str, dict] = {}
    async with connect(f"{limits_server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                       additional_headers={"Authorization": f"Bearer {uid}"}) as ws:

        async def read() -> None:
            async for message in ws:
                payload = json.loads(message) if message != "ping" else None
                if isinstance(payload, list):
                    segments.update({s["id"]: s for s in payload})

        reader = asyncio.create_task(read())
        # 20 s of speech, then silence that closes its last region (the local STT answers a region when it ends)
        for frame in pcm16_frames(np.concatenate([read_wav(SAMPLE_WAV)[: 20 * 16000], np.zeros(2 * 16000, "f4")])):
            await ws.send(frame)
        for _ in range(300):
            if any(s["end"] > 12 for s in segments.values()):
                break
            await asyncio.sleep(0.1)
        assert segments, "no transcript segments"
        target = max(segments.values(), key=lambda s: s["end"] - s["start"])["speaker_id"]
        command = json.dumps({"type": "speaker_assigned", "speaker_id": target, "person_id": bob,
                              "person_name": "Bob", "segment_ids": []})
        for _ in range(200):
            await ws.send(command)
        await ws.close()  # the server handles frames in order: every command ran before the close
        await asyncio.wait_for(reader, 30)
    with client(limits_server, uid) as http:
        person = http.get(f"/v1/people/{bob}").json()
    assert 0 < person["samples"] <= SERVER_CAP, person
    assert person["speech_seconds"] <= 3 * 20.0, person  # windows overlap 3x; repeats are not counted again


def test_person_sample_over_the_cap_is_refused(limits_server):
    speech = read_wav(SAMPLE_WAV)
    with client(limits_server, "sample-cap") as http:
        person = http.post("/v1/people", json={"name": "Carol"}).json()["id"]
        r = http.post(f"/v1/people/{person}/samples", files={"file": ("long.wav", wav(speech[: 30 * 16000]))})  # 23 s
        assert r.status_code == 422, r.text
        assert f"at most {SAMPLE_MAX_S:g} s" in r.json()["detail"]
        assert http.get(f"/v1/people/{person}").json()["samples"] == 0
        within = wav(speech[7 * 16000 : 13 * 16000])  # 6 s, all speech
        ok = http.post(f"/v1/people/{person}/samples", files={"file": ("short.wav", within)})
        assert ok.status_code == 200, ok.text
        assert 0 < ok.json()["samples"] <= SERVER_CAP
