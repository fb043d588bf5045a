"""The cohort-miner and multi-process parts of benchmarks/throughput.py.

Letters: N samples, W processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import throughput_variants as tv
import torch

from c2al.eval.report import write_json

MINER_SIZES = (100_000, 1_000_000, 10_000_000)
MINER_SIZES_QUICK = (10_000, 50_000)
# MiniBatchKMeans (batch 2048) fit 10^7 rows at 18k samples/s (543 s) in a run of 2026-11-22, a third of
# the 30-minute budget; above this size it is left out
MINIBATCH_MAX = 1_000_000
CLUSTERS = 16


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def miner_rows(quick: bool) -> list[dict[str, Any]]:
    """samples/s of CohortMiner.fit/predict against scikit-learn's KMeans and MiniBatchKMeans on the same X.

    X: 4 user-like numeric columns; y and baseline scores from a logistic
    model on them, so the miner has contrast to find.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from c2al.cohorts import CohortMiner

    rows = []
    for n in MINER_SIZES_QUICK if quick else MINER_SIZES:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n, 4))
        scores = 1 / (1 + np.exp(-(1.5 * X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=n))))
        y = (rng.random(n) < scores).astype(int)
        estimators = {
            "c2al_CohortMiner": CohortMiner(2, candidates="kmeans", n_clusters=CLUSTERS, random_state=0),
            "sklearn_KMeans": KMeans(CLUSTERS, n_init=1, random_state=0),
            "sklearn_MiniBatchKMeans": MiniBatchKMeans(CLUSTERS, batch_size=2048, n_init=1, random_state=0),
        }
        if n > MINIBATCH_MAX:
            del estimators["sklearn_MiniBatchKMeans"]
        for name, est in estimators.items():
            fit_args = (X, y, scores) if name.startswith("c2al") else (X,)
            _, fit_s = _timed(lambda: est.fit(*fit_args))
            _, pred_s = _timed(lambda: est.predict(X))
            rows.append({"estimator": name, "n": n, "fit_sps": n / fit_s, "predict_sps": n / pred_s,
                         "fit_s": fit_s, "predict_s": pred_s})
            print(f"miner {name} n={n}: fit {n / fit_s:.3g}/s predict {n / pred_s:.3g}/s", file=sys.stderr, flush=True)
    return rows


def scaling_worker(sizes: tv.Sizes, shardings: list[str], out: Path | None) -> None:
    """One rank of a torchrun run: the lean AFM, global batch split over ranks, once per sharding type."""
    import torch.distributed as dist

    from c2al.dist.process import init_distributed

    info = init_distributed("cpu")
    local = sizes.batch // info.world_size
    steps = max(sizes.train_steps // 3, sizes.warmup_steps + 2)
    data = tv.make_data(sizes, steps * sizes.batch, seed=sizes.seed + 1)
    rows = []
    for sharding in shardings:
        variant = tv.c2al_sharded("afm", sizes, sharding=sharding)
        timed = 0.0
        for i in range(steps):
            inp = variant.prepare(data, i * sizes.batch + info.rank * local, local)
            dist.barrier()
            start = time.perf_counter()
            variant.step(inp)
            dist.barrier()
            if i >= sizes.warmup_steps:
                timed += time.perf_counter() - start
        rows.append({"world_size": info.world_size, "sharding": sharding, "steps": steps,
                     "threads_per_rank": torch.get_num_threads(),
                     "train_eps": (steps - sizes.warmup_steps) * sizes.batch / timed})
    if info.is_main and out is not None:
        write_json(rows, out)
    dist.destroy_process_group()


def scaling_rows(script: Path, flags: list[str], quick: bool) -> list[dict[str, Any]]:
    """1 vs 2 torchrun processes on this CPU, tables table-wise and column-wise (gloo has no row-wise)."""
    rows: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    flags = [f for i, f in enumerate(flags) if f != "--threads" and (i == 0 or flags[i - 1] != "--threads")]
    shardings = ["table_wise", "column_wise"]
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   str(script), *flags, "--threads", str(max(1, cores // world)), "--part", "scaling-worker",
                   "--sharding", ",".join(shardings), "--row-out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode == 0 and out.exists():
                got = json.loads(out.read_text())
            else:
                why = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                got = [{"world_size": world, "sharding": s, "error": why} for s in shardings]
            for row in got:
                row["command"] = " ".join(["torchrun", f"--nproc_per_node={world}", *cmd[cmd.index(str(script)):]][:-2])
                row["load_avg_1m_after"] = os.getloadavg()[0]
                print(f"scaling {row}", file=sys.stderr, flush=True)
            rows.extend(got)
    return rows
