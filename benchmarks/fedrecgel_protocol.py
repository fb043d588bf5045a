"""FedRecGEL (Yu et al., WWW 2026) on the paper's own protocol: NCF with private user rows, one (SAM) step per client.

Protocol of anonymifish/FedRecGEL (read, not copied): implicit feedback (every rating a positive),
users with >= 5 ratings, leave-last-out (the latest rating is the test positive; here the one
before it is held out for validation too), HR@10 / NDCG@10 of the held-out item among 99 sampled
unrated items (drawn once per seed: both arms of a seed face the same candidates); NCF (GMF + MLP,
factor 32, 3 MLP layers) with private user rows and shared item tables + MLP; BCE with 4 fresh
negatives per positive; 100 rounds of 10% of the users; each client takes one plain or one SAM
step (rho 0.02 for the shared and for the private parameters, separately), steps its own rows
with Adam 0.1 and sends its shared gradient; the server averages and applies Adam 0.001
(`c2al.federated.private`). Their data sets (FilmTrust, LastFM-2k, Amazon-Video, QB-article) are
not offline here: MovieLens-1M and -100k (the recbole wheels' copies) stand in.

Reported per arm (plain, sam) over seeds: test HR@10 / NDCG@10 after the last round (the
protocol's fixed budget) and at the evaluation best on validation HR@10 (the paper keeps the best
epoch on test; validation is the honest version), the item-embedding stability between
consecutive evaluations (`federated.embedding_stability` on [item GMF | item MLP] rows: mean
cosine and relative drift), and the sharpness of the final model: the drop of validation HR@10
and of validation -BCE (over the 100 candidates) under random perturbations of the shared
parameters (`c2al.eval.sampled.sharpness`, relative radii RADII, DRAWS draws).

Every run writes its own file under `--runs-dir` (a rerun skips a run whose file holds the same
settings) and the merge goes to `--out`:

    python benchmarks/fedrecgel_protocol.py                              # 2 data sets x 2 arms x 3 seeds
    python benchmarks/fedrecgel_protocol.py --data movielens-100k --arms sam --seeds 0,   # one timed run
    python benchmarks/fedrecgel_protocol.py --quick --data movielens:/tmp/fake --out /tmp/f.json   # the test's

summary = {"plain": {"hr@10": {"mean", "ci95"}, "ndcg@10": {...}, ...}, "sam": {...}, "sam_minus_plain": {...},
"summary_data": the data set those entries are (MovieLens-1M when its grid is complete), DATA: {the same per data
set, and "most_popular": the training popularity ranked on the same candidates}}.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import harness
import numpy as np
import torch
import torch.nn.functional as F

from c2al.data.implicit import LeaveLastOut, leave_last_out, sample_candidates
from c2al.data.sequences import movielens_dir, read_timelines
from c2al.eval.report import write_json
from c2al.eval.sampled import candidate_ranks, hr_ndcg, sharpness
from c2al.federated.private import PrivateRoundSettings, PrivateUsers, SharedServer, train_rounds
from c2al.models.ncf import NCF

log = logging.getLogger("fedrecgel_protocol")
ARMS = ("plain", "sam")
DATA = ("movielens-1m", "movielens-100k")
METRICS = ("hr@10", "ndcg@10")
RADII = (0.01, 0.02, 0.05)
DRAWS = 3
QUICK = {"rounds": 3, "eval_every": 1, "fraction": 0.5, "eval_negatives": 9, "draws": 1}


@functools.lru_cache(maxsize=4)
def split_for(data: str) -> LeaveLastOut:
    """The leave-last-out split of `data` (cached per process)."""
    return leave_last_out(read_timelines(movielens_dir(data)), min_interactions=5, holdout=2)


@functools.lru_cache(maxsize=8)
def candidates_for(data: str, seed: int, n_negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) candidates [U, 1 + n_negatives] of a seed: the same for every arm."""
    s = split_for(data)
    return sample_candidates(s, s.valid, n_negatives, seed=10_000 + seed), sample_candidates(s, s.test, n_negatives, seed=20_000 + seed)


