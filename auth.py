"""Who is calling: the uid comes from the `Authorization` header only, never from a query parameter.

Accepted, in this order:
1. the admin key when `ADMIN_KEY` is set, compared in constant time, in both of Omi's forms:
   `Authorization: Bearer <ADMIN_KEY><uid>` (Omi's current backend: the header's second space-separated part starts
   with the key; `utils/other/endpoints.py` `verify_token`) and the bare `Authorization: <ADMIN_KEY><uid>` (Omi's
   older backend found the key anywhere in the header). The key alone acts for no user (admin routes);
2. `Authorization: Bearer <Firebase ID token>` verified with firebase-admin when Firebase is configured;
3. with neither configured (a development set-up), `Authorization: Bearer <uid>` from loopback clients only, and
   only from requests that came straight to the server: one carrying a proxy header (`PROXY_HEADERS`) is refused,
   since behind a proxy the peer is the proxy (often on loopback itself), and uvicorn run with `--proxy-headers`
   (`--forwarded-allow-ips`) takes the client address from `X-Forwarded-For`, which anyone can write.

Wherever `Bearer <x>` is accepted, `Token <x>` (Deepgram's scheme, sent by its SDKs) is accepted the same way.

`caller`'s `headers` are the request's headers (HTTP and WebSocket call sites pass them): without them, only the
client address counts.

Separately, `Authenticator.internal` tells whether a request without user credentials comes from Omi's own backend
(which calls `/v1/speaker-identification?uid=` with no Authorization header): the shared secret `INTERNAL_API_KEY`
in the `X-Internal-Key` header (constant time), or a client address inside `INTERNAL_NETWORKS`. Either suffices;
with neither configured nothing is internal.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import SecretStr

from config import Settings

log = logging.getLogger(__name__)

_UID = re.compile(r"^[A-Za-z0-9_\-.:@]{1,128}$")
INTERNAL_KEY_HEADER = "x-internal-key"
# Headers a proxy adds (RFC 7239 and the de-facto pair): their presence means the address is not the client's own.
PROXY_HEADERS = ("x-forwarded-for", "x-real-ip", "forwarded")


def firebase_app(settings: Settings):
    """The firebase-admin default app, created from SERVICE_ACCOUNT_JSON, FIREBASE_CREDENTIALS or
    FIREBASE_PROJECT_ID (application default credentials) unless it exists. Shared by auth, Firestore and FCM."""
    import firebase_admin
    from firebase_admin import credentials

    try:
        return firebase_admin.get_app()
    except ValueError:
        certificate = settings.firebase_certificate()
        cred = credentials.Certificate(certificate) if certificate is not None else None
        project = settings.firebase_project_id
        return firebase_admin.initialize_app(cred, {"projectId": project} if project else None)


class AuthError(Exception):
    """Refused. The message is safe to show the client (it never echoes the credential). `close_code`: the WebSocket
    close code Omi's app acts on, where it is not the default 1008: 4001 (expired, or Google's keys unreachable:
    refresh the token and reconnect), 4004 (revoked: sign in again)."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True)
class Caller:
    uid: str | None  # None only for an admin acting for no particular user, or an internal caller
    admin: bool = False
    internal: bool = False  # Omi's backend without user credentials (see Authenticator.internal)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bytes(text: str) -> bytes:
    # Bytes, not str: compare_digest raises TypeError on non-ASCII str, and headers are decoded as latin-1.
    return text.encode("utf-8", "surrogateescape")


def _starts_with_secret(value: str, secret: str) -> bool:
    """`value.startswith(secret)`, in time independent of where they first differ."""
    return len(value) >= len(secret) and hmac.compare_digest(_bytes(value[: len(secret)]), _bytes(secret))


def checked_uid(uid: str) -> str:
    """The uid if well-formed (1-128 of letters, digits and `_-.:@`), else AuthError."""
    if not _UID.match(uid):
        raise AuthError("malformed uid")
    return uid


def _firebase_close_code(exc: Exception) -> int | None:
    from firebase_admin import auth as fb_auth

    if isinstance(exc, fb_auth.RevokedIdTokenError | fb_auth.UserDisabledError):
        return 4004
    if isinstance(exc, fb_auth.ExpiredIdTokenError | fb_auth.CertificateFetchError):
        return 4001
    return None


