"""Plumbing the benchmarks share: the event loop they measure on and a fresh migrated database."""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from service.db import create_engine, migrate


def install_uvloop() -> str:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


@asynccontextmanager
async def fresh_database(keep: str | None = None) -> AsyncIterator[str]:
    """A migrated database of its own, dropped afterwards. `keep`: a name, for a database kept between
    runs (migrated to the head each time): on DATABASE_URL's server, else in an embedded PostgreSQL whose
    data directory is /tmp/st-bench-<keep>."""
    server = None
    root = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        if keep:
            root = Path(f"/tmp/st-bench-{keep}")
            root.mkdir(exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="st-bench-", dir="/tmp"))
        (root / "run").mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(root / "run")
        import pgserver  # noqa: PLC0415

        # pgserver's own exit hook touches its runtime directory again; exit hooks run last-registered
        # first, so this one, registered before pgserver's, removes the directory after it.
        if not keep:
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        server = pgserver.get_server(root / "pg", cleanup_mode="stop")
        base = server.get_uri()
    admin_url = make_url(base).set(drivername="postgresql")
    name = f"bench_{keep}" if keep else f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url.render_as_string(hide_password=False))
    try:
        if not await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
        url = admin_url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
        engine = create_engine(url, pool_size=2)
        await migrate(engine)
        await engine.dispose()
        yield url
        if not keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
        if server is not None:
            server.cleanup()
        if root is not None and not keep:
            shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_ready(base: str, server: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until the server at `base` answers /readyz (its database reached); SystemExit if it exits or
    takes longer than `timeout_s`."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                async with http.get(f"{base}/readyz") as ready:
                    if ready.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            await asyncio.sleep(0.1)


@asynccontextmanager
async def api_server(url: str, admin_token: str) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """`sunotrack serve --role api` in a process of its own on DATABASE_URL=url (nothing polled or
    delivered), ready: its base URL and process."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "SUNOTRACK_ADMIN_TOKEN": admin_token}
    env["SUNOTRACK_LOG_LEVEL"] = "warning"
    env.pop("SUNO_BASE_URL", None)
    argv = ["serve", "--role", "api", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(  # noqa: ASYNC220  (started once, before anything is measured)
        [sys.executable, "-c", "from service.cli import main; main()", *argv], env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, server)
        yield base, server
    finally:
        server.terminate()
        server.wait(30)


async def timed(call: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    for _ in range(min(50, requests)):  # warm-up: connections, prepared statements, caches
        await call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def concurrent(
    clients: int, seconds: float, call: Callable[[], Awaitable[object]]
) -> tuple[float, list[float]]:
    """`clients` callers, each making its next call as soon as the last returns, for `seconds`: calls/s
    and each call's latency (ms). For calls wrk cannot make (each its own token, several statements)."""
    samples: list[float] = []
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - started) * 1000)

    began = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return len(samples) / (time.monotonic() - began), samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[int(len(ordered) * 0.95) - 1],
        "p99": ordered[int(len(ordered) * 0.99) - 1],
        "max": ordered[-1],
    }


def keep_name(value: str) -> str:
    """--keep's argument: a database name's tail."""
    if not re.fullmatch(r"[a-z0-9_]{1,40}", value):
        raise ValueError(value)
    return value


# --- load from wrk -----------------------------------------------------------------------------------

WRK_SCRIPT = Path(__file__).with_name("wrk_load.lua")


def require_wrk() -> str:
    """wrk's path, or SystemExit saying how to get it: the API benchmarks' load comes from wrk (C, a few
    percent of a core at these rates), not from a Python client that would eat a core of the two."""
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit(
            "this benchmark needs wrk, the HTTP load generator, which is not installed: "
            "`apt-get install -y wrk` (Debian's package), then run it again"
        )
    return found


@dataclass(frozen=True, slots=True)
class Load:
    """What one wrk run measured: calls answered (each with the expected status), over `seconds`, their
    latency percentiles (ms), and the CPU seconds wrk itself used."""

    calls: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    generator_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds


async def wrk_load(
    base: str,
    path: str,
    *,
    mode: str,
    connections: int,
    seconds: float,
    expect: int,
    token: str | None = None,
    ids: list[str] | None = None,
    prefix: str = "",
    batch: int = 1,
) -> Load:
    """`connections` clients of wrk, each sending its next call as soon as the last is answered, for
    `seconds`. mode "get": GET base + path + a random one of `ids`; "post": POST base + path
    {"task_id": new id}; "batch": POST base + path {"tasks": [`batch` new ids]}. New ids are
    `prefix`-<thread>-<n>. Any status but `expect`, a socket error or a timeout ends the benchmark
    (SystemExit) with the first unexpected answer."""
    wrk = require_wrk()
    with tempfile.NamedTemporaryFile("w", prefix="wrk-ids-", suffix=".txt") as id_file:
        id_file.write("".join(f"{task_id}\n" for task_id in ids or []))
        id_file.flush()
        given = id_file.name if mode == "get" else prefix
        argv = [wrk, "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s"]
        argv += ["--timeout", "30s", "-s", str(WRK_SCRIPT), base, "--"]
        argv += [mode, path, token or "-", str(expect), given, str(batch)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # In a thread: asyncio's own subprocesses need a child watcher that uvloop's policy lacks.
        process = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text, err = process.stdout, process.stderr
    figures = next((line.split()[1:] for line in text.splitlines() if line.startswith("wrk_load ")), None)
    if process.returncode != 0 or figures is None:
        raise SystemExit(f"wrk failed ({process.returncode}): {err[-2000:]}{text[-2000:]}")
    values = {key: int(value) for key, value in (field.split("=") for field in figures)}
    sample = next(line for line in text.splitlines() if line.startswith("wrk_load_sample"))
    if values["unexpected"] or values["socket_errors"] or values["timeouts"]:
        raise SystemExit(
            f"wrk {mode} {path}: {values['unexpected']} answers not {expect}, "
            f"{values['socket_errors']} socket errors, {values['timeouts']} timeouts; "
            f"first unexpected: {sample.removeprefix('wrk_load_sample').strip()[:400]}"
        )
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Load(
        calls=values["requests"] * batch,
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        generator_cpu_s=cpu,
    )
