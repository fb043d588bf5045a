"""Which candidate source finds planted cohorts: adjusted Rand index of the mined cohorts.

  python benchmarks/cohort_recovery.py        # about 2-3 minutes on 2 idle cores

Data: the synthetic generator (200k rows, 3 seeds) with two kinds of planted cohorts:
- minority: two small user clusters (3% and 2% of traffic) with their own click rate
  and a flipped interaction (`--data synthetic`, the default world);
- conjunction: two conjunctions of user features cutting across the clusters
  (`region=r & age_z>=a`, `region=r' & tenure_z<t & activity_z>=v`), the same shares
  (`--data synthetic:conjunctions=1`).
Baseline: the one-hot logistic regression of benchmarks/linear_baseline.py (C=1), fitted
on train; the miner reads its validation scores, as train.py's miner reads the baseline's.
A trained AFM would be slower and is not what is compared here: every candidate set
sees the same scores.
Mining: train.py's miner settings (at most 2 cohorts, 16 clusters / leaves, JS, shares in
[0.02, 0.2], the miner's own permutation test and contrast threshold) on the validation
rows, one candidate set per row of the grid; the score is the ARI of the exposed cohort ids
against the planted ones over the validation rows. benchmarks/cohort_recovery_worlds.py
measures the same over a family of random worlds, null worlds included.

Writes benchmarks/results/cohort_recovery.json: the grid, per (data, candidates) the
ARI of each seed, their mean, the exposed rules and the mining seconds, and the machine.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import harness
import numpy as np
from linear_baseline import one_hot
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score

from c2al.cohorts import CohortMiner
from c2al.config import Config
from c2al.data.synthetic import SyntheticConfig, make_synthetic_splits
from c2al.eval.report import format_table

RESULTS = harness.RESULTS
DATA = {"minority": {}, "conjunction": {"conjunctions": True}}
CANDIDATES = ("kmeans", "axes", "tree", "kmeans+tree", "kmeans+axes", "kmeans+axes+tree", "gmm")


def baseline_scores(data: str, seed: int, n_rows: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Validation cohort frame, labels, planted cohorts and the baseline's scores."""
    splits = make_synthetic_splits(SyntheticConfig(n_rows=n_rows, seed=seed, **DATA[data]))
    train, valid = splits.train, splits.valid
    model = LogisticRegression(C=1.0, max_iter=2000).fit(one_hot(train, splits.schema), train.labels)
    scores = model.predict_proba(one_hot(valid, splits.schema))[:, 1]
    return valid.cohort_frame, valid.labels, valid.true_cohorts, scores


def mine(candidates: str, seed: int, frame: Any, labels: np.ndarray, truth: np.ndarray,
         scores: np.ndarray) -> dict[str, Any]:
    """ARI, rules and seconds of one candidate set with train.py's miner settings."""
    cfg = Config()
    start = time.perf_counter()
    miner = CohortMiner(n_cohorts=2, candidates=candidates, n_clusters=cfg.n_clusters, divergence=cfg.divergence,
                        min_share=cfg.min_share, max_share=cfg.max_share, random_state=seed).fit(frame, labels, scores)
    seconds = time.perf_counter() - start
    ids = miner.predict(frame)
    return {"ari": float(adjusted_rand_score(truth, ids)), "rules": [c["rule"] for c in miner.cohorts_],
            "exposed": len(miner.cohorts_), "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_seeds_flag(ap, "0,1,2", what="the synthetic worlds")
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows per seed (valid: 10%%)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated candidate sets")
    ap.add_argument("--out", default=str(RESULTS / "cohort_recovery.json"))
    args = ap.parse_args(argv)
    seeds, grid = args.seeds, args.candidates.split(",")
    run = harness.start(__file__, argv, config={"rows_per_seed": args.rows, "seeds": seeds, "grid": grid})
    start = time.perf_counter()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {d: {c: [] for c in grid} for d in DATA}
    for data in DATA:
        for seed in seeds:
            inputs = baseline_scores(data, seed, args.rows)
            for candidates in grid:
                runs[data][candidates].append(dict(mine(candidates, seed, *inputs), seed=seed))
    rows = [{"data": d, "candidates": c, "ari_mean": float(np.mean([r["ari"] for r in rs])),
             **{f"ari_seed{r['seed']}": r["ari"] for r in rs}} for d, by in runs.items() for c, rs in by.items()]
    print(format_table(rows, list(rows[0]), title="adjusted Rand index of mined vs planted cohorts (validation rows)"))
    harness.write_result(args.out, run, {"rows_per_seed": args.rows, "seeds": seeds, "grid": grid,
                                         "baseline": "one-hot logistic regression, C=1 (benchmarks/linear_baseline.py)",
                                         "table": rows, "runs": runs, "seconds": time.perf_counter() - start})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
