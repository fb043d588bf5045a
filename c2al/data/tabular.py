"""Tabular source: one CSV or Parquet file with named columns, plus the split and
vocabulary helpers every source shares.

The roles of the columns are the public CLI contract:
`--data PATH --label COL --sparse A,B --dense C,D --user-col COL --item-col COL
--cohort-features E,F --time-col COL`.

Shared rules (MovieLens uses the same helpers):
- vocabularies are built on the train split only; id 0 (`UNSEEN_ID`) is every
  value that is missing or never seen in train;
- dense columns are standardized with the train mean and std (std 0 -> 1);
- the per-user split sorts each user's rows, puts the last `floor(test_frac * n)`
  rows in test, the `floor(valid_frac * n)` before them in valid, the rest in train.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from c2al.data.schema import UNSEEN_ID, JaggedColumn, Schema, SparseFeature, Splits, Table
from c2al.errors import C2ALError

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
_EPS = 1e-9  # keeps floor(0.29 * 100) at 29 despite 0.29 * 100 == 28.999999999999996


# ---------------------------------------------------------------- shared helpers


def check_fractions(valid_frac: float, test_frac: float) -> None:
    """Raise C2ALError unless both fractions are in [0, 1) and leave room for train."""
    for name, v in (("valid_frac", valid_frac), ("test_frac", test_frac)):
        if not 0.0 <= v < 1.0:
            raise C2ALError(f"{name} must be in [0, 1), got {v}")
    if valid_frac + test_frac >= 1.0:
        raise C2ALError(f"valid_frac + test_frac must be < 1, got {valid_frac} + {test_frac}")


def split_per_user(
    users: np.ndarray, keys: Sequence[np.ndarray], valid_frac: float, test_frac: float
) -> np.ndarray:
    """Assign every row to train (0), valid (1) or test (2), per user, in key order.

    Each user's rows are sorted by `keys` (most significant first; later keys break
    ties). With n rows, the last floor(test_frac * n) go to test, the
    floor(valid_frac * n) before them to valid, the rest to train. Since
    valid_frac + test_frac < 1, every user keeps at least one train row, and a user
    with fewer than 1 / test_frac rows has no test row.

    Args:
        users: [N] user keys (any sortable dtype).
        keys: arrays of length N ordering a user's rows (e.g. timestamp, item id).
        valid_frac: share of each user's rows for validation.
        test_frac: share of each user's rows for test.

    Returns:
        int8 [N] split code per row, in the input order.

    Example:
        >>> split_per_user(np.array([1, 1, 1, 1]), [np.array([4, 3, 2, 1])], 0.25, 0.25).tolist()
        [2, 1, 0, 0]
    """
    check_fractions(valid_frac, test_frac)
    n_rows = len(users)
    order = np.arange(n_rows)
    for k in (*reversed(keys), users):  # stable sorts, least significant key first (faster than lexsort)
        order = order[np.argsort(np.asarray(k)[order], kind="stable")]
    sorted_users = np.asarray(users)[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if n_rows else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, n_rows])
    rank = np.arange(n_rows) - np.repeat(starts, counts)
    n = np.repeat(counts, counts)
    n_test = np.floor(n * test_frac + _EPS).astype(np.int64)
    n_valid = np.floor(n * valid_frac + _EPS).astype(np.int64)
    sorted_split = np.where(rank >= n - n_test, TEST, np.where(rank >= n - n_test - n_valid, VALID, TRAIN))
    out = np.empty(n_rows, dtype=np.int8)
    out[order] = sorted_split
    return out


def split_random(n_rows: int, valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Assign rows to train / valid / test at random: floor(frac * n) rows to each held-out split.

    Args:
        n_rows: number of rows N.
        valid_frac: share of rows for validation.
        test_frac: share of rows for test.
        seed: seed of the permutation.

    Returns:
        int8 [N] split code per row.

    Example:
        >>> np.bincount(split_random(10, 0.2, 0.1, seed=0)).tolist()
        [7, 2, 1]
    """
    check_fractions(valid_frac, test_frac)
    perm = np.random.default_rng(seed).permutation(n_rows)
    n_test = int(np.floor(n_rows * test_frac + _EPS))
    n_valid = int(np.floor(n_rows * valid_frac + _EPS))
    out = np.full(n_rows, TRAIN, dtype=np.int8)
    out[perm[:n_test]] = TEST
    out[perm[n_test : n_test + n_valid]] = VALID
    return out


