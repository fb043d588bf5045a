"""Sources that stream: training rows read chunk by chunk from disk, never materialized whole.

A `TrainStream` yields the training rows as `Table`s (the in-memory row type), in stream order, unit by
unit: a unit is what a reader can start at without parsing what comes before (a file, a Parquet row
group, a byte block of a text file). Under W processes unit i of the stream belongs to rank i % W, so
each rank reads only its own units. `StreamSplits` pairs the stream with bounded validation and test
tables (at most `--eval-rows` rows each, in memory) and the `Vocabulary` that mapped raw values to ids.
`iter_stream_batches` cuts a rank's lane into batches in a background thread.

How rows are split without materializing (`--split-by`):
- file: the DLRM convention, every file but the last is train; the last file's first half is
  validation and its second half test;
- hash: a row goes to valid when mix64(key) / 2^64 < valid_frac, to test when it is below
  valid_frac + test_frac, else train; the key is the row's user (`--user-col`, so a user's rows stay in
  one split) or its (unit, row) position;
- time: `--time-col` cut by the span of times the Parquet metadata records (min t0, max t1, span
  S = t1 - t0): rows at or after t1 - test_frac * S are test, the valid_frac * S before them valid, the
  earlier rows train (fractions of the time span, not of the rows: no pass over the data is needed);
- auto: file when the source has at least two files, else hash.
Validation and test are the first `eval_rows` rows of their part in stream order.
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
from c2al.data.schema import JaggedColumn, Schema, Table
from c2al.data.vocab import KeyCounter, Vocabulary, mix64
from c2al.errors import C2ALError

if TYPE_CHECKING:
    from c2al.config import Config

SPLIT_RULES = ("auto", "file", "hash", "time")
DENSE_SAMPLE_ROWS = 100_000  # rows of train that fit the dense standardization of a table stream


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

    def map(self, fn: Callable[[Table], Table]) -> "TrainStream":
        """A stream whose chunks are fn(chunk) (e.g. the mined cohort ids added)."""
        return MappedStream(self, fn)


def _check_lane(rank: int, world_size: int, skip: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise C2ALError(f"rank {rank} is not in [0, {world_size})")
    if skip < 0:
        raise C2ALError(f"skip must be >= 0 rows, got {skip}")


class MappedStream(TrainStream):
    """Another stream's chunks through `fn`."""

    def __init__(self, inner: TrainStream, fn: Callable[[Table], Table]) -> None:
        self.inner, self.fn = inner, fn
        self.schema, self.rows = inner.schema, inner.rows

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
        _check_lane(rank, world_size, skip)
        n = len(self.table)
        for a in range(rank * self.unit_rows, n, world_size * self.unit_rows):
            b = min(a + self.unit_rows, n)
            if skip >= b - a:
                skip -= b - a
                continue
            yield self.table.take(np.arange(a + skip, b))
            skip = 0


# ---------------------------------------------------------------- raw chunks and readers


@dataclass
class RawChunk:
    """Rows of one unit as read, before the vocabulary.

    Attributes:
        unit: index of the unit in the reader's units.
        start: row offset of the first row inside its unit.
        labels: float32 [n] (0/1, checked by the reader).
        dense: float32 or float64 [n, n_dense] (Criteo: already log(1 + max(x, 0)); tables: raw).
        keys: per sparse field uint64 [n] raw keys; missing: per field bool [n].
        user_keys: int64 [n] the row's user (0 without a user column).
        times: int64 [n] event times, or None.
        frame: the cohort-feature columns (categorical-by-role ones as 'category'), or None.
    """

    unit: int
    start: int
    labels: np.ndarray
    dense: np.ndarray
    keys: dict[str, np.ndarray]
    missing: dict[str, np.ndarray]
    user_keys: np.ndarray
    times: np.ndarray | None = None
    frame: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "RawChunk":
        """Rows `idx` (a bool mask or indices)."""
        frame = None if self.frame is None else self.frame.iloc[idx].reset_index(drop=True)
        return replace(self, labels=self.labels[idx], dense=self.dense[idx], keys={k: v[idx] for k, v in self.keys.items()},
                       missing={k: v[idx] for k, v in self.missing.items()}, user_keys=self.user_keys[idx],
                       times=None if self.times is None else self.times[idx], frame=frame)

    def positions(self) -> np.ndarray:
        """int64 [n] row index inside the unit."""
        return self.start + np.arange(len(self), dtype=np.int64)


