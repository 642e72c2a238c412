"""The webhooks package's parts without the delivery engine: signing (against an independent HMAC), the URL policy,
labelled metrics, the user's webhook settings over a real SQLite store, and the stream tap's exact chunking.
The delivery engine against real local HTTP receivers is in test_webhook_dispatch.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

import metrics
from config import Settings
from storage.sqlite import SqliteStorage
from webhooks import signing
from webhooks.breaker import CircuitBreakers, breaker_key
from webhooks.targets import PublicHosts, WebhookUrlError, check_url, parse_audio_url, resolve_public
from webhooks.types import Target, WebhookType
from webhooks.user_webhooks import ROTATION_GRACE_S, UserWebhooks

# -- signing ---------------------------------------------------------------------------------------------------------

SECRET = "whsec_test-secret-0123456789"
OLD_SECRET = "whsec_previous-secret-abcdef"
UID = "user-äöü 1"
T = 1_700_000_000


def independent_hmac(secret: str, t: int, uid: str, body: bytes) -> str:
    message = str(t).encode() + b"." + uid.encode("utf-8") + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def test_generate_secret_has_omis_form():
    one, two = signing.generate_secret(), signing.generate_secret()
    assert one.startswith("whsec_") and two.startswith("whsec_") and one != two
    assert len(one) == len("whsec_") + 43  # 32 bytes, URL-safe base64 without padding


def test_encode_json_is_compact_utf8_and_refuses_nan():
    assert signing.encode_json({"a": [1, "ü"], "b": None}) == '{"a":[1,"ü"],"b":null}'.encode()
    with pytest.raises(ValueError):
        signing.encode_json({"x": float("nan")})


def test_sign_matches_an_independent_hmac_with_both_secrets_in_order():
    body = signing.encode_json({"segments": [{"id": "s1", "text": "héllo"}], "session_id": UID})
    header = signing.sign(body, [SECRET, OLD_SECRET], UID, timestamp=T)
    assert header == (f"t={T},v1={independent_hmac(SECRET, T, UID, body)},"
                      f"v1={independent_hmac(OLD_SECRET, T, UID, body)}")
    with pytest.raises(ValueError):
        signing.sign(body, [], UID)


def test_signature_headers_signed_and_unsigned():
    body = b"\x00\x01raw pcm"
    signed = signing.signature_headers(body, [SECRET], uid=UID, event="audio_bytes", delivery_id="d1", timestamp=T)
    assert signed == {"X-Omi-Event": "audio_bytes", "X-Omi-Delivery": "d1", "Idempotency-Key": "d1",
                      "X-Omi-Signature": f"t={T},v1={independent_hmac(SECRET, T, UID, body)}"}
    unsigned = signing.signature_headers(body, [], uid=UID, event="audio_bytes", delivery_id="d2")
    assert unsigned == {"X-Omi-Event": "audio_bytes", "X-Omi-Delivery": "d2", "Idempotency-Key": "d2"}


def test_verify_accepts_the_real_thing_and_refuses_every_change():
    body = b'{"summary":"a day","uid":"u"}'
    headers = {"x-omi-signature": signing.sign(body, [SECRET, OLD_SECRET], UID, timestamp=T)}  # any header case
    assert signing.verify(headers, body, SECRET, UID, now=T + 10)
    assert signing.verify(headers, body, OLD_SECRET, UID, now=T - 10)  # the previous secret, during its grace
    assert signing.verify(headers, bytearray(body), SECRET, UID, now=T)
    changed = bytearray(body)
    changed[3] ^= 1
    assert not signing.verify(headers, bytes(changed), SECRET, UID, now=T)
    assert not signing.verify(headers, body, SECRET, "another-user", now=T)
    assert not signing.verify(headers, body, "whsec_wrong", UID, now=T)
    assert not signing.verify(headers, body, SECRET, UID, now=T + 301)
    assert not signing.verify(headers, body, SECRET, UID, now=T - 301)
    assert signing.verify(headers, body, SECRET, UID, tolerance_s=1000, now=T + 301)


@pytest.mark.parametrize("header", [
    "", "garbage", "t=,v1=00", "t=abc,v1=00", f"t={T}", f"v1={'0' * 64}", f"t={T},v1=", f"t={T},v2=abc",
    f"t={T},v1=ünïcode", f"t=-{T},v1=00", f"t={T}\x00,v1=00", "t=１２３,v1=00", "t=" + "9" * 400 + ",v1=00",
])
def test_verify_malformed_headers_are_false_never_an_exception(header):
    assert signing.verify({"X-Omi-Signature": header}, b"{}", SECRET, UID, now=T) is False


def test_verify_malformed_arguments_are_false():
    good = {"X-Omi-Signature": signing.sign(b"{}", [SECRET], UID, timestamp=T)}
    assert signing.verify({}, b"{}", SECRET, UID, now=T) is False
    assert signing.verify(good, "{}", SECRET, UID, now=T) is False  # a str body was re-serialised: refused
    assert signing.verify(good, b"{}", "", UID, now=T) is False
    assert signing.verify(good, b"{}", None, UID, now=T) is False  # type: ignore[arg-type]
    assert signing.verify({"X-Omi-Signature": None}, b"{}", SECRET, UID, now=T) is False  # type: ignore[dict-item]
    assert signing.verify(good, b"{}", SECRET, "\ud800", now=T) is False  # a lone surrogate cannot be encoded
    assert signing.verify(good, b"{}", SECRET, UID, now=float("nan")) is False


# -- URL policy ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://example.com/hook", "http://example.com:8080/a/b?token=x", "https://8.8.8.8/x", "https://[2001:4860::8888]/",
    "https://user:pw@example.com/p", "https://example.com/a,b",
])
def test_check_url_accepts_public_urls(url):
    assert check_url(url, allow_private=False) == url


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "http://127.1/x", "http://2130706433/", "http://0x7f.1/", "http://10.0.0.5/",
    "http://192.168.1.1/", "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data", "http://100.64.0.1/",
    "http://0.0.0.0/", "http://[::1]/", "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/",
    "http://[fe80::1%25eth0]/", "http://[fc00::1]/", "http://[ff02::1]/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://255.255.255.255/", "http://[2002:7f00:1::]/", "http://[64:ff9b::a00:1]/", "http://localhost:8080/",
    "http://LOCALHOST./", "http://api.localhost/x",
])
def test_check_url_refuses_non_public_hosts_unless_allowed(url):
    with pytest.raises(WebhookUrlError, match="address|localhost"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize(("url", "why"), [
    ("", "empty"), ("ftp://example.com/x", "http"), ("file:///etc/passwd", "http"), ("example.com/x", "http"),
    ("https:///path", "no host"), ("https://exa mple.com/", "whitespace"), ("https://example.com/\n", "whitespace"),
    ("https://example.com/\x00", "control"), ("https://example.com/\u200b", "control"),
    ("https://example.com/" + "a" * 2048, "2048"), ("https://example.com:99999/", "valid"), ("http://[::1/", "valid"),
])
def test_check_url_refuses_malformed_urls(url, why):
    with pytest.raises(WebhookUrlError, match=why):
        check_url(url, allow_private=True)


def test_check_url_errors_never_repeat_query_or_credentials():
    for url in ("http://alice:hunter2@127.0.0.1/x?token=SECRET", "ftp://alice:hunter2@example.com/?token=SECRET",
                "https://alice:hunter2@example.com/ x?token=SECRET"):
        with pytest.raises(WebhookUrlError) as info:
            check_url(url, allow_private=False)
        assert "SECRET" not in str(info.value) and "hunter2" not in str(info.value)
    assert issubclass(WebhookUrlError, ValueError)


def test_check_url_refuses_non_strings():
    with pytest.raises(WebhookUrlError):
        check_url(None, allow_private=True)  # type: ignore[arg-type]


async def test_resolve_public_refuses_names_that_resolve_to_private_addresses():
    with pytest.raises(WebhookUrlError, match="private"):
        await resolve_public("localhost", 80)  # a name, resolved: the check a literal-only policy would miss
    with pytest.raises(WebhookUrlError):
        await resolve_public("127.0.0.1", 80)
    with pytest.raises(WebhookUrlError):
        await resolve_public("169.254.169.254", 80)
    await resolve_public("8.8.8.8", 443)  # a literal resolves without the network
    with pytest.raises(OSError):
        await resolve_public("no-such-host.invalid", 80)


async def test_resolve_public_refuses_when_any_address_is_private(monkeypatch):
    """A name with one public and one private address is refused (the client might connect to either)."""
    loop = asyncio.get_running_loop()
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 443))]

    async def fake_getaddrinfo(host, port, **kwargs):  # stands in for DNS, which the test machine has no access to
        return answers

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(WebhookUrlError):
        await resolve_public("mixed.example", 443)
    answers.pop()
    await resolve_public("mixed.example", 443)


def test_parse_audio_url():
    assert parse_audio_url("https://x/y,5", 5, 60) == ("https://x/y", 5)
    assert parse_audio_url("https://x/y,60", 5, 60) == ("https://x/y", 60)
    assert parse_audio_url("https://x/y", 7, 60) == ("https://x/y", 7)
    assert parse_audio_url("https://x/y,", 7, 60) == ("https://x/y", 7)  # the app's form with no seconds typed
    assert parse_audio_url("https://x/a,b/c,12", 5, 60) == ("https://x/a,b/c", 12)
    for bad in ("https://x/y,0", "https://x/y,61", "https://x/y,abc", "https://x/y,-3", "https://x/y,1.5",
                "https://x/y,５"):
        with pytest.raises(WebhookUrlError, match="1 to 60"):
            parse_audio_url(bad, 5, 60)


# -- labelled metrics ------------------------------------------------------------------------------------------------


def test_labelled_counters_add_lines_and_keep_the_unlabelled_output():
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples(metrics.prometheus_text())
    metrics.register("test_webhooks_events_total", "a test counter")
    metrics.register("test_webhooks_events_total", "registering twice is harmless")
    start = metrics.value("test_webhooks_events_total", type="a", outcome="ok")
    metrics.inc("test_webhooks_events_total", type="a", outcome="ok")
    metrics.inc("test_webhooks_events_total", 2.5, outcome="ok", type="a")  # label order does not matter
    metrics.inc("test_webhooks_events_total", type='we"ird\\', outcome="x\ny")
    assert metrics.value("test_webhooks_events_total", type="a", outcome="ok") == start + 3.5
    text = metrics.prometheus_text()
    assert "# TYPE omi_test_webhooks_events_total counter" in text
    after = samples(text)  # the text parses back: odd label values are escaped
    assert after[("omi_test_webhooks_events_total", (("outcome", "ok"), ("type", "a")))] == start + 3.5
    assert after[("omi_test_webhooks_events_total", (("outcome", "x\ny"), ("type", 'we"ird\\')))] == 1
    for key in before:  # every unlabelled fault counter is still there
        if key[0].startswith("omi_stt_"):
            assert key in after, key
    with pytest.raises(KeyError):
        metrics.inc("no_such_metric_total", type="a")
    with pytest.raises(KeyError):
        metrics.inc("stt_reconnects_total", type="a")  # an unlabelled metric takes no labels
    with pytest.raises(ValueError):
        metrics.register("stt_reconnects_total", "clash")
    unlabelled = metrics.value("stt_reconnects_total")
    metrics.inc("stt_reconnects_total", 0)
    assert metrics.value("stt_reconnects_total") == unlabelled
    assert "test_webhooks_events_total" not in metrics.snapshot()


def test_signing_vectors_roundtrip_through_json():
    payload = {"summary": "ünï\u2028code", "uid": UID, "created_at": "2024-01-01T00:00:00"}
    body = signing.encode_json(payload)
    assert json.loads(body) == payload
    header = signing.sign(body, [SECRET], UID, timestamp=T)
    assert header.split(",v1=")[1] == independent_hmac(SECRET, T, UID, body)


# -- the user's webhook settings, over a real SQLite store -----------------------------------------------------------

ALL_OFF = {"memory_created": False, "realtime_transcript": False, "audio_bytes": False, "day_summary": False}


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hook_settings(**overrides) -> Settings:
    values = {"webhook_allow_private": False, "webhook_settings_cache_s": 60.0, "webhook_audio_default_s": 5,
              "webhook_audio_max_s": 60} | overrides
    return Settings(_env_file=None, **values)


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[SqliteStorage]:
    db = SqliteStorage(tmp_path / "webhooks.sqlite3")
    await db.open()
    try:
        yield db
    finally:
        await db.close()


async def test_urls_status_and_targets(store):
    clock = Clock()
    hooks = UserWebhooks(store, hook_settings(), clock=clock)
    assert await hooks.status("u1") == ALL_OFF
    assert await hooks.get_url("u1", WebhookType.memory_created) == ""
    assert await hooks.target("u1", WebhookType.memory_created) is None

    await hooks.set_url("u1", WebhookType.memory_created, "https://example.com/memories?token=t")
    await hooks.set_url("u1", WebhookType.audio_bytes, "https://example.com/audio,12")
    assert await hooks.get_url("u1", WebhookType.audio_bytes) == "https://example.com/audio,12"  # as the user set it
    assert await hooks.status("u1") == ALL_OFF | {"memory_created": True, "audio_bytes": True}  # never switched
    assert await hooks.target("u1", WebhookType.memory_created) == Target("https://example.com/memories?token=t")
    assert await hooks.target("u1", WebhookType.audio_bytes) == Target("https://example.com/audio",
                                                                       audio_interval_s=12)

    await hooks.set_enabled("u1", WebhookType.memory_created, False)  # an explicit switch wins
    assert (await hooks.status("u1"))["memory_created"] is False
    assert await hooks.target("u1", WebhookType.memory_created) is None
    assert await hooks.get_url("u1", WebhookType.memory_created) == "https://example.com/memories?token=t"
    await hooks.set_url("u1", WebhookType.memory_created, "https://example.com/other")  # a new URL keeps the switch
    assert (await hooks.status("u1"))["memory_created"] is False
    await hooks.set_enabled("u1", WebhookType.memory_created, True)
    assert await hooks.target("u1", WebhookType.memory_created) == Target("https://example.com/other")

    await hooks.set_enabled("u1", WebhookType.day_summary, True)  # on without a URL: Omi says on, nothing is sent
    assert (await hooks.status("u1"))["day_summary"] is True
    assert await hooks.target("u1", WebhookType.day_summary) is None

    for cleared in ("", ","):  # Omi's app clears with either; the URL reads back as it was sent
        await hooks.set_url("u1", WebhookType.audio_bytes, cleared)
        assert await hooks.get_url("u1", WebhookType.audio_bytes) == cleared
        assert (await hooks.status("u1"))["audio_bytes"] is False
        assert await hooks.target("u1", WebhookType.audio_bytes) is None

    await hooks.set_url("u1", WebhookType.audio_bytes, "https://example.com/audio")
    assert (await hooks.status("u1"))["audio_bytes"] is False  # cleared = disabled, until switched on again
    await hooks.set_enabled("u1", WebhookType.audio_bytes, True)
    assert await hooks.target("u1", WebhookType.audio_bytes) == Target("https://example.com/audio",
                                                                       audio_interval_s=5)  # the default
    assert await hooks.status("u2") == ALL_OFF  # another user sees none of it

    again = UserWebhooks(store, hook_settings())  # what was stored, read by a fresh process
    assert await again.status("u1") == await hooks.status("u1")
    assert await again.target("u1", WebhookType.audio_bytes) == Target("https://example.com/audio",
                                                                       audio_interval_s=5)


async def test_set_url_refuses_bad_urls_and_keeps_the_old_one(store):
    hooks = UserWebhooks(store, hook_settings())
    await hooks.set_url("u1", WebhookType.realtime_transcript, "https://example.com/live")
    for bad, why in (("http://127.0.0.1:9/x", "address"), ("http://169.254.169.254/", "address"),
                     ("ftp://example.com/", "http"), ("not a url", "whitespace"), ("https://localhost/", "localhost")):
        with pytest.raises(WebhookUrlError, match=why):
            await hooks.set_url("u1", WebhookType.realtime_transcript, bad)
    with pytest.raises(WebhookUrlError, match="1 to 60"):
        await hooks.set_url("u1", WebhookType.audio_bytes, "https://example.com/a,61")
    with pytest.raises(WebhookUrlError, match="address"):
        await hooks.set_url("u1", WebhookType.audio_bytes, "http://10.0.0.1/a,5")  # the URL part is checked too
    with pytest.raises(ValueError):
        await hooks.set_url("u1", "no_such_type", "https://example.com/")  # type: ignore[arg-type]
    assert await hooks.get_url("u1", WebhookType.realtime_transcript) == "https://example.com/live"
    assert await hooks.get_url("u1", WebhookType.audio_bytes) == ""

    private = UserWebhooks(store, hook_settings(webhook_allow_private=True))
    await private.set_url("u1", WebhookType.audio_bytes, "http://127.0.0.1:9/a,3")  # allowed by WEBHOOK_ALLOW_PRIVATE
    assert await private.target("u1", WebhookType.audio_bytes) == Target("http://127.0.0.1:9/a", audio_interval_s=3)


async def test_signing_secret_rotation_keeps_the_previous_one_24_hours(store):
    clock = Clock()
    hooks = UserWebhooks(store, hook_settings(), clock=clock)
    await hooks.set_url("u1", WebhookType.day_summary, "https://example.com/day")
    assert await hooks.secret_status("u1") == {"configured": False}
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == ()

    first = await hooks.issue_secret("u1")
    assert first["secret"].startswith("whsec_")
    assert first["created_at"] == datetime.fromtimestamp(clock.now, UTC) and first["previous_valid_until"] is None
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == (first["secret"],)
    status = await hooks.secret_status("u1")
    assert status == {"configured": True, "created_at": first["created_at"], "previous_valid_until": None}
    assert first["secret"] not in repr(status)

    clock.now += 3600
    second = await hooks.issue_secret("u1")
    assert second["secret"] != first["secret"]
    assert second["previous_valid_until"] == datetime.fromtimestamp(clock.now + ROTATION_GRACE_S, UTC)
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == (second["secret"], first["secret"])
    assert (await hooks.secret_status("u1"))["previous_valid_until"] == second["previous_valid_until"]

    clock.now += ROTATION_GRACE_S - 1  # still inside the grace window
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == (second["secret"], first["secret"])
    clock.now += 1  # the window is over: only the new secret signs
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == (second["secret"],)

    third = await hooks.issue_secret("u1")  # rotating again: the previous is the one that was current
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == (third["secret"], second["secret"])

    await hooks.delete_secret("u1")
    assert await hooks.secret_status("u1") == {"configured": False}
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == ()
    again = await hooks.issue_secret("u1")  # after a delete, a fresh start: nothing previous
    assert again["previous_valid_until"] is None
    assert (await hooks.target("u1", WebhookType.day_summary)).secrets == (again["secret"],)


async def test_settings_cache_expires_is_invalidated_by_writes_and_is_bounded(store):
    reader = UserWebhooks(store, hook_settings(webhook_settings_cache_s=0.3), cache_users=2)
    writer = UserWebhooks(store, hook_settings())  # another replica
    await writer.set_url("u1", WebhookType.memory_created, "https://example.com/a")
    assert await reader.get_url("u1", WebhookType.memory_created) == "https://example.com/a"
    await writer.set_url("u1", WebhookType.memory_created, "https://example.com/b")
    assert await reader.get_url("u1", WebhookType.memory_created) == "https://example.com/a"  # cached
    await asyncio.sleep(0.35)
    assert await reader.get_url("u1", WebhookType.memory_created) == "https://example.com/b"  # re-read
    await reader.set_url("u1", WebhookType.memory_created, "https://example.com/c")  # its own write: seen at once
    assert await reader.get_url("u1", WebhookType.memory_created) == "https://example.com/c"

    for uid in ("u2", "u3", "u4"):
        await reader.status(uid)
    assert len(reader._cache) == 2 and "u1" not in reader._cache  # least recently used dropped


async def test_settings_reads_fall_back_to_the_last_ones_when_storage_fails(tmp_path):
    store = SqliteStorage(tmp_path / "closing.sqlite3")
    await store.open()
    hooks = UserWebhooks(store, hook_settings(webhook_settings_cache_s=0.05))
    await hooks.set_url("u1", WebhookType.memory_created, "https://example.com/a")
    assert await hooks.target("u1", WebhookType.memory_created) is not None
    await asyncio.sleep(0.06)
    await store.close()  # storage goes away
    assert await hooks.target("u1", WebhookType.memory_created) == Target("https://example.com/a")
    with pytest.raises(Exception):  # noqa: B017 - a user never read: the storage error itself
        await hooks.target("u9", WebhookType.memory_created)


# -- the remembered public hosts, the circuit breaker ----------------------------------------------------------------


async def test_public_hosts_are_remembered_briefly_and_refusals_never(monkeypatch):
    loop = asyncio.get_running_loop()
    answers = {"hooks.example.com": "93.184.216.34"}
    lookups: list[str] = []

    async def fake_getaddrinfo(host, port, **kwargs):  # stands in for DNS (none here)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    clock = Clock(0.0)
    hosts = PublicHosts(ttl_s=10.0, max_hosts=2, clock=clock)
    await hosts.check("hooks.example.com", 443)
    await hosts.check("HOOKS.example.com", 443)
    assert lookups == ["hooks.example.com"]  # remembered
    answers["hooks.example.com"] = "127.0.0.1"  # the name now points inside
    clock.now = 10.0
    with pytest.raises(WebhookUrlError):
        await hosts.check("hooks.example.com", 443)  # looked up again once the memory is over: refused
    with pytest.raises(WebhookUrlError):
        await hosts.check("hooks.example.com", 443)  # a refusal is not remembered as public
    assert len(lookups) == 3
    for i in range(3):
        answers[f"h{i}.example.com"] = "8.8.8.8"
        await hosts.check(f"h{i}.example.com", 443)
    assert len(hosts._public) == 2  # bounded


def test_breaker_opens_after_failures_in_a_row_and_half_opens_once():
    clock = Clock(0.0)
    breakers = CircuitBreakers(3, 30.0, max_urls=2, clock=clock)
    key = breaker_key("https://Example.com/hook?token=a")
    assert key == breaker_key("https://example.com:443/hook?token=b") == "https://example.com:443/hook"
    for _ in range(2):
        assert breakers.allow(key) == "closed"
        breakers.record(key, False)
    breakers.record(key, True)  # a success in between: the count starts again
    for _ in range(3):
        breakers.record(key, False)
    assert breakers.allow(key) is None and breakers.is_open(key)
    clock.now = 30.0
    assert breakers.allow(key) == "trial"
    assert breakers.allow(key) is None  # one trial at a time
    breakers.record(key, False)  # a delivery that started before it opened: not the trial's verdict
    assert breakers.allow(key) is None
    breakers.release(key)  # the trial never reached the receiver (refused, cancelled): another may try
    clock.now = 60.0
    assert breakers.allow(key) == "trial"
    breakers.record(key, False, trial=True)  # the trial failed: open again for the full time
    clock.now = 89.0
    assert breakers.allow(key) is None
    clock.now = 90.0
    assert breakers.allow(key) == "trial"
    breakers.record(key, True, trial=True)
    assert breakers.allow(key) == "closed" and breakers.allow(key) == "closed" and not breakers.is_open(key)
    for name in ("a", "b"):
        breakers.record(breaker_key(f"https://{name}.example.com/"), False)
    assert len(breakers._states) == 2  # bounded
