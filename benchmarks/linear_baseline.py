"""The floor a factorization model must clear: one-hot logistic regression.

Same data source and split as train.py; the inverse regularization C is picked
on the validation split, then the model is scored on test.

  python benchmarks/linear_baseline.py                      # MovieLens-100k
  python benchmarks/linear_baseline.py --data movielens-1m  # 1M ratings, about 3 minutes on 2 cores
  python benchmarks/linear_baseline.py --data synthetic

Writes benchmarks/results/linear_baseline_<data>.json: the grid, each C's validation
scores, the picked C's test scores, and the seconds spent loading and fitting.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import harness
import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from c2al.config import Config
from c2al.data.schema import Schema, Table
from c2al.data.sources import load_splits
from c2al.eval.metrics import summarize
from c2al.eval.report import format_table


def one_hot(table: Table, schema: Schema) -> sp.csr_matrix:
    """Multi-hot indicator matrix over every field's vocabulary (mean-pooled, as the tables), plus dense columns."""
    n = len(table)
    rows, cols, data, offset = [], [], [], 0
    for f in schema.sparse:
        col = table.sparse[f.name]
        r = np.repeat(np.arange(n), col.lengths)
        rows.append(r)
        cols.append(col.values + offset)
        data.append(1.0 / col.lengths[r])
        offset += f.num_embeddings
    x = sp.csr_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(n, offset))
    if len(schema.dense):
        x = sp.hstack([x, sp.csr_matrix(table.dense)]).tocsr()
    return x


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens-100k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="0.01,0.03,0.1,0.3,1,3", help="values of C tried on the validation split")
    ap.add_argument("--out", default="", help="result file (default benchmarks/results/linear_baseline_<data>.json)")
    args = ap.parse_args(argv)
    run = harness.start(__file__, argv, {"data": args.data, "seed": args.seed, "grid": args.grid})
    start = time.perf_counter()
    splits = load_splits(Config(data=args.data, seed=args.seed))
    load_seconds = time.perf_counter() - start
    xs = {s: one_hot(getattr(splits, s), splits.schema) for s in ("train", "valid", "test")}
    best, by_c = None, {}
    start = time.perf_counter()
    for c in [float(v) for v in args.grid.split(",")]:
        lr = LogisticRegression(C=c, max_iter=2000).fit(xs["train"], splits.train.labels)
        valid = summarize(lr.predict_proba(xs["valid"])[:, 1], splits.valid.labels)
        by_c[str(c)] = {"valid_ne": valid["ne"], "valid_auc": valid["auc"]}
        print(f"C={c:<6} valid NE {valid['ne']:.4f}  AUC {valid['auc']:.4f}")
        if best is None or valid["ne"] < best[1]["ne"]:
            best = (c, valid, lr)
    c, valid, lr = best
    test = summarize(lr.predict_proba(xs["test"])[:, 1], splits.test.labels)
    print(format_table([test], ["n", "plr", "ne", "auc", "logloss", "calibration"], title=f"one-hot logistic regression, C={c}, test"))
    name = Path(args.data).stem if "/" in args.data else args.data
    out = Path(args.out) if args.out else harness.RESULTS / f"linear_baseline_{name}.json"
    # "seconds" is the fit over the grid (the header's wall_s counts loading too); readme_tables quotes it
    harness.write_result(out, run, {"data": args.data, "seed": args.seed, "grid": args.grid, "C": c, "valid_by_C": by_c,
                                    "valid": valid, "test": test, "load_seconds": load_seconds, "seconds": time.perf_counter() - start})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
