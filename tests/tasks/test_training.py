"""Training stage: checkpoints in storage with metadata, reuse by training key, exact resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lesa_model.checkpoint import load_checkpoint, load_model
from lesa_model.trainer import Trainer
from tasks import schemas, training
from tasks.checkpoints import CheckpointMetadata
from tasks.datasets import DatasetArtifacts, DatasetError
from tasks.feature_reader import FeatureStore
from tasks.stage_inputs import DatasetTables, load_tables
from tasks.storage import Storage, StorageConfig
from tasks.training import CheckpointMirror
from tests.helpers.training_inputs import (
    DIM,
    SEEN,
    UNSEEN,
    Synthetic,
    synthetic,
    train,
    write_feature_set,
)


def with_vocabulary(inputs: Synthetic, vocabulary: pd.DataFrame) -> Synthetic:
    tables = inputs.tables
    return inputs.with_tables(
        DatasetTables(
            tables.name, tables.labels, vocabulary.reset_index(drop=True), tables.images_prefix
        )
    )


@pytest.fixture
def local(tmp_path: Path) -> Synthetic:
    return synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_checkpoints_land_in_the_run_folder_with_metadata(local: Synthetic) -> None:
    outcome = train(local)
    assert not outcome.reused
    assert outcome.steps == 6
    folder = local.storage.url("runs", "tiny", "models", "v0001", "checkpoints")
    final = f"{folder}/final.pt"
    assert outcome.checkpoints == {"final": final, "best": f"{folder}/best.pt"}
    assert outcome.model_version == "v0001"
    model, raw = load_model(final)
    metadata = CheckpointMetadata.model_validate(raw)
    assert metadata.seen_labels == SEEN
    assert metadata.unseen_labels == UNSEEN
    assert metadata.embedding_source == local.embeddings.source
    assert metadata.feature_key == local.features.key
    assert metadata.features == local.config.features.identity()
    assert metadata.training_key == outcome.training_key
    assert metadata.run_name == "tiny" and metadata.dataset == "synthetic"
    assert model.label_dim == DIM
    record = local.storage.read_json(final.rsplit("/", 1)[0] + "/training.json")
    assert record["status"] == "finished"
    assert record["training_key"] == outcome.training_key


def test_progress_counts_to_the_steps_that_epochs_give(
    local: Synthetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``epochs`` overrides ``steps``: 2 epochs of 24 images in batches of 8 are 6 steps."""
    reported: list[tuple[int, int]] = []
    monkeypatch.setattr(
        training.RunProgress, "__call__", lambda self, done, total: reported.append((done, total))
    )
    trainer = local.config.train.model_copy(update={"steps": 100, "epochs": 2})
    outcome = train(local, trainer=trainer)
    assert outcome.steps == 6
    assert reported and {total for _, total in reported} == {6}
    assert reported[-1][0] == 6


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
    features = write_feature_set(inputs.storage, prefix, ids, values, 16, inputs.config)
    return inputs.with_inputs(features=features)


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


def test_the_tables_version_follows_their_stored_content(local: Synthetic) -> None:
    """Reports name the dataset version: the same files give the same one, an edit a new one."""
    artifacts = _stored(local, local.tables.labels, local.tables.vocabulary)
    first = load_tables(local.storage, artifacts).version
    assert first and load_tables(local.storage, artifacts).version == first
    edited = local.tables.labels.copy()
    edited.at[0, "positives"] = [SEEN[0]]
    local.storage.write_parquet(artifacts.label_table_url, edited)
    assert load_tables(local.storage, artifacts).version not in (None, first)


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
    prefix = crashing.storage.url("runs", "tiny", "models", "v0001", "checkpoints")
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
