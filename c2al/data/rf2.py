"""Click examples from MovieLens ratings: RF^2's task (Maeng et al., RecSys 2022; facebookresearch/RF2).

Every rating is one example, labelled a click when the rating is 5. Its features are the movie,
the movie's genres and the user's last `history` clicked movies before it (no user id): a
user's rows are sorted by (timestamp, click, movie) as RF^2 sorts them, and a click joins the
history only after its own row, so no row sees itself or anything later. Each user's rows are
split in time: position i of n is train when i < 0.9 n (RF^2's rule), test otherwise; with
`valid_frac` > 0 the latest share of each user's train rows is held out as validation (for
stopping), and the rest trains.

Ids: movies 1..V in the order of their raw ids (every rated movie), genres 1..G in the order
the item file first names them, 0 for a movie without a genre; a history bag may be empty.
MovieLens-1M (`movielens-1m`, ratings.dat) and ml-20m directories (ratings.csv / movies.csv)
read alike (`c2al.data.movielens` reads every GroupLens and RecBole layout).

Letters: N rows, U users, H history length (<= `history`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from c2al.data.movielens import _read_any
from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Table
from c2al.errors import C2ALError

MOVIE, GENRES, HISTORY = "movie", "genres", "history"
CLICK_RATING = 5.0


@dataclass
class ClickSplits:
    """Train / valid / test Tables of click examples under one schema.

    Attributes:
        train, test: the per-user temporal split; valid is None unless asked for.
        schema: movie (item side), genres (item side, multi-hot), history (user side, multi-hot).
        num_movies: V.
    """

    train: Table
    valid: Table | None
    test: Table
    schema: Schema
    num_movies: int


def _sorted_ratings(ratings: pd.DataFrame) -> pd.DataFrame:
    """Ratings with a click column, sorted by user then (timestamp, click, item), as RF^2 sorts a user's log."""
    if ratings.empty:
        raise C2ALError("RF^2 click data: no ratings")
    frame = ratings.assign(click=(ratings["rating"].astype(np.float64) >= CLICK_RATING).astype(np.int64))
    return frame.sort_values(["user", "timestamp", "click", "item"], kind="stable").reset_index(drop=True)


def click_history(users: np.ndarray, items: np.ndarray, clicks: np.ndarray, history: int = 10) -> JaggedColumn:
    """The last `history` clicked items of the same user strictly before each row.

    Args:
        users: user key per row [N], rows grouped by user and in time order within a user.
        items: item id per row [N].
        clicks: 0/1 per row [N].
        history: the most items a bag keeps (the latest ones).

    Returns:
        A JaggedColumn of N bags (item ids in time order, possibly empty).

    Example:
        >>> h = click_history(np.array([1, 1, 1, 2]), np.array([5, 6, 7, 8]), np.array([1, 0, 1, 1]), history=10)
        >>> [h.values[a:b].tolist() for a, b in zip(h.offsets[:-1], h.offsets[1:])]
        [[], [5], [5], []]
    """
    if history < 1:
        raise C2ALError(f"click history length must be >= 1, got {history}")
    users, items, clicks = np.asarray(users), np.asarray(items), np.asarray(clicks, dtype=np.int64)
    before = np.cumsum(clicks) - clicks  # [N] clicks of all rows before this one (global order)
    new_user = np.r_[True, users[1:] != users[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, before, 0))  # [N] clicks before the user's first row
    begin = np.maximum(before - history, user_start)
    lengths = (before - begin).astype(np.int32)
    clicked = items[clicks == 1]  # [sum clicks] in global order
    out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    within = np.arange(int(lengths.sum())) - np.repeat(out_starts, lengths)
    return JaggedColumn(values=clicked[np.repeat(begin, lengths) + within].astype(np.int64), lengths=lengths)


