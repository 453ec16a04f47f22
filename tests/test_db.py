"""The engine through PgBouncer in transaction pooling mode, where each transaction may land on another
server connection."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.db import create_engine

CLIENTS = 8


async def run_transactions(engine: AsyncEngine) -> list[str]:
    """Eight clients, thirty transactions each, of statements that differ by client (so that a
    statement prepared by one is no use to another); returns the errors."""
    errors: list[str] = []

    async def client(n: int) -> None:
        for i in range(30):
            try:
                async with engine.begin() as connection:
                    await connection.execute(text(f"SELECT {n} + :i"), {"i": i})
                    await connection.execute(text("SELECT count(*) FROM tasks WHERE id > :i"), {"i": i})
            except Exception as exc:
                errors.append(str(exc))

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    await engine.dispose()
    return errors


async def test_the_transaction_pooler_engine_works_through_pgbouncer(
    pgbouncer: str, database_url: str
) -> None:
    url = make_url(pgbouncer).set(drivername="postgresql+asyncpg", database=make_url(database_url).database)

    pooled = create_engine(url.render_as_string(False), pool_size=CLIENTS, transaction_pooler=True)
    assert await run_transactions(pooled) == []

    # The control: the driver's defaults (named prepared statements, cached per client connection)
    # through the same PgBouncer meet statements another client prepared, or none at all.
    plain = create_async_engine(url.render_as_string(False), pool_size=CLIENTS, max_overflow=0)
    errors = await run_transactions(plain)
    assert errors != []
    assert all("prepared statement" in error for error in errors), errors[:3]
