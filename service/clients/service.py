"""API clients: order backends, each with its own bearer token, webhook secret(s), relay and registration
rate. Functions take the session first and never commit.

A token is shown once, when it is made; only its SHA-256 is stored. The webhook secrets are stored as
they are: the dispatchers of every replica sign with them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.config import Settings
from service.db import RequestConnection, database_now
from service.errors import Conflict, InvalidInput, NotFound
from service.models import Client, Task
from service.vocabulary import DEFAULT_RELAY

TOKEN_PREFIX = "st_"  # noqa: S105  (a prefix that tells tokens apart, not a secret)
TOKEN_BYTES = 32
SECRET_BYTES = 32
# A rotated-out webhook secret keeps signing this long unless `rotate-secret --grace-s` says otherwise.
DEFAULT_SECRET_GRACE_S = 86_400.0
MAX_SECRET_GRACE_S = 30 * 86_400.0
# A bucket holds this many seconds' worth of registrations: a client may burst to twice its rate.
BURST_S = 2.0
# A process may spend registrations it took from a client's bucket for this long after the take, and
# takes at most this many seconds of the client's rate (and LEASE_MAX) at once: docs/design.md,
# "Leased registrations".
LEASE_S = 0.2
LEASE_MAX = 64


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the admin (no client) or one client."""

    client_id: int | None
    name: str | None
    relay: str

    @property
    def is_admin(self) -> bool:
        return self.client_id is None


ADMIN = Caller(client_id=None, name=None, relay=DEFAULT_RELAY)


class ClientIssued(msgspec.Struct):
    """A new client's credentials, as `create` answers (API and CLI): the only time its token is seen."""

    name: str
    token: str
    webhook_secret: str
    relay: str


class TokenRotated(msgspec.Struct):
    name: str
    token: str


class SecretRotated(msgspec.Struct):
    name: str
    webhook_secret: str
    # Until when the previous secret signs too (None: it stopped at once).
    previous_secret_until: datetime | None


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def known_relay(settings: Settings, relay: str) -> str:
    if relay not in settings.relays:
        known = ", ".join(settings.relays)
        raise InvalidInput(f"relay: {relay!r} is not a relay of this deployment (known: {known})")
    return relay


async def create_client(
    session: AsyncSession,
    *,
    name: str,
    relay: str | None,
    rate: float | None,
    relay_hooks: str | None,
    settings: Settings,
) -> ClientIssued:
    relay = known_relay(settings, relay or DEFAULT_RELAY)
    token, secret = new_token(), new_webhook_secret()
    created = (
        await session.execute(
            pg_insert(Client)
            .values(
                name=name,
                token_sha256=token_digest(token),
                webhook_secret=secret,
                relay=relay,
                rate=rate,
                relay_hooks=relay_hooks,
            )
            .on_conflict_do_nothing(index_elements=[Client.name])
            .returning(Client.id)
        )
    ).scalar_one_or_none()
    if created is None:
        raise Conflict(f"client {name!r} already exists", extra={"client": name})
    return ClientIssued(name=name, token=token, webhook_secret=secret, relay=relay)


def no_such_client(name: str) -> NotFound:
    return NotFound(f"client {name!r} does not exist", extra={"client": name})


async def get_client(session: AsyncSession, name: str, *, for_update: bool = False) -> Client:
    query = select(Client).where(Client.name == name)
    if for_update:
        query = query.with_for_update()
    client = (await session.execute(query)).scalar_one_or_none()
    if client is None:
        raise no_such_client(name)
    return client


async def client_ref(db: RequestConnection, name: str) -> tuple[int, str]:
    """A client's id and relay by its name, revoked or not, by the driver (a request's ?client=)."""
    row = await db.fetchrow("SELECT id, relay FROM clients WHERE name = $1", name)
    if row is None:
        raise no_such_client(name)
    return row["id"], row["relay"]


async def list_clients(session: AsyncSession) -> list[tuple[Client, int]]:
    """Every client with how many tasks it registered, by name."""
    counts = select(func.count()).where(Task.client_id == Client.id).scalar_subquery()
    rows = await session.execute(select(Client, counts).order_by(Client.name))
    return [(client, count) for client, count in rows]


async def task_count(session: AsyncSession, client: Client) -> int:
    query = select(func.count()).select_from(Task).where(Task.client_id == client.id)
    return int((await session.execute(query)).scalar_one())


