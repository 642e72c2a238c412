"""The page's credential for `/v4/listen` (browser_credentials.py): `Bearer <token>`, base64url-encoded, in the
`Sec-WebSocket-Protocol` header next to `omi.listen`; taken only from the server's own origin. Against real server
processes (ADMIN_KEY set, and the loopback-only mode), with the `websockets` client sending what a browser sends."""

from __future__ import annotations

import base64
import json

import pytest
from conftest import start_server, stop_server

from browser_credentials import CREDENTIAL_SUBPROTOCOL_PREFIX, LISTEN_SUBPROTOCOL

ADMIN_KEY = "page-admin-key-5b0e3c9a7d2f4e61a8c3"  # ADMIN_KEY_MIN_CHARS (32) or more
URL_PATH = "/v4/listen?codec=pcm16&sample_rate=16000&language=en&source=web"


def credential_subprotocol(authorization: str) -> str:
    encoded = base64.urlsafe_b64encode(authorization.encode()).decode().rstrip("=")
    return CREDENTIAL_SUBPROTOCOL_PREFIX + encoded


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("page-admin"), ADMIN_KEY=ADMIN_KEY)
    yield server
    stop_server(server)


async def first_status(server, subprotocols: list[str], origin: str | None) -> tuple[str | None, dict]:
    """Opens the stream as the page does; the subprotocol the server chose and its first event."""
    from websockets.asyncio.client import connect

    async with connect(server.ws + URL_PATH, subprotocols=subprotocols, origin=origin, open_timeout=30) as ws:
        return ws.subprotocol, json.loads(await ws.recv())


async def refused_status(server, subprotocols: list[str], origin: str | None) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws + URL_PATH, subprotocols=subprotocols, origin=origin, open_timeout=30):
            pass
    return refused.value.response.status_code


async def test_admin_key_in_the_subprotocol_streams(admin_server):
    chosen, event = await first_status(
        admin_server, [LISTEN_SUBPROTOCOL, credential_subprotocol(f"Bearer {ADMIN_KEY}page-user")],
        origin=admin_server.http)
    assert chosen == LISTEN_SUBPROTOCOL  # never the credential's own subprotocol
    assert event == {"type": "service_status", "status": "initiating", "status_text": "Service starting"}


@pytest.mark.parametrize("authorization", [
    f"Bearer {ADMIN_KEY[:-1]}Xpage-user",  # a wrong key
    "Bearer page-user",  # a bare uid: only the loopback-only mode takes that
    f"Bearer {ADMIN_KEY}",  # the key alone acts for nobody; a stream needs a user
])
async def test_wrong_token_in_the_subprotocol_is_refused(admin_server, authorization):
    status = await refused_status(admin_server, [LISTEN_SUBPROTOCOL, credential_subprotocol(authorization)],
                                  origin=admin_server.http)
    assert status == 403
    assert ADMIN_KEY not in admin_server.log()


@pytest.mark.parametrize("subprotocols", [
    [LISTEN_SUBPROTOCOL, CREDENTIAL_SUBPROTOCOL_PREFIX + "***not-base64***"],
    [LISTEN_SUBPROTOCOL, CREDENTIAL_SUBPROTOCOL_PREFIX],  # empty
    [credential_subprotocol(f"Bearer {ADMIN_KEY}page-user")],  # without omi.listen nothing could be chosen
    [LISTEN_SUBPROTOCOL, credential_subprotocol(f"Bearer {ADMIN_KEY}a"),
     credential_subprotocol(f"Bearer {ADMIN_KEY}b")],
])
async def test_malformed_subprotocol_credentials_are_refused(admin_server, subprotocols):
    assert await refused_status(admin_server, subprotocols, origin=admin_server.http) == 403


async def test_loopback_mode_takes_the_subprotocol_only_from_its_own_page(local_server):
    """In the loopback-only mode a uid is no secret: another site's page in the user's browser (its Origin) must not
    stream as them, nor read their last conversation; a client without an Origin uses the header."""
    protocols = [LISTEN_SUBPROTOCOL, credential_subprotocol("Bearer page-loopback-user")]
    chosen, event = await first_status(local_server, protocols, origin=local_server.http)
    assert chosen == LISTEN_SUBPROTOCOL and event["type"] == "service_status"
    assert await refused_status(local_server, protocols, origin="http://evil.example") == 403
    assert await refused_status(local_server, protocols, origin=f"http://localhost:{local_server.port + 1}") == 403
    assert await refused_status(local_server, protocols, origin=None) == 403
    assert "Origin must match Host" in local_server.log()


async def test_authorization_header_still_wins_and_needs_no_subprotocol(local_server):
    from websockets.asyncio.client import connect

    async with connect(local_server.ws + URL_PATH, additional_headers={"Authorization": "Bearer header-user"},
                       open_timeout=30) as ws:
        assert ws.subprotocol is None
        assert json.loads(await ws.recv())["type"] == "service_status"
