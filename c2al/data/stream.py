"""Sources that stream: training rows read chunk by chunk from disk, never materialized whole.

A `TrainStream` yields the training rows as `Table`s (the in-memory row type), in stream order, unit by
unit: a unit is what a reader can start at without parsing what comes before (a file, a Parquet row
group, a byte block of a text file). Under W processes unit i of the stream belongs to rank i % W, so
each rank reads only its own units. `StreamSplits` pairs the stream with bounded validation and test
tables (at most `--eval-rows` rows each, in memory) and the `Vocabulary` that mapped raw values to ids.
`iter_stream_batches` cuts a rank's lane into batches in a background thread.

How rows are split without materializing them (`--split-by`): c2al.data.stream_split.
"""
from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pandas as pd

from c2al.data.batch import Batch, local_batch_size, make_batch
from c2al.data.readers import AllRows, RawChunk, Reader, RowFilter
from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Table
from c2al.data.vocab import Vocabulary
from c2al.errors import C2ALError

if TYPE_CHECKING:
    from c2al.config import Config



# ---------------------------------------------------------------- the stream interface


class TrainStream(ABC):
    """Training rows in stream order, read unit by unit.

    Attributes:
        schema: the fields of every chunk.
        rows: training rows when known cheaply (Parquet metadata, npy shapes), else None.
    """

    schema: Schema
    rows: int | None = None

    @abstractmethod
    def units(self) -> list[str]:
        """The reading units in stream order, described for errors ("day_3.gz bytes 0-67108864", "a.parquet row group 2")."""

    @abstractmethod
    def chunks(self, *, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Table]:
        """This rank's lane of training rows (units i with i % world_size == rank) as Tables, `skip` rows of it skipped first."""

    def map(self, fn: Callable[[Table], Table], schema: Schema | None = None) -> "TrainStream":
        """A stream whose chunks are fn(chunk) (e.g. the mined cohort ids added), under `schema` when fn adds a field."""
        return MappedStream(self, fn, schema)


def _check_lane(rank: int, world_size: int, skip: int, units: list[str]) -> None:
    """A lane exists (rank in [0, W)), skips no negative rows, and every rank has a unit to read."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise C2ALError(f"rank {rank} is not in [0, {world_size})")
    if skip < 0:
        raise C2ALError(f"skip must be >= 0 rows, got {skip}")
    if world_size > len(units):
        where = units[0] if units else "the stream"
        raise C2ALError(f"{where}: {len(units)} reading unit(s) for {world_size} processes, so some would read nothing; use at most "
                        f"{len(units)} processes, or more files (an uncompressed text file is cut into 64 MiB blocks, Parquet into row groups)")


class MappedStream(TrainStream):
    """Another stream's chunks through `fn`."""

    def __init__(self, inner: TrainStream, fn: Callable[[Table], Table], schema: Schema | None = None) -> None:
        self.inner, self.fn = inner, fn
        self.schema, self.rows = schema or inner.schema, inner.rows

    def units(self) -> list[str]:
        return self.inner.units()

    def chunks(self, *, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Table]:
        for chunk in self.inner.chunks(rank=rank, world_size=world_size, skip=skip):
            yield self.fn(chunk)


class TableStream(TrainStream):
    """An in-memory Table as a stream: units are blocks of `unit_rows` consecutive rows.

    Example:
        >>> from c2al.data.synthetic import make_synthetic_splits, SyntheticConfig
        >>> s = make_synthetic_splits(SyntheticConfig(n_rows=3000))  # 2400 training rows: units of 1000, 1000, 400
        >>> stream = TableStream(s.train, s.schema, unit_rows=1000)
        >>> [len(c) for c in stream.chunks(rank=0, world_size=2)]
        [1000, 400]
    """

    def __init__(self, table: Table, schema: Schema, unit_rows: int = 65_536) -> None:
        if unit_rows < 1:
            raise C2ALError(f"unit_rows must be >= 1, got {unit_rows}")
        self.table, self.schema, self.unit_rows, self.rows = table, schema, unit_rows, len(table)

    def units(self) -> list[str]:
        n = len(self.table)
        return [f"rows {a}-{min(a + self.unit_rows, n)}" for a in range(0, n, self.unit_rows)]

    def chunks(self, *, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Table]:
        _check_lane(rank, world_size, skip, self.units())
        n = len(self.table)
        for a in range(rank * self.unit_rows, n, world_size * self.unit_rows):
            b = min(a + self.unit_rows, n)
            if skip >= b - a:
                skip -= b - a
                continue
            yield self.table.take(np.arange(a + skip, b))
            skip = 0


