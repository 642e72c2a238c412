"""Who is calling: the uid comes from the `Authorization` header only, never from a query parameter.

Accepted, in this order:
1. `Authorization: <ADMIN_KEY><uid>` when `ADMIN_KEY` is set (Omi's convention for internal callers), compared in
   constant time;
2. `Authorization: Bearer <Firebase ID token>` verified with firebase-admin when Firebase is configured;
3. with neither configured (a development set-up), `Authorization: Bearer <uid>` from loopback clients only.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass

from config import Settings

log = logging.getLogger(__name__)

_UID = re.compile(r"^[A-Za-z0-9_\-.:@]{1,128}$")


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
    """Refused. The message is safe to show the client (it never echoes the credential)."""


@dataclass(frozen=True)
class Caller:
    uid: str | None  # None only for an admin acting for no particular user
    admin: bool = False


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "testclient":  # starlette's in-process test client
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self._firebase = firebase_app(settings) if settings.firebase_enabled else None
        self.open_loopback = self._admin_key is None and self._firebase is None
        if self.open_loopback:
            log.warning(
                "No ADMIN_KEY and no Firebase configured: accepting loopback clients only, uid taken from "
                "'Authorization: Bearer <uid>'. Configure auth before exposing this server."
            )

    async def uid_for(self, authorization: str | None, client_host: str | None) -> str:
        caller = await self.caller(authorization, client_host)
        if caller.uid is None:
            raise AuthError("the admin key needs a uid: 'Authorization: <ADMIN_KEY><uid>'")
        return caller.uid

    async def caller(self, authorization: str | None, client_host: str | None) -> Caller:
        header = (authorization or "").strip()
        if not header:
            raise AuthError("missing Authorization header")
        key = self._admin_key
        # Bytes, not str: compare_digest raises TypeError on non-ASCII str, and headers are decoded as latin-1.
        if key is not None and len(header) >= len(key) and hmac.compare_digest(
            header[: len(key)].encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape")
        ):
            rest = header[len(key) :]
            return Caller(self._checked_uid(rest) if rest else None, admin=True)
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("expected 'Authorization: Bearer <token>'")
        value = value.strip()
        if self._firebase is not None:
            from firebase_admin import auth as fb_auth

            try:
                claims = await asyncio.to_thread(fb_auth.verify_id_token, value, self._firebase)
            except Exception as exc:  # invalid, expired, revoked, wrong project: all the same to the client
                raise AuthError(f"invalid token ({type(exc).__name__})") from None
            return Caller(self._checked_uid(claims["uid"]))
        if self.open_loopback:
            if not is_loopback(client_host):
                raise AuthError("unauthenticated mode accepts loopback clients only")
            return Caller(self._checked_uid(value))
        raise AuthError("invalid credentials")

    @staticmethod
    def _checked_uid(uid: str) -> str:
        if not _UID.match(uid):
            raise AuthError("malformed uid")
        return uid
