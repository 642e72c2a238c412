"""Process-wide counters, served as Prometheus text at `GET /metrics`.

Counters are aggregates over all streams (no per-stream state lives here). Names follow Prometheus conventions:
`_total` for counters, `_seconds` for durations. Increment from the event loop or from worker threads: a lock keeps
the arithmetic exact.

Labelled counters (`register(name, help_text)`, then `inc(name, amount, type="x", outcome="y")`) are kept apart from
the fixed, unlabelled ones above so their output and `snapshot()` stay as they were; each label set seen is one
sample line `omi_name{outcome="y",type="x"} n` (label names sorted).
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

LabelSet = tuple[tuple[str, str], ...]
_LABELLED_HELP: dict[str, str] = {}  # filled by register()
_labelled: dict[str, dict[LabelSet, float]] = {}


def register(name: str, help_text: str) -> None:
    """Declare a labelled counter (idempotent: a module may be imported more than once)."""
    if name in _HELP:
        raise ValueError(f"{name} is an unlabelled metric")
    with _lock:
        _LABELLED_HELP.setdefault(name, help_text)
        _labelled.setdefault(name, {})


def _label_set(labels: dict[str, str]) -> LabelSet:
    return tuple(sorted((key, str(val)) for key, val in labels.items()))


def inc(name: str, amount: float = 1.0, **labels: str) -> None:
    if name in _HELP and not labels:
        with _lock:
            _values[name] += amount
        return
    if name not in _LABELLED_HELP:
        raise KeyError(f"unknown metric {name}" if name not in _HELP else f"metric {name} takes no labels")
    key = _label_set(labels)
    with _lock:
        samples = _labelled[name]
        samples[key] = samples.get(key, 0.0) + amount


def value(name: str, **labels: str) -> float:
    with _lock:
        if name in _HELP and not labels:
            return _values[name]
        return _labelled[name].get(_label_set(labels), 0.0)


def snapshot() -> dict[str, float]:
    with _lock:
        return dict(_values)


def labelled_snapshot() -> dict[str, dict[LabelSet, float]]:
    with _lock:
        return {name: dict(samples) for name, samples in _labelled.items()}


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labelled_lines() -> list[str]:
    lines = []
    for name, samples in labelled_snapshot().items():
        lines += [f"# HELP omi_{name} {_LABELLED_HELP[name]}", f"# TYPE omi_{name} counter"]
        for key, amount in sorted(samples.items()):
            text = ",".join(f'{label}="{_escape(val)}"' for label, val in key)
            lines.append(f"omi_{name}{{{text}}} {amount:g}" if text else f"omi_{name} {amount:g}")
    return lines


def prometheus_text(gauges: dict[str, tuple[float, str]] | None = None) -> str:
    lines = []
    for name, amount in snapshot().items():
        lines += [f"# HELP omi_{name} {_HELP[name]}", f"# TYPE omi_{name} counter", f"omi_{name} {amount:g}"]
    lines += _labelled_lines()
    for name, (amount, help_text) in (gauges or {}).items():
        lines += [f"# HELP omi_{name} {help_text}", f"# TYPE omi_{name} gauge", f"omi_{name} {amount:g}"]
    return "\n".join(lines) + "\n"


router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics_endpoint(request: Request) -> PlainTextResponse:
    st = request.app.state
    gauges = {"active_streams": (float(getattr(st, "active_streams", 0)), "open /v4/listen streams")}
    webhooks = getattr(st, "webhooks", None)
    if webhooks is not None:
        gauges["webhook_queued"] = (float(webhooks.queued()), "developer-webhook deliveries waiting or in flight")
    return PlainTextResponse(prometheus_text(gauges))
