"""The federated AFM tuned on validation (issue 20 part 4): is its gap to centralized a matter of settings?

`python train.py --federated` keeps server settings chosen on MovieLens-100k. Here every candidate is one
`python train.py --federated --data D --seed S <flags>` run (benchmarks/federated.py's quality part without
its round-cost timing), each written to its own file under --runs-dir. The candidate with the lowest kept
validation NE on the first seed is chosen (test NE never enters the choice), it runs the other seeds, and
its test NE is set against the early-stopped centralized AFM (baselines_<data>.json, 3 seeds).

    python benchmarks/federated_tune.py                                   # MovieLens-1M, CANDIDATES
    python benchmarks/federated_tune.py --candidates "server_lr=0.03,clients_per_round=500"   # one more
    python benchmarks/federated_tune.py --merge-only                      # what the run files there hold

A candidate is comma-separated `flag=value` pairs of train.py flags (underscores or dashes), "" for
train.py's defaults; --candidates separates candidates with ";".

summary = {"chosen": {"flags", "valid_ne", "test_ne": {"mean", "ci95"}, "ne_over_centralized_pct": {"mean",
"ci95"}}, "default": {the same for ""}, "candidates": [{"flags", "valid_ne", "test_ne", "kept_round",
"rounds_run", "wall_seconds"} on the first seed], "centralized_test_ne"}.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import federated
import harness

from c2al.config import Config
from c2al.eval.report import write_json

log = logging.getLogger("federated_tune")
# One knob at a time around train.py's federated defaults (fedadam, server lr 0.01, 200 clients a round,
# 1 local epoch, patience 2 evaluations of 5 rounds): the step size, the round's sample, the stopping rule, local work;
# and the two single changes that lowered validation NE on MovieLens-1M (a smaller server step, more clients), together.
CANDIDATES = ("", "server_lr=0.03", "server_lr=0.003", "clients_per_round=500", "server_lr=0.003,clients_per_round=500",
              "patience=6", "server_lr=0.003,clients_per_round=500,patience=6", "local_epochs=2")


def parse_candidate(text: str) -> dict[str, str]:
    """`"server_lr=0.03,clients-per-round=500"` -> {"server_lr": "0.03", "clients_per_round": "500"}, checked against Config.

    Example:
        >>> parse_candidate("server-lr=0.03, patience=6")
        {'server_lr': '0.03', 'patience': '6'}
        >>> parse_candidate("")
        {}
    """
    out: dict[str, str] = {}
    known = {f for f in Config.__dataclass_fields__}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not value.strip():
            raise SystemExit(f"--candidates: {part!r} is not flag=value")
        if key not in known or key in ("data", "seed", "out", "federated"):
            raise SystemExit(f"--candidates: {key!r} is not a train.py flag a candidate may set")
        if key in out:
            raise SystemExit(f"--candidates: {key!r} is given twice in {text!r}")
        out[key] = value.strip()
    return out


def slug(flags: dict[str, str]) -> str:
    """A candidate's file-name stem: "defaults" or "server-lr-0.03_clients-per-round-500"."""
    return "_".join(f"{k.replace('_', '-')}-{v}" for k, v in flags.items()) or "defaults"


def argv_of(flags: dict[str, str]) -> list[str]:
    return [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), v)]


def run_one(settings: dict[str, Any], path: str) -> dict[str, Any]:
    """One train.py run of a candidate (settings: data, `base` flags, then the candidate's `flags`, seed); its
    result file is written before it returns."""
    data, base, flags, seed = settings["data"], settings["base"], settings["flags"], settings["seed"]
    log.info("running %s seed %d", slug(flags), seed)
    doc, _ = federated.quality(data, [*argv_of({**base, **flags}), "--seed", str(seed)], time_rounds=False)
    out = {"settings": settings, "valid_ne": doc["kept"]["valid_ne"], "test_ne": doc["test"]["ne"], "test_auc": doc["test"]["auc"],
           "kept_round": doc["kept"]["rounds"], "rounds_run": doc["rounds_run"], "wall_seconds": doc["wall_seconds"],
           "centralized_test_ne": doc["centralized_test_ne"], "curve": doc["curve"], "tiers": doc["tiers"]}
    write_json(out, path)
    return out


def arm(runs: Sequence[dict[str, Any]], central: float) -> dict[str, Any]:
    """A candidate over its seeds: test NE and its excess over centralized as intervals, and the first seed's valid NE."""
    return {"flags": runs[0]["settings"]["flags"], "valid_ne": runs[0]["valid_ne"], "seeds": [r["settings"]["seed"] for r in runs],
            "test_ne": harness.interval([r["test_ne"] for r in runs]),
            "ne_over_centralized_pct": harness.interval([100 * (r["test_ne"] / central - 1) for r in runs])}


