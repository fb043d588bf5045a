"""Three federated-recommendation findings, reproduced on MovieLens-100k over several seeds (issue 12 §2).

(a) Ning et al. 2021, federated retrieval with limited negatives: a client holds one user's rows, so a
    local batch offers almost no in-batch negatives. The federated two-tower trained with in-batch
    softmax is compared with two batch-insensitive losses: the squared hinge + spread-out
    (`--two-tower-hinge`) and the pointwise logistic loss on the labelled (user, item) pairs
    (`--two-tower-loss bce`: every row's loss is its own). recall@10 / NDCG@10 on test over the full item
    catalog (train and valid items filtered), each against the centralized two-tower (in-batch softmax
    with the logQ correction, early-stopped on validation recall@10: the project's centralized retrieval
    model). Reported: the relative recall gain of each batch-insensitive loss over federated softmax and
    the relative gap to centralized, paired over seeds.
(b) FedRecGEL (Yu et al.), sharpness-aware local training: local SAM (`--sam-rho`) against plain local
    steps, on test NE / AUC and on the stability of the item embeddings across rounds, measured as the
    mean cosine between an item's embedding at consecutive validation evaluations (every --eval-every
    rounds), averaged over the items and over the evaluation pairs (1 = the item rows no longer turn).
(c) RF^2 (Maeng et al. 2022), fairness under device heterogeneity: the MDAC (largest pairwise gap
    across the low / mid / high device tiers of the relative test-NE change) of FedProx and of C2AL,
    each against FedAvg with the same seed and tiers, with tiers drawn independently of the data and
    correlated with a user feature; the ratio correlated / independent says how much data-correlated
    heterogeneity hides or inflates the fairness impact.

(quality) `python train.py --federated` exactly as a user runs it (train.py's defaults; --data picks the data
    set): wall and CPU seconds, test NE / AUC against the early-stopped centralized AFM of
    benchmarks/results/baselines_<data>.json, the validation NE at every evaluation (the quality-vs-rounds
    curve), rounds per second; and the CPU cost of one round with the clients one after another against
    side by side (--parallel-clients). Not part of the default --parts.

Every arm is the federated job's own training (`c2al.jobs.federated_job.federated_fit`, early-stopped on
validation: NE, or recall@10 for the two-tower losses) with train.py's federated defaults narrowed to
fit the budget (DEFAULTS below: fewer clients per round and rounds). Arms run side by side in --workers
spawned processes of one torch thread each.

  python benchmarks/federated.py                          # all three, seeds 0,1,2: about an hour on 2 cores
  python benchmarks/federated.py --parts ning --seeds 0,1,2,3,4
  python benchmarks/federated.py --rounds 200 --clients-per-round 200   # any train.py federated flag
  python benchmarks/federated.py --parts quality [--data movielens-1m]   # the default run, timed
  python benchmarks/federated.py --parts quality --data movielens-1m --tiers none   # a what-if: no device tiers

Writes benchmarks/results/federated_{ning,fedrecgel,rf2}.json (and federated_quality_<data>[_<flag>-<value>...].json): per seed and arm the metrics, seconds and
rounds kept; the summary with 95% t-intervals over seeds; the config, machine_info() and the markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import harness
import numpy as np

from c2al.config import Config, add_config_flags, config_from

ROOT = harness.ROOT
RESULTS = harness.RESULTS
PARTS = ("ning", "fedrecgel", "rf2")  # the default --parts
# Each paper's own protocol is a script of its own: `--parts NAME` runs its main with --seeds (and --data if given).
PROTOCOLS = {"ning-protocol": "ning_protocol", "rf2-protocol": "rf2_protocol", "fedrecgel-protocol": "fedrecgel_protocol"}
QUALITY_ROUNDS = 5  # rounds timed per engine in the quality part's round-cost comparison
# The narrowed federated settings every arm starts from (train.py's federated defaults otherwise).
# 27 runs (9 a seed, 2 of them two federated phases with mining between) fit about an hour on 2 cores only this narrow;
# train.py's defaults (up to 500 rounds of 200 clients) are ~4x the CPU per run.
DEFAULTS: dict[str, Any] = {"data": "movielens-100k", "rounds": 120, "clients_per_round": 50, "eval_every": 5, "patience": 3}
# RF^2 and FedRecGEL start from FedAvg as the papers do (FedProx is FedAvg plus the clients' proximal term), unless
# --server-optimizer is given; the two-tower losses keep train.py's server optimizer (FedAdam).
AFM_DEFAULTS: dict[str, Any] = {"server_optimizer": "fedavg"}
TRAIN_FLAGS = ["data", "rounds", "clients_per_round", "local_epochs", "local_batch_size", "server_optimizer", "server_lr",
               "lr", "table_lr", "eval_every", "patience", "parallel_clients", "tier_skew", "tiers"]
TWO_TOWER_LOSSES = {"in-batch softmax": {"two_tower_loss": "softmax"},
                    "squared hinge + spread-out": {"two_tower_hinge": True},
                    "pointwise logistic (labelled pairs)": {"two_tower_loss": "bce"}}
SAM_RHO = 0.05


# ------------------------------------------------------------------------------------------ one arm (in a worker)
_SPLITS: dict[str, Any] = {}


def _splits(cfg: Config) -> Any:
    from c2al.data.sources import load_splits

    if cfg.data not in _SPLITS:
        _SPLITS[cfg.data] = load_splits(cfg)
    return _SPLITS[cfg.data]


def quiet_worker() -> None:
    """Each harness worker's set-up: only warnings from the libraries (its torch threads the pool sets)."""
    logging.basicConfig(level=logging.WARNING)


