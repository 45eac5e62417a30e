"""The retry rule shared by every pipeline task.

Transient failures (network, S3, a lost Dask worker) are worth another try; bad input and missing
files fail the same way every time, so retrying them only delays the error the user must read.
All of the project's bad-input errors subclass :class:`ValueError` for this reason.
"""

from __future__ import annotations

from typing import Any

BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is bad input or a missing file."""
    try:
        state.result()
    except BAD_INPUT_ERRORS:
        return False
    except Exception:
        return True
    return False
