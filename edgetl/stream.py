"""Streaming inputs for training (TensorFlow): images decoded from their files batch by batch, cached features on disk.

Nothing here holds a whole data set in memory: a ``tf.data`` pipeline maps file indices to images, decoding and
resizing them in parallel with :func:`edgetl.data.load_image` (the one decoder used everywhere: training, export
samples, verify), so training sees exactly the pixels a device is later checked on. The order is deterministic for a
given seed (``tf.data`` keeps the element order of a parallel map; shuffles are seeded). The head phase's features
go to raw float32 files (:class:`FeatureFile`) and are read back by row, a batch at a time (``os.pread``, not a
memory map, so pages read are not kept resident in this process).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgetl._tfenv import tf as _tf
from edgetl.data import load_image, load_images
from edgetl.errors import DataError


def shard_options(ds):
    """Multi-worker input: shard by element (the pipeline starts from indices, not files)."""
    tf = _tf()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


class BadImages:
    """Collects the images a pipeline could not decode (thread-safe: the decoder runs in tf.data's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reasons: dict[int, tuple[Path, str]] = {}

    def add(self, index: int, path: Path, reason: str) -> None:
        with self._lock:
            self.reasons[index] = (path, reason)

    def raise_unless(self, skip_bad: bool) -> None:
        """DataError naming (up to 3 of) all unreadable images, unless ``skip_bad`` (the same line load_images gives)."""
        if self.reasons and not skip_bad:
            bad = [self.reasons[i][1] for i in sorted(self.reasons)]
            shown = "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
            raise DataError(f"{len(bad)} unreadable image(s): {shown}", "fix or remove them, or pass --skip-bad-images")


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def image_dataset(
    items: Sequence[tuple[Path, int]],
    size: tuple[int, int],
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    targets: np.ndarray | None = None,
    augment=None,
    bad: BadImages | None = None,
    as_float: bool = True,
):
    """Batches of ``(images, targets)`` decoded from ``items``' files in parallel, in a deterministic order.

    ``shuffle_seed``: reshuffled each epoch (seeded); ``targets`` default the integer labels; ``augment``: a Keras
    model applied per batch. With ``bad``, an unreadable file yields a black image and a False flag as a third
    element (and is recorded in ``bad``) instead of failing the pipeline.
    """
    tf = _tf()
    paths = [str(p) for p, _ in items]
    labels = np.array([label for _, label in items], dtype=np.int64)
    targets = labels if targets is None else targets
    height, width = size

    def decode(index):
        i = int(index)
        try:
            return load_image(paths[i], size), True
        except DataError as exc:
            if bad is None:
                raise
            bad.add(i, Path(paths[i]), exc.message)
            return np.zeros((height, width, 3), np.uint8), False

    def load(index):
        image, ok = tf.numpy_function(decode, [index], (tf.uint8, tf.bool), stateful=False)
        image.set_shape((height, width, 3))
        ok.set_shape(())
        return image, tf.gather(targets_t, index), ok

    targets_t = tf.constant(targets)
    ds = tf.data.Dataset.range(len(paths))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    # decoding is CPU-bound: one call per core from the first batch on (AUTOTUNE ramps up over the first ~1-2 s)
    ds = ds.map(load, num_parallel_calls=_cores()).batch(batch_size)
    if as_float:
        ds = ds.map(lambda x, y, ok: (tf.cast(x, tf.float32), y, ok), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        ds = ds.map(lambda x, y, ok: (augment(x, training=True), y, ok), num_parallel_calls=tf.data.AUTOTUNE)
    if bad is None:
        ds = ds.map(lambda x, y, ok: (x, y))
    return shard_options(ds.prefetch(2))


def load_at(items: Sequence[tuple[Path, int]], indices, size: tuple[int, int]) -> np.ndarray:
    """Decode only the images at ``indices`` (sample, calibration and BatchNorm images); unreadable ones skipped."""
    picked = [items[int(i)] for i in indices]
    try:
        return load_images(picked, size, skip_bad=True).images
    except DataError:  # none readable
        return np.zeros((0, size[0], size[1], 3), np.uint8)


class FeatureFile:
    """Rows of float32 features appended to a raw file, read back by row index (for training, a batch at a time)."""

    def __init__(self, path: Path, width: int):
        self.path = Path(path)
        self.width = width
        self.rows = 0
        self._row_bytes = 4 * width
        self._fh = open(self.path, "wb")
        self._fd: int | None = None

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        assert rows.ndim == 2 and rows.shape[1] == self.width, rows.shape
        self._fh.write(rows.tobytes())
        self.rows += len(rows)

    def finish(self) -> None:
        self._fh.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.width), np.float32)
        rb = self._row_bytes
        for j, i in enumerate(indices):
            out[j] = np.frombuffer(os.pread(self._fd, rb, int(i) * rb), np.float32)
        return out

    def read_all(self) -> np.ndarray:
        """Every row, in one read (files that fit the in-memory budget, tests)."""
        return np.fromfile(self.path, np.float32, count=self.rows * self.width).reshape(self.rows, self.width)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def feature_dataset(
    files: Sequence[FeatureFile],
    targets: np.ndarray,
    batch_size: int,
    shuffle_seed: int | None = None,
    in_memory_bytes: int | None = None,
):
    """Batches of ``(features, targets)`` over the rows of ``files`` (one after the other).

    The rows are held in memory when they take at most ``in_memory_bytes`` (default
    :data:`edgetl.config.FEATURES_IN_MEMORY_BYTES`), else read from disk a batch at a time. Both paths batch the
    same index sequence, so they give the same batches in the same order."""
    from edgetl.config import FEATURES_IN_MEMORY_BYTES

    tf = _tf()
    sizes = [f.rows for f in files]
    starts = np.cumsum([0] + sizes)
    total = int(starts[-1])
    assert len(targets) == total, (len(targets), total)
    width = files[0].width
    budget = FEATURES_IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes

    def read(index_batch):
        idx = np.asarray(index_batch)
        out = np.empty((len(idx), width), np.float32)
        which = np.searchsorted(starts, idx, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            out[sel] = files[k].read(idx[sel] - starts[k])
        return out

    def load_from_disk(index_batch):
        x = tf.numpy_function(read, [index_batch], tf.float32, stateful=False)
        x.set_shape((None, width))
        return x, tf.gather(targets_t, index_batch)

    def load_from_memory(index_batch):
        return tf.gather(rows_t, index_batch), tf.gather(targets_t, index_batch)

    targets_t = tf.constant(targets)
    if total * width * 4 <= budget:
        rows_t = tf.constant(
            np.concatenate([f.read_all() for f in files]) if total else np.zeros((0, width), np.float32)
        )
        load = load_from_memory
    else:
        load = load_from_disk
    ds = tf.data.Dataset.range(total)
    if shuffle_seed is not None:
        ds = ds.shuffle(total, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return shard_options(ds.prefetch(2))
