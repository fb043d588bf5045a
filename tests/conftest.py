"""Fixtures: small FAKE data files written into tmp_path (never real datasets, never into the repo).

One logical fake MovieLens (users, items, ratings) is written in the four file
formats the loader reads, so tests can compare formats row for row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import torch

GENRES = ("Action", "Comedy", "Drama", "Sci-Fi", "Children's")
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core CPU they slow down 10-40x.
    Test modules of small models opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_movielens() -> dict[str, pd.DataFrame]:
    """12 users x 10 ratings over 30 items; item 30 is rated only as some users' very last rating."""
    rng = np.random.default_rng(0)
    n_users, n_items, per_user = 12, 30, 10
    rows = []
    for u in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items), size=per_user, replace=False)  # never item 30 here
        times = 880_000_000 + np.sort(rng.choice(10_000, size=per_user, replace=False)) + 100_000 * u
        if u % 4 == 0:
            items[-1] = n_items  # the newest rating of every 4th user: item 30 lands in test only
        for i, t in zip(items, times):
            rows.append((u, int(i), int(rng.integers(1, 6)), int(t)))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    users = pd.DataFrame({
        "user": np.arange(1, n_users + 1),
        "age": [1, 18, 25, 35, 45, 50, 56, 18, 25, 35, 45, 1],  # ml-1m age codes, valid ages elsewhere too
        "gender": ["M", "F"] * 6,
        "occupation": ["writer", "artist", "doctor"] * 4,
        "zip": ["01234", "98105", "T8H1N", "55413"] * 3,  # leading zero and a Canadian code
    })
    items = pd.DataFrame({
        "item": np.arange(1, n_items + 1),
        "title": [f"Movie, The {i}" for i in range(1, n_items + 1)],
        "year": [1950 + (i * 7) % 50 for i in range(1, n_items + 1)],
        # every 3rd movie has two genres; movie 7 has none
        "genres": [[] if i == 7 else [GENRES[i % 5]] + ([GENRES[(i + 2) % 5]] if i % 3 == 0 else [])
                   for i in range(1, n_items + 1)],
    })
    return {"ratings": ratings, "users": users, "items": items}


