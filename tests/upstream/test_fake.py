"""The fake relay's lifecycles, advancement, faults and bookkeeping, observed through RelayClient."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from service.upstream.client import RelayClient
from service.upstream.fake import Advance, FakeRelay, FaultKind, Lifecycle, Stage
from service.upstream.schemas import PermanentUpstreamError, TaskSnapshot, TransientUpstreamError
from service.vocabulary import STATUS_RANK, TaskStatus
from tests.conftest import wait_until
from tests.upstream.conftest import API_KEY

S = TaskStatus


async def poll(client: RelayClient, task_id: str, times: int) -> list[TaskSnapshot]:
    return [await client.fetch(task_id) for _ in range(times)]


async def test_music_success(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    clip_ids = relay.clip_ids(task_id)
    seen = await poll(client, task_id, 5)
    assert [s.status for s in seen] == [S.SUBMITTED, S.QUEUED, S.IN_PROGRESS, S.COMPLETE, S.COMPLETE]
    assert [s.raw_status for s in seen] == ["SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS", "SUCCESS"]
    submitted, queued, streaming, complete, _ = seen
    assert [c.status for c in queued.clips] == [S.QUEUED, S.QUEUED]
    assert [(c.status, c.audio_url, c.video_url) for c in streaming.clips] == [
        (S.IN_PROGRESS, f"https://audiopipe.suno.ai/?item_id={clip_id}", None) for clip_id in clip_ids
    ]
    assert [(c.status, c.audio_url, c.video_url) for c in complete.clips] == [
        (S.COMPLETE, f"https://cdn1.suno.ai/{clip_id}.mp3", f"https://cdn1.suno.ai/{clip_id}.mp4")
        for clip_id in clip_ids
    ]
    assert all(c.duration and c.title == "Neon Harbor" for c in complete.clips)
    assert (submitted.progress, streaming.progress, complete.progress) == (0, 45, 100)
    assert submitted.submitted_at is not None
    assert (submitted.started_at, submitted.finished_at) == (None, None)
    assert streaming.started_at is not None
    assert streaming.finished_at is None
    assert complete.finished_at is not None
    assert (complete.fail_reason, complete.lyrics) == (None, None)


async def test_documents_are_realistic(relay: FakeRelay, client: RelayClient) -> None:
    """Shaped and sized like the documented fetch example (~6.5 KB, two clips with prompts)."""
    task_id = relay.add_task()
    relay.advance(task_id, 3)
    raw = json.loads((await client.fetch(task_id)).raw)
    assert 5_000 < len((await client.fetch(task_id)).raw) < 9_000
    assert set(raw) == {
        "task_id",
        "notify_hook",
        "action",
        "status",
        "fail_reason",
        "submit_time",
        "start_time",
        "finish_time",
        "progress",
        "data",
    }
    assert [(c["metadata"]["type"], c["state"], len(c["prompt"]) > 500) for c in raw["data"]] == [
        ("gen", "succeeded", True)
    ] * 2


async def test_music_failure(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_FAILURE)
    seen = await poll(client, task_id, 4)
    assert [s.status for s in seen] == [S.SUBMITTED, S.QUEUED, S.IN_PROGRESS, S.FAILED]
    failed = seen[-1]
    assert failed.fail_reason is not None
    assert failed.fail_reason.startswith("Unable to generate audio")
    assert [(c.status, c.raw_status, c.error) for c in failed.clips] == [
        (S.FAILED, "error", failed.fail_reason)
    ] * 2
    assert json.loads(failed.raw)["fail_reason"] == ""


async def test_lyrics(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.LYRICS)
    seen = await poll(client, task_id, 3)
    assert [(s.status, s.clips) for s in seen] == [(S.SUBMITTED, ()), (S.IN_PROGRESS, ()), (S.COMPLETE, ())]
    assert [s.lyrics is not None for s in seen] == [False, False, True]
    assert seen[-1].lyrics is not None
    assert seen[-1].lyrics.text.startswith("[Verse]")
    assert seen[-1].lyrics.title
    assert task_id.startswith("task_")
    assert len(task_id) == len("task_") + 32
    data = json.loads(seen[-1].raw)["data"]
    assert (set(data), data["status"]) == ({"id", "text", "title", "status"}, "complete")


async def test_stems_start_on_first_call_for_a_song_clip(relay: FakeRelay, client: RelayClient) -> None:
    song = relay.add_task(title="City Lights")
    source = relay.clip_ids(song)[0]
    seen = [await client.fetch_stems(source) for _ in range(4)]
    assert [(s.task_id, s.status) for s in seen] == [
        (source, S.QUEUED),
        (source, S.IN_PROGRESS),
        (source, S.COMPLETE),
        (source, S.COMPLETE),
    ]
    assert [c.title for c in seen[0].clips] == ["City Lights - Vocals", "City Lights - Instrumental"]
    assert [c.audio_url is None for c in seen[0].clips] == [True, True]
    assert all(c.audio_url for c in seen[-1].clips)
    # Stem clips keep their ids from one poll to the next.
    assert len({tuple(c.id for c in s.clips) for s in seen}) == 1
    raw = json.loads(seen[0].raw)
    assert [(c["metadata"]["type"], c["metadata"]["stem_from_id"]) for c in raw["clips"]] == [
        ("stem", source)
    ] * 2
    assert relay.requests["stems"] == 4


async def test_stems_for_an_unknown_clip(client: RelayClient) -> None:
    with pytest.raises(PermanentUpstreamError) as info:
        await client.fetch_stems("00000000-0000-4000-8000-000000000000")
    assert info.value.code == "task_not_exist"


async def test_v1_renders_the_same_lifecycle(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task()
    seen = [await client.fetch_v1(task_id) for _ in range(4)]
    assert [(s.status, s.raw_status) for s in seen] == [
        (S.SUBMITTED, "submitted"),
        (S.QUEUED, "queued"),
        (S.IN_PROGRESS, "processing"),
        (S.COMPLETE, "completed"),
    ]
    raw = json.loads(seen[-1].raw)
    assert list(raw["clips"]) == list(relay.clip_ids(task_id))
    assert isinstance(raw["input"], str)
    assert relay.requests["v1"] == 4


async def test_unknown_status_between_stages(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.UNKNOWN_BLIP)
    seen = await poll(client, task_id, 5)
    assert [(s.status, s.raw_status) for s in seen] == [
        (S.SUBMITTED, "SUBMITTED"),
        (S.QUEUED, "QUEUED"),
        (None, "UNKNOWN"),
        (S.IN_PROGRESS, "IN_PROGRESS"),
        (S.COMPLETE, "SUCCESS"),
    ]


async def test_regression(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.REGRESSION)
    statuses = [s.status for s in await poll(client, task_id, 7)]
    assert statuses == [S.SUBMITTED, S.QUEUED, S.IN_PROGRESS, S.COMPLETE, S.QUEUED, S.COMPLETE, S.COMPLETE]


async def test_never_finishes(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.NEVER_FINISHES)
    relay.advance(task_id, 100)
    assert {s.status for s in await poll(client, task_id, 5)} == {S.IN_PROGRESS}


async def test_custom_stages(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(
        stages=["NOT_START", "IN_PROGRESS", "QUEUED", Stage("FAILURE", "error", fail_reason="no credits")]
    )
    seen = await poll(client, task_id, 4)
    assert [(s.status, s.fail_reason) for s in seen] == [
        (S.SUBMITTED, None),
        (S.IN_PROGRESS, None),
        (S.QUEUED, None),
        (S.FAILED, "no credits"),
    ]
    with pytest.raises(ValueError, match="at least one stage"):
        relay.add_task(stages=[])


async def test_manual_advance(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(advance=Advance.MANUAL)
    assert [s.status for s in await poll(client, task_id, 3)] == [S.SUBMITTED] * 3
    relay.advance(task_id)
    assert (await client.fetch(task_id)).status == S.QUEUED
    relay.advance(task_id, 2)
    assert relay.stage_of(task_id).status == "SUCCESS"
    assert (await client.fetch(task_id)).status == S.COMPLETE


async def test_timed_advance(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task(advance=Advance.TIMED, stage_s=0.05)
    seen: list[TaskStatus | None] = []

    async def complete() -> bool:
        seen.append((await client.fetch(task_id)).status)
        return seen[-1] is S.COMPLETE

    await wait_until(complete)
    assert seen == sorted(seen, key=STATUS_RANK.__getitem__)


async def test_failed_or_omitted_answers_do_not_advance(relay: FakeRelay, client: RelayClient) -> None:
    """Only answers that showed the task move a per-poll task on."""
    task_id = relay.add_task()
    relay.inject(FaultKind.HTTP_ERROR, task_id=task_id, times=1)
    with pytest.raises(TransientUpstreamError):
        await client.fetch(task_id)
    relay.inject(FaultKind.MISSING, task_id=task_id, times=1)
    assert (await client.fetch_batch([task_id])).missing == [task_id]
    assert relay.stage_of(task_id).status == "SUBMITTED"
    assert (await client.fetch_batch([task_id])).snapshots[task_id].status == S.SUBMITTED
    assert (await client.fetch(task_id)).status == S.QUEUED
    assert relay.task_requests[task_id] == 4


async def test_not_found_for_n_requests(relay: FakeRelay, client: RelayClient) -> None:
    """A relay lagging right after a submit: task_not_exist, absent from batches, then there."""
    task_id = relay.add_task()
    fault = relay.inject(FaultKind.NOT_FOUND, task_id=task_id, times=2)
    with pytest.raises(PermanentUpstreamError) as info:
        await client.fetch(task_id)
    assert info.value.code == "task_not_exist"
    assert (await client.fetch_batch([task_id])).missing == [task_id]
    assert (fault.hits, fault.remaining, fault.active) == (2, 0, False)
    assert (await client.fetch(task_id)).status == S.SUBMITTED


async def test_global_fault_until_cleared(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task()
    fault = relay.inject(FaultKind.HTTP_ERROR, status=502)
    calls = [
        client.fetch(task_id),
        client.fetch_v1(task_id),
        client.fetch_stems(task_id),
        client.submit_music({}),
    ]
    for call in calls:
        with pytest.raises(TransientUpstreamError) as info:
            await call
        assert info.value.code == "http_502"
    assert (await client.fetch_batch([task_id])).errors[task_id].code == "http_502"
    assert fault.hits == 5
    relay.clear_faults()
    assert (await client.fetch(task_id)).status == S.SUBMITTED


def test_content_faults_need_a_task(relay: FakeRelay) -> None:
    with pytest.raises(ValueError, match="task_id"):
        relay.inject(FaultKind.MISSING)


async def test_request_bookkeeping(relay: FakeRelay, client: RelayClient) -> None:
    a, b = relay.add_task(), relay.add_task()
    await client.fetch(a)
    await client.fetch_batch([a, b, "unknown"])
    await client.fetch_v1(b)
    assert dict(relay.requests) == {"fetch": 1, "fetch_batch": 1, "v1": 1}
    assert dict(relay.task_requests) == {a: 2, b: 2}
    assert relay.batches == [(a, b, "unknown")]
    assert [len(relay.windows[t]) for t in (a, b)] == [2, 2]
    assert all(start <= end for start, end in relay.windows[a])
    assert relay.overlaps() == {}
    relay.reset_counters()
    assert (relay.requests, relay.task_requests, relay.windows, relay.batches) == ({}, {}, {}, [])


async def test_overlapping_polls_are_detected(relay: FakeRelay, client: RelayClient) -> None:
    a, b = relay.add_task(), relay.add_task()
    relay.inject(FaultKind.LATENCY, task_id=a, latency_s=0.1)
    await asyncio.gather(client.fetch(a), client.fetch_batch([a, b]))
    await client.fetch(b)
    overlaps = relay.overlaps()
    assert list(overlaps) == [a]
    ((first, second),) = overlaps[a]
    assert second[0] < first[1]


async def test_auth(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    """Every endpoint answers 401 without the configured key."""
    task_id = relay.add_task()
    calls = [
        ("GET", f"/suno/fetch/{task_id}", None),
        ("POST", "/suno/fetch", {"ids": [task_id]}),
        ("POST", "/suno/submit/fetch", {"ids": [task_id]}),
        ("GET", f"/suno/v1/v3.0/music/{task_id}", None),
        ("GET", f"/suno/act/stems/{task_id}", None),
        ("POST", "/suno/submit/music", {}),
        ("POST", "/suno/submit/lyrics", {}),
    ]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
            async with session.request(method, relay.base_url + path, json=body, headers=headers) as response:
                assert (response.status, (await response.json())["code"]) == (401, "unauthorized")
    assert relay.task_requests[task_id] == 0


async def test_no_key_configured_accepts_anyone(session: aiohttp.ClientSession) -> None:
    async with FakeRelay() as relay:
        task_id = relay.add_task()
        assert (await RelayClient(session, relay.base_url).fetch(task_id)).task_id == task_id


@pytest.mark.parametrize("path", ["/suno/fetch/nope", "/suno/v1/v3.0/music/nope", "/suno/act/stems/nope"])
async def test_unknown_ids(relay: FakeRelay, session: aiohttp.ClientSession, path: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with session.get(relay.base_url + path, headers=headers) as response:
        assert (response.status, await response.json()) == (
            400,
            {"code": "task_not_exist", "message": "task_not_exist", "data": None},
        )


async def test_bad_requests(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path, body in [
        ("/suno/fetch", b"{"),
        ("/suno/fetch", b'{"ids": "x"}'),
        ("/suno/submit/music", b"[]"),
        ("/suno/submit/lyrics", b'{"fake_lifecycle": 3}'),
    ]:
        async with session.post(relay.base_url + path, data=body, headers=headers) as response:
            assert (response.status, (await response.json())["code"]) == (400, "invalid_request")


async def test_submit_picks_a_lifecycle(relay: FakeRelay, client: RelayClient) -> None:
    task_id = await client.submit_music({"prompt": "x", "fake_lifecycle": "music_failure"})
    relay.advance(task_id, 3)
    assert (await client.fetch(task_id)).status == S.FAILED
    lyrics_id = await client.submit_lyrics({"prompt": "x", "notify_hook": "https://hook.test/x"})
    raw = json.loads((await client.fetch(lyrics_id)).raw)
    assert (raw["action"], raw["notify_hook"]) == ("LYRICS", "https://hook.test/x")


async def test_titles_are_escaped(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task('quo"te\\ \u00e9\n', title='A "title"\n\u2603')
    relay.advance(task_id, 3)
    snapshot = await client.fetch(task_id)
    assert (snapshot.task_id, {c.title for c in snapshot.clips}) == (
        'quo"te\\ \u00e9\n',
        {'A "title"\n\u2603'},
    )


async def test_run_fake_relay_serves_until_interrupted(session: aiohttp.ClientSession) -> None:
    """The blocking entry point behind `sunotrack fake-relay --port N`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # SIGINT's default action back first: a child inherits SIG_IGN from a run started in the background
    # by a non-interactive shell, and the interrupt would never arrive.
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"from service.upstream.fake import run_fake_relay; run_fake_relay({port}, stage_s=0.05)"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        client = RelayClient(session, f"http://127.0.0.1:{port}", timeout_s=1.0)
        task_ids: list[str] = []

        async def submitted() -> bool:
            try:
                task_ids.append(await client.submit_music({"prompt": "x"}))
            except TransientUpstreamError:
                return False
            return True

        async def complete() -> bool:
            return (await client.fetch(task_ids[0])).status is S.COMPLETE

        await wait_until(submitted, timeout=15)
        await wait_until(complete)
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    assert b"fake_relay.started" in stdout


