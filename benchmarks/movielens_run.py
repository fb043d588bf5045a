"""The README's MovieLens-100k numbers: `train.py --aux-cohorts` as a user runs it, recorded.

  python benchmarks/movielens_run.py                 # one process
  python benchmarks/movielens_run.py --nproc 2       # torchrun, 2 processes (gloo on CPU)
  python benchmarks/movielens_run.py --model attention-fm
  python benchmarks/movielens_run.py --federated     # train.py's federated defaults (FedAdam, 200 clients a round,
                                                     # normalized updates, early stopping by rounds)

Runs the job in a subprocess exactly as on the command line (extra flags pass
through), then writes benchmarks/results/c2al_<data>_<model>_<n>proc.json (or
c2al_<data>_<model>_federated.json with --federated): the
harness header (this script's command, commit, machine, load, wall_s), the train.py
command a user types (job_command) and its wall time (job_wall_s), and the job's report (baseline and C2AL test NE
and AUC overall and per mined cohort), without the attention histograms.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import harness

ROOT = harness.ROOT


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=1, help="processes (torchrun) ")
    ap.add_argument("--data", default="movielens-100k")
    ap.add_argument("--model", default="afm")
    ap.add_argument("--out", default="", help="result file (default benchmarks/results/c2al_<data>_<model>_<n>proc.json)")
    args, extra = ap.parse_known_args(argv)
    run = harness.start(__file__, argv, {"nproc": args.nproc, "data": args.data, "model": args.model, "train_flags": extra})
    with tempfile.TemporaryDirectory() as tmp:
        job = [str(ROOT / "train.py"), "--aux-cohorts", "--data", args.data, "--model", args.model, "--quiet", "--out", tmp, *extra]
        if args.nproc > 1:
            torchrun = Path(sys.executable).parent / "torchrun"
            cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(args.nproc), *job]
        else:
            cmd = [sys.executable, *job]
        user_flags = [a for a in job if a not in ("--out", tmp, "--quiet")]  # what a user would type
        shown = (["python"] if args.nproc == 1 else ["torchrun", "--nproc_per_node", str(args.nproc)]) + user_flags
        shown = [a.replace(str(ROOT) + "/", "") for a in shown]
        print(">>", shlex.join(shown), flush=True)
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
        wall = time.perf_counter() - start
        print(res.stdout)
        if res.returncode:
            sys.exit(f"the job failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
        report = json.loads((Path(tmp) / "report.json").read_text())
    report.get("attention", {}).pop("histograms", None)
    compact_federated(report)
    name = Path(args.data).stem if "/" in args.data else args.data
    kind = "federated" if "--federated" in extra else f"{args.nproc}proc"
    path = Path(args.out) if args.out else harness.RESULTS / f"c2al_{name}_{args.model}_{kind}.json"
    # job_command: what a user types (the header's command is this script's); job_wall_s: that job alone
    harness.write_result(path, run, {"job_command": shlex.join(shown), "job_wall_s": wall, "report": report})
    print(f"wrote {path}  ({wall:.0f} s)")


def compact_federated(report: dict[str, Any]) -> None:
    """A federated report's round history kept once, each round's failed clients as counts per reason
    (the job's report.json keeps the client ids; 850 KB of them are not a result file)."""
    fed = report.get("federated")
    if not fed:
        return
    fed.pop("history", None)  # the same rounds as report["history"]
    for rounds in report.get("history", {}).values():
        for r in rounds:
            reasons: dict[str, int] = {}
            for _, why in r.get("failures", []):
                reasons[why] = reasons.get(why, 0) + 1
            r["failures"] = reasons


if __name__ == "__main__":
    main()
