"""Region-feature extraction, the driver side: label table -> sharded HDF5 features on Dask.

Each shard (``shard_size`` consecutive images of the label table) is one Dask task
(:func:`tasks.feature_worker.extract_shard`) that writes, uploads and verifies one HDF5 file and
returns its manifest row. The driver commits rows as shards finish, rewriting the manifest
atomically each time, so a crash or a killed worker leaves only verified shards listed.

A rerun skips every listed shard whose file still matches its row (size, sha256), whose image
ids are still the ones the table puts in that shard and whose images are still the files it read
(their stamps, :func:`tasks.versions.stamps`: an image fixed or replaced in place, or one that
was missing and now exists, recomputes its shard), and recomputes the rest. Features never
depend on labels: the feature key (:func:`tasks.feature_config.feature_key`) names everything
that changes the features, and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from distributed import Client, LocalCluster, as_completed
from tqdm.auto import tqdm

from tasks import schemas
from tasks.claims import claimed
from tasks.feature_config import DaskConfig, FeatureIdentity, FeaturesConfig, feature_key
from tasks.feature_shards import MANIFEST_NAME, REJECTS_NAME, shard_name
from tasks.feature_worker import (
    ExtractionError,
    ShardPlan,
    ShardResult,
    extract_shard_on_worker,
)
from tasks.images import resolve_uri
from tasks.progress import RunProgress
from tasks.retries import is_transient, retrying_task
from tasks.storage import Storage
from tasks.versions import digest, stamps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    """Where an extracted feature set lives, what computed it, and the shape of its features."""

    manifest_url: str
    rejects_url: str
    identity: FeatureIdentity
    regions: int
    dim: int
    grid: tuple[int, int]
    num_images: int

    @property
    def key(self) -> str:
        """The feature key (``<backbone>-<hash>``) of :attr:`identity`."""
        return feature_key(self.identity)


def plan_shards(
    label_table: pd.DataFrame, images_prefix: str, shard_size: int, out_prefix: str
) -> list[ShardPlan]:
    """Cut the table (in its row order) into shards of ``shard_size`` images."""
    ids = label_table["image_id"].astype(str).tolist()
    uris = [resolve_uri(str(u), images_prefix) for u in label_table["uri"]]
    return [
        ShardPlan(
            index=number,
            image_ids=tuple(ids[start : start + shard_size]),
            uris=tuple(uris[start : start + shard_size]),
            shard_uri=f"{out_prefix.rstrip('/')}/{shard_name(number)}",
        )
        for number, start in enumerate(range(0, len(ids), shard_size))
    ]


def with_image_versions(plans: list[ShardPlan], storage: Storage) -> list[ShardPlan]:
    """``plans`` with each shard's ``images_sha256``: the digest of its images' stamps, taken
    before extraction reads them (so a file rewritten meanwhile shows as changed next time)."""
    uris = [uri for plan in plans for uri in plan.uris]
    found = iter(stamps(storage, uris))
    return [
        dataclasses.replace(
            plan, images_sha256=digest(f"{uri}\t{next(found)}" for uri in plan.uris)
        )
        for plan in plans
    ]


@contextlib.contextmanager
def dask_client(config: DaskConfig) -> Iterator[Client]:
    """A client for the configured scheduler, or for a LocalCluster started (and closed) here.

    The local scheduler's HTTP server always takes a free port (":0"), so two pipelines on one
    machine never fight over 8787; it serves the dashboard only when asked and bokeh is present.
    """
    if config.address:
        with Client(config.address) as client:
            yield client
        return
    dashboard = config.dashboard and importlib.util.find_spec("bokeh") is not None
    if config.dashboard and not dashboard:
        log.warning("Dask dashboard disabled: the bokeh package is not installed")
    with (
        LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=config.processes,
            host="127.0.0.1" if config.processes else None,
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": dashboard},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one (Linux, so a
    container's CPU set counts), else every core (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _threads_by_host(client: Client) -> dict[str, int]:
    """Torch threads per task on each host, so tasks together use the host's cores once."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(usable_cores)
    task_slots: dict[str, int] = {}
    host_cores: dict[str, int] = {}
    for address, info in workers.items():
        host = urlparse(address).hostname or ""
        task_slots[host] = task_slots.get(host, 0) + int(info["nthreads"])
        host_cores[host] = int(cores.get(address, 1))
    return {host: max(1, host_cores[host] // slots) for host, slots in task_slots.items()}


def _dashboard_link(client: Client, config: DaskConfig) -> str | None:
    """The dashboard URL when the scheduler serves one (its HTTP port exists even without it,
    so ask the scheduler whether it has bokeh)."""
    if not config.dashboard:
        return None
    has_bokeh = client.run_on_scheduler(lambda: importlib.util.find_spec("bokeh") is not None)
    return client.dashboard_link if has_bokeh else None


def _shard_is_valid(
    row: pd.Series, plan: ShardPlan, config: FeaturesConfig, storage: Storage
) -> bool:
    """Whether a manifest row still describes this plan's shard, byte for byte."""
    expected = {
        "shard_uri": plan.shard_uri,
        "ids_sha256": plan.ids_sha256,
        "images_sha256": plan.images_sha256,
        "backbone": config.backbone,
        "preprocessing": config.preprocessing_id,
        "dtype": config.dtype,
    }
    if any(str(row.get(column)) != value for column, value in expected.items()):
        return False
    if not storage.exists(plan.shard_uri) or storage.size(plan.shard_uri) != row["size_bytes"]:
        return False
    return storage.sha256(plan.shard_uri) == row["sha256"]


def _read_table(storage: Storage, url: str, model: type) -> pd.DataFrame:
    """A validated table from storage, or an empty one of that schema if none exists yet."""
    if not storage.exists(url):
        return schemas.empty(model)
    return schemas.validate(storage.read_parquet(url), model, stage="features")


def _committed_shards(
    storage: Storage, manifest_url: str, plans: list[ShardPlan], config: FeaturesConfig
) -> dict[int, dict[str, Any]]:
    """Rows of the existing manifest that still verify, by shard index."""
    manifest = _read_table(storage, manifest_url, schemas.FeatureManifest)
    by_index = {plan.index: plan for plan in plans}
    rows = [row for _, row in manifest.iterrows() if int(row["shard_index"]) in by_index]

    def verify(row: pd.Series) -> bool:
        return _shard_is_valid(row, by_index[int(row["shard_index"])], config, storage)

    with ThreadPoolExecutor(max_workers=8) as pool:
        valid = list(
            tqdm(
                pool.map(verify, rows),
                total=len(rows),
                desc="verifying shards",
                unit="shard",
                disable=not rows,
            )
        )
    return {
        int(row["shard_index"]): row.to_dict() for row, ok in zip(rows, valid, strict=True) if ok
    }


def _committed_rejects(
    storage: Storage, rejects_url: str, plans: list[ShardPlan], committed: set[int]
) -> dict[int, list[dict[str, str]]]:
    """Existing rejects rows of the committed shards, by shard index."""
    previous = _read_table(storage, rejects_url, schemas.Rejects)
    shard_of = {i: plan.index for plan in plans if plan.index in committed for i in plan.image_ids}
    by_shard: dict[int, list[dict[str, str]]] = {}
    for row in previous.to_dict("records"):
        if row["image_id"] in shard_of:
            by_shard.setdefault(shard_of[row["image_id"]], []).append(row)
    return by_shard


def _frame(rows: list[dict[str, Any]], model: type) -> pd.DataFrame:
    """Validated table of ``rows`` (an empty, correctly typed table when there are none)."""
    frame = pd.DataFrame(rows) if rows else schemas.empty(model)
    return schemas.validate(frame, model, stage="features")


@dataclass
class _Committer:
    """Keeps the manifest and rejects tables in storage in step with finished shards."""

    storage: Storage
    manifest_url: str
    rejects_url: str
    rows: dict[int, dict[str, Any]]
    rejects: dict[int, list[dict[str, str]]]

    def commit(self, result: ShardResult | None = None) -> None:
        """Record ``result`` (if any), then rewrite rejects, then the manifest, atomically.

        Rejects go first: a crash in between leaves rejects of an unlisted shard, which the
        rerun replaces, never a listed shard with its rejects missing.
        """
        if result is not None:
            index = int(result.manifest_row["shard_index"])
            self.rows[index] = result.manifest_row
            self.rejects[index] = result.rejects
        rejects = [row for index in sorted(self.rejects) for row in self.rejects[index]]
        self.storage.write_parquet(self.rejects_url, _frame(rejects, schemas.Rejects))
        manifest = [self.rows[index] for index in sorted(self.rows)]
        self.storage.write_parquet(self.manifest_url, _frame(manifest, schemas.FeatureManifest))


def extract_features(
    label_table: pd.DataFrame,
    images_prefix: str,
    config: FeaturesConfig,
    storage: Storage,
    out_prefix: str,
) -> FeatureSet:
    """Extract (or finish extracting) the features of every image in ``label_table``.

    ``images_prefix`` is the URL relative image URIs hang under; ``out_prefix`` is the feature
    set's folder URL (see :func:`features_prefix`). Shards already committed and verified are
    kept; the others run as Dask tasks. Raises :class:`ExtractionError` after committing every
    shard that did finish, if any failed.
    """
    table = schemas.validate(label_table, schemas.LabelTable, stage="features")
    out_prefix = out_prefix.rstrip("/")
    manifest_url = f"{out_prefix}/{MANIFEST_NAME}"
    rejects_url = f"{out_prefix}/{REJECTS_NAME}"
    plans = plan_shards(table, images_prefix, config.shard_size, out_prefix)
    plans = with_image_versions(plans, storage)
    # One run extracts into a feature set at a time; the others then reuse its shards.
    with claimed(storage, out_prefix, "feature extraction"):
        rows = _committed_shards(storage, manifest_url, plans, config)
        rejects = _committed_rejects(storage, rejects_url, plans, set(rows))
        committer = _Committer(storage, manifest_url, rejects_url, rows, rejects)
        committer.commit()
        todo = [plan for plan in plans if plan.index not in rows]
        if todo:
            _preflight(config, storage)
            log.info("extracting %d of %d shards into %s", len(todo), len(plans), out_prefix)
            _run_shards(todo, len(plans), config, storage, committer)
    _log_rejects(committer.rejects)
    return FeatureSet(
        manifest_url=manifest_url,
        rejects_url=rejects_url,
        identity=config.identity(),
        regions=config.choice.regions,
        dim=config.dim,
        grid=config.grid,
        num_images=sum(int(row["num_images"]) for row in committer.rows.values()),
    )


def _log_rejects(rejects: dict[int, list[dict[str, str]]]) -> None:
    """Say on the console (and the run's log) how many images have no features, and why."""
    reasons = Counter(row["reason"] for rows in rejects.values() for row in rows)
    if reasons:
        log.warning(
            "%d image(s) rejected, left out of training and evaluation: %s",
            sum(reasons.values()),
            ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()),
        )


def _preflight(config: FeaturesConfig, storage: Storage) -> None:
    """Build the backbone once here before any task starts: bad or unobtainable weights fail
    with one clear error instead of one per shard, and a download (torchvision's VGG-19) lands
    in the shared cache once instead of racing in every local worker."""
    config.build_backbone(storage.local_copy)


def _run_shards(
    todo: list[ShardPlan],
    total: int,
    config: FeaturesConfig,
    storage: Storage,
    committer: _Committer,
) -> None:
    """Run ``todo`` as Dask tasks, committing each finished shard at once; progress counts every
    one of the feature set's ``total`` shards, those reused from earlier runs included."""
    failures: list[str] = []
    errors: list[BaseException] = []
    with dask_client(config.dask) as client:
        link = _dashboard_link(client, config.dask)
        if link:
            tqdm.write(f"Dask dashboard: {link}")
        threads = _threads_by_host(client)
        futures = {
            client.submit(extract_shard_on_worker, plan, config, storage, threads, pure=False): plan
            for plan in todo
        }
        finished = total - len(todo)
        progress = tqdm(total=total, initial=finished, desc="feature shards", unit="shard")
        on_run = RunProgress("feature shards")
        on_run(finished, total)
        for future in as_completed(futures):
            plan = futures[future]
            try:
                committer.commit(future.result())
            except Exception as error:  # one shard's failure must not lose the others
                errors.append(error)
                failures.append(
                    f"shard {plan.index} ({plan.shard_uri}): {type(error).__name__}: {error}"
                )
                log.error("shard %d failed: %s", plan.index, error)
            finished += 1
            progress.update()
            on_run(finished, total)
        progress.close()
    if failures:
        failed = ExtractionError(
            f"{len(failures)} of {len(todo)} shards failed (the rest are committed; rerun to "
            "retry):\n" + "\n".join(failures)
        )
        failed.transient = all(is_transient(error) for error in errors)
        raise failed


extract_features_task = retrying_task("extract-features", retries=1)(extract_features)
