"""Who may call: `auth.Authenticator` rules as units (user credentials, both admin-key forms, internal callers), then a
real server process with ADMIN_KEY set, over WebSocket. Internal callers on a real server: tests/test_omi_profiles.py.

Firebase ID-token verification needs Google's public keys over the network, so it is not exercised here."""

from __future__ import annotations

import contextlib
import socket

import httpx
import pytest
import server_process
from conftest import silence_frames, start_server, stop_server, stream_frames

from auth import PROXY_HEADERS, Authenticator, AuthError, is_loopback
from config import Settings

ADMIN_KEY = "adm-secret-xyz-4f1c9e2b7d3a8c6e5f01"  # ADMIN_KEY_MIN_CHARS (32) or more


def authenticator(admin_key: str | None = None, **settings) -> Authenticator:
    return Authenticator(Settings(_env_file=None, admin_key=admin_key, firebase_credentials=None,
                                  firebase_project_id=None, **settings))


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
    "Token",
    "Token two words",
    "user-1",
])
async def test_loopback_mode_refuses_bad_headers(header):
    with pytest.raises(AuthError):
        await authenticator().uid_for(header, "127.0.0.1")


async def test_token_scheme_is_bearer():
    """Deepgram's SDKs send `Token <key>`: the same credential as `Bearer <key>`, in each mode."""
    assert await authenticator().uid_for("Token user-1", "127.0.0.1") == "user-1"
    assert await authenticator().uid_for("token user-1", "::1") == "user-1"
    assert await authenticator(ADMIN_KEY).uid_for(f"Token {ADMIN_KEY}u1", "10.1.2.3") == "u1"
    with pytest.raises(AuthError):
        await authenticator(ADMIN_KEY).uid_for("Token wrong-key-u1", "10.1.2.3")


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.1.2.3") and not is_loopback("2001:db8::1") and not is_loopback(None)
    assert not is_loopback("not-an-ip")
    assert not is_loopback("testclient")  # starlette's in-process client has no hook in production code


@pytest.mark.parametrize("header", ["X-Forwarded-For", "x-real-ip", "Forwarded"])
async def test_loopback_mode_refuses_proxied_requests(header):
    from starlette.datastructures import Headers

    auth = authenticator()
    headers = Headers({"authorization": "Bearer user-1", header: "127.0.0.1"})
    with pytest.raises(AuthError, match="proxy"):
        await auth.caller("Bearer user-1", "127.0.0.1", headers)
    assert await auth.caller("Bearer user-1", "127.0.0.1", Headers({"authorization": "Bearer user-1"}))
    assert (await authenticator(ADMIN_KEY).caller(f"{ADMIN_KEY}u1", "10.1.2.3", headers)).uid == "u1"  # auth on


# --- ADMIN_KEY configured ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "2001:db8::1"])
@pytest.mark.parametrize("header", [
    f"{ADMIN_KEY}user42",  # bare: Omi's older backend, and ours so far
    f"Bearer {ADMIN_KEY}user42",  # Omi's current backend: the second part starts with the key
    f"bearer {ADMIN_KEY}user42",
    f"  Bearer {ADMIN_KEY}user42 ",
])
async def test_admin_key_acts_for_uid(host, header):
    auth = authenticator(ADMIN_KEY)
    assert not auth.open_loopback
    assert await auth.uid_for(header, host) == "user42"
    caller = await auth.caller(header, host)
    assert caller.admin and not caller.internal


@pytest.mark.parametrize("header", [ADMIN_KEY, f"Bearer {ADMIN_KEY}"])
async def test_admin_key_alone_acts_for_nobody(header):
    caller = await authenticator(ADMIN_KEY).caller(header, "10.1.2.3")
    assert caller.admin and caller.uid is None
    with pytest.raises(AuthError):
        await authenticator(ADMIN_KEY).uid_for(header, "10.1.2.3")


async def test_empty_admin_key_is_no_key():
    auth = authenticator("")
    assert auth.open_loopback
    with pytest.raises(AuthError):
        await auth.uid_for("user42", "127.0.0.1")


