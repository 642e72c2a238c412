"""One `/v4/listen` WebSocket's outbound side and its interruptible receive (`WsClient`).

Split from server.py: the queue, the sender task, slow-client handling and the stop signal of one connection.
Per-connection state only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketState

import metrics
from streaming.protocol import CloseCode, ErrorEvent

log = logging.getLogger("server")


class _Outgoing:
    """One queued message: text (an event or a ping), a segment list (kept by id until sent, so that a newer version
    of a segment can replace a queued one), or the close, which ends the queue."""

    __slots__ = ("close", "ping", "segments", "text")

    def __init__(self, text: str = "", *, segments: dict[str, Any] | None = None, ping: bool = False,
                 close: tuple[int, str] | None = None) -> None:
        self.text = text
        self.segments = segments
        self.ping = ping
        self.close = close

    def render(self) -> str:
        if self.segments is not None:
            return json.dumps(list(self.segments.values()), separators=(",", ":"))
        return self.text


SLOW_CLIENT_REASON = "slow client: not reading its messages"


class WsClient:
    """One WebSocket's outbound side: a bounded queue drained by one sender task, in order.

    Why: uvicorn's WebSocket implementations (websockets, the default; websockets-sansio; wsproto) all wait in `send`
    while the transport's write buffer is over its high-water mark (64 KiB), so a peer that stops reading does not
    grow the server's buffers: it blocks `send` once the TCP buffers are full. Awaited by the producers, that stalled
    the STT reader task (`Pipeline._on_transcript` → emit) behind one slow phone, so its last results were cancelled
    unstored at the end of the stream, and it stalled the conversation events of the user's other streams. So:

    - `send_json` / `send_text` / `send_ping` only queue; they never block their caller.
    - A ping is dropped while anything is queued (the queued messages keep the connection busy anyway).
    - Segment lists are upserts by `id`: a new list moves its segments' newer versions into the queued, unsent lists
      that hold them (in place: the client still sees each segment first where it first came), within the run of
      segment lists at the tail of the queue (never past an event). A list left empty is dropped. Drops count in
      `ws_messages_dropped_total`.
    - Slow client: over WS_SEND_QUEUE_MAX messages queued, or one send stuck for WS_SLOW_CLIENT_TIMEOUT_S. The queue
      is dropped, an `error` event `slow_client` is attempted, the stream is told to stop reading (`request_stop`)
      and closes with 1008 (`CloseCode.POLICY`; the client broke the rule that it reads its messages), counted in
      `ws_slow_clients_closed_total`. The stream still finishes and stores everything (segments are stored before
      they are sent, save during a storage outage: `SegmentWriter`): the client re-reads them from
      `/v1/conversations` when it reconnects.
    - `close` is queued behind what is queued already, which gets WS_SLOW_CLIENT_TIMEOUT_S to go out.

    Also the stop signal for the stream's receive loop (`request_stop`, `receive`): server shutdown, slow client.
    """

    def __init__(self, websocket: WebSocket, queue_max: int = 256, slow_timeout_s: float = 30.0) -> None:
        self.ws = websocket
        self.gone = False  # nothing more will be sent: the client went away, or the close was sent
        self.slow = False
        self.stop_code: int | None = None  # the receive loop is asked to end with this close code
        self.stop_deadline = 0.0
        self.close_reason = ""
        self._queue_max = queue_max
        self._slow_timeout_s = slow_timeout_s
        self._queue: deque[_Outgoing] = deque()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()  # the connection's handler task: the one that calls `receive`
        self._receiving = False  # a receive is in progress (and may be interrupted)
        self._interrupted = False  # ... and was: its task was cancelled to end it
        self._receive_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None  # wakes the receive at its deadline (re-armed lazily)
        self._closing = False
        self._flush_deadline: float | None = None
        self._sender = asyncio.create_task(self._send_loop(), name="ws-sender")

    # -- producers (never block) --------------------------------------------------------------------------------

    async def send_json(self, payload: Any) -> None:
        if isinstance(payload, list) and payload and all(isinstance(p, dict) and "id" in p for p in payload):
            self._put(_Outgoing(segments={p["id"]: p for p in payload}))
        else:
            self._put(_Outgoing(json.dumps(payload, separators=(",", ":"))))

    async def send_text(self, text: str) -> None:
        self._put(_Outgoing(text))

    def send_ping(self) -> None:
        if self._queue:
            metrics.inc("ws_messages_dropped_total")
            return
        self._put(_Outgoing("ping", ping=True))

    def _put(self, item: _Outgoing) -> None:
        if self.gone or self.slow or self._closing:
            return
        if item.segments is not None and self._coalesce(item):
            return
        self._queue.append(item)
        if len(self._queue) > self._queue_max:
            self._give_up(f"over {self._queue_max} messages queued")
            return
        self._wake.set()

    def _coalesce(self, item: _Outgoing) -> bool:
        """Moves `item`'s segments into the queued lists holding older versions; True when nothing is left of it."""
        assert item.segments is not None
        for queued in reversed(self._queue):
            if queued.ping:
                continue
            if queued.segments is None:
                break
            for segment_id in [i for i in item.segments if i in queued.segments]:
                queued.segments[segment_id] = item.segments.pop(segment_id)
            if not item.segments:
                metrics.inc("ws_messages_dropped_total")
                return True
        return False

    def _give_up(self, why: str) -> None:
        if self.slow or self.gone:
            return
        self.slow = True
        closes = [q for q in self._queue if q.close is not None]
        metrics.inc("ws_messages_dropped_total", len(self._queue) - len(closes))
        metrics.inc("ws_slow_clients_closed_total")
        log.warning("closing a slow client (%s); its stream still finishes and is stored", why)
        self._queue.clear()
        event = ErrorEvent(code="slow_client", message=f"{SLOW_CLIENT_REASON} ({why}); the transcript is stored")
        self._queue.append(_Outgoing(json.dumps(event.model_dump(), separators=(",", ":"))))
        self._queue.extend(closes)
        self._wake.set()
        self.request_stop(CloseCode.POLICY, SLOW_CLIENT_REASON)

    async def refuse(self, code: int, error: str, message: str) -> None:
        """An `error` event with a machine code, then the close: how an accepted stream is refused or ended."""
        await self.send_json(ErrorEvent(code=error, message=message).model_dump())
        await self.close(code, message)

    def stop_with_error(self, code: int, error: str, message: str) -> None:
        """Queues an `error` event and asks the stream to end with `code`, without waiting for the client (it may
        be dead or not reading): the stream's own task finishes its audio and sends the close (bounded, `close`)."""
        self._put(_Outgoing(json.dumps(ErrorEvent(code=error, message=message).model_dump(), separators=(",", ":"))))
        self.request_stop(code, message)

    # -- the sender ---------------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue.popleft()
            if item.close is not None:
                await self._close_now(*item.close)
                return
            timeout = 1.0 if self.slow else self._slow_timeout_s  # a slow client's error event is only attempted
            if self._flush_deadline is not None:
                timeout = max(min(timeout, self._flush_deadline - time.monotonic()), 0.01)
            try:
                async with asyncio.timeout(timeout):
                    await self.ws.send_text(item.render())
            except TimeoutError:
                self._give_up(f"nothing sent for {timeout:.1f} s")
            except Exception:  # the client went away; the pipeline still finishes its work
                self.gone = True
                self._queue.clear()
                return

    async def _close_now(self, code: int, reason: str) -> None:
        if self.slow:
            code, reason = CloseCode.POLICY, SLOW_CLIENT_REASON
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason[:120])
        self.gone = True

    async def close(self, code: int, reason: str = "") -> None:
        """Closes after the messages already queued (bounded, see above); returns when the close was sent."""
        if not self._closing:
            self._closing = True
            self._flush_deadline = time.monotonic() + self._slow_timeout_s
            self._queue.append(_Outgoing(close=(code, reason or self.close_reason)))
            self._wake.set()
        await asyncio.wait({self._sender})  # never raises; cancelling this wait leaves the sender running

    def abandon(self) -> None:
        """The connection's handler is done: stop the sender if nothing closed it."""
        if self._timer is not None:
            self._timer.cancel()
        if not self._sender.done():
            self._sender.cancel()

    # -- the receive side ---------------------------------------------------------------------------------------

    def request_stop(self, code: int, reason: str, linger_s: float = 0.0) -> None:
        """Asks the stream's receive loop to end and close with `code`. For `linger_s` it still processes frames
        that keep arriving back to back (audio the client sent before it heard of the stop). A later request can
        only shorten the linger."""
        deadline = time.monotonic() + linger_s
        if self.stop_code is None:
            self.stop_code, self.close_reason, self.stop_deadline = code, reason, deadline
            self._interrupt()
        else:
            self.stop_deadline = min(self.stop_deadline, deadline)

    async def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next ASGI message, or None after `timeout` s or as soon as a stop is requested during this call (a
        message that came meanwhile is returned, never lost: cancelling a pending receive is safe in uvicorn's
        implementations). Errors as from `WebSocket.receive`.

        Called for every audio frame (50 a second per stream), so it is cheap: the receive is awaited directly in
        the handler's task, and `_interrupt` ends it by cancelling that task, the way `asyncio.timeout` does (the
        cancellation lands inside this await, is taken back with `uncancel` and becomes None), without a task, a
        timer, a wait or a timeout object per frame. One timer per client wakes it at its deadline, re-armed only
        when it fires early (a frame's deadline is almost always later than the previous one's)."""
        self._receive_deadline = self._loop.time() + timeout
        if self._timer is None or self._timer.when() > self._receive_deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._receive_deadline, self._on_timer)
        self._receiving = True
        try:
            return await self.ws.receive()
        except asyncio.CancelledError:
            if not self._interrupted or self._task.uncancel() > 0:
                raise  # a real cancellation of the handler (also one that came with the interruption)
            return None
        finally:
            self._receiving = self._interrupted = False

    def _on_timer(self) -> None:
        self._timer = None
        if not self._receiving:
            return  # not receiving now: the next receive arms the timer again
        if self._loop.time() >= self._receive_deadline:
            self._interrupt()
        else:
            self._timer = self._loop.call_at(self._receive_deadline, self._on_timer)

    def _interrupt(self) -> None:
        """Ends the receive in progress, if any, with None. Only ever called from other tasks and callbacks (while
        a receive is in progress its own task is suspended in it)."""
        if self._receiving and not self._interrupted:
            self._interrupted = True
            self._task.cancel()
