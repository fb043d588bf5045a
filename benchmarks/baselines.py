"""The early-stopped baselines on one data set, next to the logistic-regression floor.

Runs, each a train.py baseline training through the library (fit, then predict on test
with the best validation epoch's weights):

  afm seed S         the AFM with train.py's defaults, one run per --afm-seeds seed
  attention-fm       AttentionFM, seed 0
  two-tower          TwoTower trained with in-batch softmax (--two-tower-loss softmax and its
                     defaults: logQ correction, early stopping on validation recall@10), seed 0:
                     test recall@10 / NDCG@10 over the full catalog (seen items filtered) next
                     to the most-popular reference
  two-tower-no-logq  the same without the logQ correction (--no-two-tower-logq)
  two-tower F=V      --two-tower-grid: the TwoTower with one training flag changed (default: a 4x
                     batch, i.e. 4x the in-batch negatives), compared on validation recall@10 only
  afm:0 FIELD=VALUE  --afm-grid: AFM seed 0 with one training flag changed, compared with afm:0
                     on validation NE only; the best, when better than the defaults, is then
                     trained on every AFM seed (afm:S FIELD=VALUE) and summarized like the defaults

The floor is the committed benchmarks/results/linear_baseline_<data>.json (one-hot logistic
regression, C picked on valid; `python benchmarks/linear_baseline.py --data <data>`).

  python benchmarks/baselines.py                            # MovieLens-1M (about 1 h on 2 idle cores)
  python benchmarks/baselines.py --data movielens-100k      # a few minutes
  python benchmarks/baselines.py --runs afm:1,two-tower     # only these runs, merged into the result file
  python benchmarks/baselines.py --afm-grid table_lr=0.15,dropout=0   # other AFM what-ifs (default: AFM_GRID)
  python benchmarks/baselines.py --lr 0.001 --out /tmp/b.json   # any train.py training flag, for a what-if

Runs go side by side in --processes spawned processes of one torch thread each (harness.run_pool;
on a busy 2-core machine a second torch thread in one process made an epoch many times slower).
Every finished run is also kept under runs/baselines/<data>/ (--cache) and reused by a later
invocation with the same config, so an interrupted benchmark goes on where it stopped.
Writes benchmarks/results/baselines_<data>.json: per run the test NE/AUC, best epoch,
validation history, seconds per epoch (validation included), total seconds, the config and
the command that reproduces it; the AFM's mean and range over seeds and its margin to the
floor; the harness header (command, commit, machine with the load average at start and end, wall_s, config).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import harness
import numpy as np

from c2al.config import Config, add_config_flags, config_from
from c2al.data.sources import load_splits
from c2al.dist.process import init_distributed
from c2al.eval.metrics import summarize
from c2al.eval.report import format_table, write_json
from c2al.eval.retrieval import retrieval_metrics
from c2al.logs import quiet_libraries, setup_logging
from c2al.models.registry import model_spec
from c2al.train.build import seeded_model
from c2al.train.loop import fit
from c2al.train.task import predict

ROOT = harness.ROOT
RESULTS = harness.RESULTS
# train.py flags a what-if run may change; the data roles let it run on a tabular file too
TRAIN_FLAGS = ("label", "sparse", "dense", "user_col", "item_col", "time_col", "epochs", "patience", "batch_size",
               "lr", "table_lr", "weight_decay", "embedding_dim", "attention_dim", "dropout")
RETRIEVAL_KS = (10, 50)
# What might hold the AFM back (issue 10: learning rates, dropout, embedding dim), one flag at a time
AFM_GRID = "dropout=0,lr=0.01,embedding_dim=32,table_lr=0.15,table_lr=0.3,table_lr=0.6"
# More in-batch negatives for the softmax (issue 10): 4x the default batch of 512
TWO_TOWER_GRID = "batch_size=2048"


def plan(afm_seeds: Sequence[int], afm_grid: Sequence[tuple[str, Any]] = (),
         two_tower_grid: Sequence[tuple[str, Any]] = ()) -> dict[str, dict[str, Any]]:
    """Run name -> the Config fields that make it (on top of the shared flags).

    Each (field, value) of `afm_grid` adds the first AFM seed with that one field changed,
    named "afm:S field=value": a what-if judged on validation NE only; likewise
    `two_tower_grid` adds "two-tower field=value", judged on validation recall@10.
    """
    runs = {f"afm:{s}": {"model": "afm", "seed": s} for s in afm_seeds}
    runs.update({f"afm:{afm_seeds[0]} {k}={v}": {"model": "afm", "seed": afm_seeds[0], k: v} for k, v in afm_grid})
    runs["attention-fm"] = {"model": "attention-fm", "seed": 0}
    runs["two-tower"] = {"model": "two-tower", "seed": 0, "two_tower_loss": "softmax"}
    runs["two-tower-no-logq"] = {**runs["two-tower"], "two_tower_logq": False}  # what the logQ correction adds
    runs.update({f"two-tower {k}={v}": {**runs["two-tower"], k: v} for k, v in two_tower_grid})
    return runs


def train_one(name: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (a worker or the main one, one torch thread either way): its row of the result file."""
    setup_logging()  # the loop's line per epoch: these runs take long
    quiet_libraries()
    cfg = Config.from_dict(cfg_dict)
    info = init_distributed("cpu")
    start = time.perf_counter()
    splits = load_splits(cfg)
    load_seconds = time.perf_counter() - start
    trained = fit(cfg, splits, seeded_model(cfg, splits.schema), info, tag=name)
    test = summarize(predict(trained.module, splits.test, splits.schema, cfg.batch_size, info), splits.test.labels)
    row: dict[str, Any] = {
        "name": name, "model": cfg.model, "seed": cfg.seed, "command": harness.train_command(cfg),
        "test": test, "best": trained.best, "best_epoch": trained.best.get("epoch"),
        "epochs_run": len(trained.history), "history": trained.history,
        "epoch_seconds": trained.seconds / max(len(trained.history), 1), "train_seconds": trained.seconds,
        "load_seconds": load_seconds, "config": cfg.to_dict(),
    }
    if model_spec(cfg.model).retrieval:
        row["retrieval"] = retrieval_metrics(trained.model, splits, info, ks=RETRIEVAL_KS)
    row["seconds"] = time.perf_counter() - start
    row["load_avg_1m"] = os.getloadavg()[0]  # the machine is shared: its load when this run ended, next to its seconds
    return row


