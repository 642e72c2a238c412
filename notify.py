"""Notifications to a user: Firebase Cloud Messaging, the user's webhook, or the log.

`ChannelNotifier.send(user, title, body)` tries, in order, the channels the user has:
1. FCM (`firebase_admin.messaging.send`, run in a thread) when Firebase is configured and the user has an
   `fcm_token`;
2. a JSON POST `{"title", "body", "uid"}` to the user's `webhook_url` (timeout `HTTP_GET_TIMEOUT`; any 2xx counts);
3. the log, when the user has neither: at INFO only that a notification went there (uid, sizes); its text - a
   day summary lists the user's conversation titles - at DEBUG.
It returns the channel that delivered ("fcm", "webhook" or "log"). When every channel the user has fails it raises
`NotificationError` (the log is not a fallback for a failed push: the job records the failure instead).

Secrets stay out of logs and errors: FCM tokens are never logged, and a webhook URL is only ever shown as
scheme://host/path (no user info, no query string, no fragment). Errors are re-raised without their cause, because
httpx puts the full URL into its messages.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from config import Settings
from storage.base import Storage, User

log = logging.getLogger(__name__)


class NotificationError(Exception):
    """Every channel of the user failed. The message is safe to log and store (no token, no URL query)."""


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: no credentials, query string or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Notifier(ABC):
    @abstractmethod
    async def send(self, user: User, title: str, body: str) -> str:
        """Deliver to the user; returns the channel that did ("fcm", "webhook", "log")."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""


class ChannelNotifier(Notifier):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._http: httpx.AsyncClient | None = None
        self._firebase_app = None

    # -- channels ------------------------------------------------------------------------------------------------

    async def send(self, user: User, title: str, body: str) -> str:
        failures: list[str] = []
        if self.settings.firebase_enabled and user.fcm_token:
            try:
                await self._send_fcm(user, title, body)
                return "fcm"
            except Exception as exc:
                failures.append(f"fcm: {type(exc).__name__}")
                log.warning("FCM notification to %s failed (%s)%s", user.uid, type(exc).__name__,
                            ", trying the webhook" if user.webhook_url else "")
        if user.webhook_url:
            try:
                await self._send_webhook(user, title, body)
                return "webhook"
            except NotificationError as exc:
                failures.append(str(exc))
                log.warning("notification to %s: %s", user.uid, exc)
        if failures:
            raise NotificationError("; ".join(failures))
        log.info("notification for %s (no push channel): %d-character title, %d-character body", user.uid,
                 len(title), len(body))
        log.debug("notification text for %s: %s | %s", user.uid, title, body)
        return "log"

    async def _send_fcm(self, user: User, title: str, body: str) -> None:
        from firebase_admin import messaging

        app = self._firebase()
        message = messaging.Message(notification=messaging.Notification(title=title, body=body),
                                    data={"uid": user.uid}, token=user.fcm_token)
        await asyncio.to_thread(messaging.send, message, app=app)

    async def _send_webhook(self, user: User, title: str, body: str) -> None:
        where = redact_url(user.webhook_url or "")
        if not (user.webhook_url or "").lower().startswith(("http://", "https://")):
            raise NotificationError(f"webhook {where}: not an http(s) URL")
        if self._http is None:
            # HTTP_GET_TIMEOUT for connecting and answers, HTTP_PUT_TIMEOUT for sending the body (Omi's two names)
            timeout = httpx.Timeout(self.settings.http_get_timeout, write=self.settings.http_put_timeout)
            self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        try:
            response = await self._http.post(user.webhook_url, json={"title": title, "body": body, "uid": user.uid})
        except httpx.HTTPError as exc:  # the message may hold the full URL: keep only the type
            raise NotificationError(f"webhook {where}: {type(exc).__name__}") from None
        if not response.is_success:
            raise NotificationError(f"webhook {where}: HTTP {response.status_code}")

    def _firebase(self):
        """The firebase-admin app (the default one, as auth.py initialises it), created here if missing."""
        if self._firebase_app is None:
            from auth import firebase_app

            self._firebase_app = firebase_app(self.settings)
        return self._firebase_app

    async def aclose(self) -> None:
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()


WEBHOOK_MESSAGE_TITLE = "Webhook says"  # Omi's title for a realtime-transcript webhook's answer (utils/webhooks.py)


def webhook_message_notifier(storage: Storage, notifier: Notifier) -> Callable[[str, str], Awaitable[None]]:
    """What the webhook dispatcher calls when a user's realtime-transcript webhook answers with a `message`: the
    user is notified of it, as Omi does (through FCM when configured, else the log). Failures are logged only."""

    async def notify_message(uid: str, message: str) -> None:
        user = await storage.get_user(uid) or User(uid=uid)
        try:
            channel = await notifier.send(user, WEBHOOK_MESSAGE_TITLE, message)
        except NotificationError as exc:
            log.warning("webhook message to %s not delivered: %s", uid, exc)
        else:
            log.info("webhook message to %s went via %s", uid, channel)

    return notify_message
