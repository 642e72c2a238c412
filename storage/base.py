"""The repository interface every storage backend implements: users, conversations with their transcript
segments (upserted one by one, never rewritten as a whole list), the conversation's speaker clusters, speaker
profiles, and the scheduled jobs' own records (leases, so a job runs once per tick across replicas).

Speaker profiles hold the embeddings of enrolled voices: the user's own (`kind="user"`, at most one per uid) and
other people's (`kind="person"`). Embeddings from different models are not comparable, so each profile records
the embedder (`model`) that made them; matching ignores profiles made by another model.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from storage.profile_rows import ProfileLimits, profile_centroid

ProfileKind = Literal["user", "person"]
USER_SETTING_KEY_MAX = 64  # user-setting keys are fixed names chosen by the server (e.g. "webhook.audio_bytes")
USER_SETTING_VALUE_MAX = 64 * 1024  # bytes of a setting's JSON text: settings are small (a URL, a secret, flags)
# A key also names a Firestore document, so it starts with a letter or digit ("." and "__x__" are not document ids).
_SETTING_KEY = re.compile(rf"[a-z0-9][a-z0-9_.:-]{{0,{USER_SETTING_KEY_MAX - 1}}}")
_SETTING_DEPTH_MAX = 16  # nested objects and arrays in one value (Firestore allows 20 levels in a document)
_INT64 = range(-(2**63), 2**63)  # Firestore's integers
ConversationStatus = Literal["in_progress", "processing", "completed", "discarded"]
CONVERSATION_STATUSES: frozenset[str] = frozenset(get_args(ConversationStatus))


@dataclass
class User:
    uid: str
    time_zone: str = "UTC"  # IANA name, for the daily notifications
    webhook_url: str | None = None
    fcm_token: str | None = None
    created_at: float = field(default_factory=time.time)


@dataclass
class Conversation:
    uid: str
    status: ConversationStatus = "in_progress"
    language: str = "en"
    source: str = "omi"
    started_at: float = field(default_factory=time.time)  # wall clock of t=0 of its segment times
    last_activity_at: float = field(default_factory=time.time)  # last speech (or start), for the timeout
    timeout_s: float = 120.0
    finished_at: float | None = None
    duration_s: float = 0.0  # seconds of conversation time so far (where a continued stream's times resume)
    title: str | None = None
    overview: str | None = None
    emoji: str | None = None
    category: str | None = None  # one of Omi's categories ("other", "work", ...), from the summary
    action_items: list[dict] = field(default_factory=list)  # [{"description": str, "completed": bool}]
    events: list[dict] = field(default_factory=list)  # Omi's calendar events: [{title, start (ISO), duration, ...}]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    processing_until: float | None = None  # while `processing`: when its close lease runs out (the sweep retakes it)


@dataclass
class Segment:
    """A transcript segment as stored: the wire segment plus its conversation."""

    id: str
    conversation_id: str
    text: str
    speaker: str
    speaker_id: int
    is_user: bool
    person_id: str | None
    start: float
    end: float


@dataclass
class SpeakerProfile:
    uid: str
    kind: ProfileKind
    model: str  # the embedder that made the embeddings, e.g. "resemblyzer"
    embeddings: np.ndarray  # (n, dim) float32, each L2-normalised: one row per enrolled clip
    speech_seconds: float = 0.0  # how much speech the embeddings came from
    name: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def centroid(self) -> np.ndarray:
        """(dim,) the normalised mean of the enrolled embeddings."""
        mean = self.embeddings.mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-9)


class Storage(ABC):
    """All methods are coroutines and safe to call concurrently from the event loop. Every read and write of a
    user's data takes the uid, and backends filter by it: one user can never reach another's rows."""

    # What one profile keeps, applied by every profile write (storage.profile_rows); open_storage sets the settings'.
    profile_limits: ProfileLimits = ProfileLimits()

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> bool:
        """Reachable and answering (for /ready)."""

    @abstractmethod
    async def save_profile(self, profile: SpeakerProfile) -> None:
        """Insert or replace the profile and its embeddings, as `merge_profile_embeddings` keeps them (at most
        `profile_limits.max_embeddings`, near-duplicates dropped)."""

    @abstractmethod
    async def add_profile_embeddings(self, uid: str, profile_id: str, embeddings: np.ndarray, seconds: float) -> bool:
        """Append embeddings to a profile of this uid as `merge_profile_embeddings` keeps them (near-duplicates are
        not added, the oldest rows go beyond `profile_limits.max_embeddings`; `seconds` counts in proportion to the
        rows added), in one transaction; False if there is no such profile."""

    @abstractmethod
    async def list_profiles(self, uid: str) -> list[SpeakerProfile]: ...

    @abstractmethod
    async def get_profile(self, uid: str, profile_id: str) -> SpeakerProfile | None: ...

    @abstractmethod
    async def delete_profile(self, uid: str, profile_id: str) -> bool: ...

    async def user_profile(self, uid: str) -> SpeakerProfile | None:
        return next((p for p in await self.list_profiles(uid) if p.kind == "user"), None)

    async def matching_profiles(self, uid: str, model: str) -> list[SpeakerProfile]:
        """What a stream's speaker matching needs (`ProfileIndex`): this uid's profiles made by `model` that have a
        voice, oldest first, each with one row, its centroid (of its newest `profile_limits.max_embeddings` rows:
        profiles stored before the cap may hold more). SQL backends read only those rows; this default lists all."""
        return [profile_centroid(p, p.embeddings[-self.profile_limits.max_embeddings:])
                for p in await self.list_profiles(uid) if p.model == model and len(p.embeddings)]

    # -- users ---------------------------------------------------------------------------------------------------

    @abstractmethod
    async def save_user(self, user: User) -> None: ...

    @abstractmethod
    async def get_user(self, uid: str) -> User | None: ...

    @abstractmethod
    async def list_users(self) -> list[User]: ...

    # -- user settings: small JSON documents by key (developer webhooks, the webhook signing secret, notification
    # preferences); each key is written whole, so two routes writing different keys never undo each other ------

    @abstractmethod
    async def get_user_settings(self, uid: str) -> dict[str, dict]:
        """Every setting of the user: {key: value}; {} when none."""

    @abstractmethod
    async def set_user_setting(self, uid: str, key: str, value: dict | None) -> None:
        """Store `value` (a JSON object) under `key`, replacing what was there; None deletes the key. Keys are
        at most USER_SETTING_KEY_MAX characters of [a-z0-9_.:-] (ValueError otherwise)."""

    # -- conversations -------------------------------------------------------------------------------------------

    @abstractmethod
    async def save_conversation(self, conversation: Conversation) -> None:
        """Insert or update the conversation's own fields (never its segments)."""

    @abstractmethod
    async def get_conversation(self, uid: str, conversation_id: str) -> Conversation | None: ...

    @abstractmethod
    async def list_conversations(self, uid: str, status: ConversationStatus | None = None, limit: int = 50,
                                 before: float | None = None, *, statuses: Collection[str] | None = None,
                                 offset: int = 0, include_discarded: bool = True, started_from: float | None = None,
                                 started_to: float | None = None) -> list[Conversation]:
        """Newest first (by started_at, then id descending), `offset` skipped, at most `limit`. Filters, all
        combined: `status` (one) and `statuses` (any of them; empty: none match); `include_discarded=False` leaves out
        status "discarded"; `before`: started earlier (exclusive, paging); `started_from` / `started_to`: started in
        that range (inclusive, Omi's start_date / end_date)."""

    @abstractmethod
    async def conversations_to_close(self, now: float, limit: int = 100) -> list[Conversation]:
        """Conversations of any user the sweep must close: `in_progress` ones whose last activity is older than their
        timeout, and `processing` ones whose close lease ran out by `now` (or that have none: a crash, or a close
        that failed midway, left them)."""

    @abstractmethod
    async def update_open_conversation(self, uid: str, conversation_id: str, *, last_activity_at: float | None = None,
                                       duration_s: float | None = None, timeout_s: float | None = None) -> bool:
        """Compare-and-set on status: only while the conversation is `in_progress`, set `last_activity_at` and
        `timeout_s` (those given) and raise `duration_s` to at least the given value, in one atomic write. False
        (nothing written) when it is closed or closing, or not this uid's: a close is never undone by a stream."""

    @abstractmethod
    async def claim_close(self, uid: str, conversation_id: str, now: float, lease_s: float, *,
                          expired_only: bool) -> Conversation | None:
        """Take the close of a conversation, atomically: one `in_progress` (with `expired_only`, only if its timeout
        has passed at `now`), or one `processing` whose close lease ran out (`close_claimable`), becomes `processing`
        with `processing_until = now + lease_s`. Returns it as stored after the claim; None when it is not closable
        (or another caller holds its close): of concurrent callers exactly one wins."""

    @abstractmethod
    async def finish_close(self, conversation: Conversation, lease_until: float) -> bool:
        """Store a close's outcome (status, finished_at, title, overview, emoji, category, action_items; the lease
        cleared) only while the conversation is still `processing` under this lease (`processing_until ==
        lease_until`). False when another caller took the close over after the lease ran out, or it was deleted."""

    @abstractmethod
    async def delete_conversation(self, uid: str, conversation_id: str) -> bool:
        """The conversation, its segments and its speaker state."""

    @abstractmethod
    async def delete_conversations_before(self, started_before: float) -> int:
        """Retention: every user's conversations started before the time, with their segments. Returns the count."""

    # -- segments ------------------------------------------------------------------------------------------------

    @abstractmethod
    async def upsert_segments(self, uid: str, segments: list[Segment]) -> None:
        """Insert new segments, replace those whose id exists (a segment grows while it is spoken)."""

    @abstractmethod
    async def list_segments(self, uid: str, conversation_id: str) -> list[Segment]:
        """In time order."""

    async def relabel_segments(self, uid: str, conversation_id: str, segment_ids: Collection[str], *, is_user: bool,
                               person_id: str | None) -> list[Segment]:
        """Sets `is_user` and `person_id` of this conversation's segments with these ids (other ids are ignored, as
        Omi's assign-bulk does). Returns all the conversation's segments after. A read and an upsert: a segment the
        live stream rewrites meanwhile keeps the later write, as any two upserts of one id do."""
        segments = await self.list_segments(uid, conversation_id)
        wanted = set(segment_ids)
        changed = [s for s in segments if s.id in wanted]
        for seg in changed:
            seg.is_user, seg.person_id = is_user, person_id
        await self.upsert_segments(uid, changed)
        return segments

    # -- a conversation's speaker clusters (so labels survive a reconnect) ------------------------------------------

    @abstractmethod
    async def save_speaker_state(self, uid: str, conversation_id: str, state: bytes) -> None: ...

    @abstractmethod
    async def load_speaker_state(self, uid: str, conversation_id: str) -> bytes | None: ...

    # -- live streams: a row per open /v4/listen stream of any replica (MAX_STREAMS_PER_USER across replicas) --------

    @abstractmethod
    async def open_stream(self, uid: str, stream_id: str, ttl_s: float, keep: int) -> list[str]:
        """Register a live stream of `uid`, live for `ttl_s` unless refreshed (`refresh_stream`). With `keep` above 0,
        the user's live streams beyond the newest `keep` (this one is the newest) are revoked, and their ids returned:
        each one's replica stops it at its next refresh. Atomic per uid (two opens on two replicas never both keep
        themselves over the limit). The user's expired rows are deleted."""

    @abstractmethod
    async def refresh_stream(self, uid: str, stream_id: str, ttl_s: float) -> bool:
        """Keep a live stream `ttl_s` longer. False once it was revoked (its replica stops it). A row that ran out
        and was deleted (its replica stalled) is registered again."""

    @abstractmethod
    async def live_streams(self, uid: str) -> list[str]:
        """The user's live (unexpired, unrevoked) streams on every replica, oldest first."""

    @abstractmethod
    async def close_stream(self, uid: str, stream_id: str) -> None:
        """The stream ended: its row is deleted."""

    # -- jobs ----------------------------------------------------------------------------------------------------

    @abstractmethod
    async def acquire_job_run(self, job: str, run_key: str, owner: str, lease_s: float) -> bool:
        """True for exactly one caller per (job, run_key) while its lease holds: the run happens once across
        replicas. A lease that expired without a recorded result (a crashed replica) can be taken again."""

    @abstractmethod
    async def finish_job_run(self, job: str, run_key: str, owner: str, ok: bool, detail: str) -> None: ...

    @abstractmethod
    async def last_job_runs(self) -> dict[str, dict]:
        """job → {"run_key", "owner", "ok", "detail", "finished_at"} of its latest finished run."""

    @abstractmethod
    async def prune_job_runs(self, before: float) -> int:
        """Delete the runs finished before `before` and the unfinished leases that ran out before it, but never a
        job's latest finished run (what `last_job_runs` reports). Returns how many were deleted."""


