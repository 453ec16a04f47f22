"""Normalisation rules, straight on the parsers (the HTTP path is in test_client.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from service.upstream.dialects import (
    derive_status,
    error_code,
    parse_callback,
    parse_fetch,
    parse_fetch_batch,
    parse_stems,
    parse_submit,
    parse_v1,
    render_task,
)
from service.upstream.schemas import (
    ClipSnapshot,
    ClipView,
    Lyrics,
    MalformedUpstreamError,
    PermanentUpstreamError,
    TransientUpstreamError,
    UpstreamError,
)
from service.vocabulary import STATUS_RANK, TERMINAL_STATUSES, TaskStatus
from tests.upstream.conftest import (
    STEMS_SOURCE_CLIP,
    expected_fetch_doc,
    expected_stems_doc,
    expected_v1_doc,
)

S = TaskStatus
T0 = 1716192124
T0_DT = datetime(2024, 5, 20, 8, 2, 4, tzinfo=UTC)


def clip(clip_id: str = "c1", status: str | None = "complete", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": clip_id, "title": "Song", "audio_url": f"https://cdn/{clip_id}.mp3"}
    if status is not None:
        doc["status"] = status
    return doc | extra


def task(task_id: str = "t1", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "task_id": task_id,
        "notify_hook": "",
        "action": "MUSIC",
        "status": "SUCCESS",
        "fail_reason": "",
        "submit_time": T0,
        "start_time": T0,
        "finish_time": T0,
        "progress": "100%",
        "data": [clip("c1"), clip("c2")],
    }
    return doc | overrides


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def fetch_body(task_doc: Any, code: Any = "success") -> bytes:
    return dumps({"code": code, "message": "", "data": task_doc})


def test_vocabulary() -> None:
    assert frozenset({S.COMPLETE, S.FAILED, S.TIMED_OUT, S.CANCELLED}) == TERMINAL_STATUSES
    assert STATUS_RANK[S.SUBMITTED] < STATUS_RANK[S.QUEUED] < STATUS_RANK[S.IN_PROGRESS]
    assert {STATUS_RANK[s] for s in TERMINAL_STATUSES} == {STATUS_RANK[S.COMPLETE]}
    assert STATUS_RANK[S.IN_PROGRESS] < STATUS_RANK[S.COMPLETE]


def test_doc_examples_parse_directly(fetch_doc: bytes, v1_doc: bytes, stems_doc: bytes) -> None:
    assert expected_fetch_doc(fetch_doc) == parse_fetch(fetch_doc)
    assert expected_v1_doc(v1_doc) == parse_v1(v1_doc)
    assert expected_stems_doc(stems_doc) == parse_stems(stems_doc, STEMS_SOURCE_CLIP)


def test_raw_is_the_task_object_as_received(fetch_doc: bytes, v1_doc: bytes) -> None:
    """The raw bytes are a verbatim slice of the body: same JSON, original spacing."""
    raw = parse_fetch(fetch_doc).raw
    assert raw in fetch_doc
    assert json.loads(raw) == json.loads(fetch_doc)["data"]
    raw = parse_v1(v1_doc).raw
    assert raw in v1_doc
    assert json.loads(raw) == json.loads(v1_doc)["data"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("NOT_START", S.SUBMITTED),
        ("SUBMITTED", S.SUBMITTED),
        ("QUEUED", S.QUEUED),
        ("IN_PROGRESS", S.IN_PROGRESS),
        ("SUCCESS", S.COMPLETE),
        ("FAILURE", S.FAILED),
        ("success", S.COMPLETE),
    ],
)
def test_task_status_mapping(raw: str, expected: TaskStatus) -> None:
    # Clips that disagree prove the task-level status wins when it is recognised.
    snapshot = parse_fetch(fetch_body(task(status=raw, data=[clip(status="queued")])))
    assert (expected, raw) == (snapshot.status, snapshot.raw_status)


@pytest.mark.parametrize("raw", ["UNKNOWN", "PAUSED", "", None])
def test_unknown_task_status_without_clips_is_none(raw: str | None) -> None:
    snapshot = parse_fetch(fetch_body(task(status=raw, data=[])))
    assert (None, raw) == (snapshot.status, snapshot.raw_status)


@pytest.mark.parametrize("raw", ["UNKNOWN", "PAUSED", None])
def test_unknown_task_status_is_derived_from_clips(raw: str | None) -> None:
    doc = task(status=raw, data=[clip("a", "complete"), clip("b", "streaming")])
    assert parse_fetch(fetch_body(doc)).status == S.IN_PROGRESS


def test_missing_status_key_is_derived_from_clips() -> None:
    doc = task()
    del doc["status"]
    snapshot = parse_fetch(fetch_body(doc))
    assert (snapshot.status, snapshot.raw_status) == (S.COMPLETE, None)


@pytest.mark.parametrize(
    ("clips", "expected"),
    [
        ([], None),
        ([S.QUEUED, S.IN_PROGRESS], S.QUEUED),
        ([S.IN_PROGRESS, S.COMPLETE], S.IN_PROGRESS),
        ([S.FAILED, S.IN_PROGRESS], S.IN_PROGRESS),
        ([S.FAILED, S.COMPLETE], S.COMPLETE),
        ([S.COMPLETE, S.FAILED], S.COMPLETE),
        ([S.FAILED, S.FAILED], S.FAILED),
        ([S.COMPLETE, None], None),
        ([S.SUBMITTED], S.SUBMITTED),
    ],
)
def test_derive_status_takes_the_least_finished_clip(
    clips: list[TaskStatus | None], expected: TaskStatus | None
) -> None:
    assert expected == derive_status(clips)


@pytest.mark.parametrize(
    ("status", "state", "expected"),
    [
        ("submitted", None, S.SUBMITTED),
        ("queued", None, S.QUEUED),
        ("streaming", None, S.IN_PROGRESS),
        ("complete", None, S.COMPLETE),
        ("error", None, S.FAILED),
        (None, "succeeded", S.COMPLETE),
        ("complete", "succeeded", S.COMPLETE),
        ("mystery", None, None),
        ("mystery", "succeeded", S.COMPLETE),
    ],
)
def test_clip_status_mapping(status: str | None, state: str | None, expected: TaskStatus | None) -> None:
    extra = {"state": state} if state is not None else {}
    snapshot = parse_fetch(fetch_body(task(data=[clip("a", status, **extra)])))
    (only,) = snapshot.clips
    assert expected == only.status
    assert (status if status is not None else state) == only.raw_status


def test_clip_fields_are_normalised() -> None:
    """Empty strings read as absent; duration falls back to metadata.duration."""
    doc = clip(
        "a",
        "streaming",
        title="",
        audio_url="https://audiopipe.suno.ai/?item_id=a",
        image_url="",
        video_url=None,
        metadata={"duration": 12.5, "error_message": ""},
    )
    (only,) = parse_fetch(fetch_body(task(data=[doc]))).clips
    expected = ClipSnapshot(
        id="a",
        status=S.IN_PROGRESS,
        raw_status="streaming",
        title=None,
        audio_url="https://audiopipe.suno.ai/?item_id=a",
        image_url=None,
        video_url=None,
        duration=12.5,
        error=None,
    )
    assert expected == only


def test_fail_reason_prefers_the_task_level_reason() -> None:
    doc = task(
        status="FAILURE",
        fail_reason="quota exceeded",
        data=[clip("a", "error", metadata={"error_message": "moderated"})],
    )
    assert parse_fetch(fetch_body(doc)).fail_reason == "quota exceeded"


def test_fail_reason_falls_back_to_the_first_non_empty_clip_error() -> None:
    doc = task(
        status="FAILURE",
        fail_reason=" ",
        data=[
            clip("a", "error", metadata={"error_message": None}),
            clip("b", "error", metadata={"error_message": ""}),
            clip("c", "error", metadata={"error_message": "moderated"}),
            clip("d", "error", metadata={"error_message": "later"}),
        ],
    )
    snapshot = parse_fetch(fetch_body(doc))
    assert snapshot.fail_reason == "moderated"
    assert [c.error for c in snapshot.clips] == [None, None, "moderated", "later"]


def test_fail_reason_is_generic_only_for_failed_tasks() -> None:
    failed = parse_fetch(fetch_body(task(status="FAILURE", data=[])))
    assert failed.fail_reason == "relay reported status 'FAILURE' without a reason"
    assert parse_fetch(fetch_body(task(status="SUCCESS", data=[]))).fail_reason is None
    derived = parse_fetch(fetch_body(task(status="UNKNOWN", data=[clip("a", "error")])))
    assert (
        derived.status,
        derived.fail_reason,
    ) == (S.FAILED, "relay reported status 'UNKNOWN' without a reason")


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        ("45%", 45),
        ("0%", 0),
        ("100%", 100),
        (45, 45),
        ("45.5%", 45),
        (" 7 % ", 7),
        ("abc", None),
        ("150%", None),
        ("-1%", None),
        ("", None),
        (None, None),
        ("nan%", None),
    ],
)
def test_progress(progress: Any, expected: int | None) -> None:
    assert expected == parse_fetch(fetch_body(task(progress=progress))).progress


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, None),
        (T0, T0_DT),
        (T0 * 1000, T0_DT),
        (str(T0), T0_DT),
        (float(T0), T0_DT),
        ("soon", None),
        (-5, None),
        (1e20, None),
        (None, None),
    ],
)
def test_timestamps(value: Any, expected: datetime | None) -> None:
    snapshot = parse_fetch(fetch_body(task(submit_time=value, start_time=0, finish_time=None)))
    assert (expected, None, None) == (snapshot.submitted_at, snapshot.started_at, snapshot.finished_at)


def test_lyrics_object_is_read_as_lyrics() -> None:
    lyrics = {"id": "l1", "text": "[Verse]\nla la", "title": "Song", "status": "complete"}
    snapshot = parse_fetch(fetch_body(task(action="LYRICS", data=lyrics)))
    assert (snapshot.lyrics, snapshot.clips, snapshot.status) == (
        Lyrics(title="Song", text="[Verse]\nla la"), (), S.COMPLETE,
    )  # fmt: skip


def test_data_is_read_by_shape_not_action() -> None:
    lyrics = {"id": "l1", "text": "words", "title": "", "status": "complete"}
    as_music = parse_fetch(fetch_body(task(action="MUSIC", data=lyrics)))
    assert (as_music.lyrics, as_music.clips) == (Lyrics(title=None, text="words"), ())
    as_lyrics = parse_fetch(fetch_body(task(action="LYRICS", data=[clip("a")])))
    assert (as_lyrics.lyrics, tuple(c.id for c in as_lyrics.clips)) == (None, ("a",))


def test_lyrics_status_is_used_when_the_task_has_none() -> None:
    lyrics = {"id": "l1", "text": "", "title": "", "status": "running"}
    snapshot = parse_fetch(fetch_body(task(status="UNKNOWN", action="LYRICS", data=lyrics)))
    assert (snapshot.status, snapshot.lyrics) == (S.IN_PROGRESS, None)


def test_null_data_means_no_clips() -> None:
    snapshot = parse_fetch(fetch_body(task(status="SUBMITTED", data=None)))
    assert (snapshot.status, snapshot.clips, snapshot.lyrics) == (S.SUBMITTED, (), None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("submitted", S.SUBMITTED),
        ("queued", S.QUEUED),
        ("pending", S.QUEUED),
        ("processing", S.IN_PROGRESS),
        ("running", S.IN_PROGRESS),
        ("streaming", S.IN_PROGRESS),
        ("in_progress", S.IN_PROGRESS),
        ("complete", S.COMPLETE),
        ("completed", S.COMPLETE),
        ("succeeded", S.COMPLETE),
        ("success", S.COMPLETE),
        ("failed", S.FAILED),
        ("failure", S.FAILED),
        ("error", S.FAILED),
        ("COMPLETED", S.COMPLETE),
        ("Processing", S.IN_PROGRESS),
    ],
)
def test_v1_status_mapping_is_case_insensitive(raw: str, expected: TaskStatus) -> None:
    body = dumps({"code": 200, "data": {"task_id": "t", "status": raw, "clips": {}}, "message": "success"})
    assert expected == parse_v1(body).status


def test_v1_clips_are_keyed_by_id_and_input_is_ignored() -> None:
    body = dumps(
        {
            "code": 200,
            "data": {
                "task_id": "t",
                "status": "mystery",
                "input": "{not json",
                "clips": {"k1": {"status": "complete"}, "k2": {"id": "own-id", "status": "streaming"}},
            },
            "message": "success",
        }
    )
    snapshot = parse_v1(body)
    assert (tuple(c.id for c in snapshot.clips), snapshot.status) == (("k1", "own-id"), S.IN_PROGRESS)


def test_stems_status_comes_from_the_stem_clips() -> None:
    done = dumps({"clips": [clip("v", "complete"), clip("i", "complete")]})
    assert parse_stems(done, "src").status == S.COMPLETE
    assert parse_stems(dumps({"clips": []}), "src").status is None


def test_stems_without_clips_is_classified() -> None:
    with pytest.raises(MalformedUpstreamError):
        parse_stems(dumps({"detail": "nope"}), "src")
    with pytest.raises(PermanentUpstreamError) as info:
        parse_stems(dumps({"code": "task_not_exist", "message": "no", "data": None}), "src")
    assert info.value.code == "task_not_exist"


CAMEL_TASK = {
    "taskId": "t9",
    "notifyHook": "https://example.test/hook",
    "action": "MUSIC",
    "status": "FAILURE",
    "failReason": "boom",
    "submitTime": T0,
    "startTime": T0,
    "finishTime": 0,
    "progress": "100%",
    "data": [clip("a", "error")],
}


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "envelope"])
@pytest.mark.parametrize("camel", [False, True], ids=["snake", "camel"])
def test_callback_shapes(wrapped: bool, camel: bool) -> None:
    task_doc = (
        CAMEL_TASK
        if camel
        else task("t9", status="FAILURE", fail_reason="boom", finish_time=0, data=[clip("a", "error")])
    )
    raw = dumps(task_doc)
    body = b'{"code": "success", "message": "", "data": ' + raw + b"}" if wrapped else raw
    snapshot = parse_callback(body)
    assert ("t9", S.FAILED, "boom", T0_DT, T0_DT, None, raw) == (
        snapshot.task_id,
        snapshot.status,
        snapshot.fail_reason,
        snapshot.submitted_at,
        snapshot.started_at,
        snapshot.finished_at,
        snapshot.raw,
    )


def test_callback_errors() -> None:
    with pytest.raises(MalformedUpstreamError):
        parse_callback(dumps({"status": "SUCCESS"}))
    with pytest.raises(MalformedUpstreamError):
        parse_callback(dumps({"code": "success", "data": {"status": "SUCCESS"}}))
    with pytest.raises(TransientUpstreamError):
        parse_callback(dumps({"code": "busy", "data": None}))


def test_batch_keeps_readable_tasks_and_reports_broken_ones() -> None:
    body = dumps(
        {
            "code": "success",
            "data": [task("good"), task("bad", progress=[1]), task("bad2", data=[{"no": "id"}]), 7, None],
        }
    )
    parsed = parse_fetch_batch(body)
    assert [s.task_id for s in parsed.snapshots] == ["good"]
    assert {"bad", "bad2"} == set(parsed.errors)
    assert all(isinstance(e, MalformedUpstreamError) for e in parsed.errors.values())


def test_batch_raw_is_each_task_verbatim() -> None:
    one, two = b'{ "task_id" : "a", "status": "QUEUED" }', b'{"task_id":"b","data":[]}'
    parsed = parse_fetch_batch(b'{"code":"success","data":[' + one + b" ,\n" + two + b"]}")
    assert [one, two] == [s.raw for s in parsed.snapshots]


def test_empty_batch_answers() -> None:
    assert parse_fetch_batch(dumps({"code": "success", "data": None})).snapshots == []
    assert parse_fetch_batch(dumps({"code": "success", "data": []})).snapshots == []


@pytest.mark.parametrize(
    ("body", "error_type", "code"),
    [
        (fetch_body(None, code="task_not_exist"), PermanentUpstreamError, "task_not_exist"),
        (fetch_body(None, code="get_channel_failed"), TransientUpstreamError, "upstream_error"),
        (fetch_body(None), MalformedUpstreamError, "bad_shape"),
        (dumps({"code": "success", "message": ""}), MalformedUpstreamError, "bad_shape"),
        (fetch_body([task()]), MalformedUpstreamError, "bad_shape"),
        (fetch_body(task(task_id=5)), MalformedUpstreamError, "bad_shape"),
        (fetch_body(task(status=1)), MalformedUpstreamError, "bad_shape"),
        (fetch_body(task(data="clips")), MalformedUpstreamError, "bad_shape"),
        (dumps([1, 2]), MalformedUpstreamError, "bad_shape"),
        (b"<html><body>502 Bad Gateway</body></html>", TransientUpstreamError, "bad_json"),
        (fetch_body(task())[:-10], TransientUpstreamError, "bad_json"),
        (b"", TransientUpstreamError, "bad_json"),
        (b'{"code":"success","data":{"task_id":"\xff"}}', TransientUpstreamError, "bad_json"),
        (
            b'{"code":"success","data":' + b"[" * 5000 + b"]" * 5000 + b"}",
            MalformedUpstreamError,
            "bad_shape",
        ),
    ],
)
def test_fetch_errors_are_classified(body: bytes, error_type: type[UpstreamError], code: str) -> None:
    with pytest.raises(error_type) as info:
        parse_fetch(body)
    assert code == info.value.code


def test_submit_answer() -> None:
    assert parse_submit(dumps({"code": "success", "message": "", "data": "task_abc"})) == "task_abc"
    with pytest.raises(MalformedUpstreamError):
        parse_submit(dumps({"code": "success", "data": {"id": "x"}}))
    with pytest.raises(MalformedUpstreamError):
        parse_submit(dumps({"code": "success", "data": ""}))
    with pytest.raises(TransientUpstreamError) as info:
        parse_submit(dumps({"code": "quota_not_enough", "message": "no credit", "data": None}))
    assert "no credit" in info.value.message


def test_error_code_peeks_leniently() -> None:
    assert error_code(fetch_body(None, code="task_not_exist")) == "task_not_exist"
    assert error_code(dumps({"code": 500})) is None
    assert error_code(b"<html>") is None
    assert error_code(dumps([1])) is None


def test_a_task_needs_an_id() -> None:
    with pytest.raises(MalformedUpstreamError):
        parse_fetch(fetch_body(task(task_id="")))
    assert parse_fetch_batch(dumps({"code": "success", "data": [task(task_id="")]})).snapshots == []


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ("https://backend.example/hook?order=7", "https://backend.example/hook?order=7"),
        (" https://backend.example/hook ", "https://backend.example/hook"),
        ("", None),
        ("   ", None),
        (None, None),
        (42, None),
        ({"url": "https://backend.example/hook"}, None),
    ],
)
def test_the_notify_hook_the_relay_names_is_read_and_nothing_else_spoils_the_answer(
    hook: Any, expected: str | None
) -> None:
    body = fetch_body(task(notify_hook=hook))
    batch = dumps({"code": "success", "data": [task(notify_hook=hook)]})

    assert parse_fetch(body).notify_hook == expected
    assert [s.notify_hook for s in parse_fetch_batch(batch).snapshots] == [expected]
    assert parse_fetch(body).status is S.COMPLETE


def test_a_callback_names_its_hook_in_either_case() -> None:
    snake = parse_callback(dumps(task(notify_hook="https://backend.example/a")))
    camel = parse_callback(
        dumps({"taskId": "t1", "notifyHook": "https://backend.example/b", "status": "QUEUED"})
    )
    enveloped = parse_callback(fetch_body(task(notify_hook="https://backend.example/c")))
    without = parse_callback(dumps({"taskId": "t1", "status": "QUEUED"}))

    assert [s.notify_hook for s in (snake, camel, enveloped, without)] == [
        "https://backend.example/a",
        "https://backend.example/b",
        "https://backend.example/c",
        None,
    ]


@pytest.mark.parametrize("status", list(S))
def test_a_rendered_task_parses_back_to_what_was_rendered(status: S) -> None:
    """Both directions of the relay's format: what render_task writes, parse_fetch reads back (a
    terminal status the relay has no word for comes back as failed)."""
    clip = ClipView(
        id="c1", status=status, title="Song", audio_url="https://cdn.example/c1.mp3", image_url=None,
        image_large_url="https://cdn.example/large.jpeg", video_url=None, model_name="chirp-v4",
        duration=12.5, error="moderated" if status is S.FAILED else None,
    )  # fmt: skip
    rendered = render_task(
        task_id="t1", kind="music", status=status, progress=None, fail_reason=None, finished_at=None,
        notify_hook=None, clips=[clip],
    )  # fmt: skip
    parsed = parse_fetch(b'{"code": "success", "data": ' + rendered + b"}")
    expected = status if status in (S.SUBMITTED, S.QUEUED, S.IN_PROGRESS, S.COMPLETE) else S.FAILED
    assert (parsed.status, parsed.clips[0].status) == (expected, expected)
    assert msgspec.structs.replace(parsed.clips[0], raw_status=None, status=status) == ClipSnapshot(
        **msgspec.structs.asdict(clip), raw_status=None
    )
