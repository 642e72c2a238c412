"""The credential of a `/v4/listen` stream opened by a browser page (web/app.js).

A browser cannot set an `Authorization` header on a WebSocket, and a token in the URL's query would end up in access
logs. So the page offers two subprotocols in `Sec-WebSocket-Protocol`: `omi.listen`, which the server accepts the
stream with, and `omi.authorization.<base64url of the Authorization value>`, e.g. of `Bearer <token>` (base64url,
since a subprotocol may only hold token characters, and a uid may hold `:` and `@`). The credential is then checked
exactly as the header would be (`auth.Authenticator`); the server never answers with the credential's subprotocol.

WebSockets are outside the browser's same-origin policy: any site the user visits could open a stream to
127.0.0.1 and, in the loopback-only mode where a uid is no secret, read that user's `last_memory`. A credential in
the subprotocol is therefore taken only from this server's own page: the `Origin` header (which browsers always send
and pages cannot forge) must name the same host and port as `Host`. Clients that are not browsers keep using the
`Authorization` header, which takes precedence.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from urllib.parse import urlsplit

from auth import AuthError

LISTEN_SUBPROTOCOL = "omi.listen"
CREDENTIAL_SUBPROTOCOL_PREFIX = "omi.authorization."


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    return [p.strip() for p in (headers.get("sec-websocket-protocol") or "").split(",") if p.strip()]


def _same_origin(headers: Mapping[str, str]) -> bool:
    origin, host = headers.get("origin"), headers.get("host")
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def _decoded(encoded: str) -> str:
    try:
        value = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthError("malformed credential in Sec-WebSocket-Protocol (expected base64url)") from None
    if not value.strip():
        raise AuthError("empty credential in Sec-WebSocket-Protocol")
    return value


def stream_credentials(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(the Authorization value to verify, the subprotocol to accept the stream with, or None).

    The `Authorization` header when present; else the credential subprotocol, from this server's own page only.
    AuthError for a malformed credential, one from another origin, or one offered without `omi.listen`."""
    offered = offered_subprotocols(headers)
    answer = LISTEN_SUBPROTOCOL if LISTEN_SUBPROTOCOL in offered else None
    if headers.get("authorization"):
        return headers.get("authorization"), answer
    encoded = [p[len(CREDENTIAL_SUBPROTOCOL_PREFIX):] for p in offered if p.startswith(CREDENTIAL_SUBPROTOCOL_PREFIX)]
    if not encoded:
        return None, answer
    if len(encoded) > 1:
        raise AuthError("more than one credential in Sec-WebSocket-Protocol")
    if answer is None:
        raise AuthError(f"a credential in Sec-WebSocket-Protocol needs the subprotocol '{LISTEN_SUBPROTOCOL}' too")
    if not _same_origin(headers):
        raise AuthError("a credential in Sec-WebSocket-Protocol is taken only from this server's own page "
                        "(Origin must match Host); other clients send the Authorization header")
    return _decoded(encoded[0]), answer