def _secret(value: SecretStr | None) -> str | None:
    return (value.get_secret_value() if value is not None else None) or None


def _admin(uid: str) -> Caller:
    return Caller(checked_uid(uid) if uid else None, admin=True)


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        # An empty key would match every header: treated as not set.
        self._admin_key = _secret(settings.admin_key)
        self._internal_key = _secret(settings.internal_api_key)
        self._internal_networks = settings.internal_network_list()
        self._firebase = firebase_app(settings) if settings.firebase_enabled else None
        self.open_loopback = self._admin_key is None and self._firebase is None
        if self.open_loopback:
            log.warning(
                "No ADMIN_KEY and no Firebase configured: accepting loopback clients only, uid taken from "
                "'Authorization: Bearer <uid>'. Configure auth before exposing this server."
            )

    async def uid_for(self, authorization: str | None, client_host: str | None,
                      headers: Mapping[str, str] | None = None) -> str:
        caller = await self.caller(authorization, client_host, headers)
        if caller.uid is None:
            raise AuthError("the admin key needs a uid: 'Authorization: Bearer <ADMIN_KEY><uid>'")
        return caller.uid

    async def caller(self, authorization: str | None, client_host: str | None,
                     headers: Mapping[str, str] | None = None) -> Caller:
        header = (authorization or "").strip()
        if not header:
            raise AuthError("missing Authorization header")
        key = self._admin_key
        if key:
            if _starts_with_secret(header, key):  # the bare form
                return _admin(header[len(key) :])
            parts = header.split()
            if len(parts) == 2 and _starts_with_secret(parts[1], key):  # Omi's current form: "Bearer <key><uid>"
                return _admin(parts[1][len(key) :])
        scheme, _, value = header.partition(" ")
        # `Token <x>` is Deepgram's form (its SDKs send it for an API key): the same credential as `Bearer <x>`.
        if scheme.lower() not in ("bearer", "token") or not value.strip():
            raise AuthError("expected 'Authorization: Bearer <token>' (or 'Token <token>')")
        value = value.strip()
        if self._firebase is not None:
            from firebase_admin import auth as fb_auth

            try:
                claims = await asyncio.to_thread(fb_auth.verify_id_token, value, self._firebase)
            except Exception as exc:  # invalid, expired, revoked, wrong project: a 401 to the client all the same
                raise AuthError(f"invalid token ({type(exc).__name__})", _firebase_close_code(exc)) from None
            return Caller(checked_uid(claims["uid"]))
        if self.open_loopback:
            if not is_loopback(client_host):
                raise AuthError("unauthenticated mode accepts loopback clients only")
            if headers is not None and any(headers.get(name) is not None for name in PROXY_HEADERS):
                raise AuthError("unauthenticated mode refuses requests that came through a proxy (X-Forwarded-For, "
                                "X-Real-IP or Forwarded): configure ADMIN_KEY or Firebase to serve behind one")
            return Caller(checked_uid(value))
        raise AuthError("invalid credentials")

    @property
    def internal_configured(self) -> bool:
        return bool(self._internal_key) or bool(self._internal_networks)

    def internal(self, headers: Mapping[str, str], client_host: str | None) -> bool:
        """Whether the caller is Omi's own backend: the `X-Internal-Key` header equals INTERNAL_API_KEY (constant
        time), or the client address lies in one of INTERNAL_NETWORKS. Neither configured: never."""
        if self._internal_key:
            given = headers.get(INTERNAL_KEY_HEADER) or ""
            # Compare digests, so neither the key's length nor its content shows in the timing.
            if given and hmac.compare_digest(hashlib.sha256(_bytes(given)).digest(),
                                             hashlib.sha256(_bytes(self._internal_key)).digest()):
                return True
        if self._internal_networks and client_host:
            try:
                address = ipaddress.ip_address(client_host)
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # ::ffff:10.1.2.3 from a dual-stack socket is 10.1.2.3
            return any(address.version == net.version and address in net for net in self._internal_networks)
        return False
