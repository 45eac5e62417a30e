"""What a result was made from, so a report read months later says which model, data and code
produced its numbers: the checkpoint (URL and content hash), the dataset version and the code
version. Every metrics.json and report.md carries one :class:`Provenance`."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata as package_metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.storage import Storage
from tasks.versions import content_sha256

PACKAGE = "lesa"
_SOURCE = Path(__file__).resolve().parent


class Provenance(BaseModel):
    """The inputs of one evaluation, as recorded in its report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str
    """URL of the checkpoint scored."""
    checkpoint_sha256: str
    training_key: str
    """The training key recorded in the checkpoint (what it was trained from)."""
    model_version: str | None = None
    """The model version the checkpoint belongs to (``tasks.model_versions``), when known."""
    dataset: str
    dataset_version: str | None
    """Content version of the dataset's stored tables (``DatasetTables.version``)."""
    feature_key: str
    code_version: str

    def markdown(self) -> list[str]:
        """The report's provenance lines."""
        rows = [
            ("checkpoint", f"`{self.checkpoint}`"),
            ("checkpoint sha256", f"`{self.checkpoint_sha256}`"),
            ("training key", f"`{self.training_key}`"),
            *([("model version", f"`{self.model_version}`")] if self.model_version else []),
            ("dataset", f"{self.dataset}, version `{self.dataset_version or 'unknown'}`"),
            ("features", f"`{self.feature_key}`"),
            ("code", f"`{self.code_version}`"),
        ]
        return [
            "| input | value |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows),
        ]


def checkpoint_sha256(storage: Storage, url: str) -> str:
    """SHA-256 of a checkpoint's bytes (cached by the object's stamp, so asking twice reads
    it once).

    Raises:
        FileNotFoundError: nothing at ``url``.
    """
    found = content_sha256(storage, [url])[0]
    if found is None:
        raise FileNotFoundError(f"checkpoint not found: {url}")
    return found


@functools.cache
def code_version() -> str:
    """``git:<commit>`` of the checkout this code runs from (``-dirty`` with uncommitted
    changes to tracked files), else ``lesa <package version>`` (an installed copy)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return f"{PACKAGE} {_package_version()}"
    return f"git:{commit}{'-dirty' if dirty else ''}"


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(_SOURCE), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return done.stdout.strip()


def _package_version() -> str:
    try:
        return package_metadata.version(PACKAGE)
    except package_metadata.PackageNotFoundError:
        return "unknown"
