"""PostgreSQL backend on asyncpg (production, several replicas on one database).

The app creates and migrates its own schema at start: `MIGRATIONS` is an ordered list of SQL scripts, version n
being `MIGRATIONS[n - 1]`; `open()` applies the ones missing from `schema_migrations` in one transaction behind a
transaction-scoped advisory lock, so replicas starting together migrate once and the others wait and find it done.
Never edit a shipped migration: append a new one.

Same semantics as `storage.sqlite`, with every write that names an existing row by id also checking the row's uid
(a conversation, segment, profile or speaker state of another user is refused with KeyError, never overwritten).
The DSN is never logged nor kept in the repr (it may hold a password).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Collection

import asyncpg
import numpy as np

from storage.base import Conversation, ConversationStatus, Segment, SpeakerProfile, Storage, User, status_filter
from storage.profile_rows import added_seconds, merge_profile_embeddings, profile_centroid
from storage.user_settings import postgres_set_setting, postgres_settings

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: the initial schema (the same tables as storage.sqlite)
    """
    CREATE TABLE speaker_profiles (
        id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('user', 'person')),
        name TEXT,
        model TEXT NOT NULL,
        dim INTEGER NOT NULL CHECK (dim > 0),
        speech_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX speaker_profiles_uid ON speaker_profiles (uid);
    CREATE UNIQUE INDEX speaker_profiles_one_user ON speaker_profiles (uid) WHERE kind = 'user';
    CREATE TABLE speaker_embeddings (
        profile_id TEXT NOT NULL REFERENCES speaker_profiles (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        vector BYTEA NOT NULL,  -- float32 little-endian, `dim` of them
        PRIMARY KEY (profile_id, seq)
    );
    CREATE TABLE users (
        uid TEXT PRIMARY KEY,
        time_zone TEXT NOT NULL,
        webhook_url TEXT,
        fcm_token TEXT,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        status TEXT NOT NULL,
        language TEXT NOT NULL,
        source TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        last_activity_at DOUBLE PRECISION NOT NULL,
        timeout_s DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        duration_s DOUBLE PRECISION NOT NULL,
        title TEXT,
        overview TEXT,
        UNIQUE (id, uid)  -- the target of the (conversation, uid) foreign keys below
    );
    CREATE INDEX conversations_uid ON conversations (uid, started_at);
    CREATE INDEX conversations_open ON conversations (status, last_activity_at);
    CREATE TABLE segments (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        uid TEXT NOT NULL,
        seq BIGINT GENERATED ALWAYS AS IDENTITY,  -- first-insert order, the tie-break of equal starts
        text TEXT NOT NULL,
        speaker TEXT NOT NULL,
        speaker_id INTEGER NOT NULL,
        is_user BOOLEAN NOT NULL,
        person_id TEXT,
        start DOUBLE PRECISION NOT NULL,
        "end" DOUBLE PRECISION NOT NULL,
        FOREIGN KEY (conversation_id, uid) REFERENCES conversations (id, uid) ON DELETE CASCADE
    );
    CREATE INDEX segments_conversation ON segments (conversation_id, start);
    CREATE TABLE speaker_states (
        conversation_id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        state BYTEA NOT NULL,
        FOREIGN KEY (conversation_id, uid) REFERENCES conversations (id, uid) ON DELETE CASCADE
    );
    CREATE TABLE job_runs (
        job TEXT NOT NULL,
        run_key TEXT NOT NULL,
        owner TEXT NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        ok BOOLEAN,
        detail TEXT,
        PRIMARY KEY (job, run_key)
    );
    """,
    # 2: retention (every user's old conversations) and the jobs' status (latest finished run per job)
    """
    CREATE INDEX conversations_started ON conversations (started_at);
    CREATE INDEX job_runs_finished ON job_runs (job, finished_at DESC) WHERE finished_at IS NOT NULL;
    """,
    # 3: a summary's emoji, category and action items, and Omi's calendar events (the app's `structured`)
    """
    ALTER TABLE conversations
        ADD COLUMN emoji TEXT,
        ADD COLUMN category TEXT,
        ADD COLUMN action_items JSONB NOT NULL DEFAULT '[]'::jsonb,
        ADD COLUMN events JSONB NOT NULL DEFAULT '[]'::jsonb;
    """,
    # 4: a closing conversation's lease (the sweep retakes a close that crashed or failed once it runs out)
    """
    ALTER TABLE conversations ADD COLUMN processing_until DOUBLE PRECISION;
    """,
    # 5: user settings, one JSON object per (uid, key) (storage.user_settings)
    """
    CREATE TABLE user_settings (
        uid TEXT NOT NULL,
        key TEXT NOT NULL,
        value JSONB NOT NULL CHECK (jsonb_typeof(value) = 'object'),
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (uid, key)
    );
    """,
    # 6: live streams of every replica (MAX_STREAMS_PER_USER across replicas; Storage.open_stream)
    """
    CREATE TABLE open_streams (
        stream_id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        opened_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        revoked BOOLEAN NOT NULL DEFAULT false
    );
    CREATE INDEX open_streams_uid ON open_streams (uid, opened_at);
    """,
]

# pg_advisory_xact_lock keys (one 64-bit space per database): migrations, and one user's user-profile enrolment
_MIGRATION_LOCK = 0x6F6D_6953_746F_7231  # "omiStor1"
_USER_PROFILE_LOCK_NS = 0x6F6D_6955  # two-int form: (namespace, hashtext(uid))
_OPEN_STREAMS_LOCK_NS = 0x6F6D_6953  # two-int form: (namespace, hashtext(uid)): one user's stream registrations

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_CONVERSATION_FIELDS = ("id", "uid", "status", "language", "source", "started_at", "last_activity_at", "timeout_s",
                        "finished_at", "duration_s", "title", "overview", "emoji", "category", "action_items", "events",
                        "processing_until")
_CONVERSATION_FLOATS = {"started_at", "last_activity_at", "timeout_s", "duration_s"}
_CONVERSATION_JSON = ("action_items", "events")  # jsonb: asyncpg sends and returns it as JSON text
# storage.base.close_claimable as SQL; its parameters: $3 now, $4 expired_only
_CLOSABLE = ("((status = 'in_progress' AND (NOT $4 OR last_activity_at + timeout_s <= $3)) "
             "OR (status = 'processing' AND (processing_until IS NULL OR processing_until <= $3)))")
_NOW = "extract(epoch FROM clock_timestamp())"  # the database's clock: one clock for every replica's leases


def normalize_dsn(dsn: str) -> str:
    """asyncpg wants postgresql:// or postgres://; accept the SQLAlchemy spelling (postgresql+asyncpg://) too."""
    return re.sub(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://", "postgresql://", dsn.strip())


class PostgresStorage(Storage):
    def __init__(self, dsn: str, *, schema: str | None = None, min_size: int = 1, max_size: int = 10,
                 command_timeout: float = 30.0) -> None:
        """`schema`: keep the tables in this schema (created if missing) instead of the DSN's default search path,
        e.g. one per test or per deployment sharing a database."""
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError("schema must be a lower-case SQL identifier")
        self._dsn = normalize_dsn(dsn)
        self.schema = schema
        self._min_size, self._max_size, self._command_timeout = min_size, max_size, command_timeout
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:  # never the DSN
        return f"PostgresStorage(schema={self.schema!r}, open={self._pool is not None})"

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStorage is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        settings = {"application_name": "omi-unified-server"}
        if self.schema is not None:
            settings["search_path"] = self.schema
        pool = await asyncpg.create_pool(self._dsn, min_size=self._min_size, max_size=self._max_size,
                                         command_timeout=self._command_timeout, server_settings=settings)
        try:
            applied = await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        log.info("postgres storage open (schema %s, version %d%s)", self.schema or "default", len(MIGRATIONS),
                 f", applied {applied}" if applied else "")

    async def _migrate(self, pool: asyncpg.Pool) -> list[int]:
        """Apply the missing migrations; returns their versions. Concurrent callers (replicas) queue on the lock."""
        async with pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if self.schema is not None:
                exists = await con.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema)
                if not exists:
                    await con.execute(f'CREATE SCHEMA "{self.schema}"')  # name checked against _SCHEMA_NAME
            await con.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                              "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
            newer = {v for v in done if v > len(MIGRATIONS)}
            if newer:  # a newer release migrated this database: its schema is a superset, keep going
                log.warning("database has schema versions %s newer than this release knows", sorted(newer))
            applied = []
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                await con.execute(sql)
                await con.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())", version)
                applied.append(version)
            return applied

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self, timeout: float = 5.0) -> bool:
        if self._pool is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                return await self._pool.fetchval("SELECT 1") == 1
        except Exception:  # unreachable, closed, timed out: not ready
            return False

    async def schema_versions(self) -> list[int]:
        return [r["version"] for r in await self.pool.fetch("SELECT version FROM schema_migrations ORDER BY version")]

    # -- profiles ----------------------------------------------------------------------------------------------

    async def save_profile(self, profile: SpeakerProfile) -> None:
        vectors = _matrix(profile.embeddings)
        vectors = merge_profile_embeddings(vectors[:0], vectors, self.profile_limits)[0]
        async with self.pool.acquire() as con, con.transaction():
            if profile.kind == "user":  # one user profile per uid: a new enrolment replaces the old one
                # serialise this uid's enrolments, else two at once both pass the delete and one hits the index
                await con.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _USER_PROFILE_LOCK_NS,
                                  profile.uid)
                await con.execute("DELETE FROM speaker_profiles WHERE uid = $1 AND kind = 'user' AND id <> $2",
                                  profile.uid, profile.id)
            saved = await con.fetchval(
                "INSERT INTO speaker_profiles (id, uid, kind, name, model, dim, speech_seconds, created_at, "
                "updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind, name = EXCLUDED.name, model = EXCLUDED.model, "
                "dim = EXCLUDED.dim, speech_seconds = EXCLUDED.speech_seconds, created_at = EXCLUDED.created_at, "
                "updated_at = EXCLUDED.updated_at WHERE speaker_profiles.uid = EXCLUDED.uid RETURNING id",
                profile.id, profile.uid, profile.kind, profile.name, profile.model, vectors.shape[1],
                float(profile.speech_seconds), float(profile.created_at), float(profile.updated_at))
            if saved is None:
                raise KeyError(f"profile {profile.id} belongs to another user")
            await con.execute("DELETE FROM speaker_embeddings WHERE profile_id = $1", profile.id)
            await _insert_embeddings(con, profile.id, vectors, 0)

    async def add_profile_embeddings(self, uid: str, profile_id: str, embeddings: np.ndarray, seconds: float) -> bool:
        vectors = _matrix(embeddings)
        async with self.pool.acquire() as con, con.transaction():
            dim = await con.fetchval("SELECT dim FROM speaker_profiles WHERE id = $1 AND uid = $2 FOR UPDATE",
                                     profile_id, uid)  # the row lock orders concurrent appends' seq numbers
            if dim is None:
                return False
            if vectors.shape[1] != dim:
                raise ValueError(f"embedding size {vectors.shape[1]} does not match the profile's {dim}")
            blobs = await con.fetch("SELECT vector FROM speaker_embeddings WHERE profile_id = $1 ORDER BY seq",
                                    profile_id)
            kept = np.frombuffer(b"".join(b["vector"] for b in blobs), dtype="<f4").reshape(-1, dim)
            rows, added = merge_profile_embeddings(kept, vectors, self.profile_limits)
            if added or not len(vectors):
                await con.execute("DELETE FROM speaker_embeddings WHERE profile_id = $1", profile_id)
                await _insert_embeddings(con, profile_id, rows, 0)
                await con.execute("UPDATE speaker_profiles SET speech_seconds = speech_seconds + $1, updated_at = $2 "
                                  "WHERE id = $3", added_seconds(seconds, len(vectors), added), time.time(), profile_id)
            return True

    async def list_profiles(self, uid: str) -> list[SpeakerProfile]:
        return await self._load_profiles("uid = $1", uid)

    async def get_profile(self, uid: str, profile_id: str) -> SpeakerProfile | None:
        found = await self._load_profiles("uid = $1 AND id = $2", uid, profile_id)
        return found[0] if found else None

    async def delete_profile(self, uid: str, profile_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM speaker_profiles WHERE uid = $1 AND id = $2", uid, profile_id)
        return _count(status) > 0

    async def matching_profiles(self, uid: str, model: str) -> list[SpeakerProfile]:
        async with self.pool.acquire() as con, con.transaction(isolation="repeatable_read", readonly=True):
            profiles = await con.fetch("SELECT id, kind, name, dim, speech_seconds, created_at, updated_at "
                                       "FROM speaker_profiles WHERE uid = $1 AND model = $2 ORDER BY created_at, id",
                                       uid, model)
            blobs: dict[str, list[bytes]] = {r["id"]: [] for r in profiles}
            for e in await con.fetch("SELECT profile_id, vector FROM speaker_embeddings WHERE profile_id = ANY($1) "
                                     "ORDER BY profile_id, seq", list(blobs)):
                blobs[e["profile_id"]].append(e["vector"])
        newest = self.profile_limits.max_embeddings  # profiles stored before the cap may hold more rows
        blobs = {pid: rows[-newest:] for pid, rows in blobs.items()}
        return [profile_centroid(SpeakerProfile(uid=uid, kind=r["kind"], model=model, embeddings=np.zeros((0, 1)),
                                                speech_seconds=r["speech_seconds"], name=r["name"], id=r["id"],
                                                created_at=r["created_at"], updated_at=r["updated_at"]),
                                 np.frombuffer(b"".join(blobs[r["id"]]), dtype="<f4").reshape(-1, r["dim"]))
                for r in profiles if blobs[r["id"]]]

    async def _load_profiles(self, where: str, *args: object) -> list[SpeakerProfile]:
        async with self.pool.acquire() as con, con.transaction(isolation="repeatable_read", readonly=True):
            rows = await con.fetch("SELECT id, uid, kind, name, model, dim, speech_seconds, created_at, updated_at "
                                   f"FROM speaker_profiles WHERE {where} ORDER BY created_at, id", *args)
            if not rows:
                return []
            blobs: dict[str, list[bytes]] = {r["id"]: [] for r in rows}
            for e in await con.fetch("SELECT profile_id, vector FROM speaker_embeddings WHERE profile_id = ANY($1) "
                                     "ORDER BY profile_id, seq", list(blobs)):
                blobs[e["profile_id"]].append(e["vector"])
        return [SpeakerProfile(uid=r["uid"], kind=r["kind"], model=r["model"],
                               embeddings=np.frombuffer(b"".join(blobs[r["id"]]), dtype="<f4")
                               .reshape(-1, r["dim"]).astype(np.float32),
                               speech_seconds=r["speech_seconds"], name=r["name"], id=r["id"],
                               created_at=r["created_at"], updated_at=r["updated_at"]) for r in rows]

    # -- users -------------------------------------------------------------------------------------------------

    async def save_user(self, user: User) -> None:
        await self.pool.execute(
            "INSERT INTO users (uid, time_zone, webhook_url, fcm_token, created_at) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (uid) DO UPDATE SET time_zone = EXCLUDED.time_zone, webhook_url = EXCLUDED.webhook_url, "
            "fcm_token = EXCLUDED.fcm_token, created_at = EXCLUDED.created_at",
            user.uid, user.time_zone, user.webhook_url, user.fcm_token, float(user.created_at))

    async def get_user(self, uid: str) -> User | None:
        row = await self.pool.fetchrow("SELECT uid, time_zone, webhook_url, fcm_token, created_at FROM users "
                                       "WHERE uid = $1", uid)
        return User(*row) if row else None

    async def list_users(self) -> list[User]:
        rows = await self.pool.fetch("SELECT uid, time_zone, webhook_url, fcm_token, created_at FROM users "
                                     "ORDER BY uid")
        return [User(*r) for r in rows]

    async def get_user_settings(self, uid: str) -> dict[str, dict]:
        return await postgres_settings(self.pool, uid)

    async def set_user_setting(self, uid: str, key: str, value: dict | None) -> None:
        await postgres_set_setting(self.pool, uid, key, value)

    # -- conversations -------------------------------------------------------------------------------------------

    async def save_conversation(self, c: Conversation) -> None:
        """An update keeps the conversation's segments and speaker state; another user's id is a KeyError."""
        cols = ", ".join(_CONVERSATION_FIELDS)
        marks = ", ".join(f"${i}" for i in range(1, len(_CONVERSATION_FIELDS) + 1))
        updates = ", ".join(f"{f} = EXCLUDED.{f}" for f in _CONVERSATION_FIELDS if f not in ("id", "uid"))
        values = [float(getattr(c, f)) if f in _CONVERSATION_FLOATS else getattr(c, f) for f in _CONVERSATION_FIELDS]
        for f in _CONVERSATION_JSON:
            values[_CONVERSATION_FIELDS.index(f)] = json.dumps(getattr(c, f), ensure_ascii=False)
        for f in ("finished_at", "processing_until"):
            if getattr(c, f) is not None:
                values[_CONVERSATION_FIELDS.index(f)] = float(getattr(c, f))
        saved = await self.pool.fetchval(
            f"INSERT INTO conversations ({cols}) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates} "
            "WHERE conversations.uid = EXCLUDED.uid RETURNING id", *values)
        if saved is None:
            raise KeyError(f"conversation {c.id} belongs to another user")

    async def get_conversation(self, uid: str, conversation_id: str) -> Conversation | None:
        found = await self._conversations("uid = $1 AND id = $2", uid, conversation_id)
        return found[0] if found else None

    async def list_conversations(self, uid: str, status: ConversationStatus | None = None, limit: int = 50,
                                 before: float | None = None, *, statuses: Collection[str] | None = None,
                                 offset: int = 0, include_discarded: bool = True, started_from: float | None = None,
                                 started_to: float | None = None) -> list[Conversation]:
        where, args = ["uid = $1"], [uid]
        allowed = status_filter(status, statuses, include_discarded)
        if allowed is not None:
            if not allowed:
                return []
            args.append(sorted(allowed))
            where.append(f"status = ANY(${len(args)}::text[])")
        for op, value in (("<", before), (">=", started_from), ("<=", started_to)):
            if value is not None:
                args.append(float(value))
                where.append(f"started_at {op} ${len(args)}")
        args += [int(limit), int(offset)]
        return await self._conversations(f"{' AND '.join(where)} ORDER BY started_at DESC, id DESC "
                                         f"LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)

    async def conversations_to_close(self, now: float, limit: int = 100) -> list[Conversation]:
        return await self._conversations(
            "(status = 'in_progress' AND last_activity_at + timeout_s <= $1) OR (status = 'processing' AND "
            "(processing_until IS NULL OR processing_until <= $1)) ORDER BY last_activity_at LIMIT $2",
            float(now), int(limit))

    async def update_open_conversation(self, uid: str, conversation_id: str, *, last_activity_at: float | None = None,
                                       duration_s: float | None = None, timeout_s: float | None = None) -> bool:
        sets, args = ["status = status"], [uid, conversation_id]
        for clause, value in (("last_activity_at = {}", last_activity_at), ("timeout_s = {}", timeout_s),
                              ("duration_s = GREATEST(duration_s, {})", duration_s)):
            if value is not None:
                args.append(float(value))
                sets.append(clause.format(f"${len(args)}"))
        status = await self.pool.execute(f"UPDATE conversations SET {', '.join(sets)} "
                                         "WHERE uid = $1 AND id = $2 AND status = 'in_progress'", *args)
        return _count(status) > 0

    async def claim_close(self, uid: str, conversation_id: str, now: float, lease_s: float, *,
                          expired_only: bool) -> Conversation | None:
        # One UPDATE: a concurrent claim or update_open_conversation waits for this row and re-checks the WHERE on
        # what this one committed, so exactly one claim wins and no stream write lands after it.
        claimed = await self._conversations_returned(
            f"UPDATE conversations SET status = 'processing', processing_until = $3 + $5 "
            f"WHERE uid = $1 AND id = $2 AND {_CLOSABLE} RETURNING {', '.join(_CONVERSATION_FIELDS)}",
            uid, conversation_id, float(now), bool(expired_only), float(lease_s))
        return claimed[0] if claimed else None

    async def finish_close(self, conversation: Conversation, lease_until: float) -> bool:
        c = conversation
        status = await self.pool.execute(
            "UPDATE conversations SET status = $3, finished_at = $4, title = $5, overview = $6, emoji = $7, "
            "category = $8, action_items = $9, processing_until = NULL "
            "WHERE uid = $1 AND id = $2 AND status = 'processing' AND processing_until = $10",
            c.uid, c.id, c.status, None if c.finished_at is None else float(c.finished_at), c.title, c.overview,
            c.emoji, c.category, json.dumps(c.action_items, ensure_ascii=False), float(lease_until))
        return _count(status) > 0

    async def _conversations(self, where: str, *args: object) -> list[Conversation]:
        return await self._conversations_returned(
            f"SELECT {', '.join(_CONVERSATION_FIELDS)} FROM conversations WHERE {where}", *args)

    async def _conversations_returned(self, sql: str, *args: object) -> list[Conversation]:
        found = []
        for r in await self.pool.fetch(sql, *args):
            fields = dict(r)
            for f in _CONVERSATION_JSON:
                fields[f] = json.loads(fields[f])
            found.append(Conversation(**fields))
        return found

    async def delete_conversation(self, uid: str, conversation_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM conversations WHERE uid = $1 AND id = $2", uid,
                                         conversation_id)
        return _count(status) > 0

    async def delete_conversations_before(self, started_before: float) -> int:
        return _count(await self.pool.execute("DELETE FROM conversations WHERE started_at < $1",
                                              float(started_before)))

    # -- segments ------------------------------------------------------------------------------------------------

    async def upsert_segments(self, uid: str, segments: list[Segment]) -> None:
        if not segments:
            return
        latest = {s.id: s for s in segments}  # an id twice in one batch: the last one wins (as in sqlite)
        batch = list(latest.values())
        conversation_ids = sorted({s.conversation_id for s in batch})
        async with self.pool.acquire() as con, con.transaction():
            owned = {r["id"] for r in await con.fetch(
                "SELECT id FROM conversations WHERE id = ANY($1) AND uid = $2 FOR KEY SHARE", conversation_ids, uid)}
            missing = [c for c in conversation_ids if c not in owned]
            if missing:
                raise KeyError(f"no conversation {missing[0]} for this user")
            written = await con.fetch(
                'INSERT INTO segments (id, conversation_id, uid, text, speaker, speaker_id, is_user, person_id, '
                'start, "end") SELECT s.id, s.conversation_id, $1, s.text, s.speaker, s.speaker_id, s.is_user, '
                "s.person_id, s.start, s.stop FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], "
                "$6::int[], $7::bool[], $8::text[], $9::float8[], $10::float8[]) "
                "AS s (id, conversation_id, text, speaker, speaker_id, is_user, person_id, start, stop) "
                "ON CONFLICT (id) DO UPDATE SET conversation_id = EXCLUDED.conversation_id, text = EXCLUDED.text, "
                "speaker = EXCLUDED.speaker, speaker_id = EXCLUDED.speaker_id, is_user = EXCLUDED.is_user, "
                'person_id = EXCLUDED.person_id, start = EXCLUDED.start, "end" = EXCLUDED."end" '
                "WHERE segments.uid = EXCLUDED.uid RETURNING id",
                uid, [s.id for s in batch], [s.conversation_id for s in batch], [s.text for s in batch],
                [s.speaker for s in batch], [int(s.speaker_id) for s in batch], [bool(s.is_user) for s in batch],
                [s.person_id for s in batch], [float(s.start) for s in batch], [float(s.end) for s in batch])
            if len(written) != len(batch):  # an id taken by another user's segment: refuse the whole batch
                taken = sorted(set(latest) - {r["id"] for r in written})
                raise KeyError(f"segment {taken[0]} belongs to another user")

    async def list_segments(self, uid: str, conversation_id: str) -> list[Segment]:
        rows = await self.pool.fetch(
            'SELECT id, conversation_id, text, speaker, speaker_id, is_user, person_id, start, "end" FROM segments '
            "WHERE uid = $1 AND conversation_id = $2 ORDER BY start, seq", uid, conversation_id)
        return [Segment(*r) for r in rows]

    # -- speaker state -------------------------------------------------------------------------------------------

    async def save_speaker_state(self, uid: str, conversation_id: str, state: bytes) -> None:
        saved = await self.pool.fetchval(
            "INSERT INTO speaker_states (conversation_id, uid, state) SELECT id, uid, $3 FROM conversations "
            "WHERE id = $1 AND uid = $2 ON CONFLICT (conversation_id) DO UPDATE SET state = EXCLUDED.state "
            "WHERE speaker_states.uid = EXCLUDED.uid RETURNING conversation_id", conversation_id, uid, bytes(state))
        if saved is None:
            raise KeyError(f"no conversation {conversation_id} for this user")

    async def load_speaker_state(self, uid: str, conversation_id: str) -> bytes | None:
        state = await self.pool.fetchval("SELECT state FROM speaker_states WHERE uid = $1 AND conversation_id = $2",
                                         uid, conversation_id)
        return bytes(state) if state is not None else None

    # -- live streams --------------------------------------------------------------------------------------------

    async def open_stream(self, uid: str, stream_id: str, ttl_s: float, keep: int) -> list[str]:
        async with self.pool.acquire() as con, con.transaction():
            # One user's opens one at a time (every replica): each sees the rows the previous one committed.
            await con.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _OPEN_STREAMS_LOCK_NS, uid)
            await con.execute(f"DELETE FROM open_streams WHERE uid = $1 AND expires_at <= {_NOW}", uid)
            await con.execute(
                f"INSERT INTO open_streams (stream_id, uid, opened_at, expires_at) VALUES ($1, $2, {_NOW}, "
                f"{_NOW} + $3) ON CONFLICT (stream_id) DO NOTHING", stream_id, uid, float(ttl_s))
            if keep <= 0:
                return []
            rows = await con.fetch(
                "UPDATE open_streams SET revoked = true WHERE stream_id IN (SELECT stream_id FROM open_streams "
                "WHERE uid = $1 AND NOT revoked AND stream_id <> $2 ORDER BY opened_at DESC, stream_id OFFSET $3) "
                "RETURNING stream_id", uid, stream_id, int(keep) - 1)
            return [r["stream_id"] for r in rows]

    async def refresh_stream(self, uid: str, stream_id: str, ttl_s: float) -> bool:
        kept = await self.pool.fetchval(
            f"INSERT INTO open_streams (stream_id, uid, opened_at, expires_at) VALUES ($1, $2, {_NOW}, {_NOW} + $3) "
            "ON CONFLICT (stream_id) DO UPDATE SET expires_at = EXCLUDED.expires_at "
            "WHERE open_streams.uid = EXCLUDED.uid AND NOT open_streams.revoked RETURNING stream_id",
            stream_id, uid, float(ttl_s))
        return kept is not None

    async def live_streams(self, uid: str) -> list[str]:
        rows = await self.pool.fetch(f"SELECT stream_id FROM open_streams WHERE uid = $1 AND NOT revoked AND "
                                     f"expires_at > {_NOW} ORDER BY opened_at, stream_id", uid)
        return [r["stream_id"] for r in rows]

    async def close_stream(self, uid: str, stream_id: str) -> None:
        await self.pool.execute("DELETE FROM open_streams WHERE uid = $1 AND stream_id = $2", uid, stream_id)

    # -- jobs ----------------------------------------------------------------------------------------------------

    async def acquire_job_run(self, job: str, run_key: str, owner: str, lease_s: float) -> bool:
        # One statement, atomic under concurrency: the first insert wins; a conflicting caller waits for that
        # row's transaction and then re-checks the WHERE on the committed row, so it takes the run over only if
        # the lease has expired and no result was recorded (the holder crashed). Exactly one RETURNING row wins.
        won = await self.pool.fetchval(
            f"INSERT INTO job_runs (job, run_key, owner, lease_until) VALUES ($1, $2, $3, {_NOW} + $4) "
            "ON CONFLICT (job, run_key) DO UPDATE SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until, "
            "ok = NULL, detail = NULL "
            f"WHERE job_runs.finished_at IS NULL AND job_runs.lease_until <= {_NOW} RETURNING owner",
            job, run_key, owner, float(lease_s))
        return won is not None

    async def finish_job_run(self, job: str, run_key: str, owner: str, ok: bool, detail: str) -> None:
        await self.pool.execute(
            f"UPDATE job_runs SET finished_at = {_NOW}, ok = $1, detail = $2 "
            "WHERE job = $3 AND run_key = $4 AND owner = $5", bool(ok), detail[:2000], job, run_key, owner)

    async def last_job_runs(self) -> dict[str, dict]:
        rows = await self.pool.fetch(
            "SELECT DISTINCT ON (job) job, run_key, owner, ok, detail, finished_at FROM job_runs "
            "WHERE finished_at IS NOT NULL ORDER BY job, finished_at DESC")
        return {r["job"]: {"run_key": r["run_key"], "owner": r["owner"], "ok": bool(r["ok"]), "detail": r["detail"],
                           "finished_at": r["finished_at"]} for r in rows}

    async def prune_job_runs(self, before: float) -> int:
        return _count(await self.pool.execute(
            "DELETE FROM job_runs WHERE (finished_at IS NULL AND lease_until < $1) OR (finished_at < $1 AND EXISTS "
            "(SELECT 1 FROM job_runs AS later WHERE later.job = job_runs.job AND later.finished_at > "
            "job_runs.finished_at))",
            float(before)))


def _matrix(embeddings: np.ndarray) -> np.ndarray:
    vectors = np.asarray(embeddings, dtype="<f4")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"embeddings must be (n, dim), got shape {vectors.shape}")
    return vectors


async def _insert_embeddings(con: asyncpg.Connection, profile_id: str, vectors: np.ndarray, start: int) -> None:
    if len(vectors):
        await con.execute(
            "INSERT INTO speaker_embeddings (profile_id, seq, vector) "
            "SELECT $1, s.seq, s.vector FROM unnest($2::int[], $3::bytea[]) AS s (seq, vector)",
            profile_id, list(range(start, start + len(vectors))), [v.tobytes() for v in vectors])


def _count(status: str) -> int:
    """Rows affected, from asyncpg's command tag ("DELETE 3")."""
    return int(status.rsplit(" ", 1)[-1])
