"""API clients: managed by the admin, each seeing only the tasks it registered, on every route."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.api.test_tasks import db_rows
from tests.conftest import ALSO_THROUGH_PGBOUNCER, LiveServer, auth_headers, wait_until

pytestmark = ALSO_THROUGH_PGBOUNCER

ISSUED_KEYS = {"name", "token", "webhook_secret", "relay"}
LISTED_KEYS = {"name", "relay", "rate", "relay_hooks", "created_at", "revoked_at", "task_count"}


@asynccontextmanager
async def as_token(api: httpx.AsyncClient, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.base_url, headers=auth_headers(token), timeout=30) as client:
        yield client


async def create(api: httpx.AsyncClient, name: str, **fields: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/clients", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


async def test_the_admin_creates_a_client_and_sees_its_token_only_then(api: httpx.AsyncClient) -> None:
    issued = await create(api, "shop-a", rate=5)

    assert set(issued) == ISSUED_KEYS
    assert (issued["name"], issued["relay"]) == ("shop-a", "default")
    assert issued["token"].startswith("st_")
    assert len(issued["token"]) == len("st_") + 43  # 32 random bytes, base64url
    assert issued["webhook_secret"].startswith("whsec_")
    listed = (await api.get("/api/v1/clients")).json()["items"]
    one = (await api.get("/api/v1/clients/shop-a")).json()
    assert [set(item) for item in listed] == [LISTED_KEYS]
    assert listed == [one]
    assert (one["rate"], one["task_count"], one["revoked_at"]) == (5.0, 0, None)
    for secret in (issued["token"], issued["webhook_secret"]):
        assert secret not in str(listed)


async def test_the_token_is_stored_only_as_its_sha256(api: httpx.AsyncClient, database_url: str) -> None:
    issued = await create(api, "shop-a")

    [row] = await db_rows(database_url, "SELECT token_sha256, webhook_secret FROM clients")
    assert bytes(row["token_sha256"]) == __import__("hashlib").sha256(issued["token"].encode()).digest()
    assert issued["token"] not in str(await db_rows(database_url, "SELECT * FROM clients"))


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"name": "has space"}, 400, "name"),
        ({"name": ""}, 400, "name"),
        ({"name": "x" * 65}, 400, "name"),
        ({"name": "ok", "relay": "nope"}, 400, "default"),
        ({"name": "ok", "relay": "Bad-Name"}, 400, "relay"),
        ({"name": "ok", "rate": 0}, 400, "rate"),
        ({"name": "ok", "relay_hooks": "maybe"}, 400, "relay_hooks"),
        ({"name": "ok", "token": "mine"}, 400, "token"),
    ],
)
async def test_bad_client_fields_are_refused_naming_them(
    api: httpx.AsyncClient, body: dict[str, Any], status: int, named: str
) -> None:
    response = await api.post("/api/v1/clients", json=body)

    assert response.status_code == status, response.text
    assert named in response.json()["detail"]


async def test_a_taken_name_is_a_conflict(api: httpx.AsyncClient) -> None:
    await create(api, "shop-a")

    response = await api.post("/api/v1/clients", json={"name": "shop-a"})

    assert response.status_code == 409
    assert "shop-a" in response.json()["detail"]


async def test_revoking_stops_the_token_at_once_and_keeps_the_tasks(api: httpx.AsyncClient) -> None:
    issued = await create(api, "shop-a")
    async with as_token(api, issued["token"]) as shop:
        assert (await shop.post("/api/v1/tasks", json={"task_id": "t-1"})).status_code == 201

        revoked = await api.post("/api/v1/clients/shop-a/revoke")
        refused = await shop.get("/api/v1/tasks")

    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert refused.status_code == 401
    kept = await api.get("/api/v1/tasks/t-1", params={"client": "shop-a"})
    assert (kept.status_code, kept.json()["status"]) == (200, "submitted")
    assert (await api.post("/api/v1/clients/shop-a/rotate-token")).status_code == 409


async def test_a_rotated_token_replaces_the_old_one_at_once(api: httpx.AsyncClient) -> None:
    issued = await create(api, "shop-a")

    rotated = (await api.post("/api/v1/clients/shop-a/rotate-token")).json()

    assert set(rotated) == {"name", "token"}
    async with as_token(api, issued["token"]) as old, as_token(api, rotated["token"]) as new:
        assert (await old.get("/api/v1/tasks")).status_code == 401
        assert (await new.get("/api/v1/tasks")).status_code == 200


async def test_a_token_revoked_through_another_replica_stops_within_the_cache_bound(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    """A replica keeps a token it looked up for SUNOTRACK_TOKEN_CACHE_S, for calls that register
    nothing (docs/design.md, "The token cache"): revoked through another replica, the token still reads
    there until that long after the lookup, never longer, and registers nothing from the start."""
    cache_s = 3.0
    settings = make_settings(SUNOTRACK_TOKEN_CACHE_S=str(cache_s))
    revoking, reading = live_server(settings), live_server(settings)
    async with httpx.AsyncClient(base_url=revoking.base_url, headers=auth_headers(), timeout=30) as admin:
        issued = await create(admin, "shop-a")
        async with httpx.AsyncClient(
            base_url=reading.base_url, headers=auth_headers(issued["token"]), timeout=30
        ) as shop:
            looked_up = time.monotonic()
            assert (await shop.get("/api/v1/tasks")).status_code == 200
            assert (await admin.post("/api/v1/clients/shop-a/revoke")).status_code == 200

            read_while_kept = await shop.get("/api/v1/tasks")
            registered = await shop.post("/api/v1/tasks", json={"task_id": "t-1"})

            async def refused() -> bool:
                return (await shop.get("/api/v1/tasks")).status_code == 401

            await wait_until(refused, timeout=cache_s + 10, what="the revoked token refused")
            stopped_after = time.monotonic() - looked_up

    assert read_while_kept.status_code == 200
    assert registered.status_code == 401
    assert stopped_after <= cache_s + 1, stopped_after


async def test_a_rotated_secret_says_until_when_the_old_one_signs(api: httpx.AsyncClient) -> None:
    issued = await create(api, "shop-a")

    rotated = (await api.post("/api/v1/clients/shop-a/rotate-secret", params={"grace_s": 60})).json()
    at_once = (await api.post("/api/v1/clients/shop-a/rotate-secret", params={"grace_s": 0})).json()

    assert set(rotated) == {"name", "webhook_secret", "previous_secret_until"}
    assert rotated["webhook_secret"] != issued["webhook_secret"]
    assert rotated["previous_secret_until"] is not None
    assert at_once["previous_secret_until"] is None
    bad = await api.post("/api/v1/clients/shop-a/rotate-secret", params={"grace_s": -1})
    assert bad.status_code == 400
    assert "grace_s" in bad.json()["detail"]


async def test_client_management_is_for_the_admin_only(api: httpx.AsyncClient) -> None:
    issued = await create(api, "shop-a")

    async with as_token(api, issued["token"]) as shop:
        answers = [
            await shop.post("/api/v1/clients", json={"name": "shop-b"}),
            await shop.get("/api/v1/clients"),
            await shop.get("/api/v1/clients/shop-a"),
            await shop.post("/api/v1/clients/shop-a/revoke"),
            await shop.post("/api/v1/clients/shop-a/rotate-token"),
            await shop.post("/api/v1/clients/shop-a/rotate-secret"),
        ]

    assert [answer.status_code for answer in answers] == [403] * 6
    assert (await api.get("/api/v1/clients/nobody")).status_code == 404


@pytest.mark.parametrize("token", ["not-a-token", "st_" + "x" * 43, "test-admin-token-not"])
async def test_an_unknown_token_is_401_before_the_body_is_read(api: httpx.AsyncClient, token: str) -> None:
    async with as_token(api, token) as stranger:
        response = await stranger.post("/api/v1/tasks", content=b"{not json")

    assert response.status_code == 401


# --- every route, two clients and the admin ---------------------------------------------------------

PARTIES = ("a", "b", "admin")
# Each party's hooks go to a host of its own, so the hook-host listing can tell them apart.
HOSTS = {"a": "127.0.0.11", "b": "127.0.0.12", "admin": "127.0.0.13"}
# The dispatcher's host keys (scheme://host:port) of those hooks.
HOST_KEYS = {name: f"http://{host}:9" for name, host in HOSTS.items()}


@dataclass
class Party:
    name: str
    http: httpx.AsyncClient

    @property
    def hook(self) -> str:
        return f"http://{HOSTS[self.name]}:9/hook"


async def test_every_route_shows_each_client_only_its_own_tasks(
    api: httpx.AsyncClient, database_url: str
) -> None:
    """A, B and the admin each register `shared` (the same relay task id) and a task of their own,
    and cancel their own (a delivery each). Then every route is walked by every party, with the ids
    of the others' tasks, deliveries and hook hosts: 404s and empty lists where they belong."""
    tokens = {name: (await create(api, f"shop-{name}"))["token"] for name in ("a", "b")}
    async with as_token(api, tokens["a"]) as a, as_token(api, tokens["b"]) as b:
        parties = [Party("a", a), Party("b", b), Party("admin", api)]
        for party in parties:
            for task_id in ("shared", f"own-{party.name}"):
                response = await party.http.post(
                    "/api/v1/tasks", json={"task_id": task_id, "notify_hook": party.hook}
                )
                assert response.status_code == 201, response.text
            assert (await party.http.delete(f"/api/v1/tasks/own-{party.name}")).status_code == 200
        delivery_ids = {
            name: (await api.get(f"/api/v1/tasks/own-{name}/deliveries", params=_as_admin(name))).json()[
                "items"
            ][0]["id"]
            for name in PARTIES
        }
        await _paused_hosts(database_url)

        for party in parties:
            await _walk(party, {other for other in PARTIES if other != party.name}, delivery_ids)
        await _the_admin_addresses_each_clients_tasks(api, delivery_ids)


