"""The webhook delivery engine against real HTTP receivers on 127.0.0.1 (a ThreadingHTTPServer in its own thread,
so a slow or hanging receiver never runs on the event loop under test), with the user's settings in a real SQLite
store: order and exact bytes, coalescing and the transcript interval, retries, the circuit breaker, isolation of a
fast user from hanging and slow ones, bounded queues, signatures, the private-address policy, redaction in logs,
shutdown, and the stream tap's exact audio chunks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

import metrics
from config import Settings
from storage.sqlite import SqliteStorage
from webhooks.dispatcher import WebhookDispatcher
from webhooks.signing import encode_json, verify
from webhooks.stream_tap import StreamWebhooks
from webhooks.types import WebhookType
from webhooks.user_webhooks import UserWebhooks

MEMORY, DAY = WebhookType.memory_created, WebhookType.day_summary
LIVE, AUDIO = WebhookType.realtime_transcript, WebhookType.audio_bytes

# -- real receivers --------------------------------------------------------------------------------------------------
@dataclass
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    raw_query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() when the request was read
    peer: tuple[str, int] = ("", 0)  # the client's address: the same port again means a reused connection


# A behaviour gets the request and the receiver; it answers (status, headers, body), or a writer that writes the raw
# answer itself.
Answer = tuple[int, dict[str, str], bytes]
Behaviour = Callable[[Received, "Receivers"], "Answer | Callable[[BinaryIO], None]"]


def ok(_req: Received, _rx: Receivers) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b"ok"


def status(code: int, headers: dict[str, str] | None = None) -> Behaviour:
    return lambda _req, _rx: (code, headers or {}, b"no")


def slow(seconds: float) -> Behaviour:
    def answer(_req: Received, rx: Receivers) -> tuple[int, dict[str, str], bytes]:
        rx.released.wait(seconds)
        return 200, {}, b"ok"
    return answer


def hang(_req: Received, rx: Receivers) -> Answer:
    rx.released.wait(60)  # accepts, reads, never answers (until the test ends)
    raise ConnectionAbortedError


def gate(_req: Received, rx: Receivers) -> tuple[int, dict[str, str], bytes]:
    rx.gate.wait(30)  # answers once the test opens the gate
    return 200, {}, b"ok"


def first_then(first: int, then: int) -> Behaviour:
    """`first` for the first try of each delivery (by X-Omi-Delivery), `then` for its retries."""
    def answer(req: Received, rx: Receivers) -> tuple[int, dict[str, str], bytes]:
        same = [r for r in rx.requests if r.headers.get("x-omi-delivery") == req.headers.get("x-omi-delivery")]
        return (first if len(same) <= 1 else then), {}, b"-"
    return answer


def json_answer(body: bytes) -> Behaviour:
    return lambda _req, _rx: (200, {"Content-Type": "application/json"}, body)


class Receivers:
    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.requests: list[Received] = []
        self.released = threading.Event()  # set at the end: hanging and slow handlers return
        self.gate = threading.Event()
        self._lock = threading.Lock()
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the client may reuse its connections

            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Received("POST", parts.path, parse_qs(parts.query, keep_blank_values=True), parts.query,
                               {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic(),
                               self.client_address[:2])
                with receivers._lock:
                    receivers.requests.append(req)
                    behaviour = receivers.routes.get(parts.path, ok)
                try:
                    answer = behaviour(req, receivers)
                except ConnectionAbortedError:
                    self.close_connection = True
                    return
                if callable(answer):
                    self.close_connection = True
                    try:
                        answer(self.wfile)
                    except OSError:  # the client gave up
                        pass
                    return
                code, headers, data = answer
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> Receivers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()



def drip(_req: Received, rx: Receivers) -> Callable[[BinaryIO], None]:
    """Answers a byte at a time, 0.1 s apart, never finishing its headers (until the test ends)."""
    def write(out: BinaryIO) -> None:
        out.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        out.flush()
        while not rx.released.wait(0.1):
            out.write(b"x")
            out.flush()
    return write


# -- the engine under test -------------------------------------------------------------------------------------------

DELIVERIES = "webhook_deliveries_total"


def quick_settings(**overrides) -> Settings:
    """Settings that make a test quick: short timeouts, 50 ms backoff, a breaker that opens for 1 s."""
    values = {"webhook_allow_private": True, "http_get_timeout": 3.0, "http_put_timeout": 3.0,
              "webhook_max_concurrent": 8, "webhook_queue_max": 32, "webhook_queue_max_bytes": 1 << 20,
              "webhook_max_attempts": 3, "webhook_backoff_s": 0.05, "webhook_backoff_max_s": 0.2,
              "webhook_breaker_failures": 3, "webhook_breaker_open_s": 1.0, "webhook_realtime_interval_s": 0.3,
              "webhook_settings_cache_s": 5.0, "webhook_audio_default_s": 5, "webhook_audio_max_s": 60} | overrides
    return Settings(_env_file=None, **values)


@pytest.fixture
def rx() -> Iterator[Receivers]:
    with Receivers() as receivers:
        yield receivers


@pytest.fixture
async def engine(tmp_path) -> AsyncIterator[Callable[..., tuple[UserWebhooks, WebhookDispatcher]]]:
    """make(**settings) → (UserWebhooks, WebhookDispatcher) on one real SQLite store; all closed after the test."""
    store = SqliteStorage(tmp_path / "hooks.sqlite3")
    await store.open()
    made: list[WebhookDispatcher] = []

    def make(on_message=None, hooks_settings: Settings | None = None, **overrides):
        settings = quick_settings(**overrides)
        hooks = UserWebhooks(store, hooks_settings or settings)
        dispatcher = WebhookDispatcher(settings, hooks, on_message=on_message)
        made.append(dispatcher)
        return hooks, dispatcher

    try:
        yield make
    finally:
        for dispatcher in made:
            await dispatcher.aclose(0)
        await store.close()


def count(wtype: WebhookType, outcome: str) -> float:
    return metrics.value(DELIVERIES, type=wtype.value, outcome=outcome)


class Counts:
    """Changes of the delivery counters since it was made (the counters are process-wide)."""

    def __init__(self) -> None:
        self.start = {key: val for key, val in metrics.labelled_snapshot()[DELIVERIES].items()}
        self.retries = {t: metrics.value("webhook_retries_total", type=t.value) for t in WebhookType}

    def __call__(self, wtype: WebhookType, outcome: str) -> float:
        key = (("outcome", outcome), ("type", wtype.value))
        return count(wtype, outcome) - self.start.get(key, 0.0)

    def retried(self, wtype: WebhookType) -> float:
        return metrics.value("webhook_retries_total", type=wtype.value) - self.retries[wtype]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


async def drained(dispatcher: WebhookDispatcher, timeout: float = 10.0) -> None:
    await until(lambda: dispatcher.queued() == 0, timeout)


# -- order, exact bytes, payload shapes ------------------------------------------------------------------------------

UID = "user/ä &x=1"  # needs URL-encoding in the query


async def test_every_delivery_arrives_in_order_with_the_exact_bytes(rx, engine):
    hooks, dispatcher = engine()
    await hooks.set_url(UID, MEMORY, f"{rx.base}/memories?token=abc&uid=evil")
    await hooks.set_url(UID, DAY, f"{rx.base}/day")
    await hooks.set_url(UID, AUDIO, f"{rx.base}/audio,1")
    counts = Counts()
    chunks = [os.urandom(3200 + i) for i in range(8)]
    memories = [{"id": f"c{i}", "structured": {"title": f"ü {i}", "emoji": "🧠"}, "n": i} for i in range(5)]
    summary = {"summary": "a day", "uid": UID, "created_at": "2024-05-01T20:00:00+00:00"}
    for chunk in chunks:
        dispatcher.submit_audio(UID, chunk, 16000)
    for memory in memories:
        dispatcher.submit_json(UID, MEMORY, memory)
    dispatcher.submit_json(UID, DAY, summary)
    assert dispatcher.queued() == 14
    await drained(dispatcher)

    audio = rx.at("/audio")
    assert [r.body for r in audio] == chunks
    for r in audio:
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.query == {"sample_rate": ["16000"], "uid": [UID]} and r.raw_query.startswith("sample_rate=16000&uid=")
    mems = rx.at("/memories")
    assert [r.body for r in mems] == [encode_json(m) for m in memories]
    ids = set()
    for r in mems:
        assert r.headers["content-type"] == "application/json" and r.headers["x-omi-event"] == "memory_created"
        assert r.query == {"token": ["abc"], "uid": [UID]}  # the user's own query kept, their uid replaced
        assert "x-omi-signature" not in r.headers  # no secret: unsigned
        assert r.headers["idempotency-key"] == r.headers["x-omi-delivery"] and len(r.headers["x-omi-delivery"]) == 32
        ids.add(r.headers["x-omi-delivery"])
    assert len(ids) == len(memories)  # a fresh delivery id per delivery
    [day] = rx.at("/day")
    assert day.body == encode_json(summary) and day.query == {"uid": [UID]}
    assert (counts(AUDIO, "delivered"), counts(MEMORY, "delivered"), counts(DAY, "delivered")) == (8, 5, 1)
    assert len({r.peer for r in rx.requests}) <= 3  # 14 requests, 3 outboxes at once: connections are reused


async def test_transcript_batches_coalesce_by_id_and_go_at_most_once_per_interval(rx, engine):
    hooks, dispatcher = engine(webhook_realtime_interval_s=0.3)
    await hooks.set_url(UID, LIVE, f"{rx.base}/live")
    latest: dict[str, dict] = {}
    order: list[str] = []
    for step in range(40):  # each segment is updated twice after it first appears, as a live transcript is
        sid = f"s{step // 3}"
        segment = {"id": sid, "text": f"{sid} version {step % 3}", "speaker": "SPEAKER_0", "start": step,
                   "end": step + 1.5, "is_user": False}
        dispatcher.submit_transcript(UID, [segment])
        latest[sid] = segment
        if sid not in order:
            order.append(sid)
        await asyncio.sleep(0.03)
    await drained(dispatcher)

    requests = rx.at("/live")
    assert 2 <= len(requests) <= 8  # 40 submits over ~1.3 s, at most one request per 0.3 s
    gaps = [b.at - a.at for a, b in zip(requests, requests[1:], strict=False)]
    assert min(gaps) >= 0.3 - 0.05, gaps  # (without the limit: ~0.03 s apart; the slack is arrival jitter)
    first_seen: list[str] = []
    last_version: dict[str, dict] = {}
    for r in requests:
        body = json.loads(r.body)
        assert r.body == encode_json(body) and r.query == {"uid": [UID]}
        assert body["session_id"] == UID and r.headers["x-omi-event"] == "realtime_transcript"
        ids = [s["id"] for s in body["segments"]]
        assert len(ids) == len(set(ids))  # a batch holds each segment once: its latest version
        assert ids == sorted(ids, key=order.index)  # in the order the segments first came
        for segment in body["segments"]:
            if segment["id"] not in last_version:
                first_seen.append(segment["id"])
            last_version[segment["id"]] = segment
    assert first_seen == order and last_version == latest  # every segment, its latest version last


# -- retries, failures, the breaker ----------------------------------------------------------------------------------


async def test_retries_until_success_with_the_same_delivery_id(rx, engine):
    hooks, dispatcher = engine()
    rx.routes["/flaky"] = first_then(503, 200)
    await hooks.set_url(UID, MEMORY, f"{rx.base}/flaky")
    counts = Counts()
    dispatcher.submit_json(UID, MEMORY, {"id": "c1"})
    await drained(dispatcher)
    first, second = rx.at("/flaky")
    assert first.headers["x-omi-delivery"] == second.headers["x-omi-delivery"]
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == first.headers["x-omi-delivery"]
    assert first.body == second.body
    assert second.at - first.at >= 0.05 * 0.5 - 0.005  # the jittered backoff
    assert counts(MEMORY, "delivered") == 1 and counts(MEMORY, "failed") == 0 and counts.retried(MEMORY) == 1


async def test_a_failing_receiver_gets_max_attempts_then_one_redacted_warning(rx, engine, caplog):
    hooks, dispatcher = engine(webhook_max_attempts=3)
    rx.routes["/fail"] = status(500)
    await hooks.set_url(UID, MEMORY, f"{rx.base}/fail?token=QUERY-SECRET")
    secret = (await hooks.issue_secret(UID))["secret"]
    counts = Counts()
    caplog.set_level(logging.DEBUG)
    dispatcher.submit_json(UID, MEMORY, {"id": "c1", "text": "BODY-TEXT"})
    await drained(dispatcher)
    tries = rx.at("/fail")
    assert len(tries) == 3 and len({r.headers["x-omi-delivery"] for r in tries}) == 1
    assert counts(MEMORY, "failed") == 1 and counts(MEMORY, "delivered") == 0 and counts.retried(MEMORY) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("webhooks")]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "memory_created" in message and UID in message and "HTTP 500" in message and "3 tries" in message
    assert f"{rx.base}/fail" in message

    dispatcher.submit_json(UID, MEMORY, {"id": "c2", "text": "BODY-TEXT"})  # a repeat within 10 s: not logged again
    await drained(dispatcher)
    assert len(rx.at("/fail")) == 6 and counts(MEMORY, "failed") == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("webhooks")]) == 1
    for leaked in ("QUERY-SECRET", secret, "BODY-TEXT"):
        assert leaked not in caplog.text


async def test_other_4xx_and_redirects_fail_at_once_and_429_waits_retry_after(rx, engine):
    hooks, dispatcher = engine(webhook_backoff_max_s=5.0)
    rx.routes["/gone"] = status(404)
    rx.routes["/moved"] = status(307, {"Location": "/elsewhere"})
    calls: list[float] = []

    def limited(req: Received, _rx: Receivers) -> Answer:
        calls.append(req.at)
        return (429, {"Retry-After": "1"}, b"slow down") if len(calls) == 1 else (200, {}, b"ok")

    rx.routes["/limited"] = limited
    await hooks.set_url(UID, MEMORY, f"{rx.base}/gone")
    await hooks.set_url(UID, DAY, f"{rx.base}/limited")
    await hooks.set_url("moved", MEMORY, f"{rx.base}/moved")
    counts = Counts()
    dispatcher.submit_json(UID, MEMORY, {"id": "c1"})
    dispatcher.submit_json("moved", MEMORY, {"id": "c1"})
    dispatcher.submit_json(UID, DAY, {"summary": "s"})
    await drained(dispatcher)
    assert len(rx.at("/gone")) == 1 and len(rx.at("/moved")) == 1 and rx.at("/elsewhere") == []  # not followed
    assert counts(MEMORY, "failed") == 2 and counts.retried(MEMORY) == 0
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.95  # Retry-After: 1, not the 50 ms backoff
    assert counts(DAY, "delivered") == 1


async def test_the_breaker_opens_drops_without_requests_then_half_opens(rx, engine):
    hooks, dispatcher = engine(webhook_max_attempts=1, webhook_breaker_failures=3, webhook_breaker_open_s=1.0)
    rx.routes["/down"] = status(502)
    await hooks.set_url(UID, MEMORY, f"{rx.base}/down")
    counts = Counts()
    for i in range(3):
        dispatcher.submit_json(UID, MEMORY, {"n": i})
    await drained(dispatcher)
    assert len(rx.at("/down")) == 3 and counts(MEMORY, "failed") == 3  # three failed deliveries in a row: open

    for i in range(4):
        dispatcher.submit_json(UID, MEMORY, {"n": 10 + i})
    await drained(dispatcher)
    assert len(rx.at("/down")) == 3 and counts(MEMORY, "dropped_circuit_open") == 4  # nothing reached it

    await asyncio.sleep(1.05)  # half-open: one trial, which fails and opens it again
    dispatcher.submit_json(UID, MEMORY, {"n": 20})
    dispatcher.submit_json(UID, MEMORY, {"n": 21})
    await drained(dispatcher)
    assert len(rx.at("/down")) == 4 and counts(MEMORY, "dropped_circuit_open") == 5

    rx.routes["/down"] = ok  # the receiver comes back
    dispatcher.submit_json(UID, MEMORY, {"n": 30})
    await drained(dispatcher)
    assert len(rx.at("/down")) == 4 and counts(MEMORY, "dropped_circuit_open") == 6  # still open
    await asyncio.sleep(1.05)
    for i in range(3):  # the trial succeeds and closes it: the next ones go too
        dispatcher.submit_json(UID, MEMORY, {"n": 40 + i})
    await drained(dispatcher)
    assert [json.loads(r.body)["n"] for r in rx.at("/down")[4:]] == [40, 41, 42]
    assert counts(MEMORY, "delivered") == 3


# -- isolation, bounds, shutdown -------------------------------------------------------------------------------------


async def test_hanging_and_slow_receivers_do_not_delay_a_fast_user(rx, engine):
    hooks, dispatcher = engine(webhook_max_concurrent=4, http_get_timeout=3.0)
    rx.routes["/slow"] = slow(1.5)
    rx.routes["/hang"] = hang
    for uid, path in (("fast", "/fast"), ("slow", "/slow"), ("hang", "/hang")):
        await hooks.set_url(uid, MEMORY, f"{rx.base}/{path.strip('/')}")
        await hooks.target(uid, MEMORY)  # settings cached, as they are once a stream runs

    async def fast_latencies() -> list[float]:
        latencies = []
        for i in range(5):
            before, sent = len(rx.at("/fast")), time.monotonic()
            dispatcher.submit_json("fast", MEMORY, {"n": i})
            await until(lambda before=before: len(rx.at("/fast")) > before)
            latencies.append(rx.at("/fast")[-1].at - sent)
        return latencies

    alone = await fast_latencies()
    for i in range(6):  # hanging and slow users queue up at the same time
        dispatcher.submit_json("hang", MEMORY, {"n": i})
        dispatcher.submit_json("slow", MEMORY, {"n": i})
    await until(lambda: len(rx.at("/hang")) >= 1 and len(rx.at("/slow")) >= 1)
    loaded = await fast_latencies()
    assert max(loaded) < max(alone) + 0.25 and max(loaded) < 0.5, (alone, loaded)
    assert len(rx.at("/hang")) == 1  # one request at a time per user: the hanging one holds only its own queue

    counts = Counts()
    pending = dispatcher.queued()
    assert pending >= 7  # the hanging user's six, and the slow user's rest
    started = time.monotonic()
    await dispatcher.aclose(0.2)
    assert time.monotonic() - started < 1.0 and dispatcher.queued() == 0
    assert counts(MEMORY, "dropped_shutdown") + counts(MEMORY, "delivered") == pending
    dispatcher.submit_json("fast", MEMORY, {"n": 99})  # after close: counted, not raised
    assert counts(MEMORY, "dropped_shutdown") + counts(MEMORY, "delivered") == pending + 1


async def test_requests_in_flight_are_limited_by_webhook_max_concurrent(rx, engine):
    hooks, dispatcher = engine(webhook_max_concurrent=2)
    rx.routes["/gated"] = gate
    users = [f"user{i}" for i in range(4)]
    for uid in users:
        await hooks.set_url(uid, MEMORY, f"{rx.base}/gated")
        dispatcher.submit_json(uid, MEMORY, {"uid": uid})
    await until(lambda: len(rx.at("/gated")) == 2)
    await asyncio.sleep(0.2)
    assert len(rx.at("/gated")) == 2  # two held at the gate; the other two wait for a slot, not a receiver
    rx.gate.set()
    await drained(dispatcher)
    assert sorted(json.loads(r.body)["uid"] for r in rx.at("/gated")) == users


async def test_hanging_receivers_give_their_slots_back_after_webhook_slow_after_s(rx, engine):
    """One shared slot: three hanging users' requests each leave it after 0.2 s for the slow lane, so all three
    reach their receiver and a fast user's deliveries go at once (with the slot held for the whole request the
    hanging ones queued behind the first for HTTP_GET_TIMEOUT, and the fast user behind them)."""
    hooks, dispatcher = engine(webhook_max_concurrent=1, webhook_slow_after_s=0.2, http_get_timeout=5.0)
    rx.routes["/hang"] = hang
    await hooks.set_url("fast", MEMORY, f"{rx.base}/fast")
    for i in range(3):
        await hooks.set_url(f"hang{i}", MEMORY, f"{rx.base}/hang")
        dispatcher.submit_json(f"hang{i}", MEMORY, {"n": i})
    await until(lambda: len(rx.at("/hang")) == 3, timeout=3.0)
    latencies = []
    for i in range(3):
        sent = time.monotonic()
        dispatcher.submit_json("fast", MEMORY, {"n": i})
        await until(lambda i=i: len(rx.at("/fast")) > i, timeout=3.0)
        latencies.append(rx.at("/fast")[-1].at - sent)
    assert max(latencies) < 0.5, latencies
    assert dispatcher._sender.slow == 3  # the hanging ones, still waiting in the slow lane


async def test_a_full_slow_lane_cuts_off_the_request_that_turns_slow(rx, engine):
    hooks, dispatcher = engine(webhook_slow_after_s=0.2, webhook_max_slow=1, webhook_max_attempts=1,
                               http_get_timeout=5.0)
    rx.routes["/hang"] = hang
    rx.routes["/slow"] = slow(0.6)
    counts = Counts()
    for uid in ("first", "second"):
        await hooks.set_url(uid, MEMORY, f"{rx.base}/hang")
    dispatcher.submit_json("first", MEMORY, {"n": 1})
    await until(lambda: dispatcher._sender.slow == 1)
    started = time.monotonic()
    dispatcher.submit_json("second", MEMORY, {"n": 2})
    await until(lambda: counts(MEMORY, "failed") == 1, timeout=2.0)  # cut off at 0.2 s, not at the 5 s timeout
    assert time.monotonic() - started < 1.0 and dispatcher._sender.slow == 1 and len(rx.at("/hang")) == 2
    # a slow receiver (0.6 s) is delivered through the slow lane once it has room
    await hooks.set_url("patient", MEMORY, f"{rx.base}/slow")
    await dispatcher.aclose(0)  # the hanging one leaves the lane
    hooks, dispatcher = engine(webhook_slow_after_s=0.2, webhook_max_slow=1, http_get_timeout=5.0)
    dispatcher.submit_json("patient", MEMORY, {"n": 3})
    await until(lambda: counts(MEMORY, "delivered") == 1, timeout=3.0)
    assert len(rx.at("/slow")) == 1


async def test_close_gives_queued_deliveries_their_grace(rx, engine):
    hooks, dispatcher = engine()
    rx.routes["/gated"] = gate
    await hooks.set_url(UID, MEMORY, f"{rx.base}/gated")
    counts = Counts()
    for i in range(3):
        dispatcher.submit_json(UID, MEMORY, {"n": i})
    await until(lambda: len(rx.at("/gated")) == 1)
    closing = asyncio.create_task(dispatcher.aclose(5.0))
    await asyncio.sleep(0.1)
    dispatcher.submit_json(UID, MEMORY, {"n": 3})  # closing: no longer taken
    rx.gate.set()
    started = time.monotonic()
    await closing
    assert time.monotonic() - started < 1.0  # it returns when the queue is empty, not at the end of the grace
    assert [json.loads(r.body)["n"] for r in rx.at("/gated")] == [0, 1, 2]
    assert counts(MEMORY, "delivered") == 3 and counts(MEMORY, "dropped_shutdown") == 1


async def test_a_full_queue_drops_the_newest_items_and_counts_them(rx, engine):
    hooks, dispatcher = engine(webhook_queue_max=3)
    rx.routes["/gated"] = gate
    await hooks.set_url(UID, AUDIO, f"{rx.base}/gated")
    counts = Counts()
    chunks = [bytes([i]) * 100 for i in range(7)]
    dispatcher.submit_audio(UID, chunks[0], 16000)
    await until(lambda: len(rx.at("/gated")) == 1)  # in flight, held at the gate
    for chunk in chunks[1:]:
        dispatcher.submit_audio(UID, chunk, 16000)
    assert counts(AUDIO, "dropped_queue_full") == 3  # three wait; the three newest are dropped
    rx.gate.set()
    await drained(dispatcher)
    assert [r.body for r in rx.at("/gated")] == chunks[:4]  # what was queued stays continuous
    assert counts(AUDIO, "delivered") == 4


async def test_the_queue_is_bounded_in_bytes_and_transcript_segments_too(rx, engine):
    hooks, dispatcher = engine(webhook_queue_max=3, webhook_queue_max_bytes=2048, webhook_realtime_interval_s=0)
    rx.routes["/gated"] = gate
    await hooks.set_url(UID, MEMORY, f"{rx.base}/gated")
    await hooks.set_url(UID, LIVE, f"{rx.base}/gated")
    counts = Counts()
    big = [{"n": i, "pad": "x" * 900} for i in range(4)]
    dispatcher.submit_json(UID, MEMORY, big[0])
    dispatcher.submit_transcript(UID, [{"id": "a", "text": "a"}])
    await until(lambda: len(rx.at("/gated")) == 2)  # both in flight at the gate
    for payload in big[1:]:
        dispatcher.submit_json(UID, MEMORY, payload)
    assert counts(MEMORY, "dropped_queue_full") == 1  # 2 x ~915 bytes wait; a third would pass 2048
    dispatcher.submit_transcript(UID, [{"id": k, "text": k} for k in "bcde"])
    assert counts(LIVE, "dropped_queue_full") == 1  # three segments wait, "e" is dropped
    dispatcher.submit_transcript(UID, [{"id": "b", "text": "b2"}])  # an update of a waiting one still fits
    rx.gate.set()
    await drained(dispatcher)
    assert [json.loads(r.body)["n"] for r in rx.at("/gated") if b'"n"' in r.body] == [0, 1, 2]
    batches = [json.loads(r.body)["segments"] for r in rx.at("/gated") if b"segments" in r.body]
    assert batches == [[{"id": "a", "text": "a"}], [{"id": "b", "text": "b2"}, {"id": "c", "text": "c"},
                                                     {"id": "d", "text": "d"}]]


async def test_a_receiver_that_drips_its_answer_is_cut_at_the_deadline(rx, engine):
    hooks, dispatcher = engine(http_get_timeout=0.3, http_put_timeout=0.3, webhook_max_attempts=1)
    rx.routes["/drip"] = drip  # a byte every 0.1 s: never a read timeout, only the overall deadline
    await hooks.set_url(UID, MEMORY, f"{rx.base}/drip")
    counts = Counts()
    started = time.monotonic()
    dispatcher.submit_json(UID, MEMORY, {"id": "c1"})
    await drained(dispatcher)
    elapsed = time.monotonic() - started
    assert counts(MEMORY, "failed") == 1 and 0.8 <= elapsed < 1.6, elapsed  # deadline: 0.3 + 0.3 + 0.3 s


# -- signatures, policy, targets, messages ---------------------------------------------------------------------------


def independent_signature(secret: str, t: str, uid: str, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.{uid}.".encode() + body, hashlib.sha256).hexdigest()


async def test_deliveries_are_signed_and_verify_with_current_and_previous_secrets(rx, engine):
    hooks, dispatcher = engine()
    await hooks.set_url(UID, MEMORY, f"{rx.base}/signed?k=v")
    await hooks.set_url(UID, AUDIO, f"{rx.base}/audio-signed,1")
    first = (await hooks.issue_secret(UID))["secret"]
    dispatcher.submit_json(UID, MEMORY, {"id": "c1", "text": "ünï"})
    dispatcher.submit_audio(UID, b"\x01\x02" * 50, 16000)
    await drained(dispatcher)
    for r in rx.at("/signed") + rx.at("/audio-signed"):
        uid = r.query["uid"][0]
        assert uid == UID and verify(r.headers, r.body, first, uid)
        t, signature = r.headers["x-omi-signature"].split(",")
        assert signature == "v1=" + independent_signature(first, t.removeprefix("t="), uid, r.body)
        assert abs(int(t.removeprefix("t=")) - time.time()) < 5
        assert not verify(r.headers, r.body, first, "someone-else")
    assert rx.at("/audio-signed")[0].headers["x-omi-event"] == "audio_bytes"

    second = (await hooks.issue_secret(UID))["secret"]  # rotation: both sign during the grace window
    dispatcher.submit_json(UID, MEMORY, {"id": "c2"})
    await drained(dispatcher)
    r = rx.at("/signed")[-1]
    assert r.headers["x-omi-signature"].count("v1=") == 2
    assert verify(r.headers, r.body, second, UID) and verify(r.headers, r.body, first, UID)
    assert not verify(r.headers, r.body, "whsec_other", UID)


async def test_private_targets_are_refused_unless_allowed(rx, engine, monkeypatch):
    stored_by = quick_settings(webhook_allow_private=True)  # set while private targets were allowed
    hooks, dispatcher = engine(webhook_allow_private=False, hooks_settings=stored_by)
    await hooks.set_url(UID, MEMORY, f"{rx.base}/private")
    port = urlsplit(rx.base).port
    await hooks.set_url("by-name", MEMORY, f"http://hooks.example.com:{port}/private")
    loop = asyncio.get_running_loop()

    async def fake_dns(host, port, **kwargs):  # stands in for DNS (no resolver here): a public name → 127.0.0.1
        assert host == "hooks.example.com"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", fake_dns)
    counts = Counts()
    dispatcher.submit_json(UID, MEMORY, {"id": "c1"})
    dispatcher.submit_json("by-name", MEMORY, {"id": "c2"})
    await drained(dispatcher)
    assert counts(MEMORY, "refused_target") == 2 and counts(MEMORY, "failed") == 0
    assert rx.at("/private") == []  # nothing arrived: refused before any connection, and not retried

    _, allowing = engine(webhook_allow_private=True, hooks_settings=stored_by)
    allowing.submit_json(UID, MEMORY, {"id": "c3"})
    await drained(allowing)
    assert len(rx.at("/private")) == 1


async def test_no_target_or_disabled_means_nothing_is_sent(rx, engine):
    hooks, dispatcher = engine()
    await hooks.set_url(UID, DAY, f"{rx.base}/day")
    await hooks.set_enabled(UID, DAY, False)
    counts = Counts()
    dispatcher.submit_json("nobody", MEMORY, {"id": "c1"})
    dispatcher.submit_json(UID, DAY, {"summary": "s"})
    await drained(dispatcher)
    assert counts(MEMORY, "no_target") == 1 and counts(DAY, "no_target") == 1 and rx.requests == []
    with pytest.raises(ValueError):
        dispatcher.submit_json(UID, LIVE, {"segments": []})  # built by submit_transcript, not the caller
    dispatcher.submit_json(UID, MEMORY, {"bad": float("nan")})  # not JSON: counted and logged, never raised
    assert counts(MEMORY, "failed") == 1


async def test_a_transcript_answer_with_a_message_notifies_the_user(rx, engine):
    told: list[tuple[str, str]] = []

    async def on_message(uid: str, message: str) -> None:
        told.append((uid, message))
        if uid == "breaks":
            raise RuntimeError("the notifier failed")

    hooks, dispatcher = engine(on_message=on_message)
    rx.routes["/talks"] = json_answer(b'{"message": "hello there"}')
    rx.routes["/short"] = json_answer(b'{"message": "hi"}')
    for uid, path in (("talks", "/talks"), ("short", "/short"), ("breaks", "/talks")):
        await hooks.set_url(uid, LIVE, f"{rx.base}{path}")
        await hooks.set_url(uid, MEMORY, f"{rx.base}{path}")
    counts = Counts()
    for uid in ("talks", "short", "breaks"):
        dispatcher.submit_transcript(uid, [{"id": "s1", "text": "hey"}])
        dispatcher.submit_json(uid, MEMORY, {"id": "c1"})  # only the transcript webhook's answer counts (Omi)
    await drained(dispatcher)
    await until(lambda: len(told) == 2)
    await asyncio.sleep(0.05)
    assert sorted(told) == [("breaks", "hello there"), ("talks", "hello there")]
    assert counts(LIVE, "delivered") == 3 and counts(MEMORY, "delivered") == 3


# -- the stream tap --------------------------------------------------------------------------------------------------


async def test_the_stream_tap_sends_exact_chunks_and_the_remainder(rx, engine):
    hooks, dispatcher = engine()
    await hooks.set_url(UID, AUDIO, f"{rx.base}/pcm,1")
    await hooks.set_url(UID, LIVE, f"{rx.base}/segments")
    tap = await StreamWebhooks.open(dispatcher, hooks, UID)
    assert tap.active and tap.chunk_bytes == 32000
    audio = np.random.default_rng(7).uniform(-1.2, 1.2, 40000).astype(np.float32)  # 2.5 s, some beyond ±1
    audio[:4] = [1.0, -1.0, 0.49999 / 32768, 1.5 / 32768]
    cuts = sorted(random.Random(3).sample(range(1, len(audio)), 30))
    for piece in np.split(audio, cuts):
        tap.audio(piece)
    tap.segments([{"id": "s1", "text": "hello"}])
    await drained(dispatcher)
    assert [len(r.body) for r in rx.at("/pcm")] == [32000, 32000]  # whole seconds only, until the end
    tap.flush()
    tap.flush()  # nothing left: nothing more sent
    await drained(dispatcher)
    bodies = [r.body for r in rx.at("/pcm")]
    assert [len(b) for b in bodies] == [32000, 32000, 16000]
    expected = np.clip(np.rint(audio.astype(np.float64) * 32768), -32768, 32767).astype("<i2").tobytes()
    assert b"".join(bodies) == expected
    assert rx.at("/pcm")[0].query == {"sample_rate": ["16000"], "uid": [UID]}
    assert json.loads(rx.at("/segments")[0].body)["segments"] == [{"id": "s1", "text": "hello"}]


async def test_the_stream_tap_does_nothing_for_webhooks_that_are_off(rx, engine):
    hooks, dispatcher = engine()
    await hooks.set_url(UID, AUDIO, f"{rx.base}/pcm,1")
    await hooks.set_enabled(UID, AUDIO, False)
    tap = await StreamWebhooks.open(dispatcher, hooks, UID)
    assert not tap.active and tap.chunk_bytes == 0
    tap.audio(np.zeros(64000, dtype=np.float32))
    tap.segments([{"id": "s1", "text": "hello"}])
    tap.flush()
    assert dispatcher.queued() == 0 and tap._pending == bytearray()
    await asyncio.sleep(0.05)
    assert rx.requests == []
