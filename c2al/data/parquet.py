"""Tables as streams (`--stream`): a Parquet file or folder of files read row group by row group with
`pyarrow.dataset`, or a CSV file read in pyarrow blocks, with today's role flags.

Units: a Parquet row group (its row count and the time column's min / max come from the metadata, so
ranks, resume and `--split-by time` need no pass over the data), or a whole CSV file. Sparse columns
(`--sparse`, `--user-col`, `--item-col`) become uint64 keys for the vocabulary whatever their storage
type; the ones named in `--cohort-features` reach the miner as 'category' columns, so an integer-coded
device id is a category, not a number. Dense columns are standardized by the vocabulary (mean and std of
a bounded sample of train rows). Bad input is one C2ALError naming the file and the row group: an
unknown column, a label that is not 0/1, a NaN dense value.

`write_parquet` writes a Criteo-shaped table (label, int_*, cat_*, a user and a time column) for tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from c2al.data.criteo import CAT_NAMES, INT_NAMES, criteo_rows
from c2al.data.readers import RawChunk, Reader
from c2al.data.vocab import text_keys, value_keys
from c2al.errors import C2ALError

CHUNK_ROWS = 1 << 16
MISSING = "(missing)"  # a null categorical cohort value, as the miner sees it
_PARQUET = (".parquet", ".pq")


class ParquetReader(Reader):
    """A Parquet file or folder (units: row groups) or a CSV file (one unit), columns chosen by role.

    Args:
        path: a .parquet / .pq file, a folder of them, or a .csv / .tsv file.
        label: the 0/1 label column; sparse: categorical columns; dense: numeric columns.
        user_col: the user key (hash splits keep a user's rows together); item_col: the item key.
        cohort_features: columns the miner clusters on (default: --user-col).
        time_col: event time (numbers, or timestamps as epoch seconds).
    """

    def __init__(self, path: str | Path, *, label: str, sparse: tuple[str, ...], dense: tuple[str, ...] = (), user_col: str = "",
                 item_col: str = "", cohort_features: tuple[str, ...] = (), time_col: str = "", chunk_rows: int = CHUNK_ROWS) -> None:
        self.path, self.chunk_rows, self.name = Path(path), chunk_rows, Path(path).name
        self.label, self.user_col, self.item_col, self.time_col = label, user_col, item_col, time_col
        keys = [c for c in (user_col, item_col) if c]
        self.sparse = (*keys, *[c for c in sparse if c not in keys])
        self.dense, self.cohort = tuple(dense), tuple(cohort_features) or ((user_col,) if user_col else ())
        self.categorical = set(self.sparse)
        self.sides = {c: "item" if c == item_col else "user" if c == user_col or c in self.cohort else "context" for c in self.sparse}
        self.has_user, self.standardize_dense = bool(user_col), True
        self._dataset = self._open()
        self._check_columns()
        self._groups = self._row_groups()
        files = list(dict.fromkeys(f for f, _, _, _ in self._groups))
        self._file_of = [files.index(f) for f, _, _, _ in self._groups]
        self.counts_cheap = self._csv is False
        self.time_range = self._time_range()

    # ------------------------------------------------------------ opening

    def _open(self) -> ds.Dataset:
        name = self.path.name.lower()
        self._csv = name.endswith((".csv", ".tsv", ".csv.gz"))
        if not self.path.exists():
            raise C2ALError(f"{self.path}: no such file or folder")
        if not self._csv and not (self.path.is_dir() or name.endswith(_PARQUET)):
            raise C2ALError(f"{self.path}: --stream reads a .parquet file or folder, or a .csv / .tsv file")
        try:
            if self._csv:  # types fixed by role: inferred per block, a column could change type mid-file
                parse = pcsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
                types = {**dict.fromkeys(self.dense, pa.float64()), **dict.fromkeys(self.sparse, pa.string()), self.label: pa.float64()}
                convert = pcsv.ConvertOptions(column_types=types)
                return ds.dataset(str(self.path), format=ds.CsvFileFormat(parse_options=parse, convert_options=convert))
            return ds.dataset(str(self.path), format="parquet")
        except (pa.ArrowInvalid, OSError) as e:
            raise C2ALError(f"{self.path}: cannot read the dataset ({str(e).splitlines()[0]})") from e

    def _check_columns(self) -> None:
        available = self._dataset.schema.names
        roles = {"label": [self.label], "sparse": list(self.sparse), "dense": list(self.dense), "cohort feature": list(self.cohort),
                 "time column": [self.time_col] if self.time_col else []}
        for role, cols in roles.items():
            for c in cols:
                if c not in available:
                    raise C2ALError(f"{self.path}: unknown column {c!r} given as {role}; available columns: {available}")
        if not self.sparse:
            raise C2ALError(f"{self.path}: a table needs categorical columns: pass --sparse A,B")
        if self.label in (*self.sparse, *self.dense, *self.cohort):
            raise C2ALError(f"{self.path}: the label column {self.label!r} is also given as a feature")

    def _row_groups(self) -> list[tuple[str, int, int, ds.Fragment]]:
        """(file, row group index or -1, rows or -1, fragment) per unit, files in name order."""
        out = []
        for frag in sorted(self._dataset.get_fragments(), key=lambda f: f.path):
            if self._csv:
                out.append((frag.path, -1, -1, frag))
                continue
            for g, piece in enumerate(frag.split_by_row_group()):
                out.append((frag.path, g, piece.row_groups[0].num_rows, piece))
        if not out:
            raise C2ALError(f"{self.path}: no Parquet files")
        return out

    def _time_range(self) -> tuple[int, int] | None:
        """(min, max) of the time column over every row group's statistics, or None."""
        if not self.time_col or self._csv:
            return None
        self._unit_times: list[tuple[int, int]] = []
        for _, _, _, frag in self._groups:
            stats = frag.row_groups[0].statistics.get(self.time_col)
            if not stats or stats.get("min") is None:
                self._unit_times = []
                return None
            self._unit_times.append((_seconds(stats["min"]), _seconds(stats["max"])))
        return min(lo for lo, _ in self._unit_times), max(hi for _, hi in self._unit_times)

    def unit_time_range(self, i: int) -> tuple[int, int] | None:
        """(min, max) of the time column in unit i from its row group's statistics, or None."""
        return self._unit_times[i] if getattr(self, "_unit_times", None) else None

    # ------------------------------------------------------------ units

    def units(self) -> list[str]:
        return [f"{f} row group {g}" if g >= 0 else f for f, g, _, _ in self._groups]

    def unit_rows(self, i: int) -> int | None:
        n = self._groups[i][2]
        return n if n >= 0 else None

    def unit_file(self, i: int) -> int:
        return self._file_of[i]

    def read(self, i: int, start: int = 0) -> Iterator[RawChunk]:
        columns = list(dict.fromkeys([self.label, *self.sparse, *self.dense, *self.cohort, *([self.time_col] if self.time_col else [])]))
        row = 0
        try:
            for batch in self._groups[i][3].to_batches(columns=columns, batch_size=self.chunk_rows):
                if row + batch.num_rows > start:
                    cut = max(0, start - row)
                    yield self._decode(i, row + cut, batch.slice(cut))
                row += batch.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise C2ALError(f"{self.units()[i]}: cannot read ({str(e).splitlines()[0]})") from None

    # ------------------------------------------------------------ decoding

    def _decode(self, i: int, start: int, batch: pa.RecordBatch) -> RawChunk:
        where = self.units()[i]
        keys, missing = {}, {}
        for c in self.sparse:
            keys[c], missing[c] = arrow_keys(batch.column(c))
        user = keys[self.user_col].view(np.int64) if self.user_col else np.zeros(batch.num_rows, np.int64)
        plain = [c for c in dict.fromkeys([self.label, *self.dense, *self.cohort, *([self.time_col] if self.time_col else [])])
                 if c not in self.categorical]
        df = batch.select(plain).to_pandas()
        frame = pd.DataFrame({c: categories(batch.column(c)) if c in self.categorical else df[c]
                              for c in self.cohort}) if self.cohort else None
        times = self._times(df, where, start) if self.time_col else None
        return RawChunk(unit=i, start=start, labels=_labels(df[self.label], where, start), dense=self._dense(df, where, start),
                        keys=keys, missing=missing, user_keys=user, times=times, frame=frame)

    def _dense(self, df: pd.DataFrame, where: str, start: int) -> np.ndarray:
        out = np.zeros((len(df), len(self.dense)), dtype=np.float64)  # [n, n_dense]
        for j, c in enumerate(self.dense):
            if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])):
                raise C2ALError(f"{where}: dense column {c!r} is not numeric (dtype {df[c].dtype})")
            v = df[c].to_numpy(dtype=np.float64, na_value=np.nan)
            if not np.isfinite(v).all():
                raise C2ALError(f"{where}: dense column {c!r} has a NaN or infinite value (row {start + int(np.argmax(~np.isfinite(v)))})")
            out[:, j] = v
        return out

    def _times(self, df: pd.DataFrame, where: str, start: int) -> np.ndarray:
        s = df[self.time_col]
        if pd.api.types.is_datetime64_any_dtype(s):
            s = (s - pd.Timestamp(0, tz=getattr(s.dt, "tz", None))) // pd.Timedelta(seconds=1)
        v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(v).all():
            raise C2ALError(f"{where}: time column {self.time_col!r} has a missing or non-numeric value (row {start + int(np.argmax(~np.isfinite(v)))})")
        return v.astype(np.int64)