def run_arm(task: dict[str, Any]) -> dict[str, Any]:
    """One task in a worker process: {"part", "arm", "seed", "cfg"} -> its metrics."""
    cfg = Config.from_dict(task["cfg"])
    start = time.perf_counter()
    out = ARMS[task["kind"]](cfg)
    return {**{k: task[k] for k in ("part", "arm", "seed", "kind")}, **out, "seconds": time.perf_counter() - start}


def _federated(cfg: Config, evaluate: Callable[..., dict[str, Any]] | None = None) -> tuple[Any, Any, Any, np.ndarray]:
    from c2al.jobs.federated_job import client_tiers, federated_fit, make_clients
    from c2al.train.build import seeded_model

    splits = _splits(cfg)
    clients = make_clients(splits)
    tiers = client_tiers(cfg, splits, clients)
    trained = federated_fit(cfg, splits, seeded_model(cfg, splits.schema), clients, tiers, None, cfg.model,
                            evaluate=evaluate(cfg, splits) if evaluate else None)
    return splits, clients, trained, tiers


def two_tower_federated(cfg: Config) -> dict[str, Any]:
    from c2al.eval.retrieval import retrieval_metrics
    from c2al.federated.simulation import CPU

    splits, _, trained, _ = _federated(cfg)
    test = retrieval_metrics(trained.model, splits, CPU, ks=(10,), split="test")
    return {"recall@10": test["recall@10"], "ndcg@10": test["ndcg@10"], "popularity_recall@10": test["popularity_recall@10"],
            "kept": trained.best, "rounds_run": len(trained.history)}


def two_tower_centralized(cfg: Config) -> dict[str, Any]:
    from c2al.dist.process import init_distributed
    from c2al.eval.retrieval import retrieval_metrics
    from c2al.train.build import seeded_model
    from c2al.train.loop import fit

    splits = _splits(cfg)
    info = init_distributed("cpu")
    trained = fit(replace(cfg, federated=False), splits, seeded_model(cfg, splits.schema), info, tag="central")
    test = retrieval_metrics(trained.model, splits, info, ks=(10,), split="test")
    return {"recall@10": test["recall@10"], "ndcg@10": test["ndcg@10"], "kept": trained.best}


