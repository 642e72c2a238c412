"""Process-wide counters, served as Prometheus text at `GET /metrics`.

Counters are aggregates over all streams (no per-stream state lives here). Names follow Prometheus conventions:
`_total` for counters, `_seconds` for durations. Increment from the event loop or from worker threads: a lock keeps
the arithmetic exact.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

_HELP: dict[str, str] = {
    "stt_reconnects_total": "STT connections re-opened after the upstream service dropped one",
    "stt_reconnect_failures_total": "attempts to re-open an STT connection that failed",
    "stt_replayed_seconds_total": "seconds of unacknowledged speech sent again after a reconnect",
    "stt_buffer_overflow_seconds_total": "seconds of speech dropped because the STT replay buffer was full",
    "stt_gave_up_total": "streams closed because the STT service stayed unreachable",
    "stt_lost_seconds_total": "seconds of speech never transcribed because the STT service stayed unreachable",
    "storage_write_failures_total": "segment writes that failed and were kept in memory for a retry",
    "storage_segments_retried_total": "segments written on a retry after storage came back",
    "storage_segments_lost_total": "segments that could not be written before their stream ended",
    "ws_messages_dropped_total": "messages to a client that could not keep up (only pings and repeated updates)",
    "ws_slow_clients_closed_total": "streams closed because the client stopped reading its messages",
}

_lock = threading.Lock()
_values: dict[str, float] = dict.fromkeys(_HELP, 0.0)


def inc(name: str, amount: float = 1.0) -> None:
    if name not in _HELP:
        raise KeyError(f"unknown metric {name}")
    with _lock:
        _values[name] += amount


def value(name: str) -> float:
    with _lock:
        return _values[name]


def snapshot() -> dict[str, float]:
    with _lock:
        return dict(_values)


def prometheus_text(gauges: dict[str, tuple[float, str]] | None = None) -> str:
    lines = []
    for name, amount in snapshot().items():
        lines += [f"# HELP omi_{name} {_HELP[name]}", f"# TYPE omi_{name} counter", f"omi_{name} {amount:g}"]
    for name, (amount, help_text) in (gauges or {}).items():
        lines += [f"# HELP omi_{name} {help_text}", f"# TYPE omi_{name} gauge", f"omi_{name} {amount:g}"]
    return "\n".join(lines) + "\n"


router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics_endpoint(request: Request) -> PlainTextResponse:
    st = request.app.state
    gauges = {"active_streams": (float(getattr(st, "active_streams", 0)), "open /v4/listen streams")}
    return PlainTextResponse(prometheus_text(gauges))
