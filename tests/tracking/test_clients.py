"""Several clients tracking one relay task: the relay is asked once per turn, each record gets the answer."""

from __future__ import annotations

import pytest

from service.clients.service import create_client
from service.db import transaction
from service.upstream.fake import FakeRelay, Lifecycle
from tests.conftest import wait_until
from tests.tracking.conftest import Tracking


async def clients(tracking: Tracking, *names: str) -> list[int]:
    ids = []
    async with transaction(tracking.sessions) as session:
        for name in names:
            await create_client(
                session, name=name, relay=None, rate=None, relay_hooks=None, settings=tracking.settings
            )
    for name in names:
        [(client_id,)] = await tracking.fetch("SELECT id FROM clients WHERE name = :name", name=name)
        ids.append(client_id)
    return ids


async def records(tracking: Tracking, task_id: str) -> list[tuple[int | None, str, int, bool]]:
    rows = await tracking.fetch(
        "SELECT client_id, status, poll_count, shared FROM tasks WHERE task_id = :task_id ORDER BY id",
        task_id=task_id,
    )
    return [tuple(row) for row in rows]


async def histories(tracking: Tracking, task_id: str) -> list[list[tuple[object, ...]]]:
    rows = await tracking.fetch(
        "SELECT t.id, e.seq, e.type, e.from_status, e.to_status, e.source, e.clip_id FROM task_events e "
        "JOIN tasks t ON t.id = e.task_pk WHERE t.task_id = :task_id ORDER BY t.id, e.seq",
        task_id=task_id,
    )
    by_task: dict[int, list[tuple[object, ...]]] = {}
    for row in rows:
        by_task.setdefault(row[0], []).append(tuple(row[1:]))
    return list(by_task.values())


@pytest.mark.parametrize(
    ("lifecycle", "kind"), [(Lifecycle.MUSIC_SUCCESS, "music"), (Lifecycle.STEMS, "stems")]
)
async def test_the_relay_is_asked_once_per_turn_for_a_task_several_clients_track(
    tracking: Tracking, fake_relay: FakeRelay, lifecycle: Lifecycle, kind: str
) -> None:
    """The fake relay moves a task one stage per request: a second request in a turn would skip a
    stage for someone. The admin's record goes first and is polled twice alone before the clients
    register: from then on the three are claimed together whichever is due (batch and single paths)."""
    task_id = fake_relay.add_task(lifecycle=lifecycle)
    a, b = await clients(tracking, "a", "b")
    await tracking.register(task_id, kind)
    await tracking.poller.drain()
    await tracking.register(task_id, kind, client_id=a)
    await tracking.register(task_id, kind, client_id=b)

    async def all_complete() -> bool:
        before = fake_relay.task_requests[task_id]
        await tracking.poller.drain()
        assert fake_relay.task_requests[task_id] - before <= 1, "asked twice in one turn"
        return {status for _, status, _, _ in await records(tracking, task_id)} == {"complete"}

    await wait_until(all_complete, timeout=20, what="every record to complete")

    admins, *theirs = await histories(tracking, task_id)
    assert theirs[0] == theirs[1]
    # The clients saw, stage by stage, what the admin's record saw since they registered.
    steps = [[event[3] for event in history if event[5] is None] for history in (admins, theirs[0])]
    assert steps[1][0] == "submitted"
    assert steps[0][-len(steps[1]) + 1 :] == steps[1][1:]
    rows = await records(tracking, task_id)
    assert [(client, shared) for client, _, _, shared in rows] == [(None, True), (a, True), (b, True)]
    assert rows[0][2] == fake_relay.task_requests[task_id]  # the admin's record saw every request
