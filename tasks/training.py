"""Training stage: LESA on the seen labels of the train split, checkpoints kept in storage.

The trainer writes checkpoints to a local folder; for remote storage a background thread
mirrors that folder to ``runs/<run>/checkpoints/`` (every checkpoint is uploaded verified),
and a restarted run downloads the latest ones first and resumes from them. For a local
storage root the trainer writes straight into the storage folder.

A run is recognised by its *training key*: a hash of everything that changes the trained
weights (model, loss and trainer sections, feature key and the stored bytes of the shards
trained on, seen labels and their vectors, the train/val images and their seen-label
annotations). A finished run with the same key is reused
as it is. Unseen labels are not part of the key, so adding unseen labels to the vocabulary
reuses the trained model, and evaluation scores them zero-shot.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from lesa_model.config import ModelConfig
from lesa_model.model import LESA
from lesa_model.trainer import Trainer
from tasks import schemas
from tasks.datasets import DatasetArtifacts
from tasks.datasets.base import check_usable
from tasks.embeddings import EmbeddingResult
from tasks.feature_config import feature_key
from tasks.feature_reader import FeatureBatches, FeatureStore
from tasks.features import FeatureSet
from tasks.hashing import array_digest, content_hash
from tasks.progress import RunProgress
from tasks.retries import retrying_task
from tasks.storage import Storage, is_local

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
RECORD_FILE = "training.json"
"""Written next to the checkpoints: the training key, status and checkpoint URLs."""
SYNC_INTERVAL_S = 15.0


# -- label tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetTables:
    """A prepared dataset's validated tables, as the training and evaluation stages use them."""

    name: str
    labels: pd.DataFrame
    vocabulary: pd.DataFrame
    images_prefix: str
    boxes: pd.DataFrame | None = None

    @property
    def seen_labels(self) -> list[str]:
        return self.vocabulary.loc[self.vocabulary["seen"], "label"].astype(str).tolist()

    @property
    def unseen_labels(self) -> list[str]:
        return self.vocabulary.loc[~self.vocabulary["seen"], "label"].astype(str).tolist()

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split (``train``, ``val``, ``test``), in table order."""
        return self.labels[self.labels["split"] == name]


def load_tables(storage: Storage, dataset: DatasetArtifacts) -> DatasetTables:
    """Read and validate the label table, vocabulary and boxes of a prepared dataset.

    This is the stage boundary before features and training: a table that does not match its
    schema, or a dataset a run cannot use (no seen or unseen labels, no train or test images),
    stops the run here, naming the file, column, rule and example rows.
    """
    vocabulary = schemas.read_validated(
        storage, dataset.vocabulary_url, schemas.Vocabulary, stage="label table"
    )
    labels = schemas.read_validated(
        storage,
        dataset.label_table_url,
        schemas.LabelTable,
        stage="label table",
        vocabulary=vocabulary,
    )
    check_usable(dataset.name, labels, vocabulary)
    boxes = None
    if dataset.boxes_url is not None:
        boxes = schemas.read_validated(
            storage, dataset.boxes_url, schemas.ObjectBoxes, stage="label table"
        )
    return DatasetTables(
        name=dataset.name,
        labels=labels.reset_index(drop=True),
        vocabulary=vocabulary.reset_index(drop=True),
        images_prefix=dataset.images_prefix,
        boxes=boxes,
    )


load_tables_task = retrying_task("validate-label-table", retries=2, cache_policy=NO_CACHE)(
    load_tables
)


def embedded(labels: Sequence[str], embeddings: EmbeddingResult) -> list[str]:
    """``labels`` that have a vector (``embeddings.oov: drop`` may have dropped some)."""
    known = set(embeddings.embeddings["label"].astype(str))
    return [label for label in labels if label in known]


def split_source(
    tables: DatasetTables, store: FeatureStore, split: str, labels: Sequence[str]
) -> FeatureBatches | None:
    """Batches of one split's images that have features (rejected images are skipped)."""
    rows = tables.split(split)
    rows = rows[rows["image_id"].isin(store.index.index)]
    if rows.empty:
        return None
    matrix = schemas.label_matrix(rows, labels)
    return FeatureBatches(store, rows["image_id"].astype(str).tolist(), matrix)


# -- the training record ---------------------------------------------------------------------


