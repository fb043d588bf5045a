"""The cohort feature space, shared by the centralized and the federated miner.

Cohort features arrive as a DataFrame (or an array) of numeric and categorical
columns. Clustering needs one dense matrix: numeric columns standardized,
categorical ones one-hot over the values seen at fit. `Encoding` holds what
that needs (per-column mean/std or sorted values), whoever computed it: the
`CohortMiner` from its rows, the federated server from the clients' sums.
`nearest_center` is the one assignment of encoded rows to centres.

Letters: N rows, D encoded features, K centres.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_array

from c2al.errors import C2ALError

MAX_ONEHOT = 256  # categories per column that clustering will one-hot encode ([N, D] stays dense)
CHUNK = 65_536  # rows per block when assigning clusters, bounds temporaries to [CHUNK, max(D, K)]


def one_line(err: Exception) -> str:
    """An exception's message on one line (scikit-learn's and numpy's may span several)."""
    return " ".join(str(err).split())


def column_label(name: str) -> str:
    return f"X column {name!r}"


def is_categorical(series: pd.Series) -> bool:
    """Object, string, category and bool columns are categorical; other numeric dtypes are numeric."""
    return pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series)


def read_columns(X: Any, categorical: Sequence[str] = ()) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Split X into column names, per-column arrays and kinds ("numeric"/"categorical").

    Args:
        X: [N, F] array (all numeric, columns named x0, x1, ...) or DataFrame.
        categorical: columns that are categorical whatever their dtype (an integer-coded device
            id is a category, not a number to split by its order); by name (x0, x1, ... for an array).

    Returns:
        (names, columns, kinds): numeric columns as float64, categorical ones as str objects.
    """
    if not isinstance(X, pd.DataFrame):
        try:  # scikit-learn's messages for empty, 1-D, sparse or complex input are fine
            arr = check_array(X, dtype=np.float64, ensure_all_finite=False, input_name="X")
        except ValueError as err:
            raise C2ALError(f"X: {one_line(err)}; pass a pandas DataFrame for categorical columns") from err
        X = pd.DataFrame(arr, columns=[f"x{j}" for j in range(arr.shape[1])])
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise C2ALError(f"X: DataFrame of shape {X.shape} has no rows or no columns")
    unknown = [c for c in categorical if c not in [str(n) for n in X.columns]]
    if unknown:
        raise C2ALError(f"categorical: unknown column {unknown[0]!r}; X has columns {[str(n) for n in X.columns]}")
    names, columns, kinds = [], [], []
    for name, series in X.items():
        kind = "categorical" if is_categorical(series) or str(name) in categorical else "numeric"
        if kind == "categorical" and series.isna().any():
            row = int(np.flatnonzero(series.isna().to_numpy())[0])
            raise C2ALError(f"{column_label(str(name))} contains NaN / missing values (first at row {row})")
        names.append(str(name))
        kinds.append(kind)
        columns.append(categorical_values(series) if kind == "categorical"
                       else series.to_numpy(dtype=np.float64, na_value=np.nan))
    return names, columns, kinds


def categorical_values(series: pd.Series) -> np.ndarray:
    """A categorical column's values as str objects [N]; integral floats read as integers (3.0 -> "3")."""
    if pd.api.types.is_float_dtype(series) and np.all(np.mod(series.to_numpy(), 1) == 0):
        series = series.astype(np.int64)  # a NaN-free integer code column that pandas stored as float
    return series.astype(str).to_numpy(dtype=object)


def check_finite(names: list[str], columns: list[np.ndarray], kinds: list[str]) -> None:
    """Refuse NaN or infinite numeric values, naming the column and the first row."""
    for name, values, kind in zip(names, columns, kinds):
        if kind == "numeric" and not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise C2ALError(f"{column_label(name)} contains NaN or infinite values (first at row {row})")