def build_vocab(train_values: np.ndarray | pd.Series) -> pd.Index:
    """Distinct non-missing values seen in train, sorted when the values allow it.

    Position p in the returned index is id p + 1, since id 0 is `UNSEEN_ID`.

    Example:
        >>> list(build_vocab(np.array(["b", "a", "b"])))
        ['a', 'b']
    """
    uniq = pd.unique(pd.Series(train_values).dropna())
    try:
        uniq = np.sort(uniq)
    except TypeError:  # mixed types in one column: keep first-seen order, still deterministic
        pass
    return pd.Index(uniq)


def encode(values: np.ndarray | pd.Series, vocab: pd.Index) -> np.ndarray:
    """Map values to ids 1..len(vocab); missing or unseen values map to 0.

    Example:
        >>> encode(np.array(["a", "z", "b"]), pd.Index(["a", "b"])).tolist()
        [1, 0, 2]
    """
    pos = vocab.get_indexer(pd.Series(values)).astype(np.int64)  # -1 for missing or unknown values
    return np.where(pos < 0, UNSEEN_ID, pos + 1)


def vocab_size(vocab: pd.Index) -> int:
    """num_embeddings for a vocabulary: its values plus the reserved id 0 (at least 2)."""
    return max(len(vocab) + 1, 2)


def standardize(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Standardize the columns of x [N, d] with the mean and std of the `train` rows (std 0 -> 1)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] == 0 or not train.any():
        return x.astype(np.float32)
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x - mean) / std).astype(np.float32)


def tables_from_split(full: Table, split: np.ndarray) -> tuple[Table, Table, Table]:
    """Cut a full-length table into train, valid and test tables (rows keep their order)."""
    return tuple(full.take(np.flatnonzero(split == code)) for code in (TRAIN, VALID, TEST))  # type: ignore[return-value]


def check_nonempty(split: np.ndarray, where: str, hint: str) -> None:
    """Raise C2ALError naming `where` when a split received no rows."""
    counts = np.bincount(split, minlength=3)
    for code, name in enumerate(SPLIT_NAMES):
        if counts[code] == 0:
            raise C2ALError(f"{where}: the {name} split is empty ({len(split)} rows in all); {hint}")


# ---------------------------------------------------------------- tabular loader


def _names(arg: Sequence[str] | str | None) -> list[str]:
    """Accept "a,b" as well as ["a", "b"] (a bare string would otherwise iterate characters)."""
    if arg is None:
        return []
    if isinstance(arg, str):
        return [s.strip() for s in arg.split(",") if s.strip()]
    return list(arg)


def read_frame(path: str | Path) -> pd.DataFrame:
    """Read a CSV (`.csv`, `.csv.gz`, `.tsv`) or Parquet (`.parquet`, `.pq`) file.

    Example:
        >>> read_frame("clicks.csv")  # doctest: +SKIP
    """
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise C2ALError(f"{p}: no such file")
    try:
        if name.endswith((".csv", ".csv.gz", ".tsv")):
            sep = "\t" if name.endswith(".tsv") else ","
            _check_header(p, pd.read_csv(p, sep=sep, header=None, nrows=1, dtype=str).iloc[0].tolist())
            return pd.read_csv(p, sep=sep)
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(p)
    except C2ALError:
        raise
    except Exception as e:  # pandas/pyarrow raise many types; the user needs the file and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise C2ALError(f"{p}: cannot read the file ({reason})") from e
    raise C2ALError(f"{p}: unsupported file type; use .csv, .tsv or .parquet")


def _check_header(path: Path, names: list[Any]) -> None:
    """Refuse a header naming one column twice: pandas would rename the second `user` to `user.1` and go on."""
    seen: dict[str, int] = {}
    for i, name in enumerate(map(str, names)):
        if name in seen:
            raise C2ALError(f"{path}: column {name!r} appears twice in the header (columns {seen[name] + 1} and {i + 1})")
        seen[name] = i


