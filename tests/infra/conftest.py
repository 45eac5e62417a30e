"""The full local stack shared by the slow tests of tests/infra."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.stacks import StackProcess, start_stack


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    """Prefect server, S3 and Dask (one worker), shared by the slow tests of tests/infra."""
    stack = start_stack(tmp_path_factory.mktemp("stack") / "home", "prefect,s3,dask")
    yield stack
    stack.stop()
