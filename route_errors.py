"""What a client gets when an HTTP route fails unexpectedly (pure ASGI middleware, `server.py` installs it).

Without it, an exception a route lets escape reaches uvicorn, which logs "Exception in ASGI application" with the
traceback and answers a plain-text 500. The common case is not a bug but storage being down (every REST route reads
or writes it): the client should be told to come back, as a stream is (1013 `storage_unavailable`). So: one ERROR
line with the traceback, then, if the response has not started, a JSON answer: 503 with `Retry-After` when storage
does not answer its ping (an outage), else 500 `{"detail": "internal error"}` (a bug: no detail reaches the client).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("server")

STORAGE_RETRY_AFTER_S = 5  # what a client is told while storage is down
PING_TIMEOUT_S = 2.0  # the check that tells an outage from a bug must not keep the client waiting long


class RouteErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:  # part of an answer went out: nothing else can be said on this response
                return
            storage_up = await _storage_answers(scope.get("app"))
            if storage_up:
                response = JSONResponse({"detail": "internal error"}, status_code=500)
            else:
                response = JSONResponse({"detail": "storage unavailable, retry shortly"}, status_code=503,
                                        headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)})
            await response(scope, receive, send)


async def _storage_answers(app: Any) -> bool:
    storage = getattr(getattr(app, "state", None), "storage", None)
    if storage is None:
        return True
    try:
        return bool(await asyncio.wait_for(storage.ping(), PING_TIMEOUT_S))
    except Exception:
        return False
