"""The OpenAPI document made to say what the API does (schemathesis holds it to that in CI):
every status code each route can answer with the one error shape, no security on the routes that
take no token, `additionalProperties: false` on bodies that refuse unknown fields, and links from a
registered task to the routes that take its id (for stateful testing).

Applied once to the document Litestar builds, by rules over the routes rather than per handler, so a
route added later is documented the same way.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import (
    Link,
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.types import Message, Scope

from service.api.auth import RequireToken

ERROR = "Error"
COMPONENT = "#/components/schemas/{name}"
_ERROR_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["status_code", "detail", "extra"],
    properties={
        "status_code": Schema(type=OpenAPIType.INTEGER, minimum=400, maximum=599),
        "detail": Schema(type=OpenAPIType.STRING, description="Names the field or the problem"),
        "extra": Schema(description="Machine-readable context: the offending fields, a code, limits"),
    },
    description="Every error answer",
)
WHY: dict[int, str] = {
    400: "A bad query parameter, header or body; `detail` names it",
    401: "Missing or invalid bearer token (or callback token)",
    403: "Only the admin token may do this",
    404: "No such task, delivery or client (path, or ?client=NAME), or a path segment none can have",
    409: "Conflicts with the current state (another kind or relay for this id, a finished task, a name)",
    413: "The body is larger than 1 MiB",
    429: "The client is over its registration rate; Retry-After says when to try again",
    502: "The relay failed or could not be reached",
    503: "The database does not answer",
    504: "The relay took the submit but its answer was lost: the job may exist upstream (never retried)",
}
# Answers a route gives beyond what the rules below find.
EXTRA: dict[tuple[str, str], tuple[int, ...]] = {
    ("POST", "/api/v1/tasks"): (409, 429),
    ("POST", "/api/v1/clients"): (409,),
    ("POST", "/api/v1/clients/{name}/rotate-token"): (409,),
    ("POST", "/api/v1/clients/{name}/rotate-secret"): (409,),
    ("DELETE", "/api/v1/tasks/{task_id}"): (409,),
    ("POST", "/api/v1/tasks/{task_id}/refresh"): (502,),
    ("GET", "/readyz"): (503,),
    ("POST", "/suno/submit/{action}"): (404, 502, 504),
    ("GET", "/suno/act/stems/{clip_id}"): (502,),
}


# Handlers answering in another API's format (the relay front) say so in their `opt`, and the rules
# below document it: BODY, the request body's struct (decoded by hand, so Litestar sees none);
# ANSWERS, a struct per status code (one the error rules also give is either shape); PASSED_THROUGH,
# why any other status may come (the relay's own answer, as it came).
class PassedThrough(NamedTuple):
    shape: type[msgspec.Struct]
    why: str


BODY = "openapi_body"
ANSWERS = "openapi_answers"
PASSED_THROUGH = "openapi_passed_through"
# Answers other than errors that a route gives besides its own status code.
OTHER_SUCCESS: dict[tuple[str, str], dict[int, str]] = {
    ("POST", "/api/v1/tasks"): {200: "Registered before: the existing task (hook, format, metadata updated)"},
}
# The relay's callbacks: the path's secret token (401), a relay or route that is not there (404), and
# 202 for what is acknowledged without a poll (a task nobody tracks, the relay failing).
CALLBACKS = "/api/v1/callbacks/"
CALLBACK_ACKNOWLEDGED = (
    "Acknowledged without a poll: a task nobody tracks (`ignored`) or the relay failing (`deferred`)"
)
# Routes whose handlers refuse client tokens (service.api.auth.require_admin).
ADMIN_ONLY = "/api/v1/clients"
_TASK_ROUTES = (
    ("GET", "/api/v1/tasks/{task_id}"),
    ("GET", "/api/v1/tasks/{task_id}/events"),
    ("GET", "/api/v1/tasks/{task_id}/deliveries"),
    ("POST", "/api/v1/tasks/{task_id}/refresh"),
    ("POST", "/api/v1/tasks/{task_id}/redeliver"),
    ("DELETE", "/api/v1/tasks/{task_id}"),
)


def _handlers(app: Litestar) -> dict[tuple[str, str], HTTPRouteHandler]:
    found: dict[tuple[str, str], HTTPRouteHandler] = {}
    for route in app.routes:
        path = route.path_format
        for handler in getattr(route, "route_handlers", ()):
            if isinstance(handler, HTTPRouteHandler):
                for method in handler.http_methods:
                    found[(method, path)] = handler
    return found


def _closed_structs(handler: HTTPRouteHandler) -> list[type[msgspec.Struct]]:
    """The request body's structs (nested ones too) that refuse unknown fields."""
    data = handler.parsed_fn_signature.parameters.get("data")
    if data is None:
        return []
    found: list[type[msgspec.Struct]] = []
    pending: list[Any] = [data.annotation]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            if annotation.__struct_config__.forbid_unknown_fields and annotation not in found:
                found.append(annotation)
                pending.extend(typing.get_type_hints(annotation, include_extras=True).values())
        else:
            pending.extend(typing.get_args(annotation))
    return found


