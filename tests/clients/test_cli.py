"""`sunotrack clients ...` against the suite's PostgreSQL, as an operator runs it: JSON on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, auth_headers
from tests.test_cli import cli_env, run_cli


def clients(database_url: str, tmp_path: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run one `clients` command: its exit status, each JSON line of stdout, and stderr."""
    env = cli_env(tmp_path, DATABASE_URL=database_url.replace("+asyncpg", ""))
    done = run_cli("clients", *args, env=env)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_create_list_revoke_and_rotate(database_url: str, tmp_path: Path) -> None:
    code, [created], _ = clients(database_url, tmp_path, "create", "shop-a", "--rate", "5")
    assert code == 0
    assert list(created) == ["name", "token", "webhook_secret", "relay"]
    assert (created["name"], created["relay"]) == ("shop-a", "default")
    assert created["webhook_secret"].startswith("whsec_")
    clients(database_url, tmp_path, "create", "shop-b", "--relay-hooks", "ignore")

    code, listed, stderr = clients(database_url, tmp_path, "list")
    assert code == 0
    assert [(c["name"], c["rate"], c["relay_hooks"], c["task_count"], c["revoked_at"]) for c in listed] == [
        ("shop-a", 5.0, None, 0, None),
        ("shop-b", None, "ignore", 0, None),
    ]
    assert {"name", "relay", "created_at", "revoked_at", "task_count"} <= set(listed[0])

    _, [token], _ = clients(database_url, tmp_path, "rotate-token", "shop-a")
    _, [secret], _ = clients(database_url, tmp_path, "rotate-secret", "shop-a", "--grace-s", "60")
    _, [revoked], _ = clients(database_url, tmp_path, "revoke", "shop-a")
    assert list(token) == ["name", "token"]
    assert token["token"] != created["token"]
    assert (secret["name"], secret["previous_secret_until"] is not None) == ("shop-a", True)
    assert revoked["revoked_at"] is not None
    _, listed_after, stderr_after = clients(database_url, tmp_path, "list")
    for value in (created["token"], created["webhook_secret"], token["token"], secret["webhook_secret"]):
        assert value not in json.dumps(listed_after) + stderr + stderr_after


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("create", "has space"), "name"),
        (("create", "shop-x", "--relay", "elsewhere"), "known: default"),
        (("create", "shop-x", "--rate", "0"), "rate"),
        (("revoke", "nobody"), "nobody"),
        (("rotate-secret", "nobody", "--grace-s", "-1"), "--grace-s"),
    ],
)
def test_mistakes_are_one_line_on_stderr(
    database_url: str, tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    code, outputs, stderr = clients(database_url, tmp_path, *args)

    assert (code, outputs) == (1, [])
    assert named in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_taken_name_is_refused(database_url: str, tmp_path: Path) -> None:
    clients(database_url, tmp_path, "create", "shop-a")

    code, outputs, stderr = clients(database_url, tmp_path, "create", "shop-a")

    assert (code, outputs) == (1, [])
    assert "already exists" in stderr


async def test_a_token_from_the_cli_works_against_the_service_until_rotated(
    database_url: str,
    tmp_path: Path,
    make_settings: Any,
    live_server: Any,
) -> None:
    server: LiveServer = live_server(make_settings())
    _, [created], _ = clients(database_url, tmp_path, "create", "shop-a")
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(created["token"])) as shop:
        assert (await shop.post("/api/v1/tasks", json={"task_id": "t-1"})).status_code == 201
        clients(database_url, tmp_path, "rotate-token", "shop-a")
        assert (await shop.get("/api/v1/tasks")).status_code == 401
