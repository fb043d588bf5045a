"""Criteo click logs as streams: the Kaggle / Terabyte text layout and TorchRec's preprocessed NumPy layout.

Text (`criteo:PATH`, PATH a file, a `.gz`, or a folder of `day_N` files, optionally `.gz`, ordered by N):
one row per line, tab-separated, no header: the 0/1 label, 13 integer features (negative values occur)
and 26 categorical features as hex hashes; an empty cell is a missing value. Columns are named as
TorchRec names them: `label`, `int_0`..`int_12`, `cat_0`..`cat_25`. The integers become dense inputs by
the DLRM reference's transform log(1 + max(x, 0)), missing as 0; the hex hashes become uint64 keys
(parsed vectorized over pyarrow's string buffers) that the vocabulary maps to ids. An uncompressed
file is cut into byte blocks that start at a line, so ranks and resume start inside one file.

NumPy (a folder of `day_N_dense.npy`, `day_N_sparse.npy`, `day_N_labels.npy`, as TorchRec's
`BinaryCriteoUtils.tsv_to_npys` writes them): dense float32 [N, 13] used as stored (TorchRec has
already log-transformed it), sparse int64 [N, 26] raw hashes (0 = missing, as TorchRec writes a
missing cell), labels int32 [N, 1]; files are memory-mapped, never loaded whole.

`write_criteo_text`, `write_criteo_days` and `write_criteo_numpy` write small files of either layout
for tests and benchmarks (power-law categorical values, missing cells, negative integers).
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from c2al.data.readers import RawChunk, Reader
from c2al.data.vocab import mix64
from c2al.errors import C2ALError

N_INT, N_CAT = 13, 26
INT_NAMES = tuple(f"int_{i}" for i in range(N_INT))
CAT_NAMES = tuple(f"cat_{i}" for i in range(N_CAT))
COLUMNS = ("label", *INT_NAMES, *CAT_NAMES)
BLOCK_BYTES = 64 << 20  # a text unit: ranks and resume start at these boundaries (moved to the next line)
BATCH_BYTES = 4 << 20  # pyarrow's parse block: one chunk of about 20k Criteo rows
NPY_UNIT_ROWS = 1 << 20
NPY_CHUNK_ROWS = 1 << 16
_HEX = np.full(256, -1, dtype=np.int16)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
MISSING = "(missing)"  # an empty categorical cohort cell, as the miner sees it
_DAY = re.compile(r"day_(\d+)(\.gz)?$")


def dense_transform(x: np.ndarray) -> np.ndarray:
    """The DLRM reference's log(1 + max(x, 0)) of raw integers (NaN = missing -> 0), float32."""
    return np.log1p(np.maximum(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0), 0.0)).astype(np.float32)


def hex_keys(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, int]:
    """Hex hashes of one binary column -> (uint64 keys [n], missing [n], first bad row or -1), vectorized.

    An empty cell is missing; a cell with a non-hex character or more than 16 digits is bad.
    """
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    lengths = np.diff(offsets)
    missing = lengths == 0
    if n and np.all((lengths == 8) | missing):  # Criteo's 8-digit hashes: the non-missing cells lie back to back
        return _hex8_keys(data[offsets[0] : offsets[-1]], missing)
    width = int(lengths.max()) if n else 0
    if width > 16:
        return np.zeros(n, np.uint64), missing, int(np.argmax(lengths > 16))
    col = np.arange(width)
    inside = col[None, :] < lengths[:, None]  # [n, width]
    nib = _HEX[data[np.minimum(offsets[:-1, None] + col[None, :], len(data) - 1)]]
    bad = (inside & (nib < 0)).any(axis=1)
    if bad.any():
        return np.zeros(n, np.uint64), missing, int(np.argmax(bad))
    shift = np.where(inside, (lengths[:, None] - 1 - col[None, :]) * 4, 0).astype(np.uint64)
    keys = (np.where(inside, nib, 0).astype(np.uint64) << shift).sum(axis=1, dtype=np.uint64)
    return keys, missing, -1


_IS_HEX = _HEX >= 0
_LOW_NIBBLES, _LETTER_BITS = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x0101010101010101)


