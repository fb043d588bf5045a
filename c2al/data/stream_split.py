"""Splits of a stream without materializing it, and the vocabulary built from its training part.

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

from dataclasses import dataclass

import numpy as np

from c2al.data.readers import RawChunk, Reader, RowFilter
from c2al.data.schema import Schema, SparseFeature, Table
from c2al.data.stream import SourceStream, StreamSplits, concat_tables, encode_chunk
from c2al.data.vocab import KeyCounter, Vocabulary, mix64
from c2al.errors import C2ALError

SPLIT_RULES = ("auto", "file", "hash", "time")
DENSE_SAMPLE_ROWS = 100_000  # rows of train that fit the dense standardization of a table stream


@dataclass
class FileSplit(RowFilter):
    """Train: every file but the last; valid / test: the first / second half of the last file's rows."""

    part: str
    last_rows: int = 0  # rows of the last file (valid and test only)
    counts_known = True

    def _range(self) -> tuple[int, int]:
        half = self.last_rows // 2
        return (0, half) if self.part == "valid" else (half, self.last_rows)

    def used(self, reader: Reader, i: int) -> bool:
        return (reader.unit_file(i) == reader.n_files - 1) != (self.part == "train")

    def skips(self, reader: Reader, i: int) -> bool:
        return not self.used(reader, i) or self.unit_kept(reader, i) == 0

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

    def _window(self) -> tuple[float, float]:
        return {"train": (-np.inf, self.valid_from), "valid": (self.valid_from, self.test_from), "test": (self.test_from, np.inf)}[self.part]

    def unit_kept(self, reader: Reader, i: int) -> int | None:
        """From the unit's recorded min / max time: all its rows, none, or (straddling the cut) unknown."""
        span = reader.unit_time_range(i)
        if span is None:
            return None
        lo, hi = self._window()
        if span[1] < lo or span[0] >= hi:
            return 0
        return reader.unit_rows(i) if lo <= span[0] and span[1] < hi else None

    def used(self, reader: Reader, i: int) -> bool:
        return self.unit_kept(reader, i) != 0

    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        lo, hi = self._window()
        return (raw.times >= lo) & (raw.times < hi)


def read_bounded(reader: Reader, parts: dict[str, RowFilter], schema: Schema, vocab: Vocabulary, eval_rows: int) -> dict[str, Table]:
    """The first `eval_rows` rows of each part, in stream order, in one pass that stops once every part is full."""
    got: dict[str, list[RawChunk]] = {p: [] for p in parts}
    need = dict.fromkeys(parts, eval_rows)
    for i in range(len(reader.units())):
        open_parts = [p for p in parts if need[p] > 0 and not parts[p].skips(reader, i)]
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
