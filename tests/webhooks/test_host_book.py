"""The share `GET /api/v1/hooks/hosts` reports is the one in force: a lone lane on a fast host is
allowed more than the per-host share, and reports it."""

from __future__ import annotations

from service.webhooks.hosts import MIN_SAMPLES, HostBook

FAST = "http://fast.example:80"
OTHER = "http://other.example:80"


def fast_book() -> HostBook:
    book = HostBook(concurrency=8, client_concurrency=48, slow_s=2.0)
    for _ in range(MIN_SAMPLES):
        book.started((1, FAST))
        book.finished((1, FAST), 0.01)
    return book


def shares(book: HostBook) -> dict[str, int]:
    return {view.host: view.share for view in book.view()}


def test_a_lone_lane_on_a_fast_host_reports_its_allowance_until_another_lane_is_in_flight() -> None:
    book = fast_book()
    assert shares(book) == {FAST: 8}  # nothing in flight: the per-host share

    book.started((1, FAST))
    assert book.alone_share == 40
    assert shares(book) == {FAST: 40}

    book.started((2, OTHER))
    assert shares(book) == {FAST: 8, OTHER: 8}

    for _ in range(9):  # over its share: taken while it was alone, kept until the answers come back
        book.started((1, FAST))
    assert shares(book) == {FAST: 40, OTHER: 8}


def test_a_host_not_yet_judged_fast_or_slow_reports_its_plain_or_half_share() -> None:
    book = HostBook(concurrency=8, client_concurrency=48, slow_s=0.1)
    book.started((1, FAST))
    assert shares(book) == {FAST: 8}
    for _ in range(MIN_SAMPLES):
        book.started((1, FAST))
        book.finished((1, FAST), 1.0)
    assert shares(book) == {FAST: 4}


def test_rows_claimed_ahead_count_against_their_lane_and_against_their_client_once_not_fast() -> None:
    book = fast_book()
    lane = (1, FAST)
    for _ in range(40):
        book.started(lane)
    for _ in range(10):
        book.claimed_ahead(lane)
    quotas = book.quotas(ahead=16)
    # Alone: 40 in flight and 10 ahead of the 40 + 16 it may hold; with others due, not even its share.
    assert (quotas.alone_by_lane[lane], quotas.by_lane[lane]) == (6, 0)
    # The client: its 48 slots less the 40 in flight, and the 6 its fast lane may still claim ahead.
    assert quotas.by_client[1] == 8 + 6

    for _ in range(MIN_SAMPLES):  # its answers turn slow: what it holds ahead now counts for its client
        book.started(lane)
        book.finished(lane, 1.0)
    quotas = book.quotas(ahead=16)
    assert lane not in quotas.alone_by_lane
    assert quotas.by_client[1] == 0
    book.unclaimed_ahead(lane, 10)
    assert book.quotas(ahead=16).by_client[1] == 8
