"""Synthetic generator: reproducible streams, planted minority cohorts, learnable labels."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from c2al.data import iter_batches
from c2al.data.synthetic import SyntheticConfig, SyntheticGenerator, make_synthetic_splits
from c2al.errors import C2ALError

SMALL = SyntheticConfig(n_users=3000, n_items=400, n_rows=60_000, seed=3)


@pytest.fixture(scope="module")
def small_splits():  # type: ignore[no-untyped-def]
    return make_synthetic_splits(SMALL)


def _ne(p: np.ndarray, y: np.ndarray) -> float:
    """Normalized entropy: log loss over the entropy of the empirical rate."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    b = y.mean()
    return float(ll / -(b * np.log(b) + (1 - b) * np.log(1 - b)))


def test_same_seed_gives_the_same_rows() -> None:
    a = next(SyntheticGenerator(SMALL).stream(5000))
    b = next(SyntheticGenerator(SMALL).stream(5000))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sparse["item_id"].values, b.sparse["item_id"].values)
    np.testing.assert_array_equal(a.dense, b.dense)


def test_other_seed_gives_other_rows() -> None:
    a = next(SyntheticGenerator(SMALL).stream(5000))
    b = next(SyntheticGenerator(SyntheticConfig(**{**SMALL.__dict__, "seed": 4})).stream(5000))
    assert not np.array_equal(a.sparse["item_id"].values, b.sparse["item_id"].values)


def test_stream_chunk_sizes_sum_to_n_rows() -> None:
    cfg = SyntheticConfig(n_users=500, n_items=50, n_rows=10_007)
    sizes = [len(t) for t in SyntheticGenerator(cfg).stream(3000)]
    assert sizes == [3000, 3000, 3000, 1007]


def test_stream_chunk_depends_only_on_its_index() -> None:
    gen = SyntheticGenerator(SyntheticConfig(n_users=500, n_items=50, n_rows=9000))
    third = list(gen.stream(3000))[2]
    again = gen.chunk(2, 3000, first_row=6000)
    np.testing.assert_array_equal(third.labels, again.labels)
    np.testing.assert_array_equal(third.timestamps, np.arange(6000, 9000))


def test_minority_shares_match_the_config(small_splits) -> None:  # type: ignore[no-untyped-def]
    tc = small_splits.train.true_cohorts
    for k, share in enumerate(SMALL.minority_shares):
        assert abs((tc == k).mean() - share) < 0.004
    assert set(np.unique(tc)) == {-1, 0, 1}


def test_minority_label_rates_differ_from_the_majority(small_splits) -> None:  # type: ignore[no-untyped-def]
    t = small_splits.train
    majority = t.labels[t.true_cohorts == -1].mean()
    assert 0.10 < t.labels.mean() < 0.30
    for k, target in enumerate(SMALL.minority_ctrs):
        rate = t.labels[t.true_cohorts == k].mean()
        assert abs(rate - target) < 0.03
        assert abs(rate - majority) > 0.07


def test_minorities_flip_the_category_device_interaction() -> None:
    gen = SyntheticGenerator(SMALL)
    t = gen.chunk(0, 60_000)
    flip = gen.flip[t.sparse["item_category"].values - 1, t.sparse["device"].values - 1] > 0

    def lift(rows: np.ndarray) -> float:  # click-rate gap between cells the majority likes and dislikes
        return t.labels[rows & flip].mean() - t.labels[rows & ~flip].mean()

    assert lift(t.true_cohorts == -1) > 0.05
    assert lift(t.true_cohorts == 0) < -0.05
    assert lift(t.true_cohorts == 1) < -0.01


def test_cohort_frame_holds_user_features_that_separate_minorities(small_splits) -> None:  # type: ignore[no-untyped-def]
    t = small_splits.train
    cf = t.cohort_frame
    assert list(cf.columns) == ["age_z", "tenure_z", "activity_z", "region"]
    assert small_splits.schema.cohort_features == tuple(cf.columns)
    x = cf[["age_z", "tenure_z", "activity_z"]].to_numpy()
    centre_0 = x[t.true_cohorts == 0].mean(axis=0)
    centre_rest = x[t.true_cohorts == -1].mean(axis=0)
    assert np.linalg.norm(centre_0 - centre_rest) > 1.0


@pytest.fixture(scope="module")
def pooled_predictions(small_splits):  # type: ignore[no-untyped-def]
    """Test-split predictions of a logistic regression on one-hot fields, fitted to all train rows."""
    fields = ["region", "item_id", "item_category", "device", "hour"]
    enc = OneHotEncoder(handle_unknown="ignore")
    enc.fit(np.stack([small_splits.train.sparse[f].values for f in fields], axis=1))

    def design(t):  # type: ignore[no-untyped-def]
        onehot = enc.transform(np.stack([t.sparse[f].values for f in fields], axis=1))
        return sp.hstack([onehot, sp.csr_matrix(t.dense)]).tocsr()

    model = LogisticRegression(C=1.0, max_iter=300).fit(design(small_splits.train), small_splits.train.labels)
    t = small_splits.test
    return model.predict_proba(design(t))[:, 1], t.labels, t.true_cohorts


