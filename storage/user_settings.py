"""User settings (`Storage.get_user_settings` / `set_user_setting`) as each backend stores them, kept out of the
backend modules. Each backend creates the place (sqlite's SCHEMA, a postgres migration; Firestore needs none),
checks the key and value with `storage.base.check_setting_key` / `check_setting_value`, and calls these with its
own handle. A setting is written whole (an upsert of one row or document), so writers of different keys never
undo each other."""

from __future__ import annotations

import json
import sqlite3
import time

from storage.base import check_setting_key, check_setting_value


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
