"""SQLite backend: one file, no server. The stdlib driver runs on one dedicated thread (SQLite connections are not
shared across threads), so the event loop never blocks on disk."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from storage.base import SpeakerProfile, Storage

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
"""


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
        def save() -> None:
            db = self._db
            with _transaction(db):
                if profile.kind == "user":  # one user profile per uid: a new enrolment replaces the old one
                    db.execute("DELETE FROM speaker_profiles WHERE uid = ? AND kind = 'user' AND id != ?",
                               (profile.uid, profile.id))
                db.execute(
                    "INSERT OR REPLACE INTO speaker_profiles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (profile.id, profile.uid, profile.kind, profile.name, profile.model,
                     int(profile.embeddings.shape[1]), profile.speech_seconds, profile.created_at,
                     profile.updated_at),
                )
                db.execute("DELETE FROM speaker_embeddings WHERE profile_id = ?", (profile.id,))
                _insert_embeddings(db, profile.id, profile.embeddings, 0)

        await self._run(save)

    async def add_profile_embeddings(self, uid: str, profile_id: str, embeddings: np.ndarray, seconds: float) -> bool:
        def add() -> bool:
            db = self._db
            with _transaction(db):
                row = db.execute("SELECT dim FROM speaker_profiles WHERE id = ? AND uid = ?",
                                 (profile_id, uid)).fetchone()
                if row is None:
                    return False
                if embeddings.shape[1] != row[0]:
                    raise ValueError(f"embedding size {embeddings.shape[1]} does not match the profile's {row[0]}")
                start = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM speaker_embeddings WHERE profile_id = ?",
                                   (profile_id,)).fetchone()[0]
                _insert_embeddings(db, profile_id, embeddings, start)
                db.execute("UPDATE speaker_profiles SET speech_seconds = speech_seconds + ?, updated_at = ? "
                           "WHERE id = ?", (seconds, time.time(), profile_id))
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
            blobs = db.execute("SELECT vector FROM speaker_embeddings WHERE profile_id = ? ORDER BY seq",
                               (pid,)).fetchall()
            vectors = np.frombuffer(b"".join(b[0] for b in blobs), dtype="<f4").reshape(-1, dim)
            profiles.append(SpeakerProfile(uid=uid, kind=kind, model=model, embeddings=vectors.copy(),
                                           speech_seconds=seconds, name=name, id=pid, created_at=created,
                                           updated_at=updated))
        return profiles


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _insert_embeddings(db: sqlite3.Connection, profile_id: str, embeddings: np.ndarray, start: int) -> None:
    db.executemany(
        "INSERT INTO speaker_embeddings (profile_id, seq, vector) VALUES (?, ?, ?)",
        [(profile_id, start + i, np.asarray(e, dtype="<f4").tobytes()) for i, e in enumerate(embeddings)],
    )
