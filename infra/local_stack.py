"""Start the service stack on one machine, on 127.0.0.1: Prefect server, S3 (moto), Dask.

    python -m infra.local_stack                   # everything, until Ctrl-C
    python -m infra.local_stack --services prefect,s3 --state-file stack.json

Each service is a child process in its own process group; Ctrl-C or SIGTERM stops them all
(terminate, then kill after a grace period) and removes the temporary Prefect home. The
printed ``export`` lines point the pipeline at the stack. ``--state-file`` writes the same
information as JSON once every service answers, for scripts and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("prefect", "s3", "dask")
BIN = Path(sys.executable).parent
S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"


class StackError(RuntimeError):
    """A service did not start (its log tail is in the message)."""


@dataclass
class Service:
    """One child process and how to tell that it is ready."""

    name: str
    command: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            if self.ready():
                return
            time.sleep(0.3)
        raise StackError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the service's process group, SIGKILL it if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status < 500
        except (urllib.error.URLError, OSError):
            return False

    return probe


def _dask_ready(address: str, workers: int) -> Callable[[], bool]:
    def probe() -> bool:
        from distributed import Client

        try:
            with Client(address, timeout=3) as client:
                return len(client.scheduler_info(n_workers=-1)["workers"]) >= workers
        except (OSError, TimeoutError):
            return False

    return probe


@dataclass
class Stack:
    """The configured services and the environment that points clients at them."""

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    s3_port: int = 5000
    dask_port: int = 8786
    dask_dashboard_port: int = 8787
    dask_workers: int = 2
    dask_threads: int = 1
    bucket: str = "lesa"
    services: Sequence[str] = SERVICES
    home: Path | None = None
    _owned_home: bool = False
    _running: list[Service] = field(default_factory=list)

    @property
    def urls(self) -> dict[str, str]:
        urls = {}
        if "prefect" in self.services:
            urls["prefect_ui"] = f"http://{self.host}:{self.prefect_port}"
            urls["prefect_api"] = f"http://{self.host}:{self.prefect_port}/api"
        if "s3" in self.services:
            urls["s3_endpoint"] = f"http://{self.host}:{self.s3_port}"
            urls["s3_bucket"] = f"s3://{self.bucket}"
        if "dask" in self.services:
            urls["dask_scheduler"] = f"tcp://{self.host}:{self.dask_port}"
            urls["dask_dashboard"] = f"http://{self.host}:{self.dask_dashboard_port}/status"
        return urls

    @property
    def client_env(self) -> dict[str, str]:
        """Environment variables that point Prefect, s3fs and the pipeline at this stack."""
        env = {}
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = self.urls["prefect_api"]
        if "s3" in self.services:
            env.update(
                AWS_ENDPOINT_URL=self.urls["s3_endpoint"],
                AWS_ACCESS_KEY_ID=S3_KEY,
                AWS_SECRET_ACCESS_KEY=S3_SECRET,
                AWS_DEFAULT_REGION=S3_REGION,
            )
        if "dask" in self.services:
            env["DASK_SCHEDULER_ADDRESS"] = self.urls["dask_scheduler"]
        return env

    def _services(self) -> list[Service]:
        assert self.home is not None
        specs = []
        if "prefect" in self.services:
            specs.append(
                Service(
                    "prefect",
                    [
                        str(BIN / "prefect"),
                        *("server", "start", "--host", self.host),
                        *("--port", str(self.prefect_port)),
                    ],
                    _http_ok(f"{self.urls['prefect_api']}/health"),
                    env={
                        "PREFECT_HOME": str(self.home),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_API_URL": "",
                    },
                )
            )
        if "s3" in self.services:
            specs.append(
                Service(
                    "s3",
                    [str(BIN / "moto_server"), "-H", self.host, "-p", str(self.s3_port)],
                    _http_ok(self.urls["s3_endpoint"]),
                )
            )
        if "dask" in self.services:
            scheduler = Service(
                "dask-scheduler",
                [
                    str(BIN / "dask"),
                    *("scheduler", "--host", self.host, "--port", str(self.dask_port)),
                    *("--dashboard-address", f"{self.host}:{self.dask_dashboard_port}"),
                ],
                _http_ok(f"http://{self.host}:{self.dask_dashboard_port}/health"),
            )
            workers = Service(
                "dask-workers",
                [
                    str(BIN / "dask"),
                    *("worker", self.urls["dask_scheduler"]),
                    *("--nworkers", str(self.dask_workers), "--nthreads", str(self.dask_threads)),
                    *("--host", self.host, "--no-dashboard"),
                    *("--local-directory", str(self.home / "dask")),
                ],
                _dask_ready(self.urls["dask_scheduler"], self.dask_workers),
                env={"OMP_NUM_THREADS": str(self.dask_threads)},
            )
            specs.extend([scheduler, workers])
        return specs

    def start(self, timeout: float = 90.0) -> None:
        """Start every service in order, each once the previous one answers."""
        unknown = sorted(set(self.services) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; choose from {list(SERVICES)}")
        if self.home is None:
            self.home = Path(tempfile.mkdtemp(prefix="lesa-stack-"))
            self._owned_home = True
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            for service in self._services():
                service.start(self.home)
                self._running.append(service)
                service.wait_ready(timeout)
            if "s3" in self.services:
                self._create_bucket()
        except BaseException:
            self.stop()
            raise

    def _create_bucket(self) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.urls["s3_endpoint"],
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )
        client.create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        """Stop the services in reverse start order; remove the temporary home we created."""
        while self._running:
            self._running.pop().stop()
        if self._owned_home and self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local_stack",
        description=(
            "Start a local Prefect server (SQLite, temporary PREFECT_HOME), moto's S3 server "
            "and a Dask scheduler + workers on one host; print their URLs; stop them all on "
            "Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument("--services", default=",".join(SERVICES), help="comma list of %(default)s")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--s3-port", type=int, default=5000)
    parser.add_argument("--bucket", default="lesa", help="S3 bucket to create (default: lesa)")
    parser.add_argument("--dask-port", type=int, default=8786)
    parser.add_argument("--dask-dashboard-port", type=int, default=8787)
    parser.add_argument("--dask-workers", type=int, default=2, help="worker processes")
    parser.add_argument("--dask-threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--home", type=Path, help="Prefect home / logs (default: a temp folder)")
    parser.add_argument("--state-file", type=Path, help="write URLs and env as JSON when ready")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stack = Stack(
        host=args.host,
        prefect_port=args.prefect_port,
        s3_port=args.s3_port,
        dask_port=args.dask_port,
        dask_dashboard_port=args.dask_dashboard_port,
        dask_workers=args.dask_workers,
        dask_threads=args.dask_threads,
        bucket=args.bucket,
        services=[name.strip() for name in args.services.split(",") if name.strip()],
        home=args.home,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        stack.start()
    except (StackError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for name, url in stack.urls.items():
            print(f"{name:16s} {url}")
        print(f"{'logs':16s} {stack.home}")
        print("\n# point the pipeline at this stack:")
        for name, value in stack.client_env.items():
            print(f"export {name}={value}")
        sys.stdout.flush()
        if args.state_file:
            state = {"urls": stack.urls, "env": stack.client_env, "home": str(stack.home)}
            args.state_file.write_text(json.dumps(state, indent=2))
        stopping.wait()
    finally:
        stack.stop()
        print("stack stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
