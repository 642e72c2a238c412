"""Conversation lifecycle (the Omi contract, with its gaps closed).

- On connect: continue the user's `in_progress` conversation if its last speech is younger than its timeout (new
  segment times continue where it left off), else start a new one.
- A final segment is sent to the client once it is persisted; while storage fails (or is slower than its write
  timeout) it is sent and kept in memory for a retry instead (`streaming/segment_writer.py`).
- `timeout_s` after the last speech a conversation is closed: status `processing`, then `completed` (or
  `discarded` when it has no speech) with the summary of its merged segments (title, overview, emoji, category,
  action items). Connected clients of that user get `memory_processing_started` and `memory_created`, the
  conversation in Omi's shape (`conversation_wire`). The sweep job closes the
  conversations whose client went away, so none stays `in_progress` until the user reconnects.

No state is left behind and no close is undone, on any number of replicas (storage decides, not this process):
- A close first claims the conversation in storage (`claim_close`: `in_progress` → `processing` with a lease of
  `close_lease_s`, CONVERSATION_CLOSE_LEASE_S); one caller wins. It stores its outcome only while it still holds that
  lease (`finish_close`). A close that raised midway, or whose process died, leaves `processing` with a lease that
  runs out: the sweep lists such conversations and claims them again (the summary is made again).
- A stream's writes (`record`, `stream_ended`, a reconnect's `attach`) are compare-and-set on `in_progress`
  (`update_open_conversation`): once a close claimed the conversation they write nothing and the stream moves on to
  a new conversation, instead of setting the closed one back to `in_progress`.

`ConversationService` is shared (one per app) and holds no per-stream state, only the registry of which
connections of a user are listening for conversation events in this process. A connection on another replica hears
of a close by reading storage (`StreamEvents.sync`, every STREAM_SYNC_S).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from conversation_wire import memory_event, wire_source
from storage import Storage
from storage.base import Conversation, Segment
from summaries import PlainSummarizer, Summarizer

if TYPE_CHECKING:
    from streaming.pipeline import Pipeline

log = logging.getLogger(__name__)

# For the summary only: consecutive stored segments of one speaker closer than this read as one. (The live segments
# already merge by Omi's own rule, streaming/segments.py; this catches what a reconnect or a relabel left apart.)
MERGE_GAP_S = 1.0

Listener = Callable[[dict[str, Any]], Awaitable[None]]
# Told of every completed conversation (uid, the Conversation JSON the app gets): the memory_created webhook. It must
# not block (it queues the delivery).
CompletedHook = Callable[[str, dict[str, Any]], None]


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Consecutive segments of the same speaker with a gap under MERGE_GAP_S become one. Pure."""
    merged: list[Segment] = []
    for seg in sorted(segments, key=lambda s: s.start):
        last = merged[-1] if merged else None
        if last is not None and last.speaker_id == seg.speaker_id and seg.start - last.end < MERGE_GAP_S:
            merged[-1] = Segment(last.id, last.conversation_id, f"{last.text} {seg.text}", last.speaker,
                                 last.speaker_id, last.is_user, last.person_id, last.start, max(last.end, seg.end))
        else:
            merged.append(seg)
    return merged


DEFAULT_CLOSE_LEASE_S = 300.0  # CONVERSATION_CLOSE_LEASE_S's default (config.py)


class ConversationClosed(Exception):
    """The conversation was closed (by the sweep, maybe on another replica) while its stream went on."""


class SweepIncomplete(Exception):
    """Some closes of a sweep raised (each logged with its traceback); their conversations stay `processing` until
    their close lease runs out, and a later sweep takes them again."""

    def __init__(self, closed: int, failed: list[str]) -> None:
        super().__init__(f"closed {closed}; failed {len(failed)} ({', '.join(failed[:10])})")
        self.closed, self.failed = closed, failed