def _hex8_keys(chars: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """8-digit hex cells packed back to back (uint8 [8 m]) -> (uint64 keys [n], missing, first bad row or -1).

    Each cell is read as one big-endian uint64 and its eight digits packed to 32 bits in a few
    whole-array operations (a digit's value is its low nibble, plus 9 for a letter, whose bit 6 is set).
    """
    keys = np.zeros(len(missing), np.uint64)
    if not len(chars):
        return keys, missing, -1
    ok = _IS_HEX[chars].reshape(-1, 8).all(axis=1)
    if not ok.all():
        return keys, missing, int(np.flatnonzero(~missing)[np.argmin(ok)])
    x = chars.view(">u8").astype(np.uint64)
    v = (x & _LOW_NIBBLES) + np.uint64(9) * ((x >> np.uint64(6)) & _LETTER_BITS)  # one digit value per byte
    v = ((v & np.uint64(0x0F000F000F000F00)) >> np.uint64(4)) | (v & np.uint64(0x000F000F000F000F))  # 2 digits per 16 bits
    v = ((v & np.uint64(0x00FF000000FF0000)) >> np.uint64(8)) | (v & np.uint64(0x000000FF000000FF))  # 4 digits per 32 bits
    keys[~missing] = ((v & np.uint64(0x0000FFFF00000000)) >> np.uint64(16)) | (v & np.uint64(0x000000000000FFFF))
    return keys, missing, -1


def _cohort_sides(cohort: tuple[str, ...]) -> dict[str, str]:
    unknown = [c for c in cohort if c not in COLUMNS[1:]]
    if unknown:
        raise C2ALError(f"--cohort-features {','.join(unknown)}: criteo columns are int_0..int_12 and cat_0..cat_25")
    return {c: "user" for c in cohort if c in CAT_NAMES}


class CriteoTextReader(Reader):
    """Criteo text files (plain or gzip), read in pyarrow blocks, cut into line-aligned byte units.

    Args:
        files: the files in day order.
        cohort: cohort-feature columns (default: the 13 integer features; cat_ columns come as 'category').
        block_bytes: bytes per unit of an uncompressed file; batch_bytes: bytes per parsed chunk.
    """

    def __init__(self, files: list[Path], cohort: tuple[str, ...] = INT_NAMES, block_bytes: int = BLOCK_BYTES,
                 batch_bytes: int = BATCH_BYTES) -> None:
        self.files, self.block_bytes, self.batch_bytes = [Path(f) for f in files], block_bytes, batch_bytes
        self.counts_cheap = False
        self.name = f"criteo:{self.files[0].parent if len(self.files) > 1 else self.files[0]}"
        self.sparse, self.dense, self.cohort = CAT_NAMES, INT_NAMES, tuple(cohort)
        self.sides = _cohort_sides(self.cohort)
        self._spans = [span for f, path in enumerate(self.files) for span in self._blocks(f, path)]
        self._rows: dict[int, int] = {}

    def _blocks(self, f: int, path: Path) -> list[tuple[int, int, int]]:
        """(file, start byte, end byte) per unit; a .gz file is one unit (end -1)."""
        if path.name.endswith(".gz"):
            return [(f, 0, -1)]
        size, starts = path.stat().st_size, [0]
        with open(path, "rb") as fh:
            for nominal in range(self.block_bytes, size, self.block_bytes):
                if nominal <= starts[-1]:
                    continue
                fh.seek(nominal - 1)
                tail = b""
                while b"\n" not in tail and fh.tell() < size:
                    tail += fh.read(1 << 16)
                pos = nominal - 1 + tail.find(b"\n") + 1 if b"\n" in tail else size
                if pos < size:
                    starts.append(pos)
        return [(f, a, b) for a, b in zip(starts, starts[1:] + [size]) if b > a]

    def units(self) -> list[str]:
        return [f"{self.files[f]} bytes {a}-{b}" if b >= 0 else str(self.files[f]) for f, a, b in self._spans]

    def unit_file(self, i: int) -> int:
        return self._spans[i][0]

    def unit_rows(self, i: int) -> int | None:
        """Lines of the unit, counted (not parsed) once and cached."""
        if i not in self._rows:
            lines, last = 0, b"\n"
            for block in self._bytes(i, 1 << 24):
                lines, last = lines + block.count(b"\n"), block[-1:]
            self._rows[i] = lines + int(last != b"\n")  # a last line without its newline
        return self._rows[i]

    def _bytes(self, i: int, size: int) -> Iterator[bytes]:
        f, a, b = self._spans[i]
        opener = gzip.open if b < 0 else open
        with opener(self.files[f], "rb") as fh:
            fh.seek(a)
            left = b - a if b >= 0 else -1
            while left:
                block = fh.read(size if left < 0 else min(size, left))
                if not block:
                    return
                left -= len(block) if left > 0 else 0
                yield block

    def _line_base(self, i: int) -> int:
        """Lines of the file before unit i (for error messages only)."""
        return sum(self.unit_rows(j) or 0 for j in range(i) if self.unit_file(j) == self.unit_file(i))

    def _open(self, i: int) -> pcsv.CSVStreamingReader:
        f, a, b = self._spans[i]
        source = str(self.files[f]) if b < 0 else pa.BufferReader(b"".join(self._bytes(i, 1 << 24)))
        types = {"label": pa.int64(), **dict.fromkeys(INT_NAMES, pa.int64()), **dict.fromkeys(CAT_NAMES, pa.binary())}
        return pcsv.open_csv(source, read_options=pcsv.ReadOptions(column_names=list(COLUMNS), block_size=self.batch_bytes),
                             parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False),
                             convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False))

    def read(self, i: int, start: int = 0) -> Iterator[RawChunk]:
        row = 0
        try:
            reader = self._open(i)
            for batch in reader:
                if row + batch.num_rows > start:
                    cut = max(0, start - row)
                    yield self._decode(i, row + cut, batch.slice(cut))
                row += batch.num_rows
        except pa.ArrowInvalid as e:
            raise self._bad_line(i, row, str(e)) from None

    def _decode(self, i: int, start: int, batch: pa.RecordBatch) -> RawChunk:
        label = batch.column(0)
        if label.null_count or not pc.all(pc.is_in(label, pa.array([0, 1]))).as_py():
            bad = int(np.flatnonzero(~np.isin(label.to_numpy(zero_copy_only=False), (0, 1)))[0])
            raise self._at(i, start + bad, f"label must be 0 or 1, got {label[bad].as_py()!r}")
        ints = np.column_stack([pc.fill_null(batch.column(1 + j), 0).to_numpy() for j in range(N_INT)])  # [n, 13]
        keys, missing = {}, {}
        for j, name in enumerate(CAT_NAMES):
            keys[name], missing[name], bad = hex_keys(batch.column(1 + N_INT + j))
            if bad >= 0:
                raise self._at(i, start + bad, f"{name} is not a hex hash: {batch.column(1 + N_INT + j)[bad].as_py().decode(errors='replace')!r}")
        dense = dense_transform(ints)
        return RawChunk(unit=i, start=start, labels=label.to_numpy().astype(np.float32), dense=dense, keys=keys, missing=missing,
                        user_keys=np.zeros(batch.num_rows, np.int64), frame=self._frame(batch, dense))

    def _frame(self, batch: pa.RecordBatch, dense: np.ndarray) -> pd.DataFrame | None:
        if not self.cohort:
            return None
        cols = {}
        for c in self.cohort:
            if c in INT_NAMES:
                cols[c] = dense[:, INT_NAMES.index(c)].astype(np.float64)
            else:
                values = pc.cast(batch.column(COLUMNS.index(c)), pa.string()).dictionary_encode().to_pandas()
                cols[c] = values.cat.rename_categories({"": MISSING}) if "" in values.cat.categories else values
        return pd.DataFrame(cols)

    def _at(self, i: int, row: int, what: str) -> C2ALError:
        return C2ALError(f"{self.files[self.unit_file(i)]}: line {self._line_base(i) + row + 1}: {what}")

    def _bad_line(self, i: int, from_row: int, reason: str) -> C2ALError:
        """The first malformed line at or after row `from_row` of unit i, found by a plain scan (the error path only)."""
        for r, line in enumerate(self._lines(i)):
            problem = _line_problem(line) if r >= from_row else None
            if problem:
                return self._at(i, r, problem)
        return C2ALError(f"{self.units()[i]}: cannot parse ({reason.splitlines()[0]})")

    def _lines(self, i: int) -> Iterator[bytes]:
        """The unit's lines without their newline, streamed (a .gz day is never decompressed whole)."""
        rest = b""
        for block in self._bytes(i, 1 << 22):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest


