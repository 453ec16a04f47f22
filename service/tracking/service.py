"""Recording what happens to a task: registration and every transition. Never commits.

Every writer (the poller, the relay's callbacks, the API) goes through `_Recorder` while holding the
task rows' locks: it compares what the relay said with the stored state, appends one event per real
change with the next seqs, and writes tasks, clips, events and outbox rows in a few array statements.
Because the comparison happens under the lock, a poll and a callback racing each other cannot record
the same change twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import operator
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple, cast

import msgspec
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from service.config import Settings
from service.db import RequestConnection, database_unavailable
from service.errors import Conflict, DatabaseUnavailable, NotFound, UpstreamUnavailable, retry_shortly
from service.metrics import ANOMALIES, TRANSITIONS
from service.models import Task
from service.redact import mask_secret
from service.tracking import repository
from service.tracking.repository import (
    ClipState,
    EventRow,
    PollClaim,
    TaskState,
    UnchangedSchedule,
    clip_view,
    relay_json,
)
from service.upstream.client import RelayClient
from service.upstream.schemas import ClipContent, TaskSnapshot, UpstreamError
from service.vocabulary import (
    DEFAULT_RELAY,
    STATUS_RANK,
    TERMINAL_STATUSES,
    EventSource,
    EventType,
    HookSource,
    RelayHooks,
    TaskKind,
    TaskStatus,
)
from service.webhooks.bodies import TransitionNotice, delivery_format
from service.webhooks.outbox import enqueue_deliveries
from service.webhooks.ssrf import hook_host, hook_refusal

log = structlog.get_logger()


# Unchanged answers stretch the interval by this factor up to the maximum; a change resets it.
BACKOFF_FACTOR = 1.5
# Polls spread +-10 %: tasks registered together drift apart instead of hitting the relay in lockstep forever.
POLL_JITTER = 0.1
# Relays lag right after a submit, so "no such task" fails a task only when it repeats (and only
# after settings.not_found_grace_s since registration); other refusals (401...) get a longer rope.
NOT_FOUND_CODES = frozenset({"task_not_exist", "not_found"})
NOT_FOUND_LIMIT = 3
PERMANENT_LIMIT = 5
# A task left out of this many batch answers in a row is worth an anomaly (it is still polled singly).
MISSING_ANOMALY_AFTER = 3
# last_error of a task the batch answer left out: the next turn polls it on its own.
MISSING_FROM_BATCH = "missing_from_batch"
LAST_ERROR_MAX = 500

_TERMINAL = TERMINAL_STATUSES
_CLIP_CONTENT = ClipContent.__struct_fields__
_clip_content = operator.attrgetter(*_CLIP_CONTENT)
_RANK: dict[str, int] = {str(status): rank for status, rank in STATUS_RANK.items()}


def polls_singly(last_error: str | None) -> bool:
    """Tasks the batch answer left out, or that the relay says do not exist, are asked for one by one."""
    if last_error is None:
        return False
    code = last_error.partition(":")[0]
    return code == MISSING_FROM_BATCH or code in NOT_FOUND_CODES


_digest_encoder = msgspec.msgpack.Encoder()


def snapshot_digest(snapshot: TaskSnapshot) -> bytes:
    """64 bits that change with anything _Recorder.snapshot() reads. Merging an answer twice changes
    nothing the second time, so a poll whose answer has the digest of the last one merged is
    recorded without comparing (or reading) anything."""
    encoded = _digest_encoder.encode(
        (
            snapshot.raw_status,
            snapshot.status,
            snapshot.progress,
            snapshot.fail_reason,
            snapshot.clips,
            snapshot.notify_hook,
            snapshot.lyrics,
        )
    )
    return hashlib.blake2b(encoded, digest_size=8).digest()


def relay_hook_news(state: TaskState, snapshot: TaskSnapshot | None, settings: Settings) -> str | None:
    """The hook a relay answer names, when it is one to decide about now: the task has no hook from
    its registration, this is not the hook last decided, adopting is on, and it is not our own
    callback route (a relay told to call us back reports that as the task's hook)."""
    hook = None if snapshot is None else snapshot.notify_hook
    if (
        hook is None
        or hook == state.relay_notify_hook
        or state.notify_hook_source == HookSource.CLIENT
        or state.status in _TERMINAL
        or (state.client_relay_hooks or settings.relay_hooks) == RelayHooks.IGNORE
    ):
        return None
    token = settings.callback_token
    if token is not None and token.get_secret_value() in hook:
        return None
    return hook


class PollResult(NamedTuple):
    """What one poll of one claimed task produced: a snapshot, an error, or absence from a batch."""

    task_pk: int
    # Whether it came from a batch request: only those say whether the task was left out.
    batched: bool
    snapshot: TaskSnapshot | None = None
    error: UpstreamError | None = None


@dataclass(slots=True)
class _Recorder:
    now: datetime
    settings: Settings
    dirty: dict[int, TaskState] = field(default_factory=dict)
    clips: dict[tuple[int, str], ClipState] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    notices: list[TransitionNotice] = field(default_factory=list)
    # Why each relay hook about to be decided is refused (None: adopt it), from check_relay_hooks().
    hook_refusals: dict[str, str | None] = field(default_factory=dict)
    # Logged once written.
    logs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    # -- what the relay said ----------------------------------------------------------------------

    async def check_relay_hooks(self, answers: Iterable[tuple[TaskState, TaskSnapshot | None]]) -> None:
        """Check the new relay hooks among these answers as a registered hook is checked (which may
        resolve its host), before snapshot() decides about them. Rare: a task's hook is new once."""
        hooks = {
            hook for state, snapshot in answers if (hook := relay_hook_news(state, snapshot, self.settings))
        }
        if not hooks:
            return
        allow_private = self.settings.allow_private_hooks
        reasons = await asyncio.gather(*(hook_refusal(hook, allow_private=allow_private) for hook in hooks))
        self.hook_refusals.update(zip(hooks, reasons, strict=True))

    def _relay_hook(self, state: TaskState, snapshot: TaskSnapshot, source: EventSource) -> None:
        """Adopt the hook a relay answer names for a task registered without one (or replace the one
        adopted before), unless refused. Before the answer's transition: that one is delivered too."""
        hook = relay_hook_news(state, snapshot, self.settings)
        if hook is None:
            return
        state.relay_notify_hook = hook
        self.dirty[state.id] = state
        refusal = self.hook_refusals[hook]
        host = hook_host(hook)
        if refusal is not None:
            logged = {"host": host, "reason": refusal}
            self._anomaly(
                state, "relay_hook_refused", source, logged=logged, notify_hook=hook, reason=refusal
            )
            return
        previous, state.notify_hook, state.notify_hook_source = state.notify_hook, hook, HookSource.RELAY
        state.updated_at = self.now
        if previous is None:
            self.logs.append(("task.relay_hook_adopted", {"task_id": state.task_id, "host": host}))
        elif previous != hook:
            # The relay is the source of truth for the hooks it reports.
            logged = {"host": host, "previous_host": hook_host(previous)}
            self._anomaly(
                state, "relay_hook_replaced", source, logged=logged, notify_hook=hook, previous=previous
            )

    def snapshot(self, state: TaskState, snapshot: TaskSnapshot, source: EventSource) -> bool:
        """Merge one relay answer; True when anything about the task changed."""
        state.snapshot_digest = snapshot_digest(snapshot)
        if state.status in _TERMINAL:
            self._after_terminal(state, snapshot, source)
            return False
        self._relay_hook(state, snapshot, source)
        clip_moves, new_clip_ids, clip_news, clips_changed = self._merge_clips(state, snapshot)
        news = clip_news or snapshot.raw_status != state.upstream_status
        changed = clips_changed or news
        state.upstream_status = snapshot.raw_status
        if snapshot.progress is not None and snapshot.progress != state.progress:
            state.progress = snapshot.progress
            changed = True
        if snapshot.lyrics is not None and snapshot.lyrics != state.lyrics:
            state.lyrics = snapshot.lyrics
            changed = True

        reported = snapshot.status
        if reported is None:
            if news:
                self._anomaly(state, "unknown_status", source, upstream_status=snapshot.raw_status)
        elif _RANK[reported] < _RANK[state.status]:
            if news:
                self._anomaly(
                    state, "regression", source, upstream_status=snapshot.raw_status, reported=str(reported)
                )
        elif reported != state.status:
            fail_reason = snapshot.fail_reason if reported is TaskStatus.FAILED else None
            self.transition(
                state,
                reported,
                source,
                detail=_upstream_detail(snapshot.raw_status),
                fail_reason=fail_reason,
                relay_payload=snapshot.raw,
            )
            changed = True

        for clip_id, before, after, raw in clip_moves:
            self._event(
                state,
                EventType.TRANSITION,
                before,
                after,
                source=source,
                clip_id=clip_id,
                detail=_upstream_detail(raw),
            )
        if new_clip_ids and state.kind == TaskKind.STEMS and len(state.clips) > len(new_clip_ids):
            # Some relays start a new separation job per call: the first-seen stems stay the task's.
            self._anomaly(state, "new_stem_clips", source, clip_ids=new_clip_ids)
        if changed:
            state.last_answer = relay_json(snapshot.raw)
            state.updated_at = self.now
            self.dirty[state.id] = state
        return changed

    def _after_terminal(self, state: TaskState, snapshot: TaskSnapshot, source: EventSource) -> None:
        """Terminal is for good; a later answer that disagrees is only worth noting, once."""
        if snapshot.raw_status == state.upstream_status:
            return
        state.upstream_status = snapshot.raw_status
        self.dirty[state.id] = state
        reported = snapshot.status
        if reported is not None and reported != state.status:
            kind = "regression" if _RANK[reported] < _RANK[state.status] else "after_terminal"
            self._anomaly(state, kind, source, upstream_status=snapshot.raw_status, reported=str(reported))

    def _merge_clips(
        self, state: TaskState, snapshot: TaskSnapshot
    ) -> tuple[list[tuple[str, str | None, str, str | None]], list[str], bool, bool]:
        """Clip statuses only move forward; fields the relay stops sending keep their last value."""
        stored = {clip.clip_id: clip for clip in state.clips}
        moves: list[tuple[str, str | None, str, str | None]] = []
        new_ids: list[str] = []
        news = changed = False
        for seen in snapshot.clips:
            status = None if seen.status is None else str(seen.status)
            clip = stored.get(seen.id)
            if clip is None:
                clip = ClipState(
                    task_pk=state.id,
                    clip_id=seen.id,
                    position=len(state.clips),
                    status=status,
                    upstream_status=seen.raw_status,
                    updated_at=self.now,
                    **{name: getattr(seen, name) for name in _CLIP_CONTENT},
                )
                state.clips.append(clip)
                stored[seen.id] = clip
                new_ids.append(seen.id)
                if status is not None:
                    moves.append((seen.id, None, status, seen.raw_status))
                self._clip_dirty(state, clip)
                news = changed = True
                continue
            if (
                seen.raw_status == clip.upstream_status
                and status == clip.status
                and _clip_content(seen) == _clip_content(clip)
            ):
                continue  # the common answer: nothing new about this clip
            touched = False
            if seen.raw_status != clip.upstream_status:
                clip.upstream_status = seen.raw_status
                news = touched = True
            if status is not None and (
                clip.status is None or (clip.status not in _TERMINAL and _RANK[status] > _RANK[clip.status])
            ):
                moves.append((seen.id, clip.status, status, seen.raw_status))
                clip.status = status
                touched = True
            for name in _CLIP_CONTENT:
                value = getattr(seen, name)
                if value is not None and value != getattr(clip, name):
                    setattr(clip, name, value)
                    touched = True
            if touched:
                self._clip_dirty(state, clip)
                changed = True
        return moves, new_ids, news, changed

    def _clip_dirty(self, state: TaskState, clip: ClipState) -> None:
        clip.updated_at = self.now
        self.clips[state.id, clip.clip_id] = clip

    # -- what the poller saw ----------------------------------------------------------------------

    def poll(self, state: TaskState, result: PollResult) -> None:
        if state.status in _TERMINAL and result.snapshot is None:
            return  # finished meanwhile (callback, API, another poller): nothing left to say
        had_errors = state.consecutive_errors > 0
        state.last_polled_at = self.now
        state.poll_count += 1
        changed = False
        error = result.error
        if result.snapshot is not None:
            changed = self.snapshot(state, result.snapshot, EventSource.POLL)
            state.consecutive_errors = 0
            state.last_error = None
            if result.batched:
                state.missing_count = 0
        elif error is not None:
            self._error(state, error)
        else:
            state.missing_count += 1
            state.last_error = f"{MISSING_FROM_BATCH}: the relay's batch answer left the task out"
            if state.missing_count == MISSING_ANOMALY_AFTER:
                self._anomaly(state, "missing_from_batch", EventSource.POLL, times=state.missing_count)
        self._check_deadline(state)
        if state.status in _TERMINAL:
            state.next_poll_at = None
        else:
            self._schedule(state, error=error, reset=changed or had_errors)
        self.dirty[state.id] = state

    def _error(self, state: TaskState, error: UpstreamError) -> None:
        same = state.last_error is not None and state.last_error.partition(":")[0] == error.code
        state.consecutive_errors = state.consecutive_errors + 1 if same else 1
        state.last_error = f"{error.code}: {error.message}"[:LAST_ERROR_MAX]
        if error.error_class != "permanent":
            return
        times = state.consecutive_errors
        if error.code in NOT_FOUND_CODES:
            age = (self.now - state.created_at).total_seconds()
            if times >= NOT_FOUND_LIMIT and age >= self.settings.not_found_grace_s:
                reason = (
                    f"the relay answered {error.code} {times} times in a row, {age:.0f} s after registration"
                )
                self._fail(state, reason, error)
        elif times >= PERMANENT_LIMIT:
            self._fail(state, f"the relay refused {times} times in a row: {state.last_error}", error)

    def _fail(self, state: TaskState, reason: str, error: UpstreamError) -> None:
        self.logs.append(
            (
                "task.failed_by_errors",
                {"task_id": state.task_id, "code": error.code, "reason": reason},
            )
        )
        detail = {"reason": reason, "error": error.code}
        self.transition(
            state, TaskStatus.FAILED, EventSource.POLL, detail=detail, fail_reason=reason, relay_payload=None
        )

    def _check_deadline(self, state: TaskState) -> None:
        if state.status in _TERMINAL:
            return
        deadline_s = self.settings.task_deadline_s
        if self.now < state.created_at + timedelta(seconds=deadline_s):
            return
        reason = f"no terminal status within the deadline of {deadline_s:g} s since registration"
        self.logs.append(("task.timed_out", {"task_id": state.task_id, "deadline_s": deadline_s}))
        self.transition(
            state,
            TaskStatus.TIMED_OUT,
            EventSource.DEADLINE,
            detail={"reason": reason},
            fail_reason=reason,
            relay_payload=None,
        )

    def _schedule(self, state: TaskState, *, error: UpstreamError | None, reset: bool) -> None:
        low, high = self.settings.poll_min_interval_s, self.settings.poll_max_interval_s
        interval = state.poll_interval_s or low
        wait_at_least = 0.0
        if error is not None:
            interval = min(high, max(low, interval * 2))
            wait_at_least = error.retry_after_s or 0.0
        elif state.last_error is not None or reset:
            interval = low  # a change, a recovery, or a batch miss to re-ask about at once
        else:
            interval = min(high, interval * BACKOFF_FACTOR)
        state.poll_interval_s = interval
        delay = max(interval * random.uniform(1 - POLL_JITTER, 1 + POLL_JITTER), wait_at_least)  # noqa: S311  (jitter, not crypto)
        due = self.now + timedelta(seconds=delay)
        # Never sleep past the deadline: the poll at the deadline is what times the task out.
        deadline = state.created_at + timedelta(seconds=self.settings.task_deadline_s)
        state.next_poll_at = min(due, max(deadline, self.now))

    # -- events -----------------------------------------------------------------------------------

    def _event(
        self,
        state: TaskState,
        type_: str,
        from_status: str | None,
        to_status: str,
        *,
        source: EventSource,
        clip_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        state.last_seq += 1
        self.events.append(
            EventRow(
                task_pk=state.id,
                seq=state.last_seq,
                at=self.now,
                type=type_,
                from_status=from_status,
                to_status=to_status,
                source=source,
                clip_id=clip_id,
                detail=detail,
            )
        )
        self.dirty[state.id] = state
        return state.last_seq

    def _anomaly(
        self,
        state: TaskState,
        kind: str,
        source: EventSource,
        *,
        logged: dict[str, Any] | None = None,
        **detail: Any,
    ) -> None:
        """`logged`, when given, is what the log line says instead of `detail` (hook URLs may carry
        their receivers' tokens: the event keeps them, the log only their hosts)."""
        fields = detail if logged is None else logged
        self.logs.append(("task.anomaly", {"task_id": state.task_id, "anomaly": kind, **fields}))
        self._event(
            state,
            EventType.ANOMALY,
            state.status,
            state.status,
            source=source,
            detail={"anomaly": kind, **detail},
        )

    def transition(
        self,
        state: TaskState,
        to_status: TaskStatus,
        source: EventSource,
        *,
        detail: dict[str, Any] | None,
        fail_reason: str | None,
        relay_payload: bytes | None,
    ) -> None:
        previous = state.status
        seq = self._event(state, EventType.TRANSITION, previous, to_status, source=source, detail=detail)
        state.status = to_status
        state.updated_at = self.now
        if fail_reason is not None:
            state.fail_reason = fail_reason
        if to_status in _TERMINAL:
            state.finished_at = self.now
            state.next_poll_at = None
        if state.notify_hook is not None:
            token = self.settings.callback_token
            if relay_payload is not None and token is not None:
                # A relay calling us back names our callback route in its answers; the hook is not ours.
                relay_payload = mask_secret(relay_payload, token.get_secret_value())
            self.notices.append(
                TransitionNotice(
                    task_pk=state.id,
                    task_id=state.task_id,
                    kind=state.kind,
                    seq=seq,
                    status=to_status,
                    previous_status=previous,
                    progress=state.progress,
                    fail_reason=state.fail_reason,
                    clips=[clip_view(clip) for clip in state.clips],
                    lyrics=state.lyrics,
                    metadata=state.metadata,
                    at=self.now,
                    notify_hook=state.notify_hook,
                    notify_format=delivery_format(state.notify_format, state.notify_hook_source),
                    relay_payload=relay_payload,
                )
            )

    async def flush(self, session: AsyncSession) -> None:
        """Write everything, in the transaction that read the rows under lock."""
        if not self.dirty:
            return
        await repository.write_page(
            session, list(self.dirty.values()), list(self.clips.values()), self.events
        )
        if self.notices:
            await enqueue_deliveries(session, self.notices)
        for event in self.events:
            if event.type == EventType.ANOMALY:
                ANOMALIES.labels(event.detail["anomaly"] if event.detail else "unknown").inc()
            elif event.clip_id is None:
                TRANSITIONS.labels(event.source, event.to_status).inc()
                log.debug(
                    "task.transition",
                    task_id=self.dirty[event.task_pk].task_id,
                    seq=event.seq,
                    previous=event.from_status,
                    status=event.to_status,
                    source=event.source,
                )
        for name, fields in self.logs:
            log.info(name, **fields)


def _upstream_detail(raw_status: str | None) -> dict[str, Any] | None:
    return None if raw_status is None else {"upstream_status": raw_status}


# -- entry points -----------------------------------------------------------------------------------


async def claim_polls(
    session: AsyncSession,
    *,
    relay: str = DEFAULT_RELAY,
    after: int = 0,
    limit: int,
    settings: Settings,
    since: int | None = None,
) -> PollClaim:
    """Lock up to `limit` due tasks of `relay` with ids above `after` for polling (and the other
    clients' records of the same relay tasks), in the session's transaction: the caller keeps it open
    until record_polls() has recorded the answers. Each row is already scheduled as if its answer will
    change nothing (see repository._CLAIM): the backoff of _Recorder._schedule() for that case.
    `since`: only among the tasks registered after this feed mark (a look-ahead's)."""
    schedule = UnchangedSchedule(
        min_s=settings.poll_min_interval_s,
        max_s=settings.poll_max_interval_s,
        factor=BACKOFF_FACTOR,
        jitter=POLL_JITTER,
        deadline_s=settings.task_deadline_s,
    )
    return await repository.claim_due_tasks(
        session, relay=relay, after=after, limit=limit, schedule=schedule, since=since
    )


async def record_polls(
    session: AsyncSession,
    claim: PollClaim,
    results: Sequence[PollResult],
    *,
    settings: Settings,
    now: datetime,
) -> bool:
    """Record the answers about claimed tasks, in the claim's transaction; returns whether anything
    beyond what the claim wrote was written.

    An answer with the digest of the last one merged into its quiet task is already recorded: the
    claim wrote its schedule. The others are compared with the stored state and recorded in full.
    Tasks claimed but not polled are made due again.
    """
    claimed = {task.id: task for task in claim.tasks}
    news: dict[int, PollResult] = {}
    for result in results:
        task = claimed[result.task_pk]
        snapshot = result.snapshot
        if not (
            task.quiet
            and snapshot is not None
            and task.snapshot_digest is not None
            and task.snapshot_digest == snapshot_digest(snapshot)
        ):
            news[task.id] = result
    unpolled = claimed.keys() - {result.task_pk for result in results}
    if not news and not unpolled:
        return False
    # Already locked by this transaction: this reads them, with their clips.
    _, states = await repository.lock_task_states(session, pks=[*news, *unpolled])
    recorder = _Recorder(now, settings)
    await recorder.check_relay_hooks((state, news[state.id].snapshot) for state in states if state.id in news)
    for state in states:
        # Undo what the claim wrote for an answer that changes nothing; the recorder schedules anew.
        state.poll_interval_s = claimed[state.id].poll_interval_s
        state.poll_count -= 1
        if state.id in news:
            recorder.poll(state, news[state.id])
        else:
            state.next_poll_at = now  # and last_polled_at says when it was claimed
            recorder.dirty[state.id] = state
    await recorder.flush(session)
    return True


async def record_snapshot(
    session: AsyncSession,
    snapshot: TaskSnapshot,
    *,
    source: EventSource,
    settings: Settings,
    pks: Sequence[int] | None = None,
    relay: str = DEFAULT_RELAY,
    hint: dict[str, Any] | None = None,
) -> bool:
    """Record the relay's answer to a poll of one task outside the poller (an API refresh, or the
    poll a relay callback triggers: poll_task) into the tasks `pks`, or into every client's record
    of that task id on `relay`. `hint`, the callback's body, goes into the detail of the first event
    the answer records for each, as `callback`.

    It leaves next_poll_at of a live task alone: the schedule is the poller's. Returns False when no
    such task is tracked.
    """
    if pks is None:
        now, states = await repository.lock_task_states(session, relay=relay, task_ids=[snapshot.task_id])
    else:
        now, states = await repository.lock_task_states(session, pks=pks)
    if not states:
        return False
    recorder = _Recorder(now, settings)
    await recorder.check_relay_hooks((state, snapshot) for state in states)
    for state in states:
        recorded = len(recorder.events)
        if recorder.snapshot(state, snapshot, source):
            state.poll_interval_s = settings.poll_min_interval_s
        if hint is not None and len(recorder.events) > recorded:
            first = recorder.events[recorded]
            detail = {**(first.detail or {}), "callback": hint}
            recorder.events[recorded] = msgspec.structs.replace(first, detail=detail)
        recorder.dirty[state.id] = state
        state.last_polled_at = now
        state.poll_count += 1
        state.consecutive_errors = 0
        state.last_error = None
    await recorder.flush(session)
    # Rows were written with Core statements: ORM copies loaded earlier in this session are stale.
    session.expire_all()
    return True


PollOutcome = Literal["polled", "finished", "in_flight"]


async def poll_task(
    session: AsyncSession,
    relays: Mapping[str, RelayClient],
    task_id: str,
    *,
    source: EventSource,
    settings: Settings,
    client_id: int | None = None,
    relay: str = DEFAULT_RELAY,
    hint: dict[str, Any] | None = None,
) -> PollOutcome:
    """Poll one task now and record what the relay answers: an API refresh of a client's task
    (source `api`; client_id None: the admin's), or the poll a relay callback triggers (source
    `callback`, `hint` its body; see record_snapshot), for every client's record of that task id on
    `relay`.

    Like a poller's claim, the tasks' rows stay locked from before the request until the answer is
    recorded. A refresh waits for a poll holding its task; a callback's poll does not: that poll is in
    flight ("in_flight", nothing asked). A finished task is left as it is ("finished": polling
    stopped for good). NotFound for a task not tracked; UpstreamUnavailable, with nothing written,
    when the relay fails.
    """
    if source == EventSource.CALLBACK:
        tasks = await repository.lock_tasks(session, relay, task_id)
        if not tasks:
            if await repository.tracks(session, relay, task_id):
                return "in_flight"
            raise NotFound(f"task {task_id!r} is not tracked", extra={"task_id": task_id})
    else:
        tasks = [await _require_task(session, client_id, task_id, for_update=True)]
    live = [task for task in tasks if task.status not in _TERMINAL]
    if not live:
        return "finished"
    client = relays.get(live[0].relay)
    if client is None:
        raise UpstreamUnavailable(f"relay {live[0].relay!r} is not configured in this process")
    try:
        snapshot = await client.fetch_task(live[0].kind, task_id)
    except UpstreamError as exc:
        raise UpstreamUnavailable(
            f"the relay did not answer usefully: {exc.message}",
            extra={"error_class": exc.error_class, "upstream_code": exc.code},
        ) from exc
    pks = [task.id for task in live]
    await record_snapshot(session, snapshot, source=source, settings=settings, pks=pks, hint=hint)
    return "polled"


async def cancel_task(
    session: AsyncSession, task_id: str, *, client_id: int | None = None, settings: Settings
) -> None:
    """Stop tracking a client's task (None: the admin's) with status `cancelled` (source `api`); the
    history stays.

    Cancelling a cancelled task again is a no-op; a task that already finished otherwise is a
    conflict (its outcome is known, and a client should not be told it was cancelled).
    """
    task = await _require_task(session, client_id, task_id)
    now, [state] = await repository.lock_task_states(session, pks=[task.id])
    if state.status == TaskStatus.CANCELLED:
        return
    if state.status in _TERMINAL:
        raise Conflict(
            f"task {task_id!r} already finished with status {state.status!r}",
            extra={"task_id": task_id, "status": state.status},
        )
    recorder = _Recorder(now, settings)
    recorder.transition(
        state,
        TaskStatus.CANCELLED,
        EventSource.API,
        detail={"reason": "cancelled through the API"},
        fail_reason=None,
        relay_payload=None,
    )
    await recorder.flush(session)
    session.expire_all()


async def _require_task(
    session: AsyncSession, client_id: int | None, task_id: str, *, for_update: bool = False
) -> Task:
    task = await repository.get_task(session, client_id, task_id, for_update=for_update)
    if task is None:
        raise NotFound(f"task {task_id!r} is not tracked", extra={"task_id": task_id})
    return task


@dataclass(frozen=True, slots=True)
class Registration:
    """One task to start tracking; `relay` None: the registering caller's relay."""

    task_id: str
    kind: str
    notify_hook: str | None = None
    notify_format: str | None = None
    metadata: dict[str, Any] | None = None
    relay: str | None = None


# A task as registration answers it: the row of repository.task_view_statement (every column, JSON as
# text, its client's name, its clips), without the timeline. A new task has no clips.
_EVERY_COLUMN = [column.name for column in Task.__table__.c]
_NEW_TASK_VIEW = ", ".join(
    [
        *repository.task_view_columns(_EVERY_COLUMN, "t"),
        "NULL::text AS clips",
        "(SELECT c.name FROM clients c WHERE c.id = t.client_id) AS client_name",
    ]
)
# Every new task of a call and its registration event in one statement (docs/design.md, "Registration
# in one statement"). Polls are scheduled by the database's clock only ("One clock"). A task another
# client already polls on the same relay is `shared`: the claims then poll both records together.
# `given`: $1-$6 the registrations' columns, $7 the client (NULL: the admin), $8 the poll interval.
_REGISTER_GIVEN = f"""
WITH given AS ({{given}}), created AS (
    INSERT INTO tasks (task_id, client_id, relay, shared, kind, status, notify_hook, notify_hook_source,
                       notify_format, metadata, last_seq, created_at, updated_at, next_poll_at,
                       poll_interval_s)
    SELECT g.task_id, CAST($7 AS bigint), g.relay,
           EXISTS (SELECT FROM tasks o WHERE o.task_id = g.task_id AND o.relay = g.relay
                   AND o.client_id IS DISTINCT FROM CAST($7 AS bigint)
                   AND o.next_poll_at IS NOT NULL),
           g.kind, '{TaskStatus.SUBMITTED}', g.notify_hook,
           CASE WHEN g.notify_hook IS NOT NULL THEN '{HookSource.CLIENT}' END,
           g.notify_format, CAST(g.metadata AS jsonb), 1, now(), now(),
           now() + make_interval(secs => CAST($8 AS double precision)), CAST($8 AS double precision)
    FROM given g ORDER BY g.ord
    ON CONFLICT (task_id, client_id) DO NOTHING
    RETURNING *
), registered AS (
    INSERT INTO task_events (task_pk, seq, at, type, from_status, to_status, source)
    SELECT id, 1, created_at, '{EventType.TRANSITION}', NULL, '{TaskStatus.SUBMITTED}',
           '{EventSource.REGISTER}'
    FROM created
)
SELECT {_NEW_TASK_VIEW} FROM created t
"""  # noqa: S608  (every interpolation is a constant of ours)
_REGISTER = _REGISTER_GIVEN.format(
    given="""SELECT * FROM unnest(
        CAST($1 AS text[]), CAST($2 AS text[]), CAST($3 AS text[]),
        CAST($4 AS text[]), CAST($5 AS text[]), CAST($6 AS text[])
    ) WITH ORDINALITY AS g(task_id, kind, relay, notify_hook, notify_format, metadata, ord)"""
)
# One registration as scalars: Postgres then keeps one generic plan for the prepared statement. For
# arrays its generic plan guesses ten rows, so it planned every call afresh (docs/design.md,
# "Registration figures").
_REGISTER_ONE = _REGISTER_GIVEN.format(
    given="""SELECT CAST($1 AS text) AS task_id, CAST($2 AS text) AS kind, CAST($3 AS text) AS relay,
        CAST($4 AS text) AS notify_hook, CAST($5 AS text) AS notify_format,
        CAST($6 AS text) AS metadata, 1 AS ord"""
)
_OWN_TASK = "t.task_id = $1 AND t.client_id IS NOT DISTINCT FROM CAST($2 AS bigint)"
_REPLACED = ("kind", "relay", "notify_hook", "notify_hook_source", "notify_format", "metadata")
_LOCK_TASK = f"SELECT {', '.join(_REPLACED)} FROM tasks t WHERE {_OWN_TASK} FOR UPDATE"  # noqa: S608
# $3-$6: the hook, its source, the format and the metadata (JSON) as they are to be.
# A task registered before, as task_view_statement shows it (its timeline is left out of the answer).
_TASK_AGAIN = repository.task_view_statement(_EVERY_COLUMN)
# RETURNING: a session's result of a statement that returns no rows cannot be read as rows.
_REPLACE = f"""
UPDATE tasks t SET notify_hook = $3, notify_hook_source = $4, notify_format = $5,
                   metadata = CAST($6 AS jsonb), updated_at = now()
WHERE {_OWN_TASK} RETURNING t.id
"""  # noqa: S608
# A task row and the statements that read it: by the driver (asyncpg Records) or through a session
# (row mappings), both indexed by column name.
TaskRow = Mapping[str, Any]
Fetch = Callable[..., Awaitable[Sequence[TaskRow]]]


def _json(value: dict[str, Any]) -> str:
    return msgspec.json.encode(value).decode()


def session_fetch(session: AsyncSession) -> Fetch:
    """`Fetch` in the session's transaction, for callers that hold one (the relay front, tests)."""

    async def fetch(query: str, *args: Any) -> Sequence[TaskRow]:
        connection = await session.connection()
        rows = (await connection.exec_driver_sql(query, args)).mappings().all()
        return cast("Sequence[TaskRow]", rows)

    return fetch


async def register_new(
    fetch: Fetch,
    registrations: Sequence[Registration],
    *,
    client_id: int | None = None,
    default_relay: str = DEFAULT_RELAY,
    settings: Settings,
) -> dict[str, TaskRow]:
    """The tasks of `registrations` the client had not registered, each created with its registration
    event, in one statement (atomic on its own, so it may run outside a transaction); by task id."""
    if not registrations:
        return {}
    columns = (
        [r.task_id for r in registrations],
        [r.kind for r in registrations],
        [r.relay or default_relay for r in registrations],
        [r.notify_hook for r in registrations],
        [r.notify_format for r in registrations],
        [None if r.metadata is None else _json(r.metadata) for r in registrations],
    )
    interval = settings.poll_min_interval_s
    if len(registrations) == 1:
        rows = await fetch(_REGISTER_ONE, *(one for (one,) in columns), client_id, interval)
    else:
        rows = await fetch(_REGISTER, *columns, client_id, interval)
    return {row["task_id"]: row for row in rows}


# Group statements in flight at once, each on a pooled connection of its own.
REGISTER_STATEMENTS = 4
# One statement's registrations at most: a group's, and a call of the batch route's (api.schemas).
REGISTER_GROUP_MAX = 500


@dataclass(slots=True)
class _Waiting:
    registration: Registration
    answer: asyncio.Future[TaskRow | None]


class Registrar:
    """Single new registrations that wait at the same moment go out as one statement per client, as
    the batch route's do (docs/design.md, "Registrations grouped into one statement"): each statement's
    fixed cost (round trip, executor start, commit, the counts trigger) is then paid once per group.
    At most REGISTER_STATEMENTS run at once; one arriving while a slot is free goes at once, alone, so
    grouping adds no wait, and groups form only while every slot is busy."""

    def __init__(self, engine: AsyncEngine, settings: Settings, *, slots: int = REGISTER_STATEMENTS) -> None:
        self._engine = engine
        self._settings = settings
        self._slots = slots
        # By client, oldest first: each group is one client's (the statement takes it as a scalar).
        self._queues: dict[int | None, deque[_Waiting]] = {}
        self._busy = 0
        # A flusher started but not yet given its group takes whatever is queued when it runs.
        self._starting = 0
        self._flushers: set[asyncio.Task[None]] = set()
        self._closed = False

    async def register(
        self, registration: Registration, *, client_id: int | None, default_relay: str
    ) -> TaskRow | None:
        """The task created with its registration event (committed), or None when the client had
        registered it already (the caller goes on to register_again)."""
        if self._closed:
            raise _stopping()
        answer: asyncio.Future[TaskRow | None] = asyncio.get_running_loop().create_future()
        given = replace(registration, relay=registration.relay or default_relay)
        self._queues.setdefault(client_id, deque()).append(_Waiting(given, answer))
        self._start()
        return await answer

    def _start(self) -> None:
        if self._queues and self._busy < self._slots and not self._starting and not self._closed:
            self._busy += 1
            self._starting += 1
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)

    def _take(self) -> tuple[int | None, list[_Waiting]]:
        """The oldest client's queue, up to REGISTER_GROUP_MAX, each task id once: ON CONFLICT would
        create a repeated one once and answer both as created, so the later one waits for a later group
        (where it finds the task and is answered None). Sorted by task id, so groups that overlap lock
        their rows in one order and cannot deadlock."""
        client_id = next(iter(self._queues))
        queue = self._queues.pop(client_id)
        group: dict[str, _Waiting] = {}
        later: deque[_Waiting] = deque()
        while queue and len(group) < REGISTER_GROUP_MAX:
            waiting = queue.popleft()
            if waiting.answer.done():  # its request went away before it was sent
                continue
            if waiting.registration.task_id in group:
                later.append(waiting)
            else:
                group[waiting.registration.task_id] = waiting
        later.extend(queue)
        if later:
            self._queues[client_id] = later  # behind the other clients' queues
        return client_id, [group[task_id] for task_id in sorted(group)]

    async def _flush(self) -> None:
        try:
            self._starting -= 1
            if not self._queues:
                return
            client_id, group = self._take()
            self._start()
            if group:
                await self._answer(client_id, group)
        finally:
            self._busy -= 1
            self._start()

    async def _answer(self, client_id: int | None, group: list[_Waiting]) -> None:
        try:
            created = await self._statement(client_id, [waiting.registration for waiting in group])
        except Exception as exc:
            if len(group) == 1 or database_unavailable(exc):
                for waiting in group:
                    _settle(waiting.answer, exc)
                return
            # One registration the statement refused must not fail the others: each alone.
            log.warning("register.group_failed", size=len(group), error=type(exc).__name__)
            for waiting in group:
                await self._answer(client_id, [waiting])
            return
        for waiting in group:
            _settle(waiting.answer, created.get(waiting.registration.task_id))

    async def _statement(
        self, client_id: int | None, registrations: Sequence[Registration]
    ) -> dict[str, TaskRow]:
        db = RequestConnection(self._engine)
        try:
            return await register_new(db.fetch, registrations, client_id=client_id, settings=self._settings)
        finally:
            await db.release()

    async def stop(self) -> None:
        """Refuse what is queued and what comes later; let the statements in flight finish."""
        self._closed = True
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for waiting in queue:
                _settle(waiting.answer, _stopping())
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)


