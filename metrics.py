"""Process-wide metrics on prometheus-client, served at `GET /metrics` in Prometheus' text format.

Aggregates over all streams: no per-stream state, and no label that grows with users (no uid, no stream id): labels
are bounded sets (STT backend, model, lane, endpoint, webhook type and outcome). Everything lives in one
`REGISTRY` of this process (with prometheus-client's process and platform collectors), so tests and several apps
in one process read the same numbers.

- Fault counters keep their old names and the small API the code calls (`inc(name, amount, **labels)`,
  `value`, `snapshot`, `register` for labelled ones declared by other modules).
- Histograms and counters for operators: `SEGMENT_LATENCY` (what this server adds between STT's answer and the
  segment sent), `STT_ROUND_TRIP` (a speech region's end to its transcript, per backend), `POOL_BATCH_SIZE` and
  `POOL_QUEUE_WAIT` (the shared model pool, per model and lane), `BATCH_REQUEST_SECONDS` (the batch endpoints),
  `AUDIO_RECEIVED_SECONDS` and `STT_SPEECH_SECONDS` (their ratio is what the VAD gate saves in STT cost).
- Gauges read at scrape time from the app (`collect_app_gauges`): active streams, pool saturation and queue depth,
  queued webhook deliveries.

Several uvicorn workers are several processes, each with its own registry: scrape each (the Kubernetes manifests
run one worker per pod).
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `_created` sample beside each counter: noise for every dashboard
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

PREFIX = "omi_"

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
_counters: dict[str, Counter] = {name: Counter(PREFIX + name, text, registry=REGISTRY) for name, text in _HELP.items()}
_labelled_help: dict[str, str] = {}  # declared by register(); the Counter is made at the first inc (its label names)
_labelled: dict[str, Counter] = {}

# Latency buckets (seconds) from 10 ms to 10 s: segment and STT latencies live there.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)

SEGMENT_LATENCY = Histogram(
    PREFIX + "segment_latency_seconds",
    "time this server adds to a transcript: from STT's answer to the segment handed to the client's queue "
    "(speaker tagging, storage write)", buckets=_LATENCY_BUCKETS, registry=REGISTRY)
STT_ROUND_TRIP = Histogram(
    PREFIX + "stt_round_trip_seconds",
    "from the end of a speech region sent to STT to its final transcript, per STT backend", ["backend"],
    buckets=_LATENCY_BUCKETS + (20.0, 30.0), registry=REGISTRY)
POOL_BATCH_SIZE = Histogram(
    PREFIX + "pool_batch_size", "items per model call of the shared model pool", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
POOL_QUEUE_WAIT = Histogram(
    PREFIX + "pool_queue_wait_seconds", "time a request waited in the model pool's queue before its batch ran",
    ["model"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY)
BATCH_REQUEST_SECONDS = Histogram(
    PREFIX + "batch_request_seconds", "duration of a batch endpoint's request, admitted to the answer",
    ["endpoint"], buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0), registry=REGISTRY)
AUDIO_RECEIVED_SECONDS = Counter(
    PREFIX + "audio_received_seconds_total", "seconds of audio received on live streams (decoded, all channels)",
    registry=REGISTRY)
STT_SPEECH_SECONDS = Counter(
    PREFIX + "stt_speech_seconds_total", "seconds of speech sent to STT (what the STT provider bills), per backend",
    ["backend"], registry=REGISTRY)

_ACTIVE_STREAMS = Gauge(PREFIX + "active_streams", "open /v4/listen streams", registry=REGISTRY)
_WEBHOOK_QUEUED = Gauge(PREFIX + "webhook_queued", "developer-webhook deliveries waiting or in flight",
                        registry=REGISTRY)
_POOL_SATURATION = Gauge(PREFIX + "pool_saturation", "how full a model pool queue is (0-1; live streams are "
                         "refused from 0.9 of the speaker queue)", ["model"], registry=REGISTRY)
_POOL_QUEUED = Gauge(PREFIX + "pool_queued", "requests waiting in a model pool queue", ["model"], registry=REGISTRY)

LabelSet = tuple[tuple[str, str], ...]


def register(name: str, help_text: str, labels: tuple[str, ...] | None = None) -> None:
    """Declare a labelled counter (idempotent: a module may be imported more than once). With its label names it
    is exported at once (HELP and TYPE, no sample yet), so dashboards find it before its first event; without, it
    appears at its first `inc`."""
    if name in _HELP:
        raise ValueError(f"{name} is an unlabelled metric")
    with _lock:
        _labelled_help.setdefault(name, help_text)
    if labels is not None:
        _labelled_counter(name, tuple(sorted(labels)))


def _labelled_counter(name: str, label_names: tuple[str, ...]) -> Counter:
    with _lock:
        counter = _labelled.get(name)
        if counter is None:
            counter = Counter(PREFIX + name, _labelled_help[name], label_names, registry=REGISTRY)
            _labelled[name] = counter
    if tuple(counter._labelnames) != label_names:
        raise ValueError(f"metric {name} has labels {counter._labelnames}, not {label_names}")
    return counter


def inc(name: str, amount: float = 1.0, **labels: str) -> None:
    """Thread-safe (prometheus-client locks each value)."""
    if name in _HELP and not labels:
        _counters[name].inc(amount)
        return
    if name not in _labelled_help:
        raise KeyError(f"unknown metric {name}" if name not in _HELP else f"metric {name} takes no labels")
    counter = _labelled_counter(name, tuple(sorted(labels)))
    counter.labels(**{k: str(v) for k, v in labels.items()}).inc(amount)


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(PREFIX + name, {k: str(v) for k, v in labels.items()} or None)
    return float(found) if found is not None else 0.0


def snapshot() -> dict[str, float]:
    return {name: value(name) for name in _HELP}


def labelled_snapshot() -> dict[str, dict[LabelSet, float]]:
    out: dict[str, dict[LabelSet, float]] = {name: {} for name in _labelled_help}
    for name, counter in list(_labelled.items()):
        for family in counter.collect():
            for sample in family.samples:
                if sample.name == PREFIX + name:
                    out[name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def collect_app_gauges(state: Any) -> None:
    """Sets the gauges from the app's state (`app.state`), just before a scrape."""
    _ACTIVE_STREAMS.set(float(getattr(state, "active_streams", 0)))
    webhooks = getattr(state, "webhooks", None)
    if webhooks is not None:
        _WEBHOOK_QUEUED.set(float(webhooks.queued()))
    pool = getattr(state, "pool", None)
    if pool is not None:
        stats = pool.stats()
        for model in ("speaker", "speaker_batch", "vad"):
            worker = stats.get(model)
            if isinstance(worker, dict):
                _POOL_SATURATION.labels(model=model).set(float(worker.get("saturation", 0.0)))
                _POOL_QUEUED.labels(model=model).set(float(worker.get("queued", 0)))


def prometheus_text() -> str:
    return generate_latest(REGISTRY).decode()


router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics_endpoint(request: Request) -> Response:
    collect_app_gauges(request.app.state)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
