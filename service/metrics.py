"""Prometheus metrics, one registry per process, served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# --- tracking -----------------------------------------------------------------------------------------
POLLS = Counter("sunotrack_polls", "Task polls answered by the relay", ["endpoint"], registry=REGISTRY)
UPSTREAM_ERRORS = Counter(
    "sunotrack_upstream_errors", "Relay errors by class and code", ["error_class", "code"], registry=REGISTRY
)
TRANSITIONS = Counter(
    "sunotrack_transitions", "Recorded task-level transitions", ["source", "to_status"], registry=REGISTRY
)
ANOMALIES = Counter("sunotrack_anomalies", "Recorded anomalies", ["kind"], registry=REGISTRY)
CLAIM_LAG = Histogram(
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
