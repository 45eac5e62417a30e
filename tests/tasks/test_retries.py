"""One retry rule for every task: transient failures retry, bad input and missing files do not."""

from __future__ import annotations

import pandas as pd
import pytest
from prefect.states import Completed, Failed

from tasks.datasets import DatasetError, prepare_dataset_task
from tasks.embeddings import OOVError, embed_labels_task
from tasks.evaluation import evaluate_checkpoint_task
from tasks.features import extract_features_task
from tasks.retries import retry_unless_bad_input
from tasks.schemas import SchemaError
from tasks.training import load_tables_task, train_model_task


@pytest.mark.parametrize(
    "error",
    [
        OSError("S3 hiccup"),
        ConnectionError("reset by peer"),
        TimeoutError(),
        RuntimeError("worker lost"),
    ],
)
def test_transient_failures_are_retried(error: Exception) -> None:
    assert retry_unless_bad_input(None, None, Failed(data=error)) is True


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad file"),
        FileNotFoundError("s3://bucket/missing.csv"),
        SchemaError("split not in {train, val, test}", stage="labels", failures=pd.DataFrame()),
        DatasetError("duplicate image ids"),
        OOVError("no GloVe token for 'zzz'", pd.DataFrame()),
    ],
)
def test_bad_input_is_not_retried(error: Exception) -> None:
    assert retry_unless_bad_input(None, None, Failed(data=error)) is False


def test_a_completed_state_needs_no_retry() -> None:
    assert retry_unless_bad_input(None, None, Completed(data=1)) is False


def test_every_storage_stage_retries_with_the_shared_rule() -> None:
    stages = [
        prepare_dataset_task,
        load_tables_task,
        extract_features_task,
        embed_labels_task,
        train_model_task,
        evaluate_checkpoint_task,
    ]
    for stage in stages:
        assert stage.retries >= 1, stage.name
        assert stage.retry_condition_fn is retry_unless_bad_input, stage.name
    assert train_model_task.name == "train"
