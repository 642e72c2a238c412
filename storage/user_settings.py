"""User settings (`Storage.get_user_settings` / `set_user_setting`) as each backend stores them, kept out of the
backend modules. Each backend creates the place (sqlite's SCHEMA, a postgres migration; Firestore needs none) and
calls these with its own handle. Every write is checked first by `checked_setting` (`storage.base.check_setting_key`
/ `check_setting_value`: ValueError, nothing written); sqlite checks on the event loop, before its storage thread.
A setting is written whole (an upsert or delete of one row or document), so writers of different keys never undo
each other."""

from __future__ import annotations

import json
import sqlite3
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from storage.base import check_setting_key, check_setting_value

if TYPE_CHECKING:
    import asyncpg


def checked_setting(key: object, value: object) -> tuple[str, str | None]:
    """(key, the value's JSON text or None to delete), checked: ValueError for a bad key or value."""
    return check_setting_key(key), None if value is None else check_setting_value(value)


# -- SQLite: user_settings (uid, key, value JSON text, updated_at); on the storage thread ----------------------------


def sqlite_settings(db: sqlite3.Connection, uid: str) -> dict[str, dict]:
    rows = db.execute("SELECT key, value FROM user_settings WHERE uid = ?", (uid,)).fetchall()
    return {key: json.loads(value) for key, value in rows}


def sqlite_set_setting(db: sqlite3.Connection, uid: str, key: str, value_json: str | None) -> None:
    """One statement, atomic on its own (the connection autocommits)."""
    if value_json is None:
        db.execute("DELETE FROM user_settings WHERE uid = ? AND key = ?", (uid, key))
    else:
        db.execute("INSERT INTO user_settings (uid, key, value, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT (uid, key) "
                   "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                   (uid, key, value_json, time.time()))


# -- PostgreSQL: user_settings (uid, key, value JSONB, updated_at), migration 5 of storage.postgres --------------------


async def postgres_settings(pool: asyncpg.Pool, uid: str) -> dict[str, dict]:
    rows = await pool.fetch("SELECT key, value FROM user_settings WHERE uid = $1", uid)
    return {r["key"]: json.loads(r["value"]) for r in rows}  # asyncpg returns jsonb as its JSON text


async def postgres_set_setting(pool: asyncpg.Pool, uid: str, key: str, value: dict | None) -> None:
    key, value_json = checked_setting(key, value)
    if value_json is None:
        await pool.execute("DELETE FROM user_settings WHERE uid = $1 AND key = $2", uid, key)
    else:
        await pool.execute("INSERT INTO user_settings (uid, key, value, updated_at) VALUES ($1, $2, $3::jsonb, $4) "
                           "ON CONFLICT (uid, key) DO UPDATE SET value = EXCLUDED.value, updated_at = "
                           "EXCLUDED.updated_at", uid, key, jsonb_text(value), time.time())


def jsonb_text(value: object) -> str:
    """JSON text that jsonb gives back with the same types. jsonb keeps numbers as `numeric`, which prints 1e+20 as
    100000000000000000000 (read back as an int): so every float is written positionally with a decimal point, and
    comes back as the same float. `value` has passed check_setting_value (JSON types, bounded depth)."""
    if isinstance(value, float):
        text = format(Decimal(repr(value)), "f")
        return text if "." in text else f"{text}.0"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{jsonb_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(jsonb_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # str, int, bool, None


# -- Firestore: users/{uid}/settings/{key} = {"value": the object (a map), "updated_at"} ------------------------------


async def firestore_settings(settings: Any) -> dict[str, dict]:
    """`settings`: the user's settings collection."""
    found = {}
    async for snap in settings.stream():
        value = (snap.to_dict() or {}).get("value")
        if isinstance(value, dict):  # a document of another shape (not written here) is no setting
            found[snap.id] = value
    return found


async def firestore_set_setting(settings: Any, key: str, value: dict | None) -> None:
    """One document write: `set` replaces the whole document, `delete` is fine when it is missing."""
    key, value_json = checked_setting(key, value)
    ref = settings.document(key)  # a checked key is a valid document id
    if value_json is None:
        await ref.delete()
    else:
        await ref.set({"value": value, "updated_at": time.time()})
