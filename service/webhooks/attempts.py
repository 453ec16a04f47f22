"""One delivery attempt: the signed POST, what came of it, and what follows (retry, dead, delivered)."""

from __future__ import annotations

import functools
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
from yarl import URL

from service.http import retry_after_s
from service.redact import mask_credentials
from service.vocabulary import DeliveryStatus
from service.webhooks.repository import AttemptOutcome, ClaimedDelivery
from service.webhooks.signing import signature_header
from service.webhooks.ssrf import HookAddressRefused, refuse_literal_host

USER_AGENT = "sunotrack-webhooks/1"
RESPONSE_BODY_LIMIT = 4096
# Retries wait their scheduled delay (or the receiver's Retry-After) plus up to this fraction, drawn per
# attempt, so receivers coming back are not stampeded and no two hosts' retries fall due together.
# (Polls spread both ways instead: tracking.service.POLL_JITTER.)
RETRY_JITTER = 0.2
# A Retry-After may stretch the schedule, but not park a delivery beyond a day.
RETRY_AFTER_CAP_S = 86_400.0
# Statuses that count against a host's health: it is down, overloaded or too slow.
BREAKER_STATUS_CODES = frozenset({408, 429})
BREAKER_ERROR_CLASSES = frozenset({"dns", "connect", "timeout", "tls", "http"})


@dataclass(frozen=True, slots=True)
class AttemptResult:
    at: datetime
    duration_ms: float
    status_code: int | None = None
    error_class: str | None = None  # dns | connect | timeout | tls | http | ssrf
    error: str | None = None
    response_body: str | None = None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def host_failed(self) -> bool:
        """Whether this attempt says the host is unhealthy (a refused address never reached it)."""
        if self.status_code is not None:
            return self.status_code >= 500 or self.status_code in BREAKER_STATUS_CODES
        return self.error_class in BREAKER_ERROR_CLASSES


@dataclass(frozen=True, slots=True)
class Settlement:
    status: DeliveryStatus
    next_attempt_at: datetime | None


def settle(
    delivery: ClaimedDelivery,
    result: AttemptResult,
    schedule: Sequence[float],
    *,
    rng: random.Random | None = None,
) -> Settlement:
    """The delivery's state after this attempt: delivered, dead, or failed with its next attempt time."""
    if result.ok:
        return Settlement(DeliveryStatus.DELIVERED, None)
    attempt = delivery.attempts + 1
    if result.status_code == 410 or attempt > len(schedule):
        return Settlement(DeliveryStatus.DEAD, None)
    delay = schedule[attempt - 1]
    if result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, RETRY_AFTER_CAP_S))
    # After the Retry-After too: a storm of 429s naming one time must not come back all at that time.
    delay *= 1 + (rng or random).uniform(0, RETRY_JITTER)
    finished = result.at + timedelta(milliseconds=result.duration_ms)
    return Settlement(DeliveryStatus.FAILED, finished + timedelta(seconds=delay))


def outcome(delivery: ClaimedDelivery, result: AttemptResult, settlement: Settlement) -> AttemptOutcome:
    """The row the settle statement writes for this attempt."""
    last_error = result.error
    if last_error is None and result.status_code is not None and not result.ok:
        last_error = f"HTTP {result.status_code}"
    return AttemptOutcome(
        delivery_id=delivery.id,
        attempt=delivery.attempts + 1,
        at=result.at,
        duration_ms=result.duration_ms,
        status_code=result.status_code,
        error_class=result.error_class,
        error=result.error,
        response_body=result.response_body,
        next_attempt_at=settlement.next_attempt_at,
        lease=delivery.lease,
        status=settlement.status,
        last_error=last_error,
        delivered_at=result.at if result.ok else None,
    )


def classify(exc: BaseException) -> tuple[str, str]:
    """(error class, message) for a failed attempt: ssrf, timeout, tls, dns, connect or http."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, HookAddressRefused):
        return "ssrf", str(cause)
    if isinstance(exc, TimeoutError):
        return "timeout", "no complete response within the timeout"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        error_class = "tls"
    elif isinstance(exc, aiohttp.ClientConnectorDNSError):
        error_class = "dns"
    elif isinstance(exc, aiohttp.ClientConnectionError | OSError):
        error_class = "connect"
    else:
        return "http", f"{type(exc).__name__}: {exc}"
    return error_class, str(exc) or type(exc).__name__


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _read_prefix(response: aiohttp.ClientResponse) -> str:
    chunks: list[bytes] = []
    size = 0
    while size < RESPONSE_BODY_LIMIT:
        chunk = await response.content.read(RESPONSE_BODY_LIMIT - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=4096)
def _target(url: str, *, allow_private: bool) -> tuple[URL, str | None]:
    """The parsed URL and, for a refused IP literal, why (names are the guarded resolver's job)."""
    parsed = URL(url)
    if allow_private:
        return parsed, None
    try:
        refuse_literal_host(parsed.raw_host or "")
    except HookAddressRefused as exc:
        return parsed, str(exc)
    return parsed, None


async def attempt_delivery(
    http: aiohttp.ClientSession,
    delivery: ClaimedDelivery,
    *,
    keys: Sequence[bytes],
    allow_private: bool,
) -> AttemptResult:
    """One signed POST; never raises for anything the receiver or the network does."""
    at = datetime.now(UTC)
    timestamp = int(at.timestamp())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(keys, delivery.webhook_id, timestamp, delivery.body),
    }
    started = time.perf_counter()
    try:
        url, refused = _target(delivery.url, allow_private=allow_private)
        if refused is not None:
            raise HookAddressRefused(refused)
        # The session's total timeout covers connecting, sending and reading the answer.
        async with http.post(url, data=delivery.body, headers=headers, allow_redirects=False) as response:
            body = await _read_prefix(response)
            retry_after = None
            if response.status in (429, 503):
                retry_after = retry_after_s(response.headers.get("retry-after"), at)
            return AttemptResult(
                at=at,
                duration_ms=_elapsed_ms(started),
                status_code=response.status,
                response_body=body,
                retry_after_s=retry_after,
            )
    except Exception as exc:  # whatever the receiver, the network or the client library throws
        error_class, message = classify(exc)
        # Stored, shown and logged from here on: a client library may quote the URL it was given.
        error = mask_credentials(message)
        return AttemptResult(at=at, duration_ms=_elapsed_ms(started), error_class=error_class, error=error)
