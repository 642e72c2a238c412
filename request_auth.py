"""Who calls an HTTP route: FastAPI dependencies over `auth.Authenticator` (the uid comes from the verified
`Authorization` header only; an internal caller is Omi's own backend, see `auth.Authenticator.internal`).

`upload_guard` runs a route's caller check before the request's body is read (a refused caller's upload is never
read); `verified_once` keeps its answer for the request, so the route's own dependency does not verify it again."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from auth import PROXY_HEADERS, AuthError, Caller, is_loopback

CallerCheck = Callable[[Request], Awaitable[Caller]]
VERIFIED_CALLERS = "verified_callers"  # request state: {check name: its Caller} for this request


def verified_once(check: CallerCheck) -> CallerCheck:
    """`check` run at most once per request (its Caller kept in the request's state); a refusal is not kept."""

    @functools.wraps(check)
    async def once(request: Request) -> Caller:
        done = request.scope.setdefault("state", {}).setdefault(VERIFIED_CALLERS, {})
        if check.__name__ not in done:
            done[check.__name__] = await check(request)
        return done[check.__name__]

    return once


@verified_once
async def caller(request: Request) -> Caller:
    try:
        return await request.app.state.authenticator.caller(
            request.headers.get("authorization"), request.client.host if request.client else None, request.headers
        )
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


async def user_uid(who: Annotated[Caller, Depends(caller)]) -> str:
    if who.uid is None:
        raise HTTPException(400, "the admin key acts for a user: 'Authorization: Bearer <ADMIN_KEY><uid>'")
    return who.uid


@verified_once
async def caller_or_internal(request: Request) -> Caller:
    """The verified caller; without an Authorization header, Omi's backend when it is an internal caller
    (`Caller(None, internal=True)`); 401 otherwise."""
    host = request.client.host if request.client else None
    if not request.headers.get("authorization") and request.app.state.authenticator.internal(request.headers, host):
        return Caller(None, internal=True)
    return await caller(request)


@verified_once
async def caller_or_local(request: Request) -> Caller:
    """`/v1/vad`: as `caller_or_internal`; in the loopback-only mode (no ADMIN_KEY, no Firebase), a loopback client
    that came straight to the server also without a header (`Caller(None)`), as Omi's backend calls it."""
    host = request.client.host if request.client else None
    if (request.app.state.authenticator.open_loopback and not request.headers.get("authorization")
            and is_loopback(host) and not any(request.headers.get(name) is not None for name in PROXY_HEADERS)):
        return Caller(None)
    return await caller_or_internal(request)
