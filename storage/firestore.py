"""Firestore backend (Omi deployments), on the google-cloud-firestore `AsyncClient` that firebase-admin provides.

Layout (Omi's): every user's data lives under their own document, so a uid can only reach its own paths.

    users/{uid}                                             time_zone, webhook_url, fcm_token, created_at
    users/{uid}/conversations/{id}                          the conversation's fields (+ uid, id, close_at)
    users/{uid}/conversations/{id}/segments/{segment_id}    one document per segment (+ uid, seq)
    users/{uid}/conversations/{id}/speaker_state/state      {"state": bytes}
    users/{uid}/speaker_profiles/{id}                       the profile's fields (+ dim, n_embeddings)
    users/{uid}/speaker_profiles/{id}/embeddings/{seq:06d}  {"seq", "vector": float32 little-endian bytes}
    users/{uid}/locks/user_profile                          written by every user-kind enrolment (see below)
    users/{uid}/settings/{key}                              a user setting: {"value": its map, "updated_at"}
    job_runs/{job}__{run_key}                               leases: owner, lease_until, finished_at, ok, detail
    job_status/{job}                                        the job's latest finished run (for last_job_runs)

Same semantics as `storage.sqlite` / `storage.postgres`:
- Ids of conversations, segments and profiles are unique across users there; here another user's document of the
  same id sits at another path, so creating one first checks with a collection-group query on the stored `id`
  field (inside the creating transaction) and refuses another user's id with KeyError. Updating an existing
  document of one's own needs no query (a conversation update is one `update()` call).
- Writes that depend on reads run in transactions (`async_transactional`, retried on contention by the SDK):
  segments and speaker state check their conversation in the same transaction, so a concurrent delete either
  sees them (and sweeps them) or they see the conversation gone (KeyError).
- A job lease is a transaction that reads `job_runs/{job}__{run_key}` and writes it only if it is absent, or
  expired without a recorded result; Firestore's server SDKs lock what a transaction read (pessimistic
  concurrency), so of two replicas racing for the same lease one commits and the other is retried, reads the
  winner's lease and returns False. Lease times come from this process's clock (no server clock in a
  transaction's reads): replicas' clock skew shifts when an expired lease can be taken over.
- One user-kind profile per uid: the enrolment transaction reads and writes `users/{uid}/locks/user_profile`, so
  two enrolments of one uid always conflict (not relying on query range locks), and deletes the uid's other
  user-kind profiles.
- Firestore does not cascade deletes: deleting a conversation deletes its document in a transaction, then its
  segments and speaker state in batches. A crash between the two leaves children under a missing document: never
  listed, swept by a later delete of that id, but seen again if the same id were saved anew (ids are random).
- A conversation's state changes after its creation (`update_open_conversation`, `claim_close`, `finish_close`)
  are transactions that read the document and write it only if its status (and close lease) still allow it, so a
  stream's write never undoes a close, and of two claims one wins. `close_at` is the time the sweep must look at
  it: its timeout while `in_progress`, its close lease's end while `processing`.
- `save_user` merges, so fields the Omi app keeps in `users/{uid}` survive.

Firestore limits to know: a document is at most 1 MiB (speaker state is one bytes field: saving more than
`MAX_BLOB_BYTES` raises ValueError); a transaction writes at most 500 documents (a profile enrolment writes one per
embedding, so enrol fewer than ~240 vectors at once). The queries need the indexes in `FIRESTORE_INDEXES`
(firestore.indexes.json format: deploy it with the Firebase CLI).

`close()` does not close the client: firebase-admin caches one per app and others may use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any
from urllib.parse import quote

import numpy as np
from google.api_core import exceptions as gexc
from google.cloud.firestore_v1 import FieldFilter, Query, async_transactional

from storage.base import (
    Conversation,
    ConversationStatus,
    Segment,
    SpeakerProfile,
    Storage,
    User,
    close_claimable,
    status_filter,
)
from storage.profile_rows import added_seconds, merge_profile_embeddings
from storage.user_settings import firestore_set_setting, firestore_settings

MAX_BLOB_BYTES = 1_000_000  # Firestore: a document (all its fields) is at most 1 MiB
_DELETE_PAGE = 400  # documents per delete batch (a batch writes at most 500)
_IN_LIMIT = 30  # values in one `in` filter
_CONVERSATION_FIELDS = ("id", "uid", "status", "language", "source", "started_at", "last_activity_at", "timeout_s",
                        "finished_at", "duration_s", "title", "overview", "emoji", "category", "action_items", "events",
                        "processing_until")
_CONVERSATION_FLOATS = ("started_at", "last_activity_at", "timeout_s", "duration_s")


def _field_override(group: str, field: str) -> dict:
    """Keep the automatic collection-scope indexes of the field and add the collection-group one."""
    return {"collectionGroup": group, "fieldPath": field, "indexes": [
        {"order": "ASCENDING", "queryScope": "COLLECTION"}, {"order": "DESCENDING", "queryScope": "COLLECTION"},
        {"arrayConfig": "CONTAINS", "queryScope": "COLLECTION"},
        {"order": "ASCENDING", "queryScope": "COLLECTION_GROUP"}]}


FIRESTORE_INDEXES: dict = {
    "indexes": [
        {"collectionGroup": "conversations", "queryScope": "COLLECTION",  # list_conversations(status(es)=...)
         "fields": [{"fieldPath": "status", "order": "ASCENDING"}, {"fieldPath": "started_at", "order": "DESCENDING"}]},
        {"collectionGroup": "conversations", "queryScope": "COLLECTION_GROUP",  # conversations_to_close
         "fields": [{"fieldPath": "status", "order": "ASCENDING"}, {"fieldPath": "close_at", "order": "ASCENDING"}]},
    ],
    "fieldOverrides": [
        _field_override("conversations", "id"),  # the cross-user id checks
        _field_override("segments", "id"),
        _field_override("speaker_profiles", "id"),
        _field_override("conversations", "started_at"),  # retention
    ],
}


class FirestoreStorage(Storage):
    def __init__(self, client: Any) -> None:
        """`client`: a google.cloud.firestore AsyncClient (or a stand-in with the same calls, in tests)."""
        self._client = client
        self._open = False

    @classmethod
    def from_settings(cls, settings: Any) -> FirestoreStorage:
        """The firebase-admin default app's async client (the app is created from SERVICE_ACCOUNT_JSON,
        FIREBASE_CREDENTIALS or FIREBASE_PROJECT_ID, or application default credentials, unless auth.py already
        made it)."""
        from firebase_admin import firestore_async

        from auth import firebase_app

        return cls(firestore_async.client(firebase_app(settings)))

    def __repr__(self) -> str:
        return f"FirestoreStorage(open={self._open})"

    @property
    def client(self) -> Any:
        if not self._open:
            raise RuntimeError("FirestoreStorage is not open")
        return self._client

    async def open(self) -> None:
        self._open = True  # nothing to connect: the client dials on first use

    async def close(self) -> None:
        self._open = False

    async def ping(self, timeout: float = 5.0) -> bool:
        if not self._open:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._client.collection("job_runs").document("ping").get()
            return True
        except Exception:  # unreachable, no credentials, timed out: not ready
            return False

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _user(self, uid: str) -> Any:
        return self.client.collection("users").document(uid)

    def _conversations(self, uid: str) -> Any:
        return self._user(uid).collection("conversations")

    def _profiles(self, uid: str) -> Any:
        return self._user(uid).collection("speaker_profiles")

    async def _transact(self, fn: Callable[..., Awaitable[Any]], *args: Any, read_only: bool = False) -> Any:
        """Run `fn(transaction, *args)` in a transaction (retried by the SDK when it aborts on contention)."""
        return await async_transactional(fn)(self.client.transaction(read_only=read_only), *args)

    async def _get_all(self, transaction: Any, refs: list) -> dict[str, Any]:
        """Snapshots by document path (one round trip)."""
        return {snap.reference.path: snap async for snap in self.client.get_all(refs, transaction=transaction)}

    async def _refuse_foreign_id(self, transaction: Any, group: str, doc_id: str, uid: str) -> None:
        """KeyError if another user has a document of this id in a collection named `group`."""
        query = self.client.collection_group(group).where(filter=FieldFilter("id", "==", doc_id)).limit(1)
        async for snap in query.stream(transaction=transaction):
            if _uid_of(snap.reference) != uid:
                raise KeyError(f"{group} {doc_id} belongs to another user")

    async def _delete_all(self, collection: Any) -> int:
        """Every document of the collection, in batches (Firestore never cascades)."""
        deleted = 0
        while True:
            snaps = [s async for s in collection.limit(_DELETE_PAGE).stream()]
            if not snaps:
                return deleted
            batch = self.client.batch()
            for snap in snaps:
                batch.delete(snap.reference)
            await batch.commit()
            deleted += len(snaps)

    # -- profiles ----------------------------------------------------------------------------------------------

    async def save_profile(self, profile: SpeakerProfile) -> None:
        vectors = _matrix(profile.embeddings)
        await self._transact(self._save_profile, profile,
                             merge_profile_embeddings(vectors[:0], vectors, self.profile_limits)[0])

    async def _save_profile(self, transaction: Any, profile: SpeakerProfile, vectors: np.ndarray) -> None:
        ref = self._profiles(profile.uid).document(profile.id)
        lock = self._user(profile.uid).collection("locks").document("user_profile")
        found = await self._get_all(transaction, [ref, lock] if profile.kind == "user" else [ref])
        own = found[ref.path]
        if not own.exists:
            await self._refuse_foreign_id(transaction, "speaker_profiles", profile.id, profile.uid)
        replaced = []
        if profile.kind == "user":  # one user profile per uid: a new enrolment replaces the old one
            query = self._profiles(profile.uid).where(filter=FieldFilter("kind", "==", "user"))
            replaced = [s async for s in query.stream(transaction=transaction) if s.id != profile.id]
        # all reads done: writes from here on
        for snap in replaced:
            _delete_profile(transaction, snap)
        embeddings = ref.collection("embeddings")
        for seq in range(len(vectors), _n_embeddings(own)):
            transaction.delete(embeddings.document(_seq_id(seq)))
        for seq, vector in enumerate(vectors):
            transaction.set(embeddings.document(_seq_id(seq)), {"seq": seq, "vector": vector.tobytes()})
        transaction.set(ref, {"id": profile.id, "uid": profile.uid, "kind": profile.kind, "name": profile.name,
                              "model": profile.model, "dim": int(vectors.shape[1]),
                              "speech_seconds": float(profile.speech_seconds), "created_at": float(profile.created_at),
                              "updated_at": float(profile.updated_at), "n_embeddings": len(vectors)})
        if profile.kind == "user":
            transaction.set(lock, {"profile_id": profile.id, "updated_at": time.time()})

    async def add_profile_embeddings(self, uid: str, profile_id: str, embeddings: np.ndarray, seconds: float) -> bool:
        return await self._transact(self._add_embeddings, self._profiles(uid).document(profile_id),
                                    _matrix(embeddings), float(seconds))

    async def _add_embeddings(self, transaction: Any, ref: Any, vectors: np.ndarray, seconds: float) -> bool:
        snap = await ref.get(transaction=transaction)  # the profile document orders concurrent appends
        if not snap.exists:
            return False
        doc = snap.to_dict()
        if vectors.shape[1] != doc["dim"]:
            raise ValueError(f"embedding size {vectors.shape[1]} does not match the profile's {doc['dim']}")
        stored = _n_embeddings(snap)
        rows, added = merge_profile_embeddings(await self._load_vectors(transaction, snap), vectors,
                                               self.profile_limits)
        if not added and len(vectors):
            return True
        # all reads done: the kept rows are rewritten at seq 0..n-1 (fewer than 500 writes: the cap is far below)
        embeddings = ref.collection("embeddings")
        for seq in range(len(rows), stored):
            transaction.delete(embeddings.document(_seq_id(seq)))
        for seq, vector in enumerate(rows):
            transaction.set(embeddings.document(_seq_id(seq)), {"seq": seq, "vector": vector.tobytes()})
        transaction.update(ref, {"n_embeddings": len(rows),
                                 "speech_seconds": float(doc.get("speech_seconds", 0.0))
                                 + added_seconds(seconds, len(vectors), added),
                                 "updated_at": time.time()})
        return True

    async def list_profiles(self, uid: str) -> list[SpeakerProfile]:
        return await self._transact(self._load_profiles, uid, None, read_only=True)

    async def get_profile(self, uid: str, profile_id: str) -> SpeakerProfile | None:
        found = await self._transact(self._load_profiles, uid, profile_id, read_only=True)
        return found[0] if found else None

    async def _load_profiles(self, transaction: Any, uid: str, profile_id: str | None) -> list[SpeakerProfile]:
        """In a read-only transaction: a profile and its embeddings from one snapshot."""
        if profile_id is not None:
            snap = await self._profiles(uid).document(profile_id).get(transaction=transaction)
            snaps = [snap] if snap.exists else []
        else:
            snaps = [s async for s in self._profiles(uid).order_by("created_at").stream(transaction=transaction)]
        vectors = await asyncio.gather(*(self._load_vectors(transaction, s) for s in snaps))
        profiles = []
        for snap, matrix in zip(snaps, vectors, strict=True):
            d = snap.to_dict()
            profiles.append(SpeakerProfile(uid=uid, kind=d["kind"], model=d["model"], embeddings=matrix,
                                           speech_seconds=d["speech_seconds"], name=d.get("name"), id=snap.id,
                                           created_at=d["created_at"], updated_at=d["updated_at"]))
        return profiles

    async def _load_vectors(self, transaction: Any, snap: Any) -> np.ndarray:
        n, dim = _n_embeddings(snap), int(snap.to_dict()["dim"])
        query = snap.reference.collection("embeddings").order_by("seq")
        docs = [e.to_dict() async for e in query.stream(transaction=transaction)]
        blobs = [d["vector"] for d in docs if d["seq"] < n]
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, dim).astype(np.float32)

    async def delete_profile(self, uid: str, profile_id: str) -> bool:
        return await self._transact(self._delete_profile_if_exists, self._profiles(uid).document(profile_id))

    async def _delete_profile_if_exists(self, transaction: Any, ref: Any) -> bool:
        snap = await ref.get(transaction=transaction)
        if not snap.exists:
            return False
        _delete_profile(transaction, snap)
        return True

    # -- users -------------------------------------------------------------------------------------------------

    async def save_user(self, user: User) -> None:
        await self._user(user.uid).set({"time_zone": user.time_zone, "webhook_url": user.webhook_url,
                                        "fcm_token": user.fcm_token, "created_at": float(user.created_at)},
                                       merge=True)  # keep the fields the Omi app stores there

    async def get_user(self, uid: str) -> User | None:
        snap = await self._user(uid).get()
        return _to_user(snap) if snap.exists else None

    async def list_users(self) -> list[User]:
        users = [_to_user(s) async for s in self.client.collection("users").stream()]
        return sorted(users, key=lambda u: u.uid)

    async def get_user_settings(self, uid: str) -> dict[str, dict]:
        return await firestore_settings(self._user(uid).collection("settings"))

    async def set_user_setting(self, uid: str, key: str, value: dict | None) -> None:
        await firestore_set_setting(self._user(uid).collection("settings"), key, value)

    # -- conversations -------------------------------------------------------------------------------------------

    async def save_conversation(self, c: Conversation) -> None:
        """An update keeps the conversation's segments and speaker state; another user's id is a KeyError."""
        ref = self._conversations(c.uid).document(c.id)
        doc = _conversation_doc(c)
        try:
            await ref.update(doc)  # the common case (every recorded segment): one write, no read
        except gexc.NotFound:
            await self._transact(self._create_conversation, ref, doc)

    async def _create_conversation(self, transaction: Any, ref: Any, doc: dict) -> None:
        if not (await ref.get(transaction=transaction)).exists:
            await self._refuse_foreign_id(transaction, "conversations", doc["id"], doc["uid"])
        transaction.set(ref, doc)

    async def get_conversation(self, uid: str, conversation_id: str) -> Conversation | None:
        snap = await self._conversations(uid).document(conversation_id).get()
        return _to_conversation(snap) if snap.exists else None

    async def list_conversations(self, uid: str, status: ConversationStatus | None = None, limit: int = 50,
                                 before: float | None = None, *, statuses: Collection[str] | None = None,
                                 offset: int = 0, include_discarded: bool = True, started_from: float | None = None,
                                 started_to: float | None = None) -> list[Conversation]:
        query = self._conversations(uid)
        allowed = status_filter(status, statuses, include_discarded)
        if allowed is not None:
            if not allowed:
                return []
            query = query.where(filter=FieldFilter("status", "in", sorted(allowed)))  # at most 4 values
        for op, value in (("<", before), (">=", started_from), ("<=", started_to)):
            if value is not None:
                query = query.where(filter=FieldFilter("started_at", op, float(value)))
        query = query.order_by("started_at", direction=Query.DESCENDING)  # ties: id descending
        if offset:
            query = query.offset(int(offset))  # Firestore still reads (and bills) the skipped documents
        return [_to_conversation(s) async for s in query.limit(int(limit)).stream()]

    async def conversations_to_close(self, now: float, limit: int = 100) -> list[Conversation]:
        # close_at = last_activity_at + timeout_s, stored (Firestore filters on fields, not expressions). The due
        # ones are few (the sweep closes them), so they are ordered by last activity here.
        query = (self.client.collection_group("conversations")
                 .where(filter=FieldFilter("status", "in", ["in_progress", "processing"]))
                 .where(filter=FieldFilter("close_at", "<=", float(now))))
        due = [_to_conversation(s) async for s in query.stream()]
        return sorted(due, key=lambda c: (c.last_activity_at, c.id))[:limit]

    async def update_open_conversation(self, uid: str, conversation_id: str, *, last_activity_at: float | None = None,
                                       duration_s: float | None = None, timeout_s: float | None = None) -> bool:
        return await self._transact(self._update_open, self._conversations(uid).document(conversation_id),
                                    last_activity_at, duration_s, timeout_s)

    @staticmethod
    async def _update_open(transaction: Any, ref: Any, last_activity_at: float | None, duration_s: float | None,
                           timeout_s: float | None) -> bool:
        d = (await ref.get(transaction=transaction)).to_dict() or {}
        if d.get("status") != "in_progress":
            return False
        changes = {"last_activity_at": float(d["last_activity_at"] if last_activity_at is None else last_activity_at),
                   "timeout_s": float(d["timeout_s"] if timeout_s is None else timeout_s),
                   "duration_s": max(float(d["duration_s"]), float(duration_s or 0.0))}
        changes["close_at"] = changes["last_activity_at"] + changes["timeout_s"]
        transaction.update(ref, changes)
        return True

    async def claim_close(self, uid: str, conversation_id: str, now: float, lease_s: float, *,
                          expired_only: bool) -> Conversation | None:
        return await self._transact(self._claim_close, self._conversations(uid).document(conversation_id),
                                    float(now), float(now) + float(lease_s), expired_only)

    @staticmethod
    async def _claim_close(transaction: Any, ref: Any, now: float, until: float,
                           expired_only: bool) -> Conversation | None:
        snap = await ref.get(transaction=transaction)
        if not snap.exists:
            return None
        c = _to_conversation(snap)
        if not close_claimable(c.status, c.last_activity_at, c.timeout_s, c.processing_until, now, expired_only):
            return None
        transaction.update(ref, {"status": "processing", "processing_until": until, "close_at": until})
        c.status, c.processing_until = "processing", until
        return c

    async def finish_close(self, conversation: Conversation, lease_until: float) -> bool:
        c = conversation
        outcome = {"status": c.status, "finished_at": None if c.finished_at is None else float(c.finished_at),
                   "title": c.title, "overview": c.overview, "emoji": c.emoji, "category": c.category,
                   "action_items": list(c.action_items), "processing_until": None}
        return await self._transact(self._finish_close, self._conversations(c.uid).document(c.id), float(lease_until),
                                    outcome)

    @staticmethod
    async def _finish_close(transaction: Any, ref: Any, lease_until: float, outcome: dict) -> bool:
        d = (await ref.get(transaction=transaction)).to_dict() or {}
        if d.get("status") != "processing" or d.get("processing_until") != lease_until:
            return False
        transaction.update(ref, outcome)
        return True

    async def delete_conversation(self, uid: str, conversation_id: str) -> bool:
        return await self._delete_conversation(self._conversations(uid).document(conversation_id))

    async def _delete_conversation(self, ref: Any) -> bool:
        deleted = await self._transact(self._delete_if_exists, ref)
        # then its children (also when the document was already gone: a sweep a crash interrupted is finished)
        await self._delete_all(ref.collection("segments"))
        await self._delete_all(ref.collection("speaker_state"))
        return deleted

    @staticmethod
    async def _delete_if_exists(transaction: Any, ref: Any) -> bool:
        if not (await ref.get(transaction=transaction)).exists:
            return False
        transaction.delete(ref)
        return True

    async def delete_conversations_before(self, started_before: float) -> int:
        query = (self.client.collection_group("conversations")
                 .where(filter=FieldFilter("started_at", "<", float(started_before))).limit(_DELETE_PAGE))
        limiter = asyncio.Semaphore(16)

        async def delete(ref: Any) -> bool:
            async with limiter:
                return await self._delete_conversation(ref)

        count = 0
        while snaps := [s async for s in query.stream()]:  # deleted ones drop out of the next page
            count += sum(await asyncio.gather(*(delete(s.reference) for s in snaps)))
        return count

    # -- segments ------------------------------------------------------------------------------------------------

    async def upsert_segments(self, uid: str, segments: list[Segment]) -> None:
        if segments:
            latest = {s.id: s for s in segments}  # an id twice in one batch: the last one wins
            await self._transact(self._upsert_segments, uid, list(latest.values()))

    async def _upsert_segments(self, transaction: Any, uid: str, batch: list[Segment]) -> None:
        conversations = self._conversations(uid)
        owned = [conversations.document(cid) for cid in sorted({s.conversation_id for s in batch})]
        refs = {s.id: conversations.document(s.conversation_id).collection("segments").document(s.id) for s in batch}
        found = await self._get_all(transaction, [*owned, *refs.values()])
        for ref in owned:
            if not found[ref.path].exists:
                raise KeyError(f"no conversation {ref.id} for this user")
        seqs = {sid: found[ref.path].to_dict()["seq"] for sid, ref in refs.items() if found[ref.path].exists}
        moved = []  # this user's segment of that id in another of their conversations (it moves, as in sql)
        fresh = [sid for sid in refs if sid not in seqs]
        for chunk in _chunks(fresh, _IN_LIMIT):
            query = self.client.collection_group("segments").where(filter=FieldFilter("id", "in", chunk))
            async for snap in query.stream(transaction=transaction):
                if _uid_of(snap.reference) != uid:
                    raise KeyError(f"segment {snap.id} belongs to another user")
                seqs[snap.id] = snap.to_dict()["seq"]
                moved.append(snap.reference)
        # all reads done: writes from here on
        for ref in moved:
            transaction.delete(ref)
        first = time.time_ns() // 1000 * 1000  # first-insert order, the tie-break of equal starts
        for i, s in enumerate(batch):
            transaction.set(refs[s.id], {
                "id": s.id, "conversation_id": s.conversation_id, "uid": uid, "text": s.text, "speaker": s.speaker,
                "speaker_id": int(s.speaker_id), "is_user": bool(s.is_user), "person_id": s.person_id,
                "start": float(s.start), "end": float(s.end), "seq": seqs.get(s.id, first + i)})

    async def list_segments(self, uid: str, conversation_id: str) -> list[Segment]:
        collection = self._conversations(uid).document(conversation_id).collection("segments")
        docs = sorted([s.to_dict() async for s in collection.stream()], key=lambda d: (d["start"], d["seq"], d["id"]))
        return [Segment(id=d["id"], conversation_id=d["conversation_id"], text=d["text"], speaker=d["speaker"],
                        speaker_id=d["speaker_id"], is_user=d["is_user"], person_id=d["person_id"], start=d["start"],
                        end=d["end"]) for d in docs]

    # -- speaker state -------------------------------------------------------------------------------------------

    async def save_speaker_state(self, uid: str, conversation_id: str, state: bytes) -> None:
        state = bytes(state)
        if len(state) > MAX_BLOB_BYTES:
            raise ValueError(f"speaker state of {len(state)} bytes does not fit a Firestore document")
        await self._transact(self._save_speaker_state, self._conversations(uid).document(conversation_id), state)

    @staticmethod
    async def _save_speaker_state(transaction: Any, ref: Any, state: bytes) -> None:
        if not (await ref.get(transaction=transaction)).exists:
            raise KeyError(f"no conversation {ref.id} for this user")
        transaction.set(ref.collection("speaker_state").document("state"), {"state": state})

    async def load_speaker_state(self, uid: str, conversation_id: str) -> bytes | None:
        ref = self._conversations(uid).document(conversation_id).collection("speaker_state").document("state")
        snap = await ref.get()
        return bytes(snap.to_dict()["state"]) if snap.exists else None

    # -- live streams: users/{uid}/open_streams/{stream_id}; users/{uid}/open_streams_lock/lock is written by every
    # open, so two opens of one user on two replicas conflict and one transaction retries (seeing the other's row) ---

    def _streams(self, uid: str) -> Any:
        return self._user(uid).collection("open_streams")

    async def open_stream(self, uid: str, stream_id: str, ttl_s: float, keep: int) -> list[str]:
        lock = self._user(uid).collection("open_streams_lock").document("lock")
        return await self._transact(self._open_stream, lock, uid, stream_id, float(ttl_s), int(keep))

    async def _open_stream(self, transaction: Any, lock: Any, uid: str, stream_id: str, ttl_s: float,
                           keep: int) -> list[str]:
        await lock.get(transaction=transaction)
        rows = [snap async for snap in self._streams(uid).stream(transaction=transaction)]
        now = time.time()
        live = []
        for snap in rows:
            row = snap.to_dict()
            if row["expires_at"] <= now:
                transaction.delete(snap.reference)
            elif not row["revoked"] and snap.id != stream_id:
                live.append((row["opened_at"], snap.id, snap.reference))
        transaction.set(lock, {"at": now})
        if not any(snap.id == stream_id for snap in rows):
            transaction.set(self._streams(uid).document(stream_id),
                            {"uid": uid, "opened_at": now, "expires_at": now + ttl_s, "revoked": False})
        if keep <= 0:
            return []
        live.sort(key=lambda t: (-t[0], t[1]))  # newest first, as the SQL backends order them
        revoked = live[keep - 1:]
        for _, _, ref in revoked:
            transaction.update(ref, {"revoked": True})
        return [i for _, i, _ in revoked]

    async def refresh_stream(self, uid: str, stream_id: str, ttl_s: float) -> bool:
        return await self._transact(self._refresh_stream, self._streams(uid).document(stream_id), uid, float(ttl_s))

    @staticmethod
    async def _refresh_stream(transaction: Any, ref: Any, uid: str, ttl_s: float) -> bool:
        snap = await ref.get(transaction=transaction)
        now = time.time()
        if snap.exists:
            if snap.to_dict()["revoked"]:
                return False
            transaction.update(ref, {"expires_at": now + ttl_s})
        else:
            transaction.set(ref, {"uid": uid, "opened_at": now, "expires_at": now + ttl_s, "revoked": False})
        return True

    async def live_streams(self, uid: str) -> list[str]:
        now = time.time()
        rows = [(s.to_dict(), s.id) async for s in self._streams(uid).stream()]
        return [i for row, i in sorted(rows, key=lambda t: (t[0]["opened_at"], t[1]))
                if not row["revoked"] and row["expires_at"] > now]

    async def close_stream(self, uid: str, stream_id: str) -> None:
        await self._streams(uid).document(stream_id).delete()

    # -- jobs ----------------------------------------------------------------------------------------------------

    def _run_ref(self, job: str, run_key: str) -> Any:
        return self.client.collection("job_runs").document(f"{_job_id(job)}__{quote(run_key, safe=':')}")

    async def acquire_job_run(self, job: str, run_key: str, owner: str, lease_s: float) -> bool:
        return await self._transact(self._acquire, self._run_ref(job, run_key), job, run_key, owner, float(lease_s))

    @staticmethod
    async def _acquire(transaction: Any, ref: Any, job: str, run_key: str, owner: str, lease_s: float) -> bool:
        snap = await ref.get(transaction=transaction)
        now = time.time()
        if snap.exists:
            lease = snap.to_dict()
            if lease.get("finished_at") is not None or lease["lease_until"] > now:  # done, or still held
                return False
        transaction.set(ref, {"job": job, "run_key": run_key, "owner": owner, "acquired_at": now,
                              "lease_until": now + lease_s, "finished_at": None, "ok": None, "detail": None})
        return True

    async def finish_job_run(self, job: str, run_key: str, owner: str, ok: bool, detail: str) -> None:
        status = self.client.collection("job_status").document(_job_id(job))
        await self._transact(self._finish, self._run_ref(job, run_key), status, owner, bool(ok), detail[:2000])

    async def _finish(self, transaction: Any, ref: Any, status_ref: Any, owner: str, ok: bool, detail: str) -> None:
        found = await self._get_all(transaction, [ref, status_ref])
        run, status = found[ref.path], found[status_ref.path]
        if not run.exists or run.to_dict()["owner"] != owner:  # only the lease holder's result is recorded
            return
        lease, now = run.to_dict(), time.time()
        result = {"finished_at": now, "ok": ok, "detail": detail}
        transaction.update(ref, result)
        if not status.exists or (status.to_dict().get("finished_at") or 0.0) <= now:
            transaction.set(status_ref, {"job": lease["job"], "run_key": lease["run_key"], "owner": owner, **result})

    async def last_job_runs(self) -> dict[str, dict]:
        runs = {}
        async for snap in self.client.collection("job_status").stream():
            d = snap.to_dict()
            runs[d["job"]] = {"run_key": d["run_key"], "owner": d["owner"], "ok": bool(d["ok"]), "detail": d["detail"],
                              "finished_at": d["finished_at"]}
        return runs

    async def prune_job_runs(self, before: float) -> int:
        latest = {(job, run["run_key"]) for job, run in (await self.last_job_runs()).items()}
        runs = self.client.collection("job_runs")
        old = [s async for s in runs.where(filter=FieldFilter("finished_at", "<", float(before))).stream()]
        old += [s async for s in runs.where(filter=FieldFilter("lease_until", "<", float(before))).stream()
                if s.to_dict().get("finished_at") is None]  # leases that ran out unfinished (null: not above)
        refs = [s.reference for s in old if (s.to_dict().get("job"), s.to_dict().get("run_key")) not in latest]
        for chunk in _chunks(refs, _DELETE_PAGE):
            batch = self.client.batch()
            for ref in chunk:
                batch.delete(ref)
            await batch.commit()
        return len(refs)


# -- helpers ---------------------------------------------------------------------------------------------------------


def _matrix(embeddings: np.ndarray) -> np.ndarray:
    vectors = np.asarray(embeddings, dtype="<f4")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"embeddings must be (n, dim), got shape {vectors.shape}")
    return vectors


def _seq_id(seq: int) -> str:
    return f"{seq:06d}"


def _n_embeddings(snap: Any) -> int:
    return int((snap.to_dict() or {}).get("n_embeddings", 0)) if snap.exists else 0


def _delete_profile(transaction: Any, snap: Any) -> None:
    """The profile document and its embeddings (ids known from the count: no query inside the transaction)."""
    for seq in range(_n_embeddings(snap)):
        transaction.delete(snap.reference.collection("embeddings").document(_seq_id(seq)))
    transaction.delete(snap.reference)


def _uid_of(ref: Any) -> str:
    """users/{uid}/...: the owner of a document found by a collection-group query."""
    return ref.path.split("/")[1]


def _job_id(job: str) -> str:
    """The job's part of a document id: escaped so that `__` only ever separates it from the run key."""
    return quote(job, safe="").replace("_", "%5F")


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[i:i + size] for i in range(0, len(items), size))


