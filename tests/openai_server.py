"""An OpenAI chat-completions test server (``POST /v1/chat/completions``) on a free loopback port, in its own thread.

The LLM summariser is tested against it over real HTTP: no mocks. Point ``LLM_BASE_URL`` at :attr:`base_url`
(``http://127.0.0.1:<port>/v1``).

Every request is recorded (:class:`RecordedRequest`: method, path, headers with lower-case names, the JSON body or
``None``) before it is answered. The answers are scripted: :meth:`OpenAITestServer.script` queues
:class:`Reply` objects, used one per request in order; with none queued, :attr:`default` answers. Helpers make the
usual replies: :func:`completion` (a well-formed chat completion whose message content is the given text, or the
JSON of the given dict), :func:`raw` (any status and body, optionally streamed in chunks with no
Content-Length), and ``delay_s`` on either holds the answer back (for timeouts). Other paths get 404.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from server_process import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay_s: float = 0.0
    chunked: bool = False  # sent in 64 KiB chunks with no Content-Length


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON, or None when the body was not JSON
    at: float = field(default_factory=time.monotonic)


def completion(content: str | dict[str, Any], delay_s: float = 0.0, model: str = "test-model") -> Reply:
    """A chat completion (one choice, finish_reason "stop") whose message content is `content` (a dict: its JSON)."""
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return Reply(200, json.dumps(body, ensure_ascii=False).encode(), delay_s=delay_s)


def raw(status: int, body: bytes | str | dict[str, Any], delay_s: float = 0.0,
        content_type: str = "application/json", chunked: bool = False) -> Reply:
    """Any status and body (a dict is sent as JSON); `chunked`: streamed without a Content-Length."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return Reply(status, body, content_type, delay_s, chunked)


class OpenAITestServer:
    """``with OpenAITestServer() as srv:`` starts it (uvicorn in a daemon thread) and stops it afterwards."""

    def __init__(self, default: Reply | None = None) -> None:
        self.port = free_port()
        self.default = default or raw(500, {"error": {"message": "nothing scripted", "type": "server_error"}})
        self._replies: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        app = Starlette(routes=[Route(CHAT_PATH, self._chat, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", ws="none",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="openai-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    async def _chat(self, request: Request) -> Response:
        raw_body = await request.body()
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = None
        with self._lock:
            self._requests.append(RecordedRequest(request.method, request.url.path, dict(request.headers), body))
            reply = self._replies.popleft() if self._replies else self.default
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.chunked:
            chunks = (reply.body[i:i + 65536] for i in range(0, len(reply.body), 65536))
            return StreamingResponse(iter(chunks), status_code=reply.status, media_type=reply.content_type)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    def start(self) -> OpenAITestServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
