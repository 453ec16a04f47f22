"""Prometheus metrics, one registry per process, served at /metrics."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric

REGISTRY = CollectorRegistry(auto_describe=True)


class PageHistogram:
    """A histogram observed a page of values at a time, exported like prometheus_client's own, without
    a lock per value (docs/design.md, "The poller's process"). Observed from the event loop only."""

    def __init__(
        self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        counts, bounds = self._counts, self._bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # bucket `le` holds values <= its bound
        self._sum += sum(values)

    def collect(self) -> Iterator[Metric]:
        cumulative = list(accumulate(self._counts))
        # The labels Histogram writes: 0.01 -> "0.01", 1 -> "1.0".
        buckets = [(repr(float(bound)), n) for bound, n in zip(self._bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=self._sum)


# --- tracking -----------------------------------------------------------------------------------------
POLLS = Counter("sunotrack_polls", "Task polls answered by the relay", ["endpoint"], registry=REGISTRY)
UPSTREAM_ERRORS = Counter(
    "sunotrack_upstream_errors", "Relay errors by class and code", ["error_class", "code"], registry=REGISTRY
)
TRANSITIONS = Counter(
    "sunotrack_transitions", "Recorded task-level transitions", ["source", "to_status"], registry=REGISTRY
)
ANOMALIES = Counter("sunotrack_anomalies", "Recorded anomalies", ["kind"], registry=REGISTRY)
CLAIM_LAG = PageHistogram(
    "sunotrack_claim_lag_seconds",
    "now - next_poll_at of claimed tasks",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
POLL_TICK = Histogram("sunotrack_poll_tick_seconds", "Duration of one poller tick", registry=REGISTRY)

# --- webhooks -----------------------------------------------------------------------------------------
DELIVERY_ATTEMPTS = Counter(
    "sunotrack_webhook_attempts", "Webhook delivery attempts by outcome", ["outcome"], registry=REGISTRY
)
DELIVERY_LATENCY = Histogram(
    "sunotrack_webhook_attempt_seconds", "Duration of one webhook attempt", registry=REGISTRY
)
HOSTS_PAUSED = Gauge(
    "sunotrack_webhook_hosts_paused", "Hosts paused by the circuit breaker", registry=REGISTRY
)

# --- inbound callbacks --------------------------------------------------------------------------------
CALLBACKS = Counter("sunotrack_callbacks", "Relay callbacks by outcome", ["outcome"], registry=REGISTRY)