class Reader(ABC):
    """A source on disk cut into units; subclasses read one unit's raw chunks.

    Attributes:
        name: the source, for the schema and errors.
        sparse: sparse field names; dense: dense names; cohort: cohort-feature column names.
        sides: per sparse field its side ("user" / "context").
        has_user: whether rows carry a user key; time_range: (t0, t1) from metadata, or None.
        counts_cheap: whether unit_rows reads only metadata (a text file's lines must be counted).
        standardize_dense: whether dense columns are standardized (tables) or used as read (Criteo).
        default_hash_size: embeddings per field when --hash-size is not given.
    """

    name: str
    sparse: tuple[str, ...]
    dense: tuple[str, ...] = ()
    cohort: tuple[str, ...] = ()
    sides: dict[str, str]
    has_user: bool = False
    time_range: tuple[int, int] | None = None
    standardize_dense: bool = False
    default_hash_size: int = 1_000_000
    counts_cheap: bool = True  # unit_rows reads only metadata (False: it scans the bytes)

    @abstractmethod
    def units(self) -> list[str]:
        """Every unit of the source in order, described for errors."""

    @abstractmethod
    def unit_rows(self, i: int) -> int | None:
        """Rows of unit i when known without parsing (metadata, shapes, newline counts), else None."""

    @abstractmethod
    def unit_file(self, i: int) -> int:
        """Index of the file (day) unit i belongs to."""

    @abstractmethod
    def read(self, i: int, start: int = 0) -> Iterator[RawChunk]:
        """The raw chunks of unit i from its row `start` on (bounded size each); C2ALError names file and line / row group."""

    @property
    def n_files(self) -> int:
        n = len(self.units())
        return self.unit_file(n - 1) + 1 if n else 0

    def file_offset(self, i: int) -> int | None:
        """Rows of unit i's file before unit i, when every earlier unit's count is known."""
        total = 0
        for j in range(i - 1, -1, -1):
            if self.unit_file(j) != self.unit_file(i):
                break
            n = self.unit_rows(j)
            if n is None:
                return None
            total += n
        return total


# ---------------------------------------------------------------- which rows a part keeps


class RowFilter(ABC):
    """The rows of one split part ("train", "valid", "test")."""

    @abstractmethod
    def unit_kept(self, reader: Reader, i: int) -> int | None:
        """Rows of unit i this part keeps when known without parsing (0: the unit is not read), else None."""

    def used(self, reader: Reader, i: int) -> bool:
        """Whether unit i may hold rows of this part, decided without reading it (a training lane deals these units)."""
        return True

    @abstractmethod
    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        """bool [n] rows of `raw` this part keeps (None: all of them)."""


class AllRows(RowFilter):
    """Every row (a source with only a training part)."""

    def unit_kept(self, reader: Reader, i: int) -> int | None:
        return reader.unit_rows(i)

    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        return None


@dataclass
class FileSplit(RowFilter):
    """Train: every file but the last; valid / test: the first / second half of the last file's rows."""

    part: str
    last_rows: int = 0  # rows of the last file (valid and test only)

    def _range(self) -> tuple[int, int]:
        half = self.last_rows // 2
        return (0, half) if self.part == "valid" else (half, self.last_rows)

    def used(self, reader: Reader, i: int) -> bool:
        return (reader.unit_file(i) == reader.n_files - 1) != (self.part == "train")

    def unit_kept(self, reader: Reader, i: int) -> int | None:
        last = reader.unit_file(i) == reader.n_files - 1
        if self.part == "train":
            return 0 if last else reader.unit_rows(i)
        if not last:
            return 0
        offset, n = reader.file_offset(i), reader.unit_rows(i)
        if offset is None or n is None:
            return None
        lo, hi = self._range()
        return max(0, min(hi, offset + n) - max(lo, offset))

    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        if self.part == "train":
            return None
        pos = raw.positions() + (reader.file_offset(raw.unit) or 0)
        lo, hi = self._range()
        return (pos >= lo) & (pos < hi)


