"""Pure parts of the outbox: retry arithmetic, signatures, Retry-After, error classes."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr
from standardwebhooks import Webhook

from service.http import retry_after_s as parse_retry_after
from service.webhooks.attempts import RETRY_AFTER_CAP_S, AttemptResult, classify, settle
from service.webhooks.attempts import RETRY_JITTER as JITTER
from service.webhooks.repository import ClaimedDelivery
from service.webhooks.signing import secret_keys, signature_header
from service.webhooks.ssrf import HookAddressRefused
from tests.webhooks.conftest import SECRET_NEW, SECRET_OLD

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SCHEDULE = (5.0, 300.0, 1800.0)


def claimed(attempts: int) -> ClaimedDelivery:
    return ClaimedDelivery(
        id=1, task_id="t", webhook_id="msg_1", url="https://example.com/h", host="https://example.com:443",
        body=b"{}", attempts=attempts, lease=NOW,
    )  # fmt: skip


def result(status_code: int | None = 500, retry_after_s: float | None = None) -> AttemptResult:
    return AttemptResult(at=NOW, duration_ms=0.0, status_code=status_code, retry_after_s=retry_after_s)


def test_success_settles_as_delivered_and_gone_as_dead() -> None:
    assert settle(claimed(0), result(204), SCHEDULE).status == "delivered"
    assert settle(claimed(0), result(410), SCHEDULE).status == "dead"


def test_schedule_of_n_delays_allows_n_plus_one_attempts() -> None:
    assert [settle(claimed(n), result(), SCHEDULE).status for n in range(4)] == [
        "failed", "failed", "failed", "dead",
    ]  # fmt: skip
    assert settle(claimed(0), result(), ()).status == "dead"


@given(
    attempts=st.integers(0, len(SCHEDULE) - 1),
    retry_after=st.none() | st.floats(0, 1e9),
    seed=st.integers(0, 2**32),
)
def test_jitter_and_retry_after_never_shorten_the_schedule(
    attempts: int, retry_after: float | None, seed: int
) -> None:
    settlement = settle(claimed(attempts), result(429, retry_after), SCHEDULE, rng=random.Random(seed))
    assert settlement.next_attempt_at is not None
    delay = (settlement.next_attempt_at - NOW).total_seconds()
    scheduled = SCHEDULE[attempts]
    assert delay >= scheduled - 1e-6
    if retry_after is not None:
        assert delay >= min(retry_after, RETRY_AFTER_CAP_S) - 1e-6
    # The jitter applies to a Retry-After too: 429s naming one time do not all come back at that time.
    assert delay <= max(scheduled, min(retry_after or 0, RETRY_AFTER_CAP_S)) * (1 + JITTER) + 1e-6


@given(webhook_id=st.from_regex(r"msg_[a-z0-9]{1,32}", fullmatch=True), body=st.text())
def test_every_rotated_secret_verifies_with_the_standardwebhooks_package(webhook_id: str, body: str) -> None:
    timestamp = int(time.time())
    keys = secret_keys([SecretStr(SECRET_OLD), SecretStr(SECRET_NEW)])
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(keys, webhook_id, timestamp, body.encode()),
    }
    for secret in (SECRET_OLD, SECRET_NEW):
        Webhook(secret).verify(body.encode(), headers, json_parse=False)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    later = NOW + timedelta(seconds=90)
    assert parse_retry_after("120", NOW) == 120
    assert parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), NOW) == 90
    assert parse_retry_after("-5", NOW) == 0
    assert [parse_retry_after(v, NOW) for v in (None, "", "soon", "nan")] == [None, None, None, None]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("read"), "timeout"),
        (HookAddressRefused("refused to connect: 10.0.0.1 is a private address"), "ssrf"),
        (ConnectionRefusedError(111, "refused"), "connect"),
        (aiohttp.ServerDisconnectedError(), "connect"),
        (aiohttp.ClientPayloadError("truncated"), "http"),
    ],
)
def test_errors_are_classified(exc: BaseException, expected: str) -> None:
    assert classify(exc)[0] == expected
