"""Model versions: a retrain adds a version and keeps the earlier ones, pointers follow, a rerun
of the same inputs reuses its version, evaluate/predict pick a version, --keep never deletes
what a pointer names."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import models as models_cli
from flows import predict as predict_cli
from flows import predict_flow
from tasks import model_versions
from tasks.model_versions import ModelVersionError, pointer, prune, resolve, versions
from tests.helpers.training_inputs import Synthetic, synthetic, train


@pytest.fixture
def local(tmp_path: Path) -> Synthetic:
    return synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def longer(inputs: Synthetic, steps: int):
    """Train with other trainer settings: a new training key, as a retrain on new data gives."""
    return train(inputs, trainer=inputs.config.train.model_copy(update={"steps": steps}))


def test_a_retrain_adds_a_version_and_keeps_the_earlier_one(local: Synthetic) -> None:
    storage = local.storage
    first = train(local)
    second = longer(local, 4)
    assert (first.model_version, second.model_version) == ("v0001", "v0002")
    assert not second.reused and second.training_key != first.training_key
    for url in [*first.checkpoints.values(), *second.checkpoints.values()]:
        assert storage.exists(url), url
    found = versions(storage, "tiny")
    assert [v.version for v in found] == ["v0001", "v0002"]
    assert [v.training_key for v in found] == [first.training_key, second.training_key]
    assert found[1].steps == 4 and found[1].checkpoints == second.checkpoints
    assert found[0].config_hash != found[1].config_hash
    assert found[0].dataset == "synthetic" and found[0].feature_key == local.features.key
    assert pointer(storage, "tiny", "latest") == "v0002"
    best = max(found, key=lambda v: (v.select_metric, int(v.version[1:])))
    assert pointer(storage, "tiny", "best") == best.version
    assert all(v.select_metric == v.metrics["best_metric"] for v in found)


def test_the_same_inputs_reuse_their_version_and_move_latest(local: Synthetic) -> None:
    storage = local.storage
    train(local)
    longer(local, 4)
    again = train(local)
    assert again.reused and again.model_version == "v0001"
    assert [v.version for v in versions(storage, "tiny")] == ["v0001", "v0002"]
    assert pointer(storage, "tiny", "latest") == "v0001"
    assert resolve(storage, "tiny", "latest").checkpoints == again.checkpoints
    assert resolve(storage, "tiny", "v0002").steps == 4
    with pytest.raises(ModelVersionError, match=r"no model version 'v0009'.*v0001, v0002"):
        resolve(storage, "tiny", "v0009")


def test_prune_keeps_the_newest_and_every_pointer_target(local: Synthetic) -> None:
    storage = local.storage
    first = train(local)
    for steps in (2, 4, 5):
        longer(local, steps)
    storage.write_json(
        storage.url("runs", "tiny", "models", "best.json"), {"version": first.model_version}
    )
    removed = prune(storage, "tiny", keep=1)
    assert removed == ["v0002", "v0003"]
    assert [v.version for v in versions(storage, "tiny")] == ["v0001", "v0004"]
    assert storage.ls(storage.url("runs", "tiny", "models", "v0002"), recursive=True) == []
    assert storage.exists(first.checkpoints["final"])
    with pytest.raises(ValueError, match="at least 1"):
        prune(storage, "tiny", keep=0)


def test_models_cli_lists_and_prunes(local: Synthetic, capsys: pytest.CaptureFixture) -> None:
    train(local)
    longer(local, 4)
    longer(local, 5)
    args = ["--config", str(Path(__file__).parents[2] / "configs" / "tiny.yaml")]
    args += ["--set", f"storage.root={local.storage.root}"]
    args += ["--set", f"storage.cache_dir={local.config.storage.cache_dir}"]
    assert models_cli.main(args) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["v0001", "v0002", "v0003"]
    assert "<- latest" in listed[2]
    assert models_cli.main([*args, "--keep", "1"]) == 0
    out = capsys.readouterr().out
    kept = {pointer(local.storage, "tiny", name) for name in ("latest", "best")} | {"v0003"}
    assert [v.version for v in versions(local.storage, "tiny")] == sorted(kept)
    assert "removed" in out


def test_version_for_key_resumes_an_unfinished_version(local: Synthetic) -> None:
    """A crashed attempt left a running record: the same key trains into that version again."""
    storage = local.storage
    record = storage.url("runs", "tiny", "models", "v0001", "checkpoints", "training.json")
    storage.write_json(record, {"training_key": "k1", "status": "running"})
    assert model_versions.version_for_key(storage, "tiny", "k1") == "v0001"
    assert model_versions.version_for_key(storage, "tiny", "k2") == "v0002"
    assert versions(storage, "tiny") == [], "an unfinished version is not a model yet"


def predict_args(local: Synthetic, *extra: str) -> list[str]:
    return [
        "--images",
        "x.png",
        "--config",
        str(Path(__file__).parents[2] / "configs" / "tiny.yaml"),
        "--set",
        f"storage.root={local.storage.root}",
        *extra,
    ]


def test_predict_takes_the_run_model_version(local: Synthetic) -> None:
    first = train(local)
    second = longer(local, 4)
    parser = predict_cli.build_parser()

    def checkpoint(*extra: str) -> str:
        args = parser.parse_args(predict_args(local, *extra))
        return predict_flow.chosen_checkpoint(parser, args, local.config.storage)

    assert checkpoint() == second.checkpoints["best"], "latest by default"
    assert checkpoint("--model-version", "v0001") == first.checkpoints["best"]
    best = pointer(local.storage, "tiny", "best")
    assert (
        checkpoint("--model-version", "best")
        == resolve(local.storage, "tiny", best).checkpoints["best"]
    )
    with pytest.raises(ModelVersionError, match="v0007"):
        checkpoint("--model-version", "v0007")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--images", "x.png", "--checkpoint", "a.pt", "--model-version", "v0001"], "not both"),
        (["--images", "x.png"], "give --checkpoint"),
    ],
)
def test_predict_needs_one_way_to_name_the_model(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        predict_cli.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
