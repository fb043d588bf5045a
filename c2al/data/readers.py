"""What a streaming source on disk provides: units, raw chunks, and which rows of a unit a split part keeps.

A `Reader` cuts its source into units (what it can start at without parsing what comes before: a file,
a Parquet row group, a byte block of a text file) and reads one unit as `RawChunk`s of bounded size:
labels, dense values and each sparse field's raw uint64 keys, before any vocabulary. A `RowFilter`
says which rows a split part keeps (c2al.data.stream_split holds the split rules); `AllRows` keeps all.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterator

import numpy as np
import pandas as pd


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

    def unit_time_range(self, i: int) -> tuple[int, int] | None:
        """(min, max) event time of unit i from metadata, or None (a time split then reads the unit to know)."""
        return None

    @cached_property
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
    """The rows of one split part ("train", "valid", "test").

    Attributes:
        counts_known: whether `unit_kept` is known for every unit without parsing (the stream's `rows`).
    """

    counts_known: bool = False

    @abstractmethod
    def unit_kept(self, reader: Reader, i: int) -> int | None:
        """Rows of unit i this part keeps when known without parsing (0: the unit is not read), else None."""

    def used(self, reader: Reader, i: int) -> bool:
        """Whether unit i may hold rows of this part, decided without reading it (a training lane deals these units)."""
        return True

    def skips(self, reader: Reader, i: int) -> bool:
        """Whether unit i surely holds none of this part's rows (read_bounded passes it by)."""
        return not self.used(reader, i)

    @abstractmethod
    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        """bool [n] rows of `raw` this part keeps (None: all of them)."""


class AllRows(RowFilter):
    """Every row (a source with only a training part)."""

    counts_known = True

    def unit_kept(self, reader: Reader, i: int) -> int | None:
        return reader.unit_rows(i)

    def mask(self, reader: Reader, raw: RawChunk) -> np.ndarray | None:
        return None