def _error(status: int) -> OpenAPIResponse:
    headers: dict[str, OpenAPIHeader | Reference] | None = None
    if status == 401:
        headers = {
            "WWW-Authenticate": OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description="Bearer")
        }
    elif status == 429:
        headers = {
            "Retry-After": OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description="Seconds")
        }
    return OpenAPIResponse(
        description=WHY[status],
        headers=headers,
        content={"application/json": OpenAPIMediaType(schema=Reference(ref=COMPONENT.format(name=ERROR)))},
    )


def document_contract(app: Litestar, relays: Sequence[str]) -> None:
    """Complete the app's OpenAPI document in place, before it is first served. `relays`: the names a
    body's `relay` may take in this deployment."""
    schema: OpenAPI = app.openapi_schema
    assert schema.components is not None
    assert schema.paths is not None
    components = schema.components.schemas if schema.components.schemas is not None else {}
    components[ERROR] = _ERROR_SCHEMA
    schema.components.schemas = components
    handlers = _handlers(app)
    operations: dict[tuple[str, str], Operation] = {}
    for path, item in schema.paths.items():
        for method in ("get", "post", "put", "patch", "delete"):
            operation = getattr(item, method)
            if operation is None:
                continue
            key = (method.upper(), path)
            operations[key] = operation
            handler = handlers[key]
            secured = RequireToken in handler.resolve_middleware()
            operation.security = None if secured else []
            body = handler.opt.get(BODY)
            if body is not None:
                operation.request_body = RequestBody(
                    content={"application/json": OpenAPIMediaType(schema=_component(components, body))},
                    required=True,
                )
            codes, other_success = _answers(key, operation, secured=secured)
            responses = operation.responses if operation.responses is not None else {}
            for status, description in other_success.items():
                main = next(iter(responses.values()))
                assert isinstance(main, OpenAPIResponse)
                responses[str(status)] = OpenAPIResponse(description=description, content=main.content)
            for status in sorted(codes):
                responses[str(status)] = _error(status)
            _document_foreign(components, handler, responses)
            operation.responses = responses
            for struct in _closed_structs(handler):
                if struct.__name__ in components:
                    _exact_body(components, struct, relays)
    _link_registration(operations)


def _component(components: dict[str, Any], struct: type[msgspec.Struct]) -> Reference:
    _, definitions = msgspec.json.schema_components([struct], ref_template=COMPONENT)
    components.update(definitions)
    return Reference(ref=COMPONENT.format(name=struct.__name__))