def _stopping() -> DatabaseUnavailable:
    return retry_shortly("the service is stopping: retry shortly")


def _settle(answer: asyncio.Future[TaskRow | None], outcome: TaskRow | BaseException | None) -> None:
    if answer.done():  # its request went away
        return
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)


async def register_tasks(
    fetch: Fetch,
    registrations: Sequence[Registration],
    *,
    client_id: int | None = None,
    default_relay: str = DEFAULT_RELAY,
    settings: Settings,
) -> list[tuple[TaskRow, bool] | Conflict]:
    """Start tracking each task for a client (None: the admin), in order: (task row, created) for each,
    or the Conflict refusing it. Registering the same task again (in this call too) is idempotent.
    `fetch` runs in one transaction: a task registered before is locked while its hook, format or
    metadata is replaced.

    New tasks cost one statement together; only a task registered before takes statements of its own.
    A refused one wrote nothing, so the caller may go on with the others in the same transaction."""
    created = await register_new(
        fetch, registrations, client_id=client_id, default_relay=default_relay, settings=settings
    )
    results: list[tuple[TaskRow, bool] | Conflict] = []
    for registration in registrations:
        task = created.pop(registration.task_id, None)
        if task is not None:
            results.append((task, True))
            continue
        try:
            results.append((await register_again(fetch, client_id, registration), False))
        except Conflict as refused:
            results.append(refused)
    return results


