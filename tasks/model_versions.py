"""Model versions: every training run that is not a reuse adds one; none is replaced in place.

    runs/<run>/models/v0001/checkpoints/  step-*.pt, best.pt, final.pt, training.json
    runs/<run>/models/v0001/version.json  ModelVersion: flow run, config hash, data version,
                                          metrics, checkpoints (written when training finishes)
    runs/<run>/models/latest.json         pointer: the version the last training stage ended
                                          with (trained or reused)
    runs/<run>/models/best.json           pointer: the version with the highest validation
                                          selection metric (``train.select``)

A version folder holds one training key: a rerun with the same inputs reuses its finished
version (or resumes it, if it crashed), other inputs train the next version, and the earlier
ones stay for comparison and rollback until :func:`prune` removes them. Numbering is safe
because training holds the run folder's claim (:mod:`tasks.claims`) while it picks a version.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prefect import runtime
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.checkpoints import CHECKPOINTS_DIR, run_prefix
from tasks.storage import Storage

MODELS_DIR = "models"
VERSION_FILE = "version.json"
RECORD_FILE = "training.json"
POINTERS = ("latest", "best")
_VERSION = re.compile(r"v\d{4,}")


class ModelVersionError(LookupError):
    """A model version or pointer that does not exist; the message lists those that do."""


class ModelVersion(BaseModel):
    """One trained model: what made it, how it scored on validation, where its checkpoints are."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: str
    run_name: str
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    created_at: str
    training_key: str
    config_hash: str
    """Hash of the model, loss and train sections alone (the training key adds the data)."""
    dataset: str
    data_version: str | None
    feature_key: str
    steps: int
    select_metric: float | None
    """The validation score ``train.select`` picked the best checkpoint by (None: no val)."""
    metrics: dict[str, Any]
    checkpoints: dict[str, str]


def models_prefix(storage: Storage, run_name: str) -> str:
    return f"{run_prefix(storage, run_name)}/{MODELS_DIR}"


def checkpoints_prefix(storage: Storage, run_name: str, version: str) -> str:
    """``runs/<run>/models/<version>/checkpoints``: where that version's trainer writes."""
    return f"{models_prefix(storage, run_name)}/{version}/{CHECKPOINTS_DIR}"


def version_ids(storage: Storage, run_name: str) -> list[str]:
    """Every version folder that has a training record (finished or not), oldest first."""
    prefix = models_prefix(storage, run_name)
    found = set()
    for url in storage.ls(prefix, recursive=True):
        parts = url.removeprefix(prefix).strip("/").split("/")
        if (
            len(parts) == 3
            and _VERSION.fullmatch(parts[0])
            and parts[1:]
            == [
                CHECKPOINTS_DIR,
                RECORD_FILE,
            ]
        ):
            found.add(parts[0])
    return sorted(found, key=lambda version: int(version[1:]))


def version_for_key(storage: Storage, run_name: str, training_key: str) -> str:
    """The newest version trained (or being trained) with ``training_key``, else the next
    number: a rerun of the same inputs reuses or resumes its version instead of adding one."""
    ids = version_ids(storage, run_name)
    for version in reversed(ids):
        url = f"{checkpoints_prefix(storage, run_name, version)}/{RECORD_FILE}"
        if storage.read_json(url).get("training_key") == training_key:
            return version
    return f"v{int(ids[-1][1:]) + 1 if ids else 1:04d}"


def flow_run() -> dict[str, str | None]:
    """The Prefect flow run training runs in (None outside one)."""
    return {"flow_run_id": runtime.flow_run.id, "flow_run_name": runtime.flow_run.name}


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version_url(storage: Storage, run_name: str, version: str) -> str:
    return f"{models_prefix(storage, run_name)}/{version}/{VERSION_FILE}"


def _pointer_url(storage: Storage, run_name: str, name: str) -> str:
    return f"{models_prefix(storage, run_name)}/{name}.json"


def versions(storage: Storage, run_name: str) -> list[ModelVersion]:
    """Every finished version of a run, oldest first."""
    found = []
    for version in version_ids(storage, run_name):
        url = _version_url(storage, run_name, version)
        if storage.exists(url):
            try:
                found.append(ModelVersion.model_validate(storage.read_json(url)))
            except ValidationError as error:
                raise ModelVersionError(f"{url} is not a model version record: {error}") from None
    return found


def pointer(storage: Storage, run_name: str, name: str) -> str | None:
    """The version a pointer (``latest``, ``best``) names; None before the first version."""
    url = _pointer_url(storage, run_name, name)
    return str(storage.read_json(url)["version"]) if storage.exists(url) else None


def record(storage: Storage, version: ModelVersion, *, new: bool) -> None:
    """Point ``latest`` at ``version`` (writing its record first if ``new``) and ``best`` at
    the version with the highest validation selection metric (ties: the newer)."""
    run_name = version.run_name
    if new or not storage.exists(_version_url(storage, run_name, version.version)):
        storage.write_json(
            _version_url(storage, run_name, version.version), version.model_dump(mode="json")
        )
    storage.write_json(_pointer_url(storage, run_name, "latest"), {"version": version.version})
    scored = [v for v in versions(storage, run_name) if v.select_metric is not None]
    best = max(scored, key=lambda v: (v.select_metric, int(v.version[1:])), default=version)
    storage.write_json(_pointer_url(storage, run_name, "best"), {"version": best.version})


def resolve(storage: Storage, run_name: str, name: str = "latest") -> ModelVersion:
    """A version by id (``v0003``) or pointer (``latest``, ``best``).

    Raises:
        ModelVersionError: no such version or pointer; the message lists the versions there.
    """
    known = {v.version: v for v in versions(storage, run_name)}
    version = pointer(storage, run_name, name) if name in POINTERS else name
    if version in known:
        return known[version]
    available = ", ".join(known) or "none: train first (python -m flows.full_pipeline)"
    raise ModelVersionError(
        f"run {run_name}: no model version {name!r} under {models_prefix(storage, run_name)} "
        f"(versions: {available})"
    )


def prune(storage: Storage, run_name: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest finished versions, never one a pointer names nor an
    unfinished one (it may be resumed); return the versions removed.

    The caller holds the run's training claim, so no training picks a version meanwhile.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    finished = [v.version for v in versions(storage, run_name)]
    kept = set(finished[-keep:]) | {pointer(storage, run_name, name) for name in POINTERS}
    removed = [version for version in finished if version not in kept]
    for version in removed:
        # File by file: nanio cannot delete a prefix holding deeper "folders" in one call.
        for url in storage.ls(f"{models_prefix(storage, run_name)}/{version}", recursive=True):
            storage.rm(url)
    return removed


def table(found: Sequence[ModelVersion], pointers: dict[str, str | None]) -> list[str]:
    """Lines listing versions with their pointers, for the ``flows.models`` command."""
    lines = []
    for v in found:
        marks = ",".join(name for name, target in pointers.items() if target == v.version)
        metric = "-" if v.select_metric is None else f"{v.select_metric:.4f}"
        lines.append(
            f"{v.version}  {v.created_at}  steps {v.steps}  val {metric}  data "
            f"{v.data_version or '-'}  config {v.config_hash}  {v.flow_run_name or '-'}"
            f"{'  <- ' + marks if marks else ''}"
        )
    return lines