def _conversation_doc(c: Conversation) -> dict:
    doc = {f: getattr(c, f) for f in _CONVERSATION_FIELDS}
    doc["action_items"], doc["events"] = list(doc["action_items"]), list(doc["events"])
    for f in _CONVERSATION_FLOATS:
        doc[f] = float(doc[f])
    for f in ("finished_at", "processing_until"):
        if doc[f] is not None:
            doc[f] = float(doc[f])
    # for conversations_to_close: when the sweep must look at it (a closing one: when its close lease runs out)
    closing = c.status == "processing" and doc["processing_until"] is not None
    doc["close_at"] = doc["processing_until"] if closing else doc["last_activity_at"] + doc["timeout_s"]
    return doc


def _to_conversation(snap: Any) -> Conversation:
    d = snap.to_dict()
    fields = {f: d[f] for f in _CONVERSATION_FIELDS if f in d}
    fields.setdefault("id", snap.id)
    fields.setdefault("uid", _uid_of(snap.reference))
    return Conversation(**fields)


def _to_user(snap: Any) -> User:
    d = snap.to_dict()
    created = d.get("created_at")
    if hasattr(created, "timestamp"):  # a Timestamp written by the Omi app
        created = created.timestamp()
    return User(uid=snap.id, time_zone=d.get("time_zone") or "UTC", webhook_url=d.get("webhook_url"),
                fcm_token=d.get("fcm_token"), created_at=float(created or 0.0))
