"""The user's conversations over REST: list, read with transcript, delete. The uid comes from the token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel

from batch_routes import user_uid
from storage.base import ConversationStatus

router = APIRouter()


class SegmentOut(BaseModel):
    id: str
    text: str
    speaker: str
    speaker_id: int
    is_user: bool
    person_id: str | None
    start: float
    end: float


class ConversationOut(BaseModel):
    id: str
    status: str
    language: str
    source: str
    started_at: float
    finished_at: float | None
    duration_s: float
    title: str | None
    overview: str | None
    transcript_segments: list[SegmentOut] | None = None


def _out(conversation, segments=None) -> ConversationOut:
    fields = {k: getattr(conversation, k) for k in ConversationOut.model_fields if k != "transcript_segments"}
    if segments is not None:
        fields["transcript_segments"] = [SegmentOut(**{k: getattr(s, k) for k in SegmentOut.model_fields})
                                         for s in segments]
    return ConversationOut(**fields)


@router.get("/v1/conversations", response_model=list[ConversationOut], summary="The user's conversations, newest first")
async def list_conversations(request: Request, uid: Annotated[str, Depends(user_uid)],
                             status: ConversationStatus | None = None,
                             limit: Annotated[int, Query(ge=1, le=200)] = 50,
                             before: Annotated[float | None, Query(description="started before (epoch s)")] = None):
    return [_out(c) for c in await request.app.state.storage.list_conversations(uid, status, limit, before)]


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationOut,
            summary="One conversation with its transcript")
async def get_conversation(request: Request, uid: Annotated[str, Depends(user_uid)], conversation_id: str):
    storage = request.app.state.storage
    conversation = await storage.get_conversation(uid, conversation_id)
    if conversation is None:
        raise HTTPException(404, "no such conversation")
    return _out(conversation, await storage.list_segments(uid, conversation_id))


@router.delete("/v1/conversations/{conversation_id}", status_code=204, summary="Delete a conversation")
async def delete_conversation(request: Request, uid: Annotated[str, Depends(user_uid)], conversation_id: str):
    if not await request.app.state.storage.delete_conversation(uid, conversation_id):
        raise HTTPException(404, "no such conversation")
