"""Calibrated thresholds kept beside their checkpoint, versioned with it.

Evaluation fits them (:func:`calibrate`) on the validation split's seen labels and writes
``<checkpoint>.thresholds.json`` next to the checkpoint with the checkpoint's content version;
prediction reads them back (:func:`read_thresholds`) and refuses a file made for other weights
(a retrained ``best.pt`` would otherwise be tagged with its predecessor's thresholds). The
fitting rule is :mod:`lesa_model.calibration`'s.
"""

from __future__ import annotations

import logging

import numpy as np

from lesa_model.calibration import MIN_POSITIVES, Thresholds, fit_thresholds
from lesa_model.inference import score
from lesa_model.model import LESA
from tasks.stage_inputs import StageInputs, split_source
from tasks.storage import Storage
from tasks.versions import file_version

logger = logging.getLogger(__name__)

SUFFIX = ".thresholds.json"


class ThresholdsError(ValueError):
    """No usable calibrated thresholds for a checkpoint."""


def thresholds_url(checkpoint_url: str) -> str:
    """``.../best.pt`` -> ``.../best.thresholds.json``."""
    return checkpoint_url.removesuffix(".pt") + SUFFIX


def calibrate(
    model: LESA,
    inputs: StageInputs,
    storage: Storage,
    checkpoint_url: str,
    *,
    batch_size: int,
    min_positives: int = MIN_POSITIVES,
) -> Thresholds | None:
    """Fit thresholds on the validation split and store them beside the checkpoint.

    Returns None (and writes nothing) when the split has no image with features or no
    positive annotation: then there is nothing to fit on, which is said in the log.
    """
    seen = inputs.seen_labels
    source = split_source(inputs.tables, inputs.feature_store(storage), "val", seen)
    if source is None or not (source.labels == 1).any():
        logger.warning("no validation positives: thresholds not calibrated for %s", checkpoint_url)
        return None
    scores = score(model, source, inputs.embeddings.vectors(seen), batch_size=batch_size)
    thresholds = fit_thresholds(scores, source.labels, seen, min_positives=min_positives)
    document = {
        **thresholds.document(),
        "checkpoint_version": file_version(storage, checkpoint_url),
        "validation_images": int(source.num_images),
    }
    storage.write_json(thresholds_url(checkpoint_url), document)
    logger.info(
        "thresholds: %d of %d seen labels fitted on %d validation images, global %.4g",
        int(np.sum(thresholds.fitted)),
        len(seen),
        source.num_images,
        thresholds.global_threshold,
    )
    return thresholds


def read_thresholds(storage: Storage, checkpoint_url: str) -> Thresholds:
    """The calibrated thresholds of a checkpoint, checked against its current content.

    Raises:
        ThresholdsError: none stored, or stored for another version of the checkpoint.
    """
    url = thresholds_url(checkpoint_url)
    if not storage.exists(url):
        raise ThresholdsError(
            f"no calibrated thresholds for {checkpoint_url} ({url} is missing); evaluate the "
            "run to fit them on its validation split, or give a number to --threshold"
        )
    document = storage.read_json(url)
    current = file_version(storage, checkpoint_url)
    if document.get("checkpoint_version") != current:
        raise ThresholdsError(
            f"{url} was fitted for checkpoint version {document.get('checkpoint_version')!r}, "
            f"but {checkpoint_url} is now {current!r}; evaluate the run again to refit them"
        )
    return Thresholds.from_document(document)
