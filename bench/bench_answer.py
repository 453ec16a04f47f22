"""CPU per poll of an unchanged answer in the poller's process: parse a batch answer and digest each
task (what record_polls does before it finds the answer is the last one again), next to a bare
msgspec decode of the same answer into a struct declaring only `task_id`.

    uv run python bench/bench_answer.py [--repeat 7]

The answer is 50 streaming songs as the fake relay serves them (bench_polling's steady tasks), each
naming its notify_hook, fetched once over loopback. CPU time (process_time), best of `repeat` runs,
so other load on the box stretches it little.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.tracking.service import snapshot_digest
from service.upstream.dialects import parse_fetch_batch
from service.upstream.fake import Advance, FakeRelay

HOOK = "https://orders.example.com/hooks/suno?order="
TASKS = 50


class _BareTask(msgspec.Struct):
    task_id: str


class _Bare(msgspec.Struct):
    data: list[_BareTask]


async def batch_answer() -> bytes:
    async with FakeRelay() as relay, aiohttp.ClientSession() as http:
        ids = [f"steady-{n:06d}" for n in range(TASKS)]
        for task_id in ids:
            relay.add_task(
                task_id, stages=["IN_PROGRESS"], advance=Advance.MANUAL, notify_hook=HOOK + task_id
            )
        async with http.post(f"{relay.base_url}/suno/fetch", json={"ids": ids, "action": "MUSIC"}) as answer:
            return await answer.read()


def per_task_us(work: Callable[[], object], repeat: int, loops: int = 400) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(loops):
            work()
        best = min(best, (time.process_time() - started) / loops / TASKS * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7, help="runs; the best is reported")
    args = parser.parse_args()
    body = asyncio.run(batch_answer())
    bare = msgspec.json.Decoder(_Bare)
    snapshots = parse_fetch_batch(body).snapshots
    if len(snapshots) != TASKS or not all(s.notify_hook for s in snapshots):
        raise RuntimeError("the fake relay's answer is not the one measured here")

    def parse_and_digest() -> None:
        for snapshot in parse_fetch_batch(body).snapshots:
            snapshot_digest(snapshot)

    print(
        f"sunotrack answer benchmark ({TASKS} tasks, {len(body) / TASKS / 1024:.1f} KB each, CPU µs per task)"
    )
    results = {
        "bare decode (task_id only)": per_task_us(lambda: bare.decode(body), args.repeat),
        "parse": per_task_us(lambda: parse_fetch_batch(body), args.repeat),
        "digest": per_task_us(lambda: [snapshot_digest(s) for s in snapshots], args.repeat),
        "parse + digest": per_task_us(parse_and_digest, args.repeat),
    }
    for name, value in results.items():
        print(f"  {name:<28} {value:6.2f} µs")


if __name__ == "__main__":
    main()
