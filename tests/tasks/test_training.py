"""Training stage: checkpoints in storage with metadata, reuse by training key, exact resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from lesa_model.checkpoint import load_checkpoint, load_model
from lesa_model.trainer import Trainer
from tasks import schemas
from tasks.config import PipelineConfig, load_config
from tasks.datasets import DatasetArtifacts, DatasetError
from tasks.embeddings import EmbeddingResult
from tasks.feature_config import FeatureIdentity, feature_key
from tasks.feature_reader import FeatureStore
from tasks.feature_shards import FEATURES_DATASET, IMAGE_IDS_DATASET, ids_sha256
from tasks.features import FeatureSet
from tasks.prediction import checkpoint_features
from tasks.storage import Storage, StorageConfig
from tasks.training import (
    CheckpointMirror,
    DatasetTables,
    checkpoint_url,
    load_tables,
    train_model,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
R, D, DIM = 4, 8, 6
SEEN = ["cat", "dog", "car", "tree", "boat", "lamp"]
UNSEEN = ["bus", "fox"]


@dataclass
class Synthetic:
    """A complete, tiny set of training inputs written to storage."""

    config: PipelineConfig
    storage: Storage
    tables: DatasetTables
    features: FeatureSet
    embeddings: EmbeddingResult


def unit_vectors(labels: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(labels), DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pd.DataFrame({"label": labels, "vector": [list(map(float, v)) for v in vectors]})


def embedding_result(labels: list[str]) -> EmbeddingResult:
    table = schemas.validate(unit_vectors(labels), schemas.LabelEmbeddings, stage="test")
    return EmbeddingResult(table, pd.DataFrame({"label": []}), 1.0)


def write_feature_set(
    storage: Storage, prefix: str, ids: list[str], values: np.ndarray, shard_size: int
) -> FeatureSet:
    """Shards + manifest in the documented HDF5 format (what extract_features writes)."""
    rows = []
    for index, start in enumerate(range(0, len(ids), shard_size)):
        local = Path(storage.cache_dir) / f"shard-{index}.h5"
        local.parent.mkdir(parents=True, exist_ok=True)
        chunk_ids = ids[start : start + shard_size]
        with h5py.File(local, "w") as shard:
            shard.create_dataset(FEATURES_DATASET, data=values[start : start + shard_size])
            shard.create_dataset(
                IMAGE_IDS_DATASET, data=np.array(chunk_ids, dtype=object), dtype=h5py.string_dtype()
            )
            shard.attrs.update({"backbone": "synthetic", "grid": np.array([2, 2])})
        uri = f"{prefix}/shard-{index:05d}.h5"
        rows.append(
            {
                "shard_index": index,
                "shard_uri": uri,
                "num_images": len(chunk_ids),
                "backbone": "synthetic",
                "preprocessing": "none",
                "regions": R,
                "dim": D,
                "dtype": "float32",
                "sha256": storage.upload_file(local, uri),
                "size_bytes": local.stat().st_size,
                "ids_sha256": ids_sha256(chunk_ids),
            }
        )
    manifest = schemas.validate(pd.DataFrame(rows), schemas.FeatureManifest, stage="test")
    storage.write_parquet(f"{prefix}/manifest.parquet", manifest)
    return FeatureSet(
        manifest_url=f"{prefix}/manifest.parquet",
        rejects_url=f"{prefix}/rejects.parquet",
        identity=FeatureIdentity(),
        regions=R,
        dim=D,
        grid=(2, 2),
        num_images=len(ids),
    )


def synthetic(root: str, *, cache_dir: Path, steps: int = 6, **storage_options: str) -> Synthetic:
    """Images whose present labels plant a prototype in one region; train/val/test splits."""
    rng = np.random.default_rng(0)
    labels = SEEN + UNSEEN
    splits = ["train"] * 24 + ["val"] * 8 + ["test"] * 12
    ids = [f"img-{i:03d}" for i in range(len(splits))]
    prototypes = rng.standard_normal((len(labels), D)).astype(np.float32)
    values = 0.3 * rng.standard_normal((len(ids), R, D)).astype(np.float32)
    positives = []
    for i, split in enumerate(splits):
        pool = SEEN if split != "test" else labels
        chosen = sorted(rng.choice(pool, size=2, replace=False).tolist())
        positives.append(chosen)
        for label in chosen:
            values[i, rng.integers(R)] += prototypes[labels.index(label)]
    table = pd.DataFrame(
        {
            "image_id": ids,
            "uri": [f"{i}.jpg" for i in ids],
            "split": splits,
            "positives": positives,
            "negatives": [[] for _ in ids],
            "complete": True,
        }
    )
    vocabulary = pd.DataFrame(
        {"label": labels, "seen": [label in SEEN for label in labels], "tokens": labels}
    )
    config = load_config(
        CONFIGS / "tiny.yaml",
        {
            "storage": {"root": root, "cache_dir": str(cache_dir), **storage_options},
            "model": {"num_modules": 2, "input_projection": None, "hidden_dim": 8},
            "train": {
                "steps": steps,
                "batch_size": 8,
                "val_every": 3,
                "checkpoint_every": 2,
                "select": "mAP",
                "keep_checkpoints": 2,
            },
        },
    )
    storage = Storage(config.storage)
    features = write_feature_set(
        storage, storage.url("features", "synthetic", "key"), ids, values, shard_size=16
    )
    tables = DatasetTables(
        name="synthetic",
        labels=schemas.validate(table, schemas.LabelTable, stage="test"),
        vocabulary=schemas.validate(vocabulary, schemas.Vocabulary, stage="test"),
        images_prefix=storage.url("images"),
    )
    return Synthetic(config, storage, tables, features, embedding_result(labels))


def train(inputs: Synthetic, **kwargs: object):
    return train_model(
        inputs.config,
        inputs.storage,
        tables=inputs.tables,
        features=inputs.features,
        embeddings=inputs.embeddings,
        **kwargs,
    )


def with_vocabulary(inputs: Synthetic, vocabulary: pd.DataFrame) -> Synthetic:
    labels = vocabulary["label"].tolist()
    tables = DatasetTables(
        name=inputs.tables.name,
        labels=inputs.tables.labels,
        vocabulary=vocabulary.reset_index(drop=True),
        images_prefix=inputs.tables.images_prefix,
    )
    return Synthetic(
        inputs.config, inputs.storage, tables, inputs.features, embedding_result(labels)
    )


@pytest.fixture
def local(tmp_path: Path) -> Synthetic:
    return synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_checkpoints_land_in_the_run_folder_with_metadata(local: Synthetic) -> None:
    outcome = train(local)
    assert not outcome.reused
    assert outcome.steps == 6
    final = checkpoint_url(local.storage, "tiny", "final")
    assert outcome.checkpoints == {
        "final": final,
        "best": checkpoint_url(local.storage, "tiny", "best"),
    }
    model, metadata = load_model(final)
    assert metadata["seen_labels"] == SEEN
    assert metadata["unseen_labels"] == UNSEEN
    assert metadata["embedding_source"] == local.config.embeddings.source.identity
    assert metadata["feature_key"] == feature_key(local.config.features)
    assert metadata["backbone"] == local.config.features.backbone
    assert metadata["features"]["weights"] == local.config.features.weights
    assert feature_key(checkpoint_features(metadata)) == metadata["feature_key"]
    assert metadata["training_key"] == outcome.training_key
    assert model.label_dim == DIM
    record = local.storage.read_json(final.rsplit("/", 1)[0] + "/training.json")
    assert record["status"] == "finished"
    assert record["training_key"] == outcome.training_key


def test_the_same_config_trains_the_same_model_whatever_the_global_rng(tmp_path: Path) -> None:
    finals = []
    for name, draws in (("a", 1), ("b", 5)):
        torch.rand(draws)  # another library drawing from torch's global RNG beforehand
        inputs = synthetic(str(tmp_path / name), cache_dir=tmp_path / "cache")
        finals.append(load_checkpoint(train(inputs).checkpoints["final"])["model"])
    assert finals[0].keys() == finals[1].keys()
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key]), key


def test_a_finished_run_with_the_same_inputs_is_reused(local: Synthetic) -> None:
    first = train(local)
    final = Path(first.checkpoints["final"])
    written = final.stat().st_mtime_ns
    second = train(local)
    assert second.reused
    assert second.training_key == first.training_key
    assert second.new_unseen_labels == []
    assert final.stat().st_mtime_ns == written
    assert "no retraining needed" in second.describe()[0]


def test_new_unseen_labels_reuse_the_model_and_are_named(local: Synthetic) -> None:
    first = train(local)
    vocabulary = pd.concat(
        [
            local.tables.vocabulary,
            pd.DataFrame({"label": ["owl"], "seen": [False], "tokens": ["owl"]}),
        ]
    )
    second = train(with_vocabulary(local, vocabulary))
    assert second.reused
    assert second.training_key == first.training_key
    assert second.new_unseen_labels == ["owl"]
    assert "scored zero-shot without retraining" in " ".join(second.describe())


def test_a_new_seen_label_retrains_from_scratch(local: Synthetic) -> None:
    first = train(local)
    vocabulary = local.tables.vocabulary.copy()
    vocabulary.loc[vocabulary["label"] == "bus", "seen"] = True
    second = train(with_vocabulary(local, vocabulary))
    assert not second.reused
    assert second.training_key != first.training_key
    assert "bus" in load_model(second.checkpoints["final"])[1]["seen_labels"]


def _with_features_changed(inputs: Synthetic, image_id: str) -> Synthetic:
    """The same feature set with one image's features recomputed to other values."""
    store = FeatureStore(inputs.features.manifest_url, inputs.storage)
    ids = list(store.image_ids)
    values = store.read(ids)
    values[ids.index(image_id)] += 1.0
    prefix = inputs.features.manifest_url.rsplit("/", 1)[0]
    features = write_feature_set(inputs.storage, prefix, ids, values, shard_size=16)
    return Synthetic(inputs.config, inputs.storage, inputs.tables, features, inputs.embeddings)