def _genre_column(items: pd.DataFrame | None, catalog: np.ndarray) -> tuple[JaggedColumn, int]:
    """Genre ids per movie id 0..V (row 0 unused), each movie >= 1 id (0 when it has none)."""
    vocab: dict[str, int] = {}
    per_movie: list[list[int]] = [[0] for _ in range(len(catalog) + 1)]
    if items is not None and "genres" in items:
        where = dict(zip(catalog.tolist(), range(1, len(catalog) + 1)))
        for raw, genres in zip(items["item"].tolist(), items["genres"].tolist()):
            code = where.get(raw)
            if code is None or not isinstance(genres, (list, tuple)) or not genres:
                continue
            per_movie[code] = [vocab.setdefault(g, len(vocab) + 1) for g in genres]
    lengths = np.array([len(g) for g in per_movie], dtype=np.int32)
    return JaggedColumn(np.array([g for gs in per_movie for g in gs], dtype=np.int64), lengths), len(vocab) + 1


def temporal_split(users: np.ndarray, train_frac: float = 0.9, valid_frac: float = 0.0) -> np.ndarray:
    """0 train / 1 valid / 2 test per row: position i of a user's n rows is train when i < train_frac * n.

    Args:
        users: user key per row [N], grouped by user and in time order within a user.
        train_frac: RF^2's 0.9.
        valid_frac: the latest share of each user's train rows held out for validation (0: none).

    Returns:
        int8 [N].

    Example:
        >>> temporal_split(np.array([1] * 10 + [2] * 3)).tolist()  # 3 rows: i = 2 < 2.7, no test row
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]
    """
    if not 0 < train_frac <= 1 or not 0 <= valid_frac < 1:
        raise C2ALError(f"RF^2 split: need 0 < train_frac <= 1 and 0 <= valid_frac < 1, got {train_frac}, {valid_frac}")
    users = np.asarray(users)
    new_user = np.r_[True, users[1:] != users[:-1]]
    starts = np.flatnonzero(new_user)
    n = np.diff(np.r_[starts, len(users)])  # [U]
    pos = np.arange(len(users)) - np.repeat(starts, n)  # [N]
    per_row_n = np.repeat(n, n)
    out = np.where(pos < per_row_n * train_frac, 0, 2).astype(np.int8)
    if valid_frac > 0:
        n_train = np.repeat(np.ceil(n * train_frac), n)
        out[(out == 0) & (pos >= n_train * (1 - valid_frac)) & (n_train > 1)] = 1
    return out


def rf2_click_splits(path: Path, *, history: int = 10, train_frac: float = 0.9, valid_frac: float = 0.0,
                     name: str = "rf2") -> ClickSplits:
    """RF^2's click examples of a MovieLens directory (module docstring).

    Args:
        path: a MovieLens directory (ml-1m, ml-20m, RecBole atomic files).
        history: clicked movies a history bag keeps.
        train_frac, valid_frac: as `temporal_split`.
        name: the schema's name (reports).

    Returns:
        ClickSplits.
    """
    raw = _read_any(Path(path))
    frame = _sorted_ratings(raw.ratings)
    catalog = np.unique(frame["item"].to_numpy())
    movie = (np.searchsorted(catalog, frame["item"].to_numpy()) + 1).astype(np.int64)
    users, clicks = frame["user"].to_numpy(), frame["click"].to_numpy()
    hist = click_history(users, movie, clicks, history)
    genre_of, n_genres = _genre_column(raw.items, catalog)
    full = Table(sparse={MOVIE: JaggedColumn.from_ids(movie), GENRES: genre_of.take(movie), HISTORY: hist},
                 dense=np.zeros((len(frame), 0), np.float32), labels=clicks.astype(np.float32),
                 user_ids=np.asarray(users).astype(np.int64), item_ids=movie,
                 timestamps=frame["timestamp"].to_numpy().astype(np.int64))
    schema = Schema(sparse=(SparseFeature(MOVIE, len(catalog) + 1, "item"), SparseFeature(GENRES, n_genres, "item", multi_hot=True),
                            SparseFeature(HISTORY, len(catalog) + 1, "user", multi_hot=True)), name=name)
    part = temporal_split(users, train_frac, valid_frac)
    tables = {k: full.take(np.flatnonzero(part == code)) for k, code in (("train", 0), ("valid", 1), ("test", 2))}
    if len(tables["train"]) == 0 or len(tables["test"]) == 0:
        raise C2ALError(f"{path}: the RF^2 split left {len(tables['train'])} train and {len(tables['test'])} test rows")
    return ClickSplits(train=tables["train"], valid=tables["valid"] if valid_frac > 0 else None, test=tables["test"],
                       schema=schema, num_movies=len(catalog))
