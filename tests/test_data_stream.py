"""Streams: an in-memory table as a stream, batches cut from a lane (carry-over, prefetch, resume), StreamSplits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Table
from c2al.data.stream import TableStream, concat_tables, iter_stream_batches
from c2al.data.vocab import KeyCounter, Vocabulary, value_keys
from c2al.errors import C2ALError


def _table(n: int) -> tuple[Table, Schema]:
    """n rows whose ids and labels encode the row index, so order and identity are checkable."""
    idx = np.arange(n)
    schema = Schema(sparse=(SparseFeature("a", n + 1), SparseFeature("b", 7)), dense=("x",), cohort_features=("c",), name="t")
    frame = pd.DataFrame({"c": pd.Categorical(idx % 3)})
    table = Table(sparse={"a": JaggedColumn.from_ids(idx + 1), "b": JaggedColumn.from_ids(idx % 7)},
                  dense=idx.reshape(-1, 1).astype(np.float32), labels=(idx % 2).astype(np.float32), user_ids=idx.astype(np.int64),
                  cohort_frame=frame)
    return table, schema


def _rows(chunks) -> np.ndarray:
    return np.concatenate([c.user_ids for c in chunks]) if chunks else np.zeros(0, np.int64)


def test_table_stream_deals_units_round_robin_and_the_lanes_partition_the_rows():
    table, schema = _table(1050)
    stream = TableStream(table, schema, unit_rows=100)
    lanes = [_rows(list(stream.chunks(rank=r, world_size=3))) for r in range(3)]
    assert len(stream.units()) == 11
    assert lanes[0][:100].tolist() == list(range(100)) and lanes[0][100:200].tolist() == list(range(300, 400))
    assert lanes[2][-50:].tolist() == list(range(1000, 1050)) or lanes[1][-50:].tolist() == list(range(1000, 1050))
    both = np.concatenate(lanes)
    assert len(both) == 1050 and np.array_equal(np.sort(both), np.arange(1050))


@pytest.mark.parametrize("skip", [0, 1, 99, 100, 250, 1049, 2000])
def test_skip_gives_the_tail_of_an_unskipped_lane(skip):
    table, schema = _table(1050)
    stream = TableStream(table, schema, unit_rows=100)
    full = _rows(list(stream.chunks(rank=1, world_size=2)))
    assert _rows(list(stream.chunks(rank=1, world_size=2, skip=skip))).tolist() == full[skip:].tolist()


def test_batches_carry_chunk_remainders_and_drop_the_last_partial_batch():
    table, schema = _table(1050)
    stream = TableStream(table, schema, unit_rows=70)  # 70-row chunks, 64-row batches: every batch but the first spans two chunks
    batches = list(iter_stream_batches(stream, 64, prefetch=0))
    assert [len(b) for b in batches] == [64] * (1050 // 64)
    got = np.concatenate([b.user_ids.numpy() for b in batches])
    assert got.tolist() == list(range(1050 // 64 * 64))
    b = batches[3]
    assert b.sparse["a"].values().tolist() == (b.user_ids + 1).tolist() and b.labels.tolist() == (b.user_ids % 2).float().tolist()


def test_local_batches_split_the_global_batch_per_rank():
    table, schema = _table(1000)
    stream = TableStream(table, schema, unit_rows=128)
    per_rank = [list(iter_stream_batches(stream, 64, rank=r, world_size=2, prefetch=0)) for r in range(2)]
    assert all(len(b) == 32 for lane in per_rank for b in lane)
    seen = np.concatenate([b.user_ids.numpy() for lane in per_rank for b in lane])
    assert len(np.unique(seen)) == len(seen)


def test_prefetch_yields_the_same_batches_as_reading_in_the_callers_thread():
    table, schema = _table(2000)
    stream = TableStream(table, schema, unit_rows=333)
    plain = list(iter_stream_batches(stream, 100, prefetch=0))
    ahead = list(iter_stream_batches(stream, 100, prefetch=3))
    assert len(plain) == len(ahead) == 20
    for p, a in zip(plain, ahead):
        assert p.user_ids.tolist() == a.user_ids.tolist() and p.sparse["b"].values().tolist() == a.sparse["b"].values().tolist()


def test_skip_steps_resumes_at_the_next_batch():
    table, schema = _table(2000)
    stream = TableStream(table, schema, unit_rows=333)
    full = list(iter_stream_batches(stream, 100, rank=1, world_size=2, prefetch=2))
    resumed = list(iter_stream_batches(stream, 100, rank=1, world_size=2, skip_steps=7, prefetch=2))
    assert [b.user_ids.tolist() for b in resumed] == [b.user_ids.tolist() for b in full[7:]]


def test_an_error_while_reading_ahead_reaches_the_consumer():
    table, schema = _table(500)

    def broken(t: Table) -> Table:
        if t.user_ids[0] >= 200:
            raise C2ALError("bad.parquet row group 2: label column 'y' must hold only 0 and 1")
        return t

    stream = TableStream(table, schema, unit_rows=100).map(broken)
    it = iter_stream_batches(stream, 50, prefetch=2)
    assert len(next(it)) == 50
    with pytest.raises(C2ALError, match="row group 2"):
        list(it)


def test_closing_the_iterator_early_stops_the_reader_thread():
    import threading

    table, schema = _table(5000)
    it = iter_stream_batches(TableStream(table, schema, unit_rows=100), 10, prefetch=2)
    next(it)
    it.close()
    assert not any(t.name == "c2al-stream-prefetch" and t.is_alive() for t in threading.enumerate())


def test_concat_keeps_rows_in_order_and_categorical_cohort_columns():
    table, _ = _table(10)
    both = concat_tables([table.take(np.arange(4)), table.take(np.arange(4, 10))])
    assert both.user_ids.tolist() == list(range(10)) and both.sparse["a"].values.tolist() == list(range(1, 11))
    assert isinstance(both.cohort_frame["c"].dtype, pd.CategoricalDtype)


def test_map_applies_to_every_chunk():
    table, schema = _table(300)
    stream = TableStream(table, schema, unit_rows=100).map(lambda t: t.with_cohorts(t.user_ids % 2))
    assert all((c.cohort_ids == c.user_ids % 2).all() for c in stream.chunks())


# ---------------------------------------------------------------- vocabularies


def test_hashing_maps_equal_keys_to_equal_ids_in_range_and_missing_to_zero():
    v = Vocabulary.hashing(("a", "b"), (50, 7))
    keys = np.array([3, 3, 2**40, 17, 0], dtype=np.uint64)
    missing = np.array([False, False, False, False, True])
    a, b = v.encode("a", keys, missing), v.encode("b", keys, missing)
    assert a[0] == a[1] and a[4] == 0 and b[4] == 0
    assert a[:4].min() >= 1 and a.max() < 50 and b[:4].min() >= 1 and b.max() < 7
    assert v.num_embeddings("a") == 50 and v.num_embeddings("b") == 7


def test_hash_sizes_must_be_one_or_one_per_field():
    with pytest.raises(C2ALError, match="3 sizes for 2 sparse fields"):
        Vocabulary.hashing(("a", "b"), (5, 6, 7))


def test_min_count_vocabulary_keeps_frequent_keys_over_chunks():
    counter = KeyCounter(("a",))
    for part in (np.array([5, 5, 9, 1]), np.array([9, 9, 7, 5])):
        counter.add("a", part.astype(np.uint64), np.zeros(len(part), bool))
    v = Vocabulary.counted(counter, min_count=2)
    ids = v.encode("a", np.array([1, 5, 7, 9, 11], np.uint64), np.zeros(5, bool))
    assert ids.tolist() == [0, 1, 0, 2, 0] and v.num_embeddings("a") == 3


def test_vocabulary_saved_and_loaded_maps_ids_the_same(tmp_path):
    counter = KeyCounter(("a", "b"))
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 1000).astype(np.uint64)
    for f in ("a", "b"):
        counter.add(f, keys, np.zeros(1000, bool))
    for v in (Vocabulary.counted(counter, 3).with_dense(("x",), rng.normal(2, 3, (100, 1))), Vocabulary.hashing(("a", "b"), (97, 13))):
        v.save(tmp_path / "run")
        back = Vocabulary.load(tmp_path / "run")
        for f in ("a", "b"):
            assert np.array_equal(back.encode(f, keys, keys == 0), v.encode(f, keys, keys == 0))
            assert back.num_embeddings(f) == v.num_embeddings(f)
        x = rng.normal(size=(5, len(v.dense)))
        assert np.array_equal(back.standardize(x), v.standardize(x))


def test_loading_a_missing_vocabulary_names_the_folder(tmp_path):
    with pytest.raises(C2ALError, match="cannot read the saved vocabulary"):
        Vocabulary.load(tmp_path)


def test_value_keys_hash_text_and_keep_integers():
    k_int, m_int = value_keys(pd.Series([3, None, 3], dtype="Int64"))
    k_txt, m_txt = value_keys(pd.Series(["x", None, "x"]))
    assert k_int[0] == 3 and m_int.tolist() == [False, True, False]
    assert k_txt[0] == k_txt[2] and m_txt.tolist() == [False, True, False]


# ---------------------------------------------------------------- the in-memory tabular loader's cohort frame


def test_tabular_cohort_columns_that_are_sparse_fields_are_categories(tmp_path):
    from c2al.data.tabular import load_tabular

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"y": rng.integers(0, 2, 400), "device": rng.integers(0, 5, 400), "age": rng.integers(18, 70, 400),
                       "ad": rng.integers(0, 9, 400)})
    df.to_parquet(tmp_path / "t.parquet")
    s = load_tabular(tmp_path / "t.parquet", label="y", sparse=["device", "ad"], dense=["age"], cohort_features=["device", "age"])
    frame = s.valid.cohort_frame
    assert isinstance(frame["device"].dtype, pd.CategoricalDtype) and frame["age"].dtype == np.int64
    assert sorted(frame["device"].cat.categories.tolist()) == sorted(set(df["device"]))


def test_more_processes_than_units_is_refused():
    table, schema = _table(150)
    with pytest.raises(C2ALError, match="2 reading unit\\(s\\) for 3 processes"):
        next(TableStream(table, schema, unit_rows=100).chunks(rank=0, world_size=3))