class ConversationService:
    def __init__(self, storage: Storage, summarizer: Summarizer | None = None,
                 close_lease_s: float = DEFAULT_CLOSE_LEASE_S, on_completed: CompletedHook | None = None) -> None:
        self.storage = storage
        self.summarizer = summarizer or PlainSummarizer()
        self.close_lease_s = close_lease_s
        self.on_completed = on_completed
        self._listeners: dict[str, set[Listener]] = defaultdict(set)

    # -- connections ---------------------------------------------------------------------------------------------

    def listen(self, uid: str, listener: Listener) -> Callable[[], None]:
        """A connection of `uid` wants conversation events. Returns the function that stops it."""
        self._listeners[uid].add(listener)

        def stop() -> None:
            self._listeners[uid].discard(listener)
            if not self._listeners[uid]:
                del self._listeners[uid]

        return stop

    async def _notify(self, uid: str, event: dict[str, Any]) -> None:
        for listener in list(self._listeners.get(uid, ())):
            try:
                await listener(event)
            except Exception as exc:  # one closed socket must not stop the others
                log.debug("listener failed: %s", exc)

    async def attach(self, uid: str, language: str, timeout_s: float, now: float | None = None,
                     source: str = "omi") -> Conversation:
        """The conversation a new stream continues, or a new one (which records the stream's `source`: omi,
        phone, desktop...; a name the app could not show becomes "omi"). A continued one keeps its source."""
        now = time.time() if now is None else now
        for conv in await self.storage.list_conversations(uid, status="in_progress", limit=5):
            if now - conv.last_activity_at < conv.timeout_s and await self.storage.update_open_conversation(
                    uid, conv.id, timeout_s=timeout_s):  # False: a close claimed it since the listing
                conv.timeout_s = timeout_s
                return conv
        conv = Conversation(uid=uid, language=language, timeout_s=timeout_s, started_at=now, last_activity_at=now,
                            source=wire_source(source))
        await self.storage.save_conversation(conv)
        return conv

    async def stream_ended(self, conversation: Conversation, end_s: float) -> None:
        """A stream of this conversation ended at conversation time `end_s`: a continuing stream resumes there.
        Nothing is written once the conversation is closing or closed."""
        await self.storage.update_open_conversation(conversation.uid, conversation.id, duration_s=end_s)

    async def last_memory(self, uid: str) -> Conversation | None:
        done = await self.storage.list_conversations(uid, status="completed", limit=1)
        return done[0] if done else None

    async def record(self, conversation: Conversation, segments: list[Segment], now: float | None = None) -> None:
        """Persist segments (before they are sent) and mark the speech as activity. Raises ConversationClosed if
        the conversation was closed (or is closing) meanwhile: the caller starts a new one.

        The activity is written first, compare-and-set on `in_progress`: after it the sweep cannot claim the
        conversation (its timeout starts again), so the segments land in an open one. (A close forced over REST
        in the moment between the two writes stores these segments in the closed conversation, after its summary.)"""
        now = time.time() if now is None else now
        duration_s = max([conversation.duration_s] + [s.end for s in segments])
        if not await self.storage.update_open_conversation(conversation.uid, conversation.id, last_activity_at=now,
                                                           duration_s=duration_s):
            raise ConversationClosed(conversation.id)
        await self.storage.upsert_segments(conversation.uid, segments)
        conversation.last_activity_at, conversation.duration_s = now, duration_s

    # -- closing -------------------------------------------------------------------------------------------------

    async def close(self, conversation: Conversation, now: float | None = None) -> Conversation:
        """in_progress → processing → completed | discarded, with events to the user's connections; now, whatever
        its timeout (`POST /v1/conversations`). Returns the outcome; when another caller holds the close (or it is
        closed already), the conversation as stored."""
        closed = await self._close(conversation, time.time() if now is None else now, expired_only=False)
        if closed is not None:
            return closed
        return await self.storage.get_conversation(conversation.uid, conversation.id) or conversation

    async def _close(self, conversation: Conversation, now: float, *, expired_only: bool) -> Conversation | None:
        """The close, if this caller wins its claim (None otherwise). Raises what a step raised: the conversation
        stays `processing` until its lease runs out, then the sweep takes it again."""
        claimed = await self.storage.claim_close(conversation.uid, conversation.id, now, self.close_lease_s,
                                                 expired_only=expired_only)
        if claimed is None:
            return None
        lease_until = claimed.processing_until
        # The events carry the stored segments, with the ids the live stream used and REST returns (so the app's
        # assign-bulk names segments that exist); the summary reads them merged.
        stored = await self.storage.list_segments(claimed.uid, claimed.id)
        await self._notify(claimed.uid, memory_event("memory_processing_started", claimed, stored))
        segments = merge_segments(stored)
        claimed.finished_at = now
        if not any(s.text.strip() for s in segments):
            claimed.status = "discarded"
        else:
            summary = await self.summarizer.summarize(claimed, segments)
            claimed.title, claimed.overview = summary.title, summary.overview
            claimed.emoji, claimed.category = summary.emoji, summary.category
            claimed.action_items = [{"description": item, "completed": False}
                                    for item in summary.action_items if item.strip()]
            claimed.status = "completed"
        claimed.processing_until = None
        if not await self.storage.finish_close(claimed, lease_until):
            log.warning("conversation %s: its close outlasted its lease (CONVERSATION_CLOSE_LEASE_S) and another "
                        "close took it over, or it was deleted meanwhile; this outcome is dropped", claimed.id)
            return None
        created = memory_event("memory_created", claimed, stored)
        await self._notify(claimed.uid, created)
        if self.on_completed is not None and claimed.status == "completed":
            try:
                self.on_completed(claimed.uid, created["memory"])
            except Exception:  # the close is done and stored: a hook's failure must not make the sweep retry it
                log.exception("conversation %s: the completed-conversation hook failed", claimed.id)
        log.info("conversation %s %s (%d segments)", claimed.id, claimed.status, len(segments))
        return claimed

    async def close_expired(self, now: float | None = None) -> int:
        """The sweep: close every conversation whose timeout has passed, and retake every close whose lease ran
        out (a crash or a failure left it `processing`). Returns how many it closed; raises SweepIncomplete after
        trying them all when some failed (one bad conversation never blocks the others)."""
        now = time.time() if now is None else now
        closed, failed = 0, []
        for conv in await self.storage.conversations_to_close(now):
            try:
                closed += await self._close(conv, now, expired_only=True) is not None
            except Exception:
                log.exception("conversation %s: close failed; the sweep retries it when its lease runs out", conv.id)
                failed.append(conv.id)
        if failed:
            raise SweepIncomplete(closed, failed)
        return closed