def close_claimable(status: str, last_activity_at: float, timeout_s: float, processing_until: float | None,
                    now: float, expired_only: bool) -> bool:
    """Whether `claim_close` may take this conversation at `now` (the rule the SQL backends write as a WHERE)."""
    if status == "in_progress":
        return not expired_only or last_activity_at + timeout_s <= now
    return status == "processing" and (processing_until is None or processing_until <= now)


def status_filter(status: str | None, statuses: Collection[str] | None, include_discarded: bool) -> set[str] | None:
    """The statuses a listing may return, from list_conversations' filters: None when any status will do."""
    allowed: set[str] | None = None
    if status is not None:
        allowed = {status}
    if statuses is not None:
        allowed = set(statuses) if allowed is None else allowed & set(statuses)
    if not include_discarded:
        allowed = (set(CONVERSATION_STATUSES) if allowed is None else allowed) - {"discarded"}
    return allowed


def check_setting_key(key: object) -> str:
    """The key if it is a user-setting key (see `Storage.set_user_setting`), else ValueError."""
    if not isinstance(key, str) or not _SETTING_KEY.fullmatch(key):
        shown = repr(key[:USER_SETTING_KEY_MAX + 1]) if isinstance(key, str) else type(key).__name__
        raise ValueError(f"a user-setting key is 1 to {USER_SETTING_KEY_MAX} characters of [a-z0-9_.:-], starting "
                         f"with a letter or digit; got {shown}")
    return key


