"""RF^2 (Maeng et al., RecSys 2022) on the paper's own protocol: how unfair is excluding low-end devices?

Task, model and protocol are those of facebookresearch/RF2 (`run.py`, `fl_libs/`, `dlrm/data_utils.py`):
click = rating 5 on MovieLens; features movie id, its genres and the user's last 10 clicked
movies (no user id); per-user temporal 90/10 split (`c2al.data.rf2`); a DLRM (embedding 16,
bottom MLP [16], top MLP [256], dot interactions; `c2al.models.dlrm`). Federated: 1 client =
1 user, 100 clients a round, 1 local epoch of one full-batch step, client SGD lr 1.0, server
Adagrad lr 0.1 on the sample-weighted mean of the clients' deltas, rounds = one pass over the
shuffled clients per global epoch (their `--num-global-epochs`, 1 by default), L2 1e-6 on the
embeddings (deepctr's `l2_reg_embedding`).

One full-batch SGD step per client makes the round exact to compute as one step: client c sends
lr * grad of its mean loss, and RF^2's weighting sum_c n_c d_c / sum_c n_c is lr * the gradient of
the mean loss over the round's pooled rows (the L2 term is the same on every client). So a round
here is one forward/backward over the selected clients' rows, then the server Adagrad;
tests/test_rf2_protocol.py checks it against the project's `LocalTrainer` clients. FedProx's
pull mu (w - w_global) is zero at the only local step, so the fedprox arm equals the baseline
by construction (it is run, and measured so).

Tiers (`c2al.federated.heterogeneity`): independent (clients by training rows, tier = rank mod 3)
or correlated (RF^2's Dirichlet(0.005) walk over items by popularity). Arms: base (no
optimization), exclude_low (tier 0 never trains; RF^2's `--exclude-low`), over_selection (130
selected, the 30 slowest dropped, low tier first; `--overselect 0.3`), fedprox (mu 0.01). Every
tier is tested on its users' test rows. Per tier delta_t = (AUC_opt - AUC_base) / AUC_base
(NE beside it); MDAC = max |delta_i - delta_j|; the ratio MDAC(correlated) / MDAC(independent),
per seed, then intervals over seeds. Paper: 15.8x (MovieLens-20M) to 41x (Taobao) for exclude_low.

    python benchmarks/rf2_protocol.py                                  # the grid, 3 seeds, MovieLens-1M
    python benchmarks/rf2_protocol.py --data movielens:/data/ml-20m    # the paper's data set, where you have it
    python benchmarks/rf2_protocol.py --arms base --tiers independent --seeds 0,   # one timed run
    python benchmarks/rf2_protocol.py --quick --data movielens:/tmp/fake --out /tmp/r.json   # the test's

summary = {OPT: {"independent": {"mdac": {"mean", "ci95"}, "mdac_ne": {...}, "delta_auc": {tier: {...}}},
"correlated": {...}, "ratio": {"mean", "ci95"}, "ratio_of_means": x}} for OPT in exclude_low, over_selection, fedprox.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import harness
import numpy as np
import torch

from c2al.data.batch import make_batch
from c2al.data.rf2 import ClickSplits, rf2_click_splits
from c2al.data.sequences import movielens_dir
from c2al.eval.metrics import auc, ne
from c2al.eval.report import write_json
from c2al.federated.aggregate import mdac
from c2al.federated.heterogeneity import TIERS, overselect_round, rf2_dirichlet_tiers, rf2_independent_tiers
from c2al.federated.optim import DenseOptimizer
from c2al.models.dlrm import build_dlrm
from c2al.train.task import TrainModule, predict

log = logging.getLogger("rf2_protocol")
TIER_MODES = ("independent", "correlated")
ARMS = ("base", "exclude_low", "over_selection", "fedprox")
OPTS = ARMS[1:]
PAPER = {"movielens-20m": 15.8, "taobao": 41.0}  # MDAC(correlated) / MDAC(independent) of exclude_low, RF^2 Table 3
DEFAULTS = {"clients_per_round": 100, "client_lr": 1.0, "server_lr": 0.1, "epochs": 1, "overselect": 0.3,
            "proximal_mu": 0.01, "alpha": 0.005, "l2_embedding": 1e-6, "valid_frac": 0.0, "patience": 1}
QUICK = {"clients_per_round": 4, "epochs": 2}


# ---------------------------------------------------------------- data and clients


@functools.lru_cache(maxsize=2)
def splits_for(data: str, valid_frac: float) -> ClickSplits:
    """The click splits of `data` (cached per process)."""
    return rf2_click_splits(movielens_dir(data), valid_frac=valid_frac, name=data)


@functools.lru_cache(maxsize=8)
def clients_of(data: str, valid_frac: float) -> tuple[np.ndarray, list[np.ndarray], dict[str, list[np.ndarray]]]:
    """(users [N], per user its training rows, per split per user its rows), users ascending."""
    s = splits_for(data, valid_frac)
    users = np.unique(s.train.user_ids)
    rows: dict[str, list[np.ndarray]] = {}
    for split in ("train", "valid", "test"):
        table = getattr(s, split)
        ids = np.zeros(0, dtype=np.int64) if table is None else table.user_ids
        order = np.argsort(ids, kind="stable")
        lo, hi = np.searchsorted(ids[order], users, side="left"), np.searchsorted(ids[order], users, side="right")
        rows[split] = [order[a:b] for a, b in zip(lo, hi)]  # a user without rows here gets none
    return users, rows["train"], rows


def tiers_for(data: str, mode: str, seed: int, settings: dict[str, Any]) -> np.ndarray:
    """Each client's tier (0 low .. 2 high) under RF^2's rule `mode` (correlated: drawn with `seed`)."""
    s = splits_for(data, settings["valid_frac"])
    _, train_rows, rows = clients_of(data, settings["valid_frac"])
    if mode == "independent":
        return rf2_independent_tiers(np.array([len(r) for r in train_rows]))
    clicked: list[list[np.ndarray]] = [[] for _ in train_rows]  # RF^2 walks the clicks of train and test rows
    for split in ("train", "valid", "test"):
        table = getattr(s, split)
        for c, r in enumerate(rows[split] if table is not None else []):
            clicked[c].append(table.item_ids[r][table.labels[r] > 0])
    return rf2_dirichlet_tiers([np.concatenate(c) for c in clicked], settings["alpha"], seed)


def round_plan(tiers: np.ndarray, train_counts: np.ndarray, arm: str, epoch: int, seed: int,
               settings: dict[str, Any]) -> list[np.ndarray]:
    """The clients that train in each round of one global epoch (RF^2's sequential pass over the shuffled clients).

    Args:
        tiers: tier per client [N].
        train_counts: training rows per client [N] (clients without any never train).
        arm: base, exclude_low, over_selection or fedprox.
        epoch: the global epoch (reshuffles the order).
        seed: the run's seed.
        settings: clients_per_round, overselect.

    Returns:
        One array of client indices per round.
    """
    order = np.argsort(-train_counts, kind="stable")
    order = order[train_counts[order] > 0]
    if arm == "exclude_low":
        order = order[tiers[order] > 0]
    order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
    per = settings["clients_per_round"]
    over = settings["overselect"] if arm == "over_selection" else 0.0
    size = min(int(per * (1 + over)), len(order))
    return [overselect_round(order[i:i + size], tiers, per, over) for i in range(0, len(order), size)]


# ---------------------------------------------------------------- training


def round_gradient(module: TrainModule, s: ClickSplits, rows: np.ndarray, settings: dict[str, Any], mu: float = 0.0
                   ) -> tuple[list[torch.Tensor], float]:
    """The server's gradient of one round: client lr * grad of the mean loss over the round's pooled rows.

    With one full-batch SGD step per client this is exactly w_global minus RF^2's sample-weighted
    mean of the clients' weights (module docstring); FedProx's pull adds mu (w - w_global) = 0 at
    that step, computed all the same.

    Args:
        module: the global model's TrainModule (its weights are the round's start).
        s: the click splits (clients' rows index s.train).
        rows: every selected client's training rows, concatenated.
        settings: client_lr, l2_embedding.
        mu: FedProx's proximal weight (0: none).

    Returns:
        (one gradient per trainable parameter, in module.parameters() order; the pooled mean BCE).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if mu > 0 else []
    loss, _ = module(make_batch(s.train, s.schema, rows))
    tables = [p for n, p in module.named_parameters() if "embedding_bags" in n]
    total = loss + settings["l2_embedding"] * sum((w * w).sum() for w in tables)
    if mu > 0:
        total = total + 0.5 * mu * sum(((p - w0) ** 2).sum() for p, w0 in zip(params, start))
    grads = torch.autograd.grad(total, params)
    return [settings["client_lr"] * g for g in grads], float(loss.detach())


def _step(module: TrainModule, server: DenseOptimizer, s: ClickSplits, rows: np.ndarray, settings: dict[str, Any],
          mu: float) -> float:
    """One round: the pooled gradient, then the server's Adagrad step."""
    grads, loss = round_gradient(module, s, rows, settings, mu)
    for p, g in zip(server.params, grads):
        p.grad = g
    server.step()
    return loss


def tier_metrics(module: TrainModule, s: ClickSplits, split: str, rows: list[np.ndarray], tiers: np.ndarray) -> dict[str, Any]:
    """AUC and NE of every tier's rows of `split` (and of all rows)."""
    table = getattr(s, split)
    probs = predict(module, table, s.schema, batch_size=8192)
    labels = table.labels
    out: dict[str, Any] = {"auc": float(auc(probs, labels)), "ne": float(ne(probs, labels)), "tiers": {}}
    for t, name in enumerate(TIERS):
        take = np.concatenate([r for c, r in enumerate(rows) if tiers[c] == t] or [np.zeros(0, np.int64)])
        ok = len(take) and 0 < labels[take].sum() < len(take)
        out["tiers"][name] = {"rows": int(len(take)), "auc": float(auc(probs[take], labels[take])) if ok else None,
                              "ne": float(ne(probs[take], labels[take])) if ok else None}
    return out


def run_one(data: str, mode: str, arm: str, seed: int, settings: dict[str, Any], path: str) -> dict[str, Any]:
    """Train one grid cell and write its result file (module level: the pool's workers import it).

    Args:
        data: the --data value.
        mode: independent or correlated tiers.
        arm: one of ARMS.
        seed: model init, tier draw and client order.
        settings: the run's knobs.
        path: its result file.

    Returns:
        The result written.
    """
    began = time.perf_counter()
    s = splits_for(data, settings["valid_frac"])
    _, train_rows, rows = clients_of(data, settings["valid_frac"])
    tiers = tiers_for(data, mode, seed, settings)
    counts = np.array([len(r) for r in train_rows])
    torch.manual_seed(seed)
    module = TrainModule(build_dlrm(s.schema))
    server = DenseOptimizer([p for p in module.parameters() if p.requires_grad], "adagrad", settings["server_lr"])
    mu = settings["proximal_mu"] if arm == "fedprox" else 0.0
    history, best, bad, n_rounds = [], None, 0, 0
    for epoch in range(settings["epochs"]):
        module.train()
        losses = [_step(module, server, s, np.concatenate([train_rows[c] for c in clients]), settings, mu)
                  for clients in round_plan(tiers, counts, arm, epoch, seed, settings) if len(clients)]
        n_rounds += len(losses)
        entry = {"epoch": epoch, "rounds": n_rounds, "train_loss": float(np.mean(losses))}
        if s.valid is not None:
            entry["valid_auc"] = tier_metrics(module, s, "valid", rows["valid"], tiers)["auc"]
            if best is None or entry["valid_auc"] > best[0]:
                best, bad = (entry["valid_auc"], epoch, {k: v.clone() for k, v in module.state_dict().items()}), 0
            else:
                bad += 1
        history.append(entry)
        log.info(f"[{mode} {arm} seed {seed}] {entry}")
        if s.valid is not None and bad >= settings["patience"]:
            break
    if best is not None:
        module.load_state_dict(best[2])
    test = tier_metrics(module, s, "test", rows["test"], tiers)
    result = {"data": data, "mode": mode, "arm": arm, "seed": seed, "settings": settings, "test": test,
              "tier_clients": np.bincount(tiers, minlength=len(TIERS)).tolist(), "kept_epoch": best[1] if best else epoch,
              "rounds": n_rounds, "history": history, "seconds": time.perf_counter() - began}
    write_json(result, path)
    return result


# ---------------------------------------------------------------- summary


def _tier_values(test: dict[str, Any], metric: str) -> list[float]:
    return [math.nan if test["tiers"][t][metric] is None else test["tiers"][t][metric] for t in TIERS]


def _ratio(cor: float | None, ind: float | None) -> float | None:
    ok = cor is not None and ind is not None and math.isfinite(cor) and math.isfinite(ind) and ind > 0
    return cor / ind if ok else None


def summarize(results: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per optimization and tier mode: MDAC of AUC (and of NE) against the base arm of the same seed and tiers.

    Args:
        results: run results ({"mode", "arm", "seed", "test"}).
        seeds: the seeds that pair.

    Returns:
        The summary (module docstring).
    """
    test = {(r["mode"], r["arm"], r["seed"]): r["test"] for r in results}
    summary: dict[str, Any] = {}
    for opt in OPTS:
        row: dict[str, Any] = {}
        per_seed: dict[str, list[float | None]] = {}
        for mode in TIER_MODES:
            pairs = [(test.get((mode, opt, s)), test.get((mode, "base", s))) for s in seeds]
            pairs = [(n, b) for n, b in pairs if n is not None and b is not None]
            if not pairs:
                continue
            per_seed[mode] = [mdac(_tier_values(n, "auc"), _tier_values(b, "auc")) for n, b in pairs]
            deltas = {t: harness.interval([(n["tiers"][t]["auc"] - b["tiers"][t]["auc"]) / b["tiers"][t]["auc"]
                                           if n["tiers"][t]["auc"] and b["tiers"][t]["auc"] else None for n, b in pairs])
                      for t in TIERS}
            row[mode] = {"mdac": harness.interval(per_seed[mode]),
                         "mdac_ne": harness.interval([mdac(_tier_values(n, "ne"), _tier_values(b, "ne")) for n, b in pairs]),
                         "delta_auc": deltas,
                         "auc_change": harness.interval([(n["auc"] - b["auc"]) / b["auc"] for n, b in pairs])}
        if len(per_seed) == len(TIER_MODES) and len(per_seed["independent"]) == len(per_seed["correlated"]):
            row["ratio"] = harness.interval([_ratio(c, i) for c, i in zip(per_seed["correlated"], per_seed["independent"])])
            row["ratio_of_means"] = _ratio(row["correlated"]["mdac"]["mean"], row["independent"]["mdac"]["mean"])
        if row:
            summary[opt] = row
    base = {mode: harness.interval([test[(mode, "base", s)]["auc"] for s in seeds if (mode, "base", s) in test])
            for mode in TIER_MODES}
    summary["base_auc"] = base
    return summary


def table(summary: dict[str, Any]) -> str:
    """The README's markdown table: MDAC per optimization and tier mode, and the ratio."""
    def cell(c: dict[str, Any] | None, fmt: str = "{:.4f}") -> str:
        if not c or c.get("n", 0) == 0 or c["mean"] is None or not math.isfinite(c["mean"]):
            return "-"
        lo, hi = c["ci95"]
        return fmt.format(c["mean"]) + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if c["n"] > 1 else "")

    lines = ["| optimization | MDAC independent tiers | MDAC correlated tiers | ratio correlated / independent | paper's ratio |",
             "|---|---|---|---|---|"]
    for opt in OPTS:
        r = summary.get(opt)
        if not r:
            continue
        paper = "15.8x (ML-20M), 41x (Taobao)" if opt == "exclude_low" else "-"
        lines.append(f"| {opt} | {cell(r.get('independent', {}).get('mdac'))} | {cell(r.get('correlated', {}).get('mdac'))} "
                     f"| {cell(r.get('ratio'), '{:.1f}')} | {paper} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs that make a run's numbers (saved in every run file; a rerun reuses a file only if they match)."""
    out = {k: getattr(args, k) for k in DEFAULTS}
    return {**out, **QUICK} if args.quick else out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens-1m", help="movielens-1m (the bundled copy), movielens:/dir (e.g. ml-20m) or a dir")
    harness.add_seeds_flag(ap, "0,1,2")
    ap.add_argument("--tiers", default=",".join(TIER_MODES), help="comma-separated subset of independent,correlated")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    for key, value in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--workers", type=int, default=1, help="runs side by side (one torch thread each)")
    ap.add_argument("--quick", action="store_true", help=f"tiny settings for the test: {QUICK}")
    ap.add_argument("--out", default=str(harness.RESULTS / "rf2_protocol.json"))
    ap.add_argument("--runs-dir", default="", help="one file per run (default: <out without .json>/)")
    args = ap.parse_args(argv)
    for flag, chosen, known in (("--tiers", args.tiers, TIER_MODES), ("--arms", args.arms, ARMS)):
        bad = [x for x in chosen.split(",") if x not in known]
        if bad:
            ap.error(f"{flag}: unknown {bad}; choose from {','.join(known)}")
    if args.epochs < 1 or args.clients_per_round < 1:
        ap.error("--epochs and --clients-per-round must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = settings_of(args)
    runs_dir = Path(args.runs_dir or Path(args.out).with_suffix(""))
    run = harness.start(__file__, argv, config={"data": args.data, "seeds": args.seeds, **settings}, workers=args.workers)
    grid = [(args.data, m, arm, s, settings, str(runs_dir / f"{m}_{arm}_seed{s}.json"))
            for s in args.seeds for m in args.tiers.split(",") for arm in args.arms.split(",")]
    done, todo = harness.split_finished(grid, settings)
    done += harness.run_pool(run_one, todo, workers=args.workers)
    summary = summarize(done, args.seeds)
    keep = [{k: r[k] for k in ("mode", "arm", "seed", "test", "tier_clients", "kept_epoch", "rounds", "seconds")} for r in done]
    result = harness.write_result(args.out, run, {"summary": summary, "runs": keep, "table": table(summary),
                                                  "paper_ratio": PAPER})
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