def cache_path(cache: Path, cfg: dict[str, Any]) -> Path:
    """Where a finished run is kept: by its whole config, so a what-if run never replaces the default one."""
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return cache / data_name(cfg["data"]) / f"{cfg['model']}-seed{cfg['seed']}-{digest}.json"


def run_all(todo: dict[str, dict[str, Any]], cache: Path, processes: int, fresh: bool) -> dict[str, dict[str, Any]]:
    """Every run's row, reusing a cached row made by the same config."""
    rows: dict[str, dict[str, Any]] = {}
    missing = {}
    for name, cfg in todo.items():
        cached = cache_path(cache, cfg)
        if not fresh and cached.exists():
            rows[name] = {**json.loads(cached.read_text()), "name": name}
            print(f"{name}: reused {cached}")
        else:
            missing[name] = cfg
    if not missing:
        return rows
    print(f"training {list(missing)} on {min(processes, len(missing))} process(es) of 1 torch thread", flush=True)

    tasks = list(missing.items())

    def keep(i: int, row: dict[str, Any]) -> None:  # as each run finishes, so an interrupted benchmark keeps it
        name = tasks[i][0]
        write_json(row, cache_path(cache, row["config"]))
        rows[name] = row
        print(f"{name}: test NE {row['test']['ne']:.4f}  AUC {row['test']['auc']:.4f}  best epoch {row['best_epoch']} "
              f"of {row['epochs_run']}  {row['epoch_seconds']:.0f} s/epoch", flush=True)

    harness.run_pool(train_one, tasks, processes, threads=1, on_result=keep)
    return rows