def test_recomputed_features_of_a_training_image_retrain(local: Synthetic) -> None:
    """Features recomputed for an image fixed or replaced in place are a new training input;
    a shard holding only test images is not."""
    first = train(local)
    test_only = _with_features_changed(local, "img-040")
    assert train(test_only).reused
    second = train(_with_features_changed(test_only, "img-003"))
    assert not second.reused
    assert second.training_key != first.training_key


def test_a_different_trainer_setting_changes_the_key(tmp_path: Path) -> None:
    six = train(synthetic(str(tmp_path / "a"), cache_dir=tmp_path / "c1", steps=6))
    four = train(synthetic(str(tmp_path / "a"), cache_dir=tmp_path / "c1", steps=4))
    assert six.training_key != four.training_key
    assert not four.reused
    assert four.steps == 4


def test_tables_are_validated_at_the_boundary(local: Synthetic) -> None:
    storage = local.storage
    vocabulary_url = storage.url("datasets", "synthetic", "vocabulary.parquet")
    labels_url = storage.url("datasets", "synthetic", "labels.parquet")
    storage.write_parquet(vocabulary_url, local.tables.vocabulary)
    broken = local.tables.labels.copy()
    broken.loc[0, "split"] = "holdout"
    storage.write_parquet(labels_url, broken)
    artifacts = DatasetArtifacts(
        name="synthetic",
        label_table_url=labels_url,
        vocabulary_url=vocabulary_url,
        images_prefix=storage.url("images"),
    )
    with pytest.raises(schemas.SchemaError, match="split"):
        load_tables(storage, artifacts)
    storage.write_parquet(labels_url, local.tables.labels)
    assert len(load_tables(storage, artifacts).labels) == len(local.tables.labels)