async def test_windows_can_be_turned_off(session: aiohttp.ClientSession) -> None:
    """A long-running relay keeps its counters but not a window per request."""
    async with FakeRelay(record_windows=False) as relay:
        task_id = relay.add_task()
        client = RelayClient(session, relay.base_url)
        await client.fetch(task_id)
        await client.fetch_batch([task_id])
        assert (relay.task_requests[task_id], relay.windows, relay.batches) == (2, {}, [])


async def test_a_state_file_keeps_the_tasks_across_a_restart(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The demo's relay: a restarted relay still answers for what it was asked to do before, and its
    timed tasks have moved on by the wall-clock time in between."""
    state = tmp_path / "fake-relay.json"
    async with FakeRelay(default_advance=Advance.TIMED, stage_s=600, state_file=state) as relay:
        client = RelayClient(session, relay.base_url)
        song = await client.submit_music({"title": "Kept", "fake_lifecycle": "music_failure"})
        lyrics = relay.add_task(lifecycle=Lifecycle.LYRICS, advance=Advance.MANUAL)
        relay.advance(lyrics)
        clips = relay.clip_ids(song)
        assert (await client.fetch(song)).status is S.SUBMITTED
    saved = json.loads(state.read_text())
    for task in saved:
        task["created_at"] -= 3 * 600  # as if the relay had been down for three stages
    state.write_text(json.dumps(saved))

    async with FakeRelay(state_file=state) as restarted:
        client = RelayClient(session, restarted.base_url)
        song_now = await client.fetch(song)
        lyrics_now = await client.fetch(lyrics)
        stems = await client.fetch_stems(clips[0])

    assert (song_now.status, [c.id for c in song_now.clips]) == (S.FAILED, list(clips))
    assert {c.title for c in song_now.clips} == {"Kept"}
    assert lyrics_now.status is S.IN_PROGRESS
    assert (stems.task_id, stems.status) == (clips[0], S.QUEUED)
