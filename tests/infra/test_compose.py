"""The production compose file and image agree with the code they run.

Docker is not available to the test suite, so these read ``infra/docker-compose.yml`` and
``infra/Dockerfile`` as data and check them against the real config loader and package layout:
a renamed config key, bucket or package breaks here instead of in a user's first deployment.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from flows.arguments import DEFAULT_CONFIG
from tasks.config import load_config
from tasks.settings import ENVIRONMENT_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PIPELINE_SERVICES = ("dask-scheduler", "dask-worker", "prefect-worker")


def _command(service: str) -> list[str]:
    return shlex.split(SERVICES[service]["command"])


def test_the_stack_has_every_service_the_docs_promise() -> None:
    assert set(SERVICES) == {
        "postgres",
        "prefect-server",
        "minio",
        "minio-bucket",
        "dask-scheduler",
        "dask-worker",
        "prefect-worker",
    }
    assert (
        "postgresql+asyncpg://"
        in (SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    )


def test_every_process_running_pipeline_code_uses_the_one_lesa_image() -> None:
    images = {SERVICES[name]["image"] for name in PIPELINE_SERVICES}
    assert images == {"lesa:latest"}
    builds = [SERVICES[name]["build"] for name in PIPELINE_SERVICES if "build" in SERVICES[name]]
    assert len(builds) == 1
    assert (ROOT / "infra" / builds[0]["dockerfile"]).parent.parent == ROOT / "infra"
    assert (ROOT / builds[0]["dockerfile"]).is_file()


def test_the_pipeline_environment_puts_any_config_on_minio_and_the_dask_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _command("prefect-worker") == ["python", "-m", "flows.deployments"]
    environment = SERVICES["prefect-worker"]["environment"]
    for name in ENVIRONMENT_SETTINGS:
        monkeypatch.setenv(name, environment[name])
    config = load_config(DEFAULT_CONFIG)
    bucket = re.search(
        r"mc mb --ignore-existing lesa/([\w.-]+)", SERVICES["minio-bucket"]["entrypoint"]
    )
    assert bucket is not None
    assert config.storage.root == f"s3://{bucket.group(1)}"
    scheduler = _command("dask-scheduler")
    port = scheduler[scheduler.index("--port") + 1]
    assert config.features.dask.address == f"tcp://dask-scheduler:{port}"
    assert _command("dask-worker")[2] == config.features.dask.address


def test_pipeline_processes_reach_minio_through_the_aws_variables_storage_reads() -> None:
    environment = SERVICES["prefect-worker"]["environment"]
    assert environment.items() <= SERVICES["dask-worker"]["environment"].items()
    minio_port = SERVICES["minio"]["ports"][0].split(":")[1]
    assert environment["AWS_ENDPOINT_URL"] == f"http://minio:{minio_port}"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(environment)
    assert environment["PREFECT_API_URL"].startswith("http://prefect-server:4200")


def test_the_image_copies_every_installed_package() -> None:
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", dockerfile, flags=re.MULTILINE))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages | {"configs"} <= copied
