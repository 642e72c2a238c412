"""`/metrics` after real work on a real server: the histograms and counters operators act on have samples, labels
stay bounded (no uid anywhere), and every expression of the Grafana dashboard in deploy/grafana names a metric the
server exports."""

from __future__ import annotations

import json
import re

import httpx
from conftest import REPO, SAMPLE_WAV, pcm16_frames, read_wav, stream_frames
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = REPO / "deploy" / "grafana" / "omi-server.json"
UID = "metrics-user-7f3a"


def scrape(server) -> tuple[dict[tuple[str, tuple], float], set[str]]:
    """(samples by (name, sorted labels), the metric family names exported)."""
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    samples, families = {}, set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, families


def total(samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def test_metrics_after_a_real_stream_and_a_batch_call(local_server):
    before, _ = scrape(local_server)
    frames: list[bytes | str] = [*pcm16_frames(read_wav(SAMPLE_WAV)), '{"type": "CloseStream"}']
    result = await stream_frames(f"{local_server.ws}/v4/listen?codec=pcm16&sample_rate=16000", frames,
                                 headers={"Authorization": f"Bearer {UID}"}, close=False, timeout_s=90)
    assert result.close_code == 1000 and result.segments
    r = httpx.post(f"{local_server.http}/v1/vad", files={"file": SAMPLE_WAV.open("rb")}, timeout=120)
    assert r.status_code == 200
    after, families = scrape(local_server)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert 29.0 <= grew("omi_audio_received_seconds_total") <= 31.0  # sample.wav is 30 s
    speech = grew("omi_stt_speech_seconds_total", backend="local")
    assert 5.0 < speech < 30.5  # only speech (and its padding) went to STT
    assert grew("omi_stt_round_trip_seconds_count", backend="local") >= 1
    assert grew("omi_segment_latency_seconds_count") >= 1
    assert grew("omi_segment_latency_seconds_bucket", le="+Inf") == grew("omi_segment_latency_seconds_count")
    for model in ("vad", "speaker"):
        assert grew("omi_pool_batch_size_count", model=model) >= 1, model
        assert grew("omi_pool_queue_wait_seconds_count", model=model) >= 1, model
    assert grew("omi_batch_request_seconds_count", endpoint="/v1/vad") == 1
    assert ("omi_active_streams", ()) in after
    assert total(after, "process_cpu_seconds_total") > 0 and total(after, "process_resident_memory_bytes") > 0
    for family in ("omi_webhook_deliveries", "omi_pool_saturation", "omi_stt_reconnects"):
        assert family in families, family
    # Bounded labels: nothing names a user or a stream.
    for (_, labels), _ in after.items():
        for key, value in labels:
            assert UID not in value and key not in ("uid", "user", "stream", "conversation"), (key, value)
    assert len(after) < 2000  # a label per user or per stream would grow this without bound


def test_every_dashboard_expression_names_an_exported_metric(local_server):
    _, families = scrape(local_server)
    exported = set()
    for name in families:  # a family's series: counters add _total, histograms _bucket/_sum/_count
        exported |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    functions = {"sum", "rate", "by", "histogram_quantile", "max", "le", "avg", "irate", "increase"}
    for expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^]]*\]|\"[^\"]*\"", "", expr)  # no label matchers, ranges or strings
        names = {n for n in re.findall(r"(?<![0-9.])[a-zA-Z_:][a-zA-Z0-9_:]*", bare)  # not 1e9's "e9"
                 if n not in functions and not n.startswith(("backend", "model", "endpoint", "outcome", "instance"))}
        assert names, expr
        assert names <= exported, (expr, names - exported)
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))
