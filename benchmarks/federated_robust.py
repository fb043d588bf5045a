"""Robust aggregation under attack: federated test NE of every --aggregation rule under every --attack.

The declared grid (issue 12 §3): the rules mean, median, trimmed-mean, norm-clip and krum (each with
train.py's default options), each under

  none                 no attacker (the clean run of that rule)
  scale 1e6 @ 5%       5% of clients send their update x 1e6
  sign-flip x10 @ 20%  20% of clients send their update x -10
  nan @ 20%            20% of clients send NaN updates (rejected by the server's check)
  label-flip @ 20%     20% of clients train on flipped labels

Every row is one `python train.py --federated ...` run (its command is recorded), from the same seed,
so a row differs from its rule's clean row only by the attack, and the attackers are the same clients
in every row of an attack. Runs go side by side in --workers spawned processes of one torch thread.

  python benchmarks/federated_robust.py                        # MovieLens-100k: ~20 s CPU a row, ~5 min on 2 idle cores
  python benchmarks/federated_robust.py --rounds 30            # any train.py federated flag, for a what-if
  python benchmarks/federated_robust.py --rules mean,krum --attacks none,scale --out /tmp/r.json

Settings: --rounds 15 (train.py's default is 30; the committed run took 20 min at load average 12-14),
--tiers none (the clean federated model reaches a test NE that says something; with the default
device tiers it stays near the base rate in 15 rounds), --lr 0.01, 50 clients per round.
Writes benchmarks/results/federated_robust.json: per row the test NE and AUC, its change against
the rule's own clean run and against the clean mean (plain FedAvg) run, the updates rejected, the
seconds and the worker's peak memory, the command; the markdown table, after the harness header (the command, commit,
machine and load, wall_s, and the base config).
"""
from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import harness

from c2al.config import Config, add_config_flags, config_from
from c2al.federated.strategy import AGGREGATIONS

ATTACKS: dict[str, dict[str, Any]] = {
    "none": {},
    "scale 1e6 @ 5%": {"attack": "scale", "attack_share": 0.05, "attack_scale": 1e6},
    "sign-flip x10 @ 20%": {"attack": "sign-flip", "attack_share": 0.2, "attack_scale": 10.0},
    "nan @ 20%": {"attack": "nan", "attack_share": 0.2},
    "label-flip @ 20%": {"attack": "label-flip", "attack_share": 0.2},
}
DEFAULTS = {"data": "movielens-100k", "rounds": 15, "clients_per_round": 50, "tiers": "none", "lr": 0.01}
TRAIN_FLAGS = ["seed", "rounds", "clients_per_round", "local_epochs", "local_batch_size", "server_optimizer", "server_lr",
               "tiers", "lr", "table_lr", "trim_fraction", "clip_norm", "krum_f", "count_cap"]
TARGET_PCT = 3.0  # the target: a robust rule keeps test NE within 3% of the clean run


_SPLITS: dict[str, Any] = {}  # per worker: the data, loaded once


def run_row(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """One train.py --federated run in this (worker) process: its test metrics, rejections, time and memory."""
    from c2al.data.sources import load_splits
    from c2al.jobs.federated_job import run_federated

    cfg = Config.from_dict(cfg_dict)
    if cfg.data not in _SPLITS:
        _SPLITS[cfg.data] = load_splits(cfg)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = run_federated(cfg, _SPLITS[cfg.data], Path(out))
    history = report["federated"]["history"]["train"]
    rejected = sum(1 for h in history for _, why in h["failures"] if why.startswith("rejected"))
    return {"ne": report["overall"]["ne"], "auc": report["overall"]["auc"], "rejected_updates": rejected,
            "aggregated_updates": sum(h["aggregated"] for h in history), "seconds": time.perf_counter() - began,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def quiet_worker() -> None:
    """Every rejected NaN update would be a warning line."""
    logging.getLogger("c2al").setLevel(logging.ERROR)


def pct(new: float, base: float) -> float:
    return 100.0 * (new - base) / base


def table(rows: list[dict[str, Any]], attacks: Sequence[str]) -> str:
    """Markdown: a rule per line, an attack per column; each cell test NE (change vs the rule's clean run)."""
    by = {(r["aggregation"], r["setting"]): r for r in rows}
    rules = list(dict.fromkeys(r["aggregation"] for r in rows))
    lines = ["| --aggregation | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for rule in rules:
        cells = []
        for a in attacks:
            r = by.get((rule, a))
            cells.append("" if r is None else f"{r['ne']:.4f}" + ("" if a == "none" else f" ({r['vs_clean_rule_pct']:+.1f}%)"))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULTS["data"], help="any train.py --data")
    add_config_flags(ap, TRAIN_FLAGS)
    ap.add_argument("--rules", default=",".join(AGGREGATIONS), help="comma-separated --aggregation rules")
    ap.add_argument("--attacks", default=",".join(a.split()[0] for a in ATTACKS),
                    help="comma-separated attacks of the grid: " + ", ".join(a.split()[0] for a in ATTACKS))
    ap.add_argument("--workers", type=int, default=2, help="processes running rows side by side")
    ap.add_argument("--out", dest="result", default=str(harness.RESULTS / "federated_robust.json"), help="result JSON")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}  # a train.py flag given here beats DEFAULTS
    base = config_from(args, **{**DEFAULTS, **{k: given[k] for k in DEFAULTS if k in given}, "federated": True, "quiet": True,
                                "workers": 0})  # --workers here are processes of rows, not train.py's forked clients
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    wanted = {a.strip() for a in args.attacks.split(",") if a.strip()}
    attacks = [a for a in ATTACKS if a.split()[0] in wanted or "none" == a]  # the clean run is every row's reference
    grid = [(rule, a) for rule in dict.fromkeys(["mean", *rules]) for a in attacks]
    cfgs = [Config.from_dict({**base.to_dict(), "aggregation": rule, **ATTACKS[a]}).check() for rule, a in grid]
    print(f"{len(cfgs)} runs ({len(rules)} rules x {len(attacks)} attacks) on {base.data}, {args.workers} workers", flush=True)
    run = harness.start(__file__, argv, base.to_dict(), torch_threads=1, workers=args.workers)  # workers import the code as it is now
    done: list[int] = []

    def progress(i: int, res: dict[str, Any]) -> None:
        done.append(i)
        print(f"[{len(done)}/{len(cfgs)}] {grid[i][0]:12s} {grid[i][1]:20s} test NE {res['ne']:.4f} ({res['seconds']:.0f} s)", flush=True)

    results = harness.run_pool(run_row, [(c.to_dict(),) for c in cfgs], args.workers, initializer=quiet_worker, on_result=progress)
    rows = [{"aggregation": rule, "setting": a, "attack": cfg.attack, "attack_share": cfg.attack_share,
             "attack_scale": cfg.attack_scale, **res, "command": harness.train_command(cfg)}
            for (rule, a), res, cfg in zip(grid, results, cfgs)]
    clean = {r["aggregation"]: r["ne"] for r in rows if r["setting"] == "none"}
    for r in rows:
        r["vs_clean_rule_pct"] = pct(r["ne"], clean[r["aggregation"]])
        r["vs_clean_mean_pct"] = pct(r["ne"], clean["mean"])
        r["within_target"] = r["vs_clean_rule_pct"] <= TARGET_PCT
    markdown = table(rows, attacks)
    result = harness.write_result(args.result, run, {"grid": {"rules": rules, "attacks": ATTACKS}, "target_pct": TARGET_PCT,
                                                    "rows": rows, "markdown": markdown})
    print(markdown)
    print(f"wrote {args.result} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