def _check_roles(where: str, columns: Sequence[str], roles: dict[str, list[str]]) -> None:
    """Every named column exists, and no column plays two roles (or one role twice)."""
    available = list(map(str, columns))
    seen: dict[str, str] = {}
    for role, cols in roles.items():
        for c in cols:
            if c not in available:
                raise C2ALError(f"{where}: unknown column {c!r} given as {role}; available columns: {available}")
            if c in seen:
                what = f"twice as {role}" if seen[c] == role else f"as {seen[c]} and as {role}"
                raise C2ALError(f"{where}: column {c!r} is given {what}")
            seen[c] = role


def _label(df: pd.DataFrame, col: str, where: str) -> np.ndarray:
    s = df[col]
    if s.isna().any():
        first = int(np.flatnonzero(s.isna().to_numpy())[0])
        raise C2ALError(f"{where}: label column {col!r} has {int(s.isna().sum())} missing values (first at row {first})")
    if pd.api.types.is_bool_dtype(s):
        return _both_labels(s.to_numpy(dtype=np.float32), col, where)
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() | ~num.isin([0, 1])
    if bad.any():
        vals = pd.unique(s[bad])[:5].tolist()
        raise C2ALError(f"{where}: label column {col!r} must hold only 0 and 1, found {vals}")
    return _both_labels(num.to_numpy(dtype=np.float32), col, where)


def _both_labels(y: np.ndarray, col: str, where: str) -> np.ndarray:
    """A label column of one value leaves nothing to learn, and NE (relative to the base rate) is undefined."""
    if len(y) and (y == y[0]).all():
        raise C2ALError(f"{where}: label column {col!r} holds only {int(y[0])}s ({len(y)} rows): "
                        "a model needs both positive and negative rows")
    return y


def _dense(df: pd.DataFrame, cols: list[str], where: str) -> np.ndarray:
    out = np.zeros((len(df), len(cols)), dtype=np.float64)
    for j, c in enumerate(cols):
        s = df[c]
        if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
            vals = pd.unique(s[pd.to_numeric(s, errors="coerce").isna() & s.notna()])[:3].tolist()
            raise C2ALError(f"{where}: dense column {c!r} is not numeric (values like {vals})")
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(v).all():
            raise C2ALError(f"{where}: dense column {c!r} has {int((~np.isfinite(v)).sum())} NaN or infinite values")
        out[:, j] = v
    return out


def _timestamps(df: pd.DataFrame, col: str, where: str) -> np.ndarray:
    """Integer event times: numbers as they are, dates and datetimes as epoch seconds."""
    s = df[col]
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(v).all():
            raise C2ALError(f"{where}: time column {col!r} has missing or infinite values")
        return v.astype(np.int64)
    t = pd.to_datetime(s, errors="coerce", utc=True)
    if t.isna().any():
        bad = s[t.isna()].head(3).tolist()
        raise C2ALError(f"{where}: time column {col!r} has values that are not times: {bad}")
    return ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def cohort_frame(df: pd.DataFrame, cohort: list[str], sparse: list[str]) -> pd.DataFrame | None:
    """The miner's columns; those that are sparse fields become 'category' whatever their storage type
    (an integer-coded device id is a category, not a number to split by its order)."""
    if not cohort:
        return None
    frame = df[cohort].reset_index(drop=True)
    for c in cohort:
        if c in sparse:
            frame[c] = frame[c].astype("category")
    return frame