class TrainingOutcome(BaseModel):
    """What the training stage hands to evaluation: where the checkpoints are, and how."""

    model_config = ConfigDict(frozen=True)

    run_name: str
    training_key: str
    checkpoints: dict[str, str]
    reused: bool
    resumed_from: str | None = None
    steps: int
    seen_labels: list[str]
    unseen_labels: list[str]
    """Unseen labels at training time (for telling which ones arrived later)."""
    new_unseen_labels: list[str] = []
    """Unseen labels in the current vocabulary that were not there when the model trained."""
    result: dict[str, Any] = {}

    def describe(self) -> list[str]:
        """Human-readable lines for the run summary."""
        if self.reused:
            lines = [
                f"Training: reused the finished run `{self.run_name}` "
                f"(training key {self.training_key}, {self.steps} steps); no retraining needed"
            ]
        else:
            start = f", resumed from {self.resumed_from}" if self.resumed_from else ""
            lines = [f"Training: {self.steps} steps on {len(self.seen_labels)} seen labels{start}"]
        if self.new_unseen_labels:
            shown = ", ".join(self.new_unseen_labels[:10])
            more = ", …" if len(self.new_unseen_labels) > 10 else ""
            lines.append(
                f"Only unseen labels changed since training: {len(self.new_unseen_labels)} new "
                f"unseen label(s) ({shown}{more}) scored zero-shot without retraining"
            )
        return lines


def training_key(
    config: PipelineConfig,
    model_config: ModelConfig,
    seen: Sequence[str],
    vectors: np.ndarray,
    train: FeatureBatches,
    val: FeatureBatches | None,
) -> str:
    """Hash of everything that changes the trained weights (unseen labels do not), including
    the stored bytes of every feature shard the train and val images are read from, so features
    recomputed for an image fixed or replaced in place retrain."""
    split_digests = [
        array_digest(source.image_ids, source.labels) if source is not None else None
        for source in (train, val)
    ]
    store = train.store
    used = store.index.loc[[*train.image_ids, *(val.image_ids if val else [])], "shard"]
    shards = store.manifest.set_index("shard_index").loc[sorted(set(used)), "sha256"]
    parts = [
        model_config,
        config.loss,
        config.train,
        feature_key(config.features),
        config.embeddings.source.identity,
        list(seen),
        array_digest(np.round(vectors.astype(np.float64), 6)),
        split_digests,
        shards.tolist(),
    ]
    return content_hash(parts, 16)


# -- checkpoint mirroring --------------------------------------------------------------------


class CheckpointMirror:
    """Mirror a local checkpoint folder to a storage prefix, in the background and at the end.

    Finished checkpoint files (``*.pt``; the trainer writes them atomically under a temporary
    name first) are uploaded when new or changed; step checkpoints the trainer pruned locally
    are removed remotely too, so storage holds what the local folder holds.
    """

    def __init__(
        self, storage: Storage, local_dir: Path, prefix: str, interval: float = SYNC_INTERVAL_S
    ) -> None:
        self.storage = storage
        self.local_dir = local_dir
        self.prefix = prefix.rstrip("/")
        self.interval = interval
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)

    def __enter__(self) -> CheckpointMirror:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except OSError as error:  # transient storage trouble: the next sync retries
                logger.warning("checkpoint upload failed, will retry: %s", error)

    def sync(self) -> None:
        """Upload new or changed checkpoints; delete remote step files gone locally."""
        with self._lock:
            present = {}
            for path in sorted(self.local_dir.glob("*.pt")):
                if path.name.startswith("."):
                    continue
                stat = path.stat()
                present[path.name] = (stat.st_size, stat.st_mtime_ns)
                if self._uploaded.get(path.name) != present[path.name]:
                    self.storage.upload_file(path, f"{self.prefix}/{path.name}")
                    self._uploaded[path.name] = present[path.name]
            for name in list(self._uploaded):
                if name not in present and name.startswith("step-"):
                    self.storage.rm(f"{self.prefix}/{name}")
                    del self._uploaded[name]


def run_prefix(storage: Storage, run_name: str, baseline: str | None = None) -> str:
    """``runs/<run>``, or ``runs/<run>/baselines/<baseline>`` for a baseline model."""
    parts = ("runs", run_name, *(("baselines", baseline) if baseline else ()))
    return storage.url(*parts)