def floor(data: str) -> dict[str, Any] | None:
    """The committed logistic-regression floor on this data, if there is one."""
    path = RESULTS / f"linear_baseline_{data_name(data)}.json"
    if not path.exists():
        return None
    lin = json.loads(path.read_text())
    return {"file": str(path.relative_to(ROOT)), "C": lin["C"], "test_ne": lin["test"]["ne"], "test_auc": lin["test"]["auc"],
            "valid_ne": lin["valid"]["ne"], "command": f"python benchmarks/linear_baseline.py --data {data}"}


def afm_summary(rows: list[dict[str, Any]], lr_floor: dict[str, Any] | None) -> dict[str, Any]:
    """Mean and range over the AFM seeds, and how far below the floor's test NE they are."""
    ne = np.array([r["test"]["ne"] for r in rows])
    auc = np.array([r["test"]["auc"] for r in rows])
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in rows],
        "test_ne": {"mean": float(ne.mean()), "min": float(ne.min()), "max": float(ne.max())},
        "test_auc": {"mean": float(auc.mean()), "min": float(auc.min()), "max": float(auc.max())},
        "best_epochs": [r["best_epoch"] for r in rows],
        "epoch_seconds_mean": float(np.mean([r["epoch_seconds"] for r in rows])),
    }
    if lr_floor is not None:
        out["ne_below_floor"] = {"mean": lr_floor["test_ne"] - float(ne.mean()), "worst_seed": lr_floor["test_ne"] - float(ne.max())}
        out["ne_below_floor_pct"] = 100 * (lr_floor["test_ne"] - float(ne.mean())) / lr_floor["test_ne"]
    return out