def summarize(first: Sequence[dict[str, Any]], chosen_runs: Sequence[dict[str, Any]], default_runs: Sequence[dict[str, Any]],
              central: float) -> dict[str, Any]:
    """The summary of the module docstring."""
    keys = ("valid_ne", "test_ne", "kept_round", "rounds_run", "wall_seconds")
    return {"centralized_test_ne": central, "chosen": arm(chosen_runs, central),
            "default": arm(default_runs, central) if default_runs else None,
            "candidates": [{"flags": r["settings"]["flags"], **{k: r[k] for k in keys}} for r in first]}


def table(summary: dict[str, Any]) -> str:
    cell = harness.format_interval
    central = summary["centralized_test_ne"]
    over = "n/a (no baselines_<data>.json)" if central is None or central != central else None
    lines = [f"centralized early-stopped AFM, test NE {over or format(central, '.4f')}", "",
             "| candidate (train.py flags) | kept round of run | valid NE (first seed) | test NE (first seed) | test NE over centralized |",
             "|---|---|---|---|---|"]
    chosen = summary["chosen"]["flags"]
    for c in summary["candidates"]:
        name = " ".join(argv_of(c["flags"])) or "(defaults)"
        name = f"**{name}**" if c["flags"] == chosen else name
        lines.append(f"| {name} | {c['kept_round']} of {c['rounds_run']} | {c['valid_ne']:.4f} | {c['test_ne']:.4f} "
                     f"| {over or format(100 * (c['test_ne'] / central - 1), '+.2f') + '%'} |")
    for label in ("chosen", "default"):
        a = summary.get(label)
        if a:
            lines.append(f"\n{label} ({' '.join(argv_of(a['flags'])) or 'defaults'}), seeds {a['seeds']}: test NE {cell(a['test_ne'])}, "
                         f"over centralized {cell(a['ne_over_centralized_pct'], '{:+.2f}')}%")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens-1m", help="any train.py --data value with a baselines_<data>.json reference")
    ap.add_argument("--base", default="", help="flag=value pairs every candidate starts from (e.g. tiers=none for a what-if)")
    ap.add_argument("--candidates", default=";".join(CANDIDATES),
                    help="';'-separated candidates, each comma-separated flag=value pairs ('' = train.py's defaults)")
    harness.add_seeds_flag(ap, "0,1,2", what="the chosen candidate and the defaults (the first seed chooses)")
    ap.add_argument("--merge-only", action="store_true", help="merge the run files there are; run nothing")
    ap.add_argument("--out", default="", help="default: benchmarks/results/federated_tune_<data>.json")
    ap.add_argument("--runs-dir", default="", help="one file per run (default: <out without .json>/)")
    args = ap.parse_args(argv)
    args.candidate_flags = [parse_candidate(c) for c in args.candidates.split(";")]
    args.base_flags = parse_candidate(args.base)
    if len({slug(c) for c in args.candidate_flags}) != len(args.candidate_flags):
        ap.error("--candidates: a candidate is listed twice")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    name = Path(args.data).name.replace(":", "_")
    out = Path(args.out or harness.RESULTS / f"federated_tune_{name}.json")
    runs_dir = Path(args.runs_dir or out.with_suffix(""))
    run = harness.start(__file__, argv, config={"data": args.data, "base": args.base_flags, "candidates": args.candidate_flags,
                                                  "seeds": args.seeds})

    missing: list[str] = []

    def get(flags: dict[str, str], seed: int) -> dict[str, Any] | None:  # the run's file if it holds these settings, else run it
        task = ({"data": args.data, "base": args.base_flags, "flags": flags, "seed": seed}, str(runs_dir / f"{slug(flags)}_seed{seed}.json"))
        done, _ = harness.split_finished([task])
        if done or args.merge_only:
            missing.extend([] if done else [Path(task[-1]).stem])
            return done[0] if done else None
        return run_one(*task)

    first = [r for r in (get(c, args.seeds[0]) for c in args.candidate_flags) if r is not None]
    if not first:
        raise SystemExit(f"no candidate has a run file in {runs_dir}")
    best = min(first, key=lambda r: r["valid_ne"])
    central = best["centralized_test_ne"]
    chosen = [r for r in [best] + [get(best["settings"]["flags"], s) for s in args.seeds[1:]] if r is not None]
    default = [r for r in (get({}, s) for s in args.seeds) if r is not None] if {} in args.candidate_flags else []
    summary = summarize(first, chosen, default, central)
    result = harness.write_result(out, run, {"summary": summary, "table": table(summary), "missing_runs": missing})
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
