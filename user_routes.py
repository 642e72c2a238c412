"""What the scheduled notifications need from a user, at the Omi app's paths and shapes:

- `POST /v1/users/fcm-token` `{"fcm_token", "time_zone"}` → `{"status": "Ok"}` (Omi's `routers/notifications.py`,
  `SaveFcmTokenRequest`): the device's push token and the user's IANA time zone (422 for a zone that does not
  exist). The 08:00 reminder and the evening day summary go out in that zone, by FCM when Firebase is configured,
  else to the log.
- `GET /v1/users/daily-summary-settings` → `{"enabled": bool, "hour": 0-23}` and `PATCH` with either field →
  `{"status": "ok"}` (Omi's `routers/users.py`): whether the evening day summary (notification and `day_summary`
  webhook) goes out, and at which local hour. Defaults: on, at NOTIFY_EVENING_AT's hour.

Every route takes the uid from the verified `Authorization` header. The token is never logged or returned.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field, field_validator

from notification_schedule import DAILY_SUMMARY_KEY, TIME_ZONE_MAX_CHARS, daily_summary_prefs, known_zone
from request_auth import user_uid
from storage import Storage
from storage.base import User

router = APIRouter()

FCM_TOKEN_MAX_CHARS = 4096  # FCM registration tokens are ~160-200 characters; room for other push services


class FcmTokenIn(BaseModel):
    fcm_token: str = Field(min_length=1, max_length=FCM_TOKEN_MAX_CHARS)
    time_zone: str = Field(min_length=1, max_length=TIME_ZONE_MAX_CHARS)

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_zone(value)


class DailySummaryIn(BaseModel):
    enabled: bool | None = None
    hour: int | None = Field(default=None, ge=0, le=23)


def _storage(request: Request) -> Storage:
    return request.app.state.storage


Uid = Annotated[str, Depends(user_uid)]
Store = Annotated[Storage, Depends(_storage)]


@router.post("/v1/users/fcm-token", summary="Register the device's push token and the user's time zone")
async def save_fcm_token(body: FcmTokenIn, uid: Uid, storage: Store) -> dict[str, str]:
    user = await storage.get_user(uid) or User(uid=uid, created_at=time.time())
    user.fcm_token, user.time_zone = body.fcm_token, body.time_zone
    await storage.save_user(user)
    return {"status": "Ok"}


@router.get("/v1/users/daily-summary-settings", summary="Whether and when the evening day summary goes out")
async def get_daily_summary_settings(request: Request, uid: Uid, storage: Store) -> dict:
    stored = (await storage.get_user_settings(uid)).get(DAILY_SUMMARY_KEY)
    return daily_summary_prefs(stored, request.app.state.settings)


@router.patch("/v1/users/daily-summary-settings", summary="Change whether and when the day summary goes out")
async def patch_daily_summary_settings(body: DailySummaryIn, uid: Uid, storage: Store) -> dict[str, str]:
    if body.enabled is None and body.hour is None:
        raise HTTPException(400, "nothing to change: send 'enabled' and/or 'hour'")
    stored = dict((await storage.get_user_settings(uid)).get(DAILY_SUMMARY_KEY) or {})
    stored.update(body.model_dump(exclude_none=True))
    await storage.set_user_setting(uid, DAILY_SUMMARY_KEY, stored)
    return {"status": "ok"}
