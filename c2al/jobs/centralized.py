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
from c2al.dist.checkpoint import save_checkpoint
from c2al.dist.process import DistInfo
from c2al.eval.compare import (
    AUTO_GRID,
    add_traits,
    attention_report,
    choose_aux_weight,
    compare,
    kept,
    print_comparison,
    record_decision,
    retrieval_report,
    ship_decision,
    valid_scores,
)
from c2al.eval.metrics import per_segment, summarize
from c2al.eval.report import format_table, write_json
from c2al.jobs.pipeline import attach_heads, cohort_frame, mine_cohorts, served_model
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
    comparison; writes report.json/png, the miner and checkpoints, and OUT/c2al.pt: the model the gate ships."""
    base = fit(cfg, splits, seeded_model(cfg, splits.schema), info, checkpoint=out / "baseline.pt", tag="baseline")
    miner = mine_cohorts(cfg, splits, predict(base.module, splits.valid, splits.schema, cfg.batch_size, info), out, info)
    k = len(miner.contrast_)  # the permutation test may expose fewer cohorts than --aux-cohorts asked for
    if not getattr(miner, "found_", True) or k == 0:
        return _nothing_contrasting(cfg, splits, base, miner, info, out)
    if k < cfg.aux_cohorts and info.is_main:
        log.info(f"the miner exposed {k} of the {cfg.aux_cohorts} cohorts asked for (the others did not beat the permutation null): "
                 f"C2AL trains {k} head(s)")
    cohort_ids = {s: miner.predict(cohort_frame(cfg, splits, s)) for s in ("valid", "test")}
    mined = with_mined_cohorts(cfg, splits, miner, cohort_ids)
    v_base = _valid(cfg, splits, base.module, cohort_ids, info, k)
    lambdas = [list(cfg.aux_weights())[:k]] if cfg.aux_weight != "auto" else [[lam] * k for lam in AUTO_GRID]
    runs = []
    for lam in lambdas:
        name = "c2al_train.pt" if len(lambdas) == 1 else f"c2al_train_lambda{lam[0]:g}.pt"
        trained = fit_c2al(cfg, mined, lam, info, out / name)
        runs.append((trained, {"aux_weight": lam[0] if len(set(lam)) == 1 else lam, **_valid(cfg, splits, trained.module, cohort_ids, info, k),
                               "best_epoch": trained.best.get("epoch")}))
    chosen = choose_aux_weight([c for _, c in runs], v_base, cfg.gate_tolerance) if len(runs) > 1 else runs[0][1]
    trained = next(t for t, c in runs if c is chosen)
    served = served_model(trained.model)  # heads (and cohort towers, or the robust objective) gone
    decision = ship_decision(v_base, chosen, cfg.gate, cfg.gate_tolerance)
    shipped = served if decision["shipped"] == "c2al" else base.model
    save_checkpoint(out / "c2al.pt", model_state=shipped.state_dict(), config=cfg.to_dict(), step=-1,
                    extra={"stripped": True, "shipped": decision["shipped"]}, is_main=info.is_main)  # plain full tensors

    p_base = predict(base.module, splits.test, splits.schema, cfg.batch_size, info)
    p_c2al = predict(served, splits.test, splits.schema, cfg.batch_size, info)
    report = compare(cfg, splits, cohort_ids["test"], p_base, p_c2al, miner)
    add_traits(report, cohort_frame(cfg, splits, "test"), cohort_ids["test"])
    report["attention"] = attention_report(base.model, served, splits, cfg, info)
    if model_spec(cfg.model).retrieval:
        report["retrieval"] = retrieval_report({"baseline": base.model, "c2al": served}, splits, info, cfg)
    report["history"] = {"baseline": base.history, "c2al": trained.history}
    report["best"] = {"baseline": base.best, "c2al": trained.best}
    report["train_seconds"] = {"baseline": base.seconds, "c2al": trained.seconds}
    report["world_size"] = info.world_size
    record_decision(report, decision)
    if len(runs) > 1:
        report["aux_weight_search"] = {"candidates": [c for _, c in runs], "chosen": chosen["aux_weight"], "baseline": v_base}
    if info.is_main:
        print_comparison(report)
        write_json(report, out / "report.json")
        from c2al.eval.plots import plot_report

        plot_report(report, out / "report.png")
        log.info(f"wrote {out / 'report.json'}, {out / 'report.png'}, {out / 'cohorts.json'}, {out / 'baseline.pt'}, {out / 'c2al.pt'}")
    return report


def _nothing_contrasting(cfg: Config, splits: Any, base: Trained, miner: Any, info: DistInfo, out: Path) -> dict[str, Any]:
    """The miner's permutation test found no cohort whose baseline scores contrast with the rest: there is nothing
    for auxiliary heads to keep, so no C2AL model is trained and the baseline ships (report.json says why)."""
    probs = predict(base.module, splits.test, splits.schema, cfg.batch_size, info)
    overall = summarize(probs, splits.test.labels)
    reason = (f"the miner exposed no cohort: no candidate's contrast beat its permutation null (alpha {getattr(miner, 'alpha', '?')}); "
              "nothing for auxiliary heads to keep")
    report = {"config": cfg.to_dict(), "overall": {**overall, "ne_base": overall["ne"], "ne_shipped": overall["ne"]}, "cohorts": [],
              "decision": {"shipped": "baseline", "reason": reason}, "history": {"baseline": base.history},
              "best": {"baseline": base.best}, "train_seconds": {"baseline": base.seconds}, "world_size": info.world_size}
    save_checkpoint(out / "c2al.pt", model_state=base.model.state_dict(), config=cfg.to_dict(), step=-1,
                    extra={"stripped": True, "shipped": "baseline"}, is_main=info.is_main)
    if info.is_main:
        log.info(f"shipped as c2al.pt: baseline ({reason})")
        write_json(report, out / "report.json")
        log.info(f"wrote {out / 'report.json'}, {out / 'cohorts.json'}, {out / 'baseline.pt'}, {out / 'c2al.pt'}")
    return report


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


def _valid(cfg: Config, splits: Splits, module: Any, cohort_ids: dict[str, np.ndarray], info: DistInfo, k: int) -> dict[str, Any]:
    """Validation NE, overall and over the k exposed cohorts, of a trained module (its kept weights)."""
    p = predict(module, splits.valid, splits.schema, cfg.batch_size, info)
    return valid_scores(p, splits.valid.labels, cohort_ids["valid"], k)