def checkpoint_url(storage: Storage, run_name: str, which: str, baseline: str | None = None) -> str:
    """URL of a run's ``best`` or ``final`` checkpoint."""
    return f"{run_prefix(storage, run_name, baseline)}/{CHECKPOINTS_DIR}/{which}.pt"


def _local_checkpoint_dir(storage: Storage, prefix: str, key: str) -> Path:
    if is_local(storage.root):
        return Path(prefix.removeprefix("file://"))
    return (
        storage.cache_dir / "checkpoints" / hashlib.sha256(prefix.encode()).hexdigest()[:16] / key
    )


def _fetch_for_resume(storage: Storage, prefix: str, local_dir: Path) -> str | None:
    """Download the remote checkpoints (latest step, best) into ``local_dir``; name the latest."""
    remote = [url for url in storage.ls(prefix) if url.endswith(".pt")]
    steps = sorted(url for url in remote if url.rsplit("/", 1)[-1].startswith("step-"))
    wanted = [url for url in remote if url.rsplit("/", 1)[-1] in ("best.pt",)] + steps[-1:]
    for url in wanted:
        target = local_dir / url.rsplit("/", 1)[-1]
        if not target.exists() or target.stat().st_size != storage.size(url):
            storage.download_file(url, target)
    return steps[-1].rsplit("/", 1)[-1] if steps else None


def _clear(storage: Storage, prefix: str, local_dir: Path) -> None:
    """Remove checkpoints of a different training key (they cannot be resumed from)."""
    for url in storage.ls(prefix):
        if url.endswith(".pt"):
            storage.rm(url)
    if local_dir.exists():
        for path in local_dir.glob("*.pt"):
            path.unlink()


# -- the stage -------------------------------------------------------------------------------


