"""Ning et al. 2021 (federated retrieval with limited negatives) on the paper's own protocol.

Task, model and protocol are those of google-research/federated `dual_encoder/`: next-item
prediction on MovieLens-1M (context = the previous up to 10 movies, label = the next one;
timelines under 3 dropped; at most 300 examples per user; users split 80/10/10), a dual encoder
over ONE item table of dimension 16 (context tower: mean of the context embeddings -> dense 16 +
ReLU; label tower: the embedding; cosine), recall@1/5/10 over the full catalog. Centralized:
Adam 0.01, batch 16, early-stopped on validation recall@10. Federated: 1 client = 1 user,
100 clients a round, local batch 16 (the last partial batch dropped), 1 local epoch, client SGD 0.01,
whole-model deltas averaged by example counts, server Adam 1.0 (Keras' betas and epsilon 1e-7), rounds
while validation recall@10 improves. Most-popular is scored on the same test examples.

Grid: LOSSES x {centralized, federated} x seeds. Every run writes its own file under
`--runs-dir` (a rerun skips runs whose file is there with the same settings), and the merged
summary goes to `--out`:

    python benchmarks/ning_protocol.py                                   # the whole grid, 3 seeds
    python benchmarks/ning_protocol.py --modes federated --losses batch_softmax --seeds 0, --rounds 20  # one timed run
    python benchmarks/ning_protocol.py --quick --data movielens:/tmp/fake --out /tmp/n.json           # the test's

summary = {"most_popular": {"recall@10": mean, ...}, LOSS: {"federated": {"recall@10": {"mean", "ci95"}, ...},
"centralized": {...}, "gain_over_batch_softmax_pct": {...}, "gap_to_centralized_pct": {...}}, "server_lr": {LOSS: {"chosen",
"candidates"}}}; gain = 100 (fed - fed_batch_softmax) / fed_batch_softmax and gap = 100 (central - fed) / central, per seed.

Cost. A round's 100 clients train side by side (`--parallel-clients 100`, the default; 0 trains them one
after another, the reference path). Measured once per loss on MovieLens-1M (4832 training users, 3706
items; 3 rounds, seed 0, nice 15, load average 15-18 on the 2-core machine from other work), seconds per
round of 100 clients, validation excluded:

    loss              side by side                                   one by one (earlier session, load ~9)
    batch_softmax     1.3 (full-table updates; 1.09 touched rows)    18.8 (touched rows)
    hinge_spreadout   6.2                                            49

A validation (recall@10 of ~10% of the users' examples over the whole catalog) took 6.6 s. Measured
whole runs (the `seconds` of the run files, Intel Xeon, 2 cores, 2-4 grid processes side by side): federated
batch_softmax 135-139 s for 200 rounds, global_softmax 660-673 s, hinge_spreadout 530-630 s, spreadout
190-220 s (it stops at round 10-20: it learns nothing); centralized batch_softmax 847 s (150,000 steps, the kept state at 100,000),
global_softmax 1,966 s (240,000 steps, the kept state at 190,000). So a seed is about 1 h federated (two server learning rates on the
first seed: 1.5 h) and 1-2 h centralized, 6-8 h for the whole 3-seed grid on one core: a grid spans sessions
(one file per run under --runs-dir, committed; --merge-only summarizes the runs there are).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import harness
import numpy as np

from c2al.data.sequences import NextItemSplits, movielens_dir, next_item_splits, read_timelines
from c2al.eval.next_item import KS, label_ranks, popularity, recall_metrics
from c2al.eval.report import write_json
from c2al.jobs.next_item import LOSSES, FederatedSettings, NextItemLoss, fit_centralized, fit_federated

MODES = ("centralized", "federated")
METRICS = tuple(f"recall@{k}" for k in KS) + ("mean_rank",)
# local_batch 4: the test's users hold 9 examples, and clients drop their last partial batch (as TFF's)
QUICK = {"rounds": 3, "eval_every": 1, "patience": 2, "clients_per_round": 4, "centralized_eval_every": 20, "max_evals": 2,
         "local_batch": 4}


@functools.lru_cache(maxsize=4)
def splits_for(data: str, seed: int) -> NextItemSplits:
    """The next-item splits of `data` with the users split by `seed` (cached per process)."""
    return next_item_splits(read_timelines(movielens_dir(data)), seed, name=data)


def run_one(data: str, mode: str, loss: str, seed: int, settings: dict[str, Any], path: str) -> dict[str, Any]:
    """Train one grid cell and write its result file (module level: the pool's workers import it).

    Args:
        data: the --data value.
        mode: centralized or federated.
        loss: one of LOSSES.
        seed: model init, batch order and the user split.
        settings: the run's knobs (args_settings).
        path: its result file.

    Returns:
        The result written.
    """
    splits = splits_for(data, seed)
    spec = NextItemLoss(loss, table_spreadout=settings.get("table_spreadout", 0.0))
    if mode == "centralized":
        out = fit_centralized(splits, spec, seed, eval_every=settings["centralized_eval_every"],
                              patience=settings["patience"], max_evals=settings["max_evals"])
    else:
        fed = FederatedSettings(clients_per_round=settings["clients_per_round"], server_lr=settings["server_lr"],
                                rounds=settings["rounds"], eval_every=settings["eval_every"], patience=settings["patience"],
                                parallel_clients=settings.get("parallel_clients", FederatedSettings().parallel_clients),
                                local_batch=settings.get("local_batch", FederatedSettings().local_batch))
        out = fit_federated(splits, spec, seed, fed)
    # the grid's knobs are what a rerun compares; fit_federated's own settings (every FederatedSettings field) sit beside them
    extra = {"federated_settings": out.pop("settings")} if "settings" in out else {}
    result = {"data": data, "mode": mode, "loss": loss, "seed": seed, **out, **extra, "settings": settings}
    write_json(result, path)
    return result


def most_popular(data: str, seed: int) -> dict[str, float]:
    """The training labels' popularity list scored on the seed's test examples (the same ones the models face)."""
    s = splits_for(data, seed)
    return recall_metrics(label_ranks(popularity(s.train.item_ids, s.num_items), s.test.item_ids - 1))


def _pct(new: float, base: float) -> float | None:
    return None if not base else 100.0 * (new - base) / base


def summarize(results: Sequence[dict[str, Any]], popular: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Per loss and mode the seeds' test metrics as intervals; the gain over in-batch softmax and the gap to centralized.

    Args:
        results: run results ({"mode", "loss", "seed", "test": metrics}).
        popular: seed -> most-popular test metrics.

    Returns:
        The summary (module docstring).
    """
    test = {(r["mode"], r["loss"], r["seed"]): r["test"] for r in results}
    seeds = sorted(popular)
    summary: dict[str, Any] = {"most_popular": {m: float(np.mean([popular[s][m] for s in seeds])) for m in METRICS}}
    summary["most_popular"]["recall@10_interval"] = harness.interval([popular[s]["recall@10"] for s in seeds])
    for loss in LOSSES:
        row: dict[str, Any] = {}
        for mode in MODES:
            cells = [test.get((mode, loss, s)) for s in seeds]
            if any(c is not None for c in cells):
                row[mode] = {m: harness.interval([c[m] if c else None for c in cells]) for m in METRICS}
        fed = [test.get(("federated", loss, s), {}).get("recall@10") for s in seeds]
        base = [test.get(("federated", "batch_softmax", s), {}).get("recall@10") for s in seeds]
        cen = [test.get(("centralized", loss, s), {}).get("recall@10") for s in seeds]
        row["gain_over_batch_softmax_pct"] = harness.interval([_pct(f, b) if f is not None and b is not None else None for f, b in zip(fed, base)])
        # the paper's "relative gap to centralized": how far below the centralized recall the federated one is, as a share of it
        row["gap_to_centralized_pct"] = harness.interval([-_pct(f, c) if f is not None and c is not None and c else None
                                                          for f, c in zip(fed, cen)])
        if "federated" in row:
            row["federated_above_most_popular"] = bool(row["federated"]["recall@10"]["mean"] > summary["most_popular"]["recall@10"])
        summary[loss] = row
    return summary


def table(summary: dict[str, Any]) -> str:
    """The README's markdown table: test recall@10 per loss and mode, gain and gap."""
    cell = harness.format_interval

    lines = [f"most-popular test recall@10: {summary['most_popular']['recall@10']:.4f}", "",
             "| loss | centralized recall@10 | federated recall@10 | gain over batch softmax (%) | gap to centralized (%) "
             "| server lr: first seed's valid recall@10 | seeds (centralized / federated) |",
             "|---|---|---|---|---|---|---|"]
    for loss in LOSSES:
        r, lr = summary[loss], summary.get("server_lr", {}).get(loss)
        trials = "" if not lr else ", ".join(f"{'**' + k + '**' if float(k) == lr['chosen'] else k}: {v['valid_recall@10']:.4f}"
                                             for k, v in lr["candidates"].items())
        lines.append(f"| {loss} | {cell(r.get('centralized', {}).get('recall@10'))} | {cell(r.get('federated', {}).get('recall@10'))} "
                     f"| {cell(r['gain_over_batch_softmax_pct'], '{:.1f}')} | {cell(r['gap_to_centralized_pct'], '{:.1f}')} | {trials} "
                     f"| {r.get('centralized', {}).get('recall@10', {}).get('n', 0)} / {r.get('federated', {}).get('recall@10', {}).get('n', 0)} |")
    return "\n".join(lines)


CENTRALIZED_KNOBS = ("centralized_eval_every", "max_evals", "patience", "table_spreadout")
FEDERATED_KNOBS = ("rounds", "eval_every", "patience", "clients_per_round", "parallel_clients", "table_spreadout", "local_batch")


def settings_of(args: argparse.Namespace, mode: str, server_lr: float | None = None) -> dict[str, Any]:
    """The knobs that make one `mode` run's numbers (saved in its run file; a rerun reuses a file only if they match).

    A centralized run's file holds only centralized knobs, so a change of the federated settings
    (or of the server learning rates tried) leaves the centralized runs done.
    """
    every = {k: getattr(args, k, None) for k in CENTRALIZED_KNOBS + FEDERATED_KNOBS}
    every = {**every, **QUICK} if args.quick else every
    knobs = CENTRALIZED_KNOBS if mode == "centralized" else FEDERATED_KNOBS
    out = {k: every[k] for k in knobs if every.get(k) is not None}
    return out if mode == "centralized" else {**out, "server_lr": server_lr}


def _lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--server-lr: expected comma-separated numbers, got {text!r}") from None
    if not lrs or any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise argparse.ArgumentTypeError(f"--server-lr: expected distinct numbers > 0, got {text!r}")
    return lrs


def choose_server_lr(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per loss, the server learning rate whose first-seed federated run has the highest validation recall@10.

    Args:
        results: the first seed's federated runs ({"loss", "settings": {"server_lr"}, "valid", "test"}), one per candidate.

    Returns:
        {loss: {"chosen": lr, "candidates": {lr as text: {"valid_recall@10", "test_recall@10", "kept_round"}}}};
        a tie keeps the candidate listed first.
    """
    out: dict[str, Any] = {}
    for r in results:
        row = out.setdefault(r["loss"], {"chosen": None, "candidates": {}})
        lr = r["settings"]["server_lr"]
        row["candidates"][f"{lr:g}"] = {"valid_recall@10": r["valid"]["recall@10"], "test_recall@10": r["test"]["recall@10"],
                                        "kept_round": r.get("kept_round")}
        best = row["candidates"].get(f"{row['chosen']:g}") if row["chosen"] is not None else None
        if best is None or r["valid"]["recall@10"] > best["valid_recall@10"]:
            row["chosen"] = lr
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    fed = FederatedSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens-1m", help="movielens-1m (the bundled copy), movielens:/dir or a MovieLens directory")
    harness.add_seeds_flag(ap, "0,1,2")
    ap.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of centralized,federated")
    ap.add_argument("--rounds", type=int, default=fed.rounds, help="most federated rounds")
    ap.add_argument("--eval-every", type=int, default=fed.eval_every, help="federated rounds between validations")
    ap.add_argument("--patience", type=int, default=fed.patience, help="validations without a higher recall@10 before stopping")
    ap.add_argument("--clients-per-round", type=int, default=fed.clients_per_round)
    ap.add_argument("--server-lr", dest="server_lrs", type=_lrs, default=[0.1, fed.server_lr],
                    help="the server Adam's learning rate; a comma list is a choice made on validation: the first seed runs "
                         "every value, each loss keeps the one with the highest validation recall@10 and the other seeds run "
                         f"that one (default 0.1,{fed.server_lr:g}: their TFF command's {fed.server_lr:g} and a tenth of it)")
    ap.add_argument("--parallel-clients", type=int, default=fed.parallel_clients,
                    help="a round's clients trained side by side (0: one after another, the reference path)")
    ap.add_argument("--table-spreadout", type=float, default=0.0,
                    help="spread-out over the whole item table added to every loss (their Keras embedding regularizer; "
                         "their README's TFF command: 0.001)")
    ap.add_argument("--centralized-eval-every", type=int, default=10_000, help="centralized steps between validations")
    ap.add_argument("--max-evals", type=int, default=100, help="most centralized validations")
    ap.add_argument("--workers", type=int, default=1, help="runs side by side (one torch thread each)")
    ap.add_argument("--quick", action="store_true", help=f"tiny settings for the test: {QUICK}")
    ap.add_argument("--merge-only", action="store_true",
                    help="merge the run files there are and list the rest as missing_runs; run nothing (a grid still under way)")
    ap.add_argument("--out", default=str(harness.RESULTS / "ning_protocol.json"))
    ap.add_argument("--runs-dir", default="", help="one file per run (default: <out without .json>/)")
    args = ap.parse_args(argv)
    for flag, chosen, known in (("--losses", args.losses, LOSSES), ("--modes", args.modes, MODES)):
        bad = [x for x in chosen.split(",") if x not in known]
        if bad:
            ap.error(f"{flag}: unknown {bad}; choose from {','.join(known)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    runs_dir = Path(args.runs_dir or Path(args.out).with_suffix(""))
    modes, losses, first = args.modes.split(","), args.losses.split(","), args.seeds[0]
    config = {"data": args.data, "seeds": args.seeds, "server_lrs": args.server_lrs,
              **{m: settings_of(args, m, None) for m in MODES}}
    run = harness.start(__file__, argv, config=config, workers=args.workers)

    def task(mode: str, loss: str, seed: int, lr: float | None = None) -> tuple[Any, ...]:
        name = f"{mode}_{loss}_seed{seed}.json" if lr is None else f"{mode}_{loss}_lr{lr:g}_seed{seed}.json"
        return args.data, mode, loss, seed, settings_of(args, mode, lr), str(runs_dir / name)

    missing: list[str] = []

    def finish(tasks: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:  # run what no file with the same settings holds
        done, todo = harness.split_finished(tasks)  # each task carries its mode's settings
        if args.merge_only:
            missing.extend(Path(t[-1]).stem for t in todo)
            return done
        return done + harness.run_pool(run_one, todo, workers=args.workers)

    fed = "federated" in modes
    trials = finish([task("federated", loss, first, lr) for loss in losses for lr in args.server_lrs] * fed
                    + [task("centralized", loss, s) for s in args.seeds for loss in losses] * ("centralized" in modes))
    lr_choice = choose_server_lr([r for r in trials if r["mode"] == "federated"])  # --merge-only: among the candidates there are
    for row in lr_choice.values():
        row["complete"] = len(row["candidates"]) == len(args.server_lrs)
    settled = [loss for loss in losses if lr_choice.get(loss, {}).get("complete")]  # the other seeds wait for the whole choice
    later = finish([task("federated", loss, s, lr_choice[loss]["chosen"]) for s in args.seeds[1:] for loss in settled] * fed)
    missing += [f"federated_{loss}_seed{s} (its server lr not chosen yet)" for s in args.seeds[1:] for loss in losses
                if fed and loss not in settled]
    chosen = [r for r in trials if r["mode"] == "centralized" or r["settings"]["server_lr"] == lr_choice[r["loss"]]["chosen"]] + later
    popular = {s: most_popular(args.data, s) for s in args.seeds}
    summary = {**summarize(chosen, popular), "server_lr": lr_choice}
    keep = [{k: r[k] for k in ("mode", "loss", "seed", "valid", "test", "seconds") if k in r}
            | {k: r[k] for k in ("rounds", "kept_round", "steps") if k in r}
            | ({"server_lr": r["settings"]["server_lr"]} if r["mode"] == "federated" else {}) for r in trials + later]
    losses_used = dataclasses.asdict(NextItemLoss(table_spreadout=args.table_spreadout))
    result = harness.write_result(args.out, run, {"summary": summary, "most_popular_per_seed": popular, "runs": keep,
                                                  "table": table(summary), "loss_settings": losses_used, "missing_runs": missing})
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
