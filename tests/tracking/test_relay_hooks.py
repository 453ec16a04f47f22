"""Hooks the relay reports, as the recorder keeps them: which hook each transition's outbox row names."""

from __future__ import annotations

from service.upstream.fake import Advance, FakeRelay, Lifecycle
from tests.conftest import wait_until
from tests.tracking.conftest import Tracking

HOOK_A = "http://127.0.0.1:9/a"
HOOK_B = "http://127.0.0.1:9/b"


async def outbox(tracking: Tracking, task_id: str) -> list[tuple[int, str]]:
    rows = await tracking.fetch(
        "SELECT d.event_seq, d.url FROM deliveries d JOIN tasks t ON t.id = d.task_pk "
        "WHERE t.task_id = :task_id ORDER BY d.event_seq",
        task_id=task_id,
    )
    return [(row.event_seq, row.url) for row in rows]


async def test_a_quiet_task_whose_answers_name_another_hook_takes_it(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    """The answer's digest covers the hook: an answer that changed nothing else is not taken for the
    last one, which the claim alone would record."""
    task_id = fake_relay.add_task(stages=["IN_PROGRESS"], advance=Advance.MANUAL, notify_hook=HOOK_A)
    await tracking.register(task_id)
    await tracking.poll_until(task_id, "in_progress")
    for _ in range(3):  # the same answer again: nothing to compare
        await tracking.poller.drain()
    fake_relay.set_notify_hook(task_id, HOOK_B)

    async def took_b() -> bool:
        return (await tracking.task(task_id)).notify_hook == HOOK_B

    await wait_until(took_b, step=tracking.poller.drain)
    task = await tracking.task(task_id)
    assert (task.notify_hook, task.notify_hook_source, task.relay_notify_hook) == (HOOK_B, "relay", HOOK_B)
    details = [d for d in await tracking.details(task_id) if d and "anomaly" in d]
    assert details == [{"anomaly": "relay_hook_replaced", "notify_hook": HOOK_B, "previous": HOOK_A}]
    assert await outbox(tracking, task_id) == [(2, HOOK_A)]


async def test_a_hook_registered_later_replaces_the_adopted_one_for_good(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(
        lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.MANUAL, notify_hook=HOOK_A
    )
    await tracking.register(task_id)
    fake_relay.advance(task_id)
    await tracking.poll_until(task_id, "queued")
    await tracking.register(task_id, notify_hook=HOOK_B)
    fake_relay.advance(task_id, 2)
    await tracking.poll_until(task_id, "complete")

    task = await tracking.task(task_id)
    assert (task.notify_hook, task.notify_hook_source) == (HOOK_B, "client")
    seqs = {event[3]: event[0] for event in await tracking.events(task_id) if event[5] is None}
    assert await outbox(tracking, task_id) == [(seqs["queued"], HOOK_A), (seqs["complete"], HOOK_B)]
