"""How `serve` writes its answers: a response's writes within one turn of the loop leave as one send,
and nothing is held past that turn (a streamed body's first part arrives while the rest is pending)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, get
from litestar.response import Stream

from service.serving import _OneWrite, bind, serving


class Recorded:
    """The part of an asyncio transport _OneWrite uses, recording what it is asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> Any:
        return f"info {name}"


async def test_writes_in_one_turn_leave_as_one_send_and_closing_sends_them_first() -> None:
    recorded = Recorded()
    transport = _OneWrite(recorded)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"body")
    assert recorded.calls == []
    await asyncio.sleep(0)
    assert recorded.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody")]

    transport.write(b"last")
    transport.close()
    assert recorded.calls[1:] == [("write", b"last"), ("close", b"")]
    await asyncio.sleep(0)
    assert len(recorded.calls) == 3
    assert transport.get_extra_info("peername") == "info peername"


async def test_a_transport_closed_by_the_peer_meanwhile_takes_nothing_more() -> None:
    recorded = Recorded()
    transport = _OneWrite(recorded)  # type: ignore[arg-type]
    transport.write(b"headers")
    recorded.closing = True
    await asyncio.sleep(0)
    assert recorded.calls == []


async def test_serve_answers_whole_and_streams_without_holding_back() -> None:
    more = asyncio.Event()

    @get("/json")
    async def json_route() -> dict[str, int]:
        return {"a": 1}

    @get("/stream")
    async def stream_route() -> Stream:
        async def parts() -> AsyncIterator[bytes]:
            yield b"first"
            await more.wait()
            yield b"second"

        return Stream(parts())

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    # logging_config=None, as the app's: Litestar's default config would install root handlers.
    async with serving(Litestar([json_route, stream_route], logging_config=None), sock, stop):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):  # one keep-alive connection, answered twice
                writer.write(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"content-length: 7\r\n" in head
                assert await asyncio.wait_for(reader.readexactly(7), 10) == b'{"a":1}'

            writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"transfer-encoding: chunked\r\n" in head
            assert await asyncio.wait_for(reader.readuntil(b"first\r\n"), 10) == b"5\r\nfirst\r\n"
            more.set()
            rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
            assert rest == b"6\r\nsecond\r\n0\r\n\r\n"
        finally:
            writer.close()
            stop.set()
