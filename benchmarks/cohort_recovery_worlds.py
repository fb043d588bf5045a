"""Cohort recovery over a family of random worlds: ARI per candidate source, false discoveries on null worlds.

  python benchmarks/cohort_recovery_worlds.py               # the reported worlds, about 10 minutes on 2 idle cores
  python benchmarks/cohort_recovery_worlds.py --set tune    # the worlds the miner's thresholds were chosen on

Worlds: `c2al.data.worlds.make_world` (100k rows, 20% held out for mining): one or two planted
conjunction cohorts of 1-3 conditions over numeric and categorical user features, 2-8% of traffic
each, with a shifted rate, an opposite taste, a taste that differs in some item categories, or a
flipped context x quality interaction; and null worlds with no cohort. The reported set and the
tuning set use disjoint seeds (`SEEDS`), so nothing is chosen on the reported worlds.
Baseline: a histogram gradient-boosted classifier on the user, item and context features, fitted on
the training rows; the miner reads its scores on the held-out rows, as train.py's miner reads the
baseline's validation scores. (A one-hot logistic regression cannot represent a cohort's opposite
taste at all: every score inside the cohort would look like the rest's.)
Sources: `default` is what `--aux-cohorts` runs (jobs/pipeline.mine_cohorts: train.py's Config
defaults, 2 cohorts, seeded by the world); kmeans, gmm, axes and tree use the same settings with one
source each. Per planted world: ARI of the mined cohort ids against the planted ones on the held-out
rows, and whether the baseline can see the planted cohorts at all: every planted cohort's held-out
scores differ from the rest's by a two-sample Kolmogorov-Smirnov test at p < 1e-3 (`VISIBLE_P`).
Per null world: whether the source exposed any cohort.

Writes benchmarks/results/cohort_recovery_worlds.json (or ..._tune.json): summary per source
({"planted": {n_worlds, median_ari, q1, q3, ...}, "visible": {...}, "null": {n_worlds, exposed_worlds}}),
one row per (world, source), and the machine. The file is rewritten after every world, so a killed run
keeps the worlds it finished.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import harness
import numpy as np
import pandas as pd
from scipy.stats import ks_2samp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from c2al.cohorts import CohortMiner
from c2al.config import Config
from c2al.data.worlds import World, make_world
from c2al.eval.report import format_table

RESULTS = harness.RESULTS
SOURCES = ("default", "kmeans", "gmm", "axes", "tree")
# (planted seeds, null seeds) per set; the sets share no seed
SEEDS = {"report": (range(0, 24), range(1000, 1010)), "tune": (range(500, 516), range(1500, 1512))}
VISIBLE_P = 1e-3


def baseline_scores(world: World) -> tuple[np.ndarray, float]:
    """The baseline's click probabilities on the held-out rows [n_valid], and its held-out AUC."""
    X = pd.concat([world.frame, world.context], axis=1)
    cats = [isinstance(X[c].dtype, pd.CategoricalDtype) for c in X.columns]
    X = X.apply(lambda s: s.cat.codes if isinstance(s.dtype, pd.CategoricalDtype) else s)
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=200, l2_regularization=1.0,
                                           categorical_features=cats, early_stopping=True, random_state=world.seed)
    model.fit(X[~world.valid], world.labels[~world.valid])
    scores = model.predict_proba(X[world.valid])[:, 1]
    return scores, float(roc_auc_score(world.labels[world.valid], scores))


def visible(truth: np.ndarray, scores: np.ndarray) -> bool:
    """Whether every planted cohort's scores differ from the rest's (KS test, p < VISIBLE_P)."""
    cohorts = [c for c in np.unique(truth) if c >= 0]
    return bool(cohorts) and all(ks_2samp(scores[truth == c], scores[truth != c]).pvalue < VISIBLE_P for c in cohorts)


def make_miner(source: str, seed: int) -> CohortMiner:
    """train.py's miner (`default`) or the same settings with one candidate source."""
    cfg = Config()
    return CohortMiner(n_cohorts=2, candidates=cfg.cohort_candidates if source == "default" else source,
                       n_clusters=cfg.n_clusters, divergence=cfg.divergence, min_share=cfg.min_share,
                       max_share=cfg.max_share, random_state=seed)