@torch.no_grad()
def score(model: NCF, users: PrivateUsers, candidates: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Logits [U, Q] of every user's candidates (each client could score its own; batched here)."""
    ug, um = users.tables()
    out = np.empty(candidates.shape, np.float32)
    for a in range(0, len(candidates), chunk):
        c = torch.from_numpy(candidates[a: a + chunk])  # [u, Q]
        rows = torch.arange(a, a + len(c)).repeat_interleave(c.shape[1])
        out[a: a + len(c)] = model(ug[rows], um[rows], c.reshape(-1)).view(c.shape).numpy()
    return out


def quality(model: NCF, users: PrivateUsers, candidates: np.ndarray) -> dict[str, float]:
    """HR@10, NDCG@10 and the BCE over the candidates (positive 1, negatives 0) as -bce: higher is better."""
    logits = score(model, users, candidates)
    labels = np.zeros_like(logits)
    labels[:, 0] = 1.0
    bce = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels)))
    return {**hr_ndcg(candidate_ranks(logits), 10), "neg_bce": -bce}


def most_popular(data: str, seed: int, n_negatives: int) -> dict[str, float]:
    """The training positives' popularity scored on the seed's test candidates (ties broken at random, seeded)."""
    s = split_for(data)
    counts = np.bincount(s.items, minlength=s.num_items) + np.random.default_rng(seed).uniform(0, 0.5, s.num_items)
    return hr_ndcg(candidate_ranks(counts[candidates_for(data, seed, n_negatives)[1]]), 10)


def run_one(data: str, arm: str, seed: int, settings: dict[str, Any], path: str) -> dict[str, Any]:
    """Train one (data, arm, seed) and write its result file (module level: the pool's workers import it).

    Args:
        data: a --data value.
        arm: plain or sam.
        seed: model init, client and negative sampling, candidates.
        settings: the run's knobs (settings_of).
        path: its result file.

    Returns:
        The result written.
    """
    from federated import embedding_stability  # the project's stability metric (benchmarks/federated.py)

    split = split_for(data)
    valid_c, test_c = candidates_for(data, seed, settings["eval_negatives"])
    s = replace(PrivateRoundSettings(), **{k: settings[k] for k in ("rounds", "fraction", "server_lr", "client_lr")}, sam=arm == "sam")
    torch.manual_seed(seed)
    model = NCF(split.num_items, factor=32, layers=3)
    users = PrivateUsers(split.num_users, model.factor, model.width, torch.Generator().manual_seed(seed))
    server = SharedServer(model, s.server_lr)
    curve, snapshots = [], []
    start = time.perf_counter()

    def on_round(r: int, loss: float) -> None:
        if r % settings["eval_every"] and r != s.rounds:
            return
        v, t = quality(model, users, valid_c), quality(model, users, test_c)
        curve.append({"round": r, "train_loss": loss, "valid": v, "test": t})
        snapshots.append(torch.cat([model.item_gmf.weight, model.item_mlp.weight], 1).detach().numpy().copy())
        log.info("%s %s seed %d round %d: loss %.4f valid hr@10 %.4f test hr@10 %.4f (%.0f s)", data, arm, seed, r, loss,
                 v["hr@10"], t["hr@10"], time.perf_counter() - start)

    train_rounds(server, users, split, s, seed, on_round)
    train_seconds = time.perf_counter() - start
    best = max(curve, key=lambda c: c["valid"]["hr@10"])
    sharp = sharpness(server.params, lambda: quality(model, users, valid_c), settings["radii"], settings["draws"], seed)
    result = {"data": data, "arm": arm, "seed": seed, "settings": settings, "users": split.num_users, "items": split.num_items,
              "test": {m: curve[-1]["test"][m] for m in METRICS}, "valid": curve[-1]["valid"],
              "test_at_best_valid": {m: best["test"][m] for m in METRICS}, "best_valid_round": best["round"],
              "stability": embedding_stability(snapshots), "sharpness": sharp, "curve": curve,
              "train_seconds": train_seconds, "seconds": time.perf_counter() - start}
    write_json(result, path)
    return result


