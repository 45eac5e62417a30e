"""In-memory batch source: reproducible shuffles, complete coverage, storage order unshuffled."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from lesa_model.data import (
    BatchSource,
    DeviceFeed,
    Prefetch,
    TensorBatchSource,
    epoch_order,
    windowed_order,
)


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


def test_windowed_order_permutes_whole_blocks_then_rows_within_windows() -> None:
    sizes = [3, 1, 4, 2, 5, 3, 2]
    blocks = np.repeat(np.arange(len(sizes)) * 10, sizes)  # ids need not be consecutive
    plan = windowed_order(blocks, 2, shuffle=True, seed=4, epoch=1)
    assert sorted(plan.order.tolist()) == list(range(len(blocks)))
    windows = list(plan.windows())
    assert len(windows) == 4 and plan.ends[-1] == len(blocks)
    block_sets = [set(blocks[w].tolist()) for w in windows]
    assert [len(b) for b in block_sets] == [2, 2, 2, 1], "each window holds whole blocks"
    for window, members in zip(windows, block_sets, strict=True):
        assert len(window) == sum(sizes[b // 10] for b in members)
    again = windowed_order(blocks, 2, shuffle=True, seed=4, epoch=1)
    np.testing.assert_array_equal(plan.order, again.order)
    other = windowed_order(blocks, 2, shuffle=True, seed=4, epoch=2)
    assert plan.order.tolist() != other.order.tolist()
    ordered = windowed_order(blocks, 3, shuffle=False)
    assert ordered.order.tolist() == list(range(len(blocks)))
    assert ordered.ends.tolist() == [8, 18, 20]


def test_windowed_order_is_a_uniform_shuffle_over_blocks() -> None:
    """Over many epochs, each block leads the epoch about equally often (a uniform
    permutation of all blocks, not only of nearby ones)."""
    blocks = np.repeat(np.arange(6), 2)
    firsts = [
        int(blocks[windowed_order(blocks, 1, shuffle=True, epoch=e).order[0]]) for e in range(600)
    ]
    counts = np.bincount(firsts, minlength=6)
    assert counts.min() > 60 and counts.max() < 140  # 100 expected each


def _thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def test_prefetch_yields_in_order_and_raises_the_producer_error() -> None:
    assert list(Prefetch(lambda: range(7), depth=2, name="t-ok")) == list(range(7))

    def failing() -> Iterator[int]:
        yield 1
        raise KeyError("broken shard")

    feed = Prefetch(failing, depth=1, name="t-error")
    assert next(feed) == 1
    with pytest.raises(KeyError, match="broken shard"):
        next(feed)
    assert "t-error" not in _thread_names()
    with pytest.raises(StopIteration):
        next(feed)


def test_prefetch_stops_its_producer_on_early_stop() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            closed.set()

    with Prefetch(endless, depth=2, name="t-endless") as feed:
        for value in feed:
            if value == 3:
                break
    assert closed.is_set(), "the producer's iterator is closed"
    assert "t-endless" not in _thread_names()


def test_device_feed_skips_consumed_batches_and_keeps_dtypes() -> None:
    batches = ((np.full((2, 1, 3), i, np.float16), np.full((2, 4), 1, np.int8)) for i in range(5))
    with DeviceFeed(batches, torch.device("cpu"), skip=2) as feed:
        got = list(feed)
    assert [index for index, _, _ in got] == [2, 3, 4]
    assert [float(f[0, 0, 0]) for _, f, _ in got] == [2.0, 3.0, 4.0]
    assert all(f.dtype == torch.float16 and y.dtype == torch.int8 for _, f, y in got)
    assert "batch-feed" not in _thread_names()
