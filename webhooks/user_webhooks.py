"""A user's developer-webhook settings, over the storage's per-user settings (`get_user_settings` /
`set_user_setting`), with a small TTL cache because delivery asks for the target of every request.

Stored keys (each written whole):
- `"webhook.<type>"` → `{"url": <the string as the user set it, Omi's form, e.g. "https://x/y,5">, "enabled": bool
  | None}`; never enabled or disabled explicitly (None or no key): on iff a URL is set (Omi's first-time rule);
- `"webhook.signing"` → `{"current", "previous", "previous_valid_until", "created_at"}` (unix seconds): one
  signing secret for all of the user's webhooks. Issuing again rotates: the previous secret keeps signing for
  ROTATION_GRACE_S, so a receiver can switch without losing deliveries.

Writes through this object drop that user's cache entry at once; a write made by another replica is seen within
WEBHOOK_SETTINGS_CACHE_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from config import Settings
from storage.base import Storage
from webhooks.signing import generate_secret
from webhooks.targets import WebhookUrlError, check_url, parse_audio_url
from webhooks.types import Target, WebhookType

log = logging.getLogger(__name__)

ROTATION_GRACE_S = 24 * 3600.0  # Omi's ROTATION_GRACE: a rotated-out secret signs alongside the new one this long
CACHE_USERS = 10_000  # users whose settings are cached (least recently used dropped first)
SIGNING_KEY = "webhook.signing"
CLEARED = ("", ",")  # what Omi's app sends to clear a URL


def setting_key(wtype: WebhookType) -> str:
    return f"webhook.{WebhookType(wtype).value}"


def _signing(data: dict[str, dict]) -> dict | None:
    """The user's signing record among their settings, when it holds a current secret."""
    record = data.get(SIGNING_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("current"), str) or not record["current"]:
        return None
    return record


def _as_datetime(ts: Any) -> datetime | None:
    """Unix seconds as the aware datetime Omi's routes answer with (JSON: ISO 8601)."""
    return datetime.fromtimestamp(ts, UTC) if isinstance(ts, int | float) else None