def arrow_keys(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """`value_keys` of an Arrow column without a Python object per row: integers as they are, text hashed
    once per distinct value of the chunk (dictionary encoding) and gathered back."""
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(arr.type):
        return pc.fill_null(arr, 0).to_numpy().astype(np.int64).view(np.uint64), missing
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_dictionary(arr.type):
        coded = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
        if not pa.types.is_string(coded.dictionary.type) and not pa.types.is_large_string(coded.dictionary.type):
            distinct, _ = value_keys(coded.dictionary.to_pandas())  # a dictionary of integers
        else:
            distinct = text_keys(coded.dictionary)
        if not len(distinct):
            return np.zeros(len(arr), np.uint64), missing
        return distinct[pc.fill_null(coded.indices, 0).to_numpy()], missing
    return value_keys(arr.to_pandas())


def categories(arr: pa.Array) -> pd.Series:
    """A categorical-by-role column for the miner: 'category' of its values as text, a missing cell the category
    MISSING (the miner refuses NaN, and one null deep in a stream must not stop a run)."""
    text = arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())
    return pc.fill_null(text, MISSING).dictionary_encode().to_pandas()


def _seconds(value: object) -> int:
    """A time statistic (number or datetime) as epoch seconds."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        return int(value)
    return int(pd.Timestamp(value).timestamp())  # type: ignore[arg-type]


def _labels(s: pd.Series, where: str, start: int) -> np.ndarray:
    """float32 [n] 0/1 labels (bools accepted), or a C2ALError naming the first bad row."""
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isin(v, (0.0, 1.0))
    if bad.any():
        r = int(np.argmax(bad))
        value = s.iloc[r].item() if hasattr(s.iloc[r], "item") else s.iloc[r]
        raise C2ALError(f"{where}: label column {s.name!r} must hold only 0 and 1, got {value!r} (row {start + r})")
    return v.astype(np.float32)


def open_table(path: str | Path, *, label: str, sparse: tuple[str, ...], dense: tuple[str, ...] = (), user_col: str = "",
               item_col: str = "", cohort_features: tuple[str, ...] = (), time_col: str = "") -> ParquetReader:
    """The reader of a `--stream` table; a C2ALError when --label is missing."""
    if not label:
        raise C2ALError(f"{path}: a table needs its label column: pass --label COL")
    return ParquetReader(path, label=label, sparse=tuple(sparse), dense=tuple(dense), user_col=user_col, item_col=item_col,
                         cohort_features=tuple(cohort_features), time_col=time_col)


def write_parquet(path: str | Path, rows: int, seed: int = 0, *, row_group_rows: int = 10_000, users: int = 1000,
                  int_cats: bool = False) -> pd.DataFrame:
    """A Criteo-shaped Parquet table (label, int_* with 0 for missing, cat_* strings or integer codes, user, time); returns it.

    Args:
        path: the .parquet file.
        rows: rows written; row_group_rows: rows per row group.
        users: distinct values of the `user` column.
        int_cats: store cat_* as int64 codes (categorical by role, numeric by storage).
    """
    df = criteo_rows(rows, seed)
    rng = np.random.default_rng([seed, 1])
    for c in INT_NAMES:
        df[c] = df[c].fillna(0).astype(np.int64)
    if int_cats:
        for c in CAT_NAMES:
            df[c] = np.array([int(v, 16) if v else 0 for v in df[c]], dtype=np.int64)
    df["user"] = rng.integers(0, users, rows).astype(np.int64)
    df["time"] = np.sort(rng.integers(1_600_000_000, 1_600_000_000 + 86_400 * 30, rows)).astype(np.int64)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(path), row_group_size=row_group_rows)
    return df
