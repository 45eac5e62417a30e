"""Progress of a long stage on its Prefect run: the UI's progress bar and a few log lines.

Inside a Prefect task run a :class:`RunProgress` keeps one progress artifact up to date and logs
every tenth of the way; called outside one (a plain function call, a test, a Dask worker) it
does nothing, so the stage functions stay usable without Prefect.
"""

from __future__ import annotations

from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

LOG_EVERY_PERCENT = 10.0


class RunProgress:
    """``progress(done, total)`` for one stage, shown as ``description`` on the run."""

    def __init__(self, description: str, *, log: bool = True) -> None:
        self.description = description
        self.active = TaskRunContext.get() is not None
        self.log = log
        self.artifact_id: UUID | None = None
        self.logged_percent = -LOG_EVERY_PERCENT

    def __call__(self, done: int, total: int) -> None:
        if not self.active:
            return
        percent = min(100.0, 100.0 * done / max(total, 1))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, description=self.description)
        else:
            update_progress_artifact(self.artifact_id, percent)
        if self.log and (percent >= self.logged_percent + LOG_EVERY_PERCENT or done >= total):
            self.logged_percent = percent
            get_run_logger().info("%s: %d/%d (%.0f%%)", self.description, done, total, percent)
