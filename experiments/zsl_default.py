"""Zero-shot experiments on the embedded default's extracted features (issue 11).

Trains and evaluates LESA variants and the baselines in-process with ``lesa_model`` on the
features a default run already extracted (no re-extraction), with several seeds each, and
prints one table: validation (seen F1@5 and the pseudo-unseen mAP every choice is made on) and
test (ZSL mAP, GZSL mAP, ZSL/GZSL F1@5), mean +- sample standard deviation over seeds.

Every run is a JSON line in ``--out``; a rerun skips the (variant, seed) pairs already there, so
the script can be stopped and continued, and ``--table`` only prints. Choices are made on the
validation columns only; the test split is the dataset's, untouched.

    PYTHONPATH=$PWD .venv/bin/python experiments/zsl_default.py --root /tmp/sci-default \\
        --variants lesa-default,mean-pool,eszsl,random --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lesa_model.baselines import mean_pool_grid, tune_eszsl, tune_mean_pool
from lesa_model.config import LossConfig, ModelConfig, TrainerConfig
from lesa_model.data import TensorBatchSource
from lesa_model.inference import score
from lesa_model.metrics import evaluate_zero_shot
from lesa_model.model import LESA
from lesa_model.trainer import Trainer
from tasks import schemas
from tasks.datasets.emoji_vocabulary import emoji_labels
from tasks.embeddings import KumoGlove, load_keyed_vectors, tokenize_label
from tasks.feature_reader import FeatureStore
from tasks.storage import Storage, StorageConfig

DATASET = "emoji-scenes"
KS = (3, 5)
STOPWORDS = frozenset({"and", "of", "with", "in", "at", "on", "the", "a", "for"})


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The default run's splits in memory (float16 features) and its labels."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    seen: list[str]
    unseen: list[str]
    pooled: dict[str, np.ndarray]


def _feature_dir(root: Path) -> Path:
    found = sorted((root / "features" / DATASET).glob("*/manifest.parquet"))
    if not found:
        raise SystemExit(f"no extracted features under {root}/features/{DATASET}")
    return found[0].parent


def load_data(root: Path, cache: Path) -> Data:
    """Read the label table and features once; later runs load the cached arrays."""
    vocabulary = pd.read_parquet(root / "datasets" / DATASET / "vocabulary.parquet")
    seen = vocabulary.loc[vocabulary["seen"], "label"].tolist()
    unseen = vocabulary.loc[~vocabulary["seen"], "label"].tolist()
    cache.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    if not (cache / "test_x.npy").exists():
        table = pd.read_parquet(root / "datasets" / DATASET / "labels.parquet")
        storage = Storage(StorageConfig(root=str(root)))
        store = FeatureStore(str(_feature_dir(root) / "manifest.parquet"), storage)
        for split in ("train", "val", "test"):
            rows = table[table["split"] == split]
            names = seen if split != "test" else seen + unseen
            np.save(cache / f"{split}_x.npy", store.read(rows["image_id"].tolist()))
            np.save(cache / f"{split}_y.npy", schemas.label_matrix(rows, names))
    for split in ("train", "val", "test"):
        arrays[f"{split}_x"] = np.load(cache / f"{split}_x.npy")
        arrays[f"{split}_y"] = np.load(cache / f"{split}_y.npy")
    pooled = {
        split: np.asarray(arrays[f"{split}_x"], dtype=np.float32).mean(axis=1)
        for split in ("train", "val", "test")
    }
    return Data(
        train=(np.asarray(arrays["train_x"]), arrays["train_y"]),
        val=(np.asarray(arrays["val_x"]), arrays["val_y"]),
        test=(np.asarray(arrays["test_x"]), arrays["test_y"]),
        seen=seen,
        unseen=unseen,
        pooled=pooled,
    )


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def label_vectors(labels: list[str], text: str) -> np.ndarray:
    """(C, 50) unit vectors of the labels, from the label word and, optionally, more text.

    ``label``: the label word (what the pipeline embeds). ``label+name``: the mean of the label
    word's vector and the vector of its emoji's Unicode name (stopwords dropped).
    ``label+name+family``: the same with the family's words added as a third part.
    """
    keyed = load_keyed_vectors(KumoGlove())
    entries = {entry.label: entry for entry in emoji_labels()}

    def words_vector(words: list[str]) -> np.ndarray | None:
        known = [word for word in words if word in keyed.key_to_index and word not in STOPWORDS]
        return _unit(np.mean([keyed[word] for word in known], axis=0)) if known else None

    rows = []
    for label in labels:
        parts = [words_vector(tokenize_label(label))]
        if text in ("label+name", "label+name+family"):
            parts.append(words_vector(tokenize_label(unicodedata.name(entries[label].glyph))))
        if text == "label+name+family":
            parts.append(words_vector(tokenize_label(entries[label].family)))
        rows.append(_unit(np.mean([part for part in parts if part is not None], axis=0)))
    return np.asarray(rows, dtype=np.float32)


# -- runs ------------------------------------------------------------------------------------

DEFAULT_MODEL = {"num_modules": 10, "input_projection": 256, "hidden_dim": 128}
DEFAULT_TRAIN = {"steps": 800, "batch_size": 32, "val_every": 200, "checkpoint_every": 200,
                 "log_every": 50, "select": "F1@5"}  # fmt: skip
HOLDOUT = {"holdout_share": 0.2}
"""The pseudo-unseen protocol every LESA variant is compared under (holdout seed = run seed)."""


@dataclass(frozen=True)
class Variant:
    kind: str
    model: dict[str, Any]
    loss: dict[str, Any]
    train: dict[str, Any]
    text: str = "label"
    grid: dict[str, Any] | None = None
    readouts: tuple[tuple[str, int | None], ...] = ()
    """LESA: the (selection rule, longest training) pairs read off the curve, one row each."""


HOLDOUT_READOUTS = (("F1@5", 800), ("mix:0.5", 800), ("holdout", 800), ("F1@5", 400))


def _lesa(model=None, loss=None, train=None, text="label", holdout=True) -> Variant:
    train_cfg = {**DEFAULT_TRAIN, **(HOLDOUT if holdout else {}), **(train or {})}
    readouts = HOLDOUT_READOUTS if holdout else (("F1@5", 800), ("F1@5", 400), ("last", 800))
    return Variant(
        "lesa", {**DEFAULT_MODEL, **(model or {})}, loss or {}, train_cfg, text, None, readouts
    )


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"l2.label_projection": x}`` -> ``{"l2": {"label_projection": x}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return out


def _configs(variant: Variant, seed: int) -> tuple[ModelConfig, LossConfig, TrainerConfig]:
    train = {**variant.train, "seed": seed, "device": "cpu"}
    if train.get("holdout_share"):
        train["holdout_seed"] = seed
    return (
        ModelConfig(**variant.model),
        LossConfig(**_nested(variant.loss)),
        TrainerConfig(**train),
    )


def _test_metrics(scores: np.ndarray, data: Data) -> dict[str, dict[str, float]]:
    seen = np.arange(len(data.seen))
    unseen = np.arange(len(data.seen), len(data.seen) + len(data.unseen))
    return evaluate_zero_shot(scores, data.test[1], seen, unseen, KS)


def run_lesa(variant: Variant, seed: int, data: Data, workdir: Path) -> dict[str, Any]:
    """Train once and score the test split at every validation step (the curve).

    Any selection rule and any shorter training (a prefix: the rate is constant) can then be
    read off the curve offline (:func:`select_point`) exactly as the trainer would choose.
    """
    model_cfg, loss_cfg, train_cfg = _configs(variant, seed)
    vectors = label_vectors(data.seen + data.unseen, variant.text)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LESA(data.train[0].shape[2], vectors.shape[1], model_cfg, grid=(7, 7))
    trainer = Trainer(model, vectors[: len(data.seen)], train_cfg, loss_cfg, workdir, val_ks=KS)
    test = TensorBatchSource(*data.test)
    curve: list[dict[str, Any]] = []

    def on_record(record: dict[str, float]) -> None:
        if "val_mAP" in record and (not curve or curve[-1]["step"] != record["step"]):
            point = {k: v for k, v in record.items() if k.startswith("val_") or k == "step"}
            scores = score(trainer.model, test, vectors, batch_size=500)
            curve.append(point | {"test": _test_metrics(scores, data)})

    trainer.progress = on_record
    result = trainer.fit(TensorBatchSource(*data.train), TensorBatchSource(*data.val))
    chosen = next(point for point in curve if point["step"] == result.best_step)
    return {
        "best_step": result.best_step,
        "val": {k: v for k, v in chosen.items() if k.startswith("val_")},
        "test": chosen["test"],
        "curve": curve,
    }


def select_point(curve: list[dict[str, Any]], rule: str, max_step: int | None) -> dict[str, Any]:
    """The validation point a selection rule keeps (``>=``: the later of equal values).

    Rules: ``F1@5``, ``mAP`` (seen labels), ``holdout`` (pseudo-unseen mAP), ``mix:W``
    (``W * holdout + (1 - W) * F1@5``), ``last``.
    """
    points = [p for p in curve if max_step is None or p["step"] <= max_step]

    def value(point: dict[str, Any]) -> float:
        if rule == "last":
            return point["step"]
        if rule == "holdout":
            return point["val_holdout_mAP"]
        if rule.startswith("mix:"):
            weight = float(rule.removeprefix("mix:"))
            return weight * point["val_holdout_mAP"] + (1 - weight) * point["val_F1@5"]
        return point[f"val_{rule}"]

    best = points[0]
    for point in points[1:]:
        if value(point) >= value(best):
            best = point
    return best


def run_mean_pool(variant: Variant, seed: int, data: Data, workdir: Path) -> dict[str, Any]:
    model_cfg, loss_cfg, train_cfg = _configs(variant, seed)
    vectors = label_vectors(data.seen + data.unseen, variant.text)
    grid = variant.grid or {}
    fit = tune_mean_pool(
        (data.pooled["train"], data.train[1]),
        (data.pooled["val"], data.val[1]),
        vectors[: len(data.seen)],
        model_cfg=model_cfg,
        loss_cfg=loss_cfg,
        trainer_cfg=train_cfg,
        candidates=mean_pool_grid(grid["lr"], grid["steps"], grid["l2"]),
        checkpoint_root=workdir,
        ks=KS,
    )
    source = TensorBatchSource(data.pooled["test"][:, None, :], data.test[1])
    scores = score(fit.model, source, vectors)
    validation = next(r for r in fit.result.history if r["step"] == fit.result.best_step)
    return {
        "best_step": fit.result.best_step,
        "chosen": fit.candidate.name,
        "trials": fit.trials,
        "val": {k: v for k, v in validation.items() if k.startswith("val_")},
        "test": _test_metrics(scores, data),
    }


def run_eszsl(variant: Variant, seed: int, data: Data, workdir: Path) -> dict[str, Any]:
    _, _, train_cfg = _configs(variant, seed)
    vectors = label_vectors(data.seen + data.unseen, variant.text)
    grid = variant.grid or {}
    fit = tune_eszsl(
        (data.pooled["train"], data.train[1]),
        (data.pooled["val"], data.val[1]),
        vectors[: len(data.seen)],
        train_cfg,
        gammas=grid["gamma"],
        lams=grid["lam"],
        ks=KS,
    )
    return {
        "chosen": f"gamma{fit.gamma:g}-lam{fit.lam:g}",
        "val": fit.validation,
        "test": _test_metrics(fit.scores(data.pooled["test"], vectors), data),
    }


def run_random(variant: Variant, seed: int, data: Data, workdir: Path) -> dict[str, Any]:
    scores = np.random.default_rng(seed).random(data.test[1].shape, dtype=np.float32)
    return {"val": {}, "test": _test_metrics(scores, data)}


RUNNERS: dict[str, Callable[[Variant, int, Data, Path], dict[str, Any]]] = {
    "lesa": run_lesa, "mean-pool": run_mean_pool, "eszsl": run_eszsl, "random": run_random,
}  # fmt: skip

MEAN_POOL_GRID = {"lr": [1e-3, 3e-3, 1e-2], "steps": [800], "l2": [0.0, 1e-1, 1.0]}
"""The pipeline's grid (``tasks.baselines.BaselineTuning``) at LESA's budget (``train.steps``);
the selection picks the best validation step along each run."""
ESZSL_GRID = {"gamma": [10.0**k for k in range(7)], "lam": [10.0**k for k in range(-3, 4)]}
RANK_ONLY = {"div": 0.0, "rel": 0.0, "dist": 0.0}


def _baseline(kind: str, select: dict[str, Any], text: str = "label") -> Variant:
    grid = MEAN_POOL_GRID if kind == "mean-pool" else ESZSL_GRID
    train = {**DEFAULT_TRAIN, **select}
    return Variant(kind, dict(DEFAULT_MODEL), {}, train, text, grid)


MIX = {"select": "mix", "select_seen": "F1@5", "select_weight": 0.5}
L2 = "l2.label_projection", "l2.input_projection"
VARIANTS: dict[str, Variant] = {
    "random": Variant("random", {}, {}, {}),
    "eszsl": _baseline("eszsl", {}),
    "eszsl-mix": _baseline("eszsl", {**HOLDOUT, **MIX}),
    "mean-pool": _baseline("mean-pool", {}),
    "mean-pool-mix": _baseline("mean-pool", {**HOLDOUT, **MIX}),
    # configs/default.yaml's model, training and selection (no pseudo-unseen labels)
    "lesa-default": _lesa(holdout=False),
    # the pseudo-unseen protocol: 20% of the seen labels held out (train.seed's split)
    "lesa-holdout": _lesa(),
    "lesa-l2-1e-1": _lesa(loss=dict.fromkeys(L2, 1e-1)),
    "lesa-l2-1": _lesa(loss=dict.fromkeys(L2, 1.0)),
    "lesa-l2-10": _lesa(loss=dict.fromkeys(L2, 10.0)),
    "lesa-name": _lesa(text="label+name"),
    "lesa-family": _lesa(text="label+name+family"),
    "lesa-M1": _lesa(model={"num_modules": 1}),
    "lesa-M3": _lesa(model={"num_modules": 3}),
    "lesa-lr3e-4": _lesa(train={"lr": 3e-4}),
    "lesa-rank-only": _lesa(loss=RANK_ONLY),
    "lesa-release-norm": _lesa(loss={"normalisation": "release"}),
    "eszsl-name": _baseline("eszsl", {**HOLDOUT, **MIX}, "label+name"),
    "eszsl-family": _baseline("eszsl", {**HOLDOUT, **MIX}, "label+name+family"),
}


# -- table -----------------------------------------------------------------------------------

COLUMNS = (
    ("val seen F1@5", ("val", "val_F1@5")),
    ("val seen mAP", ("val", "val_mAP")),
    ("val pseudo-unseen mAP", ("val", "val_holdout_mAP")),
    ("ZSL mAP", ("test", "zsl", "mAP")),
    ("GZSL mAP", ("test", "gzsl", "mAP")),
    ("ZSL F1@5", ("test", "zsl", "F1@5")),
    ("GZSL F1@5", ("test", "gzsl", "F1@5")),
)


def _lookup(record: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = record
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node)


def _rows(record: dict[str, Any], variant: Variant) -> list[tuple[str, dict[str, Any]]]:
    """(row name, values) of one record: one row per readout for LESA, else the record."""
    if variant.kind != "lesa" or "curve" not in record:
        return [(record["variant"], record)]
    rows = []
    for rule, max_step in variant.readouts:
        point = select_point(record["curve"], rule, max_step)
        values = {"val": point, "test": point["test"], "best_step": point["step"]}
        rows.append((f"{record['variant']} [{rule}, <={max_step}]", values))
    return rows


def table(records: list[dict[str, Any]], order: list[str]) -> str:
    """Mean +- sample standard deviation over seeds, one row per (variant, readout)."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    ranked = sorted(
        records, key=lambda r: order.index(r["variant"]) if r["variant"] in order else 1e9
    )
    for record in ranked:
        if record["variant"] not in VARIANTS:
            continue
        for name, values in _rows(record, VARIANTS[record["variant"]]):
            by_row.setdefault(name, []).append(values)
    names = [name for name, _ in COLUMNS]
    lines = ["| variant | seeds | best step | " + " | ".join(names) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 3))
    for name, runs in by_row.items():
        steps = [r["best_step"] for r in runs if r.get("best_step") is not None]
        cells = [f"{np.mean(steps):.0f}" if steps else ""]
        for _, path in COLUMNS:
            values = [v for r in runs if (v := _lookup(r, path)) is not None]
            if not values:
                cells.append("")
                continue
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{100 * np.mean(values):.2f} ± {100 * spread:.2f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/tmp/sci-default"),
        help="storage root of a finished default run (its features are reused)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/zsl-exp/cache"),
        help="where the features are cached as .npy after the first read",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/zsl-exp/results.jsonl"))
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep each run's checkpoints under KEEP/<variant>-<seed>/",
    )
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    args = parser.parse_args(argv)  # fmt: skip
    names = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}")
    if not args.table:
        torch.set_num_threads(args.threads)
        data = load_data(args.root, args.cache)
        done = {(r["variant"], r["seed"]) for r in _read(args.out)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for name in names:
            for seed in [int(s) for s in args.seeds.split(",")]:
                if (name, seed) in done:
                    continue
                variant = VARIANTS[name]
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="zsl-") as scratch:
                    workdir = args.keep / f"{name}-{seed}" if args.keep else Path(scratch)
                    record = RUNNERS[variant.kind](variant, seed, data, workdir)
                record |= {"variant": name, "seed": seed, "seconds": time.perf_counter() - start}
                with args.out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                zsl = 100 * record["test"]["zsl"]["mAP"]
                gzsl = 100 * record["test"]["gzsl"]["mAP"]
                print(f"{name} seed {seed}: ZSL {zsl:.2f} GZSL {gzsl:.2f} "
                      f"({record['seconds']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    print(table(_read(args.out), names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
