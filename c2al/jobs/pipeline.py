"""The one C2AL pipeline: mine -> attach -> train -> gate on validation -> compare on test -> the served model.

Every C2AL run goes through `run_c2al_pipeline`: train.py's centralized job (`jobs.centralized`), its federated
job (`jobs.federated_job`) and the benchmarks. What differs between them is the training loop, handed in as a
`Loop`: how the baseline trains, how its validation scores are mined (the centralized `CohortMiner`, or the
federated one over the clients' rows), how a model with heads trains (early-stopped epochs, federated rounds,
a benchmark arm) and how a trained model scores a split. The rest happens once, here:

1. the baseline's validation scores are mined; when no cohort contrasts, the baseline ships (`baseline_ships`);
2. every exposed cohort gets a head (`attach_heads`, at `SHARED_AT`), trained once per lambda of `lambda_grid`
   (one, or `AUTO_GRID` for --aux-weight auto, kept by `choose_aux_weight` on validation: `fit_candidates`);
3. the validation gate (`ship_decision`) picks what ships, written as OUT/c2al.pt with the heads stripped
   (`served_model`);
4. both models are compared per cohort on the test split (`c2al.eval.compare.compare`).

The helpers the steps use (`cohort_frame`, `mine_cohorts`, `make_head`, `attach_heads`, `served_model`,
`fit_candidates`) are public so a benchmark arm can run one step on its own terms.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import pandas as pd
from torch import nn

import c2al
from c2al.config import Config
from c2al.data.schema import Splits
from c2al.dist.checkpoint import save_checkpoint
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError
from c2al.eval.compare import (
    AUTO_GRID,
    add_traits,
    attention_report,
    choose_aux_weight,
    compare,
    print_comparison,
    record_decision,
    ship_decision,
    valid_scores,
)
from c2al.eval.metrics import summarize
from c2al.eval.report import write_json
from c2al.models import SHARED_AT
from c2al.plugin import C2ALWrapper
from c2al.robust import RobustModel, unwrap
from c2al.towers import attach_towers, detach_towers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the part that differs


@dataclass
class Candidate:
    """One trained model of the pipeline: the baseline, or a C2AL training at one lambda.

    Attributes:
        trained: what the loop returned (`train.loop.Trained`, `federated.rounds.FedTrained`, a benchmark's result).
        served: the model that would ship from it (heads detached); the baseline's own model for the baseline. A loop
            may leave it None: it is then `served_model(trained.model)`, taken once the candidate is scored on validation
            (detaching first would leave a wrapper that scores validation without its hooks).
        valid: a C2AL candidate's validation facts: aux_weight, `valid_scores`'s ne / cohort_ne / cohorts, and
            the loop's `kept` entry (best_epoch or best_round); empty for the baseline.
    """

    trained: Any
    served: nn.Module | None = None
    valid: dict[str, Any] = field(default_factory=dict)


class Loop(Protocol):
    """How one kind of run trains and scores: the only part of the pipeline that differs between runs."""

    info: DistInfo  # where scoring runs (attention, checkpoints on the main rank)

    def baseline(self) -> Candidate:
        """The trained baseline (its served model is its own model)."""

    def mine(self, p_valid: np.ndarray) -> Any:
        """A fitted miner (`predict(frame)` -> cohort id per row, `contrast_`) on the baseline's validation scores."""

    def with_cohorts(self, miner: Any, ids: dict[str, np.ndarray]) -> Any:
        """The splits with every row's cohort id (`ids` holds valid and test; the loop assigns train its way)."""

    def fit(self, splits: Any, aux_weight: list[float], suffix: str) -> Candidate:
        """One training with a head per cohort (lambda `aux_weight[k]`) from the baseline's seeded start; `suffix`
        names the lambda when several are tried ("" for one, "_lambda0.1" ...), for its checkpoint and log tag."""

    def scores(self, candidate: Candidate, split: str) -> np.ndarray:
        """Probabilities of a candidate (the baseline included) on `split` ("valid" or "test")."""

    def kept(self, trained: Any) -> dict[str, Any]:
        """What a candidate's validation facts record of the state early stopping kept ({"best_epoch": 4})."""


@dataclass
class C2ALRun:
    """What `run_c2al_pipeline` did, for the caller's own report entries (tiers, retrieval) and printing."""

    report: dict[str, Any]
    base: Candidate
    miner: Any
    ids: dict[str, np.ndarray] = field(default_factory=dict)  # mined cohort id per row of valid and test
    chosen: Candidate | None = None  # None: no cohort contrasted and the baseline shipped
    decision: dict[str, Any] = field(default_factory=dict)
    p_test: dict[str, np.ndarray] = field(default_factory=dict)  # "baseline" / "c2al": the test probabilities compared


# ---------------------------------------------------------------- the pipeline


def run_c2al_pipeline(cfg: Config, splits: Any, loop: Loop, out: Path) -> C2ALRun:
    """Baseline -> mine -> C2AL (one lambda, or each of --aux-weight auto's) -> gate -> strip -> per-cohort comparison.

    Writes OUT/c2al.pt (the model the gate ships, heads stripped); the caller writes the report (`publish`).

    Args:
        cfg: the run's config (--aux-cohorts, --aux-weight, --gate, --gate-tolerance).
        splits: the run's splits (in memory, or a stream whose train split is read as it trains).
        loop: how this run trains and scores (see `Loop`).
        out: the run's folder.

    Returns:
        The report (`compare`'s per-cohort table, attention, history, best, train_seconds, decision) and its parts.
    """
    base = loop.baseline()
    p_valid = loop.scores(base, "valid")
    miner = loop.mine(p_valid)
    k = exposed(miner)
    if k == 0:
        return C2ALRun(baseline_ships(cfg, splits, loop, base, miner, out), base, miner)
    if k < cfg.aux_cohorts and loop.info.is_main:
        log.info(f"the miner exposed {k} of the {cfg.aux_cohorts} cohorts asked for (the others did not beat the permutation null): "
                 f"C2AL trains {k} head(s)")
    ids = {s: miner.predict(cohort_frame(cfg, splits, s)) for s in ("valid", "test")}
    armed = loop.with_cohorts(miner, ids)
    v_base = valid_scores(p_valid, splits.valid.labels, ids["valid"], k)
    chosen, search = fit_candidates(cfg, loop, armed, lambda_grid(cfg, k), ids["valid"], splits.valid.labels, v_base, k)
    decision = ship_decision(v_base, chosen.valid, cfg.gate, cfg.gate_tolerance)
    shipped = chosen.served if decision["shipped"] == "c2al" else base.served
    save_checkpoint(out / "c2al.pt", model_state=shipped.state_dict(), config=cfg.to_dict(), step=-1,
                    extra={"stripped": True, "shipped": decision["shipped"]}, is_main=loop.info.is_main)  # plain full tensors

    p_test = {"baseline": loop.scores(base, "test"), "c2al": loop.scores(chosen, "test")}
    report = compare(cfg, splits, ids["test"], p_test["baseline"], p_test["c2al"], miner)
    add_traits(report, cohort_frame(cfg, splits, "test"), ids["test"])
    report["attention"] = attention_report(base.served, chosen.served, splits, cfg, loop.info)
    report["history"] = {"baseline": base.trained.history, "c2al": chosen.trained.history}
    report["best"] = {"baseline": base.trained.best, "c2al": chosen.trained.best}
    report["train_seconds"] = {"baseline": base.trained.seconds, "c2al": chosen.trained.seconds}
    report["world_size"] = loop.info.world_size
    record_decision(report, decision)
    if search:
        report["aux_weight_search"] = search
    return C2ALRun(report, base, miner, ids, chosen, decision, p_test)


def exposed(miner: Any) -> int:
    """How many cohorts a fitted miner exposed (its permutation test may expose fewer than asked, or none)."""
    return 0 if not getattr(miner, "found_", True) else len(miner.contrast_)


def lambda_grid(cfg: Config, k: int) -> list[list[float]]:
    """The lambdas (one per exposed cohort) each C2AL training of a run uses: --aux-weight, or AUTO_GRID's with auto."""
    if cfg.aux_weight == "auto":
        return [[lam] * k for lam in AUTO_GRID]
    return [list(cfg.aux_weights())[:k]]


def fit_candidates(cfg: Config, loop: Loop, splits: Any, grid: list[list[float]], valid_ids: np.ndarray, labels: np.ndarray,
                   v_base: dict[str, Any], k: int) -> tuple[Candidate, dict[str, Any] | None]:
    """One training per lambda of `grid`, each scored on validation; with several, the one `choose_aux_weight` keeps.

    Args:
        splits: the splits carrying the cohort ids the heads train on.
        grid: lambdas per training (`lambda_grid`).
        valid_ids, labels: the validation rows' cohort ids and labels the candidates are judged on (k cohorts).
        v_base: the baseline's `valid_scores`, what auto compares with.

    Returns:
        (the candidate to gate, {"candidates", "chosen", "baseline"} or None for one lambda).
    """
    candidates = []
    for lam in grid:
        cand = loop.fit(splits, lam, "" if len(grid) == 1 else f"_lambda{lam[0]:g}")
        cand.valid.update(aux_weight=lam[0] if len(set(lam)) == 1 else lam,
                          **valid_scores(loop.scores(cand, "valid"), labels, valid_ids, k), **loop.kept(cand.trained))
        if cand.served is None:
            cand.served = served_model(cand.trained.model)
        candidates.append(cand)
    if len(candidates) == 1:
        return candidates[0], None
    pick = choose_aux_weight([c.valid for c in candidates], v_base, cfg.gate_tolerance)
    chosen = next(c for c in candidates if c.valid is pick)
    tried = ", ".join(f"{c.valid['aux_weight']:g}: valid NE {c.valid['ne']:.4f}" for c in candidates)
    log.info(f"--aux-weight auto: lambda {pick['aux_weight']:g} kept on validation (tried {tried})")
    return chosen, {"candidates": [c.valid for c in candidates], "chosen": pick["aux_weight"], "baseline": v_base}


def baseline_ships(cfg: Config, splits: Any, loop: Loop, base: Candidate, miner: Any, out: Path) -> dict[str, Any]:
    """The miner's permutation test found no cohort whose baseline scores contrast with the rest: there is nothing
    for auxiliary heads to keep, so no C2AL model is trained and the baseline ships (the report says why)."""
    overall = summarize(loop.scores(base, "test"), splits.test.labels)
    reason = (f"the miner exposed no cohort: no candidate's contrast beat its permutation null (alpha {getattr(miner, 'alpha', '?')}); "
              "nothing for auxiliary heads to keep")
    report = {"config": cfg.to_dict(), "overall": {**overall, "ne_base": overall["ne"], "ne_shipped": overall["ne"]}, "cohorts": [],
              "decision": {"shipped": "baseline", "reason": reason}, "history": {"baseline": base.trained.history},
              "best": {"baseline": base.trained.best}, "train_seconds": {"baseline": base.trained.seconds},
              "world_size": loop.info.world_size}
    save_checkpoint(out / "c2al.pt", model_state=base.served.state_dict(), config=cfg.to_dict(), step=-1,
                    extra={"stripped": True, "shipped": "baseline"}, is_main=loop.info.is_main)
    if loop.info.is_main:
        log.info(f"shipped as c2al.pt: baseline ({reason})")
    return report


def publish(run: C2ALRun, out: Path, info: DistInfo, wrote: str, then: Callable[[], None] | None = None) -> None:
    """On the main rank: print the comparison (and `then`'s lines), write OUT/report.json and .png, say what was written.

    Args:
        wrote: the run's other files, for the closing log line ("OUT/cohorts.json, OUT/c2al.pt").
        then: more lines to print after the comparison (the federated job's tiers).
    """
    if not info.is_main:
        return
    if run.chosen is None:
        write_json(run.report, out / "report.json")
        log.info(f"wrote {out / 'report.json'}, {wrote}")
        return
    print_comparison(run.report)
    if then is not None:
        then()
    write_json(run.report, out / "report.json")
    try:
        from c2al.eval.plots import plot_report
    except ImportError:  # matplotlib is optional: the JSON report is the record
        log.info(f"wrote {out / 'report.json'}, {wrote}")
        return
    plot_report(run.report, out / "report.png")
    log.info(f"wrote {out / 'report.json'}, {out / 'report.png'}, {wrote}")


# ---------------------------------------------------------------- mine


def cohort_frame(cfg: Config, splits: Splits, split: str) -> pd.DataFrame:
    """The miner's X for one split: --cohort-features, or the source's user-side features."""
    frame = getattr(splits, split).cohort_frame
    cols = list(cfg.cohort_features) or list(splits.schema.cohort_features)
    if frame is None or not cols:
        raise C2ALError(f"data {splits.schema.name!r} has no cohort features; pass --cohort-features COL,...")
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise C2ALError(f"unknown --cohort-features {missing}; available: {list(frame.columns)}")
    return frame[cols]


def mine_cohorts(cfg: Config, splits: Splits, valid_scores: np.ndarray, out: Path, info: DistInfo, null_test: bool = True) -> Any:
    """Fit the miner on validation predictions (or load --cohorts) and save it as OUT/cohorts.json.

    Args:
        null_test: the miner's permutation test and contrast floor (train.py: expose only what contrasts, at most
            --aux-cohorts); False always exposes the --aux-cohorts most contrasting cohorts (a benchmark that asks
            what heads on the top-K cohorts do, whether or not they beat the null).
    """
    from c2al.cohorts import CohortMiner

    if cfg.cohorts:
        miner = saved_miner(cfg)
    else:
        nulls = {} if null_test else {"n_permutations": 0, "min_contrast": 0.0}
        miner = CohortMiner(
            n_cohorts=cfg.aux_cohorts, candidates=cfg.cohort_candidates, n_clusters=cfg.n_clusters,
            divergence=cfg.divergence, min_share=cfg.min_share, max_share=cfg.max_share, random_state=cfg.seed, **nulls,
        ).fit(cohort_frame(cfg, splits, "valid"), splits.valid.labels, scores=valid_scores)
    if info.is_main:
        miner.save(out / "cohorts.json")
    return miner


def saved_miner(cfg: Config) -> Any:
    """The miner --cohorts names, with --aux-cohorts cohorts (train.py checks this before training)."""
    from c2al.cohorts import CohortMiner

    path = Path(cfg.cohorts)
    miner = CohortMiner.load(path / "cohorts.json" if path.is_dir() else path)
    if len(miner.contrast_) > cfg.aux_cohorts:  # fewer is what the miner exposed when the others did not contrast
        raise C2ALError(f"--cohorts {cfg.cohorts!r} holds {len(miner.contrast_)} cohorts but --aux-cohorts is {cfg.aux_cohorts} "
                        "(a saved miner may hold at most --aux-cohorts cohorts)")
    return miner


# ---------------------------------------------------------------- attach and serve


def make_head(cfg: Config, model: nn.Module) -> Any:
    """--aux-head: the model's own output head (paper), a small MLP, or linear."""
    if cfg.aux_head == "clone":
        if not any(True for _ in model.over_arch.parameters()):
            # e.g. TwoTower's over arch is a parameter-free sum: a clone would repeat the main logit
            return lambda in_features: nn.Linear(in_features, 1)
        return model.over_arch
    if cfg.aux_head == "linear":
        return lambda in_features: nn.Linear(in_features, 1)
    return None


def attach_heads(cfg: Config, model: nn.Module, aux_weight: list[float], *, towers: str = "shared-bottom", balance: str = "none",
                 aux_labels: str = "conflicting") -> C2ALWrapper:
    """One auxiliary head per cohort on the model's shared representation (`SHARED_AT`), heads per --aux-head.

    Args:
        aux_weight: lambda per cohort (K = its length).
        towers: "shared-bottom" (`c2al.attach`: heads on the representation) or "mmoe" (`c2al.towers`, --mmoe-experts).
        balance: the heads' gradient balance (`c2al.balance`; MMoE's towers take none).
        aux_labels: "conflicting" (the paper's y * 1[cohort == k]) or "own" (y on cohort k's rows only).
    """
    if towers == "mmoe":
        return attach_towers(model, SHARED_AT, len(aux_weight), aux_weight, make_head(cfg, model), kind="mmoe",
                             n_experts=cfg.mmoe_experts, aux_labels=aux_labels)
    return c2al.attach(model, at=SHARED_AT, n_cohorts=len(aux_weight), aux_weight=aux_weight, head=make_head(cfg, model),
                       aux_labels=aux_labels, balance=balance)


def served_model(model: Any) -> Any:
    """What ships from a trained model: C2AL's heads or the cohort towers detached, a robust objective unwrapped."""
    if isinstance(model, RobustModel):
        return unwrap(model)
    if isinstance(model, C2ALWrapper):
        return detach_towers(model)
    return model
