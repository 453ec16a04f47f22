"""Whatever a client sends to any route of the real app, the answer is not a 5xx.

Hypothesis draws every route's path parameters, query parameters and bodies, from well-formed to
hostile (NUL, deep nesting, integers past 64 bits, bytes that are not JSON), and sends them over HTTP
to the app on a real database, with a fake relay behind the routes that ask it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import CALLBACK_TOKEN, HOOK, Edge

Request = tuple[str, str, dict[str, Any]]

TEXT = st.text(max_size=40)
NUMBER = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "-1", str(2**31 - 1), str(2**31), str(2**63 - 1), str(2**63), "9" * 20, "1e3"]),
    TEXT,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=16,
)
DEEP = st.integers(1, 1200).map(lambda n: '{"task_id": "deep", "metadata": ' + "[" * n + "1" + "]" * n + "}")
HOOKS = st.one_of(
    TEXT,
    st.just(HOOK),
    st.builds(
        "{}://{}:{}@{}:{}/{}".format,
        st.sampled_from(["http", "https", "ftp", ""]),
        TEXT,
        TEXT,
        st.sampled_from(["127.0.0.1", "[::1]", "example.com", "", "exa mple.com"]),
        NUMBER,
        TEXT,
    ),
)


def segment(value: str) -> str:
    return quote(value, safe="")


def task_ids(known: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known), st.from_regex(r"[A-Za-z0-9_-]{1,130}", fullmatch=True), TEXT)


def bodies(known: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    registration = st.fixed_dictionaries(
        {"task_id": task_ids(known)},
        optional={
            "kind": st.sampled_from(["music", "lyrics", "stems"]) | TEXT,
            "notify_hook": HOOKS | st.none(),
            "notify_format": st.sampled_from(["sunotrack", "relay"]) | TEXT | st.none(),
            "metadata": st.dictionaries(TEXT, JSON, max_size=4) | JSON,
        },
    )
    return st.one_of(
        registration.map(lambda body: {"json": body}),
        JSON.map(lambda body: {"json": body}),
        DEEP.map(lambda body: {"content": body}),
        st.binary(max_size=200).map(lambda body: {"content": body}),
    )


def callback_bodies(known: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    task = st.fixed_dictionaries(
        {"task_id": task_ids(known)},
        optional={
            "status": st.sampled_from(["SUCCESS", "FAILURE", "IN_PROGRESS", "QUEUED"]) | TEXT,
            "progress": NUMBER,
            "data": JSON,
        },
    )
    camel = task_ids(known).map(lambda task_id: {"taskId": task_id, "status": "SUCCESS"})
    return st.one_of(
        task.map(lambda body: {"json": body}),
        camel.map(lambda body: {"json": body}),
        task.map(lambda body: {"json": {"code": "success", "data": body}}),
        JSON.map(lambda body: {"json": body}),
        DEEP.map(lambda body: {"content": body}),
        st.binary(max_size=200).map(lambda body: {"content": body}),
    )


def requests(edge: Edge) -> st.SearchStrategy[Request]:
    known = edge.task_ids
    task = task_ids(known).map(segment)
    statuses = st.sampled_from(["submitted", "complete", "pending", "dead"]) | TEXT
    cursors = st.one_of(TEXT, st.builds(lambda prefix, n: f"{prefix}{n}", st.sampled_from("td"), NUMBER))
    listing = st.fixed_dictionaries(
        {}, optional={"status": statuses, "kind": TEXT, "limit": NUMBER, "cursor": cursors}
    )
    delivery = st.one_of(st.just(str(edge.delivery_id)), NUMBER).map(segment)
    token = st.one_of(st.just(CALLBACK_TOKEN), TEXT).map(segment)
    return st.one_of(
        bodies(known).map(lambda kwargs: ("POST", "/api/v1/tasks", kwargs)),
        task.map(lambda t: ("GET", f"/api/v1/tasks/{t}", {})),
        listing.map(lambda params: ("GET", "/api/v1/tasks", {"params": params})),
        st.tuples(task, NUMBER).map(
            lambda p: ("GET", f"/api/v1/tasks/{p[0]}/events", {"params": {"after": p[1]}})
        ),
        task.map(lambda t: ("POST", f"/api/v1/tasks/{t}/refresh", {})),
        task.map(lambda t: ("DELETE", f"/api/v1/tasks/{t}", {})),
        task.map(lambda t: ("GET", f"/api/v1/tasks/{t}/deliveries", {})),
        st.tuples(task, st.sampled_from(["true", "false"]) | TEXT).map(
            lambda p: ("POST", f"/api/v1/tasks/{p[0]}/redeliver", {"params": {"all": p[1]}})
        ),
        listing.map(lambda params: ("GET", "/api/v1/deliveries", {"params": params})),
        delivery.map(lambda d: ("POST", f"/api/v1/deliveries/{d}/retry", {})),
        st.just(("GET", "/api/v1/hooks/hosts", {})),
        st.tuples(token, callback_bodies(known)).map(
            lambda p: ("POST", f"/api/v1/callbacks/suno/{p[0]}", p[1])
        ),
    )  # fmt: skip


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_no_input_to_any_route_gets_a_5xx(edge: Edge, data: st.DataObject) -> None:
    method, url, kwargs = data.draw(requests(edge))
    response = await edge.client.request(method, url, **kwargs)

    # Refreshing a task the fake relay does not know is the relay's refusal, not the input's fault.
    relay_refused = url.endswith("/refresh") and response.status_code == 502
    assert response.status_code < 500 or relay_refused, (method, url, kwargs, response.text)
    if response.status_code >= 400:
        assert set(response.json()) == {"status_code", "detail", "extra"}, response.text
