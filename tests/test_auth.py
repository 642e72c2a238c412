"""Who may call: `auth.Authenticator` rules as units, then a real server process with ADMIN_KEY set, over WebSocket.

Firebase ID-token verification needs Google's public keys over the network, so it is not exercised here."""

from __future__ import annotations

import pytest
from conftest import silence_frames, start_server, stop_server, stream_frames

from auth import Authenticator, AuthError, is_loopback
from config import Settings

ADMIN_KEY = "adm-secret-xyz"


def authenticator(admin_key: str | None = None) -> Authenticator:
    return Authenticator(Settings(_env_file=None, admin_key=admin_key, firebase_credentials=None,
                                  firebase_project_id=None))


# --- loopback mode (no ADMIN_KEY, no Firebase) -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "127.8.9.10"])
async def test_loopback_mode_accepts_bearer_uid_from_loopback(host):
    auth = authenticator()
    assert auth.open_loopback
    assert await auth.uid_for("Bearer user-1", host) == "user-1"
    assert await auth.uid_for("  bearer   someone@example.com ", host) == "someone@example.com"


@pytest.mark.parametrize("host", ["10.1.2.3", "2001:db8::1", "192.168.0.7", "", None, "example.com"])
async def test_loopback_mode_refuses_other_hosts(host):
    with pytest.raises(AuthError):
        await authenticator().uid_for("Bearer user-1", host)


@pytest.mark.parametrize("header", [
    None,
    "",
    "   ",
    "Bearer",
    "Bearer ",
    "Bearer two words",
    "Bearer " + "a" * 300,
    "Bearer bad/uid",
    "Basic dXNlcjpwdw==",
    "Token user-1",
    "user-1",
])
async def test_loopback_mode_refuses_bad_headers(header):
    with pytest.raises(AuthError):
        await authenticator().uid_for(header, "127.0.0.1")


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.1.2.3") and not is_loopback("2001:db8::1") and not is_loopback(None)
    assert not is_loopback("not-an-ip")


# --- ADMIN_KEY configured ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "2001:db8::1"])
async def test_admin_key_acts_for_uid(host):
    auth = authenticator(ADMIN_KEY)
    assert not auth.open_loopback
    assert await auth.uid_for(f"{ADMIN_KEY}user42", host) == "user42"


@pytest.mark.parametrize("header", [
    "adm-secret-abcuser42",  # wrong key, same length
    "adm-secretuser42",  # a prefix of the key
    "ADM-SECRET-XYZuser42",  # case matters
    "xadm-secret-xyzuser42",
    ADMIN_KEY,  # the key and no uid
    f"{ADMIN_KEY} user42",  # uid with a space
    f"{ADMIN_KEY}" + "u" * 300,  # uid too long
    "Bearer x",  # no loopback fallback once auth is configured
    f"Bearer {ADMIN_KEY}user42",
    "é" * 20,  # non-ASCII (headers arrive latin-1 decoded): refused, not a TypeError
    ADMIN_KEY[:-1] + "é" + "user42",
])
async def test_admin_key_refusals_never_echo_credentials(header):
    auth = authenticator(ADMIN_KEY)
    with pytest.raises(AuthError) as info:
        await auth.uid_for(header, "127.0.0.1")
    message = str(info.value)
    assert ADMIN_KEY not in message and ADMIN_KEY.lower() not in message.lower()
    assert header not in message
    for secret_part in ("secret", "xyz", "user42", "abc"):
        assert secret_part not in message


# --- a real server with ADMIN_KEY, over WebSocket ------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("auth"), ADMIN_KEY=ADMIN_KEY)
    yield server
    stop_server(server)


def _listen(server) -> str:
    return f"{server.ws}/v4/listen?codec=pcm16&sample_rate=16000"


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "adm-secret-abcuser42"},
    {"Authorization": "Bearer someone"},
    {"Authorization": f"Bearer {ADMIN_KEY}user42"},
    {"Authorization": "ééééééééééééééééé"},
], ids=["none", "wrong-key", "bearer-uid", "bearer-key", "non-ascii"])
async def test_websocket_refusals_close_1008(admin_server, headers):
    result = await stream_frames(_listen(admin_server), [], headers=headers, close=False, timeout_s=10)
    assert result.close_code == 1008, (result.close_code, result.events)
    errors = result.errors()
    assert [e["code"] for e in errors] == ["unauthorized"], result.events
    assert ADMIN_KEY not in errors[0]["message"] and ADMIN_KEY not in result.close_reason
    assert "ready" not in result.statuses()


async def test_websocket_admin_key_streams(admin_server):
    result = await stream_frames(_listen(admin_server), silence_frames(1.0),
                                 headers={"Authorization": f"{ADMIN_KEY}user42"},
                                 until=lambda r: "ready" in r.statuses(), timeout_s=30)
    assert "ready" in result.statuses(), result.events
    assert result.errors() == []
    assert result.close_code == 1000


async def test_server_log_never_holds_the_admin_key(admin_server):
    # Run after the streams above (same module server); make sure the log has content to look through.
    await stream_frames(_listen(admin_server), [], headers={"Authorization": "adm-secret-abcuser42"}, close=False,
                        timeout_s=10)
    log = admin_server.log()
    assert "uid=user42" in log  # the accepted stream was logged (with its uid, not the credential)
    assert ADMIN_KEY not in log
