"""`sunotrack clients ...`: the admin API's client operations, against the database directly.

Each prints JSON on stdout (one object, or one per line for `list`); problems go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.schemas import CreateClient, client_out
from service.clients import service
from service.config import Settings
from service.db import create_session_maker, transaction
from service.errors import InvalidInput, ServiceError

_encode = msgspec.json.Encoder().encode


async def run(args: argparse.Namespace, settings: Settings, engine: AsyncEngine) -> int:
    """Run one action in one transaction; the exit status."""
    try:
        async with transaction(create_session_maker(engine)) as session:
            outputs = await _act(session, args, settings)
    except ServiceError as exc:
        print(f"sunotrack: {exc.detail}", file=sys.stderr)
        return 1
    for output in outputs:
        sys.stdout.buffer.write(_encode(output) + b"\n")
    sys.stdout.flush()
    return 0


async def _act(session: Any, args: argparse.Namespace, settings: Settings) -> list[msgspec.Struct]:
    if args.action == "create":
        # The API's request struct checks the name, relay name and rate the same way here.
        try:
            data = msgspec.convert(
                {"name": args.name, "relay": args.relay, "rate": args.rate, "relay_hooks": args.relay_hooks},
                CreateClient,
            )
        except msgspec.ValidationError as exc:
            raise InvalidInput(str(exc).replace("$.", "")) from None
        return [await service.create_client(session, **msgspec.structs.asdict(data), settings=settings)]
    if args.action == "list":
        return [client_out(client, count) for client, count in await service.list_clients(session)]
    if args.action == "revoke":
        client = await service.revoke_client(session, args.name)
        return [client_out(client, await service.task_count(session, client))]
    if args.action == "rotate-token":
        return [await service.rotate_token(session, args.name)]
    if args.action == "rotate-secret":
        if not 0 <= args.grace_s <= service.MAX_SECRET_GRACE_S:
            raise InvalidInput(f"--grace-s: must be from 0 to {service.MAX_SECRET_GRACE_S:g} seconds")
        return [await service.rotate_secret(session, args.name, grace_s=args.grace_s)]
    raise AssertionError(args.action)