async def register_task(
    session: AsyncSession,
    *,
    client_id: int | None = None,
    task_id: str,
    kind: str,
    relay: str | None = None,
    default_relay: str = DEFAULT_RELAY,
    notify_hook: str | None,
    notify_format: str | None,
    metadata: dict[str, Any] | None,
    settings: Settings,
) -> tuple[TaskRow, bool]:
    """One registration (register_tasks) in the session's transaction; returns (task row, created), or
    raises its Conflict."""
    registration = Registration(task_id, kind, notify_hook, notify_format, metadata, relay)
    (result,) = await register_tasks(
        session_fetch(session),
        [registration],
        client_id=client_id,
        default_relay=default_relay,
        settings=settings,
    )
    if isinstance(result, Conflict):
        raise result
    return result


async def register_again(fetch: Fetch, client_id: int | None, given: Registration) -> TaskRow:
    """The same task again: 200 with the existing one, whose hook, format and metadata a non-null value
    given now replaces (no event); a different kind or relay is a Conflict. `fetch` runs in a
    transaction, which holds the task's row lock until it ends."""
    # A concurrent registration may still be committing: the row lock waits for it.
    (existing,) = await fetch(_LOCK_TASK, given.task_id, client_id)
    for name, value in (("kind", given.kind), ("relay", given.relay)):
        registered = existing[name]
        if value is not None and registered != value:
            raise Conflict(
                f"task_id {given.task_id!r} is already registered with {name} {registered!r}, not {value!r}",
                extra={"task_id": given.task_id, name: registered},
            )
    # A hook given at registration replaces one adopted from the relay, and the relay's never replaces it.
    replacements: dict[str, Any] = {
        "notify_hook": given.notify_hook,
        "notify_hook_source": None if given.notify_hook is None else HookSource.CLIENT.value,
        "notify_format": given.notify_format,
        "metadata": given.metadata,
    }
    wanted = {
        name: existing[name] if replacement is None else replacement
        for name, replacement in replacements.items()
    }
    if any(wanted[name] != existing[name] for name in replacements):
        metadata = wanted["metadata"]
        await fetch(
            _REPLACE,
            given.task_id,
            client_id,
            wanted["notify_hook"],
            wanted["notify_hook_source"],
            wanted["notify_format"],
            None if metadata is None else _json(metadata),
        )
    (view,) = await fetch(_TASK_AGAIN, given.task_id, client_id)
    return view