def _stored(local: Synthetic, labels: pd.DataFrame, vocabulary: pd.DataFrame) -> DatasetArtifacts:
    storage = local.storage
    artifacts = DatasetArtifacts(
        name="synthetic",
        label_table_url=storage.url("datasets", "synthetic", "labels.parquet"),
        vocabulary_url=storage.url("datasets", "synthetic", "vocabulary.parquet"),
        images_prefix=storage.url("images"),
    )
    storage.write_parquet(artifacts.label_table_url, labels)
    storage.write_parquet(artifacts.vocabulary_url, vocabulary)
    return artifacts


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("no-test", "dataset synthetic has no test images"),
        ("no-unseen", "dataset synthetic has no unseen labels to evaluate zero-shot"),
        ("no-train", "dataset synthetic has no train images"),
    ],
)
def test_a_dataset_a_run_cannot_use_fails_when_its_tables_load(
    local: Synthetic, change: str, match: str
) -> None:
    """Found only after extraction before: checked where the label table is validated."""
    labels, vocabulary = local.tables.labels, local.tables.vocabulary
    if change == "no-test":
        labels = labels[labels["split"] != "test"]
    elif change == "no-train":
        labels = labels[labels["split"] != "train"]
    else:
        vocabulary = vocabulary[vocabulary["seen"]]
        unseen = set(local.tables.unseen_labels)
        labels = labels.assign(
            positives=labels["positives"].map(lambda ls: [x for x in ls if x not in unseen])
        )
    with pytest.raises(DatasetError, match=match):
        load_tables(local.storage, _stored(local, labels, vocabulary))


