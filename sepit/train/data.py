"""Feeding training workers from Ray Data: deterministic order, length buckets, dynamic padding.

Driver side (:func:`load_split`, :func:`training_datasets`): a stage's Parquet split (a local
folder or an object-store prefix, :mod:`sepit.storage`) as a Ray Dataset (training blocks in a
seeded random order) that Ray Train splits across workers with ``streaming_split(equal=True)``
(``get_dataset_shard``) under ``preserve_order``; a small split instead goes into the object
store once as one Arrow table (:class:`TableSplit`), of which each worker reads its own
contiguous equal share.  Either way every worker sees the same rows in the same order on every
run: that is what makes a resumed or restarted run continue exactly where it stopped.  ``val`` is not split by
Ray; each worker takes every ``world``-th row of the first ``world * (n // world)`` rows, so all
ranks evaluate the same number of batches (a ZeRO-3 forward is collective).

Worker side (:class:`EpochFeeder`): rows pass a seeded streaming shuffle buffer, then are
grouped in windows of ``bucket_window`` micro-batches,
sorted by length, cut into micro-batches (each padded only to its own longest row by the task's
collate), and the window's batches shuffled; the generator is seeded by (seed, epoch, rank).
Equal row counts per worker give equal batch counts per worker, so no rank runs out early.  The
data position is (epoch, micro-batches consumed in the epoch); resuming skips that many batches
without collating them.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from sepit.errors import SepitError

if TYPE_CHECKING:
    from sepit.storage import Location

SPLITS = ("train", "val", "test")
#: One collate at a time per process: fast tokenizers refuse concurrent calls ("Already borrowed")
#: and the prefetch thread collates training batches while the loop collates validation ones.
COLLATE_LOCK = threading.Lock()


class DatasetNotFoundError(SepitError, FileNotFoundError):
    """A stage's dataset split is missing; the message names the expected file."""


class EmptySplitError(SepitError, ValueError):
    """A split has too few rows to give every worker a batch."""


def split_path(dataset_dir: str | Path, stage: str, split: str) -> "Location":
    """``DATA/<stage>/<split>.parquet`` (the dataset builder's layout) on any storage
    (:mod:`sepit.storage`: a local folder or an ``s3://`` / ``gs://`` prefix)."""
    from sepit.storage import resolve

    path = resolve(dataset_dir).join(stage, f"{split}.parquet")
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} does not exist: build the dataset first (sepit build-dataset) or point "
            f"data.dataset_dir at a folder holding {stage}/{{train,val,test}}.parquet"
        )
    return path


def load_split(dataset_dir: str | Path, stage: str, split: str, columns: list[str] | None = None):
    """The split as a Ray Dataset (one Parquet file; only ``columns`` are read when given)."""
    import ray.data

    path = split_path(dataset_dir, stage, split)
    # Local files keep Ray's own filesystem choice; object stores pass theirs (endpoint, keys).
    ds = ray.data.read_parquet(path.path, filesystem=None if path.is_local else path.filesystem)
    return ds.select_columns(columns) if columns else ds


def count_rows(dataset_dir: str | Path, stage: str, split: str) -> int:
    """Row count from the Parquet footer (no Ray Data execution)."""
    import pyarrow.parquet as pq

    path = split_path(dataset_dir, stage, split)
    return pq.read_metadata(path.path, filesystem=path.filesystem).num_rows


def training_datasets(
    dataset_dir: str | Path, stage: str, *, seed: int, columns: list[str] | None = None,
    materialize_mb: float = 64.0,
) -> tuple[dict[str, Any], dict[str, int]]:
    """``({"train": split, "val": split}, {"train": rows, "val": rows})`` ready for a TorchTrainer.

    A split whose Parquet file is at most ``materialize_mb`` MB is read once here, by this
    process, into the object store as one Arrow table (:class:`TableSplit`): workers read their
    share from it directly, so no Ray Data execution runs for it (each costs seconds of task
    start-up, 10-20 s on a cold cluster) and Ray Train starts no dataset actors for it (a dataset
    manager and a split coordinator per run, seconds of CPU each).  Larger splits are Ray Datasets
    that stay lazy and stream from storage in the workers, once per epoch; their training blocks
    are put in a seeded random order (fixed across epochs and restarts, a cheap global mix for
    multi-file datasets).  Rows are shuffled per epoch on the worker (:func:`shuffled`).
    """
    import ray
    import ray.data

    from sepit.ray_runtime import set_data_progress_bars

    set_data_progress_bars(False)
    counts = {split: count_rows(dataset_dir, stage, split) for split in ("train", "val")}
    if counts["train"] == 0:
        raise EmptySplitError(f"{split_path(dataset_dir, stage, 'train')} has no rows")
    datasets: dict[str, Any] = {}
    for split in ("train", "val"):
        if split_path(dataset_dir, stage, split).size() <= materialize_mb * 2**20:
            # The file as one table: the same rows in the same order that a Parquet read of a
            # one-row-group file gives, so there is no block order to randomise.
            datasets[split] = TableSplit(ray.put(read_split_table(dataset_dir, stage, split, columns)), counts[split])
        else:
            ds = load_split(dataset_dir, stage, split, columns)
            datasets[split] = ds.randomize_block_order(seed=seed) if split == "train" else ds
    return datasets, counts