# ---------------------------------------------------------------- raw chunks and readers


# ---------------------------------------------------------------- a reader + vocabulary + part as a stream


def encode_chunk(raw: RawChunk, schema: Schema, vocab: Vocabulary) -> Table:
    """Raw rows -> a Table: sparse ids through the vocabulary, dense standardized where fitted; item_ids are the
    ids of the one item-side field (--item-col), as retrieval metrics count items, else None."""
    sparse = {f.name: JaggedColumn.from_ids(vocab.encode(f.name, raw.keys[f.name], raw.missing[f.name])) for f in schema.sparse}
    items = schema.item_features
    return Table(sparse=sparse, dense=vocab.standardize(raw.dense).reshape(len(raw), len(schema.dense)),
                 labels=raw.labels.astype(np.float32), user_ids=raw.user_keys.astype(np.int64),
                 item_ids=sparse[items[0]].values.copy() if len(items) == 1 else None, cohort_frame=raw.frame, timestamps=raw.times)


class SourceStream(TrainStream):
    """One part (train by default) of a Reader, mapped through a Vocabulary.

    Args:
        reader: the source on disk.
        schema: fields with table sizes from `vocab`.
        vocab: how raw keys become ids (None: only `raw_chunks` work, to build one).
        part: the rows kept (a split rule's train part, or every row).
    """

    def __init__(self, reader: Reader, schema: Schema, vocab: Vocabulary | None, part: RowFilter | None = None) -> None:
        self.reader, self.schema, self.vocab, self.part = reader, schema, vocab, part or AllRows()
        self._units = [i for i in range(len(reader.units())) if self.part.used(reader, i)]
        self._kept: dict[int, int | None] = {}
        self.rows = sum(self._count(i) or 0 for i in self._units) if reader.counts_cheap and self.part.counts_known else None

    def _count(self, i: int) -> int | None:
        """Kept rows of unit i, asked of the part once (a text reader counts lines; only resume needs it)."""
        if i not in self._kept:
            self._kept[i] = self.part.unit_kept(self.reader, i)
        return self._kept[i]

    def units(self) -> list[str]:
        names = self.reader.units()
        return [names[i] for i in self._units]

    def raw_chunks(self, *, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[RawChunk]:
        """This lane's kept rows before the vocabulary; whole units are skipped by their counts where known."""
        _check_lane(rank, world_size, skip, self.units())
        for i in self._units[rank::world_size]:
            kept = self._count(i) if skip else None
            if kept is not None and skip >= kept:
                skip -= kept
                continue
            # without a filter the kept rows are the unit's rows, so the reader can start at row `skip`
            start = skip if kept is not None and isinstance(self.part, AllRows) else 0
            skip -= start
            for raw in self.reader.read(i, start):
                m = self.part.mask(self.reader, raw)
                raw = raw if m is None else raw.take(m)
                if skip:
                    cut = min(skip, len(raw))
                    raw, skip = raw.take(np.arange(cut, len(raw))), skip - cut
                if len(raw):
                    yield raw

    def chunks(self, *, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Table]:
        if self.vocab is None:
            raise C2ALError(f"{self.reader.name}: the stream has no vocabulary yet")
        for raw in self.raw_chunks(rank=rank, world_size=world_size, skip=skip):
            yield encode_chunk(raw, self.schema, self.vocab)


def concat_tables(tables: list[Table]) -> Table:
    """Rows of `tables` one after another (same fields); categorical cohort columns stay 'category'."""
    if len(tables) == 1:
        return tables[0]

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(t, name) for t in tables]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    frame = None
    if all(t.cohort_frame is not None for t in tables):
        frame = pd.concat([t.cohort_frame for t in tables], ignore_index=True)
        for c in tables[0].cohort_frame.columns:
            if isinstance(tables[0].cohort_frame[c].dtype, pd.CategoricalDtype):
                frame[c] = frame[c].astype("category")
    sparse = {k: JaggedColumn(np.concatenate([t.sparse[k].values for t in tables]), np.concatenate([t.sparse[k].lengths for t in tables]))
              for k in tables[0].sparse}
    return Table(sparse=sparse, dense=np.concatenate([t.dense for t in tables]), labels=cat("labels"), user_ids=cat("user_ids"),
                 item_ids=cat("item_ids"), cohort_frame=frame, cohort_ids=cat("cohort_ids"), true_cohorts=cat("true_cohorts"),
                 timestamps=cat("timestamps"))


