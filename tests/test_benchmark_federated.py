"""benchmarks/federated.py: its item-embedding stability measure, its grid and its summaries on hand-made results."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "federated.py"


def _load():
    spec = importlib.util.spec_from_file_location("federated_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["federated_bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_stability_is_the_mean_cosine_and_relative_move_between_consecutive_evaluations():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [0.0, 2.0]])  # item 0 turned 90 degrees, item 1 kept its direction and doubled
    got = bench.embedding_stability([a, b])
    assert got["cosine"] == pytest.approx((0.0 + 1.0) / 2)
    assert got["drift"] == pytest.approx((np.sqrt(2.0) + 1.0) / 2)
    assert bench.embedding_stability([a, b, b], rows=np.array([1]))["cosine"] == pytest.approx(1.0)
    assert np.isnan(bench.embedding_stability([a])["cosine"])


def test_the_grid_shares_the_fedavg_arm_between_rf2_and_fedrecgel():
    from c2al.config import Config

    grid = bench.tasks(Config(federated=True), ["ning", "fedrecgel", "rf2"], [0, 1, 2])
    per_seed = [t for t in grid if t["seed"] == 0]
    assert sorted(t["arm"] for t in per_seed if t["part"] == "rf2") == [
        "fedavg/correlated", "fedavg/independent", "fedprox/correlated", "fedprox/independent"]
    assert [t["arm"] for t in per_seed if t["part"] == "fedrecgel"] == ["local SAM"]  # the plain arm is FedAvg, correlated
    assert len([t for t in per_seed if t["part"] == "ning"]) == 4 and len(grid) == 3 * len(per_seed)
    assert {t["cfg"]["seed"] for t in grid} == {0, 1, 2}


def test_rf2_summary_takes_mdac_against_fedavg_and_the_correlated_over_independent_ratio():
    results = []
    for seed in (0, 1, 2):
        for mode, gap in (("independent", 0.01), ("correlated", 0.04)):
            base = {"ne": 1.0, "tier_ne": [1.0, 1.0, 1.0]}
            results.append({"part": "rf2", "arm": f"fedavg/{mode}", "seed": seed, **base,
                            "c2al": {"ne": 0.99, "tier_ne": [1.0 - gap, 1.0, 1.0]}})
            results.append({"part": "rf2", "arm": f"fedprox/{mode}", "seed": seed, "ne": 1.0, "tier_ne": [1.0, 1.0 + gap / 2, 1.0]})
    summary, table = bench.summarize_rf2(results)
    assert summary["c2al"]["independent"]["mdac"]["mean"] == pytest.approx(0.01)
    assert summary["c2al"]["ratio_correlated_over_independent"] == pytest.approx(4.0)
    assert summary["fedprox"]["correlated"]["mdac"]["mean"] == pytest.approx(0.02)
    assert "4.00x" in table and "| C2AL | correlated |" in table


def test_rf2_and_fedrecgel_arms_start_from_fedavg_and_the_two_tower_losses_keep_the_default():
    from c2al.config import Config

    grid = bench.tasks(Config(federated=True), ["ning", "fedrecgel", "rf2"], [0], {"server_optimizer": "fedavg"})
    opt = {t["arm"]: t["cfg"]["server_optimizer"] for t in grid}
    assert opt["fedavg/correlated"] == opt["fedavg/independent"] == opt["local SAM"] == "fedavg"
    assert opt["fedprox/correlated"] == opt["fedprox/independent"] == "fedprox"
    assert opt["in-batch softmax"] == opt["squared hinge + spread-out"] == Config().server_optimizer


def test_the_centralized_two_tower_is_evaluated_per_epoch_not_every_few_steps():
    from c2al.config import Config

    grid = bench.tasks(Config(federated=True, eval_every=5), ["ning"], [0])
    central = next(t for t in grid if t["arm"] == "centralized in-batch softmax")
    assert central["cfg"]["eval_every"] == 0 and central["cfg"]["federated"] is False
    assert all(t["cfg"]["eval_every"] == 5 for t in grid if t is not central)
