"""One delivery attempt over HTTP: the request as Omi sends it, signed when the target has secrets, on one shared
connection pool, bounded in time and in what is read back.

Requests in their first WEBHOOK_SLOW_AFTER_S share WEBHOOK_MAX_CONCURRENT slots; one still unanswered then gives
its slot back and goes on in the slow lane (at most WEBHOOK_MAX_SLOW at once; when that is full it is cut off,
`SlowLaneFull`, a failed try). A slot held for the whole request let as many hanging receivers as there are slots
stop every user's deliveries (bench/webhook_neighbours.py with WEBHOOK_MAX_CONCURRENT=2: one hanging user held the
others' audio up to 29 s).

Every attempt is bounded three ways: httpx's per-phase timeouts (connect and answer: HTTP_GET_TIMEOUT; sending the
body: HTTP_PUT_TIMEOUT), an overall deadline (connect + send + answer) so a receiver that drips its answer a byte
at a time cannot hold a request forever, and at most MAX_ANSWER_BYTES of the answer read (the rest is not read).
Redirects are not followed (a 3xx is a failed delivery): a redirect could lead to an address the policy refuses.

httpx logs every request's full URL at INFO ("HTTP Request: POST https://...?token=..."): a filter on its logger,
installed on import, rewrites that URL to scheme://host/path, because a webhook URL's query may hold a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from config import Settings
from notify import redact_url
from webhooks.outbox import Delivery
from webhooks.signing import signature_headers
from webhooks.types import Target, WebhookType

MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer: enough for Omi's {"message": ...}, and the pool reuses
MESSAGE_MIN_CHARS = 6  # Omi notifies the user of a transcript webhook's "message" longer than 5 characters
USER_AGENT = "omi-unified-webhooks/1"


class RedactRequestUrls(logging.Filter):
    """Rewrites the URL argument of httpx's request log records (whatever the client) to scheme://host/path."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, httpx.URL) for arg in record.args):
            record.args = tuple(redact_url(str(arg)) if isinstance(arg, httpx.URL) else arg for arg in record.args)
        return True


def _install_log_redaction() -> None:
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, RedactRequestUrls) for f in httpx_log.filters):
        httpx_log.addFilter(RedactRequestUrls())


_install_log_redaction()


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: float | None = None  # seconds, from a Retry-After header
    message: str | None = None  # realtime_transcript: Omi's {"message": "..."} answered with a 200


def request_url(target_url: str, params: dict[str, str]) -> httpx.URL:
    """The target URL with `params` merged into its query (a key already there is replaced), URL-encoded."""
    return httpx.URL(target_url).copy_merge_params(params)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds to wait: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def answer_message(raw: bytes) -> str | None:
    """The `message` of a JSON object answer, when it is a string longer than 5 characters (Omi's rule)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) and len(message) >= MESSAGE_MIN_CHARS else None


class SlowLaneFull(TimeoutError):
    """A request turned slow while WEBHOOK_MAX_SLOW others were slow already: cut off (a failed try)."""


class WebhookSender:
    def __init__(self, settings: Settings) -> None:
        get_s, put_s = settings.http_get_timeout, settings.http_put_timeout
        self.deadline_s = get_s + put_s + get_s  # connect + send the body + the answer
        self.slow_after_s = settings.webhook_slow_after_s
        self.max_slow = settings.webhook_max_slow
        self.slow = 0  # requests in the slow lane now
        self._semaphore = asyncio.Semaphore(settings.webhook_max_concurrent)
        n = settings.webhook_max_concurrent + settings.webhook_max_slow  # connections: both lanes
        # trust_env=False: no proxy or .netrc credentials from the environment go to users' receivers
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=get_s, read=get_s, write=put_s, pool=get_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            follow_redirects=False, trust_env=False)

    async def send(self, target: Target, uid: str, delivery: Delivery, delivery_id: str) -> Answer:
        """One attempt. Raises httpx.HTTPError or TimeoutError (the deadline) when no answer came."""
        url = request_url(target.url, {**delivery.params, "uid": uid})
        body = delivery.render(uid)
        headers = {"Content-Type": delivery.content_type, "Accept-Encoding": "identity", "User-Agent": USER_AGENT,
                   **signature_headers(body, target.secrets, uid=uid, event=delivery.wtype.value,
                                       delivery_id=delivery_id)}
        async with self._semaphore:
            exchange = asyncio.ensure_future(self._exchange(url, body, headers, delivery.wtype))
            try:
                done, _ = await asyncio.wait({exchange}, timeout=self.slow_after_s)
            except BaseException:
                await _cancel(exchange)
                raise
        if done:
            return exchange.result()
        if self.slow >= self.max_slow:
            await _cancel(exchange)
            raise SlowLaneFull(f"{self.slow} requests slower than {self.slow_after_s:g} s already")
        self.slow += 1
        try:
            return await exchange
        finally:
            self.slow -= 1

    async def _exchange(self, url: httpx.URL, body: bytes, headers: dict[str, str], wtype: WebhookType) -> Answer:
        async with asyncio.timeout(self.deadline_s):
            async with self._client.stream("POST", url, content=body, headers=headers) as response:
                raw = await self._read_answer(response)
                message = None
                if response.status_code == 200 and wtype is WebhookType.realtime_transcript and raw:
                    message = answer_message(raw)
                return Answer(response.status_code, retry_after_seconds(response.headers.get("retry-after")),
                              message)

    @staticmethod
    async def _read_answer(response: httpx.Response) -> bytes | None:
        """The answer's body when it is at most MAX_ANSWER_BYTES (read whole, the connection can be reused)."""
        declared = response.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_ANSWER_BYTES):
            return None
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self._client.aclose()


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