# ---------------------------------------------------------------- splits of a stream


@dataclass
class StreamSplits:
    """A streamed training part with bounded validation and test tables.

    Attributes:
        schema: the fields (table sizes follow the vocabulary).
        train: the training stream.
        valid: at most eval_rows rows, in memory; test likewise.
        vocab: how raw values became ids (`vocab.save(OUT)` so serving and resume map ids the same way).
    """

    schema: Schema
    train: TrainStream
    valid: Table
    test: Table
    vocab: Vocabulary

    def with_cohorts(self, predict: Callable[[pd.DataFrame], np.ndarray]) -> "StreamSplits":
        """Cohort ids from `predict(cohort_frame)`: the train stream chunk by chunk, valid and test at once."""

        def add(t: Table) -> Table:
            if t.cohort_frame is None:
                raise C2ALError(f"{self.schema.name}: rows carry no cohort features (pass --cohort-features)")
            return t.with_cohorts(predict(t.cohort_frame))

        return StreamSplits(self.schema, self.train.map(add), add(self.valid), add(self.test), self.vocab)

    def with_feature(self, name: str, ids: Callable[[pd.DataFrame], np.ndarray], num_embeddings: int, side: str = "user") -> "StreamSplits":
        """The same splits with one more single-id sparse field `name`, ids(cohort_frame) in [0, num_embeddings) for every
        row (the train stream chunk by chunk): e.g. the mined cohort as an input feature, as `Splits.with_feature` does."""
        schema = replace(self.schema, sparse=(*self.schema.sparse, SparseFeature(name, num_embeddings, side)))

        def add(t: Table) -> Table:
            if t.cohort_frame is None:
                raise C2ALError(f"{self.schema.name}: rows carry no cohort features (pass --cohort-features)")
            return replace(t, sparse={**t.sparse, name: JaggedColumn.from_ids(np.asarray(ids(t.cohort_frame), dtype=np.int64))})

        return StreamSplits(schema, self.train.map(add, schema), add(self.valid), add(self.test), self.vocab)

    def validate(self) -> "StreamSplits":
        """Check valid and test, and read the first training chunk, so most bad files fail before training."""
        self.valid.validate(self.schema, "valid")
        self.test.validate(self.schema, "test")
        first = next(iter(self.train.chunks()), None)
        if first is None:
            raise C2ALError(f"{self.schema.name}: the train split is empty")
        for f in self.schema.sparse:
            v = first.sparse[f.name].values
            if len(v) and (v.min() < 0 or v.max() >= f.num_embeddings):
                raise C2ALError(f"train split: sparse feature {f.name!r} has ids outside [0, {f.num_embeddings})")
        return self


# ---------------------------------------------------------------- batches


