"""What the trainer and inference consume: batches of region features and labels.

Any object with ``num_images`` and ``batches(...)`` is a :class:`BatchSource`, so the trainer can
stream from memory (:class:`TensorBatchSource`) or from HDF5 shards
(``tasks.feature_reader.FeatureBatches``) alike. The shuffled order is a pure function of
(seed, epoch) (:func:`epoch_order`, :func:`windowed_order`), which is what makes an interrupted
run resumable exactly: the trainer replays the epoch's order and skips the batches it already
consumed. :class:`Prefetch` runs a producer in a background thread, a bounded number of items
ahead; :class:`DeviceFeed` uses it to stage batches (pinned on CUDA) while the device computes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from lesa_model.validation import check_label_values

Batch = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]
"""(features float (B, R, D), labels int8 (B, C) in {1, -1, 0}); numpy or torch."""


@runtime_checkable
class BatchSource(Protocol):
    """A dataset of (region features, labels) that yields batches in a reproducible order."""

    @property
    def num_images(self) -> int:
        """Number of images the source holds."""
        ...

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterator[Batch]:
        """Yield consecutive batches covering every image once, the last one possibly smaller.

        With ``shuffle`` the images come in ``epoch_order(num_images, seed, epoch)``; without it
        in storage order (what inference relies on to align scores with image ids). A
        ``batch_size`` below 1 is a ``ValueError``.
        """
        ...


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled image order of one epoch: the same (seed, epoch) always gives the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


@dataclass(frozen=True)
class WindowedOrder:
    """One epoch's order of a block-stored source: ``order`` (N,) is the position of every image
    in the order batches take them; window ``w`` is ``order[ends[w - 1]:ends[w]]`` (``ends[-1] ==
    N``), the images of ``window`` whole blocks, so a reader loads one window at a time."""

    order: np.ndarray
    ends: np.ndarray

    def windows(self) -> Iterator[np.ndarray]:
        """The positions of each window, in batch order."""
        start = 0
        for end in self.ends:
            yield self.order[start:end]
            start = int(end)


def windowed_order(
    blocks: np.ndarray, window: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
) -> WindowedOrder:
    """The order of an epoch over images stored in blocks (``blocks[i]``: image i's block id).

    Shuffled, every block of the source is permuted (a uniform permutation of all blocks, of
    all shards), the images are grouped by block in that order, and the images of every run
    of ``window`` consecutive blocks are permuted uniformly among themselves. Every image comes
    exactly once, and a batch draws from the ``window`` blocks (random blocks of the whole
    source) around it. Unshuffled, images come in their given order, cut into windows wherever
    ``window`` block changes have been seen. A pure function of its arguments, so the same
    (seed, epoch) gives the same order in every process, whichever reader replays it.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 block, got {window}")
    blocks = np.asarray(blocks)
    if not shuffle:
        changes = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
        ends = np.append(changes[window - 1 :: window], len(blocks))
        return WindowedOrder(np.arange(len(blocks)), np.unique(ends))
    rng = np.random.default_rng([seed, epoch])
    _, inverse = np.unique(blocks, return_inverse=True)
    rank_of_block = rng.permutation(int(inverse.max()) + 1 if len(inverse) else 0)
    rank = rank_of_block[inverse]
    order = np.argsort(rank, kind="stable")
    sizes = np.bincount(rank, minlength=len(rank_of_block))
    ends = np.cumsum(sizes)[window - 1 :: window]
    ends = np.unique(np.append(ends, len(blocks)))
    start = 0
    for end in ends:
        order[start:end] = order[start:end][rng.permutation(int(end) - start)]
        start = int(end)
    return WindowedOrder(order, ends)


def batch_count(num_images: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be partial)."""
    return -(-num_images // batch_size)


class TensorBatchSource:
    """In-memory :class:`BatchSource` over a features tensor (N, R, D) and labels (N, C)."""

    def __init__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels)
        if features.ndim != 3:
            raise ValueError(f"features must be (N, R, D), got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if labels.ndim != 2:
            raise ValueError(f"labels must be (N, C), got shape {tuple(labels.shape)}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"features hold {features.shape[0]} images but labels {labels.shape[0]}"
            )
        check_label_values(labels)
        self.features = features
        self.labels = labels.to(torch.int8)

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = (
            torch.from_numpy(epoch_order(self.num_images, seed, epoch))
            if shuffle
            else torch.arange(self.num_images)
        )
        for start in range(0, self.num_images, batch_size):
            index = order[start : start + batch_size]
            yield self.features[index], self.labels[index]


T = TypeVar("T")
_ITEM, _DONE, _ERROR = range(3)


class Prefetch(Generic[T]):
    """Iterate ``produce()`` in a background thread, at most ``depth`` items ahead.

    An exception in the producer is raised by the consumer's next ``next()``; closing (the
    ``with`` block's end, an early ``break`` inside it, an exception in the consumer) stops the
    producer at its next item, closes its iterator and joins the thread, so no thread outlives
    its consumer.
    """

    def __init__(self, produce: Callable[[], Iterable[T]], depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[int, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce: Callable[[], Iterable[T]]) -> None:
        items: Iterable[T] = ()
        try:
            items = produce()
            for item in items:
                if not self._put((_ITEM, item)):
                    return
            self._put((_DONE, None))
        except BaseException as error:  # handed to the consumer, which raises it
            self._put((_ERROR, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self.close()
        if kind == _ERROR:
            raise value  # type: ignore[misc]
        raise StopIteration

    def close(self) -> None:
        """Stop the producer and wait for its thread to end."""
        self._finished = True
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _staged(value: np.ndarray | torch.Tensor, pin: bool) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    return tensor.pin_memory() if pin and tensor.device.type == "cpu" else tensor


class DeviceFeed(Prefetch[tuple[int, torch.Tensor, torch.Tensor]]):
    """``(index, features, labels)`` of ``batches`` on ``device``, ``depth`` batches ahead.

    A background thread makes each batch a tensor (pinned when the device is CUDA) while the
    device works on the previous one; the copy to the device is asynchronous (``non_blocking``)
    and features keep their dtype (float16 stays float16 until the trainer widens it on the
    device). The first ``skip`` batches (already consumed before a resume) are not staged.
    """

    def __init__(
        self, batches: Iterable[Batch], device: torch.device, *, skip: int = 0, depth: int = 2
    ) -> None:
        self.device = device
        pin = device.type == "cuda"

        def staged() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            try:
                for index, (features, labels) in enumerate(batches):
                    if index >= skip:
                        yield index, _staged(features, pin), _staged(labels, pin)
            finally:  # a source reading ahead (its own prefetch thread) stops now, not at GC
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

        super().__init__(staged, depth, name="batch-feed")

    def __next__(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        index, features, labels = super().__next__()
        return (
            index,
            features.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
        )
