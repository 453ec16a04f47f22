from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from service.upstream.client import RelayClient
from service.upstream.fake import FakeRelay
from service.upstream.schemas import ClipSnapshot, TaskSnapshot
from service.vocabulary import TaskStatus

FIXTURES = Path(__file__).parent / "fixtures"
API_KEY = "sk-test-relay-key-0123456789"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
def fetch_doc() -> bytes:
    """The `GET /suno/fetch/{id}` example, verbatim from the relay documentation."""
    return fixture_bytes("fetch_success_lyrics_action_song_clips.json")


@pytest.fixture
def v1_doc() -> bytes:
    """The `GET /suno/v1/v3.0/music/{id}` example, verbatim."""
    return fixture_bytes("v1_music_completed.json")


@pytest.fixture
def stems_doc() -> bytes:
    """The `GET /suno/act/stems/{clip_id}` example, verbatim."""
    return fixture_bytes("stems_queued.json")


@pytest.fixture
async def relay() -> AsyncIterator[FakeRelay]:
    async with FakeRelay(api_key=API_KEY) as relay:
        yield relay


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def client(relay: FakeRelay, session: aiohttp.ClientSession) -> RelayClient:
    return RelayClient(session, relay.base_url, API_KEY, timeout_s=2.0)


def _between(doc: bytes, start: bytes, end: bytes) -> bytes:
    """The bytes of the JSON value that follows `start` and precedes the last `end`."""
    return doc[doc.index(start) + len(start) : doc.rindex(end)]


FETCH_DOC_TIME = datetime(2024, 5, 20, 8, 2, 4, tzinfo=UTC)  # 1716192124


def expected_fetch_doc(doc: bytes) -> TaskSnapshot:
    """The fetch example: action says LYRICS but `data` is a list of song clips, so clips it is."""
    clip_ids = ("7a4bde37-f81a-4af2-a8a6-0d0c92f745b8", "375c0c33-988c-4178-98aa-25613f1b763c")
    return TaskSnapshot(
        task_id="f4a94d75-087b-4bb1-bd45-53ba293faf96",
        status=TaskStatus.COMPLETE,
        raw_status="SUCCESS",
        progress=100,
        fail_reason=None,
        submitted_at=FETCH_DOC_TIME,
        started_at=FETCH_DOC_TIME,
        finished_at=FETCH_DOC_TIME,
        clips=tuple(
            ClipSnapshot(
                id=clip_id,
                status=TaskStatus.COMPLETE,
                raw_status="complete",
                title="Feline Reverie",
                audio_url=f"https://cdn1.suno.ai/{clip_id}.mp3",
                image_url=f"https://cdn2.suno.ai/image_{clip_id}.jpeg",
                image_large_url=f"https://cdn2.suno.ai/image_large_{clip_id}.jpeg",
                video_url=f"https://cdn1.suno.ai/{clip_id}.mp4",
                model_name="chirp-v4",
                duration=duration,
                error=None,
            )
            for clip_id, duration in zip(clip_ids, (198.76, 119.04), strict=True)
        ),
        lyrics=None,
        raw=_between(doc, b'"data": ', b"\n}"),
    )


def expected_v1_doc(doc: bytes) -> TaskSnapshot:
    clip_ids = ("e0fe8bba-fac8-460b-bf1c-111111111111", "f66f7a6f-a868-464f-b280-111111111111")
    return TaskSnapshot(
        task_id="56ea8da3-8507-4118-9f1e-111111111111",
        status=TaskStatus.COMPLETE,
        raw_status="completed",
        progress=None,
        fail_reason=None,
        submitted_at=None,
        started_at=None,
        finished_at=None,
        clips=tuple(
            ClipSnapshot(
                id=clip_id,
                status=TaskStatus.COMPLETE,
                raw_status="complete",
                title="Blowin' in the Breeze",
                audio_url=f"https://cdn1.suno.ai/{clip_id}.mp3",
                image_url=f"https://cdn1.suno.ai/image_{clip_id}.png",
                image_large_url=f"https://cdn1.suno.ai/image_large_{clip_id}.png",
                video_url=f"https://cdn1.suno.ai/{clip_id}.mp4",
                model_name="chirp-v3",
                duration=duration,
                error=None,
            )
            for clip_id, duration in zip(clip_ids, (108.8, 103.2), strict=True)
        ),
        lyrics=None,
        raw=_between(doc, b'"data": ', b',\n"message"'),
    )


STEMS_SOURCE_CLIP = "2dd391cd-996b-4843-9738-1aed26f170e4"


def expected_stems_doc(doc: bytes) -> TaskSnapshot:
    """Stems are a task named after the source clip, its status derived from the stem clips."""
    stems = (
        ("81348e3a-7c6a-49f9-9b84-3b0cd3340128", "City Lights - Vocals"),
        ("6f1a1178-e931-4488-95f3-40bf4bc130ed", "City Lights - Instrumental"),
    )
    return TaskSnapshot(
        task_id=STEMS_SOURCE_CLIP,
        status=TaskStatus.QUEUED,
        raw_status=None,
        progress=None,
        fail_reason=None,
        submitted_at=None,
        started_at=None,
        finished_at=None,
        clips=tuple(
            ClipSnapshot(
                id=clip_id,
                status=TaskStatus.QUEUED,
                raw_status="queued",
                title=title,
                audio_url=None,
                image_url=None,
                video_url=None,
                duration=166.44,
                error=None,
            )
            for clip_id, title in stems
        ),
        lyrics=None,
        raw=doc,
    )