def _as_admin(name: str) -> dict[str, str]:
    return {} if name == "admin" else {"client": f"shop-{name}"}


async def _paused_hosts(database_url: str) -> None:
    values = ", ".join(f"('{host}', 25, now() + interval '1 hour')" for host in HOST_KEYS.values())
    await db_rows(
        database_url,
        f"INSERT INTO hook_hosts (host, consecutive_failures, paused_until) VALUES {values}",
    )


async def _walk(party: Party, others: set[str], delivery_ids: dict[str, int]) -> None:
    http, own = party.http, f"own-{party.name}"
    shared = (await http.get("/api/v1/tasks/shared")).json()
    assert (shared["notify_hook"], shared["status"]) == (party.hook, "submitted")
    assert ("client" in shared) == (party.name == "admin")

    listed = {item["task_id"] for item in (await http.get("/api/v1/tasks")).json()["items"]}
    deliveries = (await http.get("/api/v1/deliveries")).json()["items"]
    hosts = {item["host"] for item in (await http.get("/api/v1/hooks/hosts")).json()["items"]}
    if party.name == "admin":  # sees everyone's without ?client
        assert listed == {"shared", "own-a", "own-b", "own-admin"}
        assert sorted(item["id"] for item in deliveries) == sorted(delivery_ids.values())
        assert hosts == set(HOST_KEYS.values())
    else:
        assert listed == {"shared", own}
        assert [item["id"] for item in deliveries] == [delivery_ids[party.name]]
        assert hosts == {HOST_KEYS[party.name]}
    assert (await http.get(f"/api/v1/tasks/{own}/events")).status_code == 200
    assert len((await http.get(f"/api/v1/tasks/{own}/deliveries")).json()["items"]) == 1

    for other in others:
        theirs = f"own-{other}"
        answers: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
            "get": lambda t=theirs: http.get(f"/api/v1/tasks/{t}"),
            "events": lambda t=theirs: http.get(f"/api/v1/tasks/{t}/events"),
            "deliveries": lambda t=theirs: http.get(f"/api/v1/tasks/{t}/deliveries"),
            "refresh": lambda t=theirs: http.post(f"/api/v1/tasks/{t}/refresh"),
            "cancel": lambda t=theirs: http.delete(f"/api/v1/tasks/{t}"),
            "redeliver": lambda t=theirs: http.post(f"/api/v1/tasks/{t}/redeliver", params={"all": "true"}),
        }
        if party.name != "admin":  # delivery ids are unique: the admin may retry anyone's
            answers["retry"] = lambda o=other: http.post(f"/api/v1/deliveries/{delivery_ids[o]}/retry")
        for route, answer in answers.items():
            response = await answer()
            assert response.status_code == 404, (party.name, other, route, response.text)
            assert theirs in response.text or route == "retry", response.text
        if party.name != "admin":
            refused = await http.get(f"/api/v1/tasks/{own}", params={"client": f"shop-{other}"})
            assert refused.status_code == 400

    # Registering another party's task id makes this party's own record, never hands back theirs.
    for other in others:
        mine = await http.post("/api/v1/tasks", json={"task_id": f"own-{other}", "kind": "music"})
        assert mine.status_code == 201, mine.text
        assert (mine.json()["notify_hook"], mine.json()["status"]) == (None, "submitted")
        assert (await http.delete(f"/api/v1/tasks/own-{other}")).status_code == 200