def _arm_summary(runs: dict[int, dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    def cells(get: Any) -> dict[str, Any]:
        return harness.interval([get(runs[s]) if s in runs else None for s in seeds])

    out: dict[str, Any] = {m: cells(lambda r, m=m: r["test"][m]) for m in METRICS}
    out |= {f"{m}_at_best_valid": cells(lambda r, m=m: r["test_at_best_valid"][m]) for m in METRICS}
    out |= {f"stability_{k}": cells(lambda r, k=k: r["stability"][k]) for k in ("cosine", "drift")}
    radii = next(iter(runs.values()))["sharpness"].keys() if runs else []
    out["sharpness"] = {r: {q: cells(lambda x, r=r, q=q: x["sharpness"][r][q]) for q in ("hr@10", "neg_bce")} for r in radii}
    return out


def summarize(results: Sequence[dict[str, Any]], seeds: Sequence[int], popular: dict[str, dict[int, dict[str, float]]] | None = None) -> dict[str, Any]:
    """Per data set and arm the seeds' intervals; SAM minus plain paired per seed; most-popular beside them.

    The top-level arms are MovieLens-1M's when every seed of both its arms ran, else those of
    the data set with the most runs (`summary_data` names it).

    Args:
        results: run results.
        seeds: the seeds asked for.
        popular: data -> seed -> most-popular test metrics.

    Returns:
        The summary (module docstring).
    """
    summary: dict[str, Any] = {}
    for data in dict.fromkeys(r["data"] for r in results):
        runs = {arm: {r["seed"]: r for r in results if r["data"] == data and r["arm"] == arm} for arm in ARMS}
        row: dict[str, Any] = {arm: _arm_summary(runs[arm], seeds) for arm in ARMS if runs[arm]}
        if all(runs[a] for a in ARMS):
            both = [s for s in seeds if s in runs["plain"] and s in runs["sam"]]
            row["sam_minus_plain"] = {m: harness.interval([runs["sam"][s]["test"][m] - runs["plain"][s]["test"][m] for s in both])
                                      for m in METRICS}
        first = next(r for r in results if r["data"] == data)
        row["users"], row["items"] = first["users"], first["items"]
        row["runs"] = sum(len(runs[a]) for a in ARMS)
        if popular and data in popular:
            row["most_popular"] = {m: harness.interval([popular[data][s][m] for s in seeds if s in popular[data]]) for m in METRICS}
        summary[data] = row
    full = summary.get("movielens-1m", {}).get("runs") == len(ARMS) * len(seeds)
    top = "movielens-1m" if full else max(summary, key=lambda d: summary[d]["runs"], default=None)
    if top is not None:
        summary |= {k: v for k, v in summary[top].items() if k in (*ARMS, "sam_minus_plain")}
        summary["summary_data"] = top
    return summary


def table(summary: dict[str, Any]) -> str:
    """Markdown: per data set and arm, test HR@10 / NDCG@10 (final and at best validation), stability, sharpness."""
    cell = harness.format_interval

    lines = ["| data | arm | HR@10 | NDCG@10 | HR@10 at best valid | item cosine between evals | drift | "
             f"sharpness: valid HR@10 drop at r={RADII[-1]} | valid BCE rise at r={RADII[-1]} |", "|---|---|---|---|---|---|---|---|---|"]
    for data in DATA + tuple(k for k in summary if k not in DATA and isinstance(summary[k], dict) and "users" in summary[k]):
        for arm in ARMS:
            r = summary.get(data, {}).get(arm)
            if not r:
                continue
            sh = r["sharpness"].get(str(RADII[-1]), {})  # drops of quality; the drop of -BCE is the rise of BCE
            lines.append(f"| {data} | {arm} | {cell(r['hr@10'])} | {cell(r['ndcg@10'])} | {cell(r['hr@10_at_best_valid'])} "
                         f"| {cell(r['stability_cosine'])} | {cell(r['stability_drift'])} | {cell(sh.get('hr@10'))} | {cell(sh.get('neg_bce'))} |")
        pop = summary.get(data, {}).get("most_popular")
        if pop:
            lines.append(f"| {data} | most popular (no training) | {cell(pop['hr@10'])} | {cell(pop['ndcg@10'])} | | | | | |")
        d = summary.get(data, {}).get("sam_minus_plain")
        if d:
            lines.append(f"| {data} | sam - plain | {cell(d['hr@10'], '{:+.4f}')} | {cell(d['ndcg@10'], '{:+.4f}')} | | | | | |")
    return "\n".join(lines)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs that make a run's numbers (saved in every run file; a rerun reuses a file only if they match)."""
    out = {k: getattr(args, k) for k in ("rounds", "eval_every", "fraction", "server_lr", "client_lr", "eval_negatives", "draws")}
    out["radii"] = list(RADII)
    return {**out, **QUICK} if args.quick else out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = PrivateRoundSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=",".join(DATA), help="comma-separated: movielens-1m, movielens-100k, movielens:/dir or a MovieLens directory")
    harness.add_seeds_flag(ap, "0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of plain,sam")
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--eval-every", type=int, default=10, help="rounds between evaluations (stability is measured between them)")
    ap.add_argument("--fraction", type=float, default=d.fraction, help="share of users a round")
    ap.add_argument("--server-lr", type=float, default=d.server_lr, help="the server Adam's learning rate")
    ap.add_argument("--client-lr", type=float, default=d.client_lr, help="the private rows' Adam learning rate")
    ap.add_argument("--eval-negatives", type=int, default=99, help="sampled negatives per held-out positive")
    ap.add_argument("--draws", type=int, default=DRAWS, help="random perturbations per sharpness radius")
    ap.add_argument("--workers", type=int, default=1, help="runs side by side (one torch thread each)")
    ap.add_argument("--quick", action="store_true", help=f"tiny settings for the test: {QUICK}")
    ap.add_argument("--merge-only", action="store_true", help="merge the run files there are; run nothing (a grid still under way)")
    ap.add_argument("--out", default=str(harness.RESULTS / "fedrecgel_protocol.json"))
    ap.add_argument("--runs-dir", default="", help="one file per run (default: <out without .json>/, committed beside it so a grid spans sessions)")
    args = ap.parse_args(argv)
    bad = [a for a in args.arms.split(",") if a not in ARMS]
    if bad:
        ap.error(f"--arms: unknown {bad}; choose from {','.join(ARMS)}")
    if args.rounds < 1 or args.eval_every < 1 or args.eval_negatives < 1 or args.draws < 1:
        ap.error("--rounds, --eval-every, --eval-negatives and --draws must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = settings_of(args)
    datas = [d for d in args.data.split(",") if d]
    runs_dir = Path(args.runs_dir or Path(args.out).with_suffix(""))
    run = harness.start(__file__, argv, config={"data": datas, "seeds": args.seeds, **settings,
                                                "protocol": asdict(PrivateRoundSettings())}, workers=args.workers)
    grid = [(d, arm, s, settings, str(runs_dir / f"{Path(d).name.replace(':', '_')}_{arm}_seed{s}.json"))
            for d in datas for s in args.seeds for arm in args.arms.split(",")]
    done, todo = harness.split_finished(grid, settings)
    if args.merge_only:
        log.info("--merge-only: %d of %d runs have a file; %d left out", len(done), len(grid), len(todo))
    else:
        done += harness.run_pool(run_one, todo, workers=args.workers)
    ran = dict.fromkeys(r["data"] for r in done)
    popular = {d: {s: most_popular(d, s, settings["eval_negatives"]) for s in args.seeds} for d in ran}
    summary = summarize(done, args.seeds, popular)
    keep = [{k: r[k] for k in ("data", "arm", "seed", "test", "valid", "test_at_best_valid", "best_valid_round", "stability",
                               "sharpness", "curve", "train_seconds", "seconds")} for r in done]
    result = harness.write_result(args.out, run, {"summary": summary, "runs": keep, "table": table(summary),
                                                  "missing_runs": [Path(t[-1]).stem for t in todo] if args.merge_only else []})
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
