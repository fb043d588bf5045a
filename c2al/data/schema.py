"""In-memory data types shared by every data source.

A data source produces `Splits`: a `Schema` (which sparse fields exist, their
vocabulary sizes and which side they describe) and three `Table`s of rows.
Sparse fields are stored jagged (values + lengths) so multi-hot fields such as
movie genres are real jagged features. Id 0 of every vocabulary is reserved for
unseen or missing values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from c2al.errors import C2ALError

SIDES = ("user", "item", "context")
UNSEEN_ID = 0  # reserved id for values never seen in the training split


@dataclass(frozen=True)
class SparseFeature:
    """One categorical field backed by one embedding table.

    Args:
        name: feature name, also the KeyedJaggedTensor key and the table name.
        num_embeddings: vocabulary size including the reserved id 0.
        side: "user", "item" or "context"; two-tower and cohort defaults use it.
        multi_hot: whether a row may carry several ids (pooled by the table).
    """

    name: str
    num_embeddings: int
    side: str = "context"
    multi_hot: bool = False

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise C2ALError(f"sparse feature {self.name!r}: side must be one of {SIDES}, got {self.side!r}")
        if self.num_embeddings < 2:
            raise C2ALError(f"sparse feature {self.name!r}: num_embeddings must be >= 2, got {self.num_embeddings}")


@dataclass(frozen=True)
class Schema:
    """The fields of a data source.

    Args:
        sparse: categorical fields, in the order models stack them (F of them).
        dense: names of numeric fields (standardized floats).
        cohort_features: raw columns the cohort miner clusters on by default.
        name: a label for reports ("movielens-100k", "synthetic", a file name).
    """

    sparse: tuple[SparseFeature, ...]
    dense: tuple[str, ...] = ()
    cohort_features: tuple[str, ...] = ()
    name: str = ""

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def user_features(self) -> list[str]:
        return [f.name for f in self.sparse if f.side == "user"]

    @property
    def item_features(self) -> list[str]:
        return [f.name for f in self.sparse if f.side == "item"]

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise C2ALError(f"unknown sparse feature {name!r}; known: {self.feature_names}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schema":
        return cls(
            sparse=tuple(SparseFeature(**f) for f in d["sparse"]),
            dense=tuple(d.get("dense", ())),
            cohort_features=tuple(d.get("cohort_features", ())),
            name=d.get("name", ""),
        )


@dataclass
class JaggedColumn:
    """Ids of one sparse field for N rows: row i owns values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray  # int64 [nnz]
    lengths: np.ndarray  # int32 [N]

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> "JaggedColumn":
        """One id per row."""
        ids = np.asarray(ids, dtype=np.int64)
        return cls(values=ids, lengths=np.ones(len(ids), dtype=np.int32))

    @property
    def offsets(self) -> np.ndarray:
        off = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=off[1:])
        return off

    def take(self, idx: np.ndarray) -> "JaggedColumn":
        """Rows `idx` (any order, repeats allowed), vectorized."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        if len(self.values) == len(self.lengths) and np.all(self.lengths == 1):
            return JaggedColumn(self.values[idx], lengths)
        starts = self.offsets[idx]
        out_starts = np.zeros(len(idx), dtype=np.int64)
        np.cumsum(lengths[:-1], out=out_starts[1:])
        pos = np.repeat(starts - out_starts, lengths) + np.arange(int(lengths.sum()))
        return JaggedColumn(self.values[pos], lengths)

    def first(self) -> np.ndarray:
        """The first id of every row (0 where a row is empty)."""
        out = np.zeros(len(self.lengths), dtype=np.int64)
        has = self.lengths > 0
        out[has] = self.values[self.offsets[:-1][has]]
        return out


@dataclass
class Table:
    """N rows of one split.

    Args:
        sparse: one JaggedColumn per sparse field (keys in schema order).
        dense: float32 [N, n_dense] standardized numeric fields.
        labels: float32 [N] binary labels.
        user_ids: int64 [N] raw user key (for per-user splits, federated clients).
        item_ids: int64 [N] item key (two-tower retrieval metrics); -1 where unknown.
        cohort_frame: raw cohort features per row (the miner's X); may be None.
        cohort_ids: int64 [N] mined cohort per row, -1 for none.
        true_cohorts: int64 [N] planted cohort (synthetic data only), -1 for majority.
        timestamps: int64 [N] event time where the source has one.
    """

    sparse: dict[str, JaggedColumn]
    dense: np.ndarray
    labels: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray | None = None
    cohort_frame: pd.DataFrame | None = None
    cohort_ids: np.ndarray | None = None
    true_cohorts: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cohort_ids is None:
            self.cohort_ids = np.full(len(self.labels), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "Table":
        idx = np.asarray(idx, dtype=np.int64)

        def opt(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Table(
            sparse={k: c.take(idx) for k, c in self.sparse.items()},
            dense=self.dense[idx],
            labels=self.labels[idx],
            user_ids=self.user_ids[idx],
            item_ids=opt(self.item_ids),
            cohort_frame=None if self.cohort_frame is None else self.cohort_frame.iloc[idx].reset_index(drop=True),
            cohort_ids=self.cohort_ids[idx],
            true_cohorts=opt(self.true_cohorts),
            timestamps=opt(self.timestamps),
            extra=dict(self.extra),
        )

    def with_cohorts(self, cohort_ids: np.ndarray) -> "Table":
        cohort_ids = np.asarray(cohort_ids, dtype=np.int64)
        if cohort_ids.shape != self.labels.shape:
            raise C2ALError(f"cohort ids have shape {cohort_ids.shape}, the table has {len(self)} rows")
        return replace(self, cohort_ids=cohort_ids)

    def validate(self, schema: Schema, split: str) -> None:
        """Raise C2ALError naming the split and field of the first problem found."""
        if len(self) == 0:
            raise C2ALError(f"the {split} split is empty")
        if not np.isin(self.labels, (0.0, 1.0)).all():
            bad = self.labels[~np.isin(self.labels, (0.0, 1.0))][:3]
            raise C2ALError(f"{split} split: labels must be 0 or 1, found {bad.tolist()}")
        if (self.labels == self.labels[0]).all():
            # training learns nothing, and NE (relative to the split's base rate) is undefined: a null in report.json
            raise C2ALError(f"{split} split: all {len(self)} labels are {int(self.labels[0])}; every split needs both "
                            "labels (more rows, or other --valid-frac / --test-frac)")
        if self.dense.shape != (len(self), len(schema.dense)):
            raise C2ALError(f"{split} split: dense has shape {self.dense.shape}, expected ({len(self)}, {len(schema.dense)})")
        if len(schema.dense) and not np.isfinite(self.dense).all():
            col = schema.dense[int(np.where(~np.isfinite(self.dense).any(axis=0))[0][0])]
            raise C2ALError(f"{split} split: dense column {col!r} has NaN or infinite values")
        for f in schema.sparse:
            if f.name not in self.sparse:
                raise C2ALError(f"{split} split: sparse feature {f.name!r} missing")
            v = self.sparse[f.name].values
            if len(v) and (v.min() < 0 or v.max() >= f.num_embeddings):
                raise C2ALError(
                    f"{split} split: sparse feature {f.name!r} has ids outside [0, {f.num_embeddings}): "
                    f"min {int(v.min())}, max {int(v.max())}"
                )


@dataclass
class Splits:
    """Train / validation / test tables of one data source under one schema."""

    schema: Schema
    train: Table
    valid: Table
    test: Table

    def with_feature(self, name: str, ids: dict[str, np.ndarray], num_embeddings: int, side: str = "user") -> "Splits":
        """The same splits with one more single-id sparse field `name` (ids[split] in [0, num_embeddings)),
        e.g. the mined cohort as an input feature."""
        schema = replace(self.schema, sparse=(*self.schema.sparse, SparseFeature(name, num_embeddings, side)))

        def add(table: Table, split: str) -> Table:
            return replace(table, sparse={**table.sparse, name: JaggedColumn.from_ids(np.asarray(ids[split], dtype=np.int64))})

        return Splits(schema=schema, train=add(self.train, "train"), valid=add(self.valid, "valid"), test=add(self.test, "test")).validate()

    def with_cohorts(self, ids: dict[str, np.ndarray]) -> "Splits":
        """The same splits with each table's cohort ids replaced by `ids[split]` (-1: no cohort)."""
        return Splits(schema=self.schema, train=self.train.with_cohorts(ids["train"]),
                      valid=self.valid.with_cohorts(ids["valid"]), test=self.test.with_cohorts(ids["test"]))

    def validate(self) -> "Splits":
        for name in ("train", "valid", "test"):
            getattr(self, name).validate(self.schema, name)
        return self
