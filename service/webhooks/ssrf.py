"""SSRF guard for notify_hook URLs: checked at registration and again at every connection.

The delivery-time check lives in the resolver the webhook connector uses: aiohttp connects only to the
addresses a resolver returns, so the address we checked is the address we connect to and a DNS answer
that changes between check and connect (rebinding) cannot slip through. IP literals never reach a
resolver, so `refuse_literal_host` covers them before the request is made.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from service.errors import InvalidInput
from service.redact import mask_credentials

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVE_TIMEOUT_S = 5.0
HOOK_MAX_LENGTH = 2048
# RFC 6052 NAT64 prefix: an address in it reaches the embedded IPv4 address through the translator.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class HookAddressRefused(OSError):
    """A hook host resolved to an address we refuse to connect to.

    An OSError so aiohttp reports it from the resolver as a connector error carrying this reason.
    """


def refusal_reason(address: IPAddress) -> str | None:
    """Why this address may not receive webhooks, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            reason = refusal_reason(embedded)
            return f"{reason} (embedded in {address})" if reason else None
    for attribute, label in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(address, attribute):
            return f"{address} is a {label} address"
    # Shared (100.64/10), documentation and benchmark ranges are not private yet not reachable either.
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def parse_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").replace("%25", "%"))
    except ValueError:
        return None


def refuse_literal_host(host: str) -> None:
    """Raise HookAddressRefused when host is an IP literal we refuse (names are the resolver's job)."""
    address = parse_address(host)
    if address is not None and (reason := refusal_reason(address)):
        raise HookAddressRefused(f"refused to connect: {reason}")


@functools.lru_cache(maxsize=4096)
def hook_host(url: str) -> str:
    """The circuit breaker's key: the lower-cased host of the URL, without port.

    Cached: every claimed row needs it and a task's hook URL repeats for each of its events.
    """
    try:
        return URL(url).raw_host or ""
    except ValueError:
        return ""


async def hook_refusal(url: str, *, allow_private: bool) -> str | None:
    """Why `url` may not be a notify_hook, or None: it must be an absolute http(s) URL whose host
    resolves only to public addresses (any address with `allow_private`). Registered hooks and hooks
    adopted from the relay both pass here.

    Parsed with yarl, as aiohttp parses it at delivery, so both checks see the same host.
    """
    if len(url) > HOOK_MAX_LENGTH:
        return f"longer than {HOOK_MAX_LENGTH} characters"
    try:
        parsed = URL(url)
        port = parsed.port
    except ValueError as exc:
        return f"not a valid URL ({_url_error(url, exc)})"
    host = parsed.raw_host
    if parsed.scheme not in ("http", "https") or not parsed.is_absolute() or not host:
        return "must be an absolute http:// or https:// URL"
    if port == 0:
        return "port 0 is not a port anything listens on"
    return None if allow_private else await _address_refusal(host, port)


def _url_error(url: str, error: ValueError) -> str:
    """yarl's reason, which may quote the URL's user info: told of the URL with its password masked."""
    masked = mask_credentials(url)
    if masked == url:
        return str(error)
    try:
        _ = URL(masked).port  # parsing the port is where yarl checks it
    except ValueError as masked_error:
        return str(masked_error)
    return "invalid user info"


async def _address_refusal(host: str, port: int | None) -> str | None:
    literal = parse_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(
                    host, port or 443, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                ),
                RESOLVE_TIMEOUT_S,
            )
        # UnicodeError: a name IDNA cannot encode (an empty label, one over 63 characters).
        except (OSError, TimeoutError, UnicodeError) as exc:
            return f"host {host!r} does not resolve ({exc})"
        addresses = [ip for info in infos if (ip := parse_address(str(info[4][0]).split("%")[0]))]
    for address in addresses:
        if reason := refusal_reason(address):
            return f"host {host!r} is not allowed: {reason}"
    return None


async def check_hook_url(url: str, *, allow_private: bool) -> None:
    """Registration-time check (hook_refusal), refusing with a 400 that names the field."""
    if reason := await hook_refusal(url, allow_private=allow_private):
        raise InvalidInput(f"notify_hook: {reason}", extra={"field": "notify_hook"})


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses the host if any address is disallowed."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = parse_address(result["host"].split("%")[0])
            reason = "unparseable address" if address is None else refusal_reason(address)
            if reason:
                raise HookAddressRefused(f"refused to connect to {host}: {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def webhook_connector(*, allow_private: bool, limit: int) -> aiohttp.TCPConnector:
    resolver: AbstractResolver = ThreadedResolver() if allow_private else GuardedResolver()
    return aiohttp.TCPConnector(resolver=resolver, limit=limit, limit_per_host=0, ttl_dns_cache=10)