def run_world(world: World, kind: str) -> list[dict[str, Any]]:
    """One row per source: ARI (planted) or exposed cohorts (null), rules, seconds."""
    scores, auc = baseline_scores(world)
    frame, labels, truth = world.frame[world.valid].reset_index(drop=True), world.labels[world.valid], world.cohorts[world.valid]
    seen = visible(truth, scores) if kind == "planted" else False
    rows = []
    for source in SOURCES:
        start = time.perf_counter()
        miner = make_miner(source, world.seed).fit(frame, labels, scores)
        ids = miner.predict(frame)
        rows.append({"world": world.seed, "kind": kind, "source": source, "visible": seen, "baseline_auc": auc,
                     "ari": float(adjusted_rand_score(truth, ids)) if kind == "planted" else None,
                     "exposed": len(miner.cohorts_), "mined": [c["rule"] for c in miner.cohorts_],
                     "planted": [{k: c[k] for k in ("rule", "effect", "share")} for c in world.planted],
                     "seconds": time.perf_counter() - start})
    return rows


def quartiles(values: list[float]) -> dict[str, Any]:
    """n_worlds, median_ari, q1, q3, min, mean of ARIs (None when there are none)."""
    if not values:
        return {"n_worlds": 0, "median_ari": None}
    q1, med, q3 = (float(v) for v in np.quantile(values, (0.25, 0.5, 0.75)))
    return {"n_worlds": len(values), "median_ari": med, "q1": q1, "q3": q3, "min": float(min(values)),
            "mean": float(np.mean(values)), "share_ari_ge_0.8": float(np.mean(np.asarray(values) >= 0.8))}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per source: planted ARI quartiles (all, and visible worlds only), null worlds exposing something."""
    out = {}
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        planted = [r for r in mine if r["kind"] == "planted"]
        null = [r for r in mine if r["kind"] == "null"]
        out[source] = {"planted": quartiles([r["ari"] for r in planted]),
                       "visible": quartiles([r["ari"] for r in planted if r["visible"]]),
                       "null": {"n_worlds": len(null), "exposed_worlds": sum(r["exposed"] > 0 for r in null)}}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="report", choices=tuple(SEEDS), help="which seeds: the reported worlds or the tuning ones")
    ap.add_argument("--rows", type=int, default=100_000, help="rows per world (20%% held out for mining)")
    ap.add_argument("--limit", type=int, default=0, help="first N planted and N null worlds only (0: all)")
    ap.add_argument("--out", default="", help="default: results/cohort_recovery_worlds.json (_tune for --set tune)")
    args = ap.parse_args(argv)
    out = Path(args.out or RESULTS / f"cohort_recovery_worlds{'' if args.set == 'report' else '_' + args.set}.json")
    planted, null = (list(s)[:args.limit or None] for s in SEEDS[args.set])
    run = harness.start(__file__, argv, config={"set": args.set, "rows_per_world": args.rows, "limit": args.limit})
    start, rows = time.perf_counter(), []
    for kind, seeds in (("planted", planted), ("null", null)):
        for seed in seeds:
            rows += run_world(make_world(seed, planted=kind == "planted", n_rows=args.rows), kind)
            harness.write_result(out, run, {"set": args.set, "seeds": {"planted": planted, "null": null}, "rows_per_world": args.rows,
                                            "visible_p": VISIBLE_P, "summary": summarize(rows), "worlds": rows,
                                            "seconds": time.perf_counter() - start})
            print(format_table([r for r in rows if r["world"] == seed], ["world", "kind", "source", "visible", "ari", "exposed"]),
                  flush=True)
    table = [{"source": s, **{f"{k}_{m}": v.get(m) for k, v in by.items() for m in ("n_worlds", "median_ari", "exposed_worlds") if m in v}}
             for s, by in summarize(rows).items()]
    print(format_table(table, list(table[0]), title=f"cohort recovery over random worlds ({args.set} set)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
