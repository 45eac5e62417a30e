"""Export a run's checkpoint as a portable one (:mod:`lesa_model.portable`).

What the card needs beyond the weights comes from the pipeline's stores: the word vectors of
the checkpoint's labels (embedded with its own embedding source from their names, exactly as
``flows.predict`` embeds them, so both score alike),
the calibrated thresholds kept beside the checkpoint (when evaluation fitted them for this very
file), the run's last evaluation metrics, and the code version. The result loads with
:meth:`lesa_model.Tagger.from_checkpoint` without this package.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from lesa_model.portable import CARD_FILE, WEIGHTS_FILE, save_portable
from tasks.checkpoints import CheckpointMetadata, load_trained_model
from tasks.evaluation import report_prefix
from tasks.prediction import Predictor, label_vectors
from tasks.reports import LESA_METHOD, METRICS_FILE
from tasks.storage import Storage
from tasks.thresholds import ThresholdsError, read_thresholds
from tasks.versions import file_version

logger = logging.getLogger(__name__)

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked."""


def code_version() -> dict[str, str | None]:
    """The package version and, in a git checkout, the commit the code was run from."""
    try:
        version = package_metadata.version("lesa")
    except package_metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(_SOURCE_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": version, "git_commit": commit}


def _metrics(storage: Storage, meta: CheckpointMetadata) -> dict[str, Any] | None:
    url = f"{report_prefix(storage, meta.run_name)}/{METRICS_FILE}"
    if not storage.exists(url):
        return None
    return {"source": url, "values": storage.read_json(url)["metrics"].get(LESA_METHOD)}


def _thresholds(storage: Storage, checkpoint_url: str) -> dict[str, Any] | None:
    try:
        return read_thresholds(storage, checkpoint_url).document()
    except ThresholdsError as error:
        logger.warning("exported without calibrated thresholds: %s", error)
        return None


def export_checkpoint(checkpoint_url: str, out: str, storage: Storage) -> str:
    """Write ``model.safetensors`` and ``model-card.json`` under ``out`` (folder or URL);
    returns the card's URL (written last: a folder with a card is complete)."""
    try:
        model, meta = load_trained_model(storage, checkpoint_url)
    except (FileNotFoundError, ValueError) as error:
        raise ExportError(str(error)) from error
    if meta.baseline == "eszsl":
        raise ExportError(f"{checkpoint_url} holds an ESZSL map, not a LESA model")
    labels = meta.known_labels
    vectors = label_vectors(labels, Predictor(model, meta, checkpoint_url), storage)
    seen = set(meta.seen_labels)
    extra = {
        "embedding_source": meta.embedding_source.model_dump(mode="json"),
        "label_text": meta.label_text,
        "thresholds": _thresholds(storage, checkpoint_url),
        "metrics": _metrics(storage, meta),
        "code_version": code_version(),
        "provenance": {
            "checkpoint": checkpoint_url,
            "checkpoint_version": file_version(storage, checkpoint_url),
            "run_name": meta.run_name,
            "training_key": meta.training_key,
            "dataset": meta.dataset,
            "feature_key": meta.feature_key,
            "baseline": meta.baseline,
        },
    }
    base = out.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="lesa-export-") as folder:
        save_portable(
            folder,
            model,
            labels=labels,
            seen=[label in seen for label in labels],
            label_vectors=vectors,
            recipe=meta.features.recipe(),
            extra=extra,
        )
        for name in (WEIGHTS_FILE, CARD_FILE):
            storage.upload_file(Path(folder) / name, f"{base}/{name}")
    return f"{base}/{CARD_FILE}"
