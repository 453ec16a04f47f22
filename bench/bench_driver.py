"""The dispatcher's claim and settle statements through a plain asyncpg connection (how the dispatcher
runs them) and through SQLAlchemy's lightest path (exec_driver_sql on an AsyncConnection: no
compilation, the same SQL and parameters), in this process's CPU time per delivery.

Each turn claims every one of 20,000 due deliveries 64 at a time and settles each claim as delivered,
then puts them back; the two drivers take turns, three times. docs/design.md, "The dispatcher's
driver connection", quotes this.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fresh_database, install_uvloop

from service.db import create_engine
from service.models import Delivery, Task
from service.webhooks.attempts import AttemptResult, outcome, settle
from service.webhooks.repository import Driver, claim_due_deliveries, record_attempts

DELIVERIES = 20_000
BATCH = 64
TURNS = 3
NEVER = datetime.max.replace(tzinfo=UTC)


class _Record(tuple[Any, ...]):
    """A row as asyncpg's Record answers: by position, or by column name."""

    keys_: tuple[str, ...]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self.keys_.index(key))
        return super().__getitem__(key)

    def keys(self) -> tuple[str, ...]:
        return self.keys_


class SQLAlchemyDriver:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        result = await self._connection.exec_driver_sql(query, args)
        keys = tuple(result.keys())
        rows = []
        for row in result:
            record = _Record(row)
            record.keys_ = keys
            rows.append(record)
        return rows

    async def execute(self, query: str, *args: Any) -> str:
        await self._connection.exec_driver_sql(query, args)
        return ""


class Timed:
    """The CPU time this process spends in a driver's statements (sending, waiting, reading rows)."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self.cpu_s = 0.0

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        started = time.process_time()
        try:
            return await self._driver.fetch(query, *args)
        finally:
            self.cpu_s += time.process_time() - started

    async def execute(self, query: str, *args: Any) -> str:
        started = time.process_time()
        try:
            return await self._driver.execute(query, *args)
        finally:
            self.cpu_s += time.process_time() - started


async def drain(driver: Driver) -> int:
    settled = 0
    while True:
        claim = await claim_due_deliveries(driver, limit=BATCH, lease_s=30, breaker_failures=20, probe_s=16)
        if not claim.deliveries:
            return settled
        now = datetime.now(UTC)
        batch = []
        for delivery in claim.deliveries:
            result = AttemptResult(at=now, duration_ms=1.0, status_code=204, response_body="")
            batch.append((delivery.host, False, outcome(delivery, result, settle(delivery, result, (5.0,)))))
        await record_attempts(driver, batch, breaker_failures=20, breaker_pause_s=60, jitter=0.2)
        settled += len(batch)


async def main() -> None:
    loop_name = install_uvloop()
    async with fresh_database() as url:
        engine = create_engine(url, pool_size=1)
        async with engine.begin() as connection:
            task_pk = (
                await connection.execute(
                    insert(Task)
                    .values(task_id="bench", kind="music", status="submitted", last_seq=1, next_poll_at=NEVER)
                    .returning(Task.id)
                )
            ).scalar_one()
            await connection.execute(
                insert(Delivery),
                [
                    {
                        "task_pk": task_pk,
                        "event_seq": n,
                        "webhook_id": f"msg_{n}",
                        "url": "http://127.0.0.1:9/h",
                        "body": b"{}",
                    }
                    for n in range(2, 2 + DELIVERIES)
                ],
            )
        dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        raw = await asyncpg.connect(dsn, server_settings={"jit": "off", "synchronous_commit": "off"})
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SET synchronous_commit = off")
            await connection.commit()
            wrapped = SQLAlchemyDriver(connection)
            load = os.getloadavg()[0]
            print(f"dispatcher statements, {loop_name}, {DELIVERIES:,} deliveries, claims of {BATCH}")
            print(f"  load average {load:.1f} before")
            figures: dict[str, list[float]] = {"asyncpg": [], "sqlalchemy": []}
            loops: dict[str, list[float]] = {"asyncpg": [], "sqlalchemy": []}
            for _ in range(TURNS):
                for name, driver in (("asyncpg", raw), ("sqlalchemy", wrapped)):
                    timed = Timed(driver)
                    cpu = time.process_time()
                    settled = await drain(timed)
                    if name == "sqlalchemy":
                        await connection.commit()
                    loops[name].append((time.process_time() - cpu) / settled * 1e6)
                    figures[name].append(timed.cpu_s / settled * 1e6)
                    await raw.execute(
                        "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(), "
                        "delivered_at = NULL; DELETE FROM delivery_attempts"
                    )
            for label, table in (("in the statements", figures), ("in the whole loop", loops)):
                for name, values in table.items():
                    turns = ", ".join(f"{value:.1f}" for value in values)
                    print(f"  {name:<11} {min(values):5.1f} us CPU per delivery {label} (turns: {turns})")
            ratio = min(figures["sqlalchemy"]) / min(figures["asyncpg"])
            print(f"  statements: sqlalchemy / asyncpg {ratio:.2f}x")
        await raw.close()
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
