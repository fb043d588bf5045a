"""The jobs train.py runs: a baseline, or the whole C2AL method.

C2AL (Cokbas et al. 2025): train the baseline, mine the most contrasting
cohorts from its validation predictions, train again from the same seed with
auxiliary heads on the cohort-masked labels, strip the heads, and compare both
on the test split per cohort.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from c2al.train.build import seeded_model
from c2al.train.loop import fit, predict_split, predict_with
from c2al.dist.checkpoint import atomic_torch_save, gather_full, FORMAT
from c2al.config import Config
from c2al.data.schema import Splits
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError
from c2al.eval.metrics import ne_diff_pct, per_segment, summarize
from c2al.eval.report import format_table, write_json


def run_baseline(cfg: Config, splits: Splits, info: DistInfo, out: Path) -> dict[str, Any]:
    """Train one model, evaluate on test, write OUT/report.json."""
    trained = fit(cfg, splits, seeded_model(cfg, splits.schema), info, checkpoint=out / "checkpoint.pt", tag="train")
    probs = predict_split(trained, cfg, splits, "test", info)
    test = splits.test
    segments: list[dict[str, Any]] = []
    if test.true_cohorts is not None and (test.true_cohorts >= 0).any():
        segments = per_segment(probs, test.labels, test.true_cohorts, int(test.true_cohorts.max()) + 1)
    report = {
        "config": cfg.to_dict(),
        "overall": summarize(probs, test.labels),
        "segments": segments,
        "history": trained.history,
        "train_seconds": trained.seconds,
        "world_size": info.world_size,
    }
    if cfg.model == "two-tower":
        report["retrieval"] = retrieval_report({"model": trained.model}, splits, info, cfg)
    if info.is_main:
        print(format_table([report["overall"]], ["n", "plr", "ne", "auc", "logloss", "calibration"], title=f"test split ({cfg.model})"))
        if segments:
            print(format_table(segments, ["id", "n", "share", "plr", "ne", "auc"], title="planted cohorts (ground truth)"))
        write_json(report, out / "report.json")
        print(f"wrote {out / 'report.json'}")
    return report


def retrieval_report(models: dict[str, nn.Module], splits: Splits, info: DistInfo, cfg: Config) -> dict[str, Any]:
    """recall@K / NDCG@K of each two-tower model on the test users' held-out positives; printed on rank 0."""
    from c2al.eval.retrieval import retrieval_metrics

    out = {name: retrieval_metrics(m, splits, info, batch_size=max(cfg.batch_size, 1024)) for name, m in models.items()}
    if info.is_main:
        cols = ["model"] + [k for k in next(iter(out.values())) if "@" in k and "popularity" not in k] + ["n_users", "n_items"]
        ref = next(iter(out.values()))
        cols_pop = [k for k in ref if k.startswith("popularity")]
        out_rows = [{"model": n, **r} for n, r in out.items()] + [{"model": "most popular", **{k.removeprefix("popularity_"): ref[k] for k in cols_pop}}]
        print(format_table(out_rows, cols, title="test split: retrieval over the full item catalog (seen items filtered)"))
    return out if len(out) > 1 else next(iter(out.values()))


def cohort_frame(cfg: Config, splits: Splits, split: str) -> pd.DataFrame:
    """The miner's X for one split: --cohort-features, or the source's user-side features."""
    frame = getattr(splits, split).cohort_frame
    cols = cfg.list_of("cohort_features") or list(splits.schema.cohort_features)
    if frame is None or not cols:
        raise C2ALError(f"data {splits.schema.name!r} has no cohort features; pass --cohort-features COL,...")
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise C2ALError(f"unknown --cohort-features {missing}; available: {list(frame.columns)}")
    return frame[cols]


