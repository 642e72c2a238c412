"""The server's REST endpoints as the CLI calls them: one httpx request each, every failure a `CliError`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from omi_cli.errors import NOT_FOUND, UNREACHABLE, CliError, code_for_status

TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=10.0)  # a long file's VAD takes minutes


def headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def ws_url(base: str, path: str) -> str:
    """`http://host:port` (or ws://) -> `ws://host:port<path>`; https -> wss."""
    base = base.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            return ws + base[len(http):] + path
    if base.startswith(("ws://", "wss://")):
        return base + path
    return "ws://" + base + path


def http_url(base: str, path: str) -> str:
    base = base.rstrip("/")
    for ws, http in (("wss://", "https://"), ("ws://", "http://")):
        if base.startswith(ws):
            base = http + base[len(ws):]
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    return base + path


def detail_of(response: httpx.Response) -> str:
    """The server's JSON `detail` (a string, or FastAPI's list of validation errors), else the status line."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail) if detail else f"HTTP {response.status_code} {response.reason_phrase}"


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", NOT_FOUND) from exc


def request(method: str, base: str, path: str, token: str | None, **kwargs: Any) -> Any:
    """Sends one request; returns the JSON answer. Raises CliError with the server's `detail` and an exit code."""
    url = http_url(base, path)
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            response = client.request(method, url, headers=headers(token), **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"no server answers at {http_url(base, '')}: {exc}", UNREACHABLE) from exc
    if response.status_code >= 400:
        retry = response.headers.get("Retry-After")
        hint = f" (retry after {retry} s)" if retry else ""
        raise CliError(f"{method} {path}: {detail_of(response)}{hint}", code_for_status(response.status_code))
    try:
        return response.json()
    except json.JSONDecodeError as exc:
        raise CliError(f"{method} {path}: the answer is not JSON") from exc
