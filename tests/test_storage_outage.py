"""Storage outages against a real PostgreSQL that the tests stop and start (a private cluster on a free port).

- Down mid-stream: the client keeps getting its transcript; the segments are kept in memory and written once
  PostgreSQL is back, each once (one row per id, one conversation), with the client's last text, and the stored
  words tile all the audio the Deepgram test server received. The server's asyncpg pool recovers by itself.
- Down at stream start: the stream is refused with an `error` event `storage_unavailable` and close 1013; the
  server keeps running, `/ready` says storage false, and a stream opened once PostgreSQL is back works.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import (
    SAMPLE_WAV,
    ServerProcess,
    free_port,
    pcm16_frames,
    read_wav,
    start_server,
    stop_server,
    stream_frames,
)
from deepgram_server import ThreadedDeepgramTestServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

RATE = 16000
FRAME_S = 0.02  # pcm16_frames' default frame


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        # initdb refuses to run as root: run the cluster as the postgres user then
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"),
                  "-w", "start")

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PgCluster]:
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin")) or [os.path.dirname(shutil.which("initdb") or "")]
    bindir = Path(bindirs[-1])
    if not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's tmp dir: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="omi-pg-"))
    if os.geteuid() == 0:
        try:
            shutil.chown(root, "postgres", "postgres")
        except LookupError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
    cluster = PgCluster(bindir, root, free_port())
    try:
        cluster._run(str(bindir / "initdb"), "-D", str(cluster.data), "--auth=trust", "-U", "postgres",
                     "--no-sync", "-E", "UTF8")
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def deepgram() -> Iterator[ThreadedDeepgramTestServer]:
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.5) as server:
        yield server


@pytest.fixture(scope="module")
def server(postgres: PgCluster, deepgram: ThreadedDeepgramTestServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("outage"), DATABASE_CHOICE="postgres", POSTGRES_URL=postgres.dsn,
                        STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key",
                        JOBS_ENABLED="false")
    yield proc
    stop_server(proc)


@pytest.fixture
def pg_restored(postgres: PgCluster) -> Iterator[PgCluster]:
    """A test that stops PostgreSQL leaves it running for the next one, even when it fails."""
    yield postgres
    with contextlib.suppress(Exception):
        postgres.start()


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{server.http}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"omi_{name} "):
            return float(line.split()[1])
    raise KeyError(name)


def ready(server: ServerProcess) -> tuple[int, dict]:
    r = httpx.get(f"{server.http}/ready", timeout=15)
    return r.status_code, r.json()


def wait_ready(server: ServerProcess, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = ready(server)
        if code == 200 or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def stored_conversation(server: ServerProcess, uid: str) -> tuple[list[dict], list[dict]]:
    """The user's conversations and the newest one's segments, via the REST API."""
    with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}, timeout=10) as http:
        conversations = http.get("/v1/conversations").json()
        if not conversations:
            return [], []
        return conversations, http.get(f"/v1/conversations/{conversations[0]['id']}").json()["transcript_segments"]


def deepgram_words(deepgram: ThreadedDeepgramTestServer, index: int) -> tuple[list[dict], float]:
    """Every word the Deepgram test server sent on connection `index`, and the seconds of audio it received."""
    conn = deepgram.connections[index]
    words = [w for r in conn.replies if r.type == "Results"
             for w in r.payload["channel"]["alternatives"][0]["words"]]
    return words, len(conn.audio_samples()) / RATE


async def read_segment_lists(ws, on_segments) -> None:
    """Until the server closes: `on_segments(list)` for each segment list the client gets (events skipped)."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            payload = json.loads(message) if message != "ping" else None
            if isinstance(payload, list):
                await on_segments(payload)


