"""Training stage: LESA on the seen labels of the train split, checkpoints kept in storage.

The trainer writes checkpoints to a local folder; for remote storage a background thread
mirrors that folder to ``runs/<run>/models/<version>/checkpoints/`` (every checkpoint is
uploaded verified), and a restarted run downloads the latest ones first and resumes from them.
For a local storage root the trainer writes straight into the storage folder.

A run is recognised by its *training key*: a hash of everything that changes the trained
weights (model, loss and trainer sections, feature key and the stored bytes of the shards
trained on, seen labels and their vectors, the train/val images and their seen-label
annotations). A finished model version with the same key is reused as it is; other inputs
train a new version and the earlier ones stay (``tasks.model_versions``). Unseen labels are not
part of the key, so adding unseen labels to the vocabulary reuses the trained model, and
evaluation scores them zero-shot.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from lesa_model.config import LossConfig, ModelConfig, ReaderConfig, TrainerConfig
from lesa_model.model import LESA
from lesa_model.trainer import Trainer, TrainResult
from tasks import model_versions
from tasks.checkpoints import CheckpointMetadata, run_prefix
from tasks.claims import claimed
from tasks.embeddings import SourceKind
from tasks.feature_reader import FeatureBatches
from tasks.hashing import array_digest, content_hash
from tasks.progress import RunProgress
from tasks.retries import retrying_task
from tasks.stage_inputs import StageInputs, split_source
from tasks.storage import Storage, is_local

logger = logging.getLogger(__name__)

RECORD_FILE = model_versions.RECORD_FILE
"""Written next to the checkpoints: the training key, status and checkpoint URLs."""
SYNC_INTERVAL_S = 15.0


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
    model_version: str | None = None
    """The model version (``tasks.model_versions``) these checkpoints belong to."""

    def describe(self) -> list[str]:
        """Human-readable lines for the run summary."""
        version = f"model version {self.model_version}" if self.model_version else "the model"
        if self.reused:
            lines = [
                f"Training: reused the finished run `{self.run_name}` "
                f"(training key {self.training_key}, {self.steps} steps, {version}); no "
                "retraining needed"
            ]
        else:
            start = f", resumed from {self.resumed_from}" if self.resumed_from else ""
            lines = [
                f"Training: {self.steps} steps on {len(self.seen_labels)} seen labels{start}; "
                f"{version} (earlier versions kept)"
            ]
        if self.new_unseen_labels:
            shown = ", ".join(self.new_unseen_labels[:10])
            more = ", …" if len(self.new_unseen_labels) > 10 else ""
            lines.append(
                f"Only unseen labels changed since training: {len(self.new_unseen_labels)} new "
                f"unseen label(s) ({shown}{more}) scored zero-shot without retraining"
            )
        return lines


@dataclass(frozen=True)
class TrainingData:
    """The labels and batch sources one training run learns from."""

    seen: list[str]
    unseen: list[str]
    """Unseen labels at training time: not trained on, recorded for evaluation and prediction."""
    vectors: np.ndarray
    """(C, d) word vectors of ``seen``."""
    train: FeatureBatches
    val: FeatureBatches | None


def training_data(
    inputs: StageInputs, storage: Storage, reader: ReaderConfig | None = None
) -> TrainingData:
    """Seen labels with vectors, and the train and val images that have features (the train
    images read as ``reader`` says; the val images, read in order, stream)."""
    seen = inputs.seen_labels
    if not seen:
        raise ValueError("no seen label has a word vector: nothing to train on")
    store = inputs.feature_store(storage)
    train = split_source(inputs.tables, store, "train", seen, reader)
    if train is None:
        raise ValueError(f"dataset {inputs.tables.name}: no train image has features")
    val = split_source(inputs.tables, store, "val", seen)
    return TrainingData(seen, inputs.unseen_labels, inputs.embeddings.vectors(seen), train, val)


def training_key(
    model: ModelConfig,
    loss: LossConfig,
    trainer: TrainerConfig,
    features_key: str,
    source: SourceKind,
    data: TrainingData,
) -> str:
    """Hash of everything that changes the trained weights (unseen labels do not), including
    the stored bytes of every feature shard the train and val images are read from, so features
    recomputed for an image fixed or replaced in place retrain."""
    split_digests = [
        array_digest(split.image_ids, split.labels) if split is not None else None
        for split in (data.train, data.val)
    ]
    store = data.train.store
    images = [*data.train.image_ids, *(data.val.image_ids if data.val else [])]
    used = store.index.loc[images, "shard"]
    shards = store.manifest.set_index("shard_index").loc[sorted(set(used)), "sha256"]
    parts = [
        model,
        loss,
        trainer.weights_identity(),
        features_key,
        source.identity,
        list(data.seen),
        array_digest(np.round(data.vectors.astype(np.float64), 6)),
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


# -- the stage -------------------------------------------------------------------------------


def _reused(
    storage: Storage, record: dict[str, Any] | None, key: str, run_name: str, data: TrainingData
) -> TrainingOutcome | None:
    """The outcome of a finished run with the same key whose checkpoints still exist."""
    if not (
        record
        and record.get("training_key") == key
        and record.get("status") == "finished"
        and all(storage.exists(url) for url in record["checkpoints"].values())
    ):
        return None
    previous_unseen = set(record.get("unseen_labels", []))
    return TrainingOutcome(
        run_name=run_name,
        training_key=key,
        checkpoints=record["checkpoints"],
        reused=True,
        steps=int(record.get("steps", 0)),
        seen_labels=data.seen,
        unseen_labels=record.get("unseen_labels", []),
        new_unseen_labels=[label for label in data.unseen if label not in previous_unseen],
        result=record.get("result", {}),
    )


def _resume_point(
    storage: Storage, record: dict[str, Any] | None, key: str, prefix: str, local_dir: Path
) -> str | None:
    """Get ``local_dir`` ready for the trainer; name the step checkpoint it will resume from.

    A model version folder holds one training key (``tasks.model_versions``), so what is there
    was written by an earlier attempt of this very training; for remote storage the latest
    checkpoints are downloaded first.
    """
    if record and record.get("training_key") != key:
        raise RuntimeError(
            f"training {prefix}: its record has training key {record.get('training_key')}, not "
            f"{key}; a model version folder holds one key, so this folder was edited by hand"
        )
    local_dir.mkdir(parents=True, exist_ok=True)
    if not record:
        return None
    if not is_local(storage.root):
        return _fetch_for_resume(storage, prefix, local_dir)
    steps = sorted(local_dir.glob("step-*.pt"))
    return steps[-1].name if steps else None


class TrainingProgress:
    """The trainer's history records on the Prefect run: a progress artifact and log lines.

    Outside a Prefect task run (a plain call, a test) the artifact is not made and nothing is
    logged, so :func:`train_model` reports progress however it is called.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.total = 1
        """Steps the run trains for; the trainer decides (``epochs`` overrides ``steps``)."""
        self.bar = RunProgress(description, log=False)
        self.logged: tuple[int, set[str]] = (-1, set())

    def __call__(self, record: dict[str, float]) -> None:
        step = int(record.get("step", 0))
        self.bar(step, self.total)
        if not self.bar.active:
            return
        # The trainer merges validation scores into the step's loss record: log only what's new.
        seen = self.logged[1] if self.logged[0] == step else set()
        fresh = {key: value for key, value in record.items() if key not in seen | {"step"}}
        self.logged = (step, seen | set(fresh))
        values = ", ".join(f"{key} {value:.4g}" for key, value in fresh.items())
        get_run_logger().info("%s: step %d/%d: %s", self.description, step, self.total, values)