class UserWebhooks:
    def __init__(self, storage: Storage, settings: Settings, *, clock: Callable[[], float] = time.time,
                 cache_users: int = CACHE_USERS) -> None:
        self.storage = storage
        self.settings = settings
        self.clock = clock  # unix time: secret creation and grace windows (tests move it)
        self._cache: OrderedDict[str, tuple[float, dict[str, dict]]] = OrderedDict()  # uid → (monotonic read, data)
        self._cache_users = cache_users
        self._writes = 0  # bumped by every write: a read that began before one must not refill the cache
        self._signing_lock = asyncio.Lock()  # two rotations in this process never both take the same "previous"

    # -- the cache ---------------------------------------------------------------------------------------------------

    async def _settings(self, uid: str) -> dict[str, dict]:
        now = time.monotonic()
        cached = self._cache.get(uid)
        if cached is not None and now - cached[0] < self.settings.webhook_settings_cache_s:
            self._cache.move_to_end(uid)
            return cached[1]
        writes = self._writes
        try:
            data = await self.storage.get_user_settings(uid)
        except Exception as exc:
            if cached is None:
                raise
            # storage is away: keep delivering to what was set a moment ago rather than to nobody
            log.warning("webhook settings of %s unreadable (%s), using the last ones read", uid, type(exc).__name__)
            return cached[1]
        if writes == self._writes and self.settings.webhook_settings_cache_s > 0:
            self._cache[uid] = (now, data)
            self._cache.move_to_end(uid)
            while len(self._cache) > self._cache_users:
                self._cache.popitem(last=False)
        return data

    async def _write(self, uid: str, key: str, value: dict | None) -> None:
        self._writes += 1
        self._cache.pop(uid, None)
        try:
            await self.storage.set_user_setting(uid, key, value)
        finally:
            self._writes += 1  # a read that overlapped the write may have read the old value
            self._cache.pop(uid, None)

    # -- URLs and switches -------------------------------------------------------------------------------------------

    async def _entry(self, uid: str, wtype: WebhookType) -> dict:
        value = (await self._settings(uid)).get(setting_key(wtype))
        return value if isinstance(value, dict) else {}

    async def get_url(self, uid: str, wtype: WebhookType) -> str:
        """The URL as the user set it (with the ",N" audio suffix); "" when unset."""
        url = (await self._entry(uid, wtype)).get("url")
        return url if isinstance(url, str) else ""

    async def set_url(self, uid: str, wtype: WebhookType, raw: str) -> None:
        """Set (or, with "" or ",", clear and disable) the URL. WebhookUrlError when it is refused."""
        wtype = WebhookType(wtype)
        if not isinstance(raw, str):
            raise WebhookUrlError("the webhook URL must be a string")
        entry = await self._entry(uid, wtype)
        if raw in CLEARED:
            await self._write(uid, setting_key(wtype), {"url": raw, "enabled": False})
            return
        url = raw
        if wtype is WebhookType.audio_bytes:
            url, _ = parse_audio_url(raw, self.settings.webhook_audio_default_s, self.settings.webhook_audio_max_s)
        check_url(url, self.settings.webhook_allow_private)
        await self._write(uid, setting_key(wtype), {"url": raw, "enabled": entry.get("enabled")})

    async def set_enabled(self, uid: str, wtype: WebhookType, enabled: bool) -> None:
        entry = await self._entry(uid, wtype)
        url = entry.get("url") if isinstance(entry.get("url"), str) else ""
        await self._write(uid, setting_key(wtype), {"url": url, "enabled": bool(enabled)})

    @staticmethod
    def _is_on(entry: dict) -> bool:
        enabled = entry.get("enabled")
        if isinstance(enabled, bool):
            return enabled
        url = entry.get("url")
        return isinstance(url, str) and url not in CLEARED

    async def status(self, uid: str) -> dict[str, bool]:
        """Every type: on or off (an explicit switch wins; never switched: on iff a URL is set)."""
        data = await self._settings(uid)
        result = {}
        for wtype in WebhookType:
            entry = data.get(setting_key(wtype))
            result[wtype.value] = self._is_on(entry if isinstance(entry, dict) else {})
        return result

    # -- signing secrets ---------------------------------------------------------------------------------------------

    async def _signing_record(self, uid: str, *, fresh: bool = False) -> dict | None:
        data = await self.storage.get_user_settings(uid) if fresh else await self._settings(uid)
        return _signing(data)

    async def issue_secret(self, uid: str) -> dict:
        """A new secret, returned this once: {"secret", "created_at", "previous_valid_until"} (aware datetimes, as
        Omi answers). A secret already set becomes "previous" and keeps signing for ROTATION_GRACE_S."""
        async with self._signing_lock:
            old = await self._signing_record(uid, fresh=True)
            now = self.clock()
            record = {"current": generate_secret(), "previous": None, "previous_valid_until": None, "created_at": now}
            if old is not None:
                record["previous"] = old["current"]
                record["previous_valid_until"] = now + ROTATION_GRACE_S
            await self._write(uid, SIGNING_KEY, record)
        return {"secret": record["current"], "created_at": _as_datetime(now),
                "previous_valid_until": _as_datetime(record["previous_valid_until"])}

    async def secret_status(self, uid: str) -> dict:
        """{"configured": False} or {"configured": True, "created_at", "previous_valid_until"}: never a secret."""
        record = await self._signing_record(uid)
        if record is None:
            return {"configured": False}
        return {"configured": True, "created_at": _as_datetime(record.get("created_at")),
                "previous_valid_until": _as_datetime(record.get("previous_valid_until"))}

    async def delete_secret(self, uid: str) -> None:
        """Stop signing: deliveries go out without X-Omi-Signature."""
        async with self._signing_lock:
            await self._write(uid, SIGNING_KEY, None)

    def _active_secrets(self, record: dict | None) -> tuple[str, ...]:
        if record is None:
            return ()
        previous, until = record.get("previous"), record.get("previous_valid_until")
        if isinstance(previous, str) and previous and isinstance(until, int | float) and self.clock() < until:
            return (record["current"], previous)
        return (record["current"],)

    # -- delivery ----------------------------------------------------------------------------------------------------

    async def target(self, uid: str, wtype: WebhookType) -> Target | None:
        """Where a delivery of this type goes now, with the secrets that sign it; None when unset or off."""
        wtype = WebhookType(wtype)
        data = await self._settings(uid)
        entry = data.get(setting_key(wtype))
        if not isinstance(entry, dict) or not self._is_on(entry):
            return None
        url, interval = entry["url"], 0
        if wtype is WebhookType.audio_bytes:
            try:
                url, interval = parse_audio_url(url, self.settings.webhook_audio_default_s,
                                                self.settings.webhook_audio_max_s)
            except WebhookUrlError:  # stored under a larger WEBHOOK_AUDIO_MAX_S: the longest allowed now
                url, interval = url.rpartition(",")[0], self.settings.webhook_audio_max_s
        if not url:
            return None
        return Target(url=url, secrets=self._active_secrets(_signing(data)), audio_interval_s=interval)
