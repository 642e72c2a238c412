"""A user's developer webhooks, at the Omi app's paths and shapes (Omi's `routers/users.py`, "DEVELOPER WEBHOOKS",
and `routers/webhook_signing.py`):

- `POST /v1/users/developer/webhook/{wtype}` `{"url": "..."}` → `{"status": "ok"}`; `""` or `","` clears the URL and
  disables the webhook. For `audio_bytes` the URL may end in `,<seconds>` (Omi's form: the audio interval).
  A URL is http(s) with a host; private, loopback and link-local targets are refused (400) unless
  WEBHOOK_ALLOW_PRIVATE=true.
- `GET /v1/users/developer/webhook/{wtype}` → `{"url": "<as set>"}` (`""` when unset).
- `POST /v1/users/developer/webhook/{wtype}/enable` and `.../disable` → `{"status": "ok"}`.
- `GET /v1/users/developer/webhooks/status` → `{"audio_bytes": bool, "memory_created": bool,
  "realtime_transcript": bool, "day_summary": bool}`; a type never enabled or disabled counts as enabled when it has
  a URL (Omi's first-time rule).
- `POST /v1/users/developer/webhook-signing-secret` → `{"secret", "created_at", "previous_valid_until"}`, the only
  answer that ever holds the secret (`Cache-Control: no-store`); issuing again rotates it (the previous one keeps
  signing for 24 h). `GET` → `{"configured": bool, ...}` without the secret; `DELETE` turns signing off.
  With a secret, every delivery carries `X-Omi-Signature` (see `webhooks/signing.py`).

`wtype` is one of `memory_created`, `realtime_transcript`, `audio_bytes`, `day_summary` (422 otherwise). Every route
takes the uid from the verified `Authorization` header.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from request_auth import user_uid
from webhooks.targets import WebhookUrlError
from webhooks.types import WebhookType
from webhooks.user_webhooks import UserWebhooks

router = APIRouter()

URL_MAX_CHARS = 2100  # a 2048-character URL and Omi's ",<seconds>" suffix


class WebhookUrlIn(BaseModel):
    url: str = Field(max_length=URL_MAX_CHARS)


def _webhooks(request: Request) -> UserWebhooks:
    return request.app.state.user_webhooks


Uid = Annotated[str, Depends(user_uid)]
Hooks = Annotated[UserWebhooks, Depends(_webhooks)]


@router.post("/v1/users/developer/webhook/{wtype}", summary="Set a developer webhook's URL")
async def set_webhook_url(wtype: WebhookType, body: WebhookUrlIn, uid: Uid, hooks: Hooks) -> dict[str, str]:
    try:
        await hooks.set_url(uid, wtype, body.url.strip())
    except WebhookUrlError as exc:
        raise HTTPException(400, str(exc)) from None
    return {"status": "ok"}


@router.get("/v1/users/developer/webhook/{wtype}", summary="A developer webhook's URL")
async def get_webhook_url(wtype: WebhookType, uid: Uid, hooks: Hooks) -> dict[str, str]:
    return {"url": await hooks.get_url(uid, wtype)}


@router.post("/v1/users/developer/webhook/{wtype}/enable", summary="Turn a developer webhook on")
async def enable_webhook(wtype: WebhookType, uid: Uid, hooks: Hooks) -> dict[str, str]:
    await hooks.set_enabled(uid, wtype, True)
    return {"status": "ok"}


@router.post("/v1/users/developer/webhook/{wtype}/disable", summary="Turn a developer webhook off")
async def disable_webhook(wtype: WebhookType, uid: Uid, hooks: Hooks) -> dict[str, str]:
    await hooks.set_enabled(uid, wtype, False)
    return {"status": "ok"}


@router.get("/v1/users/developer/webhooks/status", summary="Which developer webhooks are on")
async def webhooks_status(uid: Uid, hooks: Hooks) -> dict[str, bool]:
    return await hooks.status(uid)


@router.post("/v1/users/developer/webhook-signing-secret", summary="Issue (or rotate) the webhook signing secret")
async def issue_signing_secret(response: Response, uid: Uid, hooks: Hooks) -> dict:
    response.headers["Cache-Control"] = "no-store"  # the only answer that carries the secret
    return await hooks.issue_secret(uid)


@router.get("/v1/users/developer/webhook-signing-secret", summary="Whether deliveries are signed (no secret)")
async def signing_secret_status(uid: Uid, hooks: Hooks) -> dict:
    return await hooks.secret_status(uid)


@router.delete("/v1/users/developer/webhook-signing-secret", summary="Stop signing deliveries")
async def delete_signing_secret(uid: Uid, hooks: Hooks) -> dict[str, str]:
    await hooks.delete_secret(uid)
    return {"status": "ok"}