def _line_problem(line: bytes) -> str | None:
    """What is wrong with one text line (a cell count, a label or integer that is not one), or None."""
    if not line:
        return None
    cells = line.split(b"\t")
    if len(cells) != len(COLUMNS):
        return f"expected {len(COLUMNS)} tab-separated cells, found {len(cells)}"
    for c, cell in enumerate(cells[: 1 + N_INT]):
        if cell and not re.fullmatch(rb"-?\d+", cell):
            return f"{COLUMNS[c]} is not an integer: {cell.decode(errors='replace')!r}"
    return None


class CriteoNumpyReader(Reader):
    """TorchRec's preprocessed Criteo days, memory-mapped, units of `unit_rows` rows of one day.

    Args:
        folder: holds day_N_dense.npy, day_N_sparse.npy and day_N_labels.npy for N = 0, 1, ...
        cohort: cohort-feature columns (default: the 13 dense features).
    """

    def __init__(self, folder: Path, cohort: tuple[str, ...] = INT_NAMES, unit_rows: int = NPY_UNIT_ROWS,
                 chunk_rows: int = NPY_CHUNK_ROWS) -> None:
        self.folder, self.unit_rows_, self.chunk_rows = Path(folder), unit_rows, chunk_rows
        self.days = sorted(int(m.group(1)) for p in self.folder.glob("day_*_labels.npy") if (m := re.match(r"day_(\d+)_labels", p.name)))
        self.name, self.sparse, self.dense, self.cohort = f"criteo:{self.folder}", CAT_NAMES, INT_NAMES, tuple(cohort)
        self.sides = _cohort_sides(self.cohort)
        self._mapped: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._spans: list[tuple[int, int, int]] = []
        for d, day in enumerate(self.days):
            n = self._arrays(d)[2].shape[0]
            self._spans += [(d, a, min(a + unit_rows, n)) for a in range(0, n, unit_rows)]

    def _arrays(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dense [N, 13], sparse [N, 26], labels [N, 1]) of day index d, memory-mapped and shape-checked."""
        if d not in self._mapped:
            paths = [self.folder / f"day_{self.days[d]}_{part}.npy" for part in ("dense", "sparse", "labels")]
            try:
                arrs = tuple(np.load(p, mmap_mode="r") for p in paths)
            except (OSError, ValueError) as e:
                raise C2ALError(f"{self.folder}: cannot read day {self.days[d]} ({e})") from e
            n = arrs[2].shape[0]
            for p, a, width in zip(paths, arrs, (N_INT, N_CAT, 1)):
                if a.ndim != 2 or a.shape != (n, width):
                    raise C2ALError(f"{p}: shape {a.shape}, expected ({n}, {width})")
            self._mapped[d] = arrs  # type: ignore[assignment]
        return self._mapped[d]

    def units(self) -> list[str]:
        return [f"{self.folder}/day_{self.days[d]}_*.npy rows {a}-{b}" for d, a, b in self._spans]

    def unit_file(self, i: int) -> int:
        return self._spans[i][0]

    def unit_rows(self, i: int) -> int | None:
        _, a, b = self._spans[i]
        return b - a

    def read(self, i: int, start: int = 0) -> Iterator[RawChunk]:
        d, a, b = self._spans[i]
        dense, sparse, labels = self._arrays(d)
        for lo in range(a + start, b, self.chunk_rows):
            hi = min(lo + self.chunk_rows, b)
            y = np.asarray(labels[lo:hi, 0])
            if not np.isin(y, (0, 1)).all():
                bad = int(np.flatnonzero(~np.isin(y, (0, 1)))[0])
                raise C2ALError(f"{self.folder}/day_{self.days[d]}_labels.npy: row {lo + bad}: label must be 0 or 1, got {y[bad]}")
            s = np.asarray(sparse[lo:hi], dtype=np.int64)
            x = np.asarray(dense[lo:hi], dtype=np.float32)
            keys = {n: s[:, j].view(np.uint64) for j, n in enumerate(CAT_NAMES)}
            frame = pd.DataFrame({c: x[:, INT_NAMES.index(c)].astype(np.float64) if c in INT_NAMES else pd.Categorical(s[:, CAT_NAMES.index(c)])
                                  for c in self.cohort}) if self.cohort else None
            yield RawChunk(unit=i, start=lo - a, labels=y.astype(np.float32), dense=x, keys=keys,
                           missing={n: s[:, j] == 0 for j, n in enumerate(CAT_NAMES)}, user_keys=np.zeros(hi - lo, np.int64), frame=frame)


def criteo_files(path: str | Path) -> list[Path]:
    """A file, a .gz, or a folder's day_N files (optionally .gz) ordered by N."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise C2ALError(f"--data criteo:{path}: no such file or folder")
    days = sorted((int(m.group(1)), f) for f in p.iterdir() if (m := _DAY.match(f.name)))
    if not days:
        raise C2ALError(f"--data criteo:{path}: the folder holds no day_N files (text, .gz, or TorchRec's day_N_*.npy)")
    return [f for _, f in days]


