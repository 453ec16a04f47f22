"""Every lifecycle the fake relay scripts, polled for real, ends with exactly the expected history."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from service.upstream.fake import FakeRelay, FaultKind, Lifecycle
from tests.tracking.conftest import EventTuple, Tracking


def clip_steps(
    seq: int, clips: tuple[str, ...], before: str | None, after: str, source: str = "poll"
) -> list[EventTuple]:
    return [(seq + n, "transition", before, after, source, clip_id) for n, clip_id in enumerate(clips)]


def music_history(clips: tuple[str, ...], last: str = "complete") -> list[EventTuple]:
    """Register, then one poll per relay stage: SUBMITTED, QUEUED, IN_PROGRESS, then `last`."""
    return [
        (1, "transition", None, "submitted", "register", None),
        *clip_steps(2, clips, None, "submitted"),
        (4, "transition", "submitted", "queued", "poll", None),
        *clip_steps(5, clips, "submitted", "queued"),
        (7, "transition", "queued", "in_progress", "poll", None),
        *clip_steps(8, clips, "queued", "in_progress"),
        (10, "transition", "in_progress", last, "poll", None),
        *clip_steps(11, clips, "in_progress", last),
    ]


async def test_music_success(tracking: Tracking, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    clips = fake_relay.clip_ids(task_id)
    assert await tracking.events(task_id) == music_history(clips)
    task = await tracking.task(task_id)
    assert (task.next_poll_at, task.upstream_status, task.progress, task.fail_reason) == (
        None, "SUCCESS", 100, None,
    )  # fmt: skip
    assert task.finished_at is not None
    assert json.loads(task.last_answer)["status"] == "SUCCESS"
    stored = await tracking.clips(task_id)
    assert [(c.clip_id, c.status, c.audio_url, c.duration) for c in stored] == [
        (clips[0], "complete", f"https://cdn1.suno.ai/{clips[0]}.mp3", 201.48),
        (clips[1], "complete", f"https://cdn1.suno.ai/{clips[1]}.mp3", 187.32),
    ]
    # Terminal stops polling: the relay was asked once per stage and never again.
    await tracking.poller.drain()
    assert fake_relay.task_requests[task_id] == 4
    assert fake_relay.requests["fetch_batch"] == 4


async def test_music_failure_keeps_the_reason(tracking: Tracking, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_FAILURE)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "failed")

    clips = fake_relay.clip_ids(task_id)
    assert await tracking.events(task_id) == music_history(clips, last="failed")
    task = await tracking.task(task_id)
    assert task.fail_reason.startswith("Unable to generate audio: the lyrics were flagged by moderation")
    assert [c.error for c in await tracking.clips(task_id)] == [task.fail_reason, task.fail_reason]


async def test_lyrics(tracking: Tracking, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.LYRICS)
    await tracking.register(task_id, kind="lyrics")

    await tracking.poll_until(task_id, "complete")

    assert await tracking.events(task_id) == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "in_progress", "poll", None),
        (3, "transition", "in_progress", "complete", "poll", None),
    ]
    task = await tracking.task(task_id)
    assert json.loads(task.last_answer)["data"]["text"].startswith("[Verse]")
    assert fake_relay.requests["fetch_batch"] == 3


async def test_stems_polls_the_stems_endpoint_and_tracks_stem_clips(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    source_clip = fake_relay.add_task(lifecycle=Lifecycle.STEMS)
    await tracking.register(source_clip, kind="stems")

    await tracking.poll_until(source_clip, "complete")

    stems = fake_relay.clip_ids(source_clip)
    assert await tracking.events(source_clip) == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "queued", "poll", None),
        *clip_steps(3, stems, None, "queued"),
        (5, "transition", "queued", "in_progress", "poll", None),
        *clip_steps(6, stems, "queued", "in_progress"),
        (8, "transition", "in_progress", "complete", "poll", None),
        *clip_steps(9, stems, "in_progress", "complete"),
    ]
    assert [c.title for c in await tracking.clips(source_clip)] == [
        "Neon Harbor - Vocals",
        "Neon Harbor - Instrumental",
    ]
    assert (fake_relay.requests["stems"], fake_relay.requests["fetch_batch"]) == (3, 0)


async def test_v1_dialect(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNO_API_DIALECT="v1")
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    assert await tracking.events(task_id) == music_history(fake_relay.clip_ids(task_id))
    task_level = [d and d.get("upstream_status") for d in await tracking.details(task_id)][::3]
    assert task_level == [None, "queued", "processing", "completed"]
    assert (fake_relay.requests["v1"], fake_relay.requests["fetch_batch"]) == (4, 0)


async def test_unknown_status_in_between_is_an_anomaly(tracking: Tracking, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.UNKNOWN_BLIP)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    clips = fake_relay.clip_ids(task_id)
    assert await tracking.events(task_id) == [
        (1, "transition", None, "submitted", "register", None),
        *clip_steps(2, clips, None, "submitted"),
        (4, "transition", "submitted", "queued", "poll", None),
        *clip_steps(5, clips, "submitted", "queued"),
        (7, "anomaly", "queued", "queued", "poll", None),
        (8, "transition", "queued", "in_progress", "poll", None),
        *clip_steps(9, clips, "queued", "in_progress"),
        (11, "transition", "in_progress", "complete", "poll", None),
        *clip_steps(12, clips, "in_progress", "complete"),
    ]
    assert (await tracking.details(task_id))[6] == {"anomaly": "unknown_status", "upstream_status": "UNKNOWN"}


async def test_regression_is_an_anomaly_and_never_moves_the_status_back(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    """A lagging replica answers QUEUED after IN_PROGRESS: noted once, status kept, then completed."""
    task_id = fake_relay.add_task(
        stages=["SUBMITTED", "IN_PROGRESS", "QUEUED", "QUEUED", "IN_PROGRESS", "SUCCESS"]
    )
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    clips = fake_relay.clip_ids(task_id)
    assert await tracking.events(task_id) == [
        (1, "transition", None, "submitted", "register", None),
        *clip_steps(2, clips, None, "submitted"),
        (4, "transition", "submitted", "in_progress", "poll", None),
        *clip_steps(5, clips, "submitted", "in_progress"),
        (7, "anomaly", "in_progress", "in_progress", "poll", None),
        (8, "transition", "in_progress", "complete", "poll", None),
        *clip_steps(9, clips, "in_progress", "complete"),
    ]
    assert (await tracking.details(task_id))[6] == {
        "anomaly": "regression", "upstream_status": "QUEUED", "reported": "queued",
    }  # fmt: skip
    assert fake_relay.task_requests[task_id] == 6


async def test_scripted_regression_after_complete_is_never_polled(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    """The relay's REGRESSION script goes back to QUEUED after SUCCESS: terminal stops polling, so
    the lagging answer is never asked for and the history is a plain success."""
    task_id = fake_relay.add_task(lifecycle=Lifecycle.REGRESSION)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")
    await tracking.poller.drain()

    assert await tracking.events(task_id) == music_history(fake_relay.clip_ids(task_id))
    assert fake_relay.task_requests[task_id] == 4


async def test_missing_from_batch_is_polled_singly_and_noted_after_several_misses(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    fake_relay.inject(FaultKind.MISSING, task_id=task_id, times=3)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    clips = fake_relay.clip_ids(task_id)
    # Each miss is followed by a single GET that sees the next stage; the third miss is an anomaly.
    assert await tracking.events(task_id) == [
        (1, "transition", None, "submitted", "register", None),
        *clip_steps(2, clips, None, "submitted"),
        (4, "transition", "submitted", "queued", "poll", None),
        *clip_steps(5, clips, "submitted", "queued"),
        (7, "anomaly", "queued", "queued", "poll", None),
        (8, "transition", "queued", "in_progress", "poll", None),
        *clip_steps(9, clips, "queued", "in_progress"),
        (11, "transition", "in_progress", "complete", "poll", None),
        *clip_steps(12, clips, "in_progress", "complete"),
    ]
    assert (await tracking.details(task_id))[6] == {"anomaly": "missing_from_batch", "times": 3}
    assert (fake_relay.requests["fetch_batch"], fake_relay.requests["fetch"]) == (4, 3)
    task = await tracking.task(task_id)
    assert (task.missing_count, task.last_error) == (0, None)
