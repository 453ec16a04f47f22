"""The `sunotrack` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
from collections.abc import Sequence

import structlog

from service.config import ConfigError, Settings


def configure_logging(level: str) -> None:
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(message)s", stream=sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ConfigError as exc:
        print(f"sunotrack: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings, host: str, port: int, *, access_log: bool) -> None:
    import uvicorn  # noqa: PLC0415  (only the serving commands need the server)

    from service.app import create_app  # noqa: PLC0415

    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        access_log=access_log,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


def command_serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.admin_token is None:
        print("sunotrack: SUNOTRACK_ADMIN_TOKEN must be set to serve the API", file=sys.stderr)
        raise SystemExit(2)
    configure_logging(settings.log_level)
    serve(settings, args.host, args.port, access_log=args.access_log)


def command_demo(args: argparse.Namespace) -> None:
    token = secrets.token_urlsafe(24)
    settings = load_settings(SUNOTRACK_ADMIN_TOKEN=token)
    configure_logging(settings.log_level)
    base = f"http://{args.host}:{args.port}"
    print(
        f"sunotrack demo on {base} (embedded database under {settings.data_dir})\n"
        f"admin token: {token}\n\n"
        f"  curl -s -H 'Authorization: Bearer {token}' {base}/api/v1/tasks\n"
        f"  curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{"task_id": "my-task-1"}}\' {base}/api/v1/tasks\n'
        f"  open {base}/schema for the OpenAPI document\n",
        flush=True,
    )
    serve(settings, args.host, args.port, access_log=False)


def command_migrate(_: argparse.Namespace) -> None:
    from service.db import create_engine, migrate, start_embedded_postgres  # noqa: PLC0415

    settings = load_settings()
    configure_logging(settings.log_level)

    async def run() -> None:
        url, embedded = (settings.database_url, None)
        if url is None:
            url, embedded = start_embedded_postgres(settings.data_dir)
        engine = create_engine(url, pool_size=1)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
            if embedded is not None:
                embedded.cleanup()

    asyncio.run(run())
    print("database is at the latest schema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sunotrack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, handler, help_text in (
        ("serve", command_serve, "serve the API and run the poller and webhook dispatcher"),
        ("demo", command_demo, "serve on the embedded database with a fake relay and sample tasks"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
        command.add_argument(
            "--access-log", action="store_true", help="log every request (halves throughput)"
        )
        command.set_defaults(handler=handler)

    commands.add_parser("migrate", help="upgrade the database schema to the latest revision").set_defaults(
        handler=command_migrate
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)