def open_criteo(path: str | Path, cohort_features: tuple[str, ...] = ()) -> Reader:
    """The reader of `criteo:PATH`: TorchRec's NumPy layout when the folder holds day_N_labels.npy, else text."""
    cohort = tuple(cohort_features) or INT_NAMES
    p = Path(path)
    if p.is_dir() and any(p.glob("day_*_labels.npy")):
        return CriteoNumpyReader(p, cohort)
    return CriteoTextReader(criteo_files(p), cohort)


# ---------------------------------------------------------------- writers (tests, benchmarks)


def criteo_rows(rows: int, seed: int, *, missing: float = 0.05, vocab: int = 10_000) -> pd.DataFrame:
    """Criteo-shaped rows: label, int_* (NaN missing, some negative), cat_* (8-digit hex, "" missing), power-law values."""
    rng = np.random.default_rng(seed)
    ints = np.floor(rng.pareto(1.5, (rows, N_INT)) * 10).astype(np.int64) - (np.arange(N_INT) == 1) * 2  # int_1 reaches -2
    cols: dict[str, object] = {}
    logit = -1.5 + 0.3 * np.log1p(np.maximum(ints[:, 0], 0))
    ranks = np.minimum(np.floor(rng.pareto(1.1, (rows, N_CAT)) * 3), vocab - 1).astype(np.uint64)  # [rows, 26]
    hashed = (mix64(ranks + np.uint64(1) + (np.arange(N_CAT, dtype=np.uint64) << np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    logit += np.where(ranks[:, 0] < 2, 0.8, -0.2)
    cols["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    for j, name in enumerate(INT_NAMES):
        cols[name] = pd.array(np.where(rng.random(rows) < missing, pd.NA, ints[:, j]), dtype="Int64")
    for j, name in enumerate(CAT_NAMES):
        text = _hex8(hashed[:, j])
        cols[name] = np.where(rng.random(rows) < missing, "", text).astype(object)
    return pd.DataFrame(cols)


def _hex8(v: np.ndarray) -> np.ndarray:
    """uint32 [n] -> 8-character lowercase hex strings, vectorized."""
    nibbles = (v[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 0xF
    return np.frombuffer(np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles].tobytes(), dtype="S8").astype(str)


def write_criteo_text(path: str | Path, rows: int, seed: int = 0, **kw: float) -> pd.DataFrame:
    """Write `rows` Criteo text rows (gzip when `path` ends in .gz) and return what was written (criteo_rows)."""
    df = criteo_rows(rows, seed, **kw)  # type: ignore[arg-type]
    table = pa.Table.from_pandas(df, preserve_index=False)
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    p = Path(path)
    if p.name.endswith(".gz"):
        with pa.CompressedOutputStream(str(p), "gzip") as out:
            pcsv.write_csv(table, out, write_options=opts)
    else:
        pcsv.write_csv(table, str(p), write_options=opts)
    return df


def write_criteo_days(folder: str | Path, days: int, rows: int, seed: int = 0, gz: bool = False) -> list[pd.DataFrame]:
    """day_0 .. day_{days-1} text files of `rows` rows each (seed + day); returns each day's rows."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [write_criteo_text(Path(folder) / f"day_{d}{'.gz' if gz else ''}", rows, seed + d) for d in range(days)]


def write_criteo_numpy(folder: str | Path, days: int, rows: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """TorchRec's layout, day_N_{dense,sparse,labels}.npy; returns each day's (dense, sparse, labels)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = []
    for d in range(days):
        df = criteo_rows(rows, seed + d)
        dense = dense_transform(df[list(INT_NAMES)].to_numpy(dtype=np.float64, na_value=np.nan))
        sparse = np.column_stack([[int(v, 16) if v else 0 for v in df[c]] for c in CAT_NAMES]).astype(np.int64)
        labels = df["label"].to_numpy(dtype=np.int32).reshape(-1, 1)
        for part, arr in (("dense", dense), ("sparse", sparse), ("labels", labels)):
            np.save(Path(folder) / f"day_{d}_{part}.npy", arr)
        out.append((dense, sparse, labels))
    return out
