"""In-memory batch source: reproducible shuffles, complete coverage, storage order unshuffled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesa_model.data import BatchSource, TensorBatchSource, epoch_order


def _source(n: int = 11) -> TensorBatchSource:
    features = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 3).clone()
    labels = np.ones((n, 4), dtype=np.int8)
    return TensorBatchSource(features, labels)


def _ids(source: TensorBatchSource, **kwargs) -> list[int]:
    return [int(v) for f, _ in source.batches(4, **kwargs) for v in f[:, 0, 0]]


def test_order_depends_on_seed_and_epoch_only() -> None:
    source = _source()
    assert isinstance(source, BatchSource)
    first = _ids(source, shuffle=True, seed=3, epoch=1)
    assert first == _ids(source, shuffle=True, seed=3, epoch=1)
    assert first == epoch_order(11, 3, 1).tolist()
    assert first != _ids(source, shuffle=True, seed=3, epoch=2)
    assert sorted(first) == list(range(11))
    assert _ids(source, shuffle=False) == list(range(11))
    sizes = [len(f) for f, _ in source.batches(4, shuffle=False)]
    assert sizes == [4, 4, 3]
    assert all(labels.dtype == torch.int8 for _, labels in source.batches(4, shuffle=False))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(N, R, D\)"):
        TensorBatchSource(np.zeros((3, 4)), np.zeros((3, 2), dtype=np.int8))
    with pytest.raises(ValueError, match="3 images but labels 2"):
        TensorBatchSource(np.zeros((3, 1, 4)), np.zeros((2, 2), dtype=np.int8))
    with pytest.raises(ValueError, match="1, -1 or 0"):
        TensorBatchSource(np.zeros((3, 1, 4)), np.full((3, 2), 5, dtype=np.int8))
    with pytest.raises(ValueError, match="integer"):
        TensorBatchSource(np.zeros((3, 1, 4)), np.zeros((3, 2)))