def load_tabular(
    path: str | Path,
    *,
    label: str,
    sparse: Sequence[str],
    dense: Sequence[str] = (),
    user_col: str | None = None,
    item_col: str | None = None,
    cohort_features: Sequence[str] = (),
    time_col: str | None = None,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Load a CSV or Parquet file of labelled rows into train / valid / test splits.

    Split: with both `time_col` and `user_col`, per user by time (see
    `split_per_user`; ties keep file order). With only `time_col`, globally by
    time: the latest floor(test_frac * N) rows are test, the floor(valid_frac * N)
    before them valid. Otherwise rows are split at random with `seed`, not grouped
    by user: a user's rows spread over the three splits, as in a random split of
    impressions.

    Sparse fields: `user_col` and `item_col` come first (added when not listed in
    `sparse`), then `sparse` in its order. Sides: `user_col` and cohort features that are sparse are "user",
    `item_col` is "item", the rest "context". Vocabularies come from train rows;
    missing or unseen values map to 0. Dense columns are standardized with the
    train mean and std. `cohort_frame` holds the raw `cohort_features` columns,
    or the user-side sparse columns when none are given; the sparse ones as 'category' dtype. `Table.user_ids` is the
    index of the row's user among the file's sorted distinct users (-1 without
    `user_col`); `item_ids` likewise (None without `item_col`).

    Args:
        path: a .csv / .csv.gz / .tsv or .parquet / .pq file.
        label: column of 0/1 labels (bools accepted).
        sparse: categorical columns (a list, or one comma-separated string).
        dense: numeric columns.
        user_col: column holding the user key.
        item_col: column holding the item key.
        cohort_features: raw columns the cohort miner clusters on.
        time_col: event time (numbers, or dates pandas can parse).
        valid_frac: share of rows for validation.
        test_frac: share of rows for test.
        seed: seed of the random split.

    Returns:
        validated Splits.

    Raises:
        C2ALError: one line naming the file and the column for every bad input.

    Example:
        >>> s = load_tabular("clicks.csv", label="click", sparse=["ad", "site"], user_col="uid")  # doctest: +SKIP
        >>> s.schema.feature_names  # doctest: +SKIP
        ['uid', 'ad', 'site']
    """
    where = str(path)
    sparse_l, dense_l, cohort_l = _names(sparse), _names(dense), _names(cohort_features)
    check_fractions(valid_frac, test_frac)
    df = read_frame(path)
    if len(df) == 0:
        raise C2ALError(f"{where}: the file has no rows")
    if user_col is not None and user_col == item_col:
        raise C2ALError(f"{where}: column {user_col!r} is given as user column and as item column")
    keys = [c for c in (user_col, item_col) if c is not None]
    model_sparse = keys + [c for c in sparse_l if c not in keys]
    roles = {
        "label": [label],
        "user column": [user_col] if user_col else [],
        "item column": [item_col] if item_col else [],
        "sparse": [c for c in sparse_l if c not in keys],
        "dense": dense_l,
        "time column": [time_col] if time_col else [],
    }
    _check_roles(where, df.columns, roles)
    # cohort features may also be model inputs, but never the label: the miner would see the answer
    _check_roles(where, df.columns, {"label": [label], "cohort feature": cohort_l})

    labels = _label(df, label, where)
    dense_x = _dense(df, dense_l, where)
    times = _timestamps(df, time_col, where) if time_col else None
    user_ids = pd.factorize(df[user_col], sort=True)[0].astype(np.int64) if user_col else np.full(len(df), -1, np.int64)
    item_ids = pd.factorize(df[item_col], sort=True)[0].astype(np.int64) if item_col else None

    if times is not None and user_col is not None:
        split = split_per_user(user_ids, [times, np.arange(len(df))], valid_frac, test_frac)
        hint = "users need at least 1 / test_frac rows each for a per-user time split"
    elif times is not None:
        split = split_per_user(np.zeros(len(df), np.int64), [times, np.arange(len(df))], valid_frac, test_frac)
        hint = "add rows or raise valid_frac / test_frac"
    else:
        split = split_random(len(df), valid_frac, test_frac, seed)
        hint = "add rows or raise valid_frac / test_frac"
    check_nonempty(split, where, hint)
    train = split == TRAIN

    user_side = {c for c in cohort_l if c in model_sparse} | ({user_col} if user_col else set())
    features, columns = [], {}
    for c in model_sparse:
        vocab = build_vocab(df[c][train])
        columns[c] = JaggedColumn.from_ids(encode(df[c], vocab))
        side = "item" if c == item_col else "user" if c in user_side else "context"
        features.append(SparseFeature(c, vocab_size(vocab), side=side))

    if not cohort_l:
        cohort_l = [c for c in model_sparse if c in user_side]
    schema = Schema(
        sparse=tuple(features), dense=tuple(dense_l), cohort_features=tuple(cohort_l), name=Path(path).name
    )
    full = Table(
        sparse=columns,
        dense=standardize(dense_x, train),
        labels=labels,
        user_ids=user_ids,
        item_ids=item_ids,
        cohort_frame=cohort_frame(df, cohort_l, model_sparse),
        timestamps=times,
    )
    return Splits(schema, *tables_from_split(full, split)).validate()