async def revoke_client(session: AsyncSession, name: str) -> Client:
    """Its token stops working when this commits; its tasks keep being tracked and delivered."""
    client = await get_client(session, name, for_update=True)
    if client.revoked_at is None:
        client.revoked_at = await database_now(session)
        await session.flush()
    return client


async def rotate_token(session: AsyncSession, name: str) -> TokenRotated:
    """A new token; the old one stops working when this commits."""
    client = await _active(session, name)
    token = new_token()
    client.token_sha256 = token_digest(token)
    await session.flush()
    return TokenRotated(name=name, token=token)


async def rotate_secret(
    session: AsyncSession, name: str, *, grace_s: float = DEFAULT_SECRET_GRACE_S
) -> SecretRotated:
    """A new webhook secret; the current one keeps signing too for `grace_s` (webhooks carry one
    signature per secret), until the answer's previous_secret_until."""
    client = await _active(session, name)
    secret = new_webhook_secret()
    until = await database_now(session) + timedelta(seconds=grace_s) if grace_s > 0 else None
    client.previous_webhook_secret = client.webhook_secret if until is not None else None
    client.previous_secret_until = until
    client.webhook_secret = secret
    await session.flush()
    return SecretRotated(name=name, webhook_secret=secret, previous_secret_until=until)


async def _active(session: AsyncSession, name: str) -> Client:
    client = await get_client(session, name, for_update=True)
    if client.revoked_at is not None:
        raise Conflict(f"client {name!r} is revoked", extra={"client": name})
    return client


_CLIENT = "id, name, relay, token_sha256"
# Run on the request's connection by the driver, outside its transaction (service.db.RequestConnection): $1 is
# the token's digest (or the client's id), $2 how many registrations to take, $3 the default rate.
_ACTIVE = "token_sha256 = $1 AND revoked_at IS NULL"
_AUTHENTICATE = f"SELECT {_CLIENT} FROM clients WHERE {_ACTIVE}"  # noqa: S608
# A token bucket in the clients row, refilled by the database's clock, so every replica takes from the
# same one. One UPDATE: the row lock orders concurrent takers, and each one's clock_timestamp() (not its
# transaction's start) is read once it holds the lock.
_RATE = "coalesce(rate, CAST($3 AS double precision))"
_AVAILABLE = (
    f"least({BURST_S} * {_RATE}, coalesce(bucket_tokens, {BURST_S} * {_RATE}) + {_RATE} * "
    "greatest(0, extract(epoch FROM clock_timestamp() - coalesce(bucket_at, clock_timestamp()))))"
)
_COUNT = "CAST($2 AS integer)"
# A take's commit does not wait for its WAL flush: the row lock it holds would otherwise order a
# client's registrations one flush apart (docs/design.md, "The bucket's commit"). A crash may forget
# the last takes, so a bucket may grant its burst again once after a database crash.
_NO_FLUSH_WAIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS no_flush_wait"
# A registration's take, by the token: `count` ($2) registrations or none, and with them up to `want`
# ($4) in all, at most LEASE_S of the client's rate, for the process to spend without a statement
# (TokenCache.take: docs/design.md, "Leased registrations"). No row: an unknown or revoked token.
_GRANTED = f"CASE WHEN floor(c.available) >= {_COUNT} THEN least(c.wanted, floor(c.available)) ELSE 0 END"
_LEASE = (
    f"WITH c AS (SELECT id AS taker, {_AVAILABLE} AS available, {_RATE} AS rate, greatest({_COUNT}, "  # noqa: S608
    f"least(CAST($4 AS integer), floor({_RATE} * {LEASE_S}))) AS wanted FROM clients WHERE {_ACTIVE} "
    "FOR UPDATE) "
    f"UPDATE clients SET bucket_tokens = c.available - {_GRANTED}, bucket_at = clock_timestamp() "
    f"FROM c, {_NO_FLUSH_WAIT} WHERE clients.id = c.taker "
    f"RETURNING {_CLIENT}, CAST({_GRANTED} AS integer) AS granted, "
    f"greatest(0, {_COUNT} - c.available) / c.rate AS wait_s"
)
# A batch's take: as many of `count` as the bucket holds whole (service.api.tasks, register_batch).
_TAKE_UP_TO = (
    f"WITH c AS (SELECT id, {_AVAILABLE} AS available, {_RATE} AS rate FROM clients "  # noqa: S608
    "WHERE id = $1 FOR UPDATE) "
    f"UPDATE clients SET bucket_tokens = c.available - least({_COUNT}, floor(c.available)), "
    f"bucket_at = clock_timestamp() FROM c, {_NO_FLUSH_WAIT} WHERE clients.id = c.id "
    f"RETURNING CAST(least({_COUNT}, floor(c.available)) AS integer) AS granted, "
    "greatest(0, 1 - c.available) / c.rate AS wait_s"
)


