"""The retry rule shared by every pipeline task: only named transient failures are retried.

A failure worth another try is one that the same call can get past a few seconds later: the
network (connection refused, reset or dropped, a timeout), S3 throttling (``SlowDown`` and the
like, HTTP 429) and S3 server errors (5xx), and an upload whose checksum did not match
(:class:`tasks.storage.StorageError`: the bytes were damaged in transit). Everything else (bad
input, a missing file, a permission refused, a bug such as an ``AttributeError``) fails the
same way every time, so it fails at once: retrying would only delay the error the user must
read.

Libraries wrap the transient errors they meet: s3fs turns a throttled request into an
``OSError`` whose cause is botocore's ``ClientError``, urllib wraps a refused connection in a
``URLError``. So the rule looks through an error's cause and context too, except under an error
the project raised as bad input (a :class:`ValueError` with a message for the user).
"""

from __future__ import annotations

import contextlib
from typing import Any

import botocore.exceptions
import requests
from prefect import task

from tasks.storage import StorageError

RETRY_DELAY_S = 10

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    requests.ConnectionError,
    requests.Timeout,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    StorageError,
)
"""Exception types that are transient wherever they are raised."""

with contextlib.suppress(ImportError):  # s3fs's HTTP client, when installed
    import aiohttp

    TRANSIENT_ERRORS += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
with contextlib.suppress(ImportError):  # a Dask connection dropped (a worker or scheduler lost)
    from distributed.comm.core import CommClosedError

    TRANSIENT_ERRORS += (CommClosedError,)

THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
    }
)
"""S3 / AWS error codes that mean "try again later"."""


def _transient_client_error(error: botocore.exceptions.ClientError) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if not isinstance(status, int) and code.isdigit():
        status = int(code)
    return code in THROTTLING_CODES or status == 429 or (isinstance(status, int) and status >= 500)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a named transient failure.

    An error may also declare itself with a ``transient`` attribute (e.g. a feature extraction
    whose failed shards all failed transiently).
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        declared = getattr(current, "transient", None)
        if isinstance(declared, bool):
            if declared:
                return True
            continue
        if isinstance(current, requests.exceptions.SSLError):
            continue  # a certificate or TLS setup problem fails the same way every time
        if isinstance(current, TRANSIENT_ERRORS):
            return True
        if isinstance(current, botocore.exceptions.ClientError):
            if _transient_client_error(current):
                return True
            continue
        if isinstance(current, ValueError):
            continue  # the project's bad-input errors are final, whatever led to them
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only a failure :func:`is_transient` names."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


def retrying_task(name: str, *, retries: int, **options: Any) -> Any:
    """``task(...)`` for a stage that reads storage or the network: ``retries`` more tries after
    a transient failure, none after any other. ``options`` go to Prefect's ``task``."""
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=RETRY_DELAY_S,
        retry_condition_fn=retry_if_transient,
        **options,
    )