def afm_grid(rows: dict[str, dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The AFM what-ifs of `seed` and its defaults, best validation NE first (test is not looked at)."""
    mine = [n for n in rows if n == f"afm:{seed}" or n.startswith(f"afm:{seed} ")]
    out = [{"run": n, "setting": n.split(" ", 1)[1] if " " in n else "train.py defaults", "valid_ne": rows[n]["best"]["valid_ne"],
            "best_epoch": rows[n]["best_epoch"], "epochs_run": rows[n]["epochs_run"]} for n in mine]
    return sorted(out, key=lambda g: g["valid_ne"])


def two_tower_grid(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The TwoTower what-ifs and its defaults, best validation recall@10 first (test is not looked at)."""
    mine = [n for n in rows if n == "two-tower" or n.startswith("two-tower ")]
    out = [{"run": n, "setting": n.split(" ", 1)[1] if " " in n else "train.py defaults",
            "valid_recall@10": rows[n]["best"]["valid_recall@10"], "best_epoch": rows[n]["best_epoch"],
            "epochs_run": rows[n]["epochs_run"]} for n in mine]
    return sorted(out, key=lambda g: -g["valid_recall@10"])


def grid_setting(text: str) -> tuple[str, Any]:
    """"table_lr=0.15" -> ("table_lr", 0.15), typed like Config's field; only train.py's training flags."""
    name, _, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in TRAIN_FLAGS or not value:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of {', '.join(TRAIN_FLAGS)}, got {text!r}")
    return name, type(getattr(Config(), name))(value.strip())


def data_name(data: str) -> str:
    return Path(data).stem if Path(data).suffix else re.sub(r"[^A-Za-z0-9._-]+", "_", data)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens-1m", help="any train.py --data (default movielens-1m)")
    add_config_flags(ap, TRAIN_FLAGS)
    harness.add_seeds_flag(ap, "0,1,2", flag="--afm-seeds", what="the AFM runs")
    ap.add_argument("--afm-grid", default=AFM_GRID, type=lambda v: [grid_setting(t) for t in v.split(",") if t.strip()],
                    help="comma-separated FIELD=VALUE what-ifs, each one AFM run (first seed) with that one train.py flag "
                         "changed, compared on validation NE; the best, if better than the defaults, is trained on every "
                         "AFM seed ('' for none)")
    ap.add_argument("--two-tower-grid", default=TWO_TOWER_GRID, type=lambda v: [grid_setting(t) for t in v.split(",") if t.strip()],
                    help="comma-separated FIELD=VALUE what-ifs of the TwoTower, each one run compared on validation recall@10 ('' for none)")
    ap.add_argument("--runs", default="", help="comma-separated run names to train (default all: afm:S..., attention-fm, "
                                               "two-tower); the others are kept from the result file")
    ap.add_argument("--processes", type=int, default=2, help="processes training runs side by side")
    ap.add_argument("--fresh", action="store_true", help="train again even where --cache holds the same run")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "baselines"), help="where each finished run is kept for reuse")
    ap.add_argument("--out", default="", help="result JSON (default benchmarks/results/baselines_<data>.json)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(parse(argv), argv)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    grids = {"afm_grid": [f"{k}={v}" for k, v in args.afm_grid], "two_tower_grid": [f"{k}={v}" for k, v in args.two_tower_grid]}
    bench = harness.start(__file__, argv, {**vars(args), **grids}, torch_threads=1, processes=args.processes)
    out = Path(args.out) if args.out else RESULTS / f"baselines_{data_name(args.data)}.json"
    old = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in TRAIN_FLAGS})  # not --out, a Config field too
    seeds = args.afm_seeds

    def configs(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {n: config_from(flags, data=args.data, quiet=True, **fields).to_dict() for n, fields in runs.items()}

    cfgs = configs(plan(seeds, args.afm_grid, args.two_tower_grid))
    names = [n.strip() for n in args.runs.split(",") if n.strip()] or list(cfgs)
    unknown = [n for n in names if n not in cfgs]
    if unknown:
        raise SystemExit(f"unknown --runs {unknown}; known: {list(cfgs)}")
    rows = {**old.get("runs", {}), **run_all({n: cfgs[n] for n in names}, Path(args.cache), args.processes, args.fresh)}
    grid = afm_grid(rows, seeds[0]) if args.afm_grid else []
    picked = grid[0]["setting"] if grid and " " in grid[0]["run"] else None
    if picked:  # the grid's best on validation beats the defaults: train it on every AFM seed
        k, v = grid_setting(picked)
        more = configs({f"afm:{s} {picked}": {"model": "afm", "seed": s, k: v} for s in seeds})
        cfgs.update(more)
        rows.update(run_all(more, Path(args.cache), args.processes, args.fresh))
    rows = {n: rows[n] for n in [*cfgs, *rows] if n in rows}  # this plan's order, then earlier runs it does not name
    lr_floor = floor(args.data)
    afm = [r for n, r in rows.items() if r["model"] == "afm" and " " not in n]
    afm_picked = [rows[f"afm:{s} {picked}"] for s in seeds] if picked else []
    result = harness.write_result(out, bench, {
        "data": args.data,
        "linear_floor": lr_floor,
        "afm": afm_summary(afm, lr_floor) if afm else None,
        "afm_grid": grid,
        "two_tower_grid": two_tower_grid(rows) if args.two_tower_grid else [],
        "afm_picked": {"setting": picked, **afm_summary(afm_picked, lr_floor)} if afm_picked else None,
        "runs": rows,
    })
    table = [{"run": n, "ne": r["test"]["ne"], "auc": r["test"]["auc"], "best_epoch": r["best_epoch"],
              "s/epoch": r["epoch_seconds"], **{k: r.get("retrieval", {}).get(k, "") for k in ("recall@10", "popularity_recall@10")}}
             for n, r in rows.items()]
    if lr_floor:
        table.append({"run": "logistic regression", "ne": lr_floor["test_ne"], "auc": lr_floor["test_auc"]})
    print(format_table(table, ["run", "ne", "auc", "best_epoch", "s/epoch", "recall@10", "popularity_recall@10"],
                       title=f"{args.data} test split"))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