def check_informative(names: list[str], columns: list[np.ndarray]) -> None:
    """Refuse constant columns, naming them."""
    # a constant column cannot split users into cohorts and would divide by a zero std
    for name, values in zip(names, columns):
        if (values[1:] == values[0]).all():
            raise C2ALError(f"{column_label(name)} is constant ({values[0]!r}): it carries no information "
                            "for cohorts; drop it")


@dataclass
class Encoding:
    """Standardization of numeric columns and vocabulary of categorical ones.

    Args:
        columns: column names, in X's order.
        kinds: "numeric" or "categorical" per column.
        stats: per column, [mean, std] (numeric) or the sorted values (categorical).

    Example:
        >>> X = pd.DataFrame({"age": [20.0, 40.0], "region": ["a", "b"]})
        >>> Encoding.from_columns(*read_columns(X)).encode(X).tolist()
        [[-1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """

    columns: list[str]
    kinds: list[str]
    stats: list[Any]

    @classmethod
    def from_columns(cls, names: list[str], columns: list[np.ndarray], kinds: list[str]) -> Encoding:
        """The encoding of the rows at hand (the centralized miner's fit)."""
        stats = [sorted(set(v)) if k == "categorical" else [float(v.mean()), float(v.std())]
                 for v, k in zip(columns, kinds)]
        return cls(list(names), list(kinds), stats)

    def wide_columns(self) -> list[str]:
        """Categorical columns with more values than clustering will one-hot encode."""
        return [n for n, st, k in zip(self.columns, self.stats, self.kinds) if k == "categorical" and len(st) > MAX_ONEHOT]

    def source_of(self, j: int) -> tuple[str, Any]:
        """Column of encoded feature j, and its value for a one-hot feature (None for a numeric one)."""
        for col, kind, st in zip(self.columns, self.kinds, self.stats):
            width = 1 if kind == "numeric" else len(st)
            if j < width:
                return col, None if kind == "numeric" else st[j]
            j -= width
        raise IndexError(f"encoded feature {j} is past the last column")

    def transform(self, columns: list[np.ndarray], scaled: bool = True) -> np.ndarray:
        """Per-column arrays (as `read_columns` gives them) -> [N, D] design.

        Args:
            columns: one array per column of `columns`.
            scaled: standardize numeric columns (clustering); False keeps their units (the tree's rules).

        Returns:
            The design [N, D]: numeric columns, then each categorical column's one-hot block, in column order.
        """
        parts = []
        for values, kind, st in zip(columns, self.kinds, self.stats):
            if kind == "numeric":
                # the miner refuses constant columns; a federation may meet one (std 0) and leaves it centred
                parts.append(((values - st[0]) / (st[1] or 1.0) if scaled else values)[:, None])
                continue
            codes = pd.Categorical(values, categories=st).codes.astype(np.int64)
            onehot = np.zeros((len(values), len(st)))
            seen = codes >= 0  # a category unseen at fit belongs to no one-hot column
            onehot[np.flatnonzero(seen), codes[seen]] = 1.0
            parts.append(onehot)
        return np.hstack(parts)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """A frame holding (at least) `columns` -> [N, D], each column read as its kind at fit."""
        columns = [frame[col].to_numpy(dtype=np.float64) if kind == "numeric" else categorical_values(frame[col])
                   for col, kind in zip(self.columns, self.kinds)]
        return self.transform(columns)


def nearest_center(Z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the closest centre for each row of Z [N, D]; centers [K, D].

    Equals scikit-learn's KMeans.predict; blocks of CHUNK rows bound the memory.
    """
    sq = np.einsum("kd,kd->k", centers, centers)
    out = np.empty(len(Z), dtype=np.int64)
    for start in range(0, len(Z), CHUNK):
        block = Z[start:start + CHUNK]
        out[start:start + CHUNK] = np.argmin(sq[None, :] - 2.0 * block @ centers.T, axis=1)  # [CHUNK, K]
    return out
