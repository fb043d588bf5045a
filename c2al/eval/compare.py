"""Baseline vs C2AL: the per-cohort comparison, its printed tables and the attention report.

Both jobs (centralized and federated) build their report.json body here.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from c2al.config import Config
from c2al.data.schema import Splits
from c2al.dist.process import DistInfo
from c2al.eval.metrics import ne_diff_pct, per_segment, summarize
from c2al.eval.report import format_table
from c2al.models.registry import model_spec

log = logging.getLogger(__name__)


def compare(cfg: Config, splits: Splits, test_cohorts: np.ndarray, p_base: np.ndarray, p_c2al: np.ndarray, miner: Any) -> dict[str, Any]:
    """The report.json body: overall and per-cohort NE of baseline vs C2AL on test."""
    y = splits.test.labels
    ob, oc = summarize(p_base, y), summarize(p_c2al, y)
    k = len(miner.contrast_)  # the cohorts the miner exposed (at most --aux-cohorts)
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
    cols = ["cohort", "share", "plr", "contrast", "ne_base", "ne_c2al", "ne_diff_pct", "auc_base", "auc_c2al"]
    log.info(format_table(rows, cols, title="test split: baseline vs C2AL (NE_diff % < 0 is better)" + kept_both(report)))
    for r in report["cohorts"]:
        if r.get("traits"):
            log.info(f"  cohort {r['id']}: " + "; ".join(r["traits"]))
    search = report.get("aux_weight_search")
    if search:
        log.info(format_table(search["candidates"], ["aux_weight", "ne", "cohort_ne", "best_epoch"],
                              title=f"--aux-weight auto on validation (baseline NE {search['baseline']['ne']:.4f}, "
                                    f"exposed cohorts {search['baseline']['cohort_ne']:.4f}); chosen {search['chosen']}"))
    decision = report.get("decision")
    if decision:
        log.info(f"shipped as c2al.pt: {decision['shipped']} ({decision['reason']})")
    att = report.get("attention") or {}
    if att:
        keys = sorted(att["baseline"])
        log.info(format_table([{"model": m, **att[m]} for m in ("baseline", "c2al")], ["model"] + keys, title="attention activity (test batch)"))


@torch.no_grad()
def attention_report(base_model: nn.Module, c2al_model: nn.Module, splits: Splits, cfg: Config, info: DistInfo) -> dict[str, Any]:
    """Attention-activity scalars and weight histograms of models with attention weights (`ModelSpec.attention`:
    AFM, AttentionFM); empty for the others (the two-tower)."""
    from c2al.data.batch import iter_batches
    from c2al.eval.activity import attention_activity

    if not model_spec(cfg.model).attention:
        return {}
    batch = next(iter_batches(splits.test, splits.schema, min(cfg.batch_size * 4, len(splits.test) // info.world_size * info.world_size),
                              shuffle=False, rank=info.rank, world_size=info.world_size, drop_last=True)).to(info.device)
    out: dict[str, Any] = {}
    weights = {}
    for name, m in (("baseline", base_model), ("c2al", c2al_model)):
        m.eval()
        out[name] = attention_activity(m, batch.dense, batch.sparse)
        weights[name] = m.attention_weights(batch.dense, batch.sparse).float().flatten().cpu().numpy()
    edges = np.histogram_bin_edges(np.concatenate(list(weights.values())), bins=40)  # one set of bins: comparable counts
    out["histograms"] = {name: {"counts": np.histogram(w, bins=edges)[0].tolist(), "edges": edges.tolist()}
                         for name, w in weights.items()}
    return out


def retrieval_report(models: dict[str, nn.Module], splits: Splits, info: DistInfo, cfg: Config) -> dict[str, Any]:
    """recall@K / NDCG@K of each retrieval model (`ModelSpec.retrieval`: the two-tower) on the test users' held-out
    positives; printed on rank 0."""
    from c2al.eval.retrieval import retrieval_metrics

    out = {name: retrieval_metrics(m, splits, info, batch_size=max(cfg.batch_size, 1024)) for name, m in models.items()}
    if info.is_main:
        cols = ["model"] + [k for k in next(iter(out.values())) if "@" in k and "popularity" not in k] + ["n_users", "n_items"]
        ref = next(iter(out.values()))
        cols_pop = [k for k in ref if k.startswith("popularity")]
        out_rows = [{"model": n, **r} for n, r in out.items()] + [{"model": "most popular", **{k.removeprefix("popularity_"): ref[k] for k in cols_pop}}]
        log.info(format_table(out_rows, cols, title="test split: retrieval over the full item catalog (seen items filtered)"))
    return out if len(out) > 1 else next(iter(out.values()))


def kept(best: dict[str, Any] | None, unit: str = "epoch") -> str:
    """'epoch 3 kept' (a federated training's best: 'round 40 kept') for a training's best evaluation, as printed
    above tables; 'last epoch' (`unit`) when nothing was evaluated."""
    if best and "epoch" in best:
        return f"epoch {best['epoch']} kept"
    if best and "rounds" in best:
        return f"round {best['rounds']} kept"
    return f"last {unit}"


def kept_both(report: dict[str, Any]) -> str:
    best = report.get("best") or {}
    if not best:
        return ""
    unit = "round" if "federated" in report else "epoch"
    return f"; baseline {kept(best.get('baseline'), unit)}, C2AL {kept(best.get('c2al'), unit)}"


# --aux-weight auto tries these lambdas (each a full early-stopped C2AL training).
AUTO_GRID = (0.03, 0.1, 0.3)


def valid_scores(p_valid: np.ndarray, labels: np.ndarray, cohort_ids: np.ndarray, k: int) -> dict[str, Any]:
    """Validation NE overall and the mean over the K exposed cohorts: what auto lambda and --gate read."""
    rows = per_segment(p_valid, labels, cohort_ids, k)
    cohort_ne = [r["ne"] for r in rows if r["ne"] is not None]
    return {"ne": summarize(p_valid, labels)["ne"], "cohort_ne": float(np.mean(cohort_ne)) if cohort_ne else None,
            "cohorts": [r["ne"] for r in rows]}


def _no_worse(ne: float, base_ne: float, tolerance: float) -> bool:
    return ne <= base_ne * (1.0 + tolerance)


def choose_aux_weight(candidates: list[dict[str, Any]], base: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The auto-lambda rule: among candidates whose overall validation NE is no worse than the baseline's
    (relative `tolerance`), the lowest mean exposed-cohort validation NE; if none qualifies, the lowest overall.

    Example:
        >>> base = {"ne": 0.80, "cohort_ne": 0.90}
        >>> cands = [{"aux_weight": 0.1, "ne": 0.79, "cohort_ne": 0.89}, {"aux_weight": 1.0, "ne": 0.82, "cohort_ne": 0.85}]
        >>> choose_aux_weight(cands, base, 0.0)["aux_weight"]
        0.1
    """
    fine = [c for c in candidates if _no_worse(c["ne"], base["ne"], tolerance) and c["cohort_ne"] is not None]
    if fine:
        return min(fine, key=lambda c: c["cohort_ne"])
    return min(candidates, key=lambda c: c["ne"])


def judge_on_validation(base: dict[str, Any], c2al: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The --gate rule: ship C2AL only when, on validation, its overall NE is no worse than the baseline's (relative
    `tolerance`) and its mean exposed-cohort NE is lower; otherwise ship the baseline.

    Returns:
        {"shipped": "c2al" | "baseline", "reason", "valid_ne_base", "valid_ne_c2al",
         "valid_cohort_ne_base", "valid_cohort_ne_c2al", "tolerance"}.

    Example:
        >>> judge_on_validation({"ne": 0.80, "cohort_ne": 0.90}, {"ne": 0.81, "cohort_ne": 0.85}, 0.0)["shipped"]
        'baseline'
    """
    out = {"valid_ne_base": base["ne"], "valid_ne_c2al": c2al["ne"], "valid_cohort_ne_base": base["cohort_ne"],
           "valid_cohort_ne_c2al": c2al["cohort_ne"], "tolerance": tolerance}
    if not _no_worse(c2al["ne"], base["ne"], tolerance):
        return {"shipped": "baseline", "reason": f"C2AL's overall validation NE {c2al['ne']:.5f} is worse than the baseline's "
                f"{base['ne']:.5f}", **out}
    if base["cohort_ne"] is None or c2al["cohort_ne"] is None or not c2al["cohort_ne"] < base["cohort_ne"]:
        return {"shipped": "baseline", "reason": f"C2AL's exposed-cohort validation NE {c2al['cohort_ne']} is not lower than "
                f"the baseline's {base['cohort_ne']}", **out}
    return {"shipped": "c2al", "reason": f"overall validation NE {c2al['ne']:.5f} <= {base['ne']:.5f} and exposed-cohort "
            f"{c2al['cohort_ne']:.5f} < {base['cohort_ne']:.5f}", **out}


def ship_decision(base: dict[str, Any], c2al: dict[str, Any], use_gate: bool, tolerance: float) -> dict[str, Any]:
    """What the job ships: `judge_on_validation`'s decision with --gate, or C2AL unconditionally with --no-gate."""
    if use_gate:
        return judge_on_validation(base, c2al, tolerance)
    return {"shipped": "c2al", "reason": "--no-gate", "valid_ne_base": base["ne"], "valid_ne_c2al": c2al["ne"]}


def record_decision(report: dict[str, Any], decision: dict[str, Any]) -> None:
    """The report's `decision` and the overall test NE of the model that ships (`ne_shipped`)."""
    report["decision"] = decision
    report["overall"]["ne_shipped"] = report["overall"]["ne_c2al" if decision["shipped"] == "c2al" else "ne_base"]