def _write(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


def write_grouplens_100k(d: Path, data: dict[str, pd.DataFrame]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    r, u, it = data["ratings"], data["users"], data["items"]
    _write(d / "u.data", [f"{a}\t{b}\t{c}\t{t}" for a, b, c, t in r.itertuples(index=False)])
    _write(d / "u.user", [f"{x.user}|{x.age}|{x.gender}|{x.occupation}|{x.zip}" for x in u.itertuples()])
    lines = []
    for x in it.itertuples():
        flags = "|".join("1" if g in x.genres else "0" for g in ML100K_GENRES)
        lines.append(f"{x.item}|{x.title} ({x.year})|01-Jan-{x.year}||http://example.invalid/{x.item}|{flags}")
    _write(d / "u.item", lines, encoding="latin-1")
    return d


def write_atomic(d: Path, data: dict[str, pd.DataFrame], stem: str = "ml-100k") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    r, u, it = data["ratings"], data["users"], data["items"]
    _write(d / f"{stem}.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
           + [f"{a}\t{b}\t{c}\t{t}" for a, b, c, t in r.itertuples(index=False)])
    _write(d / f"{stem}.user", ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
           + [f"{x.user}\t{x.age}\t{x.gender}\t{x.occupation}\t{x.zip}" for x in u.itertuples()])
    _write(d / f"{stem}.item", ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
           + [f"{x.item}\t{x.title}\t{x.year}\t{' '.join(x.genres)}" for x in it.itertuples()])
    return d


def write_ml1m(d: Path, data: dict[str, pd.DataFrame]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    r, u, it = data["ratings"], data["users"], data["items"]
    _write(d / "ratings.dat", [f"{a}::{b}::{c}::{t}" for a, b, c, t in r.itertuples(index=False)])
    _write(d / "users.dat", [f"{x.user}::{x.gender}::{x.age}::{x.occupation}::{x.zip}" for x in u.itertuples()],
           encoding="latin-1")
    _write(d / "movies.dat", [f"{x.item}::{x.title} ({x.year})::{'|'.join(x.genres) or '(no genres listed)'}"
                              for x in it.itertuples()], encoding="latin-1")
    return d


def write_ml20m(d: Path, data: dict[str, pd.DataFrame]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    r = data["ratings"].rename(columns={"user": "userId", "item": "movieId"})
    r["rating"] = r["rating"].astype(float)
    r.to_csv(d / "ratings.csv", index=False)
    it = data["items"]
    pd.DataFrame({
        "movieId": it["item"],
        "title": [f"{t} ({y})" for t, y in zip(it["title"], it["year"])],  # commas: pandas quotes them
        "genres": ["|".join(g) or "(no genres listed)" for g in it["genres"]],
    }).to_csv(d / "movies.csv", index=False)
    return d


@pytest.fixture
def ml100k_dir(tmp_path: Path, fake_movielens: dict[str, pd.DataFrame]) -> Path:
    return write_grouplens_100k(tmp_path / "ml-100k", fake_movielens)


@pytest.fixture
def atomic_dir(tmp_path: Path, fake_movielens: dict[str, pd.DataFrame]) -> Path:
    return write_atomic(tmp_path / "atomic", fake_movielens)


@pytest.fixture
def ml1m_dir(tmp_path: Path, fake_movielens: dict[str, pd.DataFrame]) -> Path:
    return write_ml1m(tmp_path / "ml-1m", fake_movielens)


@pytest.fixture
def ml20m_dir(tmp_path: Path, fake_movielens: dict[str, pd.DataFrame]) -> Path:
    return write_ml20m(tmp_path / "ml-20m", fake_movielens)


@pytest.fixture
def clicks_frame() -> pd.DataFrame:
    """400 fake impressions: 20 users, ads, sites, two dense columns, a time column."""
    rng = np.random.default_rng(1)
    n = 400
    return pd.DataFrame({
        "uid": rng.integers(0, 20, n),
        "ad": rng.choice(["ad_a", "ad_b", "ad_c", "ad_d"], n),
        "site": rng.choice(["news", "shop", "video"], n),
        "country": rng.choice(["DE", "FR", "IT"], n),
        "price": rng.normal(10.0, 3.0, n),
        "pos": rng.integers(1, 6, n).astype(float),
        "ts": rng.permutation(n) + 1_600_000_000,
        "click": rng.integers(0, 2, n),
    })


@pytest.fixture
def clicks_csv(tmp_path: Path, clicks_frame: pd.DataFrame) -> Path:
    p = tmp_path / "clicks.csv"
    clicks_frame.to_csv(p, index=False)
    return p


@pytest.fixture
def clicks_parquet(tmp_path: Path, clicks_frame: pd.DataFrame) -> Path:
    p = tmp_path / "clicks.parquet"
    clicks_frame.to_parquet(p, index=False)
    return p


@pytest.fixture(scope="session")
def train_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4000 click rows for train.py runs: 200 users in 4 cities with an age, 80 items.

    Clicks depend on city x item and x1, so a factorization model learns them
    within 2 epochs; users older than 60 (about 7% of traffic) click more, a
    cohort the miner can expose.
    """
    rng = np.random.default_rng(0)
    n, users, items = 4000, 200, 80
    u = rng.integers(0, users, n)
    i = rng.integers(0, items, n)
    city = u % 4
    user_age = rng.normal(40, 12, users)
    age = user_age[u]
    x1 = rng.normal(size=n)
    logit = 2.0 * (city == i % 4) + 0.8 * x1 - 1.2 + 1.5 * (age > 60)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    df = pd.DataFrame({"user": u, "item": i, "city": [f"c{c}" for c in city], "age": age.round(1),
                       "hour": rng.integers(0, 24, n), "x1": x1, "x2": rng.normal(size=n),
                       "ts": rng.integers(0, 10**6, n), "click": click})
    path = tmp_path_factory.mktemp("train_data") / "clicks.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def crash_training(monkeypatch: pytest.MonkeyPatch):
    """`undo = crash_training(n)`: the next training run dies (KeyboardInterrupt, as a killed process) right after
    its n-th step, counted over every epoch and segment; `undo()` gives the loop its own train_epoch back to resume."""
    import c2al.train.loop as loop

    original = loop.train_epoch

    def arm(n: int):
        taken = [0]

        def crashing(*a, on_step=None, **kw):
            def hook(step: int, loss: float) -> None:
                on_step(step, loss)
                taken[0] += 1
                if taken[0] == n:
                    raise KeyboardInterrupt("simulated crash")
            return original(*a, on_step=hook, **kw)

        monkeypatch.setattr(loop, "train_epoch", crashing)
        return lambda: monkeypatch.setattr(loop, "train_epoch", original)

    return arm
