"""Run isolation: a stage claims its output folder in storage before it computes into it.

Two flow runs of the same config share their outputs (a feature set, a run's checkpoints): the
one that claims the folder first computes, the others wait for its claim to go and then find
the work done (reused by the stage's own rules), so a shard is extracted once and no run ever
resumes from checkpoints another live run is writing.

A claim is a small JSON object ``<folder>/_claim/<generation>.json``; the highest generation is
the current one. It is created with :meth:`Storage.create_exclusive` (``O_EXCL``-style locally,
``If-None-Match: *`` on S3), then read back after :data:`SETTLE_S` (a store that ignores the
condition, such as nanio, lets the last writer win: the read-back tells every writer who that
was). The holder renews its expiry from a background thread every ``ttl / 3``; a claim whose
expiry passed (its holder was killed, e.g. by SIGKILL or the OOM killer) is taken over by
creating the next generation, which only one contender can do, and the taker resumes from
whatever the dead holder committed. Expiry times are wall-clock seconds, so hosts sharing a
store need clocks closer than ``ttl``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, runtime
from prefect.exceptions import MissingContextError

from tasks.storage import Storage

log = logging.getLogger(__name__)

CLAIM_DIR = "_claim"
TTL_S = 120.0
"""Seconds a claim lives without renewal: how long a killed holder blocks the next run."""
SETTLE_S = 1.0
"""Seconds between creating a claim and reading it back (longer than a write takes)."""
POLL_S = 2.0
"""Seconds between looks at a claim another run holds."""
WAIT_LOG_S = 60.0


class ClaimLostError(RuntimeError):
    """This run's claim was taken over (it stopped renewing it for longer than its ttl)."""


@dataclass(frozen=True)
class ClaimRecord:
    """What a claim object says: who holds it and until when."""

    generation: int
    holder: str
    owner: str
    """Human-readable: flow run, host and process of the holder."""
    expires_at: float

    @property
    def expired(self) -> bool:
        return self.expires_at < time.time()


def _owner() -> str:
    flow_run = runtime.flow_run.name or "no flow run"
    return f"{flow_run} ({runtime.flow_run.id or '-'}) on {socket.gethostname()} pid {os.getpid()}"


def _generation_url(folder: str, generation: int) -> str:
    return f"{folder.rstrip('/')}/{CLAIM_DIR}/{generation:08d}.json"


def current_claim(storage: Storage, folder: str) -> ClaimRecord | None:
    """The highest-generation claim on ``folder``; None when nobody claims it.

    A claim object that cannot be parsed (written by something else) counts as expired.
    """
    urls = [url for url in storage.ls(f"{folder.rstrip('/')}/{CLAIM_DIR}") if url.endswith(".json")]
    if not urls:
        return None
    url = max(urls)
    generation = int(url.rsplit("/", 1)[-1].removesuffix(".json"))
    try:
        document = json.loads(storage.read_bytes(url))
        return ClaimRecord(
            generation, document["holder"], document["owner"], float(document["expires_at"])
        )
    except FileNotFoundError:
        return current_claim(storage, folder)
    except (ValueError, KeyError, TypeError):
        return ClaimRecord(generation, "", f"unreadable claim {url}", 0.0)


@dataclass
class Claim:
    """A claim this process holds; renewed in the background until :meth:`release`."""

    storage: Storage
    folder: str
    what: str
    ttl: float = TTL_S
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str = field(default_factory=_owner)
    generation: int = 0
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return _generation_url(self.folder, self.generation)

    def _document(self) -> bytes:
        expires_at = time.time() + self.ttl
        body = {"holder": self.holder, "owner": self.owner, "what": self.what}
        return json.dumps({**body, "expires_at": expires_at}, sort_keys=True).encode()

    def try_acquire(self, generation: int) -> bool:
        """Create generation ``generation`` and check it is ours once writes have settled."""
        self.generation = generation
        if not self.storage.create_exclusive(self.url, self._document()):
            return False
        time.sleep(SETTLE_S)
        current = current_claim(self.storage, self.folder)
        if current is None or current.holder != self.holder:
            return False
        for older in range(max(generation - 8, 1), generation):
            self.storage.rm(_generation_url(self.folder, older))
        self._thread = threading.Thread(target=self._renew, name="claim-renewal", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = current_claim(self.storage, self.folder)
                if current is None or current.holder != self.holder:
                    log.error("claim on %s lost to %s", self.folder, current and current.owner)
                    self.lost.set()
                    return
                self.storage.write_bytes(self.url, self._document())
            except OSError as error:  # a storage outage: the next renewal retries
                log.warning("renewing the claim on %s failed, will retry: %s", self.folder, error)

    def check(self) -> None:
        """Raise :class:`ClaimLostError` if another run took this claim over (asks storage:
        call it before committing what the claim protects)."""
        current = current_claim(self.storage, self.folder)
        if current is None or current.holder != self.holder:
            self.lost.set()
        if self.lost.is_set():
            raise ClaimLostError(
                f"{self.what}: the claim on {self.folder} was taken over by another run after "
                f"this one did not renew it for {self.ttl:g} s; its results are not committed"
            )

    def release(self) -> None:
        """Stop renewing and remove the claim (unless it was lost: then it is not ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set():
            self.storage.rm(self.url)


def _run_logger() -> Any:
    """The flow or task run's logger (the UI shows who a run waits for), else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def acquire(
    storage: Storage, folder: str, what: str, *, ttl: float = TTL_S, poll: float = POLL_S
) -> Claim:
    """Claim ``folder`` for this run, waiting while another live run holds it and taking over
    a claim whose holder stopped renewing it."""
    claim = Claim(storage, folder, what, ttl=ttl)
    logged = 0.0
    while True:
        current = current_claim(storage, folder)
        if current is None or current.expired:
            if current is not None:
                _run_logger().warning(
                    "%s: taking over the expired claim of %s on %s", what, current.owner, folder
                )
            generation = 1 if current is None else current.generation + 1
            if claim.try_acquire(generation):
                return claim
            continue
        if time.monotonic() - logged > WAIT_LOG_S:
            _run_logger().info(
                "%s: waiting for %s, which holds %s (until it finishes, or its claim expires "
                "%.0f s after its last renewal)",
                what,
                current.owner,
                folder,
                ttl,
            )
            logged = time.monotonic()
        time.sleep(poll)


@contextmanager
def claimed(
    storage: Storage, folder: str, what: str, *, ttl: float = TTL_S, poll: float = POLL_S
) -> Iterator[Claim]:
    """Hold the claim on ``folder`` for the duration of the block (see :func:`acquire`)."""
    claim = acquire(storage, folder, what, ttl=ttl, poll=poll)
    try:
        yield claim
    finally:
        claim.release()
