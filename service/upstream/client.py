"""The relay HTTP client: one pooled aiohttp session, bounded concurrency, classified errors."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
import structlog
from multidict import CIMultiDictProxy
from yarl import URL

from service.http import retry_after_s
from service.upstream.dialects import (
    BatchParse,
    error_code,
    parse_fetch,
    parse_fetch_batch,
    parse_stems,
    parse_submit,
    parse_v1,
)
from service.upstream.schemas import (
    Dialect,
    MalformedUpstreamError,
    PermanentUpstreamError,
    TaskSnapshot,
    TransientUpstreamError,
    UpstreamError,
)
from service.vocabulary import DEFAULT_RELAY, TaskKind

__all__ = ["BatchResult", "RelayAnswer", "RelayClient"]

log = structlog.get_logger()

_T = TypeVar("_T")
# The batch endpoint's `action` for each kind it serves (stems have no batch form).
_BATCH_ACTIONS: dict[str, str] = {TaskKind.MUSIC: "MUSIC", TaskKind.LYRICS: "LYRICS"}
_JSON_HEADERS = {"Content-Type": "application/json"}
_MAX_MESSAGE = 200


class RelayAnswer(NamedTuple):
    """The relay's answer as it came: status, Content-Type, body, Retry-After."""

    status: int
    content_type: str | None
    body: bytes
    retry_after: str | None


@dataclass(slots=True)
class BatchResult:
    snapshots: dict[str, TaskSnapshot] = field(default_factory=dict)
    # Ids absent from a successful answer: not failed, the caller polls them again.
    missing: list[str] = field(default_factory=list)
    # Every id of a failed chunk maps to that chunk's error; an unreadable task to its own.
    errors: dict[str, UpstreamError] = field(default_factory=dict)


class RelayClient:
    """Speaks to one relay. The aiohttp session belongs to the caller (the app lifespan).

    Every method returns parsed data or raises an UpstreamError subclass; the semaphore bounds
    requests in flight across all methods, and a request's timeout starts once it holds a slot.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None = None,
        *,
        batch_size: int = 50,
        max_in_flight: int = 32,
        timeout_s: float = 10.0,
        batch_path: str = "/suno/fetch",
        dialect: Dialect = Dialect.FETCH,
        name: str = DEFAULT_RELAY,
    ) -> None:
        if batch_size < 1 or max_in_flight < 1 or not timeout_s > 0:
            raise ValueError("batch_size, max_in_flight and timeout_s must be positive")
        self._session = session
        self._base = str(URL(base_url)).rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._post_headers = {**self._headers, **_JSON_HEADERS}
        self.batch_size = batch_size
        self._batch_path = "/" + batch_path.strip("/")
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._dialect = dialect
        # The relay's name in this deployment (SUNOTRACK_RELAYS): its tasks are polled by its own poller.
        self.name = name
        self.max_in_flight = max_in_flight

    def __repr__(self) -> str:
        return f"RelayClient(name={self.name!r}, base_url={self._base!r})"

    # -- tasks of a kind, whatever the dialect ------------------------------------------------------

    def batches(self, kind: str) -> bool:
        """Whether tasks of this kind are asked about many at a time (fetch_tasks)."""
        return self._dialect is Dialect.FETCH and kind in _BATCH_ACTIONS

    def endpoint(self, kind: str, *, batched: bool) -> str:
        """The endpoint's name in metrics: batch, single, v1 or stems."""
        if batched:
            return "batch"
        if kind == TaskKind.STEMS:
            return "stems"
        return "v1" if self._dialect is Dialect.V1 else "single"

    async def fetch_task(self, kind: str, task_id: str) -> TaskSnapshot:
        """One task, from the endpoint that serves it alone."""
        if kind == TaskKind.STEMS:
            return await self.fetch_stems(task_id)
        if self._dialect is Dialect.V1:
            return await self.fetch_v1(task_id)
        return await self.fetch(task_id)

    async def fetch_tasks(self, kind: str, task_ids: Sequence[str]) -> BatchResult:
        """Tasks of a kind that `batches`, in batch requests."""
        return await self.fetch_batch(task_ids, _BATCH_ACTIONS[kind])

    # -- the relay's endpoints ----------------------------------------------------------------------

    async def fetch(self, task_id: str) -> TaskSnapshot:
        """`GET /suno/fetch/{task_id}`."""
        body = await self._get("/suno/fetch/", task_id)
        return _same_task(_parse(parse_fetch, body), task_id)

    async def fetch_v1(self, task_id: str) -> TaskSnapshot:
        """`GET /suno/v1/v3.0/music/{task_id}`."""
        body = await self._get("/suno/v1/v3.0/music/", task_id)
        return _same_task(_parse(parse_v1, body), task_id)

    async def fetch_stems(self, clip_id: str) -> TaskSnapshot:
        """`GET /suno/act/stems/{clip_id}`: a snapshot whose task_id is the source clip id."""
        body = await self._get("/suno/act/stems/", clip_id)
        return _parse(functools.partial(parse_stems, clip_id=clip_id), body)

    async def fetch_batch(self, task_ids: Sequence[str], action: str = "MUSIC") -> BatchResult:
        """`POST {batch_path}` in chunks of `batch_size`, the chunks concurrently."""
        ids = list(dict.fromkeys(task_ids))
        chunks = [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        if len(chunks) <= 1:
            answers = [await self._fetch_chunk(chunk, action) for chunk in chunks]
        else:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._fetch_chunk(chunk, action)) for chunk in chunks]
            answers = [task.result() for task in tasks]
        result = BatchResult()
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, UpstreamError):
                result.errors.update(dict.fromkeys(chunk, answer))
                continue
            wanted = set(chunk)
            for snapshot in answer.snapshots:
                if snapshot.task_id in wanted:
                    result.snapshots[snapshot.task_id] = snapshot
            for task_id, error in answer.errors.items():
                if task_id in wanted and task_id not in result.snapshots:
                    result.errors[task_id] = error
            result.missing.extend(
                task_id
                for task_id in chunk
                if task_id not in result.snapshots and task_id not in result.errors
            )
        return result

    async def submit_music(self, payload: dict[str, Any]) -> str:
        """`POST /suno/submit/music`: the new task's id."""
        return await self._submit("/suno/submit/music", payload)

    async def submit_lyrics(self, payload: dict[str, Any]) -> str:
        """`POST /suno/submit/lyrics`: the new task's id."""
        return await self._submit("/suno/submit/lyrics", payload)

    async def _fetch_chunk(self, chunk: list[str], action: str) -> BatchParse | UpstreamError:
        body = msgspec.json.encode({"ids": chunk, "action": action})
        try:
            answer = await self._request("POST", self._batch_path, body)
            return _parse(parse_fetch_batch, answer)
        except UpstreamError as exc:
            return exc

    async def _submit(self, path: str, payload: dict[str, Any]) -> str:
        answer = await self._request("POST", path, msgspec.json.encode(payload))
        return _parse(parse_submit, answer)

    async def _get(self, prefix: str, item_id: str) -> bytes:
        if not item_id:
            raise PermanentUpstreamError("invalid_id", "empty task or clip id")
        return await self._request("GET", prefix + quote(item_id, safe=""))

    async def forward(self, method: str, path: str, body: bytes | None = None) -> RelayAnswer:
        """One request passed through as it is (the relay front): whatever status the relay answers,
        with our key. Raises only when there is no answer: `connect` when nothing reached the relay,
        `timeout` or `disconnected` when the request may have been acted on."""
        status, answer, headers = await self._exchange(method, path, body)
        return RelayAnswer(status, headers.get("Content-Type"), answer, headers.get("Retry-After"))

    async def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        status, answer, headers = await self._exchange(method, path, body)
        if not 200 <= status < 300:
            raise _failed(_status_error(method, path, status, headers.get("Retry-After"), answer))
        return answer

    async def _exchange(
        self, method: str, path: str, body: bytes | None
    ) -> tuple[int, bytes, CIMultiDictProxy[str]]:
        if self._session.closed:
            raise TransientUpstreamError("client_closed", "the HTTP session is closed (shutting down?)")
        url = URL(self._base + path, encoded=True)
        headers = self._headers if body is None else self._post_headers
        try:
            async with (
                self._semaphore,
                self._session.request(
                    method, url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
                ) as response,
            ):
                return response.status, await response.read(), response.headers
        except aiohttp.ConnectionTimeoutError as exc:
            raise _failed(TransientUpstreamError("connect", f"{method} {path}: connect timed out")) from exc
        except TimeoutError as exc:
            raise _failed(TransientUpstreamError("timeout", f"{method} {path}: timed out")) from exc
        except aiohttp.ClientConnectorError as exc:
            raise _failed(TransientUpstreamError("connect", f"{method} {path}: cannot connect")) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, OSError) as exc:
            error = TransientUpstreamError("disconnected", f"{method} {path}: connection lost: {exc}")
            raise _failed(error) from exc
        except aiohttp.ClientPayloadError as exc:
            raise _failed(TransientUpstreamError("bad_json", f"{method} {path}: truncated body")) from exc
        except aiohttp.ClientResponseError as exc:
            # Only reachable when the session owner turned on raise_for_status.
            raise _failed(_status_error(method, path, exc.status, None, b"")) from exc
        except aiohttp.InvalidURL as exc:
            raise _failed(PermanentUpstreamError("invalid_url", f"{method} {path}: invalid URL")) from exc
        except aiohttp.ClientError as exc:
            error = TransientUpstreamError("client_error", f"{method} {path}: {type(exc).__name__}")
            raise _failed(error) from exc


