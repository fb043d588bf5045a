"""Next-item examples from MovieLens timelines: Ning et al. 2021's federated retrieval task.

Every position of a user's time-ordered timeline is one example: the context is the up to
`max_context` movies before it, the label the movie at it. Timelines shorter than
`min_timeline` are dropped, a user keeps at most `max_per_user` examples (the earliest), and
users, not examples, are split 80/10/10, so validation and test users are never trained on.
Every rating counts as an interaction (the task predicts what is watched next, not what is liked).

Items are numbered 1..V in the order of their raw ids (V: every movie with a rating); 0 is
never used, so a table of V + 1 rows keeps row 0 free, as the paper's padding id.

Letters: N examples, L context length (<= max_context), V catalog size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from c2al.data.movielens import _read_any, default_movielens_dir
from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Table
from c2al.errors import C2ALError

CONTEXT, LABEL = "context", "label"  # the two KeyedJaggedTensor keys; one item table serves both
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class Timelines:
    """Each user's item ids (1..V) in time order.

    Attributes:
        users: raw user keys [U], ascending.
        items: concatenated timelines [sum of lengths], catalog ids 1..V.
        lengths: timeline length of each user [U].
        num_items: V.
    """

    users: np.ndarray
    items: np.ndarray
    lengths: np.ndarray
    num_items: int


def movielens_dir(data: str) -> Path:
    """The directory `--data` names: movielens-1m / movielens-100k (bundled copies), movielens:/dir or a dir.

    Args:
        data: the --data value.

    Returns:
        The directory of MovieLens files.
    """
    if data in ("movielens-1m", "ml-1m"):
        return default_movielens_dir("ml-1m")
    if data in ("movielens", "movielens-100k", "ml-100k"):
        return default_movielens_dir("ml-100k")
    path = Path(data.split(":", 1)[1] if data.startswith("movielens:") else data)
    if not path.is_dir():
        raise C2ALError(f"--data {data!r}: not movielens-1m, movielens-100k, movielens:/dir or a MovieLens directory")
    return path


def read_timelines(path: Path) -> Timelines:
    """Every user's ratings sorted by timestamp (ties keep file order), items renumbered 1..V.

    Args:
        path: a MovieLens directory in any format `c2al.data.movielens` reads.

    Returns:
        Timelines.
    """
    ratings = _read_any(Path(path)).ratings
    if ratings.empty:
        raise C2ALError(f"{path}: no ratings")
    return _timelines(ratings[["user", "item", "timestamp"]])


def read_timelines_table(path: str | Path, user: str, item: str, time: str) -> Timelines:
    """The timelines of a CSV / Parquet interaction log: one row per (user, item, time) event.

    Args:
        path: a file `c2al.data.tabular.read_frame` reads.
        user, item, time: its columns (time: numbers, or dates / datetimes).

    Returns:
        Timelines; a missing column, an empty table or a missing user / item value is a C2ALError naming it.
    """
    from c2al.data.tabular import _check_roles, _timestamps, read_frame

    where = str(path)
    if not (user and item and time):
        raise C2ALError(f"{where}: next-item timelines need --user-col, --item-col and --time-col (got {user!r}, {item!r}, {time!r})")
    df = read_frame(path)
    _check_roles(where, df.columns, {"user column": [user], "item column": [item], "time column": [time]})
    if df.empty:
        raise C2ALError(f"{where}: the table has no rows")
    for role, col in (("user", user), ("item", item)):
        missing = df[col].isna().to_numpy()
        if missing.any():
            raise C2ALError(f"{where}: {role} column {col!r} has {int(missing.sum())} missing values (first at row {int(np.flatnonzero(missing)[0])})")
    # users as integer codes (the example tables hold int64 user keys), items by their text (renumbered 1..V below)
    frame = pd.DataFrame({"user": pd.factorize(df[user].astype(str), sort=True)[0].astype(np.int64), "item": df[item].astype(str).to_numpy(),
                          "timestamp": _timestamps(df, time, where)})
    return _timelines(frame)


def _timelines(ratings: pd.DataFrame) -> Timelines:
    """{user, item, timestamp} events -> Timelines (items renumbered 1..V in raw-id order, each user's events by time)."""
    raw_items = ratings["item"].to_numpy()
    catalog = np.unique(raw_items)
    frame = ratings.assign(item=np.searchsorted(catalog, raw_items) + 1)
    frame = frame.sort_values(["user", "timestamp"], kind="stable")
    users, lengths = np.unique(frame["user"].to_numpy(), return_counts=True)
    return Timelines(users=users, items=frame["item"].to_numpy(np.int64), lengths=lengths.astype(np.int64),
                     num_items=len(catalog))


def _positions(lengths: np.ndarray, max_per_user: int) -> tuple[np.ndarray, np.ndarray]:
    """(user index [N], label position inside its timeline [N]) of every example, users in order."""
    per_user = np.maximum(lengths - 1, 0)
    if max_per_user > 0:
        per_user = np.minimum(per_user, max_per_user)
    owner = np.repeat(np.arange(len(lengths)), per_user)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    position = np.arange(int(per_user.sum())) - np.repeat(starts, per_user) + 1  # 1, 2, ... within each user
    return owner, position


def next_item_examples(t: Timelines, *, max_context: int = 10, min_timeline: int = 3,
                       max_per_user: int = 300) -> tuple[JaggedColumn, np.ndarray, np.ndarray]:
    """Context / label pairs of every timeline position, earliest first.

    Args:
        t: the timelines.
        max_context: the most previous items a context keeps (the latest ones).
        min_timeline: timelines shorter than this give no examples.
        max_per_user: the most examples a user keeps (the earliest); 0 for no cap.

    Returns:
        (contexts: a JaggedColumn of N rows, each 1..max_context ids in time order;
        labels [N] item ids; users [N] raw user keys).
    """
    if max_context < 1 or min_timeline < 2:
        raise C2ALError(f"next-item examples need max_context >= 1 and min_timeline >= 2, got {max_context}, {min_timeline}")
    kept = np.where(t.lengths >= min_timeline, t.lengths, 0)
    owner, position = _positions(kept, max_per_user)
    base = np.concatenate([[0], np.cumsum(t.lengths)[:-1]])[owner]  # [N] where each example's timeline starts
    label_at = base + position
    lengths = np.minimum(position, max_context)  # [N]
    out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    within = np.arange(int(lengths.sum())) - np.repeat(out_starts, lengths)
    context = t.items[np.repeat(label_at - lengths, lengths) + within]
    return JaggedColumn(values=context, lengths=lengths.astype(np.int32)), t.items[label_at], t.users[owner]


def split_users(users: np.ndarray, seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, np.ndarray]:
    """Users shuffled by `seed`, then cut into train / valid / test by the rounded fractions.

    Args:
        users: distinct user keys.
        seed: shuffle seed.
        fractions: (train, valid); test takes the rest.

    Returns:
        split name -> the users in it (disjoint, together `users`).
    """
    train_f, valid_f = fractions
    if not (0 < train_f and 0 <= valid_f and train_f + valid_f < 1):
        raise C2ALError(f"user split fractions must satisfy 0 < train, 0 <= valid, train + valid < 1; got {fractions}")
    order = np.random.default_rng(seed).permutation(np.asarray(users))
    cut_train, cut_valid = round(len(order) * train_f), round(len(order) * (train_f + valid_f))
    return dict(zip(SPLIT_NAMES, (order[:cut_train], order[cut_train:cut_valid], order[cut_valid:])))


def next_item_schema(num_items: int, name: str = "next-item") -> Schema:
    """The two features over one catalog: the context bag (user side) and the label (item side)."""
    return Schema(sparse=(SparseFeature(CONTEXT, num_items + 1, "user", multi_hot=True),
                          SparseFeature(LABEL, num_items + 1, "item")), name=name)


def _table(context: JaggedColumn, labels: np.ndarray, users: np.ndarray) -> Table:
    """A Table whose rows are examples (label 1 everywhere: every row is a positive pair)."""
    return Table(sparse={CONTEXT: context, LABEL: JaggedColumn.from_ids(labels)}, dense=np.zeros((len(labels), 0), np.float32),
                 labels=np.ones(len(labels), np.float32), user_ids=users.astype(np.int64), item_ids=labels.astype(np.int64))


@dataclass
class NextItemSplits:
    """Train / valid / test Tables of next-item examples (split by user) under one schema."""

    train: Table
    valid: Table
    test: Table
    schema: Schema
    num_items: int


def next_item_splits(t: Timelines, seed: int, *, max_context: int = 10, min_timeline: int = 3, max_per_user: int = 300,
                     fractions: tuple[float, float] = (0.8, 0.1), name: str = "next-item") -> NextItemSplits:
    """The examples of `t`, their users split by `seed`.

    Args:
        t: the timelines.
        seed: the user split's seed.
        max_context, min_timeline, max_per_user: as `next_item_examples`.
        fractions: (train, valid) user shares.
        name: the schema's name (reports).

    Returns:
        NextItemSplits; a split without examples is a C2ALError.
    """
    context, labels, users = next_item_examples(t, max_context=max_context, min_timeline=min_timeline, max_per_user=max_per_user)
    groups = split_users(np.unique(users), seed, fractions)
    tables = {}
    for split, members in groups.items():
        rows = np.flatnonzero(np.isin(users, members))
        if len(rows) == 0:
            raise C2ALError(f"next-item {split} split is empty: {len(np.unique(users))} users with a timeline of >= {min_timeline}")
        tables[split] = _table(context.take(rows), labels[rows], users[rows])
    return NextItemSplits(**tables, schema=next_item_schema(t.num_items, name), num_items=t.num_items)
