"""ASGI middleware that refuses a request before its body is read: too large, or from a caller the route refuses.

FastAPI reads and spools a route's whole body (a multipart upload to disk) before any dependency runs, so a limit or
an auth check in the route comes after the upload. Here, in front of the app, per request:
1. a `Content-Length` over the route's limit is answered 413 at once; a body without one (chunked) is counted as
   the app reads it, and past the limit the app gets no more of it and the client gets 413;
2. on a route that takes a body and names a caller dependency (`request_auth`), that check runs first: a refused
   caller gets its 401 with nothing of the upload read. The Caller is kept for the route (`verified_once`).
The limits: multipart routes (uploads) MAX_UPLOAD_MB plus FORM_OVERHEAD_BYTES for the form's other fields and
framing (the file itself is checked against MAX_UPLOAD_MB in `uploads`); any other body (JSON) MAX_JSON_BODY_KB.
What the app does not read (a refused body's rest), uvicorn discards without keeping it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request, params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import request_auth

FORM_OVERHEAD_BYTES = 1 << 20  # multipart framing and small fields (Starlette caps each non-file field at 1 MiB)

# A route's caller dependency → the check run before its body (user_uid's own 400, for the admin key without a uid,
# needs no body: it stays in the route).
CHECK_BEFORE_BODY: dict[Callable[..., Any], request_auth.CallerCheck] = {
    request_auth.caller: request_auth.caller,
    request_auth.user_uid: request_auth.caller,
    request_auth.caller_or_internal: request_auth.caller_or_internal,
    request_auth.caller_or_local: request_auth.caller_or_local,
}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: str) -> None:
        super().__init__(413, f"request body larger than the limit ({limit})")


def _caller_check(dependant: Dependant) -> request_auth.CallerCheck | None:
    for dep in dependant.dependencies:
        if dep.call in CHECK_BEFORE_BODY:
            return CHECK_BEFORE_BODY[dep.call]
        if (found := _caller_check(dep)) is not None:
            return found
    return None


def _is_form(dependant: Dependant) -> bool:
    flat = get_flat_dependant(dependant)
    return any(isinstance(f.field_info, params.Form) for f in flat.body_params)  # File is a Form


class _RouteRules:
    """What the guard needs of one route: its body limit and its caller check (None: no check before the body)."""

    def __init__(self, route: APIRoute | None, settings: Any) -> None:
        takes_body = route is not None and route.body_field is not None
        # A route that reads its body as a raw upload itself (POST /v1/listen: audio bytes) marks its endpoint.
        raw_upload = route is not None and getattr(route.endpoint, "raw_audio_body", False)
        if raw_upload or (takes_body and _is_form(route.dependant)):
            self.limit = int(settings.max_upload_mb * (1 << 20)) + FORM_OVERHEAD_BYTES
            self.limit_text = f"uploads: {settings.max_upload_mb:g} MB"
        else:
            self.limit = int(settings.max_json_body_kb * 1024)
            self.limit_text = f"{settings.max_json_body_kb:g} KB"
        self.check = _caller_check(route.dependant) if takes_body else None


class UploadGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._rules: dict[int, _RouteRules] = {}  # id(route) → its rules, built on the route's first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rules = self._route_rules(scope)
        declared = _content_length(scope)
        if declared is not None and declared > rules.limit:
            return await _refuse(scope, receive, send, BodyTooLarge(rules.limit_text))
        if rules.check is not None:
            try:
                await rules.check(Request(scope))
            except HTTPException as exc:
                return await _refuse(scope, receive, send, exc)
        await _LimitedBody(self.app, rules)(scope, receive, send)

    def _route_rules(self, scope: Scope) -> _RouteRules:
        app = scope["app"]
        route = next((r for r in app.router.routes
                      if isinstance(r, APIRoute) and r.matches(scope)[0] is Match.FULL), None)
        if (rules := self._rules.get(id(route))) is None:  # None: not an API route (404, 405, docs)
            rules = self._rules[id(route)] = _RouteRules(route, app.state.settings)
        return rules


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn answers a malformed length 400 itself
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: HTTPException) -> None:
    await JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)(scope, receive, send)


class _LimitedBody:
    """One request through the app, its body cut off past `limit`: the app's read raises BodyTooLarge (FastAPI may
    turn that into a 400 while parsing a form), and whatever the app answers then is replaced by the 413."""

    def __init__(self, app: ASGIApp, rules: _RouteRules) -> None:
        self.app = app
        self.limit = rules.limit
        self.limit_text = rules.limit_text
        self.received = 0
        self.exceeded = False
        self.answered = False  # a response has started (the app's, or the 413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def limited_receive() -> Message:
            if self.exceeded:
                raise BodyTooLarge(self.limit_text)
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit:
                    self.exceeded = True
                    raise BodyTooLarge(self.limit_text)
            return message

        async def guarded_send(message: Message) -> None:
            if self.exceeded:  # the app's answer to the failed read: the 413 instead
                return await self._answer_413(scope, receive, send)
            self.answered = self.answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not self.exceeded:
                raise
        if self.exceeded:
            await self._answer_413(scope, receive, send)

    async def _answer_413(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.answered:
            self.answered = True
            await _refuse(scope, receive, send, BodyTooLarge(self.limit_text))
