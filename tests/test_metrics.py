"""Our page-at-a-time histogram exports what prometheus_client's Histogram would for the same values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.metrics import PageHistogram


def exported(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_page_histogram_exports_like_a_histogram() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("lag_seconds", "how late", buckets=(0.01, 0.05, 1, 300), registry=theirs)
    page = PageHistogram("lag_seconds", "how late", buckets=(0.01, 0.05, 1, 300), registry=ours)
    # On the bounds, between them, above the last.
    pages = [[0.0, 0.01, 0.02], [0.05, 0.5, 1.0], [], [2.0, 300.0, 301.0, 1e9]]
    for values in pages:
        for value in values:
            histogram.observe(value)
        page.observe_many(values)

    assert exported(ours) == exported(theirs)
    assert 'lag_seconds_bucket{le="0.01"} 2.0' in exported(ours)