def test_unseen_labels_on_train_rows_are_warned_about_with_the_count(
    local: Synthetic, caplog: pytest.LogCaptureFixture
) -> None:
    labels = local.tables.labels.copy()
    unseen = local.tables.unseen_labels[0]
    for row in (0, 1, 25):  # two train rows and one val row
        labels.at[row, "positives"] = [*labels.at[row, "positives"], unseen]
    with caplog.at_level("WARNING"):
        load_tables(local.storage, _stored(local, labels, local.tables.vocabulary))
    assert "3 train/val image(s) list unseen labels (3 annotations" in caplog.text
    assert unseen in caplog.text


def test_a_broken_stored_table_names_its_file(local: Synthetic) -> None:
    broken = local.tables.labels.copy()
    broken.loc[4, "split"] = "holdout"
    artifacts = _stored(local, broken, local.tables.vocabulary)
    with pytest.raises(schemas.SchemaError, match=r"labels\.parquet is invalid:[^$]*row 5"):
        load_tables(local.storage, artifacts)


def test_mirror_uploads_finished_checkpoints_and_prunes_steps(tmp_path: Path) -> None:
    storage = Storage(StorageConfig(root=str(tmp_path / "remote")))
    local = tmp_path / "local"
    local.mkdir()
    prefix = storage.url("runs", "r", "checkpoints")
    mirror = CheckpointMirror(storage, local, prefix)
    (local / "step-00000002.pt").write_bytes(b"two")
    (local / ".final.pt.123.tmp").write_bytes(b"half")
    mirror.sync()
    assert storage.ls(prefix) == [f"{prefix}/step-00000002.pt"]
    (local / "step-00000002.pt").unlink()
    (local / "step-00000004.pt").write_bytes(b"four")
    (local / "best.pt").write_bytes(b"best")
    mirror.sync()
    assert storage.ls(prefix) == [f"{prefix}/best.pt", f"{prefix}/step-00000004.pt"]
    (local / "best.pt").write_bytes(b"better")
    mirror.sync()
    assert storage.read_bytes(f"{prefix}/best.pt") == b"better"


@pytest.mark.slow
def test_interrupted_s3_run_resumes_from_storage_exactly(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash after step 5, restart on a machine without the local files: same final weights."""
    options = {"endpoint_url": s3_server.endpoint_url}
    bucket = f"s3://{s3_server.bucket}"
    straight = train(synthetic(f"{bucket}/straight", cache_dir=tmp_path / "c0", **options))

    crashing = synthetic(f"{bucket}/resumed", cache_dir=tmp_path / "c1", **options)
    original_step = Trainer.train_step

    def crash_at_five(self: Trainer, features: object, labels: object):
        if self.step == 5:
            raise RuntimeError("simulated crash")
        return original_step(self, features, labels)

    monkeypatch.setattr(Trainer, "train_step", crash_at_five)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    monkeypatch.setattr(Trainer, "train_step", original_step)
    prefix = crashing.storage.url("runs", "tiny", "checkpoints")
    assert crashing.storage.read_json(f"{prefix}/training.json")["status"] == "running"
    assert f"{prefix}/step-00000004.pt" in crashing.storage.ls(prefix)

    fresh_machine = synthetic(f"{bucket}/resumed", cache_dir=tmp_path / "c2", **options)
    resumed = train(fresh_machine)
    assert resumed.resumed_from == "step-00000004.pt"
    assert resumed.training_key == straight.training_key
    a = load_checkpoint(crashing.storage.local_copy(straight.checkpoints["final"]))["model"]
    b = load_checkpoint(fresh_machine.storage.local_copy(resumed.checkpoints["final"]))["model"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