async def test_postgres_down_mid_stream_keeps_segments_and_writes_them_once(
        server: ServerProcess, pg_restored: PgCluster, deepgram: ThreadedDeepgramTestServer) -> None:
    postgres = pg_restored
    uid = f"outage-{uuid.uuid4().hex[:8]}"
    frames = pcm16_frames(read_wav(SAMPLE_WAV)[6 * RATE : 26 * RATE])  # the speech starts at 6 s
    a, b = int(4 / FRAME_S), int(11 / FRAME_S)  # 4 s with storage up, 7 s down, 9 s up again
    failures_before = metric(server, "storage_write_failures_total")
    retried_before = metric(server, "storage_segments_retried_total")
    lost_before = metric(server, "storage_segments_lost_total")
    dg_index = len(deepgram.connections)

    seen: dict[str, dict] = {}
    received_at: list[float] = []  # monotonic time of each segment message
    async with connect(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                       additional_headers={"Authorization": f"Bearer {uid}"}) as ws:

        async def on_segments(payload: list[dict]) -> None:
            seen.update({s["id"]: s for s in payload})
            received_at.append(time.monotonic())

        task = asyncio.create_task(read_segment_lists(ws, on_segments))
        for frame in frames[:a]:
            await ws.send(frame)
            await asyncio.sleep(FRAME_S / 4)
        for _ in range(100):  # some segments stored while PostgreSQL was up
            if seen:
                break
            await asyncio.sleep(0.1)
        stored_before = set(seen)
        assert stored_before

        await asyncio.to_thread(postgres.stop)
        down_at = time.monotonic()
        code, body = await asyncio.to_thread(ready, server)
        assert code == 503 and body["storage"] is False
        for frame in frames[a:b]:  # real time while storage is down
            await ws.send(frame)
            await asyncio.sleep(FRAME_S)
        up_at = time.monotonic()
        during = [t for t in received_at if down_at < t < up_at]
        assert len(during) >= 3, "the client must keep getting its transcript while storage is down"
        assert metric(server, "storage_write_failures_total") > failures_before

        await asyncio.to_thread(postgres.start)
        for frame in frames[b:]:
            await ws.send(frame)
            await asyncio.sleep(FRAME_S / 2)
        await asyncio.sleep(1.0)  # the last results reach the client
        await ws.close()
        await asyncio.wait_for(task, 10)

    # The server stores the end of the stream after the client closed: wait for its STT connection to end.
    await asyncio.to_thread(deepgram.wait_for, lambda d: not d.connections[dg_index].is_open, 20)
    sent_words, sent_s = deepgram_words(deepgram, dg_index)
    deadline = time.monotonic() + 30
    while True:
        conversations, stored = stored_conversation(server, uid)
        words = " ".join(s["text"] for s in sorted(stored, key=lambda s: s["start"])).split()
        if len(words) >= len(sent_words) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)

    # One conversation; every segment the client saw is stored, with the client's last text for it.
    assert len(conversations) == 1
    by_id = {s["id"]: s for s in stored}
    assert len(by_id) == len(stored), "a segment id stored twice"
    assert set(seen) <= set(by_id)
    last_seen = max(seen.values(), key=lambda s: s["start"])["id"]
    for seg_id, seg in seen.items():
        if seg_id == last_seen:  # it may have grown after the client left (the words of the stream's end)
            assert by_id[seg_id]["text"].startswith(seg["text"])
        else:
            assert by_id[seg_id]["text"] == seg["text"]
    # The stored words are exactly the words Deepgram sent, and those tile all the audio it received.
    assert words == [w["word"] for w in sent_words]
    assert sent_words[0]["start"] == 0.0
    assert all(abs(p["end"] - n["start"]) < 1e-9 for p, n in zip(sent_words, sent_words[1:], strict=False))
    assert abs(sent_words[-1]["end"] - sent_s) < 1e-6
    assert sent_s > 12.0  # most of the 20 s is speech, and it all went to Deepgram
    if deepgram.connections[dg_index].control_messages().count("Finalize") <= 1:
        assert len(words) == int(-(-sent_s // 0.5))  # one speech region: 0.5 s words, the last one shorter

    # Straight from PostgreSQL: one row per segment id, one conversation for the user.
    con = await asyncpg.connect(postgres.dsn)
    try:
        rows = await con.fetch("SELECT id, conversation_id FROM segments WHERE uid = $1", uid)
        conversation_ids = await con.fetch("SELECT id FROM conversations WHERE uid = $1", uid)
    finally:
        await con.close()
    assert len(rows) == len({r["id"] for r in rows}) == len(stored)
    assert [r["id"] for r in conversation_ids] == [conversations[0]["id"]]
    assert {r["conversation_id"] for r in rows} == {conversations[0]["id"]}

    assert metric(server, "storage_segments_retried_total") > retried_before
    assert metric(server, "storage_segments_lost_total") == lost_before
    assert ready(server)[0] == 200  # the asyncpg pool reconnected by itself
    assert "Traceback" not in server.log()


async def test_stream_opened_while_postgres_is_down_is_refused_then_works(
        server: ServerProcess, pg_restored: PgCluster, deepgram: ThreadedDeepgramTestServer) -> None:
    postgres = pg_restored
    url = f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000"
    headers = {"Authorization": f"Bearer refused-{uuid.uuid4().hex[:8]}"}
    await asyncio.to_thread(postgres.stop)
    code, body = await asyncio.to_thread(ready, server)
    assert code == 503 and body["storage"] is False
    refused = await stream_frames(url, [], headers=headers, close=False, timeout_s=30)
    assert [e["code"] for e in refused.errors()] == ["storage_unavailable"]
    assert refused.close_code == 1013
    assert server.proc.poll() is None

    await asyncio.to_thread(postgres.start)
    assert (await asyncio.to_thread(wait_ready, server))["storage"] is True
    frames = pcm16_frames(read_wav(SAMPLE_WAV)[6 * RATE : 10 * RATE])
    # the whole clip's speech comes back (its words end at about 3.1 s; in one segment or two, as the speaker
    # tagging of these 4 s decides: waiting for two segments made this flaky)
    result = await stream_frames(url, frames, headers=headers, timeout_s=30,
                                 until=lambda r: any(seg["end"] >= 3.0 for seg in r.segments.values()))
    assert not result.errors() and max(seg["end"] for seg in result.segments.values()) >= 3.0, result.segments
    assert "Traceback" not in server.log()


def test_rest_routes_while_postgres_is_down_answer_503_with_retry_after(server: ServerProcess,
                                                                        pg_restored: PgCluster) -> None:
    """Every REST route reads or writes storage: while it is down they answer 503 with Retry-After and a JSON
    detail (before: uvicorn's plain-text 500 and an "Exception in ASGI application" traceback), one ERROR line
    each; once it is back they work again."""
    postgres = pg_restored
    uid = f"rest-{uuid.uuid4().hex[:8]}"
    calls = [("GET", "/v1/conversations"), ("POST", "/v1/conversations"), ("GET", "/v1/people"),
             ("POST", "/v1/users/people"), ("GET", "/v3/speech-profile")]
    with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}, timeout=60) as http:
        assert http.get("/v1/conversations").status_code == 200
        start = len(server.log())
        postgres.stop()
        for method, path in calls:
            r = http.request(method, path, json={"name": "Dana"} if path == "/v1/users/people" else None)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert r.json() == {"detail": "storage unavailable, retry shortly"} and int(r.headers["Retry-After"]) > 0
        log = server.log()[start:]
        assert "Exception in ASGI application" not in log
        assert log.count(" ERROR server: ") >= len(calls)
        postgres.start()
        wait_ready(server)
        assert http.get("/v1/conversations").status_code == 200
        assert http.post("/v1/users/people", json={"name": "Dana"}).status_code == 200


