"""Running the app for `serve` and `demo`: the port first, then the lifespan, then uvicorn.

The order is what a user sees when something is wrong: a taken port or an unreachable database ends
the process with one line (a ConfigError) before anything has started, and SIGINT or SIGTERM stop it
gracefully, exit status 0, whichever phase it is in. Uvicorn runs with `lifespan="off"` and the app's
lifespan is entered here, so its errors arrive as exceptions rather than as uvicorn's log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import structlog
import uvicorn
from litestar import Litestar
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.config import ConfigError

log = structlog.get_logger()

GRACEFUL_SHUTDOWN_S = 5


def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound now (uvicorn listens on it later), or a ConfigError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, OverflowError) as exc:
        raise ConfigError(f"--host {host} --port {port}: not an address to listen on ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use on {host}: stop what holds it or pick --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `main(stop)` on uvicorn's loop (uvloop when installed); SIGINT and SIGTERM set `stop`.

    The handlers stay for the whole run, so a signal during start-up or clean-up is no traceback either.
    """

    async def guarded() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await main(stop)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(guarded())


@contextlib.asynccontextmanager
async def serving(
    app: Litestar, sock: socket.socket, stop: asyncio.Event, *, access_log: bool = False
) -> AsyncIterator[asyncio.Task[None]]:
    """Enter the app's lifespan (database, migrations, jobs), then serve on `sock` until `stop` is set.

    Yields the serving task once the server listens (or has already ended); leaving the block stops
    the server, then the lifespan.
    """
    server = _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=access_log,
            # X-Forwarded-For and -Proto from a proxy on this host change only the client address
            # and scheme in the scope, which only the access log reads (docs/design.md, "The layers
            # of a request").
            proxy_headers=access_log,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            http=_OneWriteHttp,
        )
    )

    async def stop_server() -> None:
        await stop.wait()
        server.should_exit = True

    async with _lifespan(app):
        stopper = asyncio.create_task(stop_server())
        task = asyncio.create_task(server.serve(sockets=[sock]))
        listening = asyncio.create_task(server.listening.wait())
        try:
            await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
            if server.started:
                host, port = sock.getsockname()[:2]
                log.info("http.listening", host=host, port=port)
            yield task
        finally:
            server.should_exit = True
            stopper.cancel()
            listening.cancel()
            await task


@contextlib.asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    """`app.lifespan()`, raising what fails inside it as itself: Litestar's event emitter (an anyio task
    group) wraps even a single error, such as the ConfigError of an unreachable database, in a group."""
    try:
        async with app.lifespan():
            yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


class _Server(uvicorn.Server):
    """Says when it listens, so the demo can print its addresses only once they answer."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


class _OneWrite:
    """A connection's transport whose writes within one turn of the event loop go out as one: uvicorn
    writes a response's status line and headers, then its body, two sends and two TCP segments where
    one does (docs/design.md, "The layers of a request"). Closing it sends what is held first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        # A transport closing on its own (the peer went) takes no more: uvloop's would raise.
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _OneWriteHttp(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol over a _OneWrite transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(_OneWrite(transport))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop
