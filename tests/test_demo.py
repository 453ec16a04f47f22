"""`sunotrack demo` end to end, as a newcomer runs it: a real process, its own embedded database."""

from __future__ import annotations

import json
import os
import queue
import re
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

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class DemoProcess:
    def __init__(self, data_dir: Path, port: int) -> None:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith(("SUNO", "DATABASE_URL"))
        }
        env["SUNOTRACK_DATA_DIR"] = str(data_dir)
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from service.cli import main; main()", "demo", "--port", str(port),
             "--stage-s", "0.3"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._pump_thread.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


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
        first.wait_for(r"demo: all sample tasks finished")
        before = list_tasks(port, token)
    finally:
        first.stop()
    transcript = "".join(first.output)

    assert first.process.returncode == 0, transcript
    assert {task["status"] for task in before} == {"complete", "failed"}
    assert {task["kind"] for task in before} == {"music", "lyrics", "stems"}
    assert re.search(r"music .* transition .* -> complete", transcript)

    second = DemoProcess(data_dir, port)
    try:
        token = second.wait_for(r"admin token: (\S+)").group(1)
        second.wait_for(r"demo: registered stems")
        after = {str(task["task_id"]): task["status"] for task in list_tasks(port, token)}
    finally:
        second.stop()

    assert {str(task["task_id"]): task["status"] for task in before}.items() <= after.items()
    assert len(after) == 2 * len(before)