def _fit(
    storage: Storage,
    data: TrainingData,
    model: LESA,
    trainer_config: TrainerConfig,
    loss: LossConfig,
    local_dir: Path,
    prefix: str,
    metadata: CheckpointMetadata,
    description: str,
    val_ks: Sequence[int],
) -> TrainResult:
    """Run the trainer, mirroring its checkpoints to remote storage while it runs."""
    progress = TrainingProgress(description)
    trainer = Trainer(
        model,
        torch.from_numpy(data.vectors),
        trainer_config,
        loss,
        local_dir,
        metadata=metadata.model_dump(mode="json"),
        progress=progress,
        val_ks=val_ks,
    )
    progress.total = max(trainer.total_steps(data.train), 1)
    if is_local(storage.root):
        return trainer.fit(data.train, data.val)
    with CheckpointMirror(storage, local_dir, prefix):
        return trainer.fit(data.train, data.val)


def _checkpoints(storage: Storage, prefix: str, result: TrainResult) -> dict[str, str]:
    """URLs of the finished run's ``final`` and ``best`` checkpoints."""
    final_url = f"{prefix}/final.pt"
    if not storage.exists(final_url):
        raise RuntimeError(f"training finished but {final_url} was not written")
    # Without a validation split there is no best model: the final one stands in for it.
    best_url = f"{prefix}/best.pt" if result.best_checkpoint else final_url
    return {"final": final_url, "best": best_url}


