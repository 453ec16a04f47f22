"""The `sunotrack` command as a user meets it: real processes, real sockets, the suite's PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import TEST_ADMIN_TOKEN, scratch_database

COMMAND = [sys.executable, "-c", "from service.cli import main; main()"]
PASSWORD = "s3cret-pw-never-shown"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cli_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """Only what the test sets: nothing of the developer's SUNO*/DATABASE_URL environment."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SUNOTRACK_DATA_DIR": str(tmp_path / "data"),
        "SUNOTRACK_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
        **variables,
    }


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=90, check=False)


@pytest.fixture
async def empty_database(postgres_server_url: str) -> AsyncIterator[str]:
    """A database with no schema yet (postgresql:// URL): what a first `serve` meets."""
    async with scratch_database(postgres_server_url) as name:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)


async def has_schema(url: str) -> bool:
    connection = await asyncpg.connect(url)
    try:
        return bool(await connection.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL"))
    finally:
        await connection.close()


@pytest.mark.parametrize("variable", ["SUNOTRACK_ADMIN_TOKEN", "SUNOTRACK_CALLBACK_TOKEN"])
@pytest.mark.parametrize("value", ["", "too-short"])
def test_serve_stops_on_an_empty_or_short_token_naming_it(variable: str, value: str, tmp_path: Path) -> None:
    result = run_cli("serve", "--port", str(free_port()), env=cli_env(tmp_path, **{variable: value}))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"sunotrack: {variable}: ")
    assert not (tmp_path / "data").exists()


def unreachable_urls(postgres_server_url: str) -> dict[str, str]:
    closed = free_port()
    server = make_url(postgres_server_url)
    return {
        "closed port": f"postgresql://sunotrack:{PASSWORD}@127.0.0.1:{closed}/sunotrack",
        "bad host": f"postgresql://sunotrack:{PASSWORD}@no-such-host.invalid:5432/sunotrack",
        "wrong role": server.set(username="no_such_role", password=PASSWORD).render_as_string(
            hide_password=False
        ),
        "malformed": f"postgresql://sunotrack:{PASSWORD}@db:port/sunotrack",
        "no host, no database": "postgresql://",
    }


CAUSES = {
    "closed port": "connection refused",
    "bad host": "cannot resolve the host 'no-such-host.invalid'",
    "wrong role": "no_such_role",
    "malformed": "not a valid URL",
    "no host, no database": "names no host",
}


@pytest.mark.parametrize(
    ("command", "case"),
    [("serve", case) for case in CAUSES]
    + [("migrate", case) for case in CAUSES]
    # The demo takes the same paths as serve: one failure to connect, one refused login, one bad URL.
    + [("demo", "closed port"), ("demo", "wrong role"), ("demo", "malformed")],
)
def test_an_unusable_database_url_is_one_line_naming_it(
    command: str, case: str, postgres_server_url: str, tmp_path: Path
) -> None:
    url = unreachable_urls(postgres_server_url)[case]
    args = [command] if command == "migrate" else [command, "--port", str(free_port())]

    result = run_cli(*args, env=cli_env(tmp_path, DATABASE_URL=url))

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("sunotrack: DATABASE_URL: ")
    assert CAUSES[case] in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_serve_finds_its_port_taken_before_it_migrates(
    taken_port: int, empty_database: str, tmp_path: Path
) -> None:
    result = run_cli("serve", "--port", str(taken_port), env=cli_env(tmp_path, DATABASE_URL=empty_database))

    assert result.returncode == 2
    assert (
        result.stderr
        == f"sunotrack: port {taken_port} is in use on 127.0.0.1: stop what holds it or pick --port\n"
    )
    assert not await has_schema(empty_database)


def test_the_demo_finds_its_port_taken_before_it_starts_anything(taken_port: int, tmp_path: Path) -> None:
    result = run_cli("demo", "--port", str(taken_port), env=cli_env(tmp_path))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sunotrack: port {taken_port} is in use on 127.0.0.1: stop what holds it or pick --port"
    ]
    assert not (tmp_path / "data").exists()


def wait_ready(port: int, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"serve was not ready on port {port} within {timeout} s")


async def test_serve_logs_only_json_lines_and_stops_quietly_on_sigint(
    empty_database: str, tmp_path: Path
) -> None:
    """uvicorn's and alembic's records go through the same renderer as ours: one JSON object a line."""
    port = free_port()
    env = cli_env(tmp_path, DATABASE_URL=empty_database, SUNOTRACK_LOG_LEVEL="info")
    process = subprocess.Popen(
        [*COMMAND, "serve", "--port", str(port), "--access-log"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_ready(port, process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert stdout == ""
    records = [json.loads(line) for line in stderr.splitlines()]
    assert all(
        isinstance(record, dict) and {"event", "level", "timestamp"} <= record.keys() for record in records
    )
    loggers = {record.get("logger") for record in records}
    assert {"uvicorn.error", "uvicorn.access", "alembic.runtime.migration"} <= loggers
    events = [record["event"] for record in records]
    assert {"db.migrated", "app.started", "http.listening", "app.stopped"} <= set(events)
    assert any(event.startswith("Running upgrade") for event in events)
    assert any("GET /readyz" in event for event in events)
