"""The jobs train.py runs: a baseline, or the whole C2AL method.

C2AL (Cokbas et al. 2025): train the baseline, mine the most contrasting
cohorts from its validation predictions, train again from the same seed with
auxiliary heads on the cohort-masked labels, strip the heads, and compare both
on the test split per cohort.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from c2al.config import Config
from c2al.data.schema import Splits
from c2al.dist.process import DistInfo
from c2al.eval.compare import kept, retrieval_report
from c2al.eval.metrics import per_segment, summarize
from c2al.eval.report import format_table, write_json
from c2al.jobs.pipeline import Candidate, attach_heads, cohort_frame, mine_cohorts, publish, run_c2al_pipeline, served_model
from c2al.models.registry import model_spec
from c2al.robust import group_counts, make_objective, robust_model
from c2al.train.build import seeded_model
from c2al.train.loop import Trained, fit, is_streaming
from c2al.train.task import predict

log = logging.getLogger(__name__)


def run_baseline(cfg: Config, splits: Splits, info: DistInfo, out: Path) -> dict[str, Any]:
    """Train one model, evaluate on test, write OUT/report.json."""
    model = seeded_model(cfg, splits.schema)
    if cfg.objective == "cvar":  # heads-free and group-free: the one model trains under CVaR (group-dro needs --aux-cohorts)
        model = robust_model(model, make_objective("cvar", alpha=cfg.cvar_alpha))
    trained = fit(cfg, splits, model, info, checkpoint=out / "checkpoint.pt", tag="train")
    probs = predict(trained.module, splits.test, splits.schema, cfg.batch_size, info)
    test = splits.test
    segments: list[dict[str, Any]] = []
    if test.true_cohorts is not None and (test.true_cohorts >= 0).any():
        segments = per_segment(probs, test.labels, test.true_cohorts, int(test.true_cohorts.max()) + 1)
    report = {
        "config": cfg.to_dict(),
        "overall": summarize(probs, test.labels),
        "segments": segments,
        "history": trained.history,
        "best": trained.best,
        "train_seconds": trained.seconds,
        "world_size": info.world_size,
    }
    if model_spec(cfg.model).retrieval:
        report["retrieval"] = retrieval_report({"model": served_model(trained.model)}, splits, info, cfg)
    if info.is_main:
        log.info(format_table([report["overall"]], ["n", "plr", "ne", "auc", "logloss", "calibration"],
                              title=f"test split ({cfg.model}, {kept(trained.best)})"))
        if segments:
            log.info(format_table(segments, ["id", "n", "share", "plr", "ne", "auc"], title="planted cohorts (ground truth)"))
        write_json(report, out / "report.json")
        log.info(f"wrote {out / 'report.json'}")
    return report


def run_c2al(cfg: Config, splits: Splits, info: DistInfo, out: Path) -> dict[str, Any]:
    """Baseline -> mine -> C2AL (one lambda, or each of --aux-weight auto's) -> gate -> strip -> per-cohort
    comparison (`pipeline.run_c2al_pipeline` with early-stopped epochs); writes report.json/png, the miner and
    checkpoints, and OUT/c2al.pt: the model the gate ships."""
    run = run_c2al_pipeline(cfg, splits, CentralLoop(cfg, splits, info, out), out)
    if run.chosen is not None and model_spec(cfg.model).retrieval:
        run.report["retrieval"] = retrieval_report({"baseline": run.base.served, "c2al": run.chosen.served}, splits, info, cfg)
    publish(run, out, info, f"{out / 'cohorts.json'}, {out / 'baseline.pt'}, {out / 'c2al.pt'}")
    return run.report


class CentralLoop:
    """`pipeline.Loop` of train.py's centralized job: sharded trainings early-stopped on validation by epochs.

    The baseline trains to OUT/baseline.pt; each C2AL training (`fit_c2al`) to OUT/c2al_train{suffix}.pt from the
    same seeded start. A candidate is scored on validation through its trained module (a C2AL one with its heads on:
    the main output is what the stripped model computes) and on test through the model that would ship.
    """

    def __init__(self, cfg: Config, splits: Splits, info: DistInfo, out: Path) -> None:
        self.cfg, self.splits, self.info, self.out = cfg, splits, info, out
        self.base: Candidate | None = None

    def baseline(self) -> Candidate:
        trained = fit(self.cfg, self.splits, seeded_model(self.cfg, self.splits.schema), self.info,
                      checkpoint=self.out / "baseline.pt", tag="baseline")
        self.base = Candidate(trained, trained.model)
        return self.base

    def mine(self, p_valid: np.ndarray) -> Any:
        return mine_cohorts(self.cfg, self.splits, p_valid, self.out, self.info)

    def with_cohorts(self, miner: Any, ids: dict[str, np.ndarray]) -> Any:
        return with_mined_cohorts(self.cfg, self.splits, miner, ids)

    def fit(self, splits: Any, aux_weight: list[float], suffix: str) -> Candidate:
        return Candidate(fit_c2al(self.cfg, splits, aux_weight, self.info, self.out / f"c2al_train{suffix}.pt"))

    def scores(self, candidate: Candidate, split: str) -> np.ndarray:
        served = split == "test" and candidate is not self.base and candidate.served is not None
        model = candidate.served if served else candidate.trained.module
        return predict(model, getattr(self.splits, split), self.splits.schema, self.cfg.batch_size, self.info)

    def kept(self, trained: Trained) -> dict[str, Any]:
        return {"best_epoch": trained.best.get("epoch")}


def with_mined_cohorts(cfg: Config, splits: Any, miner: Any, ids: dict[str, np.ndarray]) -> Any:
    """The splits with every row's mined cohort id: the in-memory train split at once, a streaming train
    split chunk by chunk as the reader yields it (`ids` holds the valid and test ids already assigned)."""
    if is_streaming(splits.train):
        columns = list(cfg.cohort_features) or list(splits.schema.cohort_features)
        return splits.with_cohorts(lambda frame: miner.predict(frame[columns]))
    return splits.with_cohorts({"train": miner.predict(cohort_frame(cfg, splits, "train")), **ids})


def fit_c2al(cfg: Config, splits: Any, aux_weight: list[float], info: DistInfo, checkpoint: Path | None) -> Trained:
    """One C2AL training from the baseline's seeded start, early-stopped like it (`splits` carry the cohort ids, one
    lambda per exposed cohort in `aux_weight`); with --objective group-dro / cvar the plain model under that loss
    instead, with --aux-towers mmoe MMoE towers."""
    model = seeded_model(cfg, splits.schema)  # same seed: same start as the baseline
    if cfg.objective != "erm":
        # n_g of Group DRO's adjustment: the train rows per group; a stream's are not counted ahead, validation's shares stand in
        ids = splits.valid.cohort_ids if is_streaming(splits.train) else splits.train.cohort_ids
        objective = make_objective(cfg.objective, counts=group_counts(ids, len(aux_weight)), eta=cfg.dro_eta,
                                   adjust=cfg.dro_adjust, alpha=cfg.cvar_alpha)
        return fit(cfg, splits, robust_model(model, objective), info, checkpoint=checkpoint, tag=cfg.objective)
    wrapper = attach_heads(cfg, model, aux_weight, towers=cfg.aux_towers, balance=cfg.aux_balance)
    tag = "c2al" if checkpoint is None or checkpoint.name == "c2al_train.pt" else f"c2al lambda={aux_weight[0]:g}"
    return fit(cfg, splits, wrapper, info, checkpoint=checkpoint, tag=tag)