def mine_cohorts(cfg: Config, splits: Splits, valid_scores: np.ndarray, out: Path, info: DistInfo) -> Any:
    """Fit the miner on validation predictions (or load --cohorts) and save it."""
    from c2al.cohorts import CohortMiner

    if cfg.cohorts:
        path = Path(cfg.cohorts)
        miner = CohortMiner.load(path / "cohorts.json" if path.is_dir() else path)
        if len(miner.contrast_) != cfg.aux_cohorts:
            raise C2ALError(f"--cohorts {cfg.cohorts!r} holds {len(miner.contrast_)} cohorts but --aux-cohorts is {cfg.aux_cohorts}")
    else:
        miner = CohortMiner(
            n_cohorts=cfg.aux_cohorts, candidates=cfg.cohort_candidates, n_clusters=cfg.n_clusters,
            divergence=cfg.divergence, min_share=cfg.min_share, max_share=cfg.max_share, random_state=cfg.seed,
        ).fit(cohort_frame(cfg, splits, "valid"), splits.valid.labels, scores=valid_scores)
    if info.is_main:
        miner.save(out / "cohorts.json")
    return miner


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


def run_c2al(cfg: Config, splits: Splits, info: DistInfo, out: Path) -> dict[str, Any]:
    """Baseline -> mine -> C2AL -> strip -> per-cohort comparison; writes report.json/png and checkpoints."""
    import c2al

    base = fit(cfg, splits, seeded_model(cfg, splits.schema), info, checkpoint=out / "baseline.pt", tag="baseline")
    miner = mine_cohorts(cfg, splits, predict_split(base, cfg, splits, "valid", info), out, info)
    cohort_ids = {s: miner.predict(cohort_frame(cfg, splits, s)) for s in ("train", "valid", "test")}
    with_cohorts = Splits(
        schema=splits.schema,
        train=splits.train.with_cohorts(cohort_ids["train"]),
        valid=splits.valid.with_cohorts(cohort_ids["valid"]),
        test=splits.test.with_cohorts(cohort_ids["test"]),
    )
    model = seeded_model(cfg, splits.schema)  # same seed: same start as the baseline
    wrapper = c2al.attach(model, at="inter_arch", n_cohorts=cfg.aux_cohorts, aux_weight=cfg.aux_weights(), head=make_head(cfg, model))
    trained = fit(cfg, with_cohorts, wrapper, info, checkpoint=out / "c2al_train.pt", tag="c2al")
    served = c2al.detach(trained.model)  # heads gone: the serving model is the plain model
    save_served(served, cfg, out / "c2al.pt", info)

    p_base = predict_split(base, cfg, splits, "test", info)
    p_c2al = predict_with(served, cfg, splits, "test", info)
    report = compare(cfg, splits, cohort_ids["test"], p_base, p_c2al, miner)
    add_traits(report, cohort_frame(cfg, splits, "test"), cohort_ids["test"])
    report["attention"] = attention_report(base.model, served, splits, cfg, info)
    if cfg.model == "two-tower":
        report["retrieval"] = retrieval_report({"baseline": base.model, "c2al": served}, splits, info, cfg)
    report["history"] = {"baseline": base.history, "c2al": trained.history}
    report["train_seconds"] = {"baseline": base.seconds, "c2al": trained.seconds}
    report["world_size"] = info.world_size
    if info.is_main:
        print_comparison(report)
        write_json(report, out / "report.json")
        from c2al.eval.plots import plot_report

        plot_report(report, out / "report.png")
        print(f"wrote {out / 'report.json'}, {out / 'report.png'}, {out / 'cohorts.json'}, {out / 'baseline.pt'}, {out / 'c2al.pt'}")
    return report


def save_served(model: nn.Module, cfg: Config, path: Path, info: DistInfo) -> None:
    """The stripped C2AL model: plain full tensors, config inside, atomic."""
    import json

    state = gather_full(model.state_dict())
    if info.is_main:
        atomic_torch_save({"format": FORMAT, "config": json.dumps(cfg.to_dict(), sort_keys=True), "step": -1,
                           "model": state, "optimizer": None, "extra": json.dumps({"stripped": True})}, path)


