"""RelayClient against the fake relay over real loopback HTTP."""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from structlog.testing import capture_logs

from service.upstream.client import RelayClient
from service.upstream.fake import FakeRelay, FaultKind
from service.upstream.schemas import (
    Dialect,
    MalformedUpstreamError,
    PermanentUpstreamError,
    TransientUpstreamError,
    UpstreamError,
)
from service.vocabulary import TaskKind, TaskStatus
from tests.upstream.conftest import (
    API_KEY,
    STEMS_SOURCE_CLIP,
    expected_fetch_doc,
    expected_stems_doc,
    expected_v1_doc,
)

FETCH_DOC_ID = "f4a94d75-087b-4bb1-bd45-53ba293faf96"
V1_DOC_ID = "56ea8da3-8507-4118-9f1e-111111111111"


async def test_fetch_doc_example(relay: FakeRelay, client: RelayClient, fetch_doc: bytes) -> None:
    relay.add_document(FETCH_DOC_ID, fetch_doc)
    assert expected_fetch_doc(fetch_doc) == await client.fetch(FETCH_DOC_ID)


async def test_fetch_doc_example_in_a_batch(relay: FakeRelay, client: RelayClient, fetch_doc: bytes) -> None:
    """Inside a batch answer the task object keeps its own bytes, as the document wrote them."""
    relay.add_document(FETCH_DOC_ID, fetch_doc)
    result = await client.fetch_batch([FETCH_DOC_ID])
    assert {FETCH_DOC_ID: expected_fetch_doc(fetch_doc)} == result.snapshots


async def test_v1_doc_example(relay: FakeRelay, client: RelayClient, v1_doc: bytes) -> None:
    relay.add_document(V1_DOC_ID, v1_doc)
    assert expected_v1_doc(v1_doc) == await client.fetch_v1(V1_DOC_ID)


async def test_stems_doc_example(relay: FakeRelay, client: RelayClient, stems_doc: bytes) -> None:
    relay.add_document(STEMS_SOURCE_CLIP, stems_doc)
    assert expected_stems_doc(stems_doc) == await client.fetch_stems(STEMS_SOURCE_CLIP)


async def test_fetch_task_picks_the_dialect_and_the_kind_s_endpoint(
    relay: FakeRelay, session: aiohttp.ClientSession, fetch_doc: bytes, v1_doc: bytes, stems_doc: bytes
) -> None:
    relay.add_document(FETCH_DOC_ID, fetch_doc)
    relay.add_document(V1_DOC_ID, v1_doc)
    relay.add_document(STEMS_SOURCE_CLIP, stems_doc)
    fetch = RelayClient(session, relay.base_url, API_KEY, dialect=Dialect.FETCH)
    v1 = RelayClient(session, relay.base_url, API_KEY, dialect=Dialect.V1)
    assert expected_fetch_doc(fetch_doc) == await fetch.fetch_task(TaskKind.MUSIC, FETCH_DOC_ID)
    assert expected_v1_doc(v1_doc) == await v1.fetch_task(TaskKind.MUSIC, V1_DOC_ID)
    for client in (fetch, v1):
        assert expected_stems_doc(stems_doc) == await client.fetch_task(TaskKind.STEMS, STEMS_SOURCE_CLIP)
    assert (fetch.batches(TaskKind.MUSIC), fetch.batches(TaskKind.STEMS), v1.batches(TaskKind.MUSIC)) == (
        True, False, False,
    )  # fmt: skip


