"""The `sunotrack` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import structlog

from service.clients.service import DEFAULT_SECRET_GRACE_S
from service.config import ROLES, ConfigError, Settings
from service.redact import mask_log_credentials
from service.vocabulary import RelayHooks

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


def configure_logging(level: str) -> None:
    """One JSON object per line on stderr, for our structlog events and for every standard-library
    record alike (uvicorn, alembic, asyncio): the same processors render both."""
    numeric = getattr(logging, level.upper())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[structlog.typing.Processor] = [
        structlog.processors.format_exc_info,
        mask_log_credentials,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=[*shared, *render],
        # Our own events skip the standard library's machinery: the poller logs on its hot path.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    # These narrate every routine step at INFO (each scheduler tick, each pg_ctl call, each plugin).
    for name in ("apscheduler", "pgserver", "alembic.runtime.plugins"):
        logging.getLogger(name).setLevel(logging.WARNING)


# Start-up objects frozen, the young generation collected less often (docs/design.md, "The poller's process").
GC_THRESHOLDS = (20_000, 10, 10)


def tune_gc() -> None:
    """Process-wide, so the process entry does it once, after the imports built the start-up objects."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def command_serve(args: argparse.Namespace) -> None:
    from service.app import create_app  # noqa: PLC0415  (only the serving commands need the app)
    from service.serving import bind, run, serving  # noqa: PLC0415

    settings = Settings.from_env()
    if settings.admin_token is None and args.role != "worker":
        raise ConfigError("SUNOTRACK_ADMIN_TOKEN: must be set to serve the API")
    app = create_app(settings, role=args.role)
    configure_logging(settings.log_level)
    sock = bind(args.host, args.port)
    tune_gc()

    async def main(stop: asyncio.Event) -> None:
        async with serving(app, sock, stop, access_log=args.access_log) as served:
            await served

    run(main)


def command_demo(args: argparse.Namespace) -> None:
    from service.demo import run_demo  # noqa: PLC0415  (pulls in the fake relay and the app)
    from service.serving import bind, run  # noqa: PLC0415

    configure_logging(os.environ.get("SUNOTRACK_LOG_LEVEL", "warning"))
    sock = bind(args.host, args.port)
    tune_gc()
    run(functools.partial(run_demo, sock, args.stage_s))


def command_fake_relay(args: argparse.Namespace) -> None:
    from service.upstream.fake import run_fake_relay  # noqa: PLC0415

    configure_logging("info")
    run_fake_relay(args.port, args.host, api_key=os.environ.get("SUNO_API_KEY"), stage_s=args.stage_s)


@contextlib.asynccontextmanager
async def migrated_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """DATABASE_URL's database, else the embedded one, connected and at the latest schema."""
    from service.db import check_connection, create_engine, migrate, start_embedded_postgres  # noqa: PLC0415

    url, embedded = (settings.database_url, None)
    if url is None:
        url, embedded = start_embedded_postgres(settings.data_dir)
    engine = create_engine(url, pool_size=1)
    try:
        await check_connection(engine, "DATABASE_URL" if embedded is None else "SUNOTRACK_DATA_DIR")
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()
        if embedded is not None:
            embedded.cleanup()


def command_migrate(_: argparse.Namespace) -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)

    async def run() -> None:
        async with migrated_database(settings):
            pass

    asyncio.run(run())
    print("database is at the latest schema")


def command_clients(args: argparse.Namespace) -> None:
    """Manage clients in the database (DATABASE_URL, else the embedded one): JSON on stdout only."""
    from service.clients import commands  # noqa: PLC0415  (database access only for this command)

    settings = Settings.from_env()
    configure_logging("warning")

    async def run() -> int:
        async with migrated_database(settings) as engine:
            return await commands.run(args, settings, engine)

    raise SystemExit(asyncio.run(run()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sunotrack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_command = commands.add_parser("serve", help="serve the API, the poller and the webhook dispatcher")
    serve_command.add_argument("--host", default="127.0.0.1")
    serve_command.add_argument("--port", type=int, default=8000)
    serve_command.add_argument(
        "--access-log", action="store_true", help="log every request (halves throughput)"
    )
    serve_command.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="all: API and jobs; api: HTTP only, no jobs; worker: polls and delivers, answers only "
        "/healthz, /readyz and /metrics",
    )
    serve_command.set_defaults(handler=command_serve)

    demo = commands.add_parser(
        "demo", help="serve on the embedded database with a fake relay and sample tasks"
    )
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--stage-s", type=float, default=4.0, help="seconds the fake relay spends per stage")
    demo.set_defaults(handler=command_demo)

    relay = commands.add_parser("fake-relay", help="serve a fake relay (tasks created via its submit routes)")
    relay.add_argument("--host", default="127.0.0.1")
    relay.add_argument("--port", type=int, default=8787)
    relay.add_argument("--stage-s", type=float, default=4.0, help="seconds per lifecycle stage")
    relay.set_defaults(handler=command_fake_relay)

    commands.add_parser("migrate", help="upgrade the database schema to the latest revision").set_defaults(
        handler=command_migrate
    )

    clients = commands.add_parser(
        "clients", help="manage API clients (order backends, each with its own token and webhook secret)"
    )
    clients.set_defaults(handler=command_clients)
    actions = clients.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a client; prints its token and webhook secret, once")
    create.add_argument("name")
    create.add_argument(
        "--relay", help="where its tasks are polled unless a registration says (default: default)"
    )
    create.add_argument(
        "--rate",
        type=float,
        help="registrations per second, bursts to twice that (default: SUNOTRACK_CLIENT_RATE)",
    )
    create.add_argument(
        "--relay-hooks",
        choices=[hooks.value for hooks in RelayHooks],
        help="adopt or ignore the notify_hook a relay reports (default: SUNOTRACK_RELAY_HOOKS)",
    )
    actions.add_parser("list", help="every client, one JSON object per line (never a token or secret)")
    for action, text in (
        ("revoke", "its token stops working at once; its tasks keep being tracked and delivered"),
        ("rotate-token", "a new token (printed once); the old one stops working at once"),
        ("rotate-secret", "a new webhook secret; the old one keeps signing during the grace period"),
    ):
        actions.add_parser(action, help=text).add_argument("name")
    actions.choices["rotate-secret"].add_argument(
        "--grace-s", type=float, default=DEFAULT_SECRET_GRACE_S, help="how long the old secret keeps signing"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"sunotrack: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # Ctrl-C before the command's own signal handling is in place (imports, start-up): just stop.
        raise SystemExit(0) from None