def compare(cfg: Config, splits: Splits, test_cohorts: np.ndarray, p_base: np.ndarray, p_c2al: np.ndarray, miner: Any) -> dict[str, Any]:
    """The report.json body: overall and per-cohort NE of baseline vs C2AL on test."""
    y = splits.test.labels
    ob, oc = summarize(p_base, y), summarize(p_c2al, y)
    k = cfg.aux_cohorts
    rows_b = per_segment(p_base, y, test_cohorts, k)
    rows_c = per_segment(p_c2al, y, test_cohorts, k)
    cohorts = []
    for i, (rb, rc) in enumerate(zip(rows_b, rows_c)):
        cohorts.append({
            "id": i, "share": rb["share"], "plr": rb["plr"], "contrast": float(miner.contrast_[i]),
            "n": rb["n"], "ne_base": rb["ne"], "ne_c2al": rc["ne"], "ne_diff_pct": ne_diff_pct(rc["ne"], rb["ne"]),
            "auc_base": rb["auc"], "auc_c2al": rc["auc"],
        })
    rest = test_cohorts < 0
    outside = {}
    if rest.any():
        sb, sc = summarize(p_base[rest], y[rest]), summarize(p_c2al[rest], y[rest])
        outside = {"share": float(rest.mean()), "plr": sb["plr"], "ne_base": sb["ne"], "ne_c2al": sc["ne"], "auc_base": sb["auc"], "auc_c2al": sc["auc"],
                   "ne_diff_pct": ne_diff_pct(sc["ne"], sb["ne"])}
    return {
        "config": cfg.to_dict(),
        "overall": {"ne_base": ob["ne"], "ne_c2al": oc["ne"], "ne_diff_pct": ne_diff_pct(oc["ne"], ob["ne"]),
                    "auc_base": ob["auc"], "auc_c2al": oc["auc"], "n": ob["n"], "plr": ob["plr"]},
        "cohorts": cohorts,
        "outside_cohorts": outside,
        "miner": {"cohorts": _jsonable(miner.cohorts_)},
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict(orient="records")
    return obj


def add_traits(report: dict[str, Any], frame: pd.DataFrame, test_ids: np.ndarray) -> None:
    """Each reported cohort's most distinctive test-row traits, as text (e.g. "gender=F 100% (rest 21%)")."""
    from c2al.cohorts import describe_cohorts

    for row, described in zip(report["cohorts"], describe_cohorts(frame, test_ids, len(report["cohorts"]))):
        row["traits"] = [t["text"] for t in described["traits"]]


def print_comparison(report: dict[str, Any]) -> None:
    rows = [dict(r, cohort=str(r["id"])) for r in report["cohorts"]]
    if report.get("outside_cohorts"):
        rows.append(dict(report["outside_cohorts"], cohort="rest"))
    o = report["overall"]
    rows.append({"cohort": "overall", "share": 1.0, "plr": o["plr"], "ne_base": o["ne_base"], "ne_c2al": o["ne_c2al"], "ne_diff_pct": o["ne_diff_pct"],
                 "auc_base": o["auc_base"], "auc_c2al": o["auc_c2al"]})
    print(format_table(rows, ["cohort", "share", "plr", "contrast", "ne_base", "ne_c2al", "ne_diff_pct", "auc_base", "auc_c2al"], title="test split: baseline vs C2AL (NE_diff % < 0 is better)"))
    for r in report["cohorts"]:
        if r.get("traits"):
            print(f"  cohort {r['id']}: " + "; ".join(r["traits"]))
    att = report.get("attention") or {}
    if att:
        keys = sorted(att["baseline"])
        print(format_table([{"model": m, **att[m]} for m in ("baseline", "c2al")], ["model"] + keys, title="attention activity (test batch)"))


@torch.no_grad()
def attention_report(base_model: nn.Module, c2al_model: nn.Module, splits: Splits, cfg: Config, info: DistInfo) -> dict[str, Any]:
    """Attention-activity scalars and weight histograms for AFM/AttentionFM (empty for two-tower)."""
    from c2al.eval.activity import attention_activity
    from c2al.data.batch import iter_batches

    if cfg.model == "two-tower":
        return {}
    batch = next(iter_batches(splits.test, splits.schema, min(cfg.batch_size * 4, len(splits.test) // info.world_size * info.world_size),
                              shuffle=False, rank=info.rank, world_size=info.world_size, drop_last=True)).to(info.device)
    out: dict[str, Any] = {}
    for name, m in (("baseline", base_model), ("c2al", c2al_model)):
        m.eval()
        out[name] = attention_activity(m, batch.dense, batch.sparse)
        weights = m.attention_weights(batch.dense, batch.sparse).float().flatten().cpu().numpy()
        hist, edges = np.histogram(weights, bins=40)
        out.setdefault("histograms", {})[name] = {"counts": hist.tolist(), "edges": edges.tolist()}
    return out