def check_setting_value(value: object) -> str:
    """A user-setting value's compact JSON text, after checking that every backend stores it as given: a dict of
    str keys and JSON values (str, finite float, 64-bit int, bool, None, list, dict), no NUL character (PostgreSQL
    jsonb refuses it), no array directly inside an array (Firestore refuses it), at most `_SETTING_DEPTH_MAX` levels
    and `USER_SETTING_VALUE_MAX` bytes. ValueError otherwise; the message never shows the value (it may be a
    secret)."""
    if not isinstance(value, dict):
        raise ValueError(f"a user-setting value is a JSON object (a dict), not {type(value).__name__}")
    pending: list[tuple[object, int, bool]] = [(value, 1, False)]  # (node, depth, directly inside an array)
    while pending:  # iterative: a deeply nested value gets a ValueError, not a RecursionError
        node, depth, in_array = pending.pop()
        if isinstance(node, dict | list) and depth > _SETTING_DEPTH_MAX:
            raise ValueError(f"a user-setting value nests more than {_SETTING_DEPTH_MAX} levels")
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise ValueError("a user-setting value's object keys must be strings")
            pending += [(k, depth, False) for k in node] + [(v, depth + 1, False) for v in node.values()]
        elif isinstance(node, list):
            if in_array:
                raise ValueError("a user-setting value cannot hold an array directly inside an array")
            pending += [(v, depth + 1, True) for v in node]
        elif isinstance(node, str):
            if "\x00" in node:
                raise ValueError("a user-setting value cannot hold a NUL character")
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if node not in _INT64:
                raise ValueError("a user-setting value's integers must fit in 64 bits")
        elif not isinstance(node, float):
            raise ValueError(f"a user-setting value cannot hold a {type(node).__name__} (JSON types only)")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except ValueError:  # NaN or infinity; a lone surrogate (UnicodeEncodeError)
        raise ValueError("a user-setting value holds a non-finite float or a string that is not valid Unicode") \
            from None
    if size > USER_SETTING_VALUE_MAX:
        raise ValueError(f"a user-setting value is at most {USER_SETTING_VALUE_MAX} bytes of JSON, got {size}")
    return text
