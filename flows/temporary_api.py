"""The temporary Prefect API an entry point starts when no server is configured.

Without ``PREFECT_API_URL``, Prefect starts a local API server in a subprocess the first time a
flow needs one and waits ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default)
for it. On a loaded machine that is too short ("Timed out while attempting to connect to
ephemeral Prefect API server"), and the run dies before its first stage. The entry points start
it here instead, before the flow: with a longer wait, one more try after a timeout, and, if it
still fails, a message that says what to do. Prefect's own start-up then finds the server
running and uses it.

The server's own output goes to a log file under ``PREFECT_HOME`` rather than to the terminal,
so that a failed start shows the user one message that says what to do, with the server's last
error line and where its full log is, instead of the server's traceback; and it runs in its own
session, so that Ctrl-C interrupts the run, not the API the run reports its end to.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

from prefect.server.api import server as server_module
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_HOME

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 90
ATTEMPTS = 2


class TemporaryAPIError(RuntimeError):
    """The temporary Prefect API did not start; the message says how to run without it."""


class LoggedServer(SubprocessASGIServer):
    """Prefect's subprocess server, with its output in ``log_path`` and in its own session.

    Its own session keeps the terminal's Ctrl-C (sent to the whole foreground process group)
    and a group kill (``timeout``, a job scheduler) away from it: the flow process records the
    interrupted run as Crashed through it, and only then stops it at exit. Sharing the group,
    the server died first and the interrupted process hung on its reconnecting clients.
    """

    log_path: Path

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Prefect builds the server's command line; only how it is started changes here.
            popen = functools.partial(
                subprocess.Popen, stdout=log, stderr=log, start_new_session=True
            )
            with mock.patch.object(server_module.subprocess, "Popen", popen):
                return super()._run_uvicorn_command()


def server_log_path() -> Path:
    """Where the temporary API writes its output: one file per Prefect home."""
    return Path(PREFECT_HOME.value()) / "temporary-api.log"


def last_error_line(log_path: Path) -> str:
    """The last line of the server's log that names an error, or "" when there is none."""
    if not log_path.exists():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line.strip() for line in lines if "Error" in line or "error" in line]
    return errors[-1] if errors else ""


def startup_timeout() -> int:
    """Seconds to wait for the temporary API: the Prefect setting when the user set it."""
    value = os.environ.get(STARTUP_TIMEOUT_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_STARTUP_TIMEOUT_S


def start_temporary_api(timeout: int | None = None, attempts: int = ATTEMPTS) -> str | None:
    """Start the temporary API unless a Prefect server is configured; return its URL.

    Raises:
        TemporaryAPIError: every attempt timed out or the server exited.
    """
    if PREFECT_API_URL.value():
        return None
    timeout = timeout or startup_timeout()
    server = LoggedServer()
    server.log_path = server_log_path()
    failure = ""
    for _ in range(attempts):
        try:
            server.start(timeout=timeout)
            return server.api_url
        except RuntimeError as exc:
            failure = str(exc)
            server.stop()
    raise TemporaryAPIError(
        f"the temporary Prefect API did not start ({attempts} tries of {timeout} s each; a "
        "loaded machine starts it slowly). Either run a Prefect server once and point the "
        "runs at it (python -m infra.local_stack --services prefect, then "
        "source .lesa-stack/stack.env; or prefect server start and "
        "export PREFECT_API_URL=http://127.0.0.1:4200/api), or wait longer with "
        f"{STARTUP_TIMEOUT_ENV}=300. Last error: {failure[-300:]} "
        f"{last_error_line(server.log_path)} (the server's log: {server.log_path})"
    )
