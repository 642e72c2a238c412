"""Who calls an HTTP route: FastAPI dependencies over `auth.Authenticator` (the uid comes from the verified
`Authorization` header only; an internal caller is Omi's own backend, see `auth.Authenticator.internal`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from auth import AuthError, Caller


async def caller(request: Request) -> Caller:
    try:
        return await request.app.state.authenticator.caller(
            request.headers.get("authorization"), request.client.host if request.client else None
        )
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


async def user_uid(who: Annotated[Caller, Depends(caller)]) -> str:
    if who.uid is None:
        raise HTTPException(400, "the admin key acts for a user: 'Authorization: Bearer <ADMIN_KEY><uid>'")
    return who.uid


async def caller_or_internal(request: Request) -> Caller:
    """The verified caller; without an Authorization header, Omi's backend when it is an internal caller
    (`Caller(None, internal=True)`); 401 otherwise."""
    host = request.client.host if request.client else None
    if not request.headers.get("authorization") and request.app.state.authenticator.internal(request.headers, host):
        return Caller(None, internal=True)
    return await caller(request)