async def _the_admin_addresses_each_clients_tasks(
    api: httpx.AsyncClient, delivery_ids: dict[str, int]
) -> None:
    for name in ("a", "b"):
        client = {"client": f"shop-{name}"}
        task = (await api.get(f"/api/v1/tasks/own-{name}", params=client)).json()
        assert (task["client"], task["status"], task["notify_hook"]) == (
            f"shop-{name}", "cancelled", f"http://{HOSTS[name]}:9/hook",
        )  # fmt: skip
        # own-<other> was registered (and cancelled) by every party in the walk: its own record each.
        listed = (await api.get("/api/v1/tasks", params=client)).json()["items"]
        assert {item["client"] for item in listed} == {f"shop-{name}"}
        assert {item["task_id"] for item in listed} == {"shared", "own-a", "own-b", "own-admin"}
        for route in ("events", "deliveries"):
            assert (await api.get(f"/api/v1/tasks/own-{name}/{route}", params=client)).status_code == 200
        deliveries = (await api.get("/api/v1/deliveries", params=client)).json()["items"]
        assert [item["id"] for item in deliveries] == [delivery_ids[name]]
        other = "b" if name == "a" else "a"
        retry = await api.post(f"/api/v1/deliveries/{delivery_ids[other]}/retry", params=client)
        assert retry.status_code == 404
        assert (
            await api.post(f"/api/v1/deliveries/{delivery_ids[name]}/retry", params=client)
        ).status_code == 202
        hosts = {
            item["host"] for item in (await api.get("/api/v1/hooks/hosts", params=client)).json()["items"]
        }
        assert hosts == {HOST_KEYS[name]}
    mine = (await api.get("/api/v1/tasks/own-a")).json()  # the admin's own record of that id
    assert (mine["client"], mine["notify_hook"]) == (None, None)
    assert (await api.get("/api/v1/tasks", params={"client": "nobody"})).status_code == 404