def train_model(
    config: PipelineConfig,
    storage: Storage,
    *,
    tables: DatasetTables,
    features: FeatureSet,
    embeddings: EmbeddingResult,
    model_config: ModelConfig | None = None,
    baseline: str | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> TrainingOutcome:
    """Train LESA (or reuse a finished identical run) and return its checkpoint URLs.

    ``model_config`` and ``baseline`` let the same stage train a baseline model (e.g. the
    mean-pool one) into ``runs/<run>/baselines/<baseline>/``. ``progress`` receives the trainer's
    history records (step, losses, validation scores) as they happen.
    """
    model_config = model_config or config.model
    prefix = run_prefix(storage, config.run_name, baseline)
    checkpoints_prefix = f"{prefix}/{CHECKPOINTS_DIR}"
    record_url = f"{checkpoints_prefix}/{RECORD_FILE}"

    seen = embedded(tables.seen_labels, embeddings)
    unseen = embedded(tables.unseen_labels, embeddings)
    if not seen:
        raise ValueError("no seen label has a word vector: nothing to train on")
    vectors = embeddings.vectors(seen)
    store = FeatureStore(features.manifest_url, storage)
    train = split_source(tables, store, "train", seen)
    if train is None:
        raise ValueError(f"dataset {tables.name}: no train image has features")
    val = split_source(tables, store, "val", seen)
    key = training_key(config, model_config, seen, vectors, train, val)

    record = storage.read_json(record_url) if storage.exists(record_url) else None
    if (
        record
        and record.get("training_key") == key
        and record.get("status") == "finished"
        and all(storage.exists(url) for url in record["checkpoints"].values())
    ):
        logger.info("training %s: finished run with key %s found; reusing it", prefix, key)
        previous_unseen = set(record.get("unseen_labels", []))
        return TrainingOutcome(
            run_name=config.run_name,
            training_key=key,
            checkpoints=record["checkpoints"],
            reused=True,
            steps=int(record.get("steps", 0)),
            seen_labels=seen,
            unseen_labels=record.get("unseen_labels", []),
            new_unseen_labels=[label for label in unseen if label not in previous_unseen],
            result=record.get("result", {}),
        )

    local_dir = _local_checkpoint_dir(storage, checkpoints_prefix, key)
    if record and record.get("training_key") != key:
        logger.warning(
            "training %s: inputs changed since the checkpoints there were written (key %s -> "
            "%s); starting from scratch",
            prefix,
            record.get("training_key"),
            key,
        )
        _clear(storage, checkpoints_prefix, local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = None
    if record and record.get("training_key") == key and not is_local(storage.root):
        resumed_from = _fetch_for_resume(storage, checkpoints_prefix, local_dir)
    elif record and record.get("training_key") == key:
        steps = sorted(local_dir.glob("step-*.pt"))
        resumed_from = steps[-1].name if steps else None

    metadata = {
        "run_name": config.run_name,
        "training_key": key,
        "dataset": tables.name,
        "seen_labels": seen,
        "unseen_labels": unseen,
        "embedding_source": config.embeddings.source.identity,
        "embedding_dim": int(vectors.shape[1]),
        "feature_key": feature_key(config.features),
        "features": config.features.identity().model_dump(mode="json"),
        "backbone": config.features.backbone,
        "preprocessing": config.features.preprocessing_id,
        "image_size": config.features.image_size,
        "grid": list(features.grid),
    }
    base_record = {"training_key": key, "config": config.model_dump(mode="json"), **metadata}
    storage.write_json(record_url, {**base_record, "status": "running"})

    with torch.random.fork_rng():
        # The initial weights come from train.seed, not from whatever drew on the global RNG
        # before this stage: the same config and data give the same model in any process.
        torch.manual_seed(config.train.seed)
        model = LESA(features.dim, int(vectors.shape[1]), model_config, grid=features.grid)
    trainer = Trainer(
        model,
        torch.from_numpy(vectors),
        config.train,
        config.loss,
        local_dir,
        metadata=metadata,
        progress=progress,
        val_ks=config.evaluation.ks,
    )
    if is_local(storage.root):
        result = trainer.fit(train, val)
    else:
        with CheckpointMirror(storage, local_dir, checkpoints_prefix):
            result = trainer.fit(train, val)

    final_url = f"{checkpoints_prefix}/final.pt"
    if not storage.exists(final_url):
        raise RuntimeError(f"training finished but {final_url} was not written")
    best_url = f"{checkpoints_prefix}/best.pt"
    # Without a validation split there is no best model: the final one stands in for it.
    checkpoints = {"final": final_url, "best": best_url if result.best_checkpoint else final_url}
    summary = {
        "final_step": result.final_step,
        "best_step": result.best_step,
        "best_metric": result.best_metric,
        "last": result.history[-1] if result.history else {},
    }
    storage.write_json(
        record_url,
        {
            **base_record,
            "status": "finished",
            "checkpoints": checkpoints,
            "steps": result.final_step,
            "result": summary,
        },
    )
    return TrainingOutcome(
        run_name=config.run_name,
        training_key=key,
        checkpoints=checkpoints,
        reused=False,
        resumed_from=resumed_from,
        steps=result.final_step,
        seen_labels=seen,
        unseen_labels=unseen,
        result=summary,
    )


@retrying_task("train", retries=1, cache_policy=NO_CACHE)
def train_model_task(
    config: PipelineConfig,
    storage: Storage,
    *,
    tables: DatasetTables,
    features: FeatureSet,
    embeddings: EmbeddingResult,
    model_config: ModelConfig | None = None,
    baseline: str | None = None,
) -> TrainingOutcome:
    """Prefect wrapper of :func:`train_model`; a retry resumes from the last checkpoint.

    Training progress shows in the UI as a progress artifact.
    """
    reporter = _ProgressArtifact(
        config.train.steps, f"training {config.run_name} {baseline or 'LESA'}"
    )
    return train_model(
        config,
        storage,
        tables=tables,
        features=features,
        embeddings=embeddings,
        model_config=model_config,
        baseline=baseline,
        progress=reporter,
    )


class _ProgressArtifact:
    """Report the trainer's history records to the run: a progress artifact and log lines."""

    def __init__(self, total_steps: int, description: str) -> None:
        self.total = max(total_steps, 1)
        self.description = description
        self.bar = RunProgress(description, log=False)
        self.logger = get_run_logger()
        self.logged: tuple[int, set[str]] = (-1, set())

    def __call__(self, record: dict[str, float]) -> None:
        step = int(record.get("step", 0))
        self.bar(step, self.total)
        # The trainer merges validation scores into the step's loss record: log only what's new.
        seen = self.logged[1] if self.logged[0] == step else set()
        fresh = {key: value for key, value in record.items() if key not in seen | {"step"}}
        self.logged = (step, seen | set(fresh))
        values = ", ".join(f"{key} {value:.4g}" for key, value in fresh.items())
        self.logger.info("%s: step %d/%d: %s", self.description, step, self.total, values)
