"""Omi's webhook signing scheme "v1", byte-compatible with Omi's receiver helper (backend/utils/webhook_signing.py).

A signed delivery carries
    X-Omi-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=<hex, previous secret>]
over the bytes `f"{t}.{uid}.".encode() + body`, where uid is the `uid` query parameter of the request and body
the exact bytes sent. While a rotated secret is still in its grace window both secrets sign, so a receiver that has
not switched yet still verifies. JSON bodies are serialised once (`encode_json`) and sent as those bytes.
Every delivery, signed or not, also carries X-Omi-Event, X-Omi-Delivery and Idempotency-Key (the same delivery id
across retries, so a receiver can drop a repeat).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

SIGNATURE_HEADER = "X-Omi-Signature"
EVENT_HEADER = "X-Omi-Event"
DELIVERY_HEADER = "X-Omi-Delivery"
IDEMPOTENCY_HEADER = "Idempotency-Key"
VERSION = "v1"
SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


def generate_secret() -> str:
    """A new signing secret: 32 random bytes, URL-safe base64, with Omi's prefix."""
    return SECRET_PREFIX + _secrets.token_urlsafe(32)


def encode_json(payload: Any) -> bytes:
    """The bytes a JSON body is sent (and signed) as; ValueError for NaN/inf, TypeError for what JSON cannot hold."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def compute_signature(secret: str, timestamp: int, uid: str, body: bytes) -> str:
    message = f"{timestamp}.{uid}.".encode() + bytes(body)
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(body: bytes, secrets: Sequence[str], uid: str, timestamp: int | None = None) -> str:
    """The X-Omi-Signature value: `t=<ts>` then one `v1=` per secret, in the order given (current first)."""
    if not secrets:
        raise ValueError("signing needs at least one secret")
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return ",".join([f"t={ts}", *(f"{VERSION}={compute_signature(s, ts, uid, body)}" for s in secrets)])


def signature_headers(body: bytes, secrets: Sequence[str], *, uid: str, event: str, delivery_id: str,
                      timestamp: int | None = None) -> dict[str, str]:
    """The headers of one delivery attempt: event and delivery id always, the signature when there are secrets."""
    headers = {EVENT_HEADER: event, DELIVERY_HEADER: delivery_id, IDEMPOTENCY_HEADER: delivery_id}
    if secrets:
        headers[SIGNATURE_HEADER] = sign(body, secrets, uid, timestamp)
    return headers


# --- receiver side --------------------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, val in headers.items():
        if isinstance(key, str) and key.lower() == wanted:
            return val
    return None


def parse_signature(value: str) -> tuple[int | None, list[str]]:
    """(timestamp, v1 signatures) of a header value; unknown keys (v2, ...) are skipped, a bad `t` gives None."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in value.split(","):
        key, sep, item = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not (item.isascii() and item.isdigit()):
                return None, []
            timestamp = int(item)
        elif key == VERSION and item:
            signatures.append(item)
    return timestamp, signatures


def verify(headers: Mapping[str, str], body: bytes, secret: str, uid: str, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """True when X-Omi-Signature holds a v1 signature of `body` for `uid` under `secret`, made within `tolerance_s`
    of `now` (either way). `body` must be the raw bytes received. Malformed input of any kind is False, never an
    exception; the comparison is constant-time."""
    try:
        if not isinstance(body, bytes | bytearray | memoryview) or not isinstance(secret, str) or not secret:
            return False
        header = _header(headers, SIGNATURE_HEADER)
        if not isinstance(header, str) or not isinstance(uid, str):
            return False
        timestamp, signatures = parse_signature(header)
        if timestamp is None or not signatures:
            return False
        current = time.time() if now is None else now
        if not abs(current - timestamp) <= tolerance_s:  # written so that a NaN `now` or tolerance refuses
            return False
        expected = compute_signature(secret, timestamp, uid, bytes(body)).encode("ascii")
        # every candidate compared (no early exit), as bytes: a non-ASCII candidate is a mismatch, not an error
        matches = [hmac.compare_digest(expected, candidate.encode("utf-8", "replace")) for candidate in signatures]
        return any(matches)
    except (ValueError, TypeError, UnicodeError, AttributeError, OverflowError):
        return False
