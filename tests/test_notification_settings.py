"""A user registers for the scheduled notifications through the API, and the jobs reach them: the real app (its
lifespan, routes, SQLite storage, job runner and webhook dispatcher) in process, so the job's clock can be moved
(`check_notifications(now)`); the routes are called over HTTP (Starlette's TestClient), the day_summary webhook goes
to a real HTTP server on 127.0.0.1. Firebase is not configured (no FCM here), so the notifications go to the log
channel, whose INFO line the test reads."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from zoneinfo import ZoneInfo

import pytest
from starlette.testclient import TestClient
from test_jobs import WebhookServer, at, webhook  # noqa: F401 - webhook is a fixture

from config import Settings
from server import create_app
from storage.base import Conversation, Segment

ADMIN_KEY = "notify-admin-key-0123456789abcdef0123"
KOLKATA = ZoneInfo("Asia/Kolkata")  # UTC+05:30: a half-hour zone, so 08:00 there is no full hour in UTC


@pytest.fixture
def app(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, admin_key=ADMIN_KEY, firebase_credentials=None,
                        firebase_project_id=None, jobs_enabled=False, stt_backend="local",
                        webhook_allow_private=True, notify_check_interval_s=60)
    return create_app(settings)


def as_user(uid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}{uid}"}


def check(client: TestClient, now: float) -> str:
    """One tick of the daily-notifications job at `now` (the job's clock moved there)."""
    return client.portal.call(client.app.state.jobs.check_notifications, now)


def test_fcm_token_and_time_zone_through_the_api_bring_the_0800_notification(app, caplog):
    caplog.set_level(logging.INFO, logger="notify")
    with TestClient(app) as client:
        r = client.post("/v1/users/fcm-token", json={"fcm_token": "device-token-1", "time_zone": "Asia/Kolkata"},
                        headers=as_user("ana"))
        assert r.status_code == 200 and r.json() == {"status": "Ok"}
        day = dt.date.today() + dt.timedelta(days=1)
        morning = at(KOLKATA, day.year, day.month, day.day, 8, 0)
        assert check(client, morning - 1) == "sent 0"  # 07:59:59 in Kolkata
        assert check(client, morning) == "sent 1 (morning ana via log)"
        assert check(client, morning + 30) == "sent 0"  # once
        utc_eight = at(dt.UTC, day.year, day.month, day.day, 8, 0)
        assert check(client, utc_eight) == "sent 0"  # 08:00 UTC is 13:30 for her
        lines = [r.getMessage() for r in caplog.records if r.name == "notify"]
        assert any("notification for ana" in line for line in lines), lines
        assert not any("device-token-1" in r.getMessage() for r in caplog.records)  # the token is never logged

        # A new zone through the same route moves her 08:00 (from the next day: one reminder per local date).
        client.post("/v1/users/fcm-token", json={"fcm_token": "device-token-2", "time_zone": "America/New_York"},
                    headers=as_user("ana"))
        ny, nxt = ZoneInfo("America/New_York"), day + dt.timedelta(days=1)
        assert check(client, at(KOLKATA, nxt.year, nxt.month, nxt.day, 8, 0)) == "sent 0"
        assert check(client, at(ny, nxt.year, nxt.month, nxt.day, 8, 0)) == "sent 1 (morning ana via log)"


@pytest.mark.parametrize("body", [
    {"fcm_token": "t", "time_zone": "Mars/Olympus_Mons"},
    {"fcm_token": "t", "time_zone": "../../etc/passwd"},
    {"fcm_token": "", "time_zone": "UTC"},
    {"fcm_token": "t"},
    {"fcm_token": "t" * 5000, "time_zone": "UTC"},
    {"fcm_token": ["t"], "time_zone": "UTC"},
])
def test_bad_fcm_token_requests_are_422_and_store_nothing(app, body):
    with TestClient(app) as client:
        r = client.post("/v1/users/fcm-token", json=body, headers=as_user("bo"))
        assert r.status_code == 422 and r.json()["detail"], r.text
        assert client.portal.call(client.app.state.storage.get_user, "bo") is None


def test_day_summary_settings_decide_the_evening_notification_and_webhook(app, webhook):  # noqa: F811
    uid = "cy"
    with TestClient(app) as client:
        client.post("/v1/users/fcm-token", json={"fcm_token": "tok", "time_zone": "Asia/Kolkata"},
                    headers=as_user(uid))
        assert client.get("/v1/users/daily-summary-settings", headers=as_user(uid)).json() == {
            "enabled": True, "hour": 22}
        r = client.post("/v1/users/developer/webhook/day_summary", json={"url": f"{webhook.url}/day"},
                        headers=as_user(uid))
        assert r.status_code == 200, r.text
        day = dt.date.today() + dt.timedelta(days=1)
        nxt = day + dt.timedelta(days=1)
        for d in (day, nxt):  # a conversation each day: an evening without one sends nothing anyway
            started = at(KOLKATA, d.year, d.month, d.day, 10, 0)
            conv = Conversation(uid=uid, status="completed", started_at=started, last_activity_at=started,
                                title="Standup")
            store = client.app.state.storage
            client.portal.call(store.save_conversation, conv)
            client.portal.call(store.upsert_segments, uid, [
                Segment(uuid.uuid4().hex, conv.id, "hello", "SPEAKER_0", 0, True, None, 0.0, 1.0)])

        assert client.patch("/v1/users/daily-summary-settings", json={"hour": 19},
                            headers=as_user(uid)).json() == {"status": "ok"}
        assert check(client, at(KOLKATA, day.year, day.month, day.day, 22, 0)) == "sent 0"  # moved away from 22:00
        assert check(client, at(KOLKATA, day.year, day.month, day.day, 19, 0)) == "sent 1 (evening cy via log)"
        deadline = time.monotonic() + 10
        while not webhook.to(uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        [summary] = webhook.to(uid)
        assert summary["summary"] == "1 conversation today: Standup" and summary["uid"] == uid
        assert dt.datetime.fromisoformat(summary["created_at"])
        assert [r["path"] for r in webhook.received] == [f"/day?uid={uid}"]

        # Turned off: neither the notification nor the webhook the next evening.
        client.patch("/v1/users/daily-summary-settings", json={"enabled": False}, headers=as_user(uid))
        assert client.get("/v1/users/daily-summary-settings", headers=as_user(uid)).json() == {
            "enabled": False, "hour": 19}
        assert check(client, at(KOLKATA, nxt.year, nxt.month, nxt.day, 19, 0)) == "sent 0"
        for bad in ({"hour": 24}, {"hour": -1}, {"enabled": "maybe"}, {}):
            r = client.patch("/v1/users/daily-summary-settings", json=bad, headers=as_user(uid))
            assert r.status_code in (400, 422) and r.json()["detail"], (bad, r.text)
        client.patch("/v1/users/daily-summary-settings", json={"enabled": True}, headers=as_user(uid))
        # the control: on again, the evening after that does go out (a do-nothing "off" would have sent above)
        assert check(client, at(KOLKATA, nxt.year, nxt.month, nxt.day, 19, 0)) == "sent 1 (evening cy via log)"
        deadline = time.monotonic() + 10
        while len(webhook.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(webhook.received) == 2