def _tracking(cfg: Config, splits: Any) -> Callable[[Any], dict[str, Any]]:
    """The job's validation, plus each evaluation's item-embedding rows (for the stability measure)."""
    from c2al.jobs.federated_job import validation

    snapshots: list[np.ndarray] = []

    def evaluate(fed: Any) -> dict[str, Any]:
        name = item_table(fed)
        snapshots.append(fed.params[name].copy())
        return validation(cfg, splits, fed)

    evaluate.snapshots = snapshots  # type: ignore[attr-defined]
    return evaluate


def item_table(fed: Any) -> str:
    """The shared table parameter of the item key (the schema's first item-side feature), e.g. t_item_id."""
    key = fed.trainer.schema.item_features[0]
    return next(n for n, f in fed.trainer.layout.tables.items() if f == key and "first_order" not in n)


def embedding_stability(snapshots: Sequence[np.ndarray], rows: np.ndarray | None = None) -> dict[str, float]:
    """How much the item rows still turn and move between consecutive evaluations.

    Args:
        snapshots: the item table [I, D] at each evaluation, in order.
        rows: the items to average over (default all).

    Returns:
        {"cosine": mean over evaluation pairs and items of cos(e_t, e_t+1),
         "drift": the same mean of |e_t+1 - e_t| / |e_t|}; nan with fewer than two snapshots.

    Example:
        >>> e = np.array([[1.0, 0.0], [0.0, 2.0]])
        >>> embedding_stability([e, e])["cosine"], embedding_stability([e, e])["drift"]
        (1.0, 0.0)
    """
    if len(snapshots) < 2:
        return {"cosine": math.nan, "drift": math.nan}
    cos, drift = [], []
    for a, b in zip(snapshots, snapshots[1:]):
        a, b = (a, b) if rows is None else (a[rows], b[rows])
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos.append(float(np.mean((a * b).sum(1) / np.maximum(na * nb, 1e-12))))
        drift.append(float(np.mean(np.linalg.norm(b - a, axis=1) / np.maximum(na, 1e-12))))
    return {"cosine": float(np.mean(cos)), "drift": float(np.mean(drift))}


def _afm_metrics(cfg: Config, splits: Any, clients: Any, trained: Any, tiers: np.ndarray, snapshots: Sequence[np.ndarray]) -> dict[str, Any]:
    from c2al.eval.metrics import per_segment, summarize
    from c2al.federated.heterogeneity import TIERS
    from c2al.jobs.federated_job import row_tiers

    probs = trained.predict("test", splits, cfg.batch_size)
    test = splits.test
    per_tier = per_segment(probs, test.labels, row_tiers(test, clients, tiers), len(TIERS))
    seen = np.unique(splits.train.sparse[splits.schema.item_features[0]].first())  # items some client trained on
    overall = summarize(probs, test.labels)
    return {"ne": overall["ne"], "auc": overall["auc"], "tier_ne": [t["ne"] for t in per_tier],
            "stability": embedding_stability(snapshots, seen), "kept": trained.best, "rounds_run": len(trained.history)}


def _tracked(cfg: Config) -> tuple[Any, Any, Any, np.ndarray, list[np.ndarray]]:
    """`_federated` with `_tracking`'s validation: (splits, clients, trained, tiers, item-table snapshots)."""
    holder: dict[str, Any] = {}

    def evaluate(c: Config, s: Any) -> Callable[[Any], dict[str, Any]]:
        holder["fn"] = _tracking(c, s)
        return holder["fn"]

    splits, clients, trained, tiers = _federated(cfg, evaluate)
    return splits, clients, trained, tiers, holder["fn"].snapshots


def afm_federated(cfg: Config) -> dict[str, Any]:
    """FedAvg / FedProx / SAM arm: test NE, per-tier NE, item-embedding stability."""
    return _afm_metrics(cfg, *_tracked(cfg))


