"""A dispatcher in its own process, configured from the environment, for the kill -9 test.

Prints `ready` once it listens, then runs until killed.
"""

from __future__ import annotations

import asyncio

from service.config import Settings
from service.webhooks.jobs import start_dispatcher
from tests.webhooks.conftest import running_runtime


async def main() -> None:
    async with running_runtime(Settings.from_env()) as runtime:
        await start_dispatcher(runtime)
        # The LISTEN connection comes up in the background; give it a moment before saying ready.
        await asyncio.sleep(0.3)
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