async def test_a_segment_is_sent_after_it_is_stored_and_while_down_kept_then_counted_lost(
        postgres: PgCluster, deepgram: ThreadedDeepgramTestServer, tmp_path: Path) -> None:
    """What the README says, exactly. While PostgreSQL answers, every version of a segment the client gets is
    already in the database when it arrives (queried on receipt). While it is down the client still gets the
    segment's newer versions at once, unstored: the server keeps them for its retry. When the stream ends still
    inside the outage, the server retries for STORAGE_RETRY_ON_CLOSE_S (2 s here), then counts the kept segment in
    `omi_storage_segments_lost_total`: after PostgreSQL is back the database holds the version stored before the
    outage, not the words sent during it."""
    uid = f"claim-{uuid.uuid4().hex[:8]}"
    server = start_server(tmp_path, DATABASE_CHOICE="postgres", POSTGRES_URL=postgres.dsn, STT_BACKEND="deepgram",
                          DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key", JOBS_ENABLED="false",
                          STORAGE_RETRY_ON_CLOSE_S="2")
    frames = pcm16_frames(read_wav(SAMPLE_WAV)[6 * RATE : 20 * RATE])
    a = int(6 / FRAME_S)
    db = await asyncpg.connect(postgres.dsn)
    try:
        lost_before = metric(server, "storage_segments_lost_total")
        stored_on_receipt: list[tuple[str, str | None]] = []  # (text received, text in the database then)
        kept: set[str] = set()  # ids of which a version came while PostgreSQL was down
        down = asyncio.Event()
        seen: dict[str, dict] = {}
        async with connect(f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000",
                           additional_headers={"Authorization": f"Bearer {uid}"}) as ws:

            async def on_segments(payload: list[dict]) -> None:
                seen.update({s["id"]: s for s in payload})
                for seg in payload:
                    if down.is_set():
                        kept.add(seg["id"])
                        continue
                    try:
                        row = await db.fetchrow("SELECT text FROM segments WHERE id = $1", seg["id"])
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        continue  # PostgreSQL is stopping
                    stored_on_receipt.append((seg["text"], row["text"] if row else None))

            task = asyncio.create_task(read_segment_lists(ws, on_segments))
            for frame in frames[:a]:
                await ws.send(frame)
                await asyncio.sleep(FRAME_S)
            await asyncio.sleep(1.5)  # the results of what was sent
            await asyncio.to_thread(postgres.stop)
            down.set()
            for frame in frames[a:]:
                await ws.send(frame)
                await asyncio.sleep(FRAME_S)
            await asyncio.sleep(1.5)
            await ws.close()
            await asyncio.wait_for(task, 10)
        deadline = time.monotonic() + 30
        while f"stream closed uid={uid} " not in server.log():
            assert time.monotonic() < deadline, "the stream did not end"
            await asyncio.sleep(0.2)
        lost = metric(server, "storage_segments_lost_total") - lost_before
        await db.close()
        await asyncio.to_thread(postgres.start)
        db = await asyncpg.connect(postgres.dsn)
        rows = await db.fetch("SELECT id, text FROM segments WHERE uid = $1", uid)
    finally:
        await db.close()
        stop_server(server)
    assert len(stored_on_receipt) >= 3 and kept  # segments came in both phases
    for received, in_database in stored_on_receipt:  # stored first (maybe a newer version by the query's time)
        assert in_database is not None and in_database.startswith(received)
    in_database = {r["id"]: r["text"] for r in rows}
    for segment_id, segment in seen.items():  # the client's last version is stored unless it came while down
        assert (in_database.get(segment_id) == segment["text"]) is (segment_id not in kept)
    assert lost == len(kept)  # each kept segment counted once
    assert "segments of this stream were not stored" in server.log()
    assert "Traceback" not in server.log()


