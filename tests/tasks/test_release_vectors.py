"""The authors' NUS-WIDE label vectors as an embedding source: rows named by the metadata lists.

The shipped file holds 1,000 tag rows and 81 concept rows, 75 of the tag rows equal to concept
rows (the tags that are also concepts). A miniature NUS-WIDE metadata folder names them the same
way, so the test checks each label gets its own L2-normalised row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.config import load_config
from tasks.datasets.nuswide import CONCEPT_LIST, TAG_LIST, nuswide_vocabulary
from tasks.embeddings import (
    RELEASE_VECTORS,
    EmbeddingConfig,
    EmbeddingSourceError,
    NusWideRelease,
    embed_labels,
)
from tasks.storage import Storage, StorageConfig

REPO = Path(__file__).resolve().parents[2]


def _release_rows() -> tuple[np.ndarray, np.ndarray]:
    with np.load(RELEASE_VECTORS) as arrays:
        return arrays["tags1k"], arrays["concepts81"]


def _names() -> tuple[list[str], list[str]]:
    """Tag and concept names shaped like the official lists: a tag row equal to a concept row
    is that concept's tag (in upper case for one, to check names are matched lower-cased)."""
    tags, concepts = _release_rows()
    concept_names = [f"concept{j}" for j in range(len(concepts))]
    tag_names = []
    for i, row in enumerate(tags):
        same = np.flatnonzero(np.abs(concepts - row).max(axis=1) < 1e-6)
        tag_names.append(concept_names[same[0]] if len(same) else f"tag{i}")
    tag_names[tag_names.index("concept0")] = "CONCEPT0"
    return tag_names, concept_names


def _metadata(root: Path, tags: list[str], concepts: list[str]) -> Path:
    for relative, names in ((TAG_LIST, tags), (CONCEPT_LIST, concepts)):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("".join(f"{name}\r\n" for name in names))
    return root


def test_each_label_gets_its_normalised_release_row(tmp_path: Path) -> None:
    tags, concepts = _names()
    metadata = _metadata(tmp_path / "nus", tags, concepts)
    vocabulary = nuswide_vocabulary([tag.lower() for tag in tags], concepts)
    assert (vocabulary["seen"].sum(), (~vocabulary["seen"]).sum()) == (925, 81)
    config = EmbeddingConfig(source=NusWideRelease(metadata=str(metadata)))
    result = embed_labels(vocabulary, config, Storage(StorageConfig(root=str(tmp_path / "s"))))

    tag_rows, concept_rows = _release_rows()
    expected = {name.lower(): row for name, row in zip(tags, tag_rows, strict=True)}
    expected |= dict(zip(concepts, concept_rows, strict=True))
    labels = vocabulary["label"].tolist()
    vectors = result.vectors(labels)
    reference = np.stack([expected[label] for label in labels])
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, reference, rtol=1e-5, atol=1e-6)
    assert result.dim == 300 and result.coverage == 1.0


def test_lists_that_do_not_fit_the_file_are_refused(tmp_path: Path) -> None:
    tags, concepts = _names()
    metadata = _metadata(tmp_path / "nus", tags[:-1], concepts)
    vocabulary = nuswide_vocabulary(tags[:-1], concepts)
    config = EmbeddingConfig(source=NusWideRelease(metadata=str(metadata)))
    with pytest.raises(EmbeddingSourceError, match="tags1k holds 1000 vectors but the metadata"):
        embed_labels(vocabulary, config, Storage(StorageConfig(root=str(tmp_path / "s"))))


def test_nus_wide_configs_take_the_metadata_of_their_dataset() -> None:
    for name in ("nus-wide.yaml", "nus-wide-release.yaml"):
        config = load_config(REPO / "configs" / name, {"dataset.metadata": "/data/nus-wide"})
        source = config.embeddings.source
        assert isinstance(source, NusWideRelease)
        assert source.metadata == "/data/nus-wide"
        assert source.identity == "nus-wide-release"  # the same on every machine
