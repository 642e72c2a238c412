"""Which URLs a webhook may point at.

`check_url` runs when a user sets a URL and before every delivery attempt: http(s) only, a host, no whitespace or
control characters, and (unless WEBHOOK_ALLOW_PRIVATE) no literal address or localhost name that is not globally
routable. `resolve_public` runs at send time, because a public-looking name can resolve to 127.0.0.1, 10.x or the
cloud metadata address 169.254.169.254: the server-side request forgery this policy exists to stop.
Error messages are safe to show the user: they never repeat the URL's query string or user info.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit

from notify import redact_url

__all__ = ["PublicHosts", "WebhookUrlError", "check_url", "parse_audio_url", "redact_url", "resolve_public",
           "url_host_port"]

MAX_URL_CHARS = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")  # 127.1, 0x7f.1, 2130706433: what inet_aton (and resolvers) accept
_SECONDS = re.compile(r"[0-9]{1,6}")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookUrlError(ValueError):
    """A webhook URL that is refused; the message is safe to show (no query string, no credentials)."""


def _embedded_ipv4(ip: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64), which is where packets really go."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IpAddress) -> bool:
    """Globally routable: not private, loopback, link-local, multicast, reserved, unspecified, shared (CGNAT)..."""
    if not ip.is_global or ip.is_multicast:  # is_global alone counts some multicast ranges as global
        return False
    embedded = _embedded_ipv4(ip)
    return embedded is None or is_public_address(embedded)


def _literal_address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def url_host_port(url: str) -> tuple[str, int]:
    """The host and port a URL connects to (default 80/443); WebhookUrlError when there is none."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise WebhookUrlError("the webhook URL is not a valid URL") from None
    if not host:
        raise WebhookUrlError("the webhook URL has no host")
    return host, port or (443 if parts.scheme.lower() == "https" else 80)


def check_url(url: str, allow_private: bool) -> str:
    """`url` itself when it is an acceptable webhook URL; WebhookUrlError (message safe to show) otherwise."""
    if not isinstance(url, str) or not url:
        raise WebhookUrlError("the webhook URL is empty")
    if len(url) > MAX_URL_CHARS:
        raise WebhookUrlError(f"the webhook URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise WebhookUrlError("the webhook URL contains whitespace or control characters")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise WebhookUrlError("the webhook URL is not a valid URL") from None
    if scheme not in ("http", "https"):
        raise WebhookUrlError("the webhook URL must start with http:// or https://")
    host, _ = url_host_port(url)
    if allow_private:
        return url
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        raise WebhookUrlError("the webhook URL points at this machine (localhost)")
    ip = _literal_address(name.partition("%")[0] if ":" in name else name)
    if ip is not None and not is_public_address(ip):
        raise WebhookUrlError("the webhook URL points at a private, loopback, link-local or reserved address")
    return url


async def resolve_public(host: str, port: int) -> None:
    """Resolve `host` without blocking the event loop; WebhookUrlError when ANY address it has is not public.
    A failed lookup raises OSError (socket.gaierror): a network error, retried like one."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for the webhook host (port {port})")
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0]).partition("%")[0]
        if not is_public_address(ipaddress.ip_address(address)):
            raise WebhookUrlError("the webhook host resolves to a private, loopback, link-local or reserved address")


class PublicHosts:
    """`resolve_public` with a short memory of hosts found public, so a user's stream of requests (a transcript
    batch a second, audio every few seconds) does not cost a lookup each on the event loop's default thread pool,
    which the streams use too. Refusals are not remembered (each delivery to one is refused again)."""

    def __init__(self, ttl_s: float = 10.0, max_hosts: int = 10_000, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.ttl_s = ttl_s  # would be a setting (WEBHOOK_RESOLVE_CACHE_S); a host's DNS may change within it
        self.max_hosts = max_hosts
        self.clock = clock
        self._public: OrderedDict[tuple[str, int], float] = OrderedDict()  # (host, port) → until when

    async def check(self, host: str, port: int) -> None:
        key = (host.lower(), port)
        until = self._public.get(key)
        if until is not None and self.clock() < until:
            return
        await resolve_public(host, port)
        self._public[key] = self.clock() + self.ttl_s
        self._public.move_to_end(key)
        while len(self._public) > self.max_hosts:
            self._public.popitem(last=False)


def parse_audio_url(raw: str, default_s: int, max_s: int) -> tuple[str, int]:
    """Omi's stored audio_bytes form "https://x/y,5": (URL, seconds per request). No suffix or an empty one:
    `default_s`; a suffix that is not a whole number in 1..max_s: WebhookUrlError."""
    if not isinstance(raw, str):
        raise WebhookUrlError("the webhook URL must be a string")
    url, sep, suffix = raw.rpartition(",")
    if not sep:
        return raw, default_s
    suffix = suffix.strip()
    if not suffix:
        return url, default_s
    if not _SECONDS.fullmatch(suffix) or not 1 <= int(suffix) <= max_s:
        raise WebhookUrlError(f"the audio interval after the comma must be a whole number of seconds, 1 to {max_s}")
    return url, int(suffix)
