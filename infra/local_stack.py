"""Start the service stack on one machine, on 127.0.0.1: Prefect server, S3 (nanio), Dask.

    python -m infra.local_stack                   # everything, until Ctrl-C
    python -m infra.local_stack --services prefect,s3 --state-file stack.json

Everything the stack keeps lives in its home folder (default ``.lesa-stack/``) and survives a
restart of the stack: Prefect's database (runs, deployments, artifacts), the S3 buckets (nanio
stores every object as a plain file under ``s3/<bucket>/``), the S3 credentials (generated on
the first start) and the service logs. Once every service answers, the stack writes
``stack.env`` there: ``export`` lines that point Prefect, s3fs and the pipeline at it
(``LESA_STORAGE_ROOT``, ``DASK_SCHEDULER_ADDRESS``, see ``tasks.settings``); ``source`` it in
each shell. It is removed when the stack stops.

Each service is a child process in its own process group. Before starting one, the stack checks
that its ports are free (a service answering on a taken port would be someone else's); it says
ready only when each of its own children answers. A service that dies later is reported and
restarted; one that dies ``--max-restarts`` times within ten minutes stops the whole stack,
which then exits with status 1. Ctrl-C or SIGTERM stops every service (terminate, then kill
after a grace period) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("prefect", "s3", "dask")
BIN = Path(sys.executable).parent
DEFAULT_HOME = Path(".lesa-stack")
ENV_FILE = "stack.env"
LOCK_FILE = "stack.pid"
CREDENTIALS_FILE = "s3-credentials.json"
S3_REGION = "us-east-1"
RESTART_WINDOW_S = 600.0


class StackError(RuntimeError):
    """A service did not start or keeps dying (its log tail is in the message)."""


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (probed as the servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class Service:
    """One child process, the ports it binds and how to tell that it answers."""

    name: str
    command: list[str]
    ready: Callable[[], bool]
    ports: dict[str, int] = field(default_factory=dict)
    """Command-line option -> port, to name the option when a port is taken."""
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, log_dir: Path) -> None:
        for option, port in self.ports.items():
            if port_taken(self.host, port):
                raise StackError(
                    f"{self.name}: port {port} on {self.host} is already in use (another stack "
                    f"or program?); stop it or choose another port with {option}"
                )
        self.log_path = log_dir / f"{self.name}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Wait until the service answers; it must still be our child that runs then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackError(f"{self.name} exited with {self.returncode()}:\n{self.tail()}")
            if self.ready() and self.alive():
                return
            time.sleep(0.3)
        raise StackError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the service's process group, SIGKILL it if it lingers."""
        if self.process is None:
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


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _http_ok(url: str) -> Callable[[], bool]:
    """Probe: any HTTP answer below 500 (S3 says 403 to an unsigned request: it is up)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status < 500
        except urllib.error.HTTPError as error:
            return error.code < 500
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


def s3_credentials(home: Path) -> dict[str, str]:
    """The stack's S3 key pair: generated on the first start, kept (owner-only) in ``home``."""
    path = home / CREDENTIALS_FILE
    if not path.exists():
        path.touch(mode=0o600)
        credentials = {"key": "lesa", "secret": secrets.token_urlsafe(24)}
        path.write_text(json.dumps(credentials))
    return json.loads(path.read_text())