@pytest.mark.parametrize("header", [
    ADMIN_KEY[:-3] + "abcuser42",  # wrong key, same length
    ADMIN_KEY[:-1] + "user42",  # a prefix of the key
    ADMIN_KEY.upper() + "user42",  # case matters
    "x" + ADMIN_KEY + "user42",
    ADMIN_KEY,  # the key and no uid
    f"{ADMIN_KEY} user42",  # uid with a space
    f"{ADMIN_KEY}" + "u" * 300,  # uid too long
    "Bearer x",  # no loopback fallback once auth is configured
    f"Bearer {ADMIN_KEY[:-3]}abcuser42",  # Bearer form, wrong key
    f"Bearer {ADMIN_KEY} user42",  # three parts
    f"Bearer x {ADMIN_KEY}user42",
    f"Bearer {ADMIN_KEY}bad/uid",
    f"Bearer {ADMIN_KEY[:-1]}",
    "Bearer é" + ADMIN_KEY,
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
    for secret_part in ("secret", "xyz", "user42", "abc", ADMIN_KEY[-8:]):
        assert secret_part not in message


# --- internal callers (Omi's backend without user credentials) ----------------------------------------------------

INTERNAL_KEY = "int-key-7d1e9a"


def test_nothing_is_internal_without_configuration():
    auth = authenticator(ADMIN_KEY)
    assert not auth.internal_configured
    for host in ("127.0.0.1", "10.1.2.3", None):
        assert not auth.internal({"x-internal-key": INTERNAL_KEY}, host)
        assert not auth.internal({}, host)


@pytest.mark.parametrize("headers, internal", [
    ({"x-internal-key": INTERNAL_KEY}, True),
    ({"x-internal-key": INTERNAL_KEY + "x"}, False),
    ({"x-internal-key": INTERNAL_KEY[:-1]}, False),
    ({"x-internal-key": INTERNAL_KEY.upper()}, False),
    ({"x-internal-key": ""}, False),
    ({"x-internal-key": "é" * 10}, False),
    ({"authorization": INTERNAL_KEY}, False),
    ({}, False),
])
def test_internal_by_key(headers, internal):
    auth = authenticator(ADMIN_KEY, internal_api_key=INTERNAL_KEY)
    assert auth.internal_configured
    assert auth.internal(headers, "203.0.113.9") is internal
    assert auth.internal(headers, "127.0.0.1") is internal  # no network configured: the address does not count


@pytest.mark.parametrize("host, internal", [
    ("10.1.2.3", True),
    ("10.255.255.255", True),
    ("::ffff:10.1.2.3", True),  # an IPv4 client on a dual-stack socket
    ("fd00::1", True),
    ("11.1.2.3", False),
    ("127.0.0.1", False),
    ("2001:db8::1", False),
    ("testclient", False),
    ("", False),
    (None, False),
])
def test_internal_by_network(host, internal):
    auth = authenticator(ADMIN_KEY, internal_networks="10.0.0.0/8, fd00::/8")
    assert auth.internal({}, host) is internal
    assert auth.internal({"x-internal-key": "anything"}, host) is internal


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
    {"Authorization": ADMIN_KEY[:-3] + "abcuser42"},
    {"Authorization": "Bearer someone"},
    {"Authorization": f"Bearer {ADMIN_KEY[:-3]}abcuser42"},
    {"Authorization": f"Bearer {ADMIN_KEY}"},
    {"Authorization": "ééééééééééééééééé"},
], ids=["none", "wrong-key", "bearer-uid", "bearer-wrong-key", "bearer-key-no-uid", "non-ascii"])
async def test_websocket_refusals(admin_server, headers):
    """Refused before any message: HTTP 401/403 at the upgrade (a close before accept under uvicorn), or a close
    with 1008/4001/4004 after it (what Omi's own listen tests accept); the credential is never echoed."""
    from websockets.exceptions import InvalidStatus

    try:
        result = await stream_frames(_listen(admin_server), [], headers=headers, close=False, timeout_s=10)
    except InvalidStatus as exc:
        assert exc.response.status_code in (401, 403)
        assert ADMIN_KEY.encode() not in (exc.response.body or b"")
        return
    assert result.close_code in (1008, 4001, 4004), (result.close_code, result.events)
    assert all(e.get("type") == "error" for e in result.events), result.events
    assert all(ADMIN_KEY not in e.get("message", "") for e in result.events)
    assert ADMIN_KEY not in result.close_reason and not result.segments


@pytest.mark.parametrize("authorization", [f"{ADMIN_KEY}user42", f"Bearer {ADMIN_KEY}user42"], ids=["bare", "bearer"])
async def test_websocket_admin_key_streams(admin_server, authorization):
    result = await stream_frames(_listen(admin_server), silence_frames(1.0), headers={"Authorization": authorization},
                                 until=lambda r: "ready" in r.statuses(), timeout_s=30)
    assert "ready" in result.statuses(), result.events
    assert result.errors() == []
    assert result.close_code == 1000


async def test_server_log_never_holds_the_admin_key(admin_server):
    # Run after the streams above (same module server); make sure the log has content to look through.
    from websockets.exceptions import InvalidStatus

    with contextlib.suppress(InvalidStatus):  # refused at the upgrade, or closed after it
        await stream_frames(_listen(admin_server), [], headers={"Authorization": ADMIN_KEY[:-3] + "abcuser42"},
                            close=False, timeout_s=10)
    log = admin_server.log()
    assert "uid=user42" in log  # the accepted stream was logged (with its uid, not the credential)
    assert ADMIN_KEY not in log


# --- the close codes the newer app acts on (4001 refresh and reconnect, 4004 sign in again) ---------------------------


