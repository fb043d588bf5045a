"""Tests of the random-world generator (c2al.data.worlds) that the cohort-recovery benchmark mines."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from c2al.data.worlds import EFFECTS, SHARES, holds, make_world
from c2al.errors import C2ALError


@pytest.fixture(scope="module")
def world():
    return make_world(7, n_rows=30_000, n_users=2_000)


def test_same_seed_gives_the_same_world(world) -> None:
    again = make_world(7, n_rows=30_000, n_users=2_000)
    pd.testing.assert_frame_equal(again.frame, world.frame)
    np.testing.assert_array_equal(again.labels, world.labels)
    np.testing.assert_array_equal(again.valid, world.valid)
    assert again.planted == world.planted


def test_another_seed_gives_another_world(world) -> None:
    other = make_world(8, n_rows=30_000, n_users=2_000)
    assert other.planted != world.planted or not np.array_equal(other.labels, world.labels)


def test_planted_cohorts_are_the_rows_their_rules_hold(world) -> None:
    taken = np.zeros(len(world.frame), dtype=bool)
    for c, cohort in enumerate(world.planted):
        mask = np.ones(len(world.frame), dtype=bool)
        for cond in cohort["conditions"]:
            mask &= holds(cond, np.asarray(world.frame[cond["column"]]))
        np.testing.assert_array_equal(world.cohorts == c, mask & ~taken)  # a row in two rules joins the first
        taken |= mask


def test_planted_shares_and_depths_are_in_range() -> None:
    for seed in range(12):
        w = make_world(seed, n_rows=20_000, n_users=2_000)
        assert 1 <= len(w.planted) <= 2
        for c in w.planted:
            assert 1 <= len(c["conditions"]) <= 3
            # drawn on the users' expected traffic; the realised rows may stray a little
            assert SHARES[0] / 2 <= c["share"] <= SHARES[1] * 1.5


def test_effects_cycle_through_every_type_over_consecutive_seeds() -> None:
    firsts = [make_world(seed, n_rows=5_000, n_users=500).planted[0]["effect"] for seed in range(4)]
    assert sorted(firsts) == sorted(EFFECTS)


def test_null_world_plants_nothing() -> None:
    w = make_world(3, planted=False, n_rows=10_000, n_users=1_000)
    assert w.planted == [] and (w.cohorts == -1).all()
    assert 0.05 < w.labels.mean() < 0.95


def test_categorical_user_features_are_integer_coded_categories(world) -> None:
    cats = [c for c in world.frame.columns if c.startswith("u_cat")]
    assert cats and all(isinstance(world.frame[c].dtype, pd.CategoricalDtype) for c in cats)
    assert all(pd.api.types.is_integer_dtype(world.frame[c].cat.categories) for c in cats)


def test_cohort_effect_moves_its_click_rate_or_its_taste() -> None:
    w = make_world(0, n_rows=100_000)  # seed 0's first cohort has effect EFFECTS[0], a shifted rate
    assert w.planted[0]["effect"] == "shifted_rate"
    inside, outside = w.labels[w.cohorts == 0].mean(), w.labels[w.cohorts == -1].mean()
    assert abs(inside - outside) > 0.1


def test_too_small_a_world_is_refused() -> None:
    with pytest.raises(C2ALError, match="n_rows=10"):
        make_world(0, n_rows=10)