@dataclass
class Stack:
    """The configured services, where they keep their data, and how clients reach them."""

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    s3_port: int = 9000
    dask_port: int = 8786
    dask_dashboard_port: int = 8787
    dask_workers: int = 2
    dask_threads: int = 1
    bucket: str = "lesa"
    services: Sequence[str] = SERVICES
    home: Path = DEFAULT_HOME
    max_restarts: int = 3
    _running: list[Service] = field(default_factory=list)
    _credentials: dict[str, str] = field(default_factory=dict)

    @property
    def env_file(self) -> Path:
        return self.home / ENV_FILE

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
                LESA_STORAGE_ROOT=self.urls["s3_bucket"],
                AWS_ENDPOINT_URL=self.urls["s3_endpoint"],
                AWS_ACCESS_KEY_ID=self._credentials["key"],
                AWS_SECRET_ACCESS_KEY=self._credentials["secret"],
                AWS_DEFAULT_REGION=S3_REGION,
            )
        if "dask" in self.services:
            env["DASK_SCHEDULER_ADDRESS"] = self.urls["dask_scheduler"]
        return env

    def _services(self) -> list[Service]:
        specs = []
        if "prefect" in self.services:
            specs.append(self._prefect())
        if "s3" in self.services:
            specs.append(self._s3())
        if "dask" in self.services:
            specs.extend(self._dask())
        return specs

    def _prefect(self) -> Service:
        return Service(
            "prefect",
            [
                str(BIN / "prefect"),
                *("server", "start", "--host", self.host, "--port", str(self.prefect_port)),
            ],
            _http_ok(f"{self.urls['prefect_api']}/health"),
            ports={"--prefect-port": self.prefect_port},
            env={
                "PREFECT_HOME": str(self.home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": "",
            },
            host=self.host,
        )

    def _s3(self) -> Service:
        return Service(
            "s3",
            [
                str(BIN / "nanio"),
                *("serve", "--data-dir", str(self.home / "s3"), "--host", self.host),
                *("--port", str(self.s3_port), "--region", S3_REGION),
                *("--log-level", "warning", "--no-access-log"),
            ],
            _http_ok(self.urls["s3_endpoint"]),
            ports={"--s3-port": self.s3_port},
            env={
                "NANIO_ACCESS_KEY": self._credentials["key"],
                "NANIO_SECRET_KEY": self._credentials["secret"],
            },
            host=self.host,
        )

    def _dask(self) -> list[Service]:
        scheduler = Service(
            "dask-scheduler",
            [
                str(BIN / "dask"),
                *("scheduler", "--host", self.host, "--port", str(self.dask_port)),
                *("--dashboard-address", f"{self.host}:{self.dask_dashboard_port}"),
            ],
            _http_ok(f"http://{self.host}:{self.dask_dashboard_port}/health"),
            ports={
                "--dask-port": self.dask_port,
                "--dask-dashboard-port": self.dask_dashboard_port,
            },
            host=self.host,
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
            host=self.host,
        )
        return [scheduler, workers]

    def start(self, timeout: float = 90.0) -> None:
        """Start every service in order, each once the previous one answers."""
        unknown = sorted(set(self.services) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; choose from {list(SERVICES)}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.home = self.home.resolve()
        self._lock()
        self._credentials = s3_credentials(self.home)
        (self.home / "logs").mkdir(exist_ok=True)
        try:
            for service in self._services():
                self._running.append(service)
                service.start(self.home / "logs")
                service.wait_ready(timeout)
            if "s3" in self.services:
                self._create_bucket()
            self._write_env_file()
        except BaseException:
            self.stop()
            raise

    def _lock(self) -> None:
        """Refuse a second stack on the same home (one database, one set of buckets)."""
        lock = self.home / LOCK_FILE
        owner = lock.read_text().strip() if lock.exists() else ""
        if owner.isdigit() and _process_exists(int(owner)):
            raise StackError(f"a stack already runs from {self.home} (pid {owner})")
        lock.write_text(str(os.getpid()))

    def _owns_home(self) -> bool:
        lock = self.home / LOCK_FILE
        return lock.exists() and lock.read_text().strip() == str(os.getpid())

    def _create_bucket(self) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.urls["s3_endpoint"],
            aws_access_key_id=self._credentials["key"],
            aws_secret_access_key=self._credentials["secret"],
            region_name=S3_REGION,
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=self.bucket)

    def _write_env_file(self) -> None:
        self.env_file.touch(mode=0o600)
        lines = [f"export {name}={value}" for name, value in self.client_env.items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def supervise(self, stopping: threading.Event, every: float = 1.0) -> None:
        """Until ``stopping`` is set: restart a service that died, in start order.

        Raises:
            StackError: a service died ``max_restarts`` times within ten minutes.
        """
        while not stopping.wait(every):
            for service in list(self._running):
                if not service.alive():
                    self._restart(service)

    def _restart(self, service: Service, timeout: float = 90.0) -> None:
        now = time.monotonic()
        service.restarts = [t for t in service.restarts if now - t < RESTART_WINDOW_S]
        code = service.returncode()
        print(f"stack: {service.name} exited with {code}:\n{service.tail(10)}", file=sys.stderr)
        if len(service.restarts) >= self.max_restarts:
            raise StackError(
                f"{service.name} died {len(service.restarts) + 1} times within "
                f"{RESTART_WINDOW_S:.0f}s; stopping the stack (log: {service.log_path})"
            )
        service.restarts.append(now)
        service.stop()
        service.start(self.home / "logs")
        service.wait_ready(timeout)
        print(f"stack: {service.name} restarted", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop the services in reverse start order; the home and its data stay."""
        while self._running:
            self._running.pop().stop()
        if self._owns_home():
            self.env_file.unlink(missing_ok=True)
            (self.home / LOCK_FILE).unlink()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local_stack",
        description=(
            "Start a local Prefect server (SQLite), an S3 server (nanio: buckets are folders) "
            "and a Dask scheduler + workers on one host, keeping their data in --home; write "
            "HOME/stack.env (source it to point the pipeline at the stack); restart a service "
            "that dies; stop them all on Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument("--services", default=",".join(SERVICES), help="comma list of %(default)s")
    parser.add_argument(
        "--home",
        type=Path,
        default=DEFAULT_HOME,
        help="Prefect database, S3 data, credentials, logs and stack.env (default: %(default)s)",
    )
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--bucket", default="lesa", help="S3 bucket to create (default: lesa)")
    parser.add_argument("--dask-port", type=int, default=8786)
    parser.add_argument("--dask-dashboard-port", type=int, default=8787)
    parser.add_argument("--dask-workers", type=int, default=2, help="worker processes")
    parser.add_argument("--dask-threads", type=int, default=1, help="threads per worker")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="restarts of one service within 10 minutes before the stack gives up (default: 3)",
    )
    parser.add_argument("--state-file", type=Path, help="write URLs and env as JSON when ready")
    return parser


def _announce(stack: Stack, state_file: Path | None) -> None:
    for name, url in stack.urls.items():
        print(f"{name:16s} {url}")
    print(f"{'home':16s} {stack.home}")
    print(f"\n# point the pipeline at this stack, in each shell:\nsource {stack.env_file}")
    sys.stdout.flush()
    if state_file:
        state = {"urls": stack.urls, "env": stack.client_env, "home": str(stack.home)}
        state_file.write_text(json.dumps(state, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    services = [name.strip() for name in args.services.split(",") if name.strip()]
    if "s3" in services and shutil.which("nanio", path=str(BIN)) is None:
        print(
            f"error: the S3 server nanio is not installed in {BIN} (pip install nanio)",
            file=sys.stderr,
        )
        return 1
    stack = Stack(
        host=args.host,
        prefect_port=args.prefect_port,
        s3_port=args.s3_port,
        dask_port=args.dask_port,
        dask_dashboard_port=args.dask_dashboard_port,
        dask_workers=args.dask_workers,
        dask_threads=args.dask_threads,
        bucket=args.bucket,
        services=services,
        home=args.home,
        max_restarts=args.max_restarts,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        stack.start()
        _announce(stack, args.state_file)
        stack.supervise(stopping)
    except (StackError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("stack stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
