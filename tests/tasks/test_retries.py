"""One retry rule for every task: named transient failures retry, everything else fails at once."""

from __future__ import annotations

import errno
import urllib.error
from collections.abc import Iterator

import botocore.exceptions
import pandas as pd
import pytest
import requests
from prefect import flow
from prefect.states import Completed, Failed
from prefect.testing.utilities import prefect_test_harness

from tasks.datasets import DatasetError, prepare_dataset_task
from tasks.embeddings import OOVError, embed_labels_task
from tasks.evaluation import evaluate_checkpoint_task
from tasks.feature_worker import ExtractionError
from tasks.features import extract_features_task
from tasks.retries import is_transient, retry_if_transient, retrying_task
from tasks.schemas import SchemaError
from tasks.stage_inputs import load_tables_task
from tasks.storage import StorageError
from tasks.training import train_model_task


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


def s3fs_style(error: botocore.exceptions.ClientError) -> OSError:
    """What s3fs raises: an OSError translated from botocore's error, which is its cause."""
    translated = OSError(errno.EBUSY, str(error))
    translated.__cause__ = error
    return translated


def wrapped(error: BaseException) -> urllib.error.URLError:
    """urllib's way: a URLError raised while handling the socket error (its context)."""
    try:
        raise error
    except OSError as caught:
        try:
            raise urllib.error.URLError(caught)
        except urllib.error.URLError as outer:
            return outer


def extraction_error(transient: bool) -> ExtractionError:
    error = ExtractionError("1 of 3 shards failed")
    error.transient = transient
    return error


TRANSIENT = [
    ConnectionError("reset by peer"),
    ConnectionRefusedError(111, "refused"),
    TimeoutError(),
    requests.ConnectionError("no route"),
    requests.Timeout("read timed out"),
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"),
    s3fs_style(client_error("SlowDown", 503)),
    s3fs_style(client_error("InternalError", 500)),
    client_error("Throttling", 400),
    client_error("TooManyRequests", 429),
    StorageError("upload of shard-00000.h5 to s3://b/x: sha256 mismatch"),
    wrapped(ConnectionRefusedError(111, "refused")),
    extraction_error(transient=True),
]

PERMANENT = [
    AttributeError("'float' object has no attribute 'lower'"),
    PermissionError(13, "Permission denied"),
    OSError("S3 hiccup of no named kind"),
    RuntimeError("a bug"),
    KeyError("labels"),
    ValueError("bad file"),
    FileNotFoundError("s3://bucket/missing.csv"),
    SchemaError("split not in {train, val, test}", stage="labels", failures=pd.DataFrame()),
    DatasetError("duplicate image ids"),
    OOVError("no GloVe token for 'zzz'", pd.DataFrame()),
    s3fs_style(client_error("AccessDenied", 403)),
    requests.exceptions.SSLError("certificate verify failed"),
    extraction_error(transient=False),
]


def _raised_from(cause: BaseException, error: BaseException) -> BaseException:
    try:
        raise error from cause
    except type(error) as chained:
        return chained


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_named_transient_failures_are_retried(error: Exception) -> None:
    assert is_transient(error)
    assert retry_if_transient(None, None, Failed(data=error)) is True


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_everything_else_fails_at_once(error: Exception) -> None:
    assert not is_transient(error)
    assert retry_if_transient(None, None, Failed(data=error)) is False


def test_bad_input_raised_from_a_network_error_stays_bad_input() -> None:
    """A project error with a message for the user is final, whatever led to it."""
    error = _raised_from(ConnectionError("offline"), DatasetError("every image was rejected"))
    assert not is_transient(error)
    assert is_transient(_raised_from(ConnectionError("offline"), OSError("wrapped")))


def test_a_completed_state_needs_no_retry() -> None:
    assert retry_if_transient(None, None, Completed(data=1)) is False


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
        assert stage.retry_condition_fn is retry_if_transient, stage.name
    assert train_model_task.name == "train"


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.parametrize(
    ("error", "calls"),
    [
        (ConnectionResetError(104, "reset"), 3),
        (AttributeError("'float' object has no attribute 'lower'"), 1),
        (PermissionError(13, "Permission denied"), 1),
    ],
    ids=["transient", "attribute-error", "permission-error"],
)
def test_a_task_run_retries_only_transient_failures(
    prefect_api: None, error: Exception, calls: int
) -> None:
    attempts: list[int] = []

    @retrying_task("flaky", retries=2)
    def flaky() -> None:
        attempts.append(1)
        raise error

    @flow
    def run() -> None:
        flaky.with_options(retry_delay_seconds=0)()

    with pytest.raises(type(error)):
        run()
    assert len(attempts) == calls
