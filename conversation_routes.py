"""The user's conversations over REST, at Omi's paths and in Omi's shapes (`backend/routers/conversations.py`), so
the Omi app lists, opens, finishes, relabels and deletes them here. The uid comes from the token.

- `GET /v1/conversations?limit=&offset=&statuses=a,b&include_discarded=&start_date=&end_date=` → [Conversation],
  newest first, with their transcripts (the app shows the in-progress one's from this list). `statuses=` (empty,
  as the app sends it) is Omi's default `processing,completed`; no `statuses` at all is every status (Omi's older
  backends, and our own API before). `include_discarded=true` and `limit=100` as Omi. Our older `status` (one
  stored status, "discarded" included) and `before` (epoch seconds, exclusive) still work.
- `GET /v1/conversations/{id}` → Conversation; `?format=json|txt|srt|vtt|rttm` → its transcript as that file
  (`transcript_export.py`), speakers named "You", the person's name, or `SPEAKER_n`.
- `POST /v1/conversations` → finishes the user's in-progress conversation now (as the sweep would) →
  `{"conversation", "memory", "messages": []}` (the current and mid-2025 apps read `conversation`, older ones
  `memory`); 404 when there is none.
- `DELETE /v1/conversations/{id}` → 204 (Omi's), 404 when there is no such conversation of this user.
- `PATCH /v1/conversations/{id}/segments/assign-bulk` `{segment_ids, assign_type: is_user|person_id, value}` →
  the Conversation after (Omi's response); ids not in the conversation are ignored, as Omi does.
- `/v1/memories` (list, get, finish, delete): the same, for apps from before the rename.

Every list is bounded (`limit` at most MAX_LIMIT, `offset` at most MAX_OFFSET, at most MAX_SEGMENT_IDS ids);
bad input is a 4xx with a JSON `detail`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from conversation_wire import conversation_json, storage_statuses
from request_auth import user_uid
from storage.base import ConversationStatus
from transcript_export import MEDIA_TYPES, render

router = APIRouter()

MAX_LIMIT = 200  # conversations in one list answer (each with its transcript); a larger limit is clamped
MAX_OFFSET = 10_000
MAX_SEGMENT_IDS = 1000
DEFAULT_STATUSES = "processing,completed"  # Omi's, also for an empty `statuses`
_TRANSCRIPT_READS = 8  # transcripts of a list read at once

Uid = Annotated[str, Depends(user_uid)]
SegmentId = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class AssignBulk(BaseModel):
    segment_ids: list[SegmentId] = Field(max_length=MAX_SEGMENT_IDS)
    assign_type: Literal["is_user", "person_id"]
    value: Annotated[str, StringConstraints(max_length=200)] | bool | None = None


def _epoch(moment: datetime | None) -> float | None:
    """A query datetime as epoch seconds; one without a zone is UTC (Omi's app sends UTC)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


async def _with_transcripts(storage: Any, uid: str, conversations: list) -> list[dict]:
    limiter = asyncio.Semaphore(_TRANSCRIPT_READS)

    async def one(conversation) -> dict:
        async with limiter:
            return conversation_json(conversation, await storage.list_segments(uid, conversation.id))

    return list(await asyncio.gather(*(one(c) for c in conversations)))


async def _found(request: Request, uid: str, conversation_id: str) -> dict:
    storage = request.app.state.storage
    conversation = await storage.get_conversation(uid, conversation_id)
    if conversation is None:
        raise HTTPException(404, "Conversation not found")
    return conversation_json(conversation, await storage.list_segments(uid, conversation_id))


@router.get("/v1/conversations", summary="The user's conversations in Omi's shape, newest first")
@router.get("/v1/memories", include_in_schema=False)  # apps from before Omi's rename
async def list_conversations(
        request: Request, uid: Uid,
        limit: Annotated[int, Query(ge=1, description=f"at most {MAX_LIMIT} are returned")] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        statuses: Annotated[str | None, Query(max_length=200, description="comma-separated: in_progress, "
                                              "processing, completed, failed; empty: processing,completed; "
                                              "absent: any")] = None,
        include_discarded: bool = True,
        start_date: Annotated[datetime | None, Query(description="started at or after (ISO 8601)")] = None,
        end_date: Annotated[datetime | None, Query(description="started at or before (ISO 8601)")] = None,
        status: Annotated[ConversationStatus | None, Query(description="one stored status (replaces statuses)")]
        = None,
        before: Annotated[float | None, Query(description="started before (epoch s)")] = None,
) -> list[dict]:
    wanted = None
    if status is None and statuses is not None:
        wanted = storage_statuses((statuses or DEFAULT_STATUSES).split(","), include_discarded)
    if wanted is not None and not wanted:
        return []  # only statuses we never have (failed)
    found = await request.app.state.storage.list_conversations(
        uid, status, min(limit, MAX_LIMIT), before, statuses=wanted, offset=offset,
        include_discarded=include_discarded, started_from=_epoch(start_date), started_to=_epoch(end_date))
    return await _with_transcripts(request.app.state.storage, uid, found)


@router.get("/v1/conversations/{conversation_id}",
            summary="One conversation with its transcript, in Omi's shape, or its transcript as a file",
            responses={200: {"content": {t: {} for t in set(MEDIA_TYPES.values())},
                             "description": "Omi's Conversation JSON; with `format`, the transcript as that file"}})
@router.get("/v1/memories/{conversation_id}", include_in_schema=False)
async def get_conversation(
        request: Request, uid: Uid, conversation_id: str,
        format: Annotated[Literal["json", "txt", "srt", "vtt", "rttm"] | None,  # noqa: A002 (the API's name)
                          Query(description="absent: Omi's Conversation JSON; else the transcript as a file: json "
                                            "(segments with speaker names), txt, srt, vtt or rttm")] = None,
) -> Any:
    found = await _found(request, uid, conversation_id)
    if format is None:
        return found
    # Names for the people the transcript mentions: the user's own people only.
    names = {p.id: p.name for p in await request.app.state.storage.list_profiles(uid) if p.kind == "person"}
    body = render(found["transcript_segments"], format, file_id=conversation_id, names=names)
    return Response(body, media_type=MEDIA_TYPES[format],
                    headers={"Content-Disposition": f'attachment; filename="{conversation_id}.{format}"'})


@router.post("/v1/conversations", summary="Finish the user's in-progress conversation now")
@router.post("/v1/memories", include_in_schema=False)
async def finish_in_progress(request: Request, uid: Uid) -> dict:
    # The body ({} or Omi's optional calendar context) carries nothing we use: it is not read, so any body is fine.
    storage = request.app.state.storage
    in_progress = await storage.list_conversations(uid, "in_progress", 1)
    if not in_progress:
        raise HTTPException(404, "Conversation in progress not found")
    closed = await request.app.state.conversations.close(in_progress[0])
    body = conversation_json(closed, await storage.list_segments(uid, closed.id))
    return {"conversation": body, "memory": body, "messages": []}


@router.delete("/v1/conversations/{conversation_id}", status_code=204, summary="Delete a conversation")
@router.delete("/v1/memories/{conversation_id}", status_code=204, include_in_schema=False)
async def delete_conversation(request: Request, uid: Uid, conversation_id: str) -> Response:
    if not await request.app.state.storage.delete_conversation(uid, conversation_id):
        raise HTTPException(404, "Conversation not found")
    return Response(status_code=204)


@router.patch("/v1/conversations/{conversation_id}/segments/assign-bulk",
              summary="Label segments as the user's or a person's (Omi's assign-bulk)")
async def assign_segments(request: Request, uid: Uid, conversation_id: str, body: AssignBulk) -> dict:
    storage = request.app.state.storage
    conversation = await storage.get_conversation(uid, conversation_id)
    if conversation is None:
        raise HTTPException(404, "Conversation not found")
    value = None if body.value in (None, "null", "") else body.value
    if body.assign_type == "is_user":  # Omi: is_user = bool(value), person cleared
        is_user = value is not None and value not in (False, "false", "False", "0")
        person_id = None
    else:  # a person (or none: unassigned), never the user
        is_user, person_id = False, None if value is None or isinstance(value, bool) else value
    segments = await storage.relabel_segments(uid, conversation_id, body.segment_ids, is_user=is_user,
                                              person_id=person_id)
    return conversation_json(conversation, segments)
