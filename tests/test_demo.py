"""`sunotrack demo` end to end, as a newcomer runs it: a real process, its own embedded database."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.webhooks.conftest import Receiver


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class DemoProcess:
    """The demo in its own process group, so `stop()` is a terminal's Ctrl-C: SIGINT to the group."""

    def __init__(self, data_dir: Path, port: int, stage_s: float = 0.3) -> None:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith(("SUNO", "DATABASE_URL"))
        }
        env["SUNOTRACK_DATA_DIR"] = str(data_dir)
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from service.cli import main; main()", "demo", "--port", str(port),
             "--stage-s", str(stage_s)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.output.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.output[-80:])}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._pump_thread.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        while not self.lines.empty():
            self.output.append(self.lines.get())

    @property
    def transcript(self) -> str:
        return "".join(self.output)


def stop_stray_postgres(data_dir: Path) -> None:
    """A demo killed mid-test would leave its postgres running and holding CI's output open."""
    pg_dir = data_dir / "pg"
    if not (pg_dir / "postmaster.pid").exists():
        return
    pg_ctl = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    pg_ctl = pg_ctl / "site-packages" / "pgserver" / "pginstall" / "bin" / "pg_ctl"
    command = [str(pg_ctl), "-D", str(pg_dir), "stop", "-m", "immediate"]
    if os.geteuid() == 0 and shutil.which("runuser"):
        command = ["runuser", "-u", "pgserver", "--", *command]
    subprocess.run(command, capture_output=True, timeout=30, check=False)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Short path: the embedded server's socket lives under it.
    path = Path(f"/tmp/st-demo-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    yield path
    stop_stray_postgres(path)
    shutil.rmtree(path, ignore_errors=True)


def list_tasks(port: int, token: str) -> list[dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/tasks?limit=200", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        items: list[dict[str, object]] = json.load(response)["items"]
        return items


def test_demo_moves_sample_tasks_to_the_end_and_keeps_them_across_a_restart(data_dir: Path) -> None:
    port = free_port()
    first = DemoProcess(data_dir, port)
    try:
        token = first.wait_for(r"admin token: (\S+)").group(1)
        client_token = first.wait_for(r"client demo-shop: token (\S+)  webhook secret whsec_").group(1)
        first.wait_for(r"demo: all sample tasks finished")
        hooked = re.search(
            r"demo: registered music\s+(\S+)\s+\(submitted to the relay with notify_hook", first.transcript
        )
        assert hooked is not None, first.transcript
        told_complete = (
            rf"demo: webhook {hooked.group(1)}  SUCCESS  \(the relay's format, signature verified\)"
        )
        if not re.search(told_complete, first.transcript):
            first.wait_for(told_complete)
        before = list_tasks(port, token)
        clients_own = list_tasks(port, client_token)
    finally:
        first.stop()
    transcript = "".join(first.output)

    assert first.process.returncode == 0, transcript
    assert {task["status"] for task in before} == {"complete"}
    assert clients_own == []  # the samples are the admin's: a client sees only its own tasks
    assert {task["kind"] for task in before} == {"music", "lyrics", "stems"}
    assert re.search(r"music .* transition .* -> complete", transcript)
    # The one sample registered without a hook: delivered to the one its relay answers name, and only it.
    assert set(re.findall(r"demo: webhook (\S+) ", transcript)) == {hooked.group(1)}
    assert "webhook refused" not in transcript

    second = DemoProcess(data_dir, port)
    try:
        token = second.wait_for(r"admin token: (\S+)").group(1)
        assert second.wait_for(r"client demo-shop: token (\S+)").group(1) == client_token
        second.wait_for(r"demo: registered stems")
        after = {str(task["task_id"]): task["status"] for task in list_tasks(port, token)}
    finally:
        second.stop()

    assert {str(task["task_id"]): task["status"] for task in before}.items() <= after.items()
    assert len(after) == 2 * len(before)


NOISE = ("Traceback", "Task exception was never retrieved", "KeyboardInterrupt", "Exception")


def printed_curls(transcript: str) -> list[list[str]]:
    """The curl commands the demo printed, each as its argv (continuation lines joined)."""
    commands, current = [], ""
    for line in transcript.splitlines():
        if line.startswith("  curl ") or current:
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(shlex.split(current))
                current = ""
    return commands


async def run_curl(argv: list[str], **replace: str) -> Any:
    """What curl would do with the few flags the demo prints (-s, -H, -d); the JSON answer."""
    assert argv[0] == "curl"
    headers: dict[str, str] = {}
    data: str | None = None
    url = ""
    words = iter(argv[1:])
    for word in words:
        if word == "-H":
            name, _, value = next(words).partition(": ")
            headers[name] = value
        elif word == "-d":
            data = next(words)
        elif word != "-s":
            url = word
    for old, new in replace.items():
        url = url.replace(old, new)
        data = data.replace(old, new) if data is not None else None
    async with httpx.AsyncClient(timeout=30) as client:
        if data is None:
            response = await client.get(url, headers=headers)
        else:
            response = await client.post(url, headers=headers, content=data)
    assert response.status_code in (200, 201), (argv, response.text)
    return response.json()


def printed_receiver_check(transcript: str) -> str:
    lines = transcript.split("A receiver checks each webhook's signature", 1)[1].splitlines()[1:]
    return "\n".join(line.strip() for line in lines[:3])


async def until_finished(base: str, token: str, expected: dict[str, str]) -> dict[str, Any]:
    """Wait until every task the demo tracks is finished; return them by id."""
    tasks: dict[str, Any] = {}

    async def finished() -> bool:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            answer = await client.get(
                "/api/v1/tasks", params={"limit": 200}, headers={"Authorization": f"Bearer {token}"}
            )
        tasks.clear()
        tasks.update({task["task_id"]: task for task in answer.json()["items"]})
        return expected.keys() <= tasks.keys() and all(
            tasks[task_id]["status"] in ("complete", "failed") for task_id in tasks
        )

    await wait_until(finished, timeout=90, what="every demo task finished")
    return tasks


def sample_ends(transcript: str) -> dict[str, str]:
    """Each sample the demo registered and how its fake lifecycle ends: every one completes."""
    registered = re.findall(r"demo: registered (\w+)\s+(\S+)", transcript)
    ends = ["complete"] * 6
    assert [kind for kind, _ in registered] == ["music", "music", "lyrics", "music", "music", "stems"]
    return {task_id: end for (_, task_id), end in zip(registered, ends, strict=True)}


async def test_a_newcomer_runs_the_demo_stops_it_and_runs_it_again(data_dir: Path) -> None:
    """Start; try the printed curl lines (one task with a hook to a receiver); Ctrl-C before anything
    finished; start again. Both runs stop quietly with exit 0, and every task of both runs ends as its
    fake lifecycle says (none `task_not_exist`), so the second run looks like the first; the printed
    three-line receiver check verifies the webhooks, signed with the same secret in both runs."""
    port = free_port()
    receiver = await Receiver().start()
    # Slow enough stages that nothing finishes before the Ctrl-C below; the sums of both runs stay short.
    first = DemoProcess(data_dir, port, stage_s=2)
    try:
        token = (await asyncio.to_thread(first.wait_for, r"admin token: (\S+)")).group(1)
        secret = (await asyncio.to_thread(first.wait_for, r"webhook signing secret: (whsec_\S+)")).group(1)
        await asyncio.to_thread(first.wait_for, r"notify_hooks on loopback and private addresses: allowed")
        await asyncio.to_thread(first.wait_for, r"OpenAPI: ")
        await asyncio.to_thread(first.wait_for, r"demo: registered stems")
        submit, register, events = printed_curls(first.transcript)
        mine = (await run_curl(submit))["data"]
        assert (await run_curl(register, TASK_ID=mine))["status"] == "submitted"
        assert (await run_curl(events, TASK_ID=mine))["items"][0]["to_status"] == "submitted"
        hooked = (await run_curl(submit))["data"]
        hook = f'"task_id": "{hooked}", "notify_hook": "{receiver.url}"'
        await run_curl(register, **{'"task_id": "TASK_ID"': hook})
        first_samples = sample_ends(first.transcript)
    finally:
        first.stop()

    assert first.process.returncode == 0, first.transcript
    assert not [word for word in NOISE if word in first.transcript], first.transcript
    assert "demo: all sample tasks finished" not in first.transcript

    second = DemoProcess(data_dir, port, stage_s=0.3)
    try:
        token = (await asyncio.to_thread(second.wait_for, r"admin token: (\S+)")).group(1)
        await asyncio.to_thread(second.wait_for, r"demo: all sample tasks finished")
        expected = {**first_samples, **sample_ends(second.transcript), mine: "complete", hooked: "complete"}
        tasks = await until_finished(f"http://127.0.0.1:{port}", token, expected)

        async def hook_told_complete() -> bool:
            return any(b'"status":"complete"' in seen.body for seen in receiver.received)

        await wait_until(hook_told_complete, timeout=30, what="the hooked task's complete webhook")
    finally:
        second.stop()
        await receiver.stop()

    assert second.process.returncode == 0, second.transcript
    assert not [word for word in NOISE if word in second.transcript], second.transcript
    assert f"webhook signing secret: {secret}" in second.transcript
    assert {task_id: tasks[task_id]["status"] for task_id in expected} == expected
    assert not [task for task in tasks.values() if "task_not_exist" in str(task["fail_reason"])]
    check = printed_receiver_check(second.transcript)
    for seen in receiver.received:
        scope: dict[str, Any] = {"body": seen.body, "headers": seen.headers}
        exec(check, scope)  # the three lines exactly as printed
        assert scope["event"]["data"]["task_id"] == hooked