def _initial_model(inputs: StageInputs, data: TrainingData, model: ModelConfig, seed: int) -> LESA:
    """The untrained network; its weights come from ``seed``, not from whatever drew on the
    global RNG before this stage, so the same config and data give the same model anywhere."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LESA(inputs.features.dim, data.vectors.shape[1], model, grid=inputs.features.grid)


def _summary(result: TrainResult) -> dict[str, Any]:
    return {
        "final_step": result.final_step,
        "best_step": result.best_step,
        "best_metric": result.best_metric,
        "last": result.history[-1] if result.history else {},
    }


def train_model(
    storage: Storage,
    inputs: StageInputs,
    *,
    run_name: str,
    model: ModelConfig,
    loss: LossConfig,
    trainer: TrainerConfig,
    val_ks: Sequence[int] = (),
) -> TrainingOutcome:
    """Train LESA (or reuse a finished identical run) and return its checkpoint URLs.

    ``val_ks`` are the K of the F1@K that validation reports besides mAP (the evaluation's
    ``ks``). Progress shows on the Prefect run when there is one. One flow run at a time
    trains into a run's folder (:mod:`tasks.claims`): a concurrent identical run waits, then
    reuses what the first one finished, and never resumes from checkpoints being written.
    """
    with claimed(storage, run_prefix(storage, run_name), f"training {run_name}") as claim:
        data = training_data(inputs, storage, trainer.reader)
        key = training_key(
            model, loss, trainer, inputs.features.key, inputs.embeddings.source, data
        )
        version = model_versions.version_for_key(storage, run_name, key)
        outcome = _train_or_reuse(
            storage,
            inputs,
            data,
            key=key,
            prefix=model_versions.checkpoints_prefix(storage, run_name, version),
            run_name=run_name,
            model=model,
            loss=loss,
            trainer=trainer,
            val_ks=val_ks,
        )
        claim.check()
        model_versions.record(
            storage,
            _model_version(
                inputs, outcome, version, {"model": model, "loss": loss, "train": trainer}
            ),
            new=not outcome.reused,
        )
        return outcome.model_copy(update={"model_version": version})


def _model_version(
    inputs: StageInputs, outcome: TrainingOutcome, version: str, sections: dict[str, Any]
) -> model_versions.ModelVersion:
    """The version record of a finished training stage."""
    return model_versions.ModelVersion(
        version=version,
        run_name=outcome.run_name,
        **model_versions.flow_run(),
        created_at=model_versions.created_now(),
        training_key=outcome.training_key,
        config_hash=content_hash(sections, 16),
        dataset=inputs.tables.name,
        data_version=inputs.tables.version,
        feature_key=inputs.features.key,
        steps=outcome.steps,
        select_metric=outcome.result.get("best_metric"),
        metrics=outcome.result,
        checkpoints=outcome.checkpoints,
    )


def _train_or_reuse(
    storage: Storage,
    inputs: StageInputs,
    data: TrainingData,
    *,
    key: str,
    prefix: str,
    run_name: str,
    model: ModelConfig,
    loss: LossConfig,
    trainer: TrainerConfig,
    val_ks: Sequence[int],
) -> TrainingOutcome:
    """Reuse the finished training in ``prefix`` (one model version's checkpoints) or train
    into it, resuming from its last step checkpoint if an earlier attempt stopped."""
    record_url = f"{prefix}/{RECORD_FILE}"
    source = inputs.embeddings.source
    record = storage.read_json(record_url) if storage.exists(record_url) else None
    reused = _reused(storage, record, key, run_name, data)
    if reused is not None:
        logger.info("training %s: finished run with key %s found; reusing it", prefix, key)
        return reused

    local_dir = _local_checkpoint_dir(storage, prefix, key)
    resumed_from = _resume_point(storage, record, key, prefix, local_dir)
    metadata = CheckpointMetadata(
        run_name=run_name,
        training_key=key,
        dataset=inputs.tables.name,
        seen_labels=data.seen,
        unseen_labels=data.unseen,
        embedding_source=source,
        embedding_dim=int(data.vectors.shape[1]),
        label_text=inputs.embeddings.text,
        feature_key=inputs.features.key,
        features=inputs.features.identity,
    )
    sections = {"model": model, "loss": loss, "train": trainer}
    base_record = {
        "training_key": key,
        "config": {name: section.model_dump(mode="json") for name, section in sections.items()},
        **metadata.model_dump(mode="json"),
    }
    storage.write_json(record_url, {**base_record, "status": "running"})
    network = _initial_model(inputs, data, model, trainer.seed)
    description = f"training {run_name} LESA"
    result = _fit(
        storage, data, network, trainer, loss, local_dir, prefix, metadata, description, val_ks
    )
    checkpoints = _checkpoints(storage, prefix, result)
    finished = {"status": "finished", "checkpoints": checkpoints, "steps": result.final_step}
    storage.write_json(record_url, {**base_record, **finished, "result": _summary(result)})
    return TrainingOutcome(
        run_name=run_name,
        training_key=key,
        checkpoints=checkpoints,
        reused=False,
        resumed_from=resumed_from,
        steps=result.final_step,
        seen_labels=data.seen,
        unseen_labels=data.unseen,
        result=_summary(result),
    )


train_model_task = retrying_task("train", retries=1, cache_policy=NO_CACHE)(train_model)
"""The stage as a Prefect task; a retry resumes from the last checkpoint."""
