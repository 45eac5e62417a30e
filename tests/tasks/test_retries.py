"""One retry rule for every task: transient failures retry, bad input and missing files do not."""

from __future__ import annotations

import pandas as pd
import pytest
from prefect.states import Completed, Failed

from tasks.datasets import DatasetError
from tasks.embeddings import OOVError
from tasks.retries import retry_unless_bad_input
from tasks.schemas import SchemaError


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
