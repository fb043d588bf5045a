"""The validation gate and --aux-weight auto: the rules by hand, and what train.py ships."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from c2al.eval.compare import AUTO_GRID, choose_aux_weight, judge_on_validation  # noqa: E402

SYNTHETIC = "synthetic:n_rows=12000,n_users=1500,n_items=200,minority_shares=0.05/0.04"
FAST = ["--epochs", "2", "--batch-size", "256", "--quiet"]
BASE = {"ne": 0.80, "cohort_ne": 0.90}


def test_gate_ships_c2al_only_when_overall_no_worse_and_cohorts_better():
    assert judge_on_validation(BASE, {"ne": 0.80, "cohort_ne": 0.89}, 0.0)["shipped"] == "c2al"
    assert judge_on_validation(BASE, {"ne": 0.79, "cohort_ne": 0.90}, 0.0)["shipped"] == "baseline"  # cohorts not better
    assert judge_on_validation(BASE, {"ne": 0.8001, "cohort_ne": 0.85}, 0.0)["shipped"] == "baseline"  # overall worse
    assert judge_on_validation(BASE, {"ne": 0.8001, "cohort_ne": 0.85}, 0.001)["shipped"] == "c2al"  # within the tolerance
    d = judge_on_validation(BASE, {"ne": 0.81, "cohort_ne": 0.85}, 0.0)
    assert "worse" in d["reason"] and d["valid_ne_base"] == 0.80 and d["valid_ne_c2al"] == 0.81


def test_auto_rule_prefers_cohort_gain_among_overall_safe_candidates():
    cands = [{"aux_weight": 0.03, "ne": 0.799, "cohort_ne": 0.895}, {"aux_weight": 0.1, "ne": 0.800, "cohort_ne": 0.880},
             {"aux_weight": 0.3, "ne": 0.805, "cohort_ne": 0.850}]
    assert choose_aux_weight(cands, BASE, 0.0)["aux_weight"] == 0.1  # 0.3 has the best cohorts but hurts overall
    assert choose_aux_weight(cands, BASE, 0.01)["aux_weight"] == 0.3
    worse = [{"aux_weight": 1.0, "ne": 0.83, "cohort_ne": 0.80}, {"aux_weight": 0.3, "ne": 0.81, "cohort_ne": 0.85}]
    assert choose_aux_weight(worse, BASE, 0.0)["aux_weight"] == 0.3  # none is safe: the lowest overall


def run(out: Path, *extra: str) -> dict:
    assert train.main(["--data", SYNTHETIC, "--aux-cohorts", "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "report.json").read_text())


def state(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=True)["model"].items()}


def test_harmful_c2al_is_gated_and_the_baseline_ships(tmp_path):
    rep = run(tmp_path, "--aux-weight", "30")
    d = rep["decision"]
    assert d["shipped"] == "baseline" and d["valid_ne_c2al"] > d["valid_ne_base"]
    assert rep["overall"]["ne_shipped"] == rep["overall"]["ne_base"]
    served, base = state(tmp_path / "c2al.pt"), state(tmp_path / "baseline.best.pt")
    assert served.keys() == base.keys() and all(torch.equal(served[k], base[k]) for k in served)


def test_no_gate_ships_c2al(tmp_path):
    rep = run(tmp_path, "--aux-weight", "30", "--no-gate")
    assert rep["decision"]["shipped"] == "c2al"
    assert rep["overall"]["ne_shipped"] == rep["overall"]["ne_c2al"]
    assert torch.load(tmp_path / "c2al.pt", weights_only=True)["extra"].find('"shipped": "c2al"') >= 0


@pytest.mark.slow
def test_auto_trains_every_grid_lambda_and_reports_them(tmp_path):
    rep = run(tmp_path, "--aux-weight", "auto")
    search = rep["aux_weight_search"]
    assert [c["aux_weight"] for c in search["candidates"]] == list(AUTO_GRID)
    assert search["chosen"] in AUTO_GRID
    assert all({"ne", "cohort_ne", "best_epoch"} <= set(c) for c in search["candidates"])
    assert rep["decision"]["valid_ne_c2al"] == next(c["ne"] for c in search["candidates"] if c["aux_weight"] == search["chosen"])
    assert rep["config"]["aux_weight"] == "auto"


@pytest.mark.parametrize("balance", ["agree", "magnitude+project"])
def test_balance_modes_run_from_the_cli(tmp_path, balance):
    rep = run(tmp_path, "--aux-balance", balance, "--epochs", "1")
    assert rep["config"]["aux_balance"] == balance and rep["overall"]["ne_c2al"] < 1.0