def _lane_batches(stream: TrainStream, local: int, rank: int, world_size: int, skip: int) -> Iterator[Batch]:
    """Full local batches of the lane, a chunk's remainder carried into the next chunk, the last partial batch dropped."""
    carry: Table | None = None
    for chunk in stream.chunks(rank=rank, world_size=world_size, skip=skip):
        table = chunk if carry is None else concat_tables([carry, chunk])
        full = len(table) // local
        for b in range(full):
            yield make_batch(table, stream.schema, np.arange(b * local, (b + 1) * local))
        carry = table.take(np.arange(full * local, len(table))) if len(table) > full * local else None


def iter_stream_batches(stream: TrainStream, batch_size: int, *, rank: int = 0, world_size: int = 1,
                        skip_steps: int = 0, prefetch: int = 2) -> Iterator[Batch]:
    """Cut this rank's lane into local batches of batch_size // world_size rows, `prefetch` batches ahead.

    Parsing, the vocabulary and make_batch's collation run in a background thread (prefetch > 0), so
    the training step does not wait on them; prefetch 0 reads in the caller's thread.

    Args:
        stream: the training stream.
        batch_size: the global batch size.
        skip_steps: global steps already taken (resume): skip_steps * local rows of the lane are skipped.
        prefetch: batches read ahead.

    Returns:
        an iterator of Batches (each rank may get a different number: lanes hold different row counts).
    """
    local = local_batch_size(batch_size, world_size)
    if skip_steps < 0 or prefetch < 0:
        raise C2ALError(f"skip_steps and prefetch must be >= 0, got {skip_steps} and {prefetch}")
    batches = _lane_batches(stream, local, rank, world_size, skip_steps * local)
    if prefetch == 0:
        yield from batches
        return
    yield from _prefetched(batches, prefetch)


_DONE = object()


def _prefetched(items: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """`items` produced by a daemon thread into a bounded queue; its exception is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there as if it had read the chunk itself
            put(e)

    thread = threading.Thread(target=work, name="c2al-stream-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)


# ---------------------------------------------------------------- from a Config


def is_stream(cfg: Config) -> bool:
    """Whether --data is read as a stream: criteo:PATH always, a table PATH with --stream."""
    return cfg.data.startswith("criteo:") or cfg.stream


def open_reader(cfg: Config) -> Reader:
    """The reader of --data (criteo:PATH text or NumPy layout, or a Parquet / CSV table with the role flags)."""
    from c2al.data import criteo, parquet  # they import this module (through the split rules)

    if cfg.data.startswith("criteo:"):
        return criteo.open_criteo(cfg.data.split(":", 1)[1], cohort_features=tuple(cfg.cohort_features))
    return parquet.open_table(cfg.data, label=cfg.label, sparse=tuple(cfg.sparse), dense=tuple(cfg.dense), user_col=cfg.user_col,
                              cohort_features=tuple(cfg.cohort_features), time_col=cfg.time_col, item_col=cfg.item_col)


def open_stream(cfg: Config, vocab: Vocabulary | None = None) -> StreamSplits:
    """StreamSplits of --data (criteo:PATH, or a table PATH with --stream) by --split-by, --hash-size / --min-count, --eval-rows.

    Args:
        cfg: the run's config.
        vocab: a saved vocabulary (Vocabulary.load(OUT) on resume) used instead of building one.

    Raises:
        C2ALError: a bad path, flag or row, naming the file and the line / row group.
    """
    from c2al.data.stream_split import stream_splits  # the split rules build on this module's streams

    if not is_stream(cfg):
        raise C2ALError(f"--data {cfg.data!r} is not a stream: use criteo:PATH, or --stream with a .parquet / .csv table")
    return stream_splits(open_reader(cfg), split_by=cfg.split_by, valid_frac=cfg.valid_frac, test_frac=cfg.test_frac,
                         eval_rows=cfg.eval_rows, hash_size=tuple(cfg.hash_size), min_count=cfg.min_count, vocab=vocab)
