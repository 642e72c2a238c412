"""The developer-webhook settings routes at Omi's paths and shapes (`routers/users.py`, `routers/webhook_signing.py`):
the real app in process (lifespan, SQLite, auth with an admin key) called over HTTP with Starlette's TestClient.
Delivery itself is tested against a real server process in test_webhook_server.py."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from config import Settings
from server import create_app

ADMIN_KEY = "webhook-routes-admin-key-0123456789ab"
BASE = "/v1/users/developer"


def make_app(tmp_path, **overrides):
    settings = Settings(_env_file=None, data_dir=tmp_path, admin_key=ADMIN_KEY, firebase_credentials=None,
                        firebase_project_id=None, jobs_enabled=False, stt_backend="local", **overrides)
    return create_app(settings)


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path), headers={"Authorization": f"Bearer {ADMIN_KEY}ana"}) as c:
        yield c


def test_set_get_enable_disable_and_status_as_omi(client):
    assert client.get(f"{BASE}/webhooks/status").json() == {
        "audio_bytes": False, "memory_created": False, "realtime_transcript": False, "day_summary": False}
    assert client.get(f"{BASE}/webhook/audio_bytes").json() == {"url": ""}
    r = client.post(f"{BASE}/webhook/audio_bytes", json={"url": "https://hooks.example.com/audio,7"})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert client.get(f"{BASE}/webhook/audio_bytes").json() == {"url": "https://hooks.example.com/audio,7"}
    assert client.post(f"{BASE}/webhook/memory_created", json={"url": "https://hooks.example.com/m"}).status_code == 200
    # never enabled or disabled: on when it has a URL (Omi's first-time rule)
    assert client.get(f"{BASE}/webhooks/status").json() == {
        "audio_bytes": True, "memory_created": True, "realtime_transcript": False, "day_summary": False}
    assert client.post(f"{BASE}/webhook/memory_created/disable").json() == {"status": "ok"}
    assert client.get(f"{BASE}/webhooks/status").json()["memory_created"] is False
    assert client.get(f"{BASE}/webhook/memory_created").json() == {"url": "https://hooks.example.com/m"}
    assert client.post(f"{BASE}/webhook/memory_created/enable").json() == {"status": "ok"}
    assert client.get(f"{BASE}/webhooks/status").json()["memory_created"] is True
    # "" or "," clears the URL and turns the webhook off (Omi)
    for cleared in ("", ","):
        client.post(f"{BASE}/webhook/audio_bytes", json={"url": "https://hooks.example.com/a,3"})
        assert client.post(f"{BASE}/webhook/audio_bytes", json={"url": cleared}).status_code == 200
        assert client.get(f"{BASE}/webhooks/status").json()["audio_bytes"] is False


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/hook", "http://localhost/hook", "http://10.1.2.3/x", "http://169.254.169.254/latest",
    "http://[::1]/x", "http://192.168.0.10/x", "ftp://hooks.example.com/x", "file:///etc/passwd",
    "https://", "not a url", "https://hooks.example.com/a b",
])
def test_bad_or_private_urls_are_400_and_change_nothing(client, url):
    client.post(f"{BASE}/webhook/realtime_transcript", json={"url": "https://hooks.example.com/ok"})
    r = client.post(f"{BASE}/webhook/realtime_transcript", json={"url": url})
    assert r.status_code == 400 and isinstance(r.json()["detail"], str), r.text
    assert client.get(f"{BASE}/webhook/realtime_transcript").json() == {"url": "https://hooks.example.com/ok"}


@pytest.mark.parametrize("url", ["https://hooks.example.com/a,0", "https://hooks.example.com/a,61",
                                 "https://hooks.example.com/a,x"])
def test_audio_interval_out_of_range_is_400(client, url):
    r = client.post(f"{BASE}/webhook/audio_bytes", json={"url": url})
    assert r.status_code == 400 and r.json()["detail"], r.text


def test_private_urls_allowed_when_configured(tmp_path):
    with TestClient(make_app(tmp_path, webhook_allow_private=True),
                    headers={"Authorization": f"Bearer {ADMIN_KEY}ana"}) as c:
        assert c.post(f"{BASE}/webhook/realtime_transcript", json={"url": "http://127.0.0.1:9/x"}).status_code == 200


@pytest.mark.parametrize("path,body", [
    (f"{BASE}/webhook/not_a_type", {"url": "https://hooks.example.com/x"}),
    (f"{BASE}/webhook/realtime_transcript", {}),
    (f"{BASE}/webhook/realtime_transcript", {"url": 5}),
    (f"{BASE}/webhook/realtime_transcript", {"url": "https://hooks.example.com/" + "x" * 3000}),
])
def test_malformed_requests_are_422(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 422 and r.json()["detail"], r.text


def test_signing_secret_is_shown_once_rotates_and_deletes(client):
    assert client.get(f"{BASE}/webhook-signing-secret").json() == {"configured": False}
    r = client.post(f"{BASE}/webhook-signing-secret")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    first = r.json()
    assert first["secret"].startswith("whsec_") and first["previous_valid_until"] is None
    status = client.get(f"{BASE}/webhook-signing-secret").json()
    assert status["configured"] is True and first["secret"] not in str(status)
    second = client.post(f"{BASE}/webhook-signing-secret").json()
    assert second["secret"] != first["secret"] and second["previous_valid_until"] > second["created_at"]
    assert client.delete(f"{BASE}/webhook-signing-secret").json() == {"status": "ok"}
    assert client.get(f"{BASE}/webhook-signing-secret").json() == {"configured": False}


def test_webhook_routes_need_a_user(tmp_path):
    with TestClient(make_app(tmp_path)) as c:
        for method, path in (("GET", f"{BASE}/webhooks/status"), ("POST", f"{BASE}/webhook-signing-secret"),
                             ("POST", "/v1/users/fcm-token")):
            r = c.request(method, path, json={})
            assert r.status_code == 401 and r.json()["detail"], (path, r.text)
        r = c.get(f"{BASE}/webhooks/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # admin, no uid
        assert r.status_code == 400 and r.json()["detail"]
