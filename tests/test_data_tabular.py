"""Tabular CSV / Parquet loader, the shared split helpers, and `load_source` dispatch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from c2al.data import iter_batches
from c2al.data.sources import load_source
from c2al.data.tabular import load_tabular, split_per_user, split_random
from c2al.errors import C2ALError

ROLES = dict(label="click", sparse=["ad", "site", "country"], dense=["price", "pos"], user_col="uid")


def _all_rows(s) -> list:  # type: ignore[no-untyped-def]
    return [s.train, s.valid, s.test]


# ---------------------------------------------------------------- split helpers


def test_split_per_user_puts_latest_rows_in_test() -> None:
    users = np.array([7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3, 3])
    times = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 5, 6])
    split = split_per_user(users, [times], valid_frac=0.2, test_frac=0.1)
    # user 7: 10 rows -> 1 test (time 9), 2 valid (8, 7), 7 train; user 3: 2 rows -> both train
    assert split.tolist() == [2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_split_per_user_breaks_time_ties_with_the_next_key() -> None:
    split = split_per_user(np.zeros(4, int), [np.zeros(4, int), np.array([3, 0, 2, 1])], 0.25, 0.25)
    assert split.tolist() == [2, 0, 1, 0]


def test_split_random_sizes_are_floors_of_fractions() -> None:
    assert np.bincount(split_random(1003, 0.1, 0.2, seed=3)).tolist() == [703, 100, 200]


# ---------------------------------------------------------------- roundtrip


def test_csv_roundtrip_labels_and_sides(clicks_csv: Path, clicks_frame: pd.DataFrame) -> None:
    s = load_tabular(clicks_csv, **ROLES)
    assert s.schema.feature_names == ["uid", "ad", "site", "country"]
    assert [f.side for f in s.schema.sparse] == ["user", "context", "context", "context"]
    assert s.schema.dense == ("price", "pos")
    assert sum(len(t) for t in _all_rows(s)) == len(clicks_frame)
    total_pos = sum(t.labels.sum() for t in _all_rows(s))
    assert total_pos == clicks_frame["click"].sum()


def test_csv_roundtrip_recovers_the_raw_values(clicks_csv: Path, clicks_frame: pd.DataFrame) -> None:
    s = load_tabular(clicks_csv, **ROLES, time_col="ts")
    # timestamps are unique in the fake file, so they identify the source row of every output row
    src = clicks_frame.set_index("ts").loc[s.test.timestamps]
    np.testing.assert_array_equal(s.test.labels, src["click"].to_numpy())
    vocab = sorted(clicks_frame["ad"].unique())  # every ad is in train, vocab is sorted
    decoded = np.array(vocab)[s.test.sparse["ad"].values - 1]
    np.testing.assert_array_equal(decoded, src["ad"].to_numpy())


def test_parquet_loads_like_csv(clicks_csv: Path, clicks_parquet: Path) -> None:
    a, b = load_tabular(clicks_csv, **ROLES), load_tabular(clicks_parquet, **ROLES)
    assert a.schema.sparse == b.schema.sparse
    for ta, tb in zip(_all_rows(a), _all_rows(b)):
        np.testing.assert_array_equal(ta.labels, tb.labels)
        np.testing.assert_allclose(ta.dense, tb.dense, rtol=1e-6)
        for f in a.schema.feature_names:
            np.testing.assert_array_equal(ta.sparse[f].values, tb.sparse[f].values)


def test_dense_is_standardized_with_train_statistics(clicks_csv: Path) -> None:
    s = load_tabular(clicks_csv, **ROLES)
    np.testing.assert_allclose(s.train.dense.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.train.dense.std(axis=0), 1.0, atol=1e-4)


def test_constant_dense_column_is_not_divided_by_zero(tmp_path: Path, clicks_frame: pd.DataFrame) -> None:
    clicks_frame.assign(price=5.0).to_csv(tmp_path / "c.csv", index=False)
    s = load_tabular(tmp_path / "c.csv", **ROLES)
    assert (s.train.dense[:, 0] == 0).all()


def test_value_unseen_in_train_maps_to_zero(tmp_path: Path, clicks_frame: pd.DataFrame) -> None:
    df = clicks_frame.copy()
    df.loc[df["ts"] == df["ts"].max(), "site"] = "brand_new"  # the newest row goes to test under a time split
    df.to_csv(tmp_path / "c.csv", index=False)
    s = load_tabular(tmp_path / "c.csv", **{**ROLES, "user_col": None}, time_col="ts")
    newest = s.test.timestamps == df["ts"].max()
    assert s.test.sparse["site"].values[newest].tolist() == [0]
    assert s.schema.feature("site").num_embeddings == 4  # news, shop, video + the reserved 0


def test_time_and_user_columns_split_per_user_by_time(clicks_csv: Path) -> None:
    s = load_tabular(clicks_csv, **ROLES, time_col="ts")
    frames = [pd.DataFrame({"u": t.user_ids, "ts": t.timestamps, "k": k}) for k, t in enumerate(_all_rows(s))]
    per = pd.concat(frames).groupby(["u", "k"])["ts"].agg(["min", "max"]).unstack("k")
    assert (per[("max", 0)] < per[("min", 2)]).all()


def test_time_column_without_user_column_splits_globally_by_time(clicks_csv: Path) -> None:
    s = load_tabular(clicks_csv, label="click", sparse=["ad"], time_col="ts")
    assert s.train.timestamps.max() < s.valid.timestamps.min() <= s.valid.timestamps.max() < s.test.timestamps.min()
    assert (s.train.user_ids == -1).all() and s.train.item_ids is None


def test_date_strings_in_the_time_column_become_epoch_seconds(tmp_path: Path, clicks_frame: pd.DataFrame) -> None:
    df = clicks_frame.assign(ts=pd.to_datetime(clicks_frame["ts"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S"))
    s = load_tabular(_write(tmp_path, df), **ROLES, time_col="ts")
    ref = load_tabular(_write(tmp_path, clicks_frame, "ref.csv"), **ROLES, time_col="ts")
    np.testing.assert_array_equal(s.test.timestamps, ref.test.timestamps)


def test_user_and_item_columns_become_sparse_fields(clicks_csv: Path) -> None:
    s = load_tabular(clicks_csv, label="click", sparse="site", user_col="uid", item_col="ad")
    assert s.schema.feature_names == ["uid", "ad", "site"]
    assert s.schema.user_features == ["uid"] and s.schema.item_features == ["ad"]
    assert s.train.item_ids is not None and s.train.item_ids.max() == 3


def test_cohort_features_default_to_user_side_columns(clicks_csv: Path) -> None:
    s = load_tabular(clicks_csv, **ROLES)
    assert s.schema.cohort_features == ("uid",)
    assert list(s.train.cohort_frame.columns) == ["uid"]


def test_sparse_cohort_features_are_user_side_and_raw(clicks_csv: Path, clicks_frame: pd.DataFrame) -> None:
    s = load_tabular(clicks_csv, **ROLES, cohort_features=["country", "price"])
    assert s.schema.feature("country").side == "user"
    assert s.schema.cohort_features == ("country", "price")
    assert set(s.train.cohort_frame["country"]) == {"DE", "FR", "IT"}
    assert s.train.cohort_frame["price"].mean() == pytest.approx(clicks_frame["price"].mean(), rel=0.1)


def test_random_split_is_reproducible_by_seed(clicks_csv: Path) -> None:
    a, b, c = (load_tabular(clicks_csv, **ROLES, seed=k) for k in (4, 4, 5))
    np.testing.assert_array_equal(a.test.user_ids, b.test.user_ids)
    assert not np.array_equal(a.test.user_ids, c.test.user_ids)


def test_tabular_batches_are_valid_kjts(clicks_parquet: Path) -> None:
    s = load_tabular(clicks_parquet, **ROLES)
    batch = next(iter_batches(s.train, s.schema, 64, shuffle=True))
    assert batch.sparse.keys() == s.schema.feature_names
    assert batch.sparse.lengths().tolist() == [1] * 64 * 4
    assert batch.dense.shape == (64, 2)


# ---------------------------------------------------------------- bad input


def _write(tmp_path: Path, df: pd.DataFrame, name: str = "bad.csv") -> Path:
    p = tmp_path / name
    df.to_csv(p, index=False) if name.endswith(".csv") else df.to_parquet(p, index=False)
    return p


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(C2ALError, match="nope.csv: no such file"):
        load_tabular(tmp_path / "nope.csv", **ROLES)


def test_unsupported_extension_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(C2ALError, match=r"data\.xlsx: unsupported file type"):
        load_tabular(tmp_path / "data.xlsx", **ROLES)


def test_unreadable_parquet_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(C2ALError, match=r"broken\.parquet: cannot read"):
        load_tabular(tmp_path / "broken.parquet", **ROLES)


def test_malformed_csv_is_named(tmp_path: Path) -> None:
    (tmp_path / "ragged.csv").write_text("click,ad\n1,a\n0,b,extra,fields\n")
    with pytest.raises(C2ALError, match=r"ragged\.csv: cannot read"):
        load_tabular(tmp_path / "ragged.csv", label="click", sparse=["ad"])


def test_unknown_column_lists_the_available_ones(clicks_csv: Path) -> None:
    with pytest.raises(C2ALError, match=r"clicks\.csv: unknown column 'adz'.*available columns: \['uid', 'ad'"):
        load_tabular(clicks_csv, label="click", sparse=["adz"])


def test_label_outside_0_1_shows_the_values(tmp_path: Path, clicks_frame: pd.DataFrame) -> None:
    p = _write(tmp_path, clicks_frame.assign(click=clicks_frame["click"] * 3 + 2))
    with pytest.raises(C2ALError, match=r"bad\.csv: label column 'click' must hold only 0 and 1, found \[(2, 5|5, 2)\]"):
        load_tabular(p, **ROLES)


def test_nan_label_is_rejected(tmp_path: Path, clicks_frame: pd.DataFrame) -> None:
    df = clicks_frame.astype({"click": float})
    df.loc[5, "click"] = np.nan
    with pytest.raises(C2ALError, match=r"bad\.csv: label column 'click' has 1 missing"):
        load_tabular(_write(tmp_path, df), **ROLES)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_dense_is_rejected(tmp_path: Path, clicks_frame: pd.DataFrame, bad: float) -> None:
    df = clicks_frame.copy()
    df.loc[3, "pos"] = bad
    with pytest.raises(C2ALError, match=r"bad\.parquet: dense column 'pos' has 1 NaN or infinite"):
        load_tabular(_write(tmp_path, df, "bad.parquet"), **ROLES)


def test_non_numeric_dense_column_is_rejected(clicks_csv: Path) -> None:
    with pytest.raises(C2ALError, match=r"clicks\.csv: dense column 'site' is not numeric"):
        load_tabular(clicks_csv, label="click", sparse=["ad"], dense=["site"])


def test_too_few_rows_for_a_split_is_rejected(tmp_path: Path, clicks_frame: pd.DataFrame) -> None:
    with pytest.raises(C2ALError, match=r"bad\.csv: the valid split is empty \(8 rows"):
        load_tabular(_write(tmp_path, clicks_frame.head(8)), **ROLES)


@pytest.mark.parametrize(
    "roles, message",
    [
        (dict(label="click", sparse=["click", "ad"]), "'click' is given as label and as sparse"),
        (dict(label="click", sparse=["ad", "price"], dense=["price"]), "'price' is given as sparse and as dense"),
        (dict(label="click", sparse=["ad"], dense=["uid"], user_col="uid"), "'uid' is given as user column and as dense"),
        (dict(label="click", sparse=["ad", "ad"]), "'ad' is given twice as sparse"),
        (dict(label="click", sparse=["ad"], user_col="uid", item_col="uid"), "'uid' is given as user column and as item"),
    ],
)
def test_column_in_two_roles_is_rejected(clicks_csv: Path, roles: dict, message: str) -> None:
    with pytest.raises(C2ALError, match=rf"clicks\.csv: column {message}"):
        load_tabular(clicks_csv, **roles)


def test_label_as_cohort_feature_is_rejected(clicks_csv: Path) -> None:
    with pytest.raises(C2ALError, match=r"clicks\.csv: column 'click' is given as label and as cohort feature"):
        load_tabular(clicks_csv, **ROLES, cohort_features=["click"])


# ---------------------------------------------------------------- load_source dispatch


def test_load_source_reads_a_csv_with_roles(clicks_csv: Path) -> None:
    s = load_source(str(clicks_csv), label="click", sparse="ad,site", dense=None, time_col=None)
    assert s.schema.feature_names == ["ad", "site"]


def test_load_source_without_label_asks_for_it(clicks_csv: Path) -> None:
    with pytest.raises(C2ALError, match="clicks.csv.*pass --label"):
        load_source(str(clicks_csv), sparse="ad")


def test_load_source_reads_movielens_directories(ml100k_dir: Path) -> None:
    a = load_source(f"movielens:{ml100k_dir}", test_frac=0.2)
    b = load_source(str(ml100k_dir), test_frac=0.2)
    assert a.schema == b.schema and len(a.test) == len(b.test) == 12 * 2


def test_load_source_builds_synthetic_data_from_config_fields() -> None:
    s = load_source("synthetic", n_rows=3000, minority_shares="0.05,0.04", valid_frac=0.2)
    assert s.schema.name == "synthetic" and len(s.valid) == 600


def test_load_source_rejects_roles_the_source_does_not_take(ml100k_dir: Path) -> None:
    with pytest.raises(C2ALError, match=r"does not take \['label'\]"):
        load_source(str(ml100k_dir), label="click")


def test_load_source_rejects_unknown_names() -> None:
    with pytest.raises(C2ALError, match="unknown data source 'criteo-1tb'"):
        load_source("criteo-1tb")
