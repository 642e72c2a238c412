"""The migration guide's setting names, read from the environment as an Omi deployment sets them:
SERVICE_ACCOUNT_JSON (the service account's JSON text itself, or a path), HTTP_GET_TIMEOUT and HTTP_PUT_TIMEOUT,
MODEL_CACHE_DIR, LAZY_MODELS; and the internal-caller networks, checked at start."""

from __future__ import annotations

import json

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from config import Settings
from notify import ChannelNotifier, NotificationError
from storage.base import User


def service_account(project: str = "omi-test-project") -> dict:
    """A well-formed service-account key (a fresh RSA key; never valid at Google)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": project, "private_key_id": "k1", "private_key": pem,
            "client_email": f"sa@{project}.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token"}


@pytest.fixture
def env(monkeypatch):
    """Settings from the environment only (no .env): each call sets exactly the given names."""
    names = ("SERVICE_ACCOUNT_JSON", "FIREBASE_CREDENTIALS", "FIREBASE_PROJECT_ID", "HTTP_GET_TIMEOUT",
             "HTTP_PUT_TIMEOUT", "MODEL_CACHE_DIR", "LAZY_MODELS", "INTERNAL_NETWORKS", "INTERNAL_API_KEY")

    def settings(**values: str) -> Settings:
        for name in names:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return Settings(_env_file=None)

    return settings


def test_service_account_json_text_configures_firebase(env):
    from firebase_admin import credentials

    account = service_account()
    s = env(SERVICE_ACCOUNT_JSON=json.dumps(account))
    assert s.firebase_enabled
    certificate = s.firebase_certificate()
    assert certificate == account
    assert credentials.Certificate(certificate).project_id == "omi-test-project"  # what firebase_app() builds
    assert account["private_key"] not in repr(s)  # a secret: never in a repr or a log line


def test_service_account_json_may_be_a_path_and_wins_over_firebase_credentials(env, tmp_path):
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(service_account()), encoding="utf-8")
    s = env(SERVICE_ACCOUNT_JSON=str(path), FIREBASE_CREDENTIALS=str(tmp_path / "other.json"))
    assert s.firebase_certificate() == str(path)
    assert env(FIREBASE_CREDENTIALS=str(tmp_path / "other.json")).firebase_certificate() == str(tmp_path / "other.json")


def test_service_account_json_that_is_not_json_fails_clearly(env):
    s = env(SERVICE_ACCOUNT_JSON='{"type": "service_account", "private_key": ')
    with pytest.raises(ValueError, match="SERVICE_ACCOUNT_JSON is not valid JSON") as failed:
        s.firebase_certificate()
    assert "private_key" not in str(failed.value)


def test_no_firebase_without_any_credential(env):
    s = env()
    assert not s.firebase_enabled and s.firebase_certificate() is None


def test_guide_names_for_timeouts_model_cache_and_lazy_loading(env):
    s = env(HTTP_GET_TIMEOUT="12", HTTP_PUT_TIMEOUT="240", MODEL_CACHE_DIR="/srv/models", LAZY_MODELS="true")
    assert (s.http_get_timeout, s.http_put_timeout, str(s.model_cache_dir), s.lazy_models) == (12, 240,
                                                                                                "/srv/models", True)
    defaults = env()
    assert str(defaults.model_cache_dir) == "pretrained_models" and not defaults.lazy_models


async def test_webhooks_use_both_timeouts(env, tmp_path):
    """HTTP_GET_TIMEOUT bounds connecting and the answer, HTTP_PUT_TIMEOUT sending the body."""
    s = env(HTTP_GET_TIMEOUT="7", HTTP_PUT_TIMEOUT="123")
    notifier = ChannelNotifier(s)
    try:  # nothing listens on this port: the send fails, the client and its timeouts remain
        with pytest.raises(NotificationError):
            await notifier._send_webhook(User("u1", webhook_url="http://127.0.0.1:9/hook"), "t", "b")
        timeout = notifier._http.timeout
        assert isinstance(timeout, httpx.Timeout)
        assert (timeout.connect, timeout.read, timeout.write) == (7, 7, 123)
    finally:
        await notifier.aclose()


def test_internal_networks_parsed_and_checked_at_start(env):
    s = env(INTERNAL_NETWORKS="10.0.0.0/8, fd00::/8")
    assert [str(n) for n in s.internal_network_list()] == ["10.0.0.0/8", "fd00::/8"]
    assert env(INTERNAL_NETWORKS="").internal_network_list() == []
    with pytest.raises(ValidationError):
        env(INTERNAL_NETWORKS="10.0.0.0/8,not-a-network")
