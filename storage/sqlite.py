"""SQLite backend: one file, no server. The stdlib driver runs on one dedicated thread (SQLite connections are not
shared across threads), so the event loop never blocks on disk."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from storage.base import Conversation, ConversationStatus, Segment, SpeakerProfile, Storage, User, status_filter
from storage.profile_rows import added_seconds, merge_profile_embeddings, profile_centroid
from storage.user_settings import checked_setting, sqlite_set_setting, sqlite_settings

SCHEMA = """
CREATE TABLE IF NOT EXISTS speaker_profiles (
    id TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'person')),
    name TEXT,
    model TEXT NOT NULL,
    dim INTEGER NOT NULL,
    speech_seconds REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS speaker_profiles_uid ON speaker_profiles (uid);
CREATE UNIQUE INDEX IF NOT EXISTS speaker_profiles_one_user ON speaker_profiles (uid) WHERE kind = 'user';
CREATE TABLE IF NOT EXISTS speaker_embeddings (
    profile_id TEXT NOT NULL REFERENCES speaker_profiles (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (profile_id, seq)
);
CREATE TABLE IF NOT EXISTS users (
    uid TEXT PRIMARY KEY,
    time_zone TEXT NOT NULL,
    webhook_url TEXT,
    fcm_token TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    status TEXT NOT NULL,
    language TEXT NOT NULL,
    source TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_activity_at REAL NOT NULL,
    timeout_s REAL NOT NULL,
    finished_at REAL,
    duration_s REAL NOT NULL,
    title TEXT,
    overview TEXT,
    emoji TEXT,
    category TEXT,
    action_items TEXT NOT NULL DEFAULT '[]',
    events TEXT NOT NULL DEFAULT '[]',
    processing_until REAL
);
CREATE INDEX IF NOT EXISTS conversations_uid ON conversations (uid, started_at);
CREATE INDEX IF NOT EXISTS conversations_open ON conversations (status, last_activity_at);
CREATE TABLE IF NOT EXISTS segments (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    uid TEXT NOT NULL,
    text TEXT NOT NULL,
    speaker TEXT NOT NULL,
    speaker_id INTEGER NOT NULL,
    is_user INTEGER NOT NULL,
    person_id TEXT,
    start REAL NOT NULL,
    "end" REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_conversation ON segments (conversation_id, start);
CREATE TABLE IF NOT EXISTS speaker_states (
    conversation_id TEXT PRIMARY KEY REFERENCES conversations (id) ON DELETE CASCADE,
    uid TEXT NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS job_runs (
    job TEXT NOT NULL,
    run_key TEXT NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    finished_at REAL,
    ok INTEGER,
    detail TEXT,
    PRIMARY KEY (job, run_key)
);
CREATE TABLE IF NOT EXISTS open_streams (
    stream_id TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    opened_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS open_streams_uid ON open_streams (uid, opened_at);
CREATE TABLE IF NOT EXISTS user_settings (
    uid TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,  -- a JSON object
    updated_at REAL NOT NULL,
    PRIMARY KEY (uid, key)
);
"""

_CONVERSATION_FIELDS = ("id", "uid", "status", "language", "source", "started_at", "last_activity_at", "timeout_s",
                        "finished_at", "duration_s", "title", "overview", "emoji", "category", "action_items", "events",
                        "processing_until")
_JSON_FIELDS = ("action_items", "events")  # lists of objects, stored as JSON text
# Columns added after the first release: a database file made before gets them at open (CREATE TABLE IF NOT EXISTS
# leaves an existing table as it was).
_ADDED_COLUMNS = {"conversations": (("emoji", "TEXT"), ("category", "TEXT"),
                                    ("action_items", "TEXT NOT NULL DEFAULT '[]'"),
                                    ("events", "TEXT NOT NULL DEFAULT '[]'"), ("processing_until", "REAL"))}
# storage.base.close_claimable as SQL; its parameters: expired_only (0/1), now, now
_CLOSABLE = ("((status = 'in_progress' AND (? = 0 OR last_activity_at + timeout_s <= ?)) "
             "OR (status = 'processing' AND (processing_until IS NULL OR processing_until <= ?)))")
_SEGMENT_FIELDS = ("id", "conversation_id", "text", "speaker", "speaker_id", "is_user", "person_id", "start", "end")


class SqliteStorage(Storage):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            self._db = db

        await self._run(connect)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def ping(self) -> bool:
        try:
            return await self._run(lambda: self._db.execute("SELECT 1").fetchone()[0] == 1)
        except Exception:
            return False

    # -- profiles ----------------------------------------------------------------------------------------------

    async def save_profile(self, profile: SpeakerProfile) -> None:
        if profile.embeddings.ndim != 2:
            raise ValueError("embeddings must be (n, dim)")
        rows = merge_profile_embeddings(profile.embeddings[:0], profile.embeddings, self.profile_limits)[0]

        def save() -> None:
            db = self._db
            with _transaction(db):
                if profile.kind == "user":  # one user profile per uid: a new enrolment replaces the old one
                    db.execute("DELETE FROM speaker_profiles WHERE uid = ? AND kind = 'user' AND id != ?",
                               (profile.uid, profile.id))
                _upsert(db, "speaker_profiles", "id",
                        {"id": profile.id, "uid": profile.uid, "kind": profile.kind, "name": profile.name,
                         "model": profile.model, "dim": int(profile.embeddings.shape[1]),
                         "speech_seconds": profile.speech_seconds, "created_at": profile.created_at,
                         "updated_at": profile.updated_at})
                db.execute("DELETE FROM speaker_embeddings WHERE profile_id = ?", (profile.id,))
                _insert_embeddings(db, profile.id, rows, 0)

        await self._run(save)

    async def add_profile_embeddings(self, uid: str, profile_id: str, embeddings: np.ndarray, seconds: float) -> bool:
        if embeddings.ndim != 2:
            raise ValueError("embeddings must be (n, dim)")

        def add() -> bool:
            db = self._db
            with _transaction(db):
                row = db.execute("SELECT dim FROM speaker_profiles WHERE id = ? AND uid = ?",
                                 (profile_id, uid)).fetchone()
                if row is None:
                    return False
                if embeddings.shape[1] != row[0]:
                    raise ValueError(f"embedding size {embeddings.shape[1]} does not match the profile's {row[0]}")
                kept = _load_vectors(db, profile_id, row[0])
                rows, added = merge_profile_embeddings(kept, embeddings, self.profile_limits)
                if added or not len(embeddings):
                    db.execute("DELETE FROM speaker_embeddings WHERE profile_id = ?", (profile_id,))
                    _insert_embeddings(db, profile_id, rows, 0)
                    db.execute("UPDATE speaker_profiles SET speech_seconds = speech_seconds + ?, updated_at = ? "
                               "WHERE id = ?", (added_seconds(seconds, len(embeddings), added), time.time(),
                                                profile_id))
                return True

        return await self._run(add)

    async def list_profiles(self, uid: str) -> list[SpeakerProfile]:
        return await self._run(self._load, "uid = ?", (uid,))

    async def get_profile(self, uid: str, profile_id: str) -> SpeakerProfile | None:
        found = await self._run(self._load, "uid = ? AND id = ?", (uid, profile_id))
        return found[0] if found else None

    async def delete_profile(self, uid: str, profile_id: str) -> bool:
        def delete() -> bool:
            with _transaction(self._db):
                return self._db.execute("DELETE FROM speaker_profiles WHERE uid = ? AND id = ?",
                                        (uid, profile_id)).rowcount > 0

        return await self._run(delete)

    def _load(self, where: str, args: tuple) -> list[SpeakerProfile]:
        db = self._db
        rows = db.execute(
            "SELECT id, uid, kind, name, model, dim, speech_seconds, created_at, updated_at "
            f"FROM speaker_profiles WHERE {where} ORDER BY created_at", args
        ).fetchall()
        profiles = []
        for pid, uid, kind, name, model, dim, seconds, created, updated in rows:
            profiles.append(SpeakerProfile(uid=uid, kind=kind, model=model, embeddings=_load_vectors(db, pid, dim),
                                           speech_seconds=seconds, name=name, id=pid, created_at=created,
                                           updated_at=updated))
        return profiles

    async def matching_profiles(self, uid: str, model: str) -> list[SpeakerProfile]:
        def load() -> list[SpeakerProfile]:
            db, newest = self._db, self.profile_limits.max_embeddings
            rows = db.execute("SELECT id, kind, name, dim, speech_seconds, created_at, updated_at "
                              "FROM speaker_profiles WHERE uid = ? AND model = ? ORDER BY created_at",
                              (uid, model)).fetchall()
            found = []
            for pid, kind, name, dim, seconds, created, updated in rows:
                vectors = _load_vectors(db, pid, dim, newest)
                if len(vectors):
                    found.append(profile_centroid(SpeakerProfile(
                        uid=uid, kind=kind, model=model, embeddings=vectors, speech_seconds=seconds, name=name,
                        id=pid, created_at=created, updated_at=updated), vectors))
            return found

        return await self._run(load)


    # -- users -------------------------------------------------------------------------------------------------

    async def save_user(self, user: User) -> None:
        await self._run(self._upsert, "users", "uid",
                        {"uid": user.uid, "time_zone": user.time_zone, "webhook_url": user.webhook_url,
                         "fcm_token": user.fcm_token, "created_at": user.created_at})

    async def get_user(self, uid: str) -> User | None:
        rows = await self._run(self._read, "SELECT * FROM users WHERE uid = ?", (uid,))
        return User(*rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        return [User(*r) for r in await self._run(self._read, "SELECT * FROM users ORDER BY uid", ())]

    async def get_user_settings(self, uid: str) -> dict[str, dict]:
        return await self._run(sqlite_settings, self._db, uid)

    async def set_user_setting(self, uid: str, key: str, value: dict | None) -> None:
        key, value_json = checked_setting(key, value)
        await self._run(sqlite_set_setting, self._db, uid, key, value_json)

    # -- conversations -------------------------------------------------------------------------------------------

    async def save_conversation(self, c: Conversation) -> None:
        row = {f: getattr(c, f) for f in _CONVERSATION_FIELDS}
        for f in _JSON_FIELDS:
            row[f] = json.dumps(row[f], ensure_ascii=False)
        await self._run(self._upsert, "conversations", "id", row)

    async def get_conversation(self, uid: str, conversation_id: str) -> Conversation | None:
        found = await self._conversations("uid = ? AND id = ?", (uid, conversation_id))
        return found[0] if found else None

    async def list_conversations(self, uid: str, status: ConversationStatus | None = None, limit: int = 50,
                                 before: float | None = None, *, statuses: Collection[str] | None = None,
                                 offset: int = 0, include_discarded: bool = True, started_from: float | None = None,
                                 started_to: float | None = None) -> list[Conversation]:
        where, args = ["uid = ?"], [uid]
        allowed = status_filter(status, statuses, include_discarded)
        if allowed is not None:
            if not allowed:
                return []
            where.append(f"status IN ({', '.join('?' * len(allowed))})")
            args += sorted(allowed)
        for clause, value in (("started_at < ?", before), ("started_at >= ?", started_from),
                              ("started_at <= ?", started_to)):
            if value is not None:
                where.append(clause)
                args.append(float(value))
        return await self._conversations(f"{' AND '.join(where)} ORDER BY started_at DESC, id DESC LIMIT ? OFFSET ?",
                                         (*args, int(limit), int(offset)))

    async def conversations_to_close(self, now: float, limit: int = 100) -> list[Conversation]:
        return await self._conversations(
            "(status = 'in_progress' AND last_activity_at + timeout_s <= ?) OR (status = 'processing' AND "
            "(processing_until IS NULL OR processing_until <= ?)) ORDER BY last_activity_at LIMIT ?", (now, now, limit))

    async def update_open_conversation(self, uid: str, conversation_id: str, *, last_activity_at: float | None = None,
                                       duration_s: float | None = None, timeout_s: float | None = None) -> bool:
        sets, args = ["status = status"], []
        for clause, value in (("last_activity_at = ?", last_activity_at), ("timeout_s = ?", timeout_s),
                              ("duration_s = MAX(duration_s, ?)", duration_s)):
            if value is not None:
                sets.append(clause)
                args.append(float(value))
        return await self._run(self._write, f"UPDATE conversations SET {', '.join(sets)} "
                               "WHERE uid = ? AND id = ? AND status = 'in_progress'", (*args, uid, conversation_id)) > 0

    async def claim_close(self, uid: str, conversation_id: str, now: float, lease_s: float, *,
                          expired_only: bool) -> Conversation | None:
        def claim() -> list[tuple]:
            with _transaction(self._db):
                return self._db.execute(
                    f"UPDATE conversations SET status = 'processing', processing_until = ? "
                    f"WHERE uid = ? AND id = ? AND {_CLOSABLE} RETURNING {', '.join(_CONVERSATION_FIELDS)}",
                    (now + lease_s, uid, conversation_id, int(expired_only), now, now)).fetchall()

        claimed = _to_conversations(await self._run(claim))
        return claimed[0] if claimed else None

    async def finish_close(self, conversation: Conversation, lease_until: float) -> bool:
        c = conversation
        return await self._run(
            self._write, "UPDATE conversations SET status = ?, finished_at = ?, title = ?, overview = ?, emoji = ?, "
            "category = ?, action_items = ?, processing_until = NULL "
            "WHERE uid = ? AND id = ? AND status = 'processing' AND processing_until = ?",
            (c.status, c.finished_at, c.title, c.overview, c.emoji, c.category,
             json.dumps(c.action_items, ensure_ascii=False), c.uid, c.id, lease_until)) > 0

    async def _conversations(self, where: str, args: tuple) -> list[Conversation]:
        return _to_conversations(await self._run(
            self._read, f"SELECT {', '.join(_CONVERSATION_FIELDS)} FROM conversations WHERE {where}", args))

    async def delete_conversation(self, uid: str, conversation_id: str) -> bool:
        return await self._run(self._write, "DELETE FROM conversations WHERE uid = ? AND id = ?",
                               (uid, conversation_id)) > 0

    async def delete_conversations_before(self, started_before: float) -> int:
        return await self._run(self._write, "DELETE FROM conversations WHERE started_at < ?", (started_before,))

    # -- segments ------------------------------------------------------------------------------------------------

    async def upsert_segments(self, uid: str, segments: list[Segment]) -> None:
        def upsert() -> None:
            with _transaction(self._db):
                for seg in segments:
                    owner = self._db.execute("SELECT uid FROM conversations WHERE id = ?",
                                             (seg.conversation_id,)).fetchone()
                    if owner is None or owner[0] != uid:
                        raise KeyError(f"no conversation {seg.conversation_id} for this user")
                for seg in segments:
                    _upsert(self._db, "segments", "id",
                            {"id": seg.id, "conversation_id": seg.conversation_id, "uid": uid, "text": seg.text,
                             "speaker": seg.speaker, "speaker_id": seg.speaker_id, "is_user": int(seg.is_user),
                             "person_id": seg.person_id, "start": seg.start, "end": seg.end})

        if segments:
            await self._run(upsert)

    async def list_segments(self, uid: str, conversation_id: str) -> list[Segment]:
        rows = await self._run(
            self._read, 'SELECT id, conversation_id, text, speaker, speaker_id, is_user, person_id, start, "end" '
            "FROM segments WHERE uid = ? AND conversation_id = ? ORDER BY start, rowid", (uid, conversation_id))
        return [Segment(*r[:5], bool(r[5]), *r[6:]) for r in rows]

    # -- speaker state -------------------------------------------------------------------------------------------

    async def save_speaker_state(self, uid: str, conversation_id: str, state: bytes) -> None:
        try:
            await self._run(self._upsert, "speaker_states", "conversation_id",
                            {"conversation_id": conversation_id, "uid": uid, "state": state})
        except sqlite3.IntegrityError:
            raise KeyError(f"no conversation {conversation_id} for this user") from None

    async def load_speaker_state(self, uid: str, conversation_id: str) -> bytes | None:
        rows = await self._run(self._read, "SELECT state FROM speaker_states WHERE uid = ? AND conversation_id = ?",
                               (uid, conversation_id))
        return bytes(rows[0][0]) if rows else None

    # -- live streams --------------------------------------------------------------------------------------------

    async def open_stream(self, uid: str, stream_id: str, ttl_s: float, keep: int) -> list[str]:
        def register() -> list[str]:
            now = time.time()
            with _transaction(self._db):
                self._db.execute("DELETE FROM open_streams WHERE uid = ? AND expires_at <= ?", (uid, now))
                self._db.execute("INSERT OR IGNORE INTO open_streams (stream_id, uid, opened_at, expires_at) "
                                 "VALUES (?, ?, ?, ?)", (stream_id, uid, now, now + ttl_s))
                if keep <= 0:
                    return []
                older = [r[0] for r in self._db.execute(
                    "SELECT stream_id FROM open_streams WHERE uid = ? AND NOT revoked AND stream_id <> ? "
                    "ORDER BY opened_at DESC, stream_id LIMIT -1 OFFSET ?", (uid, stream_id, keep - 1))]
                self._db.executemany("UPDATE open_streams SET revoked = 1 WHERE stream_id = ?",
                                     [(i,) for i in older])
                return older

        return await self._run(register)

    async def refresh_stream(self, uid: str, stream_id: str, ttl_s: float) -> bool:
        def refresh() -> bool:
            now = time.time()
            with _transaction(self._db):
                row = self._db.execute("SELECT uid, revoked FROM open_streams WHERE stream_id = ?",
                                       (stream_id,)).fetchone()
                if row is not None and (row[0] != uid or row[1]):
                    return False
                self._db.execute("INSERT OR REPLACE INTO open_streams (stream_id, uid, opened_at, expires_at) "
                                 "VALUES (?, ?, COALESCE((SELECT opened_at FROM open_streams WHERE stream_id = ?), ?), "
                                 "?)", (stream_id, uid, stream_id, now, now + ttl_s))
                return True

        return await self._run(refresh)

    async def live_streams(self, uid: str) -> list[str]:
        rows = await self._run(self._read, "SELECT stream_id FROM open_streams WHERE uid = ? AND NOT revoked AND "
                               "expires_at > ? ORDER BY opened_at, stream_id", (uid, time.time()))
        return [r[0] for r in rows]

    async def close_stream(self, uid: str, stream_id: str) -> None:
        await self._run(self._write, "DELETE FROM open_streams WHERE uid = ? AND stream_id = ?", (uid, stream_id))

    # -- jobs ----------------------------------------------------------------------------------------------------

    async def acquire_job_run(self, job: str, run_key: str, owner: str, lease_s: float) -> bool:
        def acquire() -> bool:
            now = time.time()
            with _transaction(self._db):
                row = self._db.execute("SELECT lease_until, finished_at FROM job_runs WHERE job = ? AND run_key = ?",
                                       (job, run_key)).fetchone()
                if row is not None and (row[1] is not None or row[0] > now):
                    return False
                self._db.execute("INSERT OR REPLACE INTO job_runs (job, run_key, owner, lease_until) "
                                 "VALUES (?, ?, ?, ?)", (job, run_key, owner, now + lease_s))
                return True

        return await self._run(acquire)

    async def finish_job_run(self, job: str, run_key: str, owner: str, ok: bool, detail: str) -> None:
        await self._run(self._write, "UPDATE job_runs SET finished_at = ?, ok = ?, detail = ? "
                        "WHERE job = ? AND run_key = ? AND owner = ?",
                        (time.time(), int(ok), detail[:2000], job, run_key, owner))

    async def last_job_runs(self) -> dict[str, dict]:
        rows = await self._run(self._read, "SELECT job, run_key, owner, ok, detail, MAX(finished_at) FROM job_runs "
                               "WHERE finished_at IS NOT NULL GROUP BY job", ())
        return {r[0]: {"run_key": r[1], "owner": r[2], "ok": bool(r[3]), "detail": r[4], "finished_at": r[5]}
                for r in rows}

    async def prune_job_runs(self, before: float) -> int:
        return await self._run(self._write, _PRUNE_JOB_RUNS, (before, before))

    # -- plumbing (on the storage thread) ------------------------------------------------------------------------

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple) -> int:
        with _transaction(self._db):
            return self._db.execute(sql, args).rowcount

    def _upsert(self, table: str, key: str, row: dict[str, Any]) -> None:
        with _transaction(self._db):
            _upsert(self._db, table, key, row)


# Storage.prune_job_runs: every job's latest finished run stays (its parameters: the cutoff, twice)
_PRUNE_JOB_RUNS = (
    "DELETE FROM job_runs WHERE (finished_at IS NULL AND lease_until < ?) OR (finished_at < ? AND EXISTS ("
    "SELECT 1 FROM job_runs AS later WHERE later.job = job_runs.job AND later.finished_at > job_runs.finished_at))")


def _to_conversations(rows: list[tuple]) -> list[Conversation]:
    found = []
    for r in rows:
        fields = dict(zip(_CONVERSATION_FIELDS, r, strict=True))
        for f in _JSON_FIELDS:
            fields[f] = json.loads(fields[f])
        found.append(Conversation(**fields))
    return found


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _upsert(db: sqlite3.Connection, table: str, key: str, row: dict[str, Any]) -> None:
    """Insert, or update in place (never INSERT OR REPLACE: its delete would cascade to the row's children). A row
    of the same id that belongs to another uid is not touched: KeyError."""
    cols = ", ".join(f'"{c}"' for c in row)
    updates = ", ".join(f'"{c}" = excluded."{c}"' for c in row if c != key)
    guard = f" WHERE {table}.uid = excluded.uid" if "uid" in row and key != "uid" else ""
    cur = db.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))}) "
                     f'ON CONFLICT ("{key}") DO UPDATE SET {updates}{guard}', tuple(row.values()))
    if cur.rowcount == 0:
        raise KeyError(f"{table} {row[key]} belongs to another user")


def _load_vectors(db: sqlite3.Connection, profile_id: str, dim: int, newest: int = -1) -> np.ndarray:
    """The profile's rows in order (only its `newest` last ones when given), as a writable (n, dim) float32 array."""
    blobs = db.execute("SELECT vector FROM (SELECT seq, vector FROM speaker_embeddings WHERE profile_id = ? "
                       "ORDER BY seq DESC LIMIT ?) ORDER BY seq", (profile_id, newest)).fetchall()
    return np.frombuffer(b"".join(b[0] for b in blobs), dtype="<f4").reshape(-1, dim).copy()


def _insert_embeddings(db: sqlite3.Connection, profile_id: str, embeddings: np.ndarray, start: int) -> None:
    db.executemany(
        "INSERT INTO speaker_embeddings (profile_id, seq, vector) VALUES (?, ?, ?)",
        [(profile_id, start + i, np.asarray(e, dtype="<f4").tobytes()) for i, e in enumerate(embeddings)],
    )