class StreamEvents:
    """One stream's conversation events (`memory_processing_started`, `memory_created`), each at most once per
    conversation whichever way it came: pushed by a close in this process (`ConversationService.listen` →
    `deliver`), or found by the stream's own look at storage (`sync`, every STREAM_SYNC_S), which is how a stream
    hears of a close made on another replica (the sweep runs on one replica; `POST /v1/conversations` on any).
    `sync` reads only the conversations this stream wrote to (`watch`) until each one's `memory_created` went out."""

    def __init__(self, storage: Storage, uid: str, send: Listener) -> None:
        self.storage, self.uid, self.send = storage, uid, send
        self.sent: set[tuple[str, str]] = set()  # (conversation id, event type) sent to this client
        self.watched: dict[str, None] = {}  # conversation ids, in the order the stream wrote to them

    def watch(self, conversation_id: str) -> None:
        if (conversation_id, "memory_created") not in self.sent:
            self.watched.setdefault(conversation_id, None)

    async def deliver(self, event: dict[str, Any]) -> None:
        memory = event.get("memory") or {}
        key = (memory.get("id", ""), event.get("type", ""))
        if key in self.sent:
            return
        self.sent.add(key)
        if key[1] == "memory_created":
            self.watched.pop(key[0], None)
        await self.send(event)

    async def sync(self) -> None:
        """Sends what storage shows and this client was not told: a watched conversation `processing` (started),
        `completed` or `discarded` (created). Raises what storage raised (the caller tries again later)."""
        for conversation_id in list(self.watched):
            conv = await self.storage.get_conversation(self.uid, conversation_id)
            if conv is None:  # deleted meanwhile
                self.watched.pop(conversation_id, None)
                continue
            if conv.status == "in_progress":
                continue
            kind = "memory_processing_started" if conv.status == "processing" else "memory_created"
            if (conv.id, kind) in self.sent:
                continue
            await self.deliver(memory_event(kind, conv, await self.storage.list_segments(self.uid, conv.id)))


class ConversationLink:
    """Ties one stream to its conversation: stores segments before they are sent, and starts a new conversation
    when the sweep closed the current one while the stream went on (a long silence)."""

    def __init__(self, service: ConversationService, conversation: Conversation, language: str, timeout_s: float):
        self.service, self.conversation = service, conversation
        self.language, self.timeout_s = language, timeout_s
        self.pipeline: Pipeline | None = None  # set once the stream's pipeline exists
        self.on_attach: Callable[[str], None] | None = None  # told the id of each new conversation it moves to

    async def persist(self, segments: list) -> None:
        """Safe to call again with the same segments after it raised (the pipeline retries while storage is
        down; it never runs two at once): the shift happens only once attach() returned, with no await before
        the switch to the new conversation, so a retry finds that conversation open and only writes. An attach
        that failed after its insert committed leaves a fresh open conversation, which the retry's attach
        continues rather than making a second one."""
        try:
            await self.service.record(self.conversation, self._stored(segments))
        except ConversationClosed:
            closed = self.conversation
            kept = {s.id: s for s in await self.service.storage.list_segments(closed.uid, closed.id)}
            self.conversation = await self.service.attach(self.conversation.uid, self.language, self.timeout_s)
            if self.on_attach is not None:
                self.on_attach(self.conversation.id)
            segments = self._leave_closed(segments, kept)
            # The new conversation's clock starts at its first words (with none yet: where the closed one's ended).
            shift = min((s.start for s in segments), default=max((k.end for k in kept.values()), default=0.0))
            self.pipeline.segments.restart(self.pipeline.segments.offset - shift)
            for seg in segments:
                seg.start, seg.end = round(seg.start - shift, 3), round(seg.end - shift, 3)
            self.pipeline.segments.segments.extend(segments)
            await self.service.record(self.conversation, self._stored(segments))

    def _leave_closed(self, segments: list, kept: dict[str, Segment]) -> list:
        """Of the segments to store, those the new conversation gets. One the closed conversation already holds
        stays there as it was closed (its memory, summary and webhook had it; an id moved would empty it there):
        a relabel of it is not carried over, and words it gained since (the same speaker went on) become a segment
        of their own under a new id, in place, so the client, which has not been sent the extension yet, shows the
        closed segment as stored and the new words once."""
        out = []
        for seg in segments:
            old = kept.get(seg.id)
            if old is None:
                out.append(seg)
            elif seg.text.startswith(old.text) and seg.text[len(old.text):].strip():
                seg.id, seg.text = str(uuid.uuid4()), seg.text[len(old.text):].strip()
                seg.start = max(seg.start, old.end)
                out.append(seg)
        return out

    def _stored(self, segments: list) -> list[Segment]:
        return [Segment(s.id, self.conversation.id, s.text, s.speaker, s.speaker_id, s.is_user, s.person_id,
                        s.start, s.end) for s in segments]
