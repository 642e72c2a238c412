"""The developer-webhook delivery engine, shared by every stream and job of the process.

The live streams and the conversation and day-summary code hand it payloads with synchronous calls that only
queue (`submit_transcript`, `submit_audio`, `submit_json`): no I/O, no awaiting, never an exception for a full
queue. Each (user, webhook type) has an outbox (`outbox.Outbox`, bounded) and, while it holds anything, one task
that delivers its items in order, so one user's slow receiver never holds up another's. Around each request: a
process-wide limit of WEBHOOK_MAX_CONCURRENT requests (and a slow lane), one shared connection pool
(`sender.WebhookSender`), the
target (URL, on/off, signing secrets) looked up when the delivery starts (`UserWebhooks.target`, cached), the URL
policy checked and the host resolved before every attempt unless WEBHOOK_ALLOW_PRIVATE (a host found public is
remembered for a few seconds: `targets.PublicHosts`), retries with jittered
exponential backoff on network errors, 5xx and 429, and a circuit breaker per receiver (`breaker`).

Metrics: `webhook_deliveries_total{type,outcome}` counts deliveries (one request's worth, whatever its tries),
except `dropped_queue_full`, which counts the items refused at submit (a transcript segment, an audio chunk, a
payload); `webhook_retries_total{type}`; `webhook_delivery_seconds_total{type}`, the sum over delivered ones of
the time from submit (a transcript batch: its oldest segment) to the answer.
Logs: one WARNING per failed or refused delivery (at most one per receiver per LOG_EVERY_S), with the type, the
uid, the URL as scheme://host/path and why (an HTTP status or an exception's type): never a query string, a
secret, a body, or an exception's text (httpx puts whole URLs in it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import httpx

import metrics
from config import Settings
from webhooks.breaker import CircuitBreakers, breaker_key
from webhooks.outbox import Delivery, Outbox
from webhooks.sender import Answer, WebhookSender
from webhooks.signing import encode_json
from webhooks.targets import PublicHosts, WebhookUrlError, check_url, redact_url, url_host_port
from webhooks.types import Target, WebhookType
from webhooks.user_webhooks import UserWebhooks

log = logging.getLogger(__name__)

OUTCOMES = ("delivered", "failed", "dropped_queue_full", "dropped_circuit_open", "refused_target", "no_target",
            "dropped_shutdown")
LOG_EVERY_S = 10.0  # repeats of a receiver's failure are logged at most this often
LOG_KEYS_MAX = 10_000
SIDE_TASKS_MAX = 1000  # on_message calls running at once; beyond, a message is dropped (logged)
JSON_TYPES = (WebhookType.memory_created, WebhookType.day_summary)

metrics.register("webhook_deliveries_total", "developer-webhook deliveries by type and outcome", ("outcome", "type"))
metrics.register("webhook_retries_total", "developer-webhook requests sent again after a failed try", ("type",))
metrics.register("webhook_delivery_seconds_total", "time from submit to the receiver's answer, summed over "
                                                   "delivered developer-webhook deliveries", ("type",))

OnMessage = Callable[[str, str], Awaitable[None]]


class _Refused(Exception):
    """The target may not be sent to (URL policy): dropped, not retried."""


class WebhookDispatcher:
    def __init__(self, settings: Settings, user_webhooks: UserWebhooks, *, on_message: OnMessage | None = None
                 ) -> None:
        self.settings = settings
        self.user_webhooks = user_webhooks
        self.on_message = on_message  # told of a transcript webhook's {"message": ...} answer (Omi notifies)
        self._sender = WebhookSender(settings)
        self._breakers = CircuitBreakers(settings.webhook_breaker_failures, settings.webhook_breaker_open_s)
        self._public_hosts = PublicHosts()
        self._outboxes: dict[tuple[str, WebhookType], Outbox] = {}
        self._side_tasks: set[asyncio.Task] = set()
        self._logged: OrderedDict[str, float] = OrderedDict()  # receiver → loop time of its last warning
        self._closed = False

    # -- submitting (synchronous, on the caller's event loop) --------------------------------------------------------

    def submit_transcript(self, uid: str, segments: list[dict]) -> None:
        """Queue transcript segments (dicts with an `id`); merged into the waiting batch by id."""
        wtype = WebhookType.realtime_transcript
        encoded: list[tuple[object, bytes]] = []
        for segment in segments:
            try:
                data = encode_json(segment)
            except (TypeError, ValueError):
                self._count(wtype, "failed")
                log.warning("webhook realtime_transcript of %s: a segment that is not JSON was skipped", uid)
                continue
            key = segment.get("id") if isinstance(segment, dict) else None
            encoded.append((key if isinstance(key, str | int) else object(), data))
        if not encoded:
            return
        box = self._outbox(uid, wtype, len(encoded))
        if box is None:
            return
        refused = box.merge_segments(encoded, asyncio.get_running_loop().time())
        if refused:
            self._count(wtype, "dropped_queue_full", refused)
        self._start(uid, wtype, box)

    def submit_audio(self, uid: str, pcm16: bytes, sample_rate: int) -> None:
        """Queue one audio chunk (16-bit little-endian mono PCM), posted as is with ?sample_rate=&uid=."""
        if not pcm16:
            return
        delivery = Delivery(WebhookType.audio_bytes, asyncio.get_running_loop().time(),
                            content_type="application/octet-stream", params={"sample_rate": str(int(sample_rate))},
                            body=bytes(pcm16))
        self._queue(uid, delivery)

    def submit_json(self, uid: str, wtype: WebhookType, payload: dict) -> None:
        """Queue a JSON payload the caller built: memory_created (the conversation), day_summary."""
        wtype = WebhookType(wtype)
        if wtype not in JSON_TYPES:
            raise ValueError(f"submit_json takes {', '.join(JSON_TYPES)}, not {wtype}")
        try:
            body = encode_json(payload)
        except (TypeError, ValueError) as exc:
            self._count(wtype, "failed")
            log.warning("webhook %s of %s: the payload is not JSON (%s), not sent", wtype, uid, type(exc).__name__)
            return
        self._queue(uid, Delivery(wtype, asyncio.get_running_loop().time(), body=body))

    def _queue(self, uid: str, delivery: Delivery) -> None:
        box = self._outbox(uid, delivery.wtype, 1)
        if box is None:
            return
        if not box.offer(delivery):
            self._count(delivery.wtype, "dropped_queue_full")
            return
        self._start(uid, delivery.wtype, box)

    def _outbox(self, uid: str, wtype: WebhookType, items: int) -> Outbox | None:
        if self._closed:
            self._count(wtype, "dropped_shutdown", items)
            return None
        box = self._outboxes.get((uid, wtype))
        if box is None:
            s = self.settings
            box = self._outboxes[(uid, wtype)] = Outbox(s.webhook_queue_max, s.webhook_queue_max_bytes)
        return box

    def _start(self, uid: str, wtype: WebhookType, box: Outbox) -> None:
        if box.task is None and box.waiting:
            box.task = asyncio.get_running_loop().create_task(self._run(uid, wtype, box),
                                                              name=f"webhook {wtype} {uid}")

    def queued(self) -> int:
        """Deliveries waiting or in flight, all users and types (a transcript batch is one)."""
        return sum(box.pending() for box in self._outboxes.values())

    # -- delivering --------------------------------------------------------------------------------------------------

    async def _run(self, uid: str, wtype: WebhookType, box: Outbox) -> None:
        """Deliver the outbox's items in order; end when it is empty (and, for transcripts, the interval is over:
        a new outbox must not send sooner than the interval allows)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if box.next_request > loop.time():
                    await asyncio.sleep(box.next_request - loop.time())
                delivery = box.take()
                if delivery is None:
                    break
                try:
                    await self._deliver(uid, box, delivery)
                except Exception as exc:  # a bug must cost this delivery, not the outbox
                    self._count(wtype, "failed")
                    # the type and the frames only: an exception's text may hold the URL and its query
                    log.warning("webhook %s of %s failed unexpectedly: %s", wtype, uid, type(exc).__name__)
                    log.debug("where: %s", "".join(traceback.format_tb(exc.__traceback__)))
                box.in_flight = None
        except asyncio.CancelledError:
            self._count(wtype, "dropped_shutdown", box.pending())
            raise
        finally:
            box.task, box.in_flight = None, None
            if self._outboxes.get((uid, wtype)) is box:
                if box.waiting and not self._closed:  # cannot happen (checked without awaiting); kept safe
                    self._start(uid, wtype, box)
                else:
                    del self._outboxes[(uid, wtype)]

    async def _deliver(self, uid: str, box: Outbox, delivery: Delivery) -> None:
        wtype = delivery.wtype
        try:
            target = await self.user_webhooks.target(uid, wtype)
        except Exception as exc:
            self._count(wtype, "failed")
            log.warning("webhook %s of %s not sent: its settings are unreadable (%s)", wtype, uid, type(exc).__name__)
            return
        if target is None:
            self._count(wtype, "no_target")
            return
        key = breaker_key(target.url)
        verdict = self._breakers.allow(key)
        if verdict is None:
            self._count(wtype, "dropped_circuit_open")
            return
        trial, judged = verdict == "trial", False
        try:
            ok, reason, tries = await self._attempts(uid, box, target, delivery)
            self._breakers.record(key, ok, trial=trial)
            judged = True
        except _Refused as exc:
            self._count(wtype, "refused_target")
            self._warn(key, "webhook %s of %s to %s refused: %s", wtype, uid, redact_url(target.url), exc)
            return
        finally:
            if trial and not judged:
                self._breakers.release(key)
        if ok:
            self._count(wtype, "delivered")
            metrics.inc("webhook_delivery_seconds_total", asyncio.get_running_loop().time() - delivery.submitted,
                        type=wtype.value)
        else:
            self._count(wtype, "failed")
            self._warn(key, "webhook %s of %s to %s failed after %d tries: %s", wtype, uid, redact_url(target.url),
                       tries, reason)

    async def _attempts(self, uid: str, box: Outbox, target: Target, delivery: Delivery) -> tuple[bool, str, int]:
        """Try until delivered, a failure that is not retried, or WEBHOOK_MAX_ATTEMPTS: (ok, why not, tries)."""
        s, loop = self.settings, asyncio.get_running_loop()
        delivery_id = uuid.uuid4().hex  # the same across retries: the receiver's idempotency key
        reason, tries = "", 0
        for attempt in range(s.webhook_max_attempts):
            if attempt:
                metrics.inc("webhook_retries_total", type=delivery.wtype.value)
            if delivery.wtype is WebhookType.realtime_transcript:  # at most one request per interval, retries too
                if box.next_request > loop.time():
                    await asyncio.sleep(box.next_request - loop.time())
                box.next_request = loop.time() + s.webhook_realtime_interval_s
            tries += 1
            retry_after = None
            try:
                await self._check_target(target.url)
                answer = await self._sender.send(target, uid, delivery, delivery_id)
            except (httpx.HTTPError, OSError, TimeoutError) as exc:
                reason = type(exc).__name__
            else:
                if 200 <= answer.status < 300:
                    self._told(uid, answer)
                    return True, "", tries
                reason = f"HTTP {answer.status}"
                if answer.status != 429 and answer.status < 500:
                    return False, reason, tries
                retry_after = answer.retry_after if answer.status == 429 else None
            if attempt + 1 < s.webhook_max_attempts:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        return False, reason, tries

    async def _check_target(self, url: str) -> None:
        allow_private = self.settings.webhook_allow_private
        try:
            check_url(url, allow_private)
            if not allow_private:
                await self._public_hosts.check(*url_host_port(url))
        except WebhookUrlError as exc:
            raise _Refused(str(exc)) from None
        try:
            httpx.URL(url)
        except httpx.InvalidURL:
            raise _Refused("the webhook URL is not a valid URL") from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None and retry_after < s.webhook_backoff_max_s:
            return retry_after
        return min(s.webhook_backoff_max_s, s.webhook_backoff_s * 2 ** attempt) * (0.5 + random.random())

    def _told(self, uid: str, answer: Answer) -> None:
        """Hand a transcript webhook's message to on_message, apart from delivery (its failure is only logged)."""
        if answer.message is None or self.on_message is None:
            return
        if len(self._side_tasks) >= SIDE_TASKS_MAX:
            log.warning("webhook message to %s dropped: too many notifications in progress", uid)
            return
        task = asyncio.get_running_loop().create_task(self._notify(uid, answer.message))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _notify(self, uid: str, message: str) -> None:
        try:
            await self.on_message(uid, message)  # type: ignore[misc]  # set: checked by _told
        except Exception as exc:
            log.warning("webhook message to %s not handled: %s", uid, type(exc).__name__)

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    @staticmethod
    def _count(wtype: WebhookType, outcome: str, amount: int = 1) -> None:
        metrics.inc("webhook_deliveries_total", amount, type=wtype.value, outcome=outcome)

    def _warn(self, key: str, msg: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY_S:
            return
        self._logged[key] = now
        self._logged.move_to_end(key)
        while len(self._logged) > LOG_KEYS_MAX:
            self._logged.popitem(last=False)
        log.warning(msg, *args)

    async def aclose(self, grace_s: float) -> None:
        """Stop taking submits, give queued deliveries up to `grace_s`, cancel the rest (counted dropped_shutdown),
        close the connections."""
        self._closed = True
        tasks = [box.task for box in self._outboxes.values() if box.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, grace_s))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        side = list(self._side_tasks)
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        await self._sender.aclose()
