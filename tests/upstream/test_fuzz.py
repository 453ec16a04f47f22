"""Whatever bytes arrive, parsers return a snapshot or raise one of our UpstreamError subclasses."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.http import retry_after_s
from service.upstream.client import _status_error
from service.upstream.dialects import (
    BatchParse,
    error_code,
    parse_callback,
    parse_fetch,
    parse_fetch_batch,
    parse_stems,
    parse_submit,
    parse_v1,
)
from service.upstream.schemas import TaskSnapshot, TransientUpstreamError, UpstreamError
from service.vocabulary import TaskStatus
from tests.upstream.conftest import fixture_bytes

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARSERS: dict[str, Callable[[bytes], object]] = {
    "fetch": parse_fetch,
    "batch": parse_fetch_batch,
    "v1": parse_v1,
    "stems": lambda body: parse_stems(body, "source-clip"),
    "callback": parse_callback,
    "submit": parse_submit,
}
DOCS = {
    "fetch": fixture_bytes("fetch_success_lyrics_action_song_clips.json"),
    "v1": fixture_bytes("v1_music_completed.json"),
    "stems": fixture_bytes("stems_queued.json"),
}


def check_snapshot(snapshot: TaskSnapshot, body: bytes) -> None:
    assert isinstance(snapshot, TaskSnapshot)
    assert snapshot.task_id, "every snapshot names its task"
    assert snapshot.status is None or isinstance(snapshot.status, TaskStatus)
    assert snapshot.progress is None or 0 <= snapshot.progress <= 100
    assert snapshot.status is not TaskStatus.FAILED or snapshot.fail_reason
    assert isinstance(snapshot.raw, bytes)
    assert snapshot.raw in body
    for when in (snapshot.submitted_at, snapshot.started_at, snapshot.finished_at):
        assert when is None or when.tzinfo is not None
    for clip in snapshot.clips:
        assert clip.id
        assert clip.duration is None or math.isfinite(clip.duration)


def run_all(body: bytes) -> None:
    """Every parser on `body`: a well-formed result or an UpstreamError, nothing else."""
    errors: list[UpstreamError] = []
    for parse in PARSERS.values():
        try:
            result = parse(body)
        except UpstreamError as exc:
            errors.append(exc)
            continue
        if isinstance(result, TaskSnapshot):
            check_snapshot(result, body)
        elif isinstance(result, BatchParse):
            for snapshot in result.snapshots:
                check_snapshot(snapshot, body)
            assert all(isinstance(e, UpstreamError) for e in result.errors.values())
        else:
            assert isinstance(result, str)
            assert result
    assert all(e.error_class in {"transient", "permanent", "malformed"} and e.code for e in errors)
    code = error_code(body)
    assert code is None or isinstance(code, str)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
any_json = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def maybe(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually the right type, sometimes any JSON at all: shaped almost right."""
    return st.one_of(right, right, right, any_json)


statuses = st.sampled_from(
    ["NOT_START", "SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS", "FAILURE", "UNKNOWN"]
)
part_statuses = st.sampled_from(["submitted", "queued", "streaming", "complete", "error", "succeeded", "odd"])
numbers = st.integers(min_value=-10, max_value=2**40) | st.floats(allow_nan=False) | st.text(max_size=6)
texts = st.text(max_size=12)

clips = st.fixed_dictionaries(
    {"id": maybe(st.text(min_size=1, max_size=8))},
    optional={
        "status": maybe(part_statuses),
        "state": maybe(part_statuses),
        "title": maybe(texts),
        "audio_url": maybe(texts),
        "image_url": maybe(texts),
        "video_url": maybe(texts),
        "duration": maybe(st.floats(allow_nan=False, allow_infinity=False)),
        "metadata": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "error_message": maybe(st.none() | texts),
                    "duration": maybe(st.floats(allow_nan=False)),
                },
            )
        ),
    },
)
lyrics = st.fixed_dictionaries(
    {}, optional={"id": maybe(texts), "text": maybe(texts), "status": maybe(part_statuses)}
)
task_data = maybe(st.lists(clips, max_size=3) | lyrics | st.none())


