"""Local stacks started as a user would (``python -m infra.local_stack``), on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.helpers.services import free_port

REPO = Path(__file__).resolve().parents[2]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a ``stack.env`` (``export NAME=value`` lines)."""
    found = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = value
    return found


def wait_for(condition, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(every)
    return result


@dataclass
class StackProcess:
    """A running ``python -m infra.local_stack`` and what it told us."""

    process: subprocess.Popen[str]
    home: Path
    state: dict[str, Any]
    stderr: Path
    ports: dict[str, int]

    @property
    def env_file(self) -> Path:
        return self.home / "stack.env"

    def client_env(self, tmp_path: Path) -> dict[str, str]:
        """This process's environment with the stack's ``stack.env`` applied, as a user's shell
        after ``source``; Prefect's client home and lesa's cache are kept apart per test."""
        base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        return {
            **base,
            **read_env_file(self.env_file),
            "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
        }

    def child(self, word: str) -> psutil.Process:
        """The stack's child process whose command line contains ``word``."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if any(word in part for part in child.cmdline()):
                return child
        raise AssertionError(f"no child running {word}")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)


def start_stack(
    home: Path, services: str, *extra: str, ports: dict[str, int] | None = None
) -> StackProcess:
    """Start a stack and wait until it has written its state file (every service answers)."""
    ports = ports or {name: free_port() for name in ("prefect", "s3", "dask", "dashboard")}
    state_file = home.parent / f"{home.name}-state.json"
    state_file.unlink(missing_ok=True)
    stderr = home.parent / f"{home.name}-stderr.log"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "infra.local_stack", "--services", services),
            *("--home", str(home), "--state-file", str(state_file)),
            *("--prefect-port", str(ports["prefect"]), "--s3-port", str(ports["s3"])),
            *("--dask-port", str(ports["dask"]), "--dask-workers", "1"),
            *("--dask-dashboard-port", str(ports["dashboard"])),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(stderr, "w"),  # noqa: SIM115 - closed with the process
        text=True,
        env={key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")},
    )
    stack = StackProcess(process, home, {}, stderr, ports)

    def ready() -> bool:
        assert process.poll() is None, stack.log()
        return state_file.exists()

    wait_for(ready, 150, "the stack did not come up")
    stack.state = json.loads(state_file.read_text())
    return stack
