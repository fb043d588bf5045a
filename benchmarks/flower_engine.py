"""Wall time of the Flower engine against the in-process engine on the same federated job.

Declared grid, one process and one train.py command per row:

  simulation       python train.py --federated --rounds R --data D
  flower_1_actor   ... --engine flower --num-actors 1
  flower_2_actors  ... --engine flower --num-actors 2

Each row runs train.main in a fresh process (`--row NAME` runs one alone and
prints it as JSON). Recorded per row: total wall time from the process start,
the Flower engine's phases from its timing line (start-up until the first
ClientApp reply: Ray, actors importing torch and reading the data; the rounds;
evaluation on every client; shutdown), seconds per round, when the first
ClientApp replied after the process started, the driver's peak RSS (Ray's actors
are other processes), test NE / AUC, and the load average before, during and
after (the 2-core machines this runs on are shared). The summary checks issue
14's target: Flower total <= 3 x in-process total + 60 s.

  python benchmarks/flower_engine.py                         # MovieLens-100k, 5 rounds
  python benchmarks/flower_engine.py --data movielens-1m
  python benchmarks/flower_engine.py --rows simulation,flower_1_actor --rounds 2 --out /tmp/f.json

Writes benchmarks/results/flower_engine_<data>.json (the harness header, rows, summary).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # before torch and Flower are imported: a row's wall time counts them

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import harness  # noqa: E402

HERE = Path(__file__).resolve()

GRID: dict[str, list[str]] = {
    "simulation": [],
    "flower_1_actor": ["--engine", "flower", "--num-actors", "1"],
    "flower_2_actors": ["--engine", "flower", "--num-actors", "2"],
}
TIMING = re.compile(r"flower timings: (.*)")
FIRST_REPLY = "first ClientApp reply"
MARK = "ROW_JSON "  # the row's line among train.py's and Flower's output


def row_argv(name: str, data: str, rounds: int, out: Path) -> list[str]:
    """train.py's arguments for one row (the README's command, plus where to write)."""
    return ["--federated", "--data", data, "--rounds", str(rounds), *GRID[name], "--quiet", "--out", str(out)]


class Stamps(logging.Handler):
    """Keeps c2al's log lines with the seconds since this process started."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.perf_counter() - T0, record.getMessage()))


def run_row(name: str, data: str, rounds: int) -> dict[str, Any]:
    """One row in this process: train.main on the row's argv, timed from the process start."""
    from c2al.logs import setup_logging

    train = harness.train_py()

    stamps = Stamps()
    setup_logging().addHandler(stamps)
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as out:
        argv = row_argv(name, data, rounds, Path(out))
        rc = train.main(argv)
        wall = time.perf_counter() - T0
        if rc != 0:
            raise SystemExit(f"row {name}: train.py exited with {rc}")
        report = json.loads((Path(out) / "report.json").read_text())
    fed = report["federated"]
    row: dict[str, Any] = {
        "row": name, "command": "python train.py " + " ".join(argv[:-2]), "wall_s": wall,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "ne": report["overall"]["ne"], "auc": report["overall"]["auc"], "train_seconds": fed["train_seconds"]["train"],
        "population": fed["population"], "clients_per_round": fed["clients_per_round"], "config": report["config"],
    }
    history = fed["history"]["train"]
    if "seconds" in history[0]:  # the Flower engine times each round; its first one waits for Ray and the actors
        row["round_s"] = [h["seconds"] for h in history]
        later = sorted(row["round_s"][1:])
        row["per_round_s"] = later[len(later) // 2] if later else row["round_s"][0]
    else:
        row["per_round_s"] = fed["train_seconds"]["train"] / len(history)
    for at, line in stamps.lines:
        if (m := TIMING.search(line)) is not None:
            row["phases"] = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split()) if k.endswith("_s")}
        if FIRST_REPLY in line and "first_reply_after_s" not in row:
            row["first_reply_after_s"] = at
    return row


def load_sampler(stop: threading.Event, seen: list[float], every_s: float = 2.0) -> None:
    while not stop.wait(every_s):
        seen.append(os.getloadavg()[0])


def run_in_process(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """A row in a fresh Python process, with the load average sampled while it runs."""
    cmd = [sys.executable, str(HERE), "--row", name, "--data", args.data, "--rounds", str(args.rounds)]
    seen: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=load_sampler, args=(stop, seen), daemon=True)
    before = os.getloadavg()[0]
    sampler.start()
    done = subprocess.run(cmd, cwd=harness.ROOT, capture_output=True, text=True, timeout=args.timeout)
    stop.set()
    if done.returncode != 0:
        raise SystemExit(f"row {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    row = json.loads(next(line[len(MARK):] for line in done.stdout.splitlines() if line.startswith(MARK)))
    row["load_avg_1m"] = {"before": before, "during_mean": sum(seen) / len(seen) if seen else before,
                          "during_max": max(seen, default=before), "after": os.getloadavg()[0]}
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 14's target per Flower row: total <= 3 x the in-process total + 60 s."""
    by = {r["row"]: r for r in rows}
    out: dict[str, Any] = {}
    if "simulation" not in by:
        return out
    sim = by["simulation"]["wall_s"]
    for r in rows:
        if r["row"] == "simulation":
            continue
        limit = 3 * sim + 60
        out[r["row"]] = {"wall_s": r["wall_s"], "simulation_wall_s": sim, "limit_s": limit, "target_met": r["wall_s"] <= limit,
                         "ratio_to_simulation": r["wall_s"] / sim, "first_reply_after_s": r.get("first_reply_after_s"),
                         "same_ne_as_simulation": abs(r["ne"] - by["simulation"]["ne"]) <= 1e-6 * abs(by["simulation"]["ne"])}
    return out


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'row':<16} {'wall s':>7} {'startup':>8} {'rounds':>7} {'s/round':>8} {'eval':>6} {'1st reply':>9} {'NE':>8} {'load':>5}")
    for r in rows:
        p = r.get("phases", {})
        cells = [p.get("startup_s"), p.get("rounds_s", r["train_seconds"]), r["per_round_s"], p.get("eval_s"), r.get("first_reply_after_s")]
        shown = " ".join(f"{c:>8.1f}" if c is not None else f"{'-':>8}" for c in cells)
        print(f"{r['row']:<16} {r['wall_s']:>7.1f} {shown} {r['ne']:>8.4f} {r['load_avg_1m']['during_mean']:>5.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="movielens-100k", help="train.py --data (movielens-100k, movielens-1m, ...)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds of every row")
    p.add_argument("--rows", default=",".join(GRID), help=f"comma-separated rows of {list(GRID)}")
    p.add_argument("--row", default="", help="run one row in this process and print it as JSON")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a row may take")
    p.add_argument("--out", default="", help="result file (default benchmarks/results/flower_engine_<data>.json)")
    args = p.parse_args(argv)
    if args.row:
        print(MARK + json.dumps(run_row(args.row, args.data, args.rounds)), flush=True)
        return
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(GRID))
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; choose from {list(GRID)}")
    run = harness.start(__file__, argv, {"data": args.data, "rounds": args.rounds, "grid": GRID})
    rows = []
    for name in names:
        print(f">> {name}: python train.py {' '.join(row_argv(name, args.data, args.rounds, Path('OUT')))}", flush=True)
        rows.append(run_in_process(name, args))
    print_rows(rows)
    out = Path(args.out) if args.out else harness.RESULTS / f"flower_engine_{Path(args.data).stem}.json"
    result = harness.write_result(out, run, {"rows": rows, "summary": summarize(rows)})
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