@dataclass
class HashSplit(RowFilter):
    """A row's part from a hash of its user (by_user) or of its (unit, row) position."""

    part: str
    valid_frac: float
    test_frac: float
    by_user: bool

    def _parts(self, keys: np.ndarray) -> np.ndarray:
        u = (mix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
        return np.where(u < self.valid_frac, 1, np.where(u < self.valid_frac + self.test_frac, 2, 0))

    def _keys(self, unit: int, positions: np.ndarray) -> np.ndarray:
        return (np.uint64(unit) << np.uint64(40)) | positions.astype(np.uint64)

    def unit_kept(self, reader: Reader, i: int) -> int | None:
        n = reader.unit_rows(i)
        if self.by_user or n is None:
            return None
        return int((self._parts(self._keys(i, np.arange(n))) == ("train", "valid", "test").index(self.part)).sum())

    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        keys = raw.user_keys.view(np.uint64) if self.by_user else self._keys(raw.unit, raw.positions())
        return self._parts(keys) == ("train", "valid", "test").index(self.part)


@dataclass
class TimeSplit(RowFilter):
    """Rows before `valid_from` are train, from it to `test_from` valid, the rest test."""

    part: str
    valid_from: int
    test_from: int

    def unit_kept(self, reader: Reader, i: int) -> int | None:
        return None

    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        t = raw.times
        lo, hi = {"train": (-np.inf, self.valid_from), "valid": (self.valid_from, self.test_from), "test": (self.test_from, np.inf)}[self.part]
        return (t >= lo) & (t < hi)


# ---------------------------------------------------------------- a reader + vocabulary + part as a stream


def encode_chunk(raw: RawChunk, schema: Schema, vocab: Vocabulary) -> Table:
    """Raw rows -> a Table: sparse ids through the vocabulary, dense standardized where fitted."""
    sparse = {f.name: JaggedColumn.from_ids(vocab.encode(f.name, raw.keys[f.name], raw.missing[f.name])) for f in schema.sparse}
    return Table(sparse=sparse, dense=vocab.standardize(raw.dense).reshape(len(raw), len(schema.dense)),
                 labels=raw.labels.astype(np.float32), user_ids=raw.user_keys.astype(np.int64),
                 cohort_frame=raw.frame, timestamps=raw.times)


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
        self.rows = sum(self._count(i) or 0 for i in self._units) if reader.counts_cheap and isinstance(self.part, (AllRows, FileSplit)) else None

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
        _check_lane(rank, world_size, skip)
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


def read_bounded(reader: Reader, parts: dict[str, RowFilter], schema: Schema, vocab: Vocabulary, eval_rows: int) -> dict[str, Table]:
    """The first `eval_rows` rows of each part, in stream order, in one pass that stops once every part is full."""
    got: dict[str, list[RawChunk]] = {p: [] for p in parts}
    need = dict.fromkeys(parts, eval_rows)
    for i in range(len(reader.units())):
        open_parts = [p for p in parts if need[p] > 0 and parts[p].used(reader, i)
                      and not (isinstance(parts[p], FileSplit) and parts[p].unit_kept(reader, i) == 0)]
        if all(need[p] <= 0 for p in parts):
            break
        if not open_parts:
            continue
        for raw in reader.read(i):
            for p in open_parts:
                m = parts[p].mask(reader, raw)
                rows = np.arange(len(raw)) if m is None else np.flatnonzero(m)
                if need[p] > 0 and len(rows):
                    got[p].append(raw.take(rows[: need[p]]))
                    need[p] -= min(need[p], len(rows))
            if all(need[p] <= 0 for p in open_parts):
                break
    out = {}
    for p, raws in got.items():
        if not raws:
            raise C2ALError(f"{reader.name}: the {p} split is empty (--split-by, --valid-frac / --test-frac)")
        out[p] = concat_tables([encode_chunk(r, schema, vocab) for r in raws])
    return out


def split_filters(reader: Reader, rule: str, valid_frac: float, test_frac: float) -> dict[str, RowFilter]:
    """train / valid / test filters of one split rule (`auto` resolved by the number of files)."""
    if rule not in SPLIT_RULES:
        raise C2ALError(f"--split-by {rule!r}: expected one of {', '.join(SPLIT_RULES)}")
    if rule == "auto":
        rule = "file" if reader.n_files >= 2 else "hash"
    if rule == "file":
        if reader.n_files < 2:
            raise C2ALError(f"--split-by file: {reader.name} has {reader.n_files} file; it needs at least 2 (the last one is valid + test)")
        last = [i for i in range(len(reader.units())) if reader.unit_file(i) == reader.n_files - 1]
        counts = [reader.unit_rows(i) for i in last]
        if any(c is None for c in counts):
            raise C2ALError(f"--split-by file: the rows of {reader.units()[last[0]]} are not known without reading it")
        return {p: FileSplit(p, sum(counts)) for p in ("train", "valid", "test")}  # type: ignore[arg-type]
    if rule == "hash":
        return {p: HashSplit(p, valid_frac, test_frac, reader.has_user) for p in ("train", "valid", "test")}
    if reader.time_range is None:
        raise C2ALError(f"--split-by time: {reader.name} has no time column with recorded min/max (pass --time-col on a Parquet source)")
    t0, t1 = reader.time_range
    span = t1 - t0
    test_from = t1 - test_frac * span
    valid_from = test_from - valid_frac * span
    return {p: TimeSplit(p, valid_from, test_from) for p in ("train", "valid", "test")}  # type: ignore[arg-type]


def build_vocabulary(reader: Reader, train: RowFilter, hash_size: tuple[int, ...], min_count: int) -> Vocabulary:
    """Hashing (`hash_size`, or the reader's default) or, with min_count > 0, one counted pass over the train rows."""
    if min_count > 0:
        if hash_size:
            raise C2ALError("--hash-size and --min-count are two kinds of vocabulary: give one of them")
        counter = KeyCounter(reader.sparse)
        for raw in SourceStream(reader, Schema(sparse=()), None, train).raw_chunks():
            for name in reader.sparse:
                counter.add(name, raw.keys[name], raw.missing[name])
        vocab = Vocabulary.counted(counter, min_count)
    else:
        vocab = Vocabulary.hashing(reader.sparse, hash_size or (reader.default_hash_size,))
    if reader.standardize_dense and reader.dense:
        sample, n = [], 0
        for raw in SourceStream(reader, Schema(sparse=()), None, train).raw_chunks():
            sample.append(np.asarray(raw.dense, np.float64)[: DENSE_SAMPLE_ROWS - n])
            n += len(sample[-1])
            if n >= DENSE_SAMPLE_ROWS:
                break
        vocab = vocab.with_dense(reader.dense, np.concatenate(sample) if sample else np.zeros((0, len(reader.dense))))
    return vocab


def schema_of(reader: Reader, vocab: Vocabulary) -> Schema:
    """The reader's fields with table sizes from the vocabulary."""
    from c2al.data.schema import SparseFeature

    sparse = tuple(SparseFeature(f, vocab.num_embeddings(f), side=reader.sides.get(f, "context")) for f in reader.sparse)
    return Schema(sparse=sparse, dense=reader.dense, cohort_features=reader.cohort, name=reader.name)


def stream_splits(reader: Reader, *, split_by: str = "auto", valid_frac: float = 0.1, test_frac: float = 0.1, eval_rows: int = 100_000,
                  hash_size: tuple[int, ...] = (), min_count: int = 0, vocab: Vocabulary | None = None) -> StreamSplits:
    """Split a reader without materializing it: the train stream plus bounded valid / test tables.

    Args:
        reader: a source on disk (criteo text / numpy, Parquet, CSV).
        split_by: auto, file, hash or time (see the module docstring).
        valid_frac: share of rows (hash) or of the time span (time) for validation; test_frac likewise.
        eval_rows: most rows of valid and of test.
        hash_size: embeddings per field (one, or one per sparse field); () = the reader's default.
        min_count: > 0 builds a counted vocabulary in one pass over the train rows.
        vocab: a saved vocabulary to reuse (resume, serving) instead of building one.

    Returns:
        validated StreamSplits.
    """
    if eval_rows < 1:
        raise C2ALError(f"--eval-rows must be >= 1, got {eval_rows}")
    parts = split_filters(reader, split_by, valid_frac, test_frac)
    vocab = vocab or build_vocabulary(reader, parts["train"], hash_size, min_count)
    schema = schema_of(reader, vocab)
    held = read_bounded(reader, {"valid": parts["valid"], "test": parts["test"]}, schema, vocab, eval_rows)
    train = SourceStream(reader, schema, vocab, parts["train"])
    return StreamSplits(schema, train, held["valid"], held["test"], vocab).validate()


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
    return cfg.data.startswith("criteo:") or bool(getattr(cfg, "stream", False))


def open_reader(cfg: Config) -> Reader:
    """The reader of --data (criteo:PATH text or NumPy layout, or a Parquet / CSV table with the role flags)."""
    from c2al.data import criteo, parquet  # they build on this module's Reader

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
    if not is_stream(cfg):
        raise C2ALError(f"--data {cfg.data!r} is not a stream: use criteo:PATH, or --stream with a .parquet / .csv table")
    return stream_splits(open_reader(cfg), split_by=cfg.split_by, valid_frac=cfg.valid_frac, test_frac=cfg.test_frac,
                         eval_rows=cfg.eval_rows, hash_size=tuple(cfg.hash_size), min_count=cfg.min_count, vocab=vocab)