class TableSplit:
    """A small split held in the object store as one Arrow table (see :func:`training_datasets`).

    :meth:`shard` is what a worker iterates, with the ``iter_batches`` of a Ray Data shard:
    the ``train`` split gives rank ``r`` rows ``[r * m, (r + 1) * m)`` with ``m = n // world``
    (equal shares, the remainder dropped, as ``streaming_split(equal=True)``); ``val`` gives every
    worker the whole table (:class:`ValidationRows` picks each rank's rows).
    """

    def __init__(self, ref: Any, n_rows: int):
        self.ref, self.n_rows = ref, n_rows

    def shard(self, rank: int = 0, world: int = 1, *, split: bool = True) -> "TableShard":
        if not split:
            return TableShard(self.ref, 0, self.n_rows)
        share = self.n_rows // world
        return TableShard(self.ref, rank * share, (rank + 1) * share)


class TableShard:
    """Rows ``[start, stop)`` of an Arrow table in the object store, read in batches."""

    def __init__(self, ref: Any, start: int, stop: int):
        self.ref, self.start, self.stop = ref, start, stop

    def iter_batches(self, batch_size: int = 256, batch_format: str = "pyarrow",
                     prefetch_batches: int = 0) -> Iterator[Any]:
        import ray

        if batch_format != "pyarrow":
            raise ValueError(f"TableShard gives pyarrow batches, not {batch_format!r}")
        table = ray.get(self.ref)
        for lo in range(self.start, self.stop, batch_size):
            yield table.slice(lo, min(batch_size, self.stop - lo))


def ray_datasets(datasets: dict[str, Any]) -> dict[str, Any]:
    """The splits Ray Train must handle (Ray Datasets); :class:`TableSplit` ones bypass it."""
    return {k: v for k, v in datasets.items() if not isinstance(v, TableSplit)}


def table_splits(datasets: dict[str, Any]) -> dict[str, "TableSplit"]:
    """The splits the workers read straight from the object store."""
    return {k: v for k, v in datasets.items() if isinstance(v, TableSplit)}


def worker_shard(split: str, tables: dict[str, "TableSplit"], rank: int, world: int) -> Any:
    """In a training worker: this rank's iterator over ``split`` (``train`` split across ranks,
    ``val`` whole), from the object store or from Ray Train's dataset shard."""
    if split in tables:
        return tables[split].shard(rank, world, split=split == "train")
    import ray.train

    return ray.train.get_dataset_shard(split)


def read_split_table(dataset_dir: str | Path, stage: str, split: str, columns: list[str] | None = None):
    """The split's Parquet file as one Arrow table, read by this process (no Ray Data tasks)."""
    import pyarrow.parquet as pq

    path = split_path(dataset_dir, stage, split)
    return pq.read_table(path.path, columns=columns, filesystem=path.filesystem)


def data_config(datasets: dict[str, Any] | None = None):
    """Ray Train data config: split only ``train`` (when Ray Train handles it); keep row order
    deterministic."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    split = ["train"] if datasets is None or "train" in datasets else []
    return DataConfig(datasets_to_split=split, execution_options=ExecutionOptions(preserve_order=True))


# --------------------------------------------------------------------------- worker side
def iter_rows(shard: Any, read_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Rows of a Ray Data iterator as plain dicts (lists stay Python lists)."""
    for table in shard.iter_batches(batch_size=read_rows, batch_format="pyarrow", prefetch_batches=1):
        yield from table.to_pylist()