def test_labels_are_learnable_beyond_the_base_rate(pooled_predictions) -> None:  # type: ignore[no-untyped-def]
    p, y, _ = pooled_predictions
    assert _ne(p, y) < 0.93  # 0.90 at this seed; the true click probabilities reach about 0.74


def test_pooled_model_serves_minorities_worse(pooled_predictions) -> None:  # type: ignore[no-untyped-def]
    p, y, cohorts = pooled_predictions
    majority = _ne(p[cohorts == -1], y[cohorts == -1])
    for k in range(len(SMALL.minority_shares)):
        assert _ne(p[cohorts == k], y[cohorts == k]) > majority + 0.1


def test_splits_are_80_10_10_and_use_every_field(small_splits) -> None:  # type: ignore[no-untyped-def]
    assert (len(small_splits.train), len(small_splits.valid), len(small_splits.test)) == (48_000, 6_000, 6_000)
    assert small_splits.schema.feature_names == ["user_id", "region", "item_id", "item_category", "device", "hour"]
    assert [f.side for f in small_splits.schema.sparse] == ["user", "user", "item", "item", "context", "context"]
    assert small_splits.schema.dense == ("dense_0", "dense_1")


def test_extra_fields_have_criteo_like_vocabularies() -> None:
    cfg = SyntheticConfig(n_users=200, n_items=50, n_rows=20_000, extra_fields=26)
    sizes = cfg.extra_vocab_sizes
    assert len(sizes) == 26 and sizes[0] == 100 and sizes[-1] == 1_000_000
    gen = SyntheticGenerator(cfg)
    t = gen.chunk(0, 20_000)
    big = gen.schema.feature("f25")
    assert big.num_embeddings == 1_000_001
    assert 1 <= t.sparse["f25"].values.min() and t.sparse["f25"].values.max() < big.num_embeddings
    assert len(np.unique(t.sparse["f25"].values)) > 5_000


def test_explicit_vocab_sizes_set_the_extra_fields() -> None:
    gen = SyntheticGenerator(SyntheticConfig(n_users=100, n_items=10, n_rows=100, vocab_sizes=(7, 11)))
    assert [(f.name, f.num_embeddings) for f in gen.schema.sparse[6:]] == [("f0", 8), ("f1", 12)]


def test_synthetic_batches_are_valid_kjts(small_splits) -> None:  # type: ignore[no-untyped-def]
    batch = next(iter_batches(small_splits.valid, small_splits.schema, 128, shuffle=False))
    assert batch.sparse.keys() == small_splits.schema.feature_names
    for f in small_splits.schema.sparse:
        v = batch.sparse[f.name].values()
        assert len(v) == 128 and int(v.min()) >= 1 and int(v.max()) < f.num_embeddings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_clusters=2), "n_clusters"),
        (dict(minority_shares=(0.6, 0.5)), "minority_shares"),
        (dict(extra_fields=3, vocab_sizes=(10, 10)), "extra_fields"),
        (dict(majority_ctr=1.5), "majority_ctr"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(C2ALError, match=message):
        SyntheticConfig(**kwargs)


# ------------------------------------------------------------ planted conjunctions
CONJ = SyntheticConfig(n_users=5000, n_items=400, n_rows=60_000, conjunctions=True, seed=2)


def test_conjunction_cohorts_are_the_rows_whose_user_features_meet_their_rule() -> None:
    gen = SyntheticGenerator(CONJ)
    t = gen.chunk(0, 60_000)
    frame = t.cohort_frame
    assert [len(rule) for rule in gen.conjunction_rules] == [2, 3] and str(frame["region"].dtype) == "category"
    for k, rule in enumerate(gen.conjunction_rules):
        inside = np.ones(len(t), dtype=bool)
        for column, op, value in rule:
            values = frame[column].astype(np.float64).to_numpy()
            inside &= {"==": values == value, ">=": values >= value, "<": values < value}[op]
        np.testing.assert_array_equal(t.true_cohorts == k, inside)


def test_conjunction_cohorts_have_their_share_and_click_rate() -> None:
    t = SyntheticGenerator(CONJ).chunk(0, 60_000)
    for k, (share, ctr) in enumerate(zip(CONJ.minority_shares, CONJ.minority_ctrs)):
        assert abs((t.true_cohorts == k).mean() - share) < 0.004
        assert abs(t.labels[t.true_cohorts == k].mean() - ctr) < 0.03
    assert abs(t.labels[t.true_cohorts == -1].mean() - CONJ.majority_ctr) < 0.01


def test_conjunction_cohorts_cut_across_the_user_clusters() -> None:
    gen = SyntheticGenerator(CONJ)
    for k in range(CONJ.n_minority):
        clusters = np.bincount(gen.user_cluster[gen.user_group == k], minlength=CONJ.n_clusters)
        assert (clusters > 0).sum() >= 3  # no single cluster holds a cohort, unlike the default world


def test_conjunctions_need_a_region_per_cohort() -> None:
    with pytest.raises(C2ALError, match="needs its own region"):
        SyntheticConfig(conjunctions=True, n_regions=2, n_clusters=5, minority_shares=(0.02, 0.02, 0.02))