def tasks(camel: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    def key(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(word.title() for word in rest) if camel else name

    return st.fixed_dictionaries(
        {key("task_id"): maybe(st.text(min_size=1, max_size=8))},
        optional={
            "status": maybe(statuses),
            key("fail_reason"): maybe(texts),
            key("submit_time"): maybe(numbers),
            key("start_time"): maybe(numbers),
            key("finish_time"): maybe(numbers),
            "progress": maybe(st.text(max_size=5) | st.integers(-5, 200)),
            "action": maybe(st.sampled_from(["MUSIC", "LYRICS"])),
            "data": task_data,
        },
    )


codes = maybe(st.sampled_from(["success", "task_not_exist", "busy", 200]))


def envelope(data: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"data": data}, optional={"code": codes, "message": maybe(texts)})


v1_tasks = st.fixed_dictionaries(
    {"task_id": maybe(st.text(min_size=1, max_size=8))},
    optional={
        "status": maybe(st.sampled_from(["completed", "Processing", "pending", "failed", "odd"])),
        "input": maybe(texts),
        "clips": maybe(st.dictionaries(st.text(max_size=6), clips, max_size=3) | st.lists(clips, max_size=2)),
    },
)

almost_right = st.one_of(
    envelope(tasks()),
    envelope(st.lists(maybe(tasks()), max_size=4)),
    envelope(v1_tasks),
    envelope(tasks(camel=True)),
    tasks(),
    tasks(camel=True),
    st.fixed_dictionaries({"clips": maybe(st.lists(clips, max_size=3))}),
    envelope(maybe(st.text(min_size=1, max_size=8))),
)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a decoded JSON document, for replacing one value."""
    found: list[tuple[Any, Any]] = []
    stack = [node]
    while stack:
        current = stack.pop()
        items = current.items() if isinstance(current, dict) else enumerate(current)
        for key, value in items:
            found.append((current, key))
            if isinstance(value, dict | list):
                stack.append(value)
    return found


@st.composite
def mutated_docs(draw: st.DrawFn) -> bytes:
    doc = copy.deepcopy(json.loads(DOCS[draw(st.sampled_from(sorted(DOCS)))]))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc)
        container, key = slots[draw(st.integers(0, len(slots) - 1))]
        container[key] = draw(any_json)
    return json.dumps(doc).encode()


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(body: bytes) -> None:
    run_all(body)


@FUZZ
@given(any_json)
def test_arbitrary_json(value: Any) -> None:
    run_all(json.dumps(value).encode())


@FUZZ
@given(almost_right)
def test_json_shaped_almost_right(value: Any) -> None:
    run_all(json.dumps(value).encode())


@FUZZ
@given(mutated_docs())
def test_mutated_doc_examples(body: bytes) -> None:
    run_all(body)


@FUZZ
@given(st.sampled_from(sorted(DOCS)), st.data())
def test_doc_examples_with_bytes_flipped(name: str, data: st.DataObject) -> None:
    body = bytearray(DOCS[name])
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    run_all(bytes(body))


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_truncation_is_transient_bad_json(name: str) -> None:
    """A body cut short anywhere (a dropped connection, a proxy limit) is retried, not misread."""
    doc = DOCS[name]
    parse = {"fetch": parse_fetch, "v1": parse_v1, "stems": PARSERS["stems"]}[name]
    for end in range(len(doc)):
        with pytest.raises(TransientUpstreamError) as info:
            parse(doc[:end])
        assert info.value.code == "bad_json"


@FUZZ
@given(st.integers(100, 599), st.none() | st.text(max_size=40), st.binary(max_size=200))
def test_status_classification_is_total(status: int, retry_after: str | None, body: bytes) -> None:
    error = _status_error("GET", "/suno/fetch/x", status, retry_after, body)
    assert isinstance(error, UpstreamError)
    assert error.http_status == status
    assert error.retry_after_s is None or error.retry_after_s >= 0


@FUZZ
@given(st.text(max_size=60))
def test_retry_after_parsing_is_total(value: str) -> None:
    seconds = retry_after_s(value)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)