def test_firebase_failures_map_to_the_apps_close_codes():
    """firebase-admin's own exception types (constructed here: verifying real tokens needs Google's keys)."""
    from firebase_admin import auth as fb_auth

    from auth import _firebase_close_code

    cause = ValueError("x")
    assert _firebase_close_code(fb_auth.ExpiredIdTokenError("expired", cause)) == 4001
    assert _firebase_close_code(fb_auth.CertificateFetchError("no keys", cause)) == 4001
    assert _firebase_close_code(fb_auth.RevokedIdTokenError("revoked")) == 4004
    assert _firebase_close_code(fb_auth.UserDisabledError("disabled")) == 4004
    assert _firebase_close_code(fb_auth.InvalidIdTokenError("bad")) is None  # refused at the upgrade (1008)


@pytest.mark.parametrize("code", [4001, 4004, None])
def test_listen_closes_with_the_credentials_code_and_no_message(code):
    """The `/v4/listen` handler with an authenticator that fails as firebase-admin does for an expired or revoked
    token (a stand-in: no Firebase can run here): accepted and closed at once with that code, no message first;
    without a code, refused at the upgrade."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    import server

    class FailingAuthenticator:
        async def uid_for(self, authorization, host, headers=None):
            raise AuthError("invalid token (ExpiredIdTokenError)", code)

    app = FastAPI()
    app.state.settings = Settings(_env_file=None)
    app.state.authenticator = FailingAuthenticator()
    app.add_api_websocket_route("/v4/listen", server.listen)
    with TestClient(app, client=("127.0.0.1", 50000)) as client, pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/v4/listen", headers={"Authorization": "Bearer expired"}) as ws:
            ws.receive_text()  # the first receive fails: nothing was sent before the close
    assert closed.value.code == (code or 1008)


# --- ADMIN_KEY too short: the server refuses to start --------------------------------------------------------------


def test_short_admin_key_refuses_to_start_without_showing_it(tmp_path):
    short = "short-admin-key-31-chars-xxxxxx"
    assert len(short) == 31
    with pytest.raises(RuntimeError, match="server exited with [1-9]"):
        server_process.start_server(tmp_path, {"ADMIN_KEY": short}, timeout_s=60)
    (log_path,) = tmp_path.glob("server-*.log")
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert "ADMIN_KEY must be at least 32 characters" in log, log[-2000:]
    assert short not in log and short[:16] not in log


# --- loopback-only mode: requests that came through a proxy are refused -----------------------------------------------


def _non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if is_loopback(address) else address


@pytest.fixture(scope="module")
def forwarded_server(tmp_path_factory):
    """Loopback-only mode, on every interface, trusting proxy headers from anyone (`--forwarded-allow-ips '*'`): the
    deployment where uvicorn takes the client address from X-Forwarded-For."""
    server = server_process.start_server(tmp_path_factory.mktemp("forwarded"), {}, extra_args=[
        "--host", "0.0.0.0", "--proxy-headers", "--forwarded-allow-ips", "*"])
    yield server
    stop_server(server)


USER = {"Authorization": "Bearer proxy-user"}


@pytest.mark.parametrize("header, value", [("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "127.0.0.1"),
                                           ("Forwarded", "for=127.0.0.1")])
def test_http_through_a_proxy_is_refused_in_loopback_mode(local_server, header, value):
    assert httpx.get(f"{local_server.http}/v1/people", headers=USER, timeout=30).status_code == 200
    r = httpx.get(f"{local_server.http}/v1/people", headers={**USER, header: value}, timeout=30)
    assert r.status_code == 401, r.text
    assert "proxy" in r.json()["detail"]


async def test_websocket_through_a_proxy_is_refused_at_the_upgrade(local_server):
    from websockets.exceptions import InvalidStatus

    url = _listen(local_server)
    ok = await stream_frames(url, silence_frames(0.5), headers=USER, until=lambda r: "ready" in r.statuses(),
                             timeout_s=30)
    assert "ready" in ok.statuses(), ok.events
    for header in PROXY_HEADERS:
        with pytest.raises(InvalidStatus) as refused:
            await stream_frames(url, [], headers={**USER, header: "127.0.0.1"}, close=False, timeout_s=10)
        assert refused.value.response.status_code == 403


async def test_spoofed_forwarded_for_from_another_host_is_refused(forwarded_server):
    """From a non-loopback address, `X-Forwarded-For: 127.0.0.1` makes uvicorn (trusting '*') report a loopback
    client: before the proxy-header refusal, anyone could act as any uid that way."""
    from websockets.exceptions import InvalidStatus

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to call from")
    base = f"http://{address}:{forwarded_server.port}"
    assert httpx.get(f"{base}/v1/people", headers=USER, timeout=30).status_code == 401  # not loopback
    spoofed = {**USER, "X-Forwarded-For": "127.0.0.1"}
    r = httpx.get(f"{base}/v1/people", headers=spoofed, timeout=30)
    assert r.status_code == 401 and "proxy" in r.json()["detail"], r.text
    with pytest.raises(InvalidStatus) as refused:
        await stream_frames(f"ws://{address}:{forwarded_server.port}/v4/listen?codec=pcm16&sample_rate=16000", [],
                            headers=spoofed, close=False, timeout_s=10)
    assert refused.value.response.status_code == 403
    assert httpx.get(f"{forwarded_server.http}/v1/people", headers=USER, timeout=30).status_code == 200
