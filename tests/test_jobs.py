"""Scheduled jobs on a real SQLite file (and the real PostgreSQL where storage/postgres.py exists): the sweep,
failure recording and retry, once-per-tick across two runners ("replicas"), daily notifications in users' time
zones (a real webhook POST to a local HTTP server), retention, and `GET /v1/jobs`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI

from auth import Authenticator
from config import Settings
from conversations import ConversationService
from jobs import MORNING, JobRunner, router, user_zone
from storage.base import Conversation, Segment, Storage, User
from storage.sqlite import SqliteStorage

REPO = Path(__file__).resolve().parents[1]
PG_DSN = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TICK_S = 0.2
BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")


def settings(tmp_path: Path, **overrides) -> Settings:
    base = {"data_dir": tmp_path, "admin_key": None, "firebase_credentials": None, "firebase_project_id": None,
            "sweep_interval_s": 3600, "notify_check_interval_s": 60, "retention_days": 0, "job_lease_s": 30}
    return Settings(_env_file=None, **{**base, **overrides})


async def open_sqlite(path: Path) -> SqliteStorage:
    store = SqliteStorage(path)
    await store.open()
    return store


@pytest.fixture
async def storage(tmp_path) -> AsyncIterator[SqliteStorage]:
    store = await open_sqlite(tmp_path / "jobs.sqlite3")
    yield store
    await store.close()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def at(zone: ZoneInfo | dt.timezone, *args: int) -> float:
    return dt.datetime(*args, tzinfo=zone).timestamp()


async def add_conversation(store: Storage, uid: str, started_at: float, *, status: str = "completed",
                           title: str | None = None, texts: tuple[str, ...] = (), last_activity_at: float | None = None,
                           timeout_s: float = 120.0) -> Conversation:
    conv = Conversation(uid=uid, status=status, started_at=started_at, title=title, timeout_s=timeout_s,
                        last_activity_at=started_at if last_activity_at is None else last_activity_at)
    await store.save_conversation(conv)
    await store.upsert_segments(uid, [
        Segment(uuid.uuid4().hex, conv.id, text, "SPEAKER_0", 0, True, None, 2.0 * i, 2.0 * i + 1.5)
        for i, text in enumerate(texts)
    ])
    return conv


# -- sweep ---------------------------------------------------------------------------------------------------------


async def test_sweep_closes_expired_conversations_and_leaves_fresh_ones(tmp_path, storage):
    now = time.time()
    spoken = await add_conversation(storage, "ana", now - 3600, status="in_progress", last_activity_at=now - 600,
                                    texts=("Let's plan the launch for Friday.", "Sounds good to me."))
    silent = await add_conversation(storage, "ana", now - 3000, status="in_progress", last_activity_at=now - 600)
    other_user = await add_conversation(storage, "bob", now - 900, status="in_progress", last_activity_at=now - 300,
                                        texts=("Call the plumber tomorrow.",))
    fresh = await add_conversation(storage, "ana", now - 60, status="in_progress", last_activity_at=now - 5,
                                   texts=("Still talking here.",))
    runner = JobRunner(settings(tmp_path), storage, ConversationService(storage))

    result = await runner.run_now("sweep")

    assert result["ok"] and result["detail"] == "closed 3"
    closed = await storage.get_conversation("ana", spoken.id)
    assert closed.status == "completed" and closed.title == "Let's plan the launch for Friday."
    assert closed.finished_at is not None and closed.overview
    assert (await storage.get_conversation("ana", silent.id)).status == "discarded"
    assert (await storage.get_conversation("bob", other_user.id)).status == "completed"
    assert (await storage.get_conversation("ana", fresh.id)).status == "in_progress"
    last = (await storage.last_job_runs())["sweep"]
    assert last["ok"] and last["detail"] == "closed 3" and last["owner"] == runner.owner
    assert (await runner.run_now("sweep"))["detail"] == "closed 0"  # nothing closes twice
    await runner.shutdown()


async def test_prune_job_runs_runs_daily_and_keeps_the_latest_run_of_each_job(tmp_path, storage):
    runner = JobRunner(settings(tmp_path, job_runs_keep_days=7), storage, ConversationService(storage))
    for _ in range(3):
        await runner.run_now("sweep")
    latest = (await storage.last_job_runs())["sweep"]
    assert (await runner.run_now("prune_job_runs"))["detail"].startswith("deleted 0 runs older than")  # all fresh
    week_later = time.time() + 7 * 86400 + 60
    # the first 2 sweeps go; the last sweep and the one prune_job_runs run are their jobs' latest
    assert (await runner.prune_job_runs(week_later)).startswith("deleted 2 runs")
    assert (await storage.last_job_runs())["sweep"] == latest
    assert {j["name"]: j["interval_s"] for j in await runner.status()}["prune_job_runs"] == 86400
    await runner.shutdown()


# -- failures are recorded, logged and retried on the next tick -------------------------------------------------------


async def test_a_failing_job_is_recorded_logged_and_runs_again_on_the_next_tick(tmp_path, storage, caplog):
    runner = JobRunner(settings(tmp_path, notify_check_interval_s=3600), storage, ConversationService(storage))
    calls: list[float] = []
    seen_by_second_call: list[dict | None] = []

    async def flaky(now: float) -> str:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("boom on the first tick")
        if len(calls) == 2:  # what the first tick left behind
            seen_by_second_call.append((await storage.last_job_runs()).get("flaky"))
        return f"fine at call {len(calls)}"

    runner.add_job("flaky", TICK_S, flaky)
    runner.start()
    try:
        await wait_until(lambda: len(calls) >= 3)
    finally:
        await runner.shutdown()

    first = seen_by_second_call[0]
    assert first is not None and first["ok"] is False
    assert first["detail"] == "RuntimeError: boom on the first tick" and first["owner"] == runner.owner
    errors = [r for r in caplog.records
              if r.name == "jobs" and r.levelno == logging.ERROR and "flaky" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None  # logged with its traceback, once
    assert "boom on the first tick" in caplog.text
    last = (await storage.last_job_runs())["flaky"]
    assert last["ok"] is True and last["detail"].startswith("fine at call")
    # the scheduler kept going after the failure: the retry came with the next tick (the job sees tick times,
    # which are aligned to multiples of the interval)
    gaps = [(b - a) / TICK_S for a, b in zip(calls, calls[1:], strict=False)]
    assert all(g == pytest.approx(round(g)) and round(g) >= 1 for g in gaps), gaps
    assert round(gaps[0]) <= 2, gaps
    assert not runner.running


# -- once per tick across replicas ------------------------------------------------------------------------------------


class CountingConversations(ConversationService):
    def __init__(self, storage: Storage, calls: list[float]) -> None:
        super().__init__(storage)
        self.calls = calls

    async def close_expired(self, now: float | None = None) -> int:
        self.calls.append(time.time())
        return await super().close_expired(now)


@pytest.fixture(params=["sqlite", "postgres"])
async def two_replicas_storage(request, tmp_path) -> AsyncIterator[tuple[Storage, Storage]]:
    """Two storage objects on one database, as two replicas would have."""
    if request.param == "sqlite":
        a, b = await open_sqlite(tmp_path / "shared.sqlite3"), await open_sqlite(tmp_path / "shared.sqlite3")
        yield a, b
        await a.close()
        await b.close()
        return
    if not (REPO / "storage" / "postgres.py").exists():
        pytest.skip("storage/postgres.py does not exist yet")
    import asyncpg

    from storage.postgres import PostgresStorage

    schema = f"jobs_test_{uuid.uuid4().hex[:10]}"
    try:
        a = PostgresStorage(PG_DSN, schema=schema, min_size=1, max_size=2)
        await a.open()
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at {PG_DSN.rsplit('@', 1)[-1]} unavailable: {type(exc).__name__}")
    b = PostgresStorage(PG_DSN, schema=schema, min_size=1, max_size=2)
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        con = await asyncpg.connect(PG_DSN)
        try:
            await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await con.close()


async def test_two_replicas_run_each_sweep_tick_once_in_total(tmp_path, two_replicas_storage):
    store_a, store_b = two_replicas_storage
    now = time.time()
    expired = await add_conversation(store_a, "ana", now - 3600, status="in_progress", last_activity_at=now - 600,
                                     texts=("Only one replica may close me.",))
    calls: list[float] = []
    s = settings(tmp_path, sweep_interval_s=TICK_S, notify_check_interval_s=3600)
    a = JobRunner(s, store_a, CountingConversations(store_a, calls), owner="replica-a")
    b = JobRunner(s, store_b, CountingConversations(store_b, calls), owner="replica-b")
    a.start()
    b.start()
    try:
        await asyncio.sleep(8 * TICK_S)
    finally:
        await a.shutdown()
        await b.shutdown()

    ticks = [round(t / TICK_S) for t in calls]
    assert len(calls) >= 5, calls
    assert len(set(ticks)) == len(ticks), f"a tick ran twice: {ticks}"  # once per tick in total ...
    assert a.won["sweep"] + b.won["sweep"] == len(calls)
    # ... although both replicas tried every tick (one may have seen one tick more than the other)
    assert min(a.attempts["sweep"], b.attempts["sweep"]) >= len(calls) - 1
    assert max(a.attempts["sweep"], b.attempts["sweep"]) <= len(calls)
    assert a.attempts["sweep"] + b.attempts["sweep"] >= 2 * len(calls) - 1
    closed = await store_b.get_conversation("ana", expired.id)
    assert closed.status == "completed" and closed.title == "Only one replica may close me."
    last = (await store_a.last_job_runs())["sweep"]
    assert last["ok"] and last["owner"] in {"replica-a", "replica-b"}


# -- daily notifications ----------------------------------------------------------------------------------------------


class WebhookServer:
    """A real HTTP server on 127.0.0.1: records every POST; /fail answers 500."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                 "json": json.loads(body)})
                self.send_response(500 if self.path.startswith("/fail") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def to(self, uid: str) -> list[dict]:
        return [r["json"] for r in self.received if r["json"]["uid"] == uid]


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    server = WebhookServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_user_zone_falls_back_to_utc():
    assert user_zone("Europe/Berlin") == BERLIN
    assert user_zone("Not/AZone") == dt.UTC and user_zone("") == dt.UTC and user_zone("../etc/passwd") == dt.UTC


async def test_daily_notifications_go_out_once_per_user_in_their_time_zone(tmp_path, storage, webhook, caplog):
    caplog.set_level(logging.DEBUG, logger="notify")
    await storage.save_user(User("ana", time_zone="Europe/Berlin", webhook_url=f"{webhook.url}/hook?token=SECRET-1"))
    await storage.save_user(User("bob", time_zone="America/New_York"))  # no FCM token, no webhook: the log
    await storage.save_user(User("cy", time_zone="Not/AZone"))  # unknown zone: UTC
    s = settings(tmp_path, notify_check_interval_s=60)
    second_store = await open_sqlite(storage.path)  # the second replica's own connection to the same database
    a = JobRunner(s, storage, ConversationService(storage), owner="replica-a")
    b = JobRunner(s, second_store, ConversationService(second_store), owner="replica-b")
    try:
        # 08:00 in Berlin (06:00 UTC, 02:00 in New York): only ana's morning reminder, however often it is checked
        morning = at(BERLIN, 2025, 6, 2, 8, 0)
        details = [await a.check_notifications(morning) for _ in range(3)]
        details += [await b.check_notifications(morning), await a.check_notifications(morning + 30)]
        assert details[0] == "sent 1 (morning ana via webhook)"
        assert details[1:] == ["sent 0"] * 4
        assert await a.check_notifications(morning - 1) == "sent 0"  # 07:59:59: not yet
        assert await a.check_notifications(morning + 60) == "sent 0"  # the window is one check interval
        assert [r["path"] for r in webhook.received] == ["/hook?token=SECRET-1"]
        assert webhook.received[0]["content_type"] == "application/json"
        assert webhook.to("ana") == [{"title": MORNING[0], "body": MORNING[1], "uid": "ana"}]

        # 08:00 UTC: cy (unknown zone → UTC), to the log; 08:00 in New York: bob, to the log
        assert await b.check_notifications(at(dt.UTC, 2025, 6, 2, 8, 0)) == "sent 1 (morning cy via log)"
        assert await a.check_notifications(at(dt.UTC, 2025, 6, 2, 8, 0)) == "sent 0"
        assert await a.check_notifications(at(NEW_YORK, 2025, 6, 2, 8, 0)) == "sent 1 (morning bob via log)"
        def logged_lines(uid: str) -> list[str]:
            """The text sent to the log channel (DEBUG); the INFO line says only that it went there."""
            info = [r.getMessage() for r in caplog.records if r.name == "notify" and r.levelno >= logging.INFO
                    and r.getMessage().startswith(f"notification for {uid} (no push channel)")]
            texts = [r.getMessage() for r in caplog.records if r.name == "notify" and r.levelno == logging.DEBUG
                     and r.getMessage().startswith(f"notification text for {uid}: ")]
            assert len(info) == len(texts) and not any(MORNING[0] in line or "Your day" in line for line in info)
            return texts

        assert logged_lines("cy") == [f"notification text for cy: {MORNING[0]} | {MORNING[1]}"]
        assert logged_lines("bob") == [f"notification text for bob: {MORNING[0]} | {MORNING[1]}"]

        # 22:00 in Berlin: ana's summary of her Berlin day 2025-06-02, oldest first
        await add_conversation(storage, "ana", at(BERLIN, 2025, 6, 2, 0, 30), title="Night owl chat")  # 22:30 UTC
        await add_conversation(storage, "ana", at(BERLIN, 2025, 6, 2, 9, 30), title="Planning the launch")
        await add_conversation(storage, "ana", at(BERLIN, 2025, 6, 2, 14, 0), title="Lunch with Sam")
        await add_conversation(storage, "ana", at(BERLIN, 2025, 6, 1, 23, 30), title="Yesterday's talk")
        await add_conversation(storage, "ana", at(BERLIN, 2025, 6, 2, 11, 0), status="discarded")
        await add_conversation(storage, "ana", at(BERLIN, 2025, 6, 2, 12, 0), status="in_progress")
        # bob's conversation is on ana's day 2025-06-02 (03:00 Berlin) but on his New York day 2025-06-01
        await add_conversation(storage, "bob", at(BERLIN, 2025, 6, 2, 3, 0), title="Bob's meeting")
        evening = at(BERLIN, 2025, 6, 2, 22, 0)
        assert await b.check_notifications(evening) == "sent 1 (evening ana via webhook)"
        assert await a.check_notifications(evening) == "sent 0"
        assert await a.check_notifications(evening + 59) == "sent 0"
        summary = webhook.to("ana")[-1]
        assert summary == {"title": "Your day", "uid": "ana",
                           "body": "3 conversations today: Night owl chat; Planning the launch; Lunch with Sam"}
        assert len(webhook.to("ana")) == 2
        # bob had no completed conversation on his New York day 2025-06-02: no summary; on 2025-06-01 one
        assert await a.check_notifications(at(NEW_YORK, 2025, 6, 2, 22, 0)) == "sent 0"
        assert await a.check_notifications(at(NEW_YORK, 2025, 6, 1, 22, 0)) == "sent 1 (evening bob via log)"
        assert webhook.to("bob") == [] and webhook.to("cy") == []
        assert logged_lines("bob")[-1] == "notification text for bob: Your day | 1 conversation today: Bob's meeting"
        assert "SECRET-1" not in caplog.text
    finally:
        await a.shutdown()
        await b.shutdown()
        await second_store.close()


async def test_a_failed_notification_is_recorded_without_the_webhook_secret(tmp_path, storage, webhook, caplog):
    await storage.save_user(User("dee", time_zone="Europe/Berlin", webhook_url=f"{webhook.url}/fail?token=SECRET-2"))
    await storage.save_user(User("eve", time_zone="Europe/Berlin", webhook_url=f"{webhook.url}/hook"))
    runner = JobRunner(settings(tmp_path), storage, ConversationService(storage))
    try:
        result = await runner.run_now("daily_notifications", now=at(BERLIN, 2025, 6, 2, 8, 0))
    finally:
        await runner.shutdown()
    assert result["ok"] is False
    assert result["detail"] == "sent 1 (morning eve via webhook); failed 1 (morning dee: NotificationError)"
    assert len(webhook.to("dee")) == 1 and len(webhook.to("eve")) == 1  # one failing user does not stop the others
    runs = await storage.last_job_runs()
    assert runs["daily_notifications"]["ok"] is False
    assert f"{webhook.url}/fail: HTTP 500" in caplog.text
    assert "SECRET-2" not in caplog.text and "SECRET-2" not in json.dumps(runs)


# -- retention --------------------------------------------------------------------------------------------------------


async def test_retention_deletes_old_conversations_only_when_enabled(tmp_path, storage):
    now = time.time()
    old = await add_conversation(storage, "ana", now - 40 * 86400, title="Old", texts=("An old talk.",))
    recent = await add_conversation(storage, "ana", now - 86400, title="Recent", texts=("A recent talk.",))
    other = await add_conversation(storage, "bob", now - 31 * 86400, title="Bob's old")

    off = JobRunner(settings(tmp_path), storage, ConversationService(storage))
    off.start()
    assert [j["name"] for j in await off.status()] == ["sweep", "daily_notifications", "prune_job_runs"]
    with pytest.raises(KeyError):
        await off.run_now("retention")
    await off.shutdown()

    on = JobRunner(settings(tmp_path, retention_days=30), storage, ConversationService(storage))
    on.start()
    try:
        jobs = {j["name"]: j for j in await on.status()}
        assert list(jobs) == ["sweep", "daily_notifications", "retention", "prune_job_runs"]
        next_run = dt.datetime.fromisoformat(jobs["retention"]["next_run"])
        assert (next_run.hour, next_run.minute, next_run.second) == (0, 0, 0)  # daily at 00:00 UTC
        assert 0 < next_run.timestamp() - now <= 86400
        result = await on.run_now("retention")
    finally:
        await on.shutdown()
    assert result["ok"] and result["detail"].startswith("deleted 2 started before")
    assert await storage.get_conversation("ana", old.id) is None
    assert await storage.list_segments("ana", old.id) == []
    assert await storage.get_conversation("bob", other.id) is None
    assert (await storage.get_conversation("ana", recent.id)).title == "Recent"
    assert len(await storage.list_segments("ana", recent.id)) == 1


# -- GET /v1/jobs -----------------------------------------------------------------------------------------------------


JOBS_ADMIN_KEY = "jobs-admin-key-3e9b1c7a5d2f8e4b0c"  # ADMIN_KEY_MIN_CHARS (32) or more


def jobs_app(s: Settings, runner: JobRunner) -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    app.state.jobs = runner
    app.state.authenticator = Authenticator(s)
    return app


async def test_jobs_route_is_admin_only(tmp_path, storage):
    s = settings(tmp_path, admin_key=JOBS_ADMIN_KEY)
    runner = JobRunner(s, storage, ConversationService(storage))
    runner.start()
    try:
        await runner.run_now("sweep")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=jobs_app(s, runner)),
                                     base_url="http://test") as client:
            response = await client.get("/v1/jobs", headers={"Authorization": JOBS_ADMIN_KEY})
            assert response.status_code == 200
            jobs = {j["name"]: j for j in response.json()}
            assert list(jobs) == ["sweep", "daily_notifications", "prune_job_runs"]
            assert set(jobs["sweep"]) == {"name", "interval_s", "next_run", "last_result"}
            assert dt.datetime.fromisoformat(jobs["sweep"]["next_run"]).timestamp() > time.time() - 1
            last = jobs["sweep"]["last_result"]
            assert last["ok"] is True and last["detail"] == "closed 0" and last["owner"] == runner.owner
            assert dt.datetime.fromisoformat(last["finished_at"]).timestamp() == pytest.approx(time.time(), abs=30)
            assert jobs["daily_notifications"]["last_result"] is None
            # an admin acting for a uid is still the admin
            assert (await client.get("/v1/jobs", headers={"Authorization": JOBS_ADMIN_KEY + "ana"})).status_code == 200
            assert (await client.get("/v1/jobs")).status_code == 401
            assert (await client.get("/v1/jobs", headers={"Authorization": "Bearer ana"})).status_code == 401
            assert (await client.get("/v1/jobs", headers={"Authorization": "wrong-key"})).status_code == 401

        # a plain user (the development mode: no admin key, no Firebase, loopback "Bearer <uid>") is refused
        open_settings = settings(tmp_path)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=jobs_app(open_settings, runner)),
                                     base_url="http://test") as client:
            response = await client.get("/v1/jobs", headers={"Authorization": "Bearer ana"})
            assert response.status_code == 403
            assert (await client.get("/v1/jobs")).status_code == 401
    finally:
        await runner.shutdown()
