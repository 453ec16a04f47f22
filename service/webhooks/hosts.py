"""Each lane's share of this process's webhook request slots, and how fast each host has been answering.

Per process, like SUNOTRACK_WEBHOOK_CONCURRENCY: the claim asks for no more of a lane's rows than its
free slots here (repository.Quotas). A lane is (client, host): a host gets SUNOTRACK_HOOK_HOST_CONCURRENCY
requests from each client with work for it, and a client at most `client_concurrency` in all, so one
client's hosts never hold the slots another client's deliveries need.

Work-conserving: a lane alone with due rows (the claim sees no other) may go over its share, up to its
client's slots less one share, while its host answers fast. What it took then it keeps until its
answers come back, so a newcomer finds a share of its client's slots and a quarter of the process's
free (a host that turns slow with its extra slots out holds them one answer long, never the newcomer's
share), and a host that answers slowly never goes over its share (docs/design.md, "Fair delivery
claims").

Claim-ahead: a lane on a fast host may hold `ahead` more rows than its allowance, claimed but not yet
sent, so a finished send starts the next with no claim round trip. Those rows hold no slot (a send
starts only within the lane's and client's slots), so they count against their lane's quota only; a
host that stops answering fast has its rows counted against its client too, until they are released.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from service.webhooks.repository import Blocked, Lane, Quotas

# A host is judged on its last SAMPLE_SIZE attempts, and only once it has MIN_SAMPLES of them: one
# timeout in a host's first few attempts does not halve its share.
SAMPLE_SIZE = 50
MIN_SAMPLES = 10
SLOW_PERCENTILE = 0.9
# A host with nothing in flight and no attempt for this long is forgotten (its samples with it).
FORGET_AFTER_S = 3600.0
# A host goes over its share only while the p90 of its recent answers is under this: the slots it
# takes when alone come back within the 1 s a newcomer's first webhook is promised.
FAST_ANSWER_S = 0.5


@dataclass(frozen=True, slots=True)
class HostView:
    host: str
    in_flight: int
    share: int
    slow: bool
    recent_attempts: int
    p50_ms: float | None
    p90_ms: float | None
    # Requests in flight by client key (0: the admin's tasks).
    in_flight_by_client: dict[int, int]


@dataclass(slots=True)
class _Host:
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLE_SIZE))
    # How many of `durations` are over the slow threshold: p90 over it <=> more than 10% of them are.
    over: int = 0
    # How many are over FAST_ANSWER_S (or the slow threshold, when lower).
    over_fast: int = 0
    fast: bool = False
    slow: bool = False
    last_seen: float = 0.0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class HostBook:
    """In-flight counts by lane and client, answer times by host; event loop only."""

    def __init__(self, *, concurrency: int, client_concurrency: int, slow_s: float) -> None:
        self.concurrency = concurrency
        self.client_concurrency = client_concurrency
        self._slow_s = slow_s
        self._fast_s = min(FAST_ANSWER_S, slow_s)
        self._slow_share = max(1, concurrency // 2)
        # A lane alone may take its client's slots less one share, which stays free for a newcomer of
        # the same client (other clients have the quarter of the process no client may take).
        self.alone_share = max(concurrency, client_concurrency - concurrency)
        self._hosts: dict[str, _Host] = {}
        self._lanes: Counter[Lane] = Counter()
        self._clients: Counter[int] = Counter()
        # Rows claimed ahead of a slot, by lane (claimed, not yet sent).
        self._ahead: Counter[Lane] = Counter()

    def share(self, host: str) -> int:
        state = self._hosts.get(host)
        return self._slow_share if state is not None and state.slow else self.concurrency

    def share_now(self, host: str) -> int:
        """The share that applies to this host's lanes now: its lone lane's allowance while the host
        answers fast and one of its lanes holds more than a share or is the only lane in flight (a due
        lane of any other would have been claimed: a newcomer is first in its claim)."""
        if not self._fast(host):
            return self.share(host)
        lanes = [lane for lane in self._lanes if lane[1] == host]
        alone = len(self._lanes) == 1 and bool(lanes)
        if alone or any(self._lanes[lane] > self.concurrency for lane in lanes):
            return self.alone_share
        return self.share(host)

    def free(self, lane: Lane) -> int:
        return max(0, self.share(lane[1]) - self._lanes[lane])

    def _fast(self, host: str) -> bool:
        state = self._hosts.get(host)
        return state is not None and state.fast

    def client_free(self, client: int) -> int:
        return max(0, self.client_concurrency - self._clients[client])

    def quotas(self, ahead: int = 0) -> Quotas:
        """What the next claim may take of each lane and client: their free slots, less the rows they
        hold claimed ahead; a fast host's lane when alone `ahead` more, to be sent as its slots free."""
        lanes = self._lanes.keys() | self._ahead.keys()
        return Quotas(
            lane_default=self.concurrency,
            client_default=self.client_concurrency,
            by_host={host: self._slow_share for host, state in self._hosts.items() if state.slow},
            by_lane={lane: max(0, self.free(lane) - self._ahead[lane]) for lane in lanes},
            by_client={
                client: max(0, self.client_free(client) - held) + room
                for client, (held, room) in self._held_by_clients(ahead).items()
            },
            alone_by_host={host: self.alone_share for host, state in self._hosts.items() if state.fast},
            alone_by_lane={
                lane: max(0, self.alone_share + ahead - self._lanes[lane] - self._ahead[lane])
                for lane in lanes
                if self._fast(lane[1])
            },
        )

    def _held_by_clients(self, ahead: int) -> dict[int, tuple[int, int]]:
        """By client with sends in flight or rows claimed ahead: the rows claimed ahead that count
        against it (its hosts' that no longer answer fast), and the room its fast hosts' lanes have
        left to claim ahead (their rows hold no slot)."""
        held: Counter[int] = Counter()
        fast: dict[int, int] = {}
        for lane in self._lanes.keys() | self._ahead.keys():
            if self._fast(lane[1]):
                fast[lane[0]] = fast.get(lane[0], 0) + self._ahead[lane]
            else:
                held[lane[0]] += self._ahead[lane]
        clients = self._clients.keys() | held.keys() | fast.keys()
        return {
            client: (held[client], max(0, ahead - fast[client]) if client in fast else 0)
            for client in clients
        }

    def claimed_ahead(self, lane: Lane) -> None:
        self._ahead[lane] += 1

    def unclaimed_ahead(self, lane: Lane, count: int = 1) -> None:
        """`count` rows of `lane` claimed ahead were sent or released."""
        self._ahead[lane] -= count
        if self._ahead[lane] <= 0:
            del self._ahead[lane]

    def may_start(self, lane: Lane, *, alone: bool) -> bool:
        """Whether a send of `lane` fits its slots now: its share, or its allowance when the last claim
        found it alone, and its client's."""
        allowance = self.alone_share if alone and self._fast(lane[1]) else self.share(lane[1])
        return self._lanes[lane] < allowance and self._clients[lane[0]] < self.client_concurrency

    def worth_a_claim(self, blocked: Blocked, lane: Lane, ahead: int = 0) -> bool:
        """Whether a send of `lane` finishing frees enough for a claim: half its share, or a quarter
        of its client's, where the last claim left rows behind for want of them; where it was the only
        lane left waiting (the next claim finds it alone), a quarter of its allowance when alone, or
        half of `ahead` once it has rows claimed ahead."""
        if blocked.lanes == {lane} and not blocked.clients and self._fast(lane[1]):
            held = self._lanes[lane] + self._ahead[lane]
            if ahead:
                return self.alone_share + ahead - held >= max(1, ahead // 2)
            return self.alone_share - held >= max(1, self.alone_share // 4)
        return (lane in blocked.lanes and self.free(lane) >= max(1, self.share(lane[1]) // 2)) or (
            lane[0] in blocked.clients and self.client_free(lane[0]) >= max(1, self.client_concurrency // 4)
        )

    def started(self, lane: Lane) -> None:
        self._lanes[lane] += 1
        self._clients[lane[0]] += 1

    def finished(self, lane: Lane, duration_s: float) -> bool:
        """One attempt of `lane` is over, after `duration_s`; updates whether its host is slow. True
        when its host was answering fast and no longer is."""
        self._lanes[lane] -= 1
        if not self._lanes[lane]:
            del self._lanes[lane]
        self._clients[lane[0]] -= 1
        if not self._clients[lane[0]]:
            del self._clients[lane[0]]
        state = self._hosts.get(lane[1])
        if state is None:
            state = self._hosts[lane[1]] = _Host()
        state.last_seen = time.monotonic()
        samples = state.durations
        if len(samples) == SAMPLE_SIZE:
            state.over -= samples[0] > self._slow_s
            state.over_fast -= samples[0] > self._fast_s
        samples.append(duration_s)
        state.over += duration_s > self._slow_s
        state.over_fast += duration_s > self._fast_s
        # Nearest-rank p90 of n samples is over a threshold when more than n - ceil(0.9 n) are.
        allowed = len(samples) - math.ceil(SLOW_PERCENTILE * len(samples))
        was_fast = state.fast
        state.slow = len(samples) >= MIN_SAMPLES and state.over > allowed
        state.fast = not state.slow and state.over_fast <= allowed
        return was_fast and not state.fast

    def forget_idle(self) -> None:
        horizon = time.monotonic() - FORGET_AFTER_S
        busy = {host for _, host in self._lanes | self._ahead}
        for host in [h for h, s in self._hosts.items() if h not in busy and s.last_seen < horizon]:
            del self._hosts[host]

    def view(self) -> list[HostView]:
        by_host: dict[str, dict[int, int]] = {host: {} for host in self._hosts}
        for (client, host), count in self._lanes.items():
            by_host.setdefault(host, {})[client] = count
        views = []
        for host, in_flight in sorted(by_host.items()):
            state = self._hosts.get(host)
            samples = list(state.durations) if state is not None else []
            views.append(
                HostView(
                    host=host,
                    in_flight=sum(in_flight.values()),
                    share=self.share_now(host),
                    slow=state is not None and state.slow,
                    recent_attempts=len(samples),
                    p50_ms=percentile(samples, 0.5) * 1000 if samples else None,
                    p90_ms=percentile(samples, SLOW_PERCENTILE) * 1000 if samples else None,
                    in_flight_by_client=in_flight,
                )
            )
        return views