# -- in process: the retry's bookkeeping, on the real PostgreSQL with failures at chosen calls ---------------------


class FlakyStorage:
    """Delegates to a real storage; `down` makes every call fail as a lost connection would, and `fail` fails the
    next call of one method, before it reaches the database or after it committed (the reply lost)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.down = False
        self.fail: tuple[str, str] | None = None  # (method, "before" | "after")

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        async def call(*args, **kwargs):
            if self.down:
                raise ConnectionRefusedError("storage down")
            planned = self.fail if self.fail is not None and self.fail[0] == name else None
            if planned is not None:
                self.fail = None
                if planned[1] == "before":
                    raise ConnectionResetError("connection lost")
            result = await method(*args, **kwargs)
            if planned is not None:
                raise ConnectionResetError("connection lost after commit")
            return result

        return call


class _NoVad:
    frame_samples = 512

    def new_state(self) -> None:
        return None


class _NoStt:
    def session(self, *args, **kwargs):  # (on_transcript, language, ...): whatever the pipeline passes
        return self

    async def close(self) -> None:
        return None


@pytest.fixture
async def store(postgres: PgCluster) -> FlakyStorage:
    from storage.postgres import PostgresStorage

    inner = PostgresStorage(postgres.dsn, schema=f"outage_{uuid.uuid4().hex[:10]}", min_size=1, max_size=2)
    await inner.open()
    yield FlakyStorage(inner)
    await inner.close()


async def make_pipeline(store: FlakyStorage, uid: str, **kwargs):
    from conversations import ConversationLink, ConversationService
    from streaming.codecs import make_decoder
    from streaming.pipeline import Pipeline
    from streaming.vad import VadParams

    service = ConversationService(store)
    conversation = await service.attach(uid, "en", 120)
    link = ConversationLink(service, conversation, "en", 120)
    sent: list[list[dict]] = []

    async def emit(message) -> None:
        sent.append(message)

    pipeline = Pipeline(decoder=make_decoder("pcm16", 16000, 1), vad_backend=_NoVad(), vad_params=VadParams(),
                        stt_factory=_NoStt(), language="en", emit=emit, persist=link.persist, **kwargs)
    link.pipeline = pipeline
    pipeline.timeline.append(0, 3600 * RATE)  # one span: sent-audio time is stream time
    return service, link, pipeline, sent


async def say(pipeline, start: float, n: int = 2, end_utterance: bool = True) -> None:
    from streaming.stt import Transcript, Word

    words = tuple(Word(f"w{start + i * 0.5:.2f}", start + i * 0.5, start + (i + 1) * 0.5) for i in range(n))
    await pipeline._on_transcript(Transcript(words, True, end_utterance))


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fail", [("upsert_segments", "before"), ("save_conversation", "before"),
                                  ("save_conversation", "after")])
async def test_retry_after_a_closed_conversation_shifts_once_into_one_new_conversation(
        store: FlakyStorage, fail: tuple[str, str]) -> None:
    """The sweep closed the conversation during a silence; the write that finds out starts a new one, and storage
    fails part way (before the new conversation exists, after it committed, or writing the segments). The retry
    must move the segments into one new conversation, shifted once."""
    import metrics

    uid = f"closed-{uuid.uuid4().hex[:8]}"
    service, link, pipeline, sent = await make_pipeline(store, uid)
    await say(pipeline, 1.0)
    first = link.conversation
    await service.close(first)  # as the sweep would
    retried = metrics.value("storage_segments_retried_total")

    store.fail = fail
    await say(pipeline, 200.0, n=3)
    assert sent[-1][0]["text"] == "w200.00 w200.50 w201.00"  # the client got it at once
    await wait_until(lambda: not pipeline.writer.pending)
    await pipeline.finish()

    conversations = await store.list_conversations(uid)
    assert len(conversations) == 2 and link.conversation.id != first.id
    assert {c.id for c in conversations} == {first.id, link.conversation.id}
    moved = await store.list_segments(uid, link.conversation.id)
    assert [(s.text, s.start, s.end) for s in moved] == [("w200.00 w200.50 w201.00", 0.0, 1.5)]  # shifted once
    assert [len(s.text.split()) for s in await store.list_segments(uid, first.id)] == [2]
    assert metrics.value("storage_segments_retried_total") > retried
    assert sent[-1][0]["start"] == 0.0  # the client was told where the segment went

    await say(pipeline, 202.0)  # the clock of the new conversation goes on from there
    assert [s.start for s in await store.list_segments(uid, link.conversation.id)] == [0.0, 2.0]


async def test_pending_segments_are_bounded_and_counted_lost_when_storage_stays_down(store: FlakyStorage) -> None:
    import metrics

    uid = f"bounded-{uuid.uuid4().hex[:8]}"
    _, link, pipeline, sent = await make_pipeline(store, uid, pending_max=3, retry_on_close_s=0.8)
    lost, failures = metrics.value("storage_segments_lost_total"), metrics.value("storage_write_failures_total")
    store.down = True
    for i in range(5):
        await say(pipeline, i * 40.0)  # 40 s apart: five segments (closer ones merge, as Omi merges them)
    assert len(sent) == 5  # every segment still reached the client
    assert metrics.value("storage_segments_lost_total") - lost == 2  # the two oldest dropped beyond the bound
    await pipeline.finish()  # storage still down: give up after STORAGE_RETRY_ON_CLOSE_S
    assert metrics.value("storage_segments_lost_total") - lost == 5
    assert metrics.value("storage_write_failures_total") - failures >= 2  # the write, then at least one retry
    store.down = False
    assert await store.list_segments(uid, link.conversation.id) == []


async def test_segments_kept_while_down_are_written_once_with_their_latest_text(store: FlakyStorage) -> None:
    uid = f"latest-{uuid.uuid4().hex[:8]}"
    _, link, pipeline, sent = await make_pipeline(store, uid)
    await say(pipeline, 0.0, end_utterance=False)
    store.down = True
    await say(pipeline, 1.0, end_utterance=False)  # the same segment grows while storage is down
    await say(pipeline, 2.0)
    await say(pipeline, 33.0)  # a new segment (30 s or more after the last one: Omi's merge rule)
    store.down = False
    await wait_until(lambda: not pipeline.writer.pending)
    await pipeline.finish()
    stored = await store.list_segments(uid, link.conversation.id)
    client = {s["id"]: s["text"] for message in sent for s in message}
    assert {s.id: s.text for s in stored} == client
    assert [len(s.text.split()) for s in stored] == [6, 2]


async def test_words_after_a_close_leave_the_closed_conversations_segments_where_they_are(store: FlakyStorage) -> None:
    """A close (the sweep, or POST /v1/conversations on any replica) while the speaker goes on: the next words would
    extend the closed conversation's last segment (same id). That segment stays in the closed conversation as it was
    closed; the new words go to the new conversation under a new id, and the client gets them once."""
    uid = f"extend-{uuid.uuid4().hex[:8]}"
    service, link, pipeline, sent = await make_pipeline(store, uid)
    await say(pipeline, 1.0)
    first = link.conversation
    [closed_seg] = await store.list_segments(uid, first.id)
    await service.close(first)
    await say(pipeline, 2.0)  # the same speaker within 30 s: it would extend the closed segment
    second = link.conversation
    assert second.id != first.id
    assert [(s.id, s.text) for s in await store.list_segments(uid, first.id)] == [(closed_seg.id, closed_seg.text)]
    [new_seg] = await store.list_segments(uid, second.id)
    assert new_seg.id != closed_seg.id and new_seg.text == "w2.00 w2.50"
    last = sent[-1]
    assert [(s["id"], s["text"]) for s in last] == [(new_seg.id, "w2.00 w2.50")]  # the client: new words, once
    assert all(not (s["id"] == closed_seg.id and s["text"] != closed_seg.text) for m in sent for s in m)