@dataclass(slots=True)
class _Lease:
    """Registrations a process took from a client's bucket and has not spent yet, spendable from its
    take (`taken`) until `until`; `next` is the lease taken ahead of this one running out (spent after
    it, each to its own deadline)."""

    caller: Caller
    granted: int
    taken: float
    until: float
    spent: int = 0
    # What the registration that took it spent at once (0 for a lease taken ahead): the rest of
    # `spent` went to later calls.
    own: int = 0
    # Whether a take for the lease after this one was started (once per lease, even if it got nothing).
    topped: bool = False
    next: _Lease | None = None

    @property
    def left(self) -> int:
        return self.granted - self.spent


class TokenCache:
    """Clients found by their token's digest, each kept `ttl_s` from its lookup (docs/design.md, "The
    token cache"): a call that takes nothing from the client's bucket then costs no statement. Only
    tokens found are kept (an unknown one is looked up every time, so guessing fills nothing), at most
    `max_size` of them. Registrations taken from a bucket ahead of need (leases, `take`) are kept here
    too, as long as `ttl_s` allows and at most LEASE_S."""

    __slots__ = ("_found", "_leases", "_max_size", "_refills", "_ttl_s")

    def __init__(self, ttl_s: float, max_size: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._found: dict[bytes, tuple[float, Caller]] = {}
        self._leases: dict[bytes, _Lease] = {}
        # A take in flight per token: the process's other registrations by it that find no lease to
        # spend wait for it.
        self._refills: dict[bytes, asyncio.Future[None]] = {}

    def get(self, digest: bytes) -> Caller | None:
        kept = self._found.get(digest)
        if kept is None:
            return None
        if kept[0] <= time.monotonic():
            del self._found[digest]
            return None
        return kept[1]

    def put(self, digest: bytes, caller: Caller) -> None:
        if self._ttl_s <= 0:
            return
        if len(self._found) >= self._max_size:
            self._found.pop(next(iter(self._found)))  # the oldest lookup
        self._found[digest] = (time.monotonic() + self._ttl_s, caller)

    def clear(self) -> None:
        """After a revocation or rotation through this process: it stops its own at once."""
        self._found.clear()
        self._leases.clear()

    def _want(self, last: _Lease | None, count: int) -> int:
        """How many to take: twice what the last lease spent, if it ended lately (a busy token's leases
        grow to LEASE_MAX, a trickle's stay at 2); only `count` while the cache keeps nothing."""
        if self._ttl_s <= 0:
            return count
        if last is None or last.until < time.monotonic() - LEASE_S:
            return 2 * count
        return min(LEASE_MAX, max(count, 2 * last.spent))

    def _spendable(self, digest: bytes, count: int, now: float) -> _Lease | None:
        """The token's lease to spend `count` from: the current one, else the one taken after it (which
        becomes current); None when neither holds that many within its deadline."""
        lease = self._leases.get(digest)
        while lease is not None:
            if lease.left >= count and lease.until > now:
                return lease
            if lease.next is None:
                return None
            lease = self._leases[digest] = lease.next
        return None

    def _store(self, digest: bytes, lease: _Lease) -> None:
        if len(self._leases) >= self._max_size and digest not in self._leases:
            self._leases.pop(next(iter(self._leases)))
        self._leases[digest] = lease

    def _lease(self, caller: Caller, granted: int, spent: int) -> _Lease:
        now = time.monotonic()
        until = now + min(LEASE_S, self._ttl_s)
        return _Lease(caller, granted, now, until, spent=spent, own=spent)

    def _top_up_due(self, digest: bytes, lease: _Lease, now: float) -> bool:
        """Whether this registration takes the lease after `lease` now: it is down to half, calls after
        its take spent from it (a trickle's take of two never tops up), and at the pace so far it runs
        out before its deadline; one take per lease, none while another is in flight."""
        return (
            not lease.topped
            and 2 * lease.left <= lease.granted
            and lease.spent > lease.own
            and 2 * (now - lease.taken) <= lease.until - lease.taken
            and digest not in self._refills
        )

    async def take(
        self, db: RequestConnection, digest: bytes, count: int, *, default_rate: float
    ) -> tuple[Caller, float | None] | None:
        """`count` registrations of the token's client: from the process's lease when it holds that
        many, else by one statement that takes them from the bucket with up to twice what the last
        lease spent for later calls. A registration that brings a busy token's lease down to half
        takes the next lease before it answers, so the others keep spending meanwhile. As
        `authenticate` answers."""
        while True:
            now = time.monotonic()
            lease = self._spendable(digest, count, now)
            if lease is not None:
                lease.spent += count
                if self._top_up_due(digest, lease, now):
                    return await self._top_up(db, digest, lease, default_rate)
                return lease.caller, None
            refill = self._refills.get(digest)
            if refill is None:
                break
            await asyncio.shield(refill)
        lease = self._leases.get(digest)
        with self._refilling(digest):
            row = await db.fetchrow(_LEASE, digest, count, default_rate, self._want(lease, count))
            caller = _found_caller(row, digest)
            if caller is None:
                self._forget(digest)
                return None
            granted: int = row["granted"]
            if granted < count:
                return caller, float(row["wait_s"])
            if self._ttl_s > 0:
                self._store(digest, self._lease(caller, granted, spent=count))
            return caller, None

    async def _top_up(
        self, db: RequestConnection, digest: bytes, lease: _Lease, default_rate: float
    ) -> tuple[Caller, None] | None:
        """Take the lease after `lease` (count 0: nothing for this call, which spent from `lease`), up
        to twice what `lease` granted. The token is checked again: revoked or unknown, its leases go and
        this call is refused too."""
        lease.topped = True
        with self._refilling(digest):
            want = min(LEASE_MAX, 2 * lease.granted)
            row = await db.fetchrow(_LEASE, digest, 0, default_rate, want)
            caller = _found_caller(row, digest)
            if caller is None:
                self._forget(digest)
                return None
            granted: int = row["granted"]
            if granted > 0 and self._leases.get(digest) is lease:
                lease.next = self._lease(caller, granted, spent=0)
            return lease.caller, None

    def _forget(self, digest: bytes) -> None:
        """A take found the token revoked (or unknown): its lookups stop being answered from the cache
        too, not only its registrations."""
        self._leases.pop(digest, None)
        self._found.pop(digest, None)

    @contextmanager
    def _refilling(self, digest: bytes) -> Iterator[None]:
        """A take in flight for the token: the registrations that find no lease to spend wait for it."""
        refill = asyncio.get_running_loop().create_future()
        self._refills[digest] = refill
        try:
            yield
        finally:
            del self._refills[digest]
            refill.set_result(None)


async def authenticate(
    db: RequestConnection, token: str, *, take: int = 0, default_rate: float, cache: TokenCache
) -> tuple[Caller, float | None] | None:
    """The client this bearer token belongs to (None: unknown or revoked), and, when `take` > 0,
    whether its rate allows that many registrations now: None when it does (they are taken), else how
    many seconds until it would. A take comes from the bucket every replica shares, through the
    process's lease of it (`TokenCache.take`); a lookup alone may be answered by `cache`.

    Looked up by its SHA-256: how long the index search takes depends on the hash, which nobody can
    steer towards a stored one; the final comparison is constant-time all the same.
    """
    digest = token_digest(token)
    if take:
        return await cache.take(db, digest, take, default_rate=default_rate)
    cached = cache.get(digest)
    if cached is not None:
        return cached, None
    caller = _found_caller(await db.fetchrow(_AUTHENTICATE, digest), digest)
    if caller is None:
        return None
    cache.put(digest, caller)
    return caller, None


def _found_caller(row: Any, digest: bytes) -> Caller | None:
    """The client of a row of `_CLIENT` found by a token's digest; None when no row (unknown or revoked).
    The digest is compared again in constant time: the index search's timing is not."""
    if row is None or not hmac.compare_digest(row["token_sha256"], digest):
        return None
    return Caller(client_id=row["id"], name=row["name"], relay=row["relay"])


async def take_up_to(
    db: RequestConnection, client_id: int, count: int, *, default_rate: float
) -> tuple[int, float]:
    """Take up to `count` registrations from the client's bucket: how many it granted, and (when none)
    how many seconds until one would be."""
    row = await db.fetchrow(_TAKE_UP_TO, client_id, count, default_rate)
    assert row is not None  # the caller's own client: revoking it does not delete its row
    return int(row["granted"]), float(row["wait_s"])
