from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from service.config import Settings
from service.db import SessionMaker
from service.errors import InvalidInput
from service.webhooks.ssrf import GuardedResolver, HookAddressRefused, check_hook_url, refusal_reason
from tests.webhooks.conftest import Receiver, add_task, attempts, enqueue, notice, running_dispatcher, settled

REFUSED = [
    "http://127.0.0.1/hook",
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8080/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[fe80::1]/",
    "http://localhost:8080/hook",
    "http://2130706433/",  # 127.0.0.1 as one number: getaddrinfo accepts it
    "http://0.0.0.0/",
    "http://192.168.1.20/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
]
PUBLIC = ["https://93.184.216.34/hook", "http://[2606:4700:4700::1111]:8443/x", "http://8.8.8.8"]
MALFORMED = [
    "ftp://example.com/",
    "/relative/path",
    "not a url",
    "http://",
    "http://example.com:99999/",
    "http://example.com:0/hook",
    "https://[::1]:0/hook",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_registration_refuses_hooks_on_internal_addresses(url: str) -> None:
    with pytest.raises(InvalidInput, match=r"^notify_hook: host .* is not allowed: .*address"):
        await check_hook_url(url, allow_private=False)


@pytest.mark.parametrize("url", REFUSED + PUBLIC)
async def test_the_allow_flag_lifts_the_address_check(url: str) -> None:
    await check_hook_url(url, allow_private=True)


@pytest.mark.parametrize("url", PUBLIC)
async def test_public_addresses_are_accepted(url: str) -> None:
    await check_hook_url(url, allow_private=False)


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("url", MALFORMED)
async def test_registration_refuses_what_is_not_an_absolute_http_url(url: str, allow_private: bool) -> None:
    with pytest.raises(InvalidInput, match=r"^notify_hook: "):
        await check_hook_url(url, allow_private=allow_private)


async def test_a_host_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(InvalidInput, match="does not resolve"):
        await check_hook_url("https://no-such-host.invalid/hook", allow_private=False)


@pytest.mark.parametrize("url", ["http://a..b/hook", f"https://{'a' * 64}.example/hook"])
async def test_a_host_name_that_cannot_be_encoded_is_refused(url: str) -> None:
    with pytest.raises(InvalidInput, match=r"^notify_hook: host .* does not resolve"):
        await check_hook_url(url, allow_private=False)


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("127.0.0.1", "loopback"),
        ("::", "unspecified"),
        ("::ffff:169.254.169.254", "link-local"),
        ("ff02::1", "multicast"),
        ("fd00::1", "private"),
        ("100.64.0.1", "not a public"),  # carrier-grade NAT: neither private nor global
        ("2002:7f00:1::", "loopback address (embedded in 2002:7f00:1::)"),
        ("::ffff:8.8.8.8", None),
        ("93.184.216.34", None),
    ],
)
def test_refusal_reasons_name_the_kind_of_address(address: str, label: str | None) -> None:
    reason = refusal_reason(ipaddress.ip_address(address))
    assert (reason is None) if label is None else (reason is not None and label in reason)


async def test_the_guarded_resolver_refuses_a_name_resolving_to_loopback() -> None:
    resolver = GuardedResolver()
    try:
        with pytest.raises(HookAddressRefused, match=r"127\.0\.0\.1 is a loopback address"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


async def test_delivery_refuses_internal_addresses_and_never_connects(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    """The receiver listens on loopback: were the guard bypassed, it would see a request."""
    port = receiver.port
    hooks = [
        receiver.url,
        f"http://localhost:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
    ]
    pks = [await add_task(sessions, f"task-{n}", hook) for n, hook in enumerate(hooks)]
    settings = make_settings(SUNOTRACK_ALLOW_PRIVATE_HOOKS="false", SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="")
    async with running_dispatcher(settings):
        await enqueue(sessions, [notice(pk, hook) for pk, hook in zip(pks, hooks, strict=True)])
        rows = await settled(sessions, len(hooks))

    assert receiver.received == []
    assert {row.status for row in rows} == {"dead"}
    for row in rows:
        [attempt] = await attempts(sessions, row.id)
        assert (attempt.error_class, attempt.status_code) == ("ssrf", None)
        assert attempt.error is not None
        assert "refused to connect" in attempt.error
        assert row.last_error == attempt.error


async def test_delivery_to_a_name_resolving_to_loopback_works_with_the_allow_flag(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    hook = f"http://localhost:{receiver.port}/hook"
    pk = await add_task(sessions, "task-1", hook)
    async with running_dispatcher(make_settings(SUNOTRACK_ALLOW_PRIVATE_HOOKS="true")):
        await enqueue(sessions, [notice(pk, hook)])
        [row] = await settled(sessions, 1)
    assert row.status == "delivered"
    assert len(receiver.received) == 1
