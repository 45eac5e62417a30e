"""The retry rule shared by every pipeline task.

Transient failures (network, S3, a lost Dask worker) are worth another try; bad input and missing
files fail the same way every time, so retrying them only delays the error the user must read.
All of the project's bad-input errors subclass :class:`ValueError` for this reason.
"""

from __future__ import annotations

from typing import Any

from prefect import task

BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
RETRY_DELAY_S = 10


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is bad input or a missing file."""
    try:
        state.result()
    except BAD_INPUT_ERRORS:
        return False
    except Exception:
        return True
    return False


def retrying_task(name: str, *, retries: int, **options: Any) -> Any:
    """``task(...)`` for a stage that reads storage or the network: ``retries`` more tries after
    a transient failure, none after bad input. ``options`` go to Prefect's ``task``."""
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=RETRY_DELAY_S,
        retry_condition_fn=retry_unless_bad_input,
        **options,
    )
