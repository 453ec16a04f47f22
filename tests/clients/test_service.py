"""A client's registrations taken from its rate bucket through a process's lease (TokenCache.take),
against the suite's PostgreSQL by the driver, as the token check runs them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest

from service.clients.service import (
    BURST_S,
    LEASE_MAX,
    LEASE_S,
    TokenCache,
    authenticate,
    new_token,
    new_webhook_secret,
    token_digest,
)
from service.db import RequestConnection


class Counted:
    """A pool that counts the statements run through it (the token check's only use of the connection)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements = 0

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        self.statements += 1
        return await self.pool.fetchrow(query, *args)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url.replace("+asyncpg", ""), min_size=2, max_size=4) as made:
        yield made


async def client(pool: asyncpg.Pool, rate: float) -> str:
    token = new_token()
    await pool.execute(
        "INSERT INTO clients (name, token_sha256, webhook_secret, relay, rate) "
        "VALUES ($1, $2, $3, 'default', $4)",
        f"shop-{token[-6:]}",
        token_digest(token),
        new_webhook_secret(),
        rate,
    )
    return token


async def register(db: Counted, token: str, cache: TokenCache) -> bool | None:
    """One registration's take: True granted, False over the rate, None an unknown token."""
    found = await authenticate(cast("RequestConnection", db), token, take=1, default_rate=100.0, cache=cache)
    return None if found is None else found[1] is None


async def test_a_busy_token_spends_leases_not_a_statement_each(pool: asyncpg.Pool) -> None:
    """Each lease takes twice what the last one spent, up to LEASE_MAX: 200 registrations in a few
    statements."""
    token, db, cache = await client(pool, rate=1000), Counted(pool), TokenCache(ttl_s=2.0)

    granted = [await register(db, token, cache) for _ in range(200)]

    assert granted == [True] * 200
    assert db.statements <= 10, db.statements


async def test_concurrent_registrations_wait_for_one_take(pool: asyncpg.Pool) -> None:
    token, db, cache = await client(pool, rate=1000), Counted(pool), TokenCache(ttl_s=2.0)

    granted = await asyncio.gather(*(register(db, token, cache) for _ in range(64)))

    assert granted == [True] * 64
    assert db.statements <= 8, db.statements


async def test_leases_grant_no_more_than_the_bucket_across_processes(pool: asyncpg.Pool) -> None:
    """Two processes' caches taking in turn as fast as they can: together they grant the burst and the
    rate for the time it lasted, never more (a lease only spends what its take took)."""
    rate = 20.0
    token = await client(pool, rate=rate)
    processes = [(Counted(pool), TokenCache(ttl_s=2.0)) for _ in range(2)]
    started = time.monotonic()

    answers = [await register(db, token, cache) for _ in range(60) for db, cache in processes]

    elapsed = time.monotonic() - started
    assert answers.count(True) <= BURST_S * rate + rate * elapsed, (answers.count(True), elapsed)
    assert answers.count(True) >= BURST_S * rate - 2 * int(rate * LEASE_S)  # at most a lease's rest lost each
    # The bucket ran dry. Not `answers[-1] is False`: a token refills every 1/rate s, so any one answer
    # after the burst may be a grant.
    assert False in answers


async def test_a_revoked_token_registers_from_its_lease_for_at_most_lease_s(pool: asyncpg.Pool) -> None:
    """Revoked through another process: this one spends what it took before, for at most LEASE_S after
    the take (docs/design.md, "Leased registrations"), then its next take finds no token. Past half its
    deadline a lease takes no next one, so nothing checks the token before that."""
    token, db, cache = await client(pool, rate=1000), Counted(pool), TokenCache(ttl_s=2.0)
    assert await register(db, token, cache)  # a take of two: one spent, one kept
    taken_at = time.monotonic()
    await pool.execute("UPDATE clients SET revoked_at = now() WHERE token_sha256 = $1", token_digest(token))
    await asyncio.sleep(max(0.0, taken_at + LEASE_S / 2 - time.monotonic()))

    from_the_lease = await register(db, token, cache)
    await asyncio.sleep(max(0.0, taken_at + LEASE_S - time.monotonic()))
    after = await register(db, token, cache)

    assert (from_the_lease, after, db.statements) == (True, None, 2)


