"""When a user's daily notifications are due: their time zone, the check window, and their day-summary settings.
Pure functions, shared by the notification job (`jobs.py`) and the settings routes (`user_routes.py`)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from config import Settings

DAY_S = 86400.0
DAILY_SUMMARY_KEY = "daily_summary"  # user setting: {"enabled": bool, "hour": int}
TIME_ZONE_MAX_CHARS = 64


def _zone(name: str | None) -> dt.tzinfo | None:
    try:
        return ZoneInfo(name) if name else None
    except Exception:  # ZoneInfoNotFoundError, ValueError for malformed keys
        return None


def user_zone(name: str | None) -> dt.tzinfo:
    """The user's IANA time zone; UTC when it is missing or unknown."""
    return _zone(name) or dt.UTC


def known_zone(name: str) -> str:
    """`name` if it is an IANA time zone this machine knows; ValueError otherwise."""
    if _zone(name) is None:
        shown = name[:TIME_ZONE_MAX_CHARS]
        raise ValueError(f"unknown time zone {shown!r} (an IANA name, e.g. Europe/Berlin)")
    return name


def due_day(now: float, tz: dt.tzinfo, at: dt.time, window_s: float) -> dt.date | None:
    """The local date whose `at` (in `tz`) lies in (now - window_s, now], i.e. now in [at, at + window); else None.
    Yesterday is checked too, for a window that crosses local midnight."""
    today = dt.datetime.fromtimestamp(now, tz).date()
    for day in (today, today - dt.timedelta(days=1)):
        slot = dt.datetime.combine(day, at, tzinfo=tz).timestamp()
        if slot <= now < slot + window_s:
            return day
    return None


def daily_summary_prefs(stored: dict | None, settings: Settings) -> dict:
    """The user's day-summary preference with the defaults filled in: {"enabled": bool, "hour": int}."""
    stored = stored or {}
    hour = stored.get("hour")
    return {"enabled": stored.get("enabled") is not False,
            "hour": hour if isinstance(hour, int) and 0 <= hour <= 23 else settings.notify_evening_at.hour}


def evening_time(prefs: dict, default: dt.time) -> dt.time | None:
    """The local time of the user's day summary (`daily_summary_prefs`), or None when they turned it off. The
    default hour keeps NOTIFY_EVENING_AT's minutes."""
    if not prefs["enabled"]:
        return None
    return default if prefs["hour"] == default.hour else dt.time(prefs["hour"], 0)


def may_be_evening(now: float, tz: dt.tzinfo, default: dt.time, window_s: float) -> bool:
    """Whether some day-summary time a user may choose is due at `now`: within `window_s` after a full local hour
    (every hour a user may choose) or after `default`. Only then is the user's setting worth reading."""
    local = dt.datetime.fromtimestamp(now, tz)
    since_hour = local.minute * 60 + local.second + local.microsecond / 1e6
    since_default = (local.hour * 3600 + since_hour
                     - (default.hour * 3600 + default.minute * 60 + default.second)) % DAY_S
    return since_hour < window_s or since_default < window_s