def afm_with_c2al(cfg: Config) -> dict[str, Any]:
    """The FedAvg arm, then federated C2AL on top of it (its own mining, C2AL rounds from the same seed)."""
    from c2al.jobs.federated_job import run_federated_c2al

    c2 = replace(cfg, aux_cohorts=cfg.aux_cohorts or 2)
    splits, clients, base, tiers, snapshots = _tracked(c2)
    out = _afm_metrics(c2, splits, clients, base, tiers, snapshots)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_federated_c2al(c2, splits, clients, tiers, Path(tmp), base=base)
    out["c2al"] = {"ne": report["overall"]["ne_c2al"], "auc": report["overall"]["auc_c2al"],
                   "tier_ne": [t["ne_c2al"] for t in report["tiers"]], "mdac": report["federated"]["mdac"],
                   "kept": report["federated"]["best"]["c2al"]}
    return out


ARMS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "two_tower_federated": two_tower_federated, "two_tower_centralized": two_tower_centralized,
    "afm_federated": afm_federated, "afm_with_c2al": afm_with_c2al}


# ------------------------------------------------------------------------------------------ the grid
def tasks(base: Config, parts: Sequence[str], seeds: Sequence[int], afm: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every (part, arm, seed) run, each with its full config; `afm` overrides the base of the RF^2 / FedRecGEL arms."""
    out = []
    afm = afm or {}

    def add(part: str, arm: str, seed: int, kind: str, **over: Any) -> None:
        cfg = replace(base, seed=seed, **over).check()
        out.append({"part": part, "arm": arm, "seed": seed, "kind": kind, "cfg": cfg.to_dict()})

    for seed in seeds:
        if "ning" in parts:
            tt = dict(model="two-tower", two_tower_loss="bce", two_tower_hinge=False)
            for arm, over in TWO_TOWER_LOSSES.items():
                add("ning", arm, seed, "two_tower_federated", **{**tt, **over})
            # centralized --eval-every counts steps, not rounds: 0 evaluates at each epoch's end as train.py does
            add("ning", "centralized in-batch softmax", seed, "two_tower_centralized", model="two-tower", two_tower_loss="softmax",
                federated=False, eval_every=0)
        if "rf2" in parts or "fedrecgel" in parts:
            for mode in ("correlated", "independent") if "rf2" in parts else ("correlated",):
                add("rf2", f"fedavg/{mode}", seed, "afm_with_c2al" if "rf2" in parts else "afm_federated", tiers=mode, **afm)
                if "rf2" in parts:
                    add("rf2", f"fedprox/{mode}", seed, "afm_federated", tiers=mode, **{**afm, "server_optimizer": "fedprox"})
        if "fedrecgel" in parts:
            add("fedrecgel", "local SAM", seed, "afm_federated", tiers="correlated", sam_rho=SAM_RHO, **afm)
    return out


# ------------------------------------------------------------------------------------------ summaries
def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds (`harness.paired_ci`); n counts the seeds given."""
    mean, lo, hi = harness.paired_ci(list(values))
    return {"mean": mean, "ci95": [lo, hi], "n": len(values), "values": list(values)}


def rel(a: float, b: float) -> float:
    return (a - b) / b if b else math.nan


def fmt(cell: dict[str, Any], pct: bool = False, digits: int = 4) -> str:
    k = 100.0 if pct else 1.0
    lo, hi = cell["ci95"]
    if pct:
        return f"{k * cell['mean']:+.1f}% [{k * lo:+.1f}, {k * hi:+.1f}]"
    return f"{cell['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def md(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def by_arm(results: list[dict[str, Any]], part: str) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        if r["part"] == part:
            out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def summarize_ning(results: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    arms = by_arm(results, "ning")
    soft, central = arms["in-batch softmax"], arms["centralized in-batch softmax"]
    summary, rows = {}, []
    for arm, runs in arms.items():
        seeds = sorted(runs)
        cell = {m: interval([runs[s][m] for s in seeds]) for m in ("recall@10", "ndcg@10")}
        if arm != "centralized in-batch softmax":
            cell["gain_vs_federated_softmax"] = interval([rel(runs[s]["recall@10"], soft[s]["recall@10"]) for s in seeds])
            cell["gap_to_centralized"] = interval([rel(runs[s]["recall@10"], central[s]["recall@10"]) for s in seeds])
        summary[arm] = cell
        rows.append([("federated " if arm != "centralized in-batch softmax" else "") + arm, fmt(cell["recall@10"]), fmt(cell["ndcg@10"]),
                     fmt(cell["gain_vs_federated_softmax"], True) if "gain_vs_federated_softmax" in cell else "",
                     fmt(cell["gap_to_centralized"], True) if "gap_to_centralized" in cell else "reference"])
    pop = interval([r["popularity_recall@10"] for r in soft.values()])
    table = md(["two-tower loss", "test recall@10", "test NDCG@10", "recall vs federated softmax", "recall vs centralized"], rows)
    return {"arms": summary, "most_popular_recall@10": pop}, table + f"\n\nMost popular items: recall@10 {pop['mean']:.4f}."


def summarize_fedrecgel(results: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    plain = {r["seed"]: r for r in results if r["arm"] == "fedavg/correlated"}
    sam = {r["seed"]: r for r in results if r["arm"] == "local SAM"}
    seeds = sorted(set(plain) & set(sam))
    summary, rows = {}, []
    for arm, runs in (("plain local steps", plain), (f"local SAM (rho {SAM_RHO:g})", sam)):
        cell = {"ne": interval([runs[s]["ne"] for s in seeds]), "auc": interval([runs[s]["auc"] for s in seeds]),
                "stability_cosine": interval([runs[s]["stability"]["cosine"] for s in seeds]),
                "stability_drift": interval([runs[s]["stability"]["drift"] for s in seeds]),
                "rounds_kept": [runs[s]["kept"].get("rounds") for s in seeds]}
        if runs is sam:
            cell["ne_change_vs_plain"] = interval([rel(sam[s]["ne"], plain[s]["ne"]) for s in seeds])
        summary[arm] = cell
        rows.append([arm, fmt(cell["ne"]), fmt(cell["auc"]), fmt(cell["stability_cosine"]), fmt(cell["stability_drift"]),
                     fmt(cell["ne_change_vs_plain"], True) if "ne_change_vs_plain" in cell else "reference"])
    return summary, md(["local training", "test NE", "test AUC", "item-embedding stability (cos)", "item drift / evaluation",
                        "NE vs plain"], rows)


def summarize_rf2(results: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    from c2al.federated.aggregate import mdac

    arms = by_arm(results, "rf2")
    summary: dict[str, Any] = {}
    rows = []
    for opt in ("fedprox", "c2al"):
        per_mode = {}
        for mode in ("independent", "correlated"):
            base = arms.get(f"fedavg/{mode}", {})
            new = arms.get(f"fedprox/{mode}", {}) if opt == "fedprox" else {s: r["c2al"] for s, r in base.items() if "c2al" in r}
            seeds = sorted(set(base) & set(new))
            if not seeds:
                continue
            per_mode[mode] = {"mdac": interval([mdac(new[s]["tier_ne"], base[s]["tier_ne"]) for s in seeds]),
                              "ne_change": interval([rel(new[s]["ne"], base[s]["ne"]) for s in seeds])}
        if len(per_mode) == 2:
            ind, cor = per_mode["independent"]["mdac"]["mean"], per_mode["correlated"]["mdac"]["mean"]
            per_mode["ratio_correlated_over_independent"] = cor / ind if ind else math.nan
        summary[opt] = per_mode
        for mode in ("independent", "correlated"):
            if mode in per_mode:
                c = per_mode[mode]
                ratio = per_mode.get("ratio_correlated_over_independent")
                rows.append([{"fedprox": "FedProx", "c2al": "C2AL"}[opt], mode, fmt(c["mdac"]), fmt(c["ne_change"], True),
                             f"{ratio:.2f}x" if mode == "correlated" and ratio is not None else ""])
    return summary, md(["optimization (vs FedAvg)", "device tiers", "MDAC", "test NE change", "MDAC correlated / independent"], rows)


SUMMARIES = {"ning": summarize_ning, "fedrecgel": summarize_fedrecgel, "rf2": summarize_rf2}


# ------------------------------------------------------------------------------------------ the default run
def quality(data: str, extra: Sequence[str], time_rounds: bool = True) -> tuple[dict[str, Any], str]:
    """`python train.py --federated --data <data>` with train.py's defaults, timed, against centralized.

    Args:
        data: the --data value.
        extra: more train.py flags.
        time_rounds: also time QUALITY_ROUNDS rounds one client after another and side by side (`round_cost`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["train.py", "--federated", "--data", data, *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        res = subprocess.run([sys.executable, *cmd, "--quiet", "--out", tmp], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if res.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        report = json.loads((Path(tmp) / "report.json").read_text())
    fed = report["federated"]
    history = fed["history"]["train"]
    curve = [{"rounds": h["round"] + 1, "valid_ne": h["valid_ne"], "valid_auc": h.get("valid_auc")} for h in history if "valid_ne" in h]
    ref = RESULTS / f"baselines_{data}.json"  # benchmarks/baselines.py: the early-stopped centralized AFM, 3 seeds
    central = json.loads(ref.read_text())["afm"]["test_ne"]["mean"] if ref.exists() else math.nan
    train_s = fed["train_seconds"]["train"]
    out = {"command": "python " + " ".join(cmd), "wall_seconds": wall, "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
           "train_seconds": train_s, "rounds_run": len(history), "rounds_per_second": len(history) / train_s, "kept": report["best"],
           "test": report["overall"], "tiers": report["tiers"], "centralized_test_ne": central,
           "ne_over_centralized_pct": 100 * (report["overall"]["ne"] / central - 1), "curve": curve,
           "config": report["config"]}
    rows = [[c["rounds"], f"{c['valid_ne']:.4f}", f"{c['valid_auc']:.4f}"] for c in curve]
    if not time_rounds:
        return out, md(["rounds", "valid NE", "valid AUC"], rows)
    cost = out["round_cost"] = round_cost(Config(federated=True, data=data, quiet=True, rounds=QUALITY_ROUNDS, patience=0))
    text = (f"`{out['command']}`: test NE {out['test']['ne']:.4f} (AUC {out['test']['auc']:.4f}) after keeping round "
            f"{out['kept']['rounds']} of {out['rounds_run']}; centralized early-stopped AFM {central:.4f} "
            f"({out['ne_over_centralized_pct']:+.1f}%). {out['wall_seconds']:.0f} s wall, {out['cpu_seconds']:.0f} s CPU, "
            f"{out['rounds_per_second']:.2f} rounds/s. One round: {cost['sequential_cpu_s_per_round']:.2f} s CPU one client "
            f"after another, {cost['vectorized_cpu_s_per_round']:.2f} s side by side ({cost['speedup']:.1f}x).")
    return out, md(["rounds", "valid NE", "valid AUC"], rows) + "\n\n" + text


def round_cost(cfg: Config) -> dict[str, Any]:
    """CPU seconds per round of the same rounds with the clients one after another and side by side."""
    import torch

    from c2al.data.sources import load_splits
    from c2al.jobs.federated_job import client_tiers, federated_fit, make_clients
    from c2al.train.build import seeded_model

    torch.set_num_threads(1)
    splits = load_splits(cfg)
    clients = make_clients(splits)
    tiers = client_tiers(cfg, splits, clients)
    out: dict[str, Any] = {"rounds": cfg.rounds, "clients_per_round": cfg.clients_per_round}
    for name, parallel in (("sequential", 0), ("vectorized", cfg.parallel_clients)):
        c = replace(cfg, parallel_clients=parallel)
        start = time.process_time()
        federated_fit(c, splits, seeded_model(c, splits.schema), clients, tiers, None, name, evaluate=lambda _: {"ne": 1.0})
        out[f"{name}_cpu_s_per_round"] = (time.process_time() - start) / cfg.rounds
    out["speedup"] = out["sequential_cpu_s_per_round"] / out["vectorized_cpu_s_per_round"]
    return out


# ------------------------------------------------------------------------------------------ main
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}, quality (the default run, timed), "
                    f"or a paper's own protocol: {', '.join(PROTOCOLS)}")
    harness.add_seeds_flag(ap, "0,1,2", what="every arm (3 or more for intervals)")
    ap.add_argument("--workers", type=int, default=2, help="arms side by side, one torch thread each")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where federated_<part>.json go")
    add_config_flags(ap, TRAIN_FLAGS, "train.py flags every arm starts from (defaults: DEFAULTS above)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    parts = [p for p in args.parts.split(",") if p]
    if "quality" in parts:
        data = getattr(args, "data", None) or DEFAULTS["data"]
        given = {k: getattr(args, k) for k in TRAIN_FLAGS if k != "data" and getattr(args, k, None) is not None}
        extra = [x for k, v in given.items() for x in ("--" + k.replace("_", "-"), str(v))]  # train.py flags given here
        run = harness.start(__file__, argv, config={})
        doc, table = quality(data, extra)
        flags = "".join(f"_{k.replace('_', '-')}-{v}" for k, v in given.items())  # a what-if run does not overwrite the default one
        path = Path(args.out_dir) / f"federated_quality_{data}{flags}.json"
        run.config = doc.pop("config")  # the train.py run's config; its command line is the job's
        harness.write_result(path, run, {"job_command": doc.pop("command"), **doc, "flags": extra, "table": table})
        print(f"{table}\n\nwrote {path}", flush=True)
        parts = [p for p in parts if p != "quality"]
        if not parts:
            return {"quality": doc}
    for part in [p for p in parts if p in PROTOCOLS]:
        given = ["--data", args.data] if getattr(args, "data", None) else []
        __import__(PROTOCOLS[part]).main(["--seeds", ",".join(map(str, args.seeds)) + ",", *given])
    parts = [p for p in parts if p not in PROTOCOLS]
    if not parts:
        return {}
    bad = [p for p in parts if p not in PARTS]
    if bad:
        sys.exit(f"unknown --parts {bad}; choose from {list(PARTS) + list(PROTOCOLS)}")
    seeds = args.seeds
    base = config_from(args, **{k: v for k, v in DEFAULTS.items() if getattr(args, k, None) is None}, federated=True, quiet=True)
    afm = {k: v for k, v in AFM_DEFAULTS.items() if getattr(args, k, None) is None}
    grid = tasks(base, parts, seeds, afm)
    print(f"{len(grid)} runs on {args.workers} workers: {', '.join(parts)}; seeds {seeds}", flush=True)
    run = harness.start(__file__, argv, config=base.to_dict(), torch_threads=1, workers=args.workers)
    start = time.perf_counter()
    heavy_first = sorted(grid, key=lambda t: t["kind"] != "afm_with_c2al")  # the longest runs start first

    def done(_: int, r: dict[str, Any]) -> None:
        print(f"  {r['part']:9s} {r['arm']:40s} seed {r['seed']}  {r['seconds']:.0f} s", flush=True)

    results = harness.run_pool(run_arm, [(t,) for t in heavy_first], args.workers, initializer=quiet_worker, on_result=done)
    wall = time.perf_counter() - start
    written = {}
    for part in parts:
        summary, table = SUMMARIES[part](results)
        body = {"afm_arms_override": afm if part != "ning" else {}, "seeds": seeds, "wall_seconds_all_parts": wall,
                "runs": [r for r in results if r["part"] == part or (part == "fedrecgel" and r["arm"] == "fedavg/correlated")],
                "summary": summary, "table": table}
        path = Path(args.out_dir) / f"federated_{part}.json"
        doc = harness.write_result(path, run, body)
        written[part] = doc
        print(f"\n{table}\n\nwrote {path}", flush=True)
    print(f"all parts: {wall:.0f} s", flush=True)
    return written


if __name__ == "__main__":
    main()