def shuffled(rows: Iterable[dict[str, Any]], buffer_rows: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Seeded streaming shuffle: keep ``buffer_rows`` rows, emit a random one per row read."""
    buf: list[dict[str, Any]] = []
    for row in rows:
        if len(buf) < buffer_rows:
            buf.append(row)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], row = row, buf[j]
        yield row
    for j in rng.permutation(len(buf)):
        yield buf[j]


def bucketed_batches(
    rows: Iterable[dict[str, Any]],
    *,
    micro_batch_size: int,
    window_batches: int,
    length_of: Callable[[dict[str, Any]], int],
    rng: np.random.Generator,
) -> Iterator[list[dict[str, Any]]]:
    """Length-bucketed micro-batches (lists of rows) from a row stream; see the module doc."""
    window: list[dict[str, Any]] = []
    size = micro_batch_size * window_batches

    def flush() -> Iterator[list[dict[str, Any]]]:
        # Stable sort: equal lengths keep stream order, so the result is deterministic.
        order = sorted(range(len(window)), key=lambda i: length_of(window[i]))
        batches = [[window[i] for i in order[s : s + micro_batch_size]] for s in range(0, len(order), micro_batch_size)]
        for j in rng.permutation(len(batches)):
            yield batches[j]

    for row in rows:
        window.append(row)
        if len(window) == size:
            yield from flush()
            window = []
    if window:
        yield from flush()


class EpochFeeder:
    """Collated training micro-batches for one worker, epoch after epoch, resumable.

    ``next_batch()`` returns the next collated batch and sets ``epoch`` / ``batch_in_epoch`` to
    the position *after* it (what a checkpoint records); ``wait_s`` accumulates the time the
    training loop spent waiting for data.  With ``prefetch > 0`` a background thread reads,
    buckets and collates up to that many batches ahead (collation must not draw from the global
    RNGs, whose state belongs to the training loop; the tasks' collates are deterministic).
    """

    def __init__(self, shard: Any, task: Any, *, micro_batch_size: int, window_batches: int,
                 seed: int, rank: int, shuffle_rows: int, epoch: int = 0, batch_in_epoch: int = 0,
                 prefetch: int = 0):
        self.shard, self.task, self.shuffle_rows = shard, task, shuffle_rows
        self.micro_batch_size, self.window_batches = micro_batch_size, window_batches
        self.seed, self.rank = seed, rank
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.prefetch = prefetch
        self.wait_s = 0.0
        self._source: Iterator[tuple[int, int, dict[str, Any]]] | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[list[dict[str, Any]]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        rows = shuffled(iter_rows(self.shard), self.shuffle_rows, rng) if self.shuffle_rows else iter_rows(self.shard)
        it = bucketed_batches(rows, micro_batch_size=self.micro_batch_size,
                              window_batches=self.window_batches, length_of=self.task.row_length, rng=rng)
        for _ in range(skip):  # resume: skip consumed batches without collating them
            if next(it, None) is None:
                break
        return it

    def _produce(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, batch_in_epoch after this batch, batch), forever."""
        epoch, pos = self.epoch, self.batch_in_epoch
        while True:
            produced = False
            for rows in self._epoch_batches(epoch, pos):
                produced = True
                pos += 1
                with COLLATE_LOCK:
                    batch = self.task.collate(rows, train=True)
                yield epoch, pos, batch
            if not produced and pos == 0:
                raise EmptySplitError(f"worker {self.rank} received no training rows; the training split "
                                      f"needs at least one row per worker")
            epoch, pos = epoch + 1, 0  # end of epoch: the next one starts from its first batch

    def _fill(self) -> None:
        try:
            for item in self._produce():
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the training loop, which raises it
            self._queue.put(exc)

    def next_batch(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.prefetch:
            if self._queue is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                threading.Thread(target=self._fill, name=f"batch-prefetch-{self.rank}", daemon=True).start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        else:
            if self._source is None:
                self._source = self._produce()
            item = next(self._source)
        self.epoch, self.batch_in_epoch, batch = item
        self.wait_s += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (it may be blocked on a full queue)."""
        self._stop.set()


class ValidationRows:
    """This rank's validation rows, read once per worker and kept in memory.

    Rows ``rank, rank + world, ...`` of the first ``world * (n_rows // world)`` rows, so every
    rank runs the same number of batches; length-sorted for less padding.
    """

    def __init__(self, shard: Any, task: Any, *, n_rows: int, rank: int, world: int):
        self.shard, self.task = shard, task
        self.n_rows, self.rank, self.world = n_rows, rank, world
        self._rows: list[dict[str, Any]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            usable = self.world * (self.n_rows // self.world)
            mine = [r for i, r in enumerate(iter_rows(self.shard)) if i < usable and i % self.world == self.rank]
            self._rows = sorted(mine, key=self.task.row_length)
        return self._rows

    def batches(self, micro_batch_size: int, max_batches: int = 0) -> Iterator[dict[str, Any]]:
        """Length-bucketed validation batches; ``max_batches`` caps them with rows taken evenly
        across the length-sorted rows (the same rows every time, the full length range, not
        just the shortest ones)."""
        rows = self.rows()
        keep = max_batches * micro_batch_size
        if max_batches and len(rows) > keep:
            rows = [rows[(i * len(rows)) // keep] for i in range(keep)]
        starts = range(0, len(rows), micro_batch_size)
        for s in starts:
            with COLLATE_LOCK:
                batch = self.task.collate(rows[s : s + micro_batch_size], train=False)
            yield batch
