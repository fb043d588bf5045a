"""c2al.jobs.pipeline: the one C2AL pipeline's steps with a hand-made training loop (no model is trained here)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from torch import nn

from c2al.config import Config
from c2al.dist.checkpoint import load_checkpoint
from c2al.dist.process import LOCAL_CPU
from c2al.jobs.pipeline import Candidate, exposed, fit_candidates, lambda_grid, run_c2al_pipeline

N = 100
LABELS = np.arange(N) % 2  # both classes in every block of rows
IDS = np.full(N, -1)
IDS[:20], IDS[20:40] = 0, 1  # two cohorts of 20 rows, 60 rows in none
# sharpness s of p = 0.5 + s (y - 0.5) on (the cohorts' rows, the rest): larger s, lower NE
BASE = (0.4, 0.4)
SHARPNESS = {0.03: (0.3, 0.5),  # overall better than the baseline, cohorts worse
             0.1: (0.45, 0.45),  # overall no worse, cohorts better: what auto keeps
             0.3: (0.6, 0.2)}  # cohorts best but overall worse than the baseline: auto refuses it


def probs(sharp: tuple[float, float]) -> np.ndarray:
    s = np.where(IDS >= 0, sharp[0], sharp[1])
    return 0.5 + s * (LABELS - 0.5)


class HandLoop:
    """A `pipeline.Loop` whose trainings are looked up: lambda -> the validation probabilities above."""

    info = LOCAL_CPU

    def __init__(self, found: bool = True) -> None:
        self.fitted: list[tuple[list[float], str]] = []
        self.base = Candidate(SimpleNamespace(history=[], best={}, seconds=0.0), nn.Linear(2, 1))
        self.found = found

    def baseline(self) -> Candidate:
        return self.base

    def mine(self, p_valid: np.ndarray) -> Any:
        return SimpleNamespace(found_=self.found, contrast_=np.zeros(0), alpha=0.05)

    def fit(self, splits: Any, aux_weight: list[float], suffix: str) -> Candidate:
        self.fitted.append((aux_weight, suffix))
        return Candidate(SimpleNamespace(model=nn.Identity(), lam=aux_weight[0], best={"epoch": 3}))

    def scores(self, candidate: Candidate, split: str) -> np.ndarray:
        return probs(BASE if candidate is self.base else SHARPNESS[candidate.trained.lam])

    def kept(self, trained: Any) -> dict[str, Any]:
        return {"best_epoch": trained.best["epoch"]}


def base_valid() -> dict[str, Any]:
    from c2al.eval.compare import valid_scores

    return valid_scores(probs(BASE), LABELS, IDS, 2)


def test_lambda_grid_is_the_flag_cut_to_the_exposed_cohorts_or_autos_three_lambdas():
    assert lambda_grid(Config(aux_cohorts=2, aux_weight=(0.2, 0.5)), 1) == [[0.2]]
    assert lambda_grid(Config(aux_cohorts=2, aux_weight=(0.1,)), 2) == [[0.1, 0.1]]
    assert lambda_grid(Config(aux_cohorts=2, aux_weight="auto"), 2) == [[0.03, 0.03], [0.1, 0.1], [0.3, 0.3]]


def test_auto_trains_once_per_lambda_and_keeps_the_lowest_cohort_ne_among_those_no_worse_overall():
    loop = HandLoop()
    grid = [[lam, lam] for lam in SHARPNESS]
    chosen, search = fit_candidates(Config(aux_cohorts=2, aux_weight="auto"), loop, None, grid, IDS, LABELS, base_valid(), 2)
    assert [s for _, s in loop.fitted] == ["_lambda0.03", "_lambda0.1", "_lambda0.3"]
    assert chosen.trained.lam == 0.1 and chosen.valid["aux_weight"] == 0.1 and chosen.valid["best_epoch"] == 3
    assert search["chosen"] == 0.1 and [c["aux_weight"] for c in search["candidates"]] == [0.03, 0.1, 0.3]
    # hand-computed: NE = mean log loss / entropy of the 0.5 base rate; 0.1's rows all have p(y) = 0.725
    assert chosen.valid["ne"] == pytest.approx(-math.log(0.725) / math.log(2))
    assert search["candidates"][2]["ne"] > search["baseline"]["ne"]  # the cohorts' best is refused: worse overall
    assert isinstance(chosen.served, nn.Identity)  # detached once scored: served_model of the trained model


def test_one_lambda_trains_once_without_a_search_and_names_no_lambda():
    loop = HandLoop()
    chosen, search = fit_candidates(Config(aux_cohorts=2), loop, None, [[0.3, 0.3]], IDS, LABELS, base_valid(), 2)
    assert loop.fitted == [([0.3, 0.3], "")] and search is None and chosen.valid["aux_weight"] == 0.3


def test_uneven_lambdas_are_recorded_as_the_list():
    loop = HandLoop()
    loop.scores = lambda c, split: probs(BASE)  # type: ignore[method-assign]
    chosen, _ = fit_candidates(Config(aux_cohorts=2), loop, None, [[0.1, 0.3]], IDS, LABELS, base_valid(), 2)
    assert chosen.valid["aux_weight"] == [0.1, 0.3]


def test_a_miner_that_found_nothing_exposes_no_cohort_whatever_it_holds():
    assert exposed(SimpleNamespace(found_=False, contrast_=np.ones(2))) == 0
    assert exposed(SimpleNamespace(contrast_=np.ones(2))) == 2  # a federated miner has no permutation test


def test_nothing_contrasting_ships_the_baseline_and_trains_no_head(tmp_path: Path):
    loop = HandLoop(found=False)
    splits = SimpleNamespace(test=SimpleNamespace(labels=LABELS))
    run = run_c2al_pipeline(Config(aux_cohorts=2), splits, loop, tmp_path)
    assert loop.fitted == [] and run.chosen is None
    assert run.report["decision"]["shipped"] == "baseline" and "exposed no cohort" in run.report["decision"]["reason"]
    assert run.report["overall"]["ne_shipped"] == run.report["overall"]["ne_base"] == pytest.approx(-math.log(0.7) / math.log(2))
    ckpt = load_checkpoint(tmp_path / "c2al.pt")
    assert ckpt["extra"] == {"stripped": True, "shipped": "baseline"}
    assert set(ckpt["model"]) == {"weight", "bias"}  # the baseline's own parameters