def _parse(parser: Callable[[bytes], _T], body: bytes) -> _T:
    try:
        return parser(body)
    except UpstreamError as exc:
        _failed(exc)
        raise


def _failed(error: UpstreamError) -> UpstreamError:
    log.debug(
        "upstream.request_failed",
        error_class=error.error_class,
        code=error.code,
        http_status=error.http_status,
        detail=error.message,
    )
    return error


def _status_error(method: str, path: str, status: int, retry_after: str | None, body: bytes) -> UpstreamError:
    code = error_code(body)
    where = f"{method} {path}: HTTP {status}"
    if code == "task_not_exist":
        return PermanentUpstreamError("task_not_exist", f"{where} task_not_exist", http_status=status)
    if code:
        where = f"{where} ({code[:_MAX_MESSAGE]})"
    error_type: type[UpstreamError] = PermanentUpstreamError
    if status == 429:
        error_type, name = TransientUpstreamError, "rate_limited"
    elif status >= 500 or status == 408:
        error_type, name = TransientUpstreamError, f"http_{status}"
    elif status in (401, 403):
        name = "unauthorized"
    elif status == 404:
        name = "not_found"
    elif 300 <= status < 400:
        name, where = "redirect", f"{where}: redirects are not followed"
    else:
        name = f"http_{status}"
    # Only a retry can honour Retry-After; 503 and 429 are the statuses that usually carry it.
    delay = retry_after_s(retry_after) if error_type is TransientUpstreamError else None
    return error_type(name, where, http_status=status, retry_after_s=delay)


def _same_task(snapshot: TaskSnapshot, task_id: str) -> TaskSnapshot:
    if snapshot.task_id != task_id:
        error = MalformedUpstreamError(
            "bad_shape", f"asked for task {task_id!r}, relay answered for {snapshot.task_id!r}"
        )
        raise _failed(error)
    return snapshot
