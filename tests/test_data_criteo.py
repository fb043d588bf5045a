"""Criteo text / NumPy and Parquet streams on small generated files: read back, units by rank, resume, splits, bad input."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c2al.config import Config
from c2al.data.criteo import CAT_NAMES, INT_NAMES, CriteoTextReader, dense_transform, open_criteo, write_criteo_days, write_criteo_numpy, write_criteo_text
from c2al.data.parquet import open_table, write_parquet
from c2al.data.stream import SourceStream, concat_tables, is_stream, open_stream
from c2al.data.stream_split import stream_splits
from c2al.data.vocab import Vocabulary
from c2al.errors import C2ALError


def _raw(reader, **kw):
    """Every row of a reader (its train lane with kw) as one dict of arrays."""
    from c2al.data.schema import Schema

    chunks = list(SourceStream(reader, Schema(sparse=()), None).raw_chunks(**kw))
    return {"labels": np.concatenate([c.labels for c in chunks]), "dense": np.concatenate([c.dense for c in chunks]),
            **{f"key:{n}": np.concatenate([c.keys[n] for c in chunks]) for n in reader.sparse},
            **{f"missing:{n}": np.concatenate([c.missing[n] for c in chunks]) for n in reader.sparse}}, chunks


def _expected_keys(df: pd.DataFrame, col: str) -> np.ndarray:
    return np.array([int(v, 16) if v else 0 for v in df[col]], dtype=np.uint64)


def _assert_same_rows(got: dict, df: pd.DataFrame) -> None:
    assert np.array_equal(got["labels"], df["label"].to_numpy(np.float32))
    assert np.allclose(got["dense"], dense_transform(df[list(INT_NAMES)].to_numpy(np.float64, na_value=np.nan)))
    for c in CAT_NAMES:
        missing = (df[c] == "").to_numpy()
        assert np.array_equal(got[f"missing:{c}"], missing)
        assert np.array_equal(got[f"key:{c}"][~missing], _expected_keys(df, c)[~missing])


@pytest.fixture
def text_file(tmp_path):
    df = write_criteo_text(tmp_path / "day_0", 3000, seed=1)
    return tmp_path / "day_0", df


# ---------------------------------------------------------------- read back


def test_text_rows_read_back_as_written_with_the_dlrm_transform(text_file):
    path, df = text_file
    got, _ = _raw(open_criteo(path))
    assert df["int_1"].min() < 0 and df["int_3"].isna().any() and (df["cat_5"] == "").any()  # the cases the transform must handle
    _assert_same_rows(got, df)
    assert got["dense"][df["int_3"].isna().to_numpy(), 3].max() == 0.0  # missing -> 0
    assert got["dense"][(df["int_1"] < 0).fillna(False).to_numpy(bool), 1].max() == 0.0  # negative -> log(1 + 0)


def test_gzip_file_reads_the_same_rows(text_file, tmp_path):
    path, df = text_file
    with open(path, "rb") as src, gzip.open(tmp_path / "copy.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    got, _ = _raw(open_criteo(tmp_path / "copy.gz"))
    _assert_same_rows(got, df)


def test_folder_of_days_is_read_in_day_order(tmp_path):
    days = write_criteo_days(tmp_path / "days", 3, 400, seed=5, gz=True)
    (tmp_path / "days" / "day_2.gz").rename(tmp_path / "days" / "day_10.gz")  # day 10 comes after day 1, not before it
    reader = open_criteo(tmp_path / "days")
    assert [p.name for p in reader.files] == ["day_0.gz", "day_1.gz", "day_10.gz"]
    got, _ = _raw(reader)
    _assert_same_rows(got, pd.concat(days, ignore_index=True))


def test_torchrec_numpy_layout_reads_back_as_written(tmp_path):
    written = write_criteo_numpy(tmp_path / "npy", 2, 500, seed=3)
    reader = open_criteo(tmp_path / "npy")
    got, _ = _raw(reader)
    dense = np.concatenate([d for d, _, _ in written])
    sparse = np.concatenate([s for _, s, _ in written])
    assert reader.n_files == 2 and np.array_equal(got["dense"], dense)
    assert np.array_equal(got["labels"], np.concatenate([y for _, _, y in written])[:, 0].astype(np.float32))
    for j, c in enumerate(CAT_NAMES):
        assert np.array_equal(got[f"key:{c}"], sparse[:, j].view(np.uint64)) and np.array_equal(got[f"missing:{c}"], sparse[:, j] == 0)


def test_parquet_rows_read_back_as_written(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 2500, seed=2, row_group_rows=600)
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), dense=("int_0", "int_1"), user_col="user")
    got, _ = _raw(reader)
    assert len(reader.units()) == 5 and reader.unit_rows(4) == 100
    assert np.array_equal(got["labels"], df["label"].to_numpy(np.float32))
    assert np.array_equal(got["dense"], df[["int_0", "int_1"]].to_numpy(np.float64))
    assert got["key:user"].view(np.int64).tolist() == df["user"].tolist()
    assert len(np.unique(got["key:cat_0"])) == df["cat_0"].nunique()


# ---------------------------------------------------------------- units, ranks, resume, memory


def test_text_blocks_start_at_lines_and_ranks_read_disjoint_units(text_file):
    path, df = text_file
    reader = CriteoTextReader([path], block_bytes=50_000, batch_bytes=20_000)
    assert len(reader.units()) >= 8
    lanes = [_raw(reader, rank=r, world_size=3)[0] for r in range(3)]
    assert sum(len(lane["labels"]) for lane in lanes) == len(df)
    rows = [sum(reader.unit_rows(i) for i in range(r, len(reader.units()), 3)) for r in range(3)]
    assert [len(lane["labels"]) for lane in lanes] == rows
    every, _ = _raw(reader)
    _assert_same_rows(every, df)  # units in order are the file's lines in order


@pytest.mark.parametrize("skip", [0, 1, 777, 1500, 2999, 3000, 5000])
def test_text_skip_continues_at_the_same_row(text_file, skip):
    path, _ = text_file
    reader = CriteoTextReader([path], block_bytes=50_000, batch_bytes=20_000)
    full, _ = _raw(reader, rank=1, world_size=2)
    tail, _ = _raw(reader, rank=1, world_size=2, skip=skip) if skip < len(full["labels"]) else ({"labels": np.zeros(0), "key:cat_0": np.zeros(0)}, None)
    assert np.array_equal(tail["labels"], full["labels"][skip:]) and np.array_equal(tail["key:cat_0"], full["key:cat_0"][skip:])


def test_parquet_skip_jumps_whole_row_groups_and_continues_at_the_same_row(tmp_path):
    write_parquet(tmp_path / "t.parquet", 3000, seed=2, row_group_rows=500)
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), user_col="user")
    full, _ = _raw(reader)
    tail, chunks = _raw(reader, skip=1234)
    assert np.array_equal(tail["key:cat_0"], full["key:cat_0"][1234:])
    assert chunks[0].unit == 2 and chunks[0].start == 234  # row groups 0 and 1 not read


@pytest.mark.slow
def test_a_200k_row_file_is_read_in_bounded_chunks(tmp_path):
    write_criteo_text(tmp_path / "big", 200_000, seed=0)
    reader = CriteoTextReader([tmp_path / "big"], block_bytes=8 << 20)
    sizes = [len(c) for c in SourceStream(reader, _empty_schema(), None).raw_chunks()]
    assert sum(sizes) == 200_000
    assert max(sizes) <= 25_000 and len(sizes) >= 8  # about 4 MiB of text per chunk: never the whole file
    assert len(reader.units()) >= 4 and all(b - a <= (8 << 20) + 4096 for _, a, b in reader._spans)


def _empty_schema():
    from c2al.data.schema import Schema

    return Schema(sparse=())


# ---------------------------------------------------------------- splits


def _ids(table) -> set:
    return set(zip(table.labels.tolist(), *(table.sparse[c].values.tolist() for c in ("cat_0", "cat_1", "cat_2"))))


def test_file_split_trains_on_earlier_days_and_halves_the_last(tmp_path):
    write_criteo_days(tmp_path / "d", 3, 1000, seed=0)
    s = stream_splits(open_criteo(tmp_path / "d"), split_by="auto", hash_size=(1 << 20,), eval_rows=300)
    assert s.train.rows is None and sum(len(c) for c in s.train.chunks()) == 2000
    assert len(s.valid) == 300 and len(s.test) == 300
    last = open_criteo(tmp_path / "d" / "day_2")
    every = next(iter(stream_splits(last, split_by="hash", valid_frac=0.01, test_frac=0.01, hash_size=(1 << 20,)).train.chunks()), None)
    assert every is not None
    full, _ = _raw(last)
    assert np.array_equal(s.valid.labels, full["labels"][:300]) and np.array_equal(s.test.labels, full["labels"][500:800])


def _row_keys(table) -> list:
    """Each row as a tuple of its label, dense values and every sparse id."""
    cols = [table.labels, *table.dense.T, *(table.sparse[c].values for c in CAT_NAMES)]
    return sorted(zip(*(c.tolist() for c in cols)))


def test_hash_split_parts_partition_the_rows_and_are_bounded(tmp_path):
    write_criteo_text(tmp_path / "one", 4000, seed=0)
    reader = open_criteo(tmp_path / "one")
    s = stream_splits(reader, split_by="auto", valid_frac=0.2, test_frac=0.2, hash_size=(1 << 30,), eval_rows=4000)
    train = [c for c in s.train.chunks()]
    n_train = sum(len(c) for c in train)
    assert 2100 < n_train < 2700 and 600 < len(s.valid) < 1000 and 600 < len(s.test) < 1000
    every = list(SourceStream(reader, s.schema, s.vocab).chunks())
    assert _row_keys(concat_tables([*train, s.valid, s.test])) == _row_keys(concat_tables(every))
    small = stream_splits(reader, split_by="hash", valid_frac=0.2, test_frac=0.2, hash_size=(1 << 30,), eval_rows=150)
    assert len(small.valid) == len(small.test) == 150
    assert np.array_equal(small.valid.sparse["cat_4"].values, s.valid.sparse["cat_4"].values[:150])  # the first rows of the part


def test_hash_split_by_user_keeps_each_users_rows_in_one_part(tmp_path):
    write_parquet(tmp_path / "t.parquet", 5000, seed=0, row_group_rows=1000, users=300)
    s = stream_splits(open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), user_col="user"),
                      split_by="hash", valid_frac=0.2, test_frac=0.2, hash_size=(1 << 20,), eval_rows=10_000)
    train_users = set(np.concatenate([c.user_ids for c in s.train.chunks()]).tolist())
    assert not (set(s.valid.user_ids.tolist()) & train_users) and not (set(s.test.user_ids.tolist()) & train_users)


def test_time_split_cuts_the_time_span_from_the_metadata(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 4000, seed=0, row_group_rows=700)
    s = stream_splits(open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), time_col="time"),
                      split_by="time", valid_frac=0.1, test_frac=0.2, hash_size=(1000,), eval_rows=100_000)
    t0, t1 = df["time"].min(), df["time"].max()
    test_from = t1 - 0.2 * (t1 - t0)
    valid_from = test_from - 0.1 * (t1 - t0)
    train_t = np.concatenate([c.timestamps for c in s.train.chunks()])
    assert train_t.max() < valid_from <= s.valid.timestamps.min() and s.valid.timestamps.max() < test_from <= s.test.timestamps.min()
    assert len(train_t) + len(s.valid) + len(s.test) == 4000


def test_file_split_needs_two_files(text_file):
    with pytest.raises(C2ALError, match="needs at least 2"):
        stream_splits(open_criteo(text_file[0]), split_by="file")


def test_time_split_needs_a_time_column(text_file):
    with pytest.raises(C2ALError, match="no time column"):
        stream_splits(open_criteo(text_file[0]), split_by="time")


# ---------------------------------------------------------------- vocabularies through a stream


def test_min_count_vocabulary_sizes_tables_and_survives_save_and_load(tmp_path, text_file):
    path, df = text_file
    s = stream_splits(open_criteo(path), min_count=3, eval_rows=200)
    f = s.schema.feature("cat_0")
    train_keys = np.concatenate([c.sparse["cat_0"].values for c in s.train.chunks()])
    assert f.num_embeddings == len(s.vocab.kept["cat_0"]) + 1 and train_keys.max() < f.num_embeddings
    s.vocab.save(tmp_path / "out")
    again = stream_splits(open_criteo(path), eval_rows=200, vocab=Vocabulary.load(tmp_path / "out"))
    assert again.schema == s.schema and np.array_equal(again.valid.sparse["cat_3"].values, s.valid.sparse["cat_3"].values)


def test_hash_size_per_field_sets_each_table(text_file):
    sizes = tuple(range(100, 126))
    s = stream_splits(open_criteo(text_file[0]), hash_size=sizes, eval_rows=100)
    assert [f.num_embeddings for f in s.schema.sparse] == list(sizes)


def test_table_streams_standardize_dense_from_a_train_sample(tmp_path):
    write_parquet(tmp_path / "t.parquet", 3000, seed=0)
    s = stream_splits(open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), dense=("int_0",)), hash_size=(100,))
    x = np.concatenate([c.dense for c in s.train.chunks()])
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-4


# ---------------------------------------------------------------- from a Config


def test_open_stream_reads_criteo_and_a_parquet_folder(tmp_path):
    write_criteo_days(tmp_path / "d", 2, 600, seed=0)
    s = open_stream(Config(data=f"criteo:{tmp_path / 'd'}", hash_size=(5000,), eval_rows=200, cohort_features=("cat_0", "int_2")))
    assert s.schema.feature_names == list(CAT_NAMES) and s.schema.dense == INT_NAMES and len(s.valid) == 200
    assert isinstance(s.valid.cohort_frame["cat_0"].dtype, pd.CategoricalDtype) and s.valid.cohort_frame["int_2"].dtype == np.float64
    assert "(missing)" in s.valid.cohort_frame["cat_0"].cat.categories and "" not in s.valid.cohort_frame["cat_0"].cat.categories
    assert s.schema.feature("cat_0").side == "user" and s.schema.feature("cat_1").side == "context"
    (tmp_path / "pq").mkdir()
    for d in range(3):
        write_parquet(tmp_path / "pq" / f"part-{d}.parquet", 800, seed=d, row_group_rows=300, int_cats=True)
    cfg = Config(data=str(tmp_path / "pq"), stream=True, label="label", sparse=("cat_0", "cat_1"), dense=("int_0",), user_col="user",
                 cohort_features=("cat_1",), hash_size=(1000,), eval_rows=300)
    assert is_stream(cfg) and not is_stream(Config())
    p = open_stream(cfg)
    assert len(p.train.units()) == 6 and p.train.rows == 1600  # files 0 and 1 train, file 2 halved
    assert isinstance(p.valid.cohort_frame["cat_1"].dtype, pd.CategoricalDtype)  # int codes, categorical by role


def test_with_cohorts_maps_train_chunks_and_the_held_out_tables(text_file):
    s = stream_splits(open_criteo(text_file[0]), hash_size=(1000,), eval_rows=100)
    c = s.with_cohorts(lambda frame: (frame["int_0"].to_numpy() > 1).astype(np.int64))
    chunk = next(iter(c.train.chunks()))
    assert np.array_equal(chunk.cohort_ids, (chunk.cohort_frame["int_0"].to_numpy() > 1).astype(np.int64))
    assert np.array_equal(c.valid.cohort_ids, (c.valid.cohort_frame["int_0"].to_numpy() > 1).astype(np.int64))


# ---------------------------------------------------------------- bad input: one line naming the file and the line / row group


def _corrupt(path, line: int, fn) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = fn(lines[line - 1])
    path.write_bytes(b"\n".join(lines))


def _one_line_error(fn) -> str:
    with pytest.raises(C2ALError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("edit, what", [
    (lambda row: b"\t".join(row.split(b"\t")[:-1]), "expected 40 tab-separated cells, found 39"),
    (lambda row: b"\t".join(row.split(b"\t")[:20] + [b"zz12"] + row.split(b"\t")[21:]), "cat_6 is not a hex hash: 'zz12'"),
    (lambda row: b"2" + row[1:], "label must be 0 or 1, got 2"),
    (lambda row: b"\t".join(row.split(b"\t")[:3] + [b"1.5"] + row.split(b"\t")[4:]), "int_2 is not an integer: '1.5'"),
])
def test_bad_text_rows_name_the_file_and_line(tmp_path, edit, what):
    write_criteo_days(tmp_path / "d", 2, 2500, seed=0)
    _corrupt(tmp_path / "d" / "day_0", 1777, edit)
    reader = CriteoTextReader([tmp_path / "d" / "day_0", tmp_path / "d" / "day_1"], block_bytes=100_000, batch_bytes=30_000)
    msg = _one_line_error(lambda: list(SourceStream(reader, _empty_schema(), None).raw_chunks()))
    assert msg.startswith(f"{tmp_path / 'd' / 'day_0'}: line 1777: ") and what in msg


def test_bad_label_in_parquet_names_the_row_group(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 1000, seed=0)
    df.loc[730, "label"] = 3
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path / "t.parquet"), row_group_size=250)
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",))
    msg = _one_line_error(lambda: list(SourceStream(reader, _empty_schema(), None).raw_chunks()))
    assert "t.parquet row group 2: label column 'label' must hold only 0 and 1, got 3 (row 230)" in msg


def test_nan_dense_in_parquet_names_the_row_group(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 1000, seed=0)
    df["int_4"] = df["int_4"].astype(float)
    df.loc[510, "int_4"] = np.nan
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path / "t.parquet"), row_group_size=250)
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), dense=("int_4",))
    msg = _one_line_error(lambda: list(SourceStream(reader, _empty_schema(), None).raw_chunks()))
    assert "t.parquet row group 2: dense column 'int_4' has a NaN or infinite value (row 10)" in msg


def test_unknown_column_names_the_file_and_the_columns(tmp_path):
    write_parquet(tmp_path / "t.parquet", 100, seed=0)
    msg = _one_line_error(lambda: open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0", "device")))
    assert "t.parquet: unknown column 'device' given as sparse" in msg and "'cat_25'" in msg


def test_bad_rows_of_valid_or_test_fail_before_training(tmp_path):
    write_criteo_days(tmp_path / "d", 2, 400, seed=0)
    _corrupt(tmp_path / "d" / "day_1", 10, lambda row: b"7" + row[1:])
    msg = _one_line_error(lambda: open_stream(Config(data=f"criteo:{tmp_path / 'd'}", hash_size=(100,))))
    assert "day_1: line 10: label must be 0 or 1, got 7" in msg


def test_unknown_criteo_cohort_feature_is_refused(text_file):
    msg = _one_line_error(lambda: open_criteo(text_file[0], cohort_features=("age",)))
    assert "--cohort-features age" in msg


def test_a_csv_table_streams_with_the_role_flags(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 3000, seed=0)
    df.to_csv(tmp_path / "t.csv", index=False)
    cfg = Config(data=str(tmp_path / "t.csv"), stream=True, label="label", sparse=("cat_0", "user"), dense=("int_0",), cohort_features=("cat_0",),
                 hash_size=(5000,), eval_rows=200)
    s = open_stream(cfg)
    parquet = open_stream(Config(**{**cfg.to_dict(), "data": str(tmp_path / "t.parquet"), "sparse": ("cat_0",), "dense": ("int_0",),
                                    "cohort_features": ("cat_0",), "hash_size": (5000,)}))
    assert s.train.units() == [str(tmp_path / "t.csv")] and len(s.valid) == len(s.test) == 200
    assert np.array_equal(s.valid.labels, parquet.valid.labels) and np.array_equal(s.valid.sparse["cat_0"].values, parquet.valid.sparse["cat_0"].values)
    assert isinstance(s.valid.cohort_frame["cat_0"].dtype, pd.CategoricalDtype)


def test_a_short_row_in_a_gzip_day_names_the_file_and_line(tmp_path):
    write_criteo_days(tmp_path / "d", 1, 1200, seed=0)
    _corrupt(tmp_path / "d" / "day_0", 1001, lambda row: row[: row.rindex(b"\t")])
    with open(tmp_path / "d" / "day_0", "rb") as src, gzip.open(tmp_path / "day_0.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    reader = CriteoTextReader([tmp_path / "day_0.gz"], batch_bytes=40_000)
    msg = _one_line_error(lambda: list(SourceStream(reader, _empty_schema(), None).raw_chunks()))
    assert msg == f"{tmp_path / 'day_0.gz'}: line 1001: expected 40 tab-separated cells, found 39"


def test_a_null_categorical_cohort_value_is_a_category_not_nan(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 600, seed=0, int_cats=True)
    df["cat_3"] = df["cat_3"].astype("Int64")
    df.loc[5, "cat_3"] = pd.NA
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path / "t.parquet"))
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_3",), cohort_features=("cat_3", "int_0"))
    frame = _raw(reader)[1][0].frame
    assert frame["cat_3"].iloc[5] == "(missing)" and frame["cat_3"].iloc[6] == str(df["cat_3"].iloc[6]) and not frame["cat_3"].isna().any()
    assert isinstance(frame["cat_3"].dtype, pd.CategoricalDtype) and frame["int_0"].dtype == np.int64


def test_numpy_units_are_row_ranges_dealt_by_rank_and_skipped_without_reading(tmp_path):
    from c2al.data.criteo import CriteoNumpyReader

    write_criteo_numpy(tmp_path / "npy", 2, 700, seed=3)
    reader = CriteoNumpyReader(tmp_path / "npy", unit_rows=256, chunk_rows=100)
    assert len(reader.units()) == 6 and [reader.unit_rows(i) for i in range(6)] == [256, 256, 188] * 2
    full, _ = _raw(reader)
    lanes = [_raw(reader, rank=r, world_size=2)[0]["key:cat_7"] for r in range(2)]
    assert np.array_equal(np.sort(np.concatenate(lanes)), np.sort(full["key:cat_7"]))
    tail, chunks = _raw(reader, rank=1, world_size=2, skip=300)
    assert np.array_equal(tail["key:cat_7"], lanes[1][300:]) and chunks[0].unit == 3 and chunks[0].start == 44


def test_item_column_ids_are_the_tables_item_ids(tmp_path):
    write_parquet(tmp_path / "t.parquet", 1000, seed=0)
    s = stream_splits(open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), user_col="user", item_col="cat_1"), hash_size=(300,))
    chunk = next(iter(s.train.chunks()))
    assert s.schema.item_features == ["cat_1"] and np.array_equal(chunk.item_ids, chunk.sparse["cat_1"].values)
    assert s.schema.feature_names == ["user", "cat_1", "cat_0"] and s.valid.item_ids is not None


def test_time_split_reads_only_the_row_groups_its_part_can_hold(tmp_path):
    write_parquet(tmp_path / "t.parquet", 4000, seed=0, row_group_rows=400)  # time sorted: each row group a time window
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), time_col="time")
    s = stream_splits(reader, split_by="time", valid_frac=0.1, test_frac=0.2, hash_size=(1000,), eval_rows=100)
    train_units = s.train.units()
    assert 6 <= len(train_units) <= 8 and train_units[0].endswith("row group 0")  # the last ~30% of the time span holds no train rows
    read = []
    original = reader.read
    reader.read = lambda i, start=0: (read.append(i), original(i, start))[1]
    stream_splits(reader, split_by="time", valid_frac=0.1, test_frac=0.2, hash_size=(1000,), eval_rows=100)
    assert min(read[:-1]) >= 6 and read[-1] == 0  # valid / test read from near the cut on, then the first train chunk (validate)


def test_time_split_reads_a_timestamp_column_as_epoch_seconds(tmp_path):
    df = write_parquet(tmp_path / "t.parquet", 2000, seed=0, row_group_rows=500)
    df["time"] = pd.to_datetime(df["time"], unit="s")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path / "t.parquet"), row_group_size=500)
    reader = open_table(tmp_path / "t.parquet", label="label", sparse=("cat_0",), time_col="time")
    s = stream_splits(reader, split_by="time", valid_frac=0.1, test_frac=0.1, hash_size=(100,))
    seconds = (df["time"] - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    assert reader.time_range == (seconds.min(), seconds.max())
    assert s.test.timestamps.min() >= seconds.max() - 0.1 * (seconds.max() - seconds.min()) > s.valid.timestamps.max()
