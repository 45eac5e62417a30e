"""Claims on storage folders: one holder at a time (locally and on a real S3 server), a killed
holder's claim taken over after its ttl, a store that ignores If-None-Match still gives one
winner, and a holder that stopped renewing learns it lost the claim."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks import claims
from tasks.claims import ClaimLostError, acquire, claimed, current_claim
from tasks.storage import Storage, StorageConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(StorageConfig(root=str(tmp_path / "root"), cache_dir=str(tmp_path / "c")))
    return request.getfixturevalue("s3_storage")


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "SETTLE_S", 0.2)


def test_create_exclusive_creates_once(storage: Storage) -> None:
    url = storage.url("x", "claim.json")
    assert storage.create_exclusive(url, b"first")
    assert not storage.create_exclusive(url, b"second")
    assert storage.read_bytes(url) == b"first"
    assert storage.ls(storage.url("x")) == [url], "no temporary file is left behind"


def hold_concurrently(storage: Storage, folder: str, holders: int) -> list[tuple[float, float]]:
    """Each thread holds the claim for a moment; the (start, end) times each one held it."""
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()
    start = threading.Barrier(holders)

    def hold() -> None:
        start.wait()
        with claimed(storage, folder, "test", poll=0.05):
            began = time.monotonic()
            time.sleep(0.3)
            with lock:
                spans.append((began, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(holders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return sorted(spans)


def test_one_holder_at_a_time_and_released_after(storage: Storage) -> None:
    folder = storage.url("features", "set")
    spans = hold_concurrently(storage, folder, 3)
    assert len(spans) == 3
    for (_, end), (begin, _) in itertools.pairwise(spans):
        assert begin >= end, f"two holders at once: {spans}"
    assert current_claim(storage, folder) is None


def test_a_store_ignoring_if_none_match_still_has_one_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nanio accepts every conditional put: the read-back after the settle time decides."""
    storage = Storage(StorageConfig(root=str(tmp_path / "root")))

    def last_writer_wins(url: str, data: bytes) -> bool:
        storage.write_bytes(url, data)
        return True

    monkeypatch.setattr(storage, "create_exclusive", last_writer_wins)
    spans = hold_concurrently(storage, storage.url("runs", "r"), 3)
    assert len(spans) == 3
    for (_, end), (begin, _) in itertools.pairwise(spans):
        assert begin >= end, f"two holders at once: {spans}"


def test_a_killed_holders_claim_is_taken_over_after_its_ttl(
    s3_storage: Storage, tmp_path: Path
) -> None:
    folder = s3_storage.url("runs", "killed")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tasks.claims import acquire; "
            "from tasks.storage import Storage, StorageConfig; "
            "storage = Storage(StorageConfig(root=sys.argv[1], endpoint_url=sys.argv[2])); "
            "acquire(storage, sys.argv[3], 'doomed', ttl=10); print('held', flush=True); "
            "time.sleep(600)",
            s3_storage.root,
            str(s3_storage.config.endpoint_url),
            folder,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        held = current_claim(s3_storage, folder)
        assert held is not None and not held.expired and "pid" in held.owner
        holder.kill()
        holder.wait()
        started = time.monotonic()
        with claimed(s3_storage, folder, "survivor", poll=0.1) as claim:
            waited = time.monotonic() - started
            assert claim.generation == held.generation + 1
            assert current_claim(s3_storage, folder).holder == claim.holder
        assert waited < 30, "the dead claim expires within its ttl (10 s) and is taken over"
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_that_stopped_renewing_has_lost_its_claim(storage: Storage) -> None:
    folder = storage.url("runs", "slow")
    stalled = acquire(storage, folder, "stalled", ttl=0.6)
    stalled._stop.set()  # its renewals stop, as when a process is frozen
    stalled._thread.join()
    time.sleep(0.7)
    with (
        claimed(storage, folder, "next", poll=0.05),
        pytest.raises(ClaimLostError, match="taken over by another run"),
    ):
        stalled.check()
    stalled.release()
    assert current_claim(storage, folder) is None