async def test_sends_the_bearer_key(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    task_id = relay.add_task()
    wrong = RelayClient(session, relay.base_url, "sk-wrong")
    with pytest.raises(PermanentUpstreamError) as info:
        await wrong.fetch(task_id)
    assert (info.value.code, info.value.http_status) == ("unauthorized", 401)
    right = RelayClient(session, relay.base_url, API_KEY)
    assert task_id == (await right.fetch(task_id)).task_id


async def test_timeout(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    task_id = relay.add_task()
    relay.inject(FaultKind.LATENCY, latency_s=2.0, times=1)
    client = RelayClient(session, relay.base_url, API_KEY, timeout_s=0.2)
    with pytest.raises(TransientUpstreamError) as info:
        await client.fetch(task_id)
    assert (info.value.code, info.value.http_status) == ("timeout", None)


async def test_latency_within_the_timeout_is_fine(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task()
    fault = relay.inject(FaultKind.LATENCY, task_id=task_id, latency_s=0.05, times=1)
    assert (await client.fetch(task_id)).status == TaskStatus.SUBMITTED
    assert fault.hits == 1


@pytest.mark.parametrize(
    ("kind", "status", "retry_after", "code", "http_status", "retry_after_s"),
    [
        (FaultKind.HTTP_ERROR, None, None, "http_500", 500, None),
        (FaultKind.HTTP_ERROR, 502, None, "http_502", 502, None),
        (FaultKind.HTTP_ERROR, 503, "12", "http_503", 503, 12.0),
        (FaultKind.RATE_LIMIT, None, "7", "rate_limited", 429, 7.0),
        (FaultKind.RATE_LIMIT, None, "0.5", "rate_limited", 429, 0.5),
        (FaultKind.RATE_LIMIT, None, "not a date", "rate_limited", 429, None),
        (FaultKind.GARBAGE, None, None, "bad_json", None, None),
        (FaultKind.DROP, None, None, "disconnected", None, None),
        (FaultKind.TRUNCATE, None, None, "bad_json", None, None),
    ],
)
async def test_transient_faults(
    relay: FakeRelay,
    client: RelayClient,
    kind: FaultKind,
    status: int | None,
    retry_after: str | None,
    code: str,
    http_status: int | None,
    retry_after_s: float | None,
) -> None:
    """Until cleared: aiohttp itself retries an idempotent GET once when the connection drops."""
    task_id = relay.add_task()
    relay.inject(kind, task_id=task_id, status=status, retry_after=retry_after)
    with pytest.raises(TransientUpstreamError) as info:
        await client.fetch(task_id)
    assert (code, http_status, retry_after_s) == (
        info.value.code,
        info.value.http_status,
        info.value.retry_after_s,
    )
    relay.clear_faults(task_id)
    assert (await client.fetch(task_id)).status == TaskStatus.SUBMITTED


async def test_retry_after_http_date(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task()
    when = datetime.now(UTC) + timedelta(seconds=30)
    relay.inject(
        FaultKind.RATE_LIMIT, task_id=task_id, times=1, retry_after=format_datetime(when, usegmt=True)
    )
    with pytest.raises(TransientUpstreamError) as info:
        await client.fetch(task_id)
    assert info.value.retry_after_s is not None
    assert 25 <= info.value.retry_after_s <= 30


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RelayClient(session, f"http://127.0.0.1:{port}", API_KEY)
    with pytest.raises(TransientUpstreamError) as info:
        await client.fetch("t1")
    assert info.value.code == "connect"


async def test_task_not_exist(client: RelayClient) -> None:
    with pytest.raises(PermanentUpstreamError) as info:
        await client.fetch("9a8b7c6d-0000-4000-8000-000000000000")
    assert (info.value.code, info.value.http_status) == ("task_not_exist", 400)


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (404, PermanentUpstreamError, "not_found"),
        (403, PermanentUpstreamError, "unauthorized"),
        (302, PermanentUpstreamError, "redirect"),
        (422, PermanentUpstreamError, "http_422"),
        (408, TransientUpstreamError, "http_408"),
    ],
)
async def test_other_statuses(
    relay: FakeRelay, client: RelayClient, status: int, error_type: type[UpstreamError], code: str
) -> None:
    task_id = relay.add_task()
    relay.inject(FaultKind.GARBAGE, task_id=task_id, status=status, body=b"nope")
    with pytest.raises(error_type) as info:
        await client.fetch(task_id)
    assert (code, status) == (info.value.code, info.value.http_status)


async def test_unknown_route_is_not_found(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    client = RelayClient(session, relay.base_url + "/wrong-prefix", API_KEY)
    with pytest.raises(PermanentUpstreamError) as info:
        await client.fetch("t1")
    assert (info.value.code, info.value.http_status) == ("not_found", 404)


@pytest.mark.parametrize(
    ("body", "error_type", "code"),
    [
        (b'{"code":"success","message":"","data":{"task_id":5}}', MalformedUpstreamError, "bad_shape"),
        (b'{"code":"success","message":"","data":[]}', MalformedUpstreamError, "bad_shape"),
        (b"null", MalformedUpstreamError, "bad_shape"),
        (b"", TransientUpstreamError, "bad_json"),
        (b'{"code":"success","data":{"task_id":', TransientUpstreamError, "bad_json"),
        (b'{"code":"task_not_exist","message":"","data":null}', PermanentUpstreamError, "task_not_exist"),
    ],
)
async def test_bodies_served_with_200(
    relay: FakeRelay, client: RelayClient, body: bytes, error_type: type[UpstreamError], code: str
) -> None:
    task_id = relay.add_task()
    relay.inject(FaultKind.GARBAGE, task_id=task_id, body=body)
    with pytest.raises(error_type) as info:
        await client.fetch(task_id)
    assert code == info.value.code


async def test_answer_for_another_task_is_malformed(
    relay: FakeRelay, client: RelayClient, fetch_doc: bytes
) -> None:
    relay.add_document("someone-else", fetch_doc)
    with pytest.raises(MalformedUpstreamError):
        await client.fetch("someone-else")


async def test_ids_are_quoted_into_the_path(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task("odd id/with?chars#")
    assert task_id == (await client.fetch(task_id)).task_id
    with pytest.raises(PermanentUpstreamError) as info:
        await client.fetch("")
    assert info.value.code == "invalid_id"


async def test_batch_chunking(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    """120 ids in chunks of 50: exactly three requests of 50, 50 and 20; unknown ids are missing."""
    known = [relay.add_task() for _ in range(110)]
    unknown = [f"task_{i:032d}" for i in range(10)]
    ids = known[:60] + unknown + known[60:]
    client = RelayClient(session, relay.base_url, API_KEY, batch_size=50)
    result = await client.fetch_batch(ids)
    assert sorted((len(batch) for batch in relay.batches), reverse=True) == [50, 50, 20]
    assert sorted(ids) == sorted(id_ for batch in relay.batches for id_ in batch)
    assert dict(relay.requests) == {"fetch_batch": 3}
    assert set(known) == set(result.snapshots)
    assert unknown == result.missing
    assert result.errors == {}
    assert all(s.status is TaskStatus.SUBMITTED for s in result.snapshots.values())


async def test_batch_dedupes_and_handles_nothing(relay: FakeRelay, client: RelayClient) -> None:
    task_id = relay.add_task()
    assert {task_id} == set((await client.fetch_batch([task_id, task_id])).snapshots)
    assert [(task_id,)] == relay.batches
    empty = await client.fetch_batch([])
    assert (empty.snapshots, empty.missing, empty.errors) == ({}, [], {})
    assert relay.requests["fetch_batch"] == 1


async def test_a_failed_chunk_fails_only_its_ids(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    ids = [relay.add_task() for _ in range(30)]
    relay.inject(FaultKind.HTTP_ERROR, task_id=ids[15])
    client = RelayClient(session, relay.base_url, API_KEY, batch_size=10)
    result = await client.fetch_batch(ids)
    assert set(ids[:10] + ids[20:]) == set(result.snapshots)
    assert set(ids[10:20]) == set(result.errors)
    assert len({id(e) for e in result.errors.values()}) == 1
    assert all(e.code == "http_500" for e in result.errors.values())
    assert result.missing == []


async def test_batch_missing_for_n_calls(relay: FakeRelay, client: RelayClient) -> None:
    ids = [relay.add_task() for _ in range(3)]
    relay.inject(FaultKind.MISSING, task_id=ids[1], times=2)
    for _ in range(2):
        result = await client.fetch_batch(ids)
        assert ([ids[1]], {ids[0], ids[2]}) == (result.missing, set(result.snapshots))
    assert set(ids) == set((await client.fetch_batch(ids)).snapshots)


async def test_batch_with_an_unreadable_task(relay: FakeRelay, client: RelayClient, fetch_doc: bytes) -> None:
    good = relay.add_task()
    broken_doc = fetch_doc.replace(FETCH_DOC_ID.encode(), b"broken")
    broken = relay.add_document("broken", broken_doc.replace(b'"progress": "100%"', b'"progress": [100]'))
    result = await client.fetch_batch([good, broken])
    assert ({good}, {broken}, []) == (set(result.snapshots), set(result.errors), result.missing)
    assert isinstance(result.errors[broken], MalformedUpstreamError)


async def test_batch_path_can_be_submit_fetch(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    task_id = relay.add_task()
    client = RelayClient(session, relay.base_url, API_KEY, batch_path="/suno/submit/fetch")
    assert {task_id} == set((await client.fetch_batch([task_id])).snapshots)
    assert dict(relay.requests) == {"submit_fetch": 1}


async def test_max_in_flight_bounds_concurrency(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    ids = [relay.add_task() for _ in range(60)]
    relay.inject(FaultKind.LATENCY, latency_s=0.05)
    client = RelayClient(session, relay.base_url, API_KEY, batch_size=10, max_in_flight=2)
    await client.fetch_batch(ids)
    windows = [relay.windows[batch[0]][0] for batch in relay.batches]
    most = max(sum(1 for s, e in windows if s <= at < e) for at, _ in windows)
    assert (len(windows), most) == (6, 2)


async def test_submit(relay: FakeRelay, client: RelayClient) -> None:
    music = await client.submit_music({"gpt_description_prompt": "a song", "title": "My Song"})
    lyrics = await client.submit_lyrics({"prompt": "a poem"})
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", music)
    assert re.fullmatch(r"task_[0-9a-f]{32}", lyrics)
    assert dict(relay.requests) == {"submit_music": 1, "submit_lyrics": 1}
    snapshot = await client.fetch(music)
    assert (TaskStatus.SUBMITTED, {"My Song"}) == (snapshot.status, {c.title for c in snapshot.clips})


async def test_submit_errors(relay: FakeRelay, client: RelayClient) -> None:
    relay.inject(FaultKind.HTTP_ERROR, status=503, times=1, retry_after="3")
    with pytest.raises(TransientUpstreamError) as info:
        await client.submit_music({"prompt": "x"})
    assert (info.value.code, info.value.retry_after_s) == ("http_503", 3.0)
    with pytest.raises(PermanentUpstreamError) as info2:
        await client.submit_music({"fake_lifecycle": "no-such-lifecycle"})
    assert info2.value.code == "http_400"


async def test_the_key_never_leaks(relay: FakeRelay, session: aiohttp.ClientSession) -> None:
    """Neither error messages, reprs nor logs carry the API key, whatever went wrong."""
    client = RelayClient(session, relay.base_url, API_KEY, timeout_s=0.2)
    task_id = relay.add_task()
    errors: list[UpstreamError] = []
    with capture_logs() as logs:
        for kind in (FaultKind.HTTP_ERROR, FaultKind.GARBAGE, FaultKind.DROP, FaultKind.LATENCY):
            relay.inject(kind, task_id=task_id, latency_s=1.0)
            with pytest.raises(UpstreamError) as info:
                await client.fetch(task_id)
            errors.append(info.value)
            relay.clear_faults()
        with pytest.raises(UpstreamError) as info:
            await RelayClient(session, relay.base_url, "sk-other-key").fetch(task_id)
        errors.append(info.value)
    text = json.dumps([str(log) for log in logs]) + repr(errors) + "".join(map(str, errors)) + repr(client)
    assert API_KEY not in text
    assert "sk-other-key" not in text
    assert len(logs) == len(errors)


async def test_closed_session_is_transient(relay: FakeRelay) -> None:
    async with aiohttp.ClientSession() as session:
        client = RelayClient(session, relay.base_url, API_KEY)
    with pytest.raises(TransientUpstreamError) as info:
        await client.fetch("t1")
    assert info.value.code == "client_closed"


async def test_rejects_nonsense_settings(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="positive"):
        RelayClient(session, "http://relay.test", batch_size=0)