async def test_a_revoked_token_is_refused_at_the_top_up(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registration that takes the next lease checks the token: revoked, it and the later ones are
    refused though the current lease had registrations left (half a lease at most is spent after)."""
    monkeypatch.setattr("service.clients.service.LEASE_S", 30.0)  # no lease expires on a slow box
    token, db, cache = await client(pool, rate=1000), Counted(pool), TokenCache(ttl_s=60.0)
    # Leases of 2, 4 ... 32, then one registration from the lease of LEASE_MAX.
    assert [await register(db, token, cache) for _ in range(63)] == [True] * 63
    await pool.execute("UPDATE clients SET revoked_at = now() WHERE token_sha256 = $1", token_digest(token))

    answers = [await register(db, token, cache) for _ in range(LEASE_MAX - 1)]

    assert None in answers[: LEASE_MAX // 2], answers
    assert set(answers[answers.index(None) :]) == {None}, answers


async def test_a_take_that_finds_the_token_revoked_stops_its_cached_lookups_too(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoked through another process: the first take after it refuses the registration, and the
    token's reads, which a lookup kept in the cache would otherwise let through for `ttl_s`, stop with
    it."""
    monkeypatch.setattr("service.clients.service.LEASE_S", 0.0)  # every registration takes
    token, db, cache = await client(pool, rate=1000), Counted(pool), TokenCache(ttl_s=60.0)
    assert await authenticate(cast("RequestConnection", db), token, default_rate=100.0, cache=cache)
    await pool.execute("UPDATE clients SET revoked_at = now() WHERE token_sha256 = $1", token_digest(token))

    refused = await register(db, token, cache)
    read = await authenticate(cast("RequestConnection", db), token, default_rate=100.0, cache=cache)

    assert (refused, read, db.statements) == (None, None, 3)


class Held(Counted):
    """A pool whose statements wait while `hold` is clear, so a take can be kept in flight."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.hold = asyncio.Event()
        self.hold.set()
        self.waiting = asyncio.Event()
        self.in_flight = 0

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        self.in_flight += 1
        try:
            if not self.hold.is_set():
                self.waiting.set()
                await self.hold.wait()
            return await super().fetchrow(query, *args)
        finally:
            self.in_flight -= 1


async def test_a_busy_token_keeps_registering_while_its_next_lease_is_taken(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The take for the next lease starts while the current one has registrations left: the others
    spend them meanwhile instead of all waiting for the take once it runs out."""
    # Deadlines far enough that no lease expires on a slow box: only running out ends one here.
    monkeypatch.setattr("service.clients.service.LEASE_S", 30.0)
    token, db, cache = await client(pool, rate=1000), Held(pool), TokenCache(ttl_s=60.0)
    assert [await register(db, token, cache) for _ in range(40)] == [True] * 40  # leases grown to 32
    db.hold.clear()

    started: list[asyncio.Task[bool | None]] = []
    while not db.waiting.is_set():
        assert len(started) <= 64, "no take started"
        started.append(asyncio.create_task(register(db, token, cache)))
        waiting = asyncio.create_task(db.waiting.wait())
        await asyncio.wait([started[-1], waiting], timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    # A take is held; the next registrations come from what is left of the current lease.
    during = [asyncio.create_task(register(db, token, cache)) for _ in range(4)]
    done, _ = await asyncio.wait(during, timeout=5.0)

    held_meanwhile = db.in_flight
    db.hold.set()
    answers = await asyncio.gather(*started, *during)
    assert (len(done), held_meanwhile) == (4, 1)
    assert answers == [True] * len(answers)


async def test_a_trickle_under_10_per_s_takes_a_statement_per_registration(pool: asyncpg.Pool) -> None:
    token, db, cache = await client(pool, rate=8), Counted(pool), TokenCache(ttl_s=2.0)

    granted = [await register(db, token, cache) for _ in range(6)]

    assert (granted, db.statements) == ([True] * 6, 6)


async def test_without_a_token_cache_every_registration_takes_in_postgres(pool: asyncpg.Pool) -> None:
    token, db, cache = await client(pool, rate=1000), Counted(pool), TokenCache(ttl_s=0)

    granted = [await register(db, token, cache) for _ in range(5)]
    await pool.execute("UPDATE clients SET revoked_at = now() WHERE token_sha256 = $1", token_digest(token))
    revoked = await register(db, token, cache)

    assert (granted, revoked, db.statements) == ([True] * 5, None, 6)