# --- registration rate ------------------------------------------------------------------------------


async def test_over_its_rate_a_client_gets_429_with_retry_after(api: httpx.AsyncClient) -> None:
    issued = await create(api, "shop-a", rate=1)
    async with as_token(api, issued["token"]) as shop:
        answers = [await shop.post("/api/v1/tasks", json={"task_id": f"t-{n}"}) for n in range(3)]
        other_routes = await shop.get("/api/v1/tasks")

    assert [answer.status_code for answer in answers] == [201, 201, 429]  # a burst of twice the rate
    assert answers[2].headers["Retry-After"] == "1"
    assert "rate" in answers[2].json()["detail"]
    assert other_routes.status_code == 200
    # The admin is not rate-limited, and other clients have buckets of their own.
    other = await create(api, "shop-b", rate=0.5)
    async with as_token(api, other["token"]) as shop_b:
        assert (await shop_b.post("/api/v1/tasks", json={"task_id": "t-0"})).status_code == 201
    assert all([(await api.post("/api/v1/tasks", json={"task_id": f"x-{n}"})).is_success for n in range(5)])


async def test_the_rate_holds_across_replicas(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    """Two replicas on one database, each hammered at several times the client's rate: together they
    grant the burst plus the rate for the time it lasted, within 20%."""
    rate, seconds = 5.0, 4.0
    replicas = [live_server(make_settings()), live_server(make_settings())]
    async with httpx.AsyncClient(base_url=replicas[0].base_url, headers=auth_headers()) as admin:
        issued = (await admin.post("/api/v1/clients", json={"name": "busy", "rate": rate})).json()
    granted: list[float] = []
    refused: list[float] = []
    counter = iter(range(1_000_000))

    async def hammer(base_url: str) -> None:
        async with httpx.AsyncClient(base_url=base_url, headers=auth_headers(issued["token"])) as http:
            while time.monotonic() < deadline:
                answer = await http.post("/api/v1/tasks", json={"task_id": f"t-{next(counter)}"})
                assert answer.status_code in (201, 429), answer.text
                (granted if answer.status_code == 201 else refused).append(time.monotonic())

    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(hammer(replica.base_url) for replica in replicas for _ in range(4)))

    # Saturated: asked for several times what the rate allows, all along.
    assert len(refused) >= 2 * len(granted), (len(granted), len(refused))
    assert max(refused) > max(granted) - 1 / rate
    # The burst, then the rate from the first grant on: a full bucket refills nothing while the first
    # requests are still connecting (seen through PgBouncer on a loaded box: 1.3 s of refill lost).
    expected = 2 * rate + rate * (max(granted) - min(granted))
    assert abs(len(granted) - expected) <= 0.2 * expected, (len(granted), expected)


