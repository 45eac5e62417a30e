"""A hung object store fails a storage call in bounded time with a message that says where."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prefect.states import Failed

from tasks.retries import retry_if_transient
from tasks.storage import Storage, StorageConfig, StorageTimeoutError


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint that accepts connections and reads requests but never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


@pytest.fixture
def full_backlog() -> Iterator[str]:
    """An endpoint whose accept queue is full, so a new connection never completes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    waiting = []
    for _ in range(3):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(address)
        waiting.append(client)
    time.sleep(0.2)
    yield f"http://{address[0]}:{address[1]}"
    for client in waiting:
        client.close()
    server.close()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def storage_on(endpoint: str, **limits: float) -> Storage:
    return Storage(StorageConfig(root="s3://bucket/run", endpoint_url=endpoint, **limits))


def test_defaults_are_ten_seconds_to_connect_and_a_minute_to_answer() -> None:
    config = StorageConfig()
    assert (config.connect_timeout, config.read_timeout, config.attempts) == (10, 60, 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda storage: storage.exists(storage.url("labels.parquet")),
        lambda storage: storage.read_parquet(storage.url("labels.parquet")),
        lambda storage: storage.write_json(storage.url("labels.parquet"), {"a": 1}),
    ],
    ids=["exists", "read", "write"],
)
def test_a_silent_store_fails_each_call_naming_url_endpoint_and_timeout(
    silent_server: str, call
) -> None:
    storage = storage_on(silent_server, read_timeout=1, attempts=2)
    started = time.monotonic()
    with pytest.raises(StorageTimeoutError) as raised:
        call(storage)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert message.startswith("s3://bucket/run/labels.parquet: ")
    assert f"no answer from {silent_server} within read_timeout = 1 s (2 attempt(s))" in message
    assert "storage.read_timeout" in message
    # two attempts of one second each per request (a write makes three requests), not minutes;
    # the upper bounds leave room for a loaded machine (client set-up alone can take seconds)
    assert 1.5 < elapsed < 30


def test_one_attempt_waits_one_timeout(silent_server: str) -> None:
    storage = storage_on(silent_server, read_timeout=1, attempts=1)
    started = time.monotonic()
    with pytest.raises(StorageTimeoutError):
        storage.size(storage.url("x"))
    assert time.monotonic() - started < 10


def test_an_unreachable_store_fails_on_the_connect_timeout(full_backlog: str) -> None:
    storage = storage_on(full_backlog, connect_timeout=1, attempts=1)
    started = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=r"within connect_timeout = 1 s"):
        storage.ls(storage.root)
    assert time.monotonic() - started < 15


def test_a_timeout_is_transient_for_the_retry_rule(silent_server: str) -> None:
    storage = storage_on(silent_server, read_timeout=1, attempts=1)
    with pytest.raises(StorageTimeoutError) as raised:
        storage.exists(storage.url("x"))
    assert isinstance(raised.value, TimeoutError) and not isinstance(raised.value, ValueError)
    assert retry_if_transient(None, None, Failed(data=raised.value)) is True