def _document_foreign(
    components: dict[str, Any], handler: HTTPRouteHandler, responses: dict[str, OpenAPIResponse | Reference]
) -> None:
    """A route answering in another API's format: each status's struct (either it or the error shape
    where both can come). One that passes that API's answers through as they came may answer any
    status in that API's shape or any other; `default` says so too."""
    answers: dict[int, type[msgspec.Struct]] = handler.opt.get(ANSWERS, {})
    for status, struct in answers.items():
        schema: Schema | Reference = _component(components, struct)
        ours = responses.get(str(status))
        description = inspect.cleandoc(struct.__doc__ or "") or "The relay's format"
        if isinstance(ours, OpenAPIResponse) and status >= 400:
            schema = Schema(any_of=[Reference(ref=COMPONENT.format(name=ERROR)), schema])
            description = f"{ours.description}; or, in the relay's format: {description}"
        responses[str(status)] = OpenAPIResponse(
            description=description, content={"application/json": OpenAPIMediaType(schema=schema)}
        )
    passed: PassedThrough | None = handler.opt.get(PASSED_THROUGH)
    if passed is None:
        return
    theirs = _component(components, passed.shape)
    anything = OpenAPIMediaType(schema=Schema())
    for code, response in responses.items():
        if not isinstance(response, OpenAPIResponse):
            continue
        content = response.content or {}
        media = content.get("application/json")
        schema = theirs
        if media is not None and media.schema is not None and (int(code) >= 400 or int(code) in answers):
            schema = Schema(any_of=[media.schema, theirs])
        content["application/json"] = OpenAPIMediaType(schema=schema)
        content["*/*"] = anything
        response.content = content
        also = f"{response.description.rstrip('.')}; or {passed.why[0].lower()}{passed.why[1:]}"
        response.description = passed.why if schema is theirs else also
    responses["default"] = OpenAPIResponse(
        description=passed.why, content={"application/json": OpenAPIMediaType(schema=theirs), "*/*": anything}
    )


def _answers(key: tuple[str, str], operation: Operation, *, secured: bool) -> tuple[set[int], dict[int, str]]:
    """The error codes an operation can answer, and its other success codes with their descriptions."""
    path = key[1]
    codes = set(EXTRA.get(key, ()))
    other_success = dict(OTHER_SUCCESS.get(key, {}))
    if path.startswith(CALLBACKS):
        codes |= {401, 404}
        other_success[202] = CALLBACK_ACKNOWLEDGED
    if secured:
        codes.add(401)
    if operation.parameters or operation.request_body:
        codes.add(400)
    if operation.request_body:
        codes.add(413)
    names = {parameter.name for parameter in operation.parameters or () if hasattr(parameter, "name")}
    if names & {"task_id", "delivery_id", "name", "client"}:
        codes.add(404)
    if path.startswith(ADMIN_ONLY):
        codes.add(403)
    return codes, other_success


def _exact_body(components: dict[str, Any], struct: type[msgspec.Struct], relays: Sequence[str]) -> None:
    """A request body's schema as msgspec, which decodes it, states it: every bound of nested items
    (Litestar's drops those inside an optional list) and `additionalProperties: false`; a `relay`
    names one of this deployment's relays."""
    _, definitions = msgspec.json.schema_components([struct], ref_template=COMPONENT)
    for name, definition in definitions.items():
        relay = definition.get("properties", {}).get("relay")
        for option in [relay, *relay.get("anyOf", ())] if relay is not None else []:
            if option.get("type") == "string":
                option["enum"] = list(relays)
        components[name] = definition


def _link_registration(operations: dict[tuple[str, str], Operation]) -> None:
    register = operations.get(("POST", "/api/v1/tasks"))
    if register is None or register.responses is None:
        return
    links: dict[str, Link | Reference] = {}
    for method, path in _TASK_ROUTES:
        target = operations.get((method, path))
        if target is not None and target.operation_id:
            links[target.operation_id] = Link(
                operation_id=target.operation_id, parameters={"task_id": "$response.body#/task_id"}
            )
    for status in ("200", "201"):
        response = register.responses.get(status)
        if isinstance(response, OpenAPIResponse):
            response.links = links


_ALLOW: dict[str, str] = {}


async def allow_every_method(message: Message, scope: Scope) -> None:
    """An OPTIONS answer lists every method of its path. (Litestar keeps one route per handler group
    and answers OPTIONS with that group's methods only.)"""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    app: Litestar = scope["litestar_app"]
    if not _ALLOW:
        methods: dict[str, set[str]] = {}
        for route in app.routes:
            methods.setdefault(route.path, set()).update(getattr(route, "methods", ()))
        _ALLOW.update({path: ", ".join(sorted(found)) for path, found in methods.items()})
    handler = scope.get("route_handler")
    paths = getattr(handler, "paths", ()) if handler is not None else ()
    allow = next((_ALLOW[path] for path in paths if path in _ALLOW), None)
    if allow is None:
        return
    headers = [(key, value) for key, value in message.get("headers", []) if key.lower() != b"allow"]
    headers.append((b"allow", allow.encode()))
    message["headers"] = headers