async def test_no_token_or_secret_is_logged(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Everything the service prints while a client is made, used (over its rate, too), rotated and
    revoked, and while its webhooks are attempted (to a port nobody listens on, so failures are
    logged): none of its tokens or secrets."""
    server = live_server(make_settings(), role="all")
    shown: list[str] = []
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
        issued = await create(api, "shop-a", rate=0.5)
        shown += [issued["token"], issued["webhook_secret"]]
        async with as_token(api, issued["token"]) as shop:
            for n in range(3):
                await shop.post(
                    "/api/v1/tasks", json={"task_id": f"t-{n}", "notify_hook": "http://127.0.0.1:9/h"}
                )
            await shop.delete("/api/v1/tasks/t-0")
        shown.append((await api.post("/api/v1/clients/shop-a/rotate-secret")).json()["webhook_secret"])
        shown.append((await api.post("/api/v1/clients/shop-a/rotate-token")).json()["token"])
        await api.post("/api/v1/clients/shop-a/revoke")
        async with as_token(api, shown[-1]) as revoked:
            assert (await revoked.get("/api/v1/tasks")).status_code == 401

        async def attempted() -> bool:
            items = (await api.get("/api/v1/deliveries", params={"client": "shop-a"})).json()["items"]
            return bool(items) and items[0]["attempts"] > 0

        await wait_until(attempted, timeout=15, what="a webhook attempt")
    printed = "".join(capfd.readouterr())

    assert "webhooks.attempt_failed" in printed  # the logs were captured
    assert [secret for secret in shown if secret in printed] == []
