"""Does C2AL lower minority-cohort NE, and is it the contrast and the conflict that help?

Per seed and model: one baseline; the cohort miner on its validation
predictions; then every arm trained from the baseline's seeded start and scored
on the test split against that one baseline, on the SAME mined cohorts (so
NE_diff is comparable across arms). Arms (the paper ran only the first):

  c2al            K=2 mined cohorts, lambda 0.1, heads cloned from the output head
  lambda_X        the same with lambda 0.03 / 0.3 / 1           (lambda sweep)
  single_head     K=1: one head on the most contrasting mined cohort
  linear_head     heads Linear(H, 1); mlp_head: Linear, ReLU, Linear. AFM's output
                  head IS Linear(D, 1), so there linear_head repeats c2al bit for
                  bit (a determinism check) and mlp_head is the head control;
                  AttentionFM's is an MLP, so there it is the other way round
  random_cohorts  random user subsets with the mined cohorts' train shares
  least_contrast  the two least contrasting qualified candidates of the miner
  own_labels      multi-task control: head k learns y on cohort k's rows only,
                  no conflicting zero labels (c2al.attach(aux_labels="own"))
  auto            lambda from 0.03 / 0.1 / 0.3 picked on validation (--aux-weight auto's rule)
  gate, project, magnitude   main-anchored aux gradients (c2al.attach(balance=...); the "gate" arm
                  spells --aux-balance agree by its old name, so its rows keep their spec)
  kmeans_cohorts  cohorts mined with k-means candidates only (the default mines with
                  kmeans+tree, decision-tree conjunctions included)
  cohort_feature  no heads: the mined cohort id as one more sparse input field
  cohort_bias     no heads: one learned logit offset per mined cohort
  tuned_regularisation  no heads (lambda = 0): dropout / weight decay picked on
                  validation from a small grid (Kurin et al. 2022's control)
  group_dro       no heads: Group DRO over the two mined cohorts and the rest (Sagawa et al.
                  2020; --dro-eta, --dro-adjust C; c2al.robust)
  cvar_dro        no heads, no groups: the worst --cvar-alpha share of each batch's losses
                  (Levy et al. 2020)
  shared_bottom   multi-task: one MLP tower per mined cohort on the shared representation,
                  the cohort tasks weighted 1 as the main one (the multi-task convention;
                  the c2al arm is the same architecture at lambda 0.1 with cloned heads)
  mmoe            multi-task: the same towers and weights behind --mmoe-experts experts mixed
                  per task by softmax gates, the main task's mixture feeding the model's own
                  head (Ma et al. 2018; c2al.towers); served without the cohort towers and
                  gates. Not on TwoTower (its retrieval scores u . v bypass the experts)

Every arm runs on every model (--control-models narrows it); TwoTower's clone
head is a linear one, since its output head, a sum, has no parameters to clone.
On synthetic data the planted minority cohorts are scored too. Every training
(baseline and arms) is early-stopped on validation NE (--patience, default 2;
--epochs is the maximum) and scored on test with its best epoch's weights.
"exposed" is NE on the rows of both mined cohorts together. The validation gate
of train.py decides per seed whether the arm would ship (overall validation NE no
worse than the baseline's and exposed-cohort validation NE lower); "shipped" is
the test NE_diff of what ships (0 when the gate keeps the baseline) and "gate
kept base" counts those seeds. Over seeds the
per-seed NE_diff % are paired differences against that seed's baseline: the
summary gives their mean, a 95% t-interval, a paired t-test and a Wilcoxon
signed-rank test, and every p-value also Holm-adjusted over the family of arms
tested against the baseline (per model, metric and test: keys ending in _holm).
(seed, model) tasks run in --workers spawned processes of
one torch thread each (on a shared 2-core machine two threads in one process
made an AFM epoch 15x slower); every training is seeded, so the rows do not
depend on the number of workers (a test checks it).

  python benchmarks/minority_ne.py                          # MovieLens-100k, 5 seeds x 3 models x 11 trainings
  python benchmarks/minority_ne.py --data synthetic         # planted minority cohorts, same size
  python benchmarks/minority_ne.py --data movielens-1m      # 5 seeds, AFM + AttentionFM, controls on AFM (~50 min)
  python benchmarks/minority_ne.py --data movielens-1m --models afm,attention-fm --arms c2al,gate,project,magnitude,auto,\
      random_cohorts,cohort_feature,cohort_bias,tuned_regularisation     # the full set there (many hours on 2 cores)
  python benchmarks/minority_ne.py --data synthetic --models afm --seeds 3 --arms c2al,random_cohorts,cohort_feature,\
      group_dro,cvar_dro,shared_bottom,mmoe --out benchmarks/results/minority_ne_synthetic_baselines.json  # the reviewers' baselines
  python benchmarks/minority_ne.py --data movielens-1m --control-models afm,attention-fm --arms c2al,random_cohorts,cohort_feature,\
      group_dro,cvar_dro,shared_bottom,mmoe        # the same on MovieLens-1M, both models, 5 seeds (hours on 2 cores)
  python benchmarks/minority_ne.py --data my.csv --label click --sparse user,ad --user-col user --cohort-features age,country
  python benchmarks/minority_ne.py --quick --out /tmp/q.json   # CI: tiny synthetic, 1 epoch, 2 seeds

Writes benchmarks/results/minority_ne_<data>.json (config, machine, per-seed
rows, summary) and .png; --quick writes only where --out says.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import harness
import numpy as np
import torch
from harness import paired_ci
from scipy import stats
from tqdm.auto import tqdm

from c2al.config import Config, add_config_flags, config_from
from c2al.data.schema import Splits
from c2al.data.sources import load_splits
from c2al.dist.process import DistInfo, init_distributed
from c2al.errors import C2ALError
from c2al.eval.compare import AUTO_GRID, attention_report, compare, judge_on_validation, valid_scores
from c2al.eval.metrics import ne_diff_pct, per_segment, summarize
from c2al.eval.report import format_table, write_json
from c2al.eval.retrieval import retrieval_metrics
from c2al.jobs.pipeline import Candidate, attach_heads, cohort_frame, fit_candidates, mine_cohorts, served_model
from c2al.logs import quiet_libraries
from c2al.models import SHARED_AT
from c2al.models.registry import model_spec
from c2al.robust import group_counts, make_objective, robust_model, unwrap
from c2al.train.build import seeded_model
from c2al.train.loop import fit
from c2al.train.task import predict

RESULTS = harness.RESULTS
MODELS = ("afm", "attention-fm", "two-tower")
QUICK_DATA = "synthetic:n_rows=6000,n_users=600,n_items=120,minority_shares=0.08/0.06"
# what `--data synthetic` means here: MovieLens-100k's size (100k rows), the generator's planted
# minorities (3% and 2% of users); the generator's own default (200k rows) takes twice as long
SYNTHETIC = "synthetic:n_rows=100000,n_users=10000"
RECALL_K = 10
DATA_FLAGS = ("label", "sparse", "dense", "user_col", "item_col", "time_col", "cohort_features")
MINER_FLAGS = ("cohort_candidates", "n_clusters", "divergence", "min_share", "max_share")
TRAIN_FLAGS = ("lr", "table_lr", "patience")
BASELINE_FLAGS = ("dro_eta", "dro_adjust", "cvar_alpha", "mmoe_experts")  # the group_dro, cvar_dro and mmoe arms' settings
# Per data set defaults where the full grid does not fit a 2-core machine: MovieLens-1M (800k train rows,
# ~35 s per AFM epoch) runs AFM and AttentionFM over 5 seeds, the controls on the AFM only, with the table
# learning rate that benchmarks/baselines.py picked for the AFM on validation (0.3: test NE 0.7666 vs 0.7782 at
# train.py's 0.05, and best by epoch 2-3 instead of 7-9); about 50 minutes on 2 idle cores. Any flag given wins.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "movielens-1m": {"models": "afm,attention-fm", "control_models": "afm", "arms": "c2al,random_cohorts,cohort_feature", "table_lr": 0.3},
}
# seconds per training epoch on MovieLens-100k's 81k train rows, 1 thread, 2 workers on an idle 2-core
# machine (the committed run's mean), for the printed estimate
EPOCH_SECONDS = {"afm": 3.2, "attention-fm": 2.3, "two-tower": 1.6}


@dataclass(frozen=True)
class Arm:
    """One way of training against the baseline (see the module docstring)."""

    name: str
    kind: str = "c2al"  # c2al | feature (cohort id as input) | bias (per-cohort logit offset) | regularised (tuned lambda=0)
    # | robust (heads-free Group DRO / CVaR)
    cohorts: str = "mined"  # mined | random | least | kmeans
    k: int = 2
    head: str = "clone"  # clone | linear | mlp (c2al.jobs.pipeline.make_head, through attach_heads)
    lam: float | None = 0.1  # None: --aux-weight auto's grid, picked on validation
    labels: str = "conflicting"  # conflicting | own (c2al.attach aux_labels)
    balance: str = "none"  # c2al.balance mode
    objective: str = "erm"  # kind robust: group-dro | cvar (c2al.robust)
    towers: str = "shared-bottom"  # shared-bottom (heads on the representation) | mmoe (c2al.towers)


ARMS = {a.name: a for a in (
    Arm("c2al"),
    Arm("lambda_0.03", lam=0.03), Arm("lambda_0.3", lam=0.3), Arm("lambda_1", lam=1.0),
    Arm("auto", lam=None),
    Arm("gate", balance="gate"), Arm("project", balance="project"), Arm("magnitude", balance="magnitude"),
    Arm("single_head", k=1),
    Arm("linear_head", head="linear"), Arm("mlp_head", head="mlp"),
    Arm("random_cohorts", cohorts="random"),
    Arm("least_contrast", cohorts="least"),
    Arm("kmeans_cohorts", cohorts="kmeans"),
    Arm("own_labels", labels="own"),
    Arm("cohort_feature", kind="feature"),
    Arm("cohort_bias", kind="bias"),
    Arm("tuned_regularisation", kind="regularised"),
    Arm("group_dro", kind="robust", objective="group-dro"),
    Arm("cvar_dro", kind="robust", objective="cvar"),
    Arm("shared_bottom", head="mlp", lam=1.0),
    Arm("mmoe", head="mlp", lam=1.0, towers="mmoe"),
)}
NOT_ON = {"two-tower": ("mmoe",)}  # arms a model cannot run (see the module docstring)
QUICK_ARMS = ("c2al", "gate", "random_cohorts", "cohort_feature", "cohort_bias", "own_labels")
# The lambda=0 control of Kurin et al. 2022: the baseline's dropout / weight decay tuned on validation.
REGULARISATION_GRID = ({"dropout": 0.0, "weight_decay": 0.0}, {"dropout": 0.4, "weight_decay": 0.0},
                       {"dropout": 0.2, "weight_decay": 1e-5}, {"dropout": 0.2, "weight_decay": 1e-4})


# ---------------------------------------------------------------- statistics


def paired_tests(diffs: Sequence[float]) -> dict[str, float]:
    """Two-sided p-values that the paired differences are centred on 0.

    Returns:
        {"t_p": one-sample t-test (= paired t-test), "wilcoxon_p": signed-rank test};
        1.0 when every difference is 0, nan with fewer than 2 values.
    """
    x = np.asarray([d for d in diffs if d is not None and math.isfinite(d)], dtype=np.float64)
    if len(x) < 2:
        return {"t_p": math.nan, "wilcoxon_p": math.nan}
    if np.all(x == 0):
        return {"t_p": 1.0, "wilcoxon_p": 1.0}
    t_p = 0.0 if x.std(ddof=1) == 0 else float(stats.ttest_1samp(x, 0.0).pvalue)
    return {"t_p": t_p, "wilcoxon_p": float(stats.wilcoxon(x).pvalue)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan entries stay nan and are not counted).

    The i-th smallest of the m finite p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)),
    which controls the family-wise error rate at the chosen level without assuming independence.

    Args:
        pvalues: one p-value per test of the family, in any order.

    Returns:
        The adjusted p-values, in the same order.

    Example:
        >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03, float("nan")])]
        [0.03, 0.06, 0.06, nan]
    """
    finite = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and math.isfinite(p))
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        out[i] = running
    return out


def add_holm(summary: dict[str, Any]) -> None:
    """Beside each arm's t_p / wilcoxon_p, in place: the Holm-adjusted value over the model's arms (one family per
    model, metric and test: every arm of the model is one test against the same baseline)."""
    for arms in summary.values():
        metrics = {k for m in arms.values() for k, d in m.items() if isinstance(d, dict) and "t_p" in d}
        for metric in metrics:
            family = [name for name, m in arms.items() if metric in m]
            for test in ("t_p", "wilcoxon_p"):
                for name, p in zip(family, holm([arms[name][metric][test] for name in family])):
                    arms[name][metric][f"{test}_holm"] = p


def describe(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean, 95% CI and both tests of one metric's per-seed differences."""
    mean, lo, hi = paired_ci(diffs)
    return {"n": int(sum(1 for d in diffs if d is not None and math.isfinite(d))), "mean": mean,
            "ci95": [lo, hi], **paired_tests(diffs), "values": list(diffs)}


# ---------------------------------------------------------------- cohorts of each arm


def random_cohorts(splits: Splits, mined_train: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    """Random disjoint user subsets whose train-row shares match the mined cohorts'."""
    rng = np.random.default_rng(10_007 + seed)
    users, counts = np.unique(splits.train.user_ids, return_counts=True)
    order = rng.permutation(len(users))
    cum = np.cumsum(counts[order])
    owner = np.full(len(users), -1)
    start = 0
    for c in range(k):
        want = int((mined_train == c).sum())
        end = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + want)) + 1
        owner[order[start:end]] = c
        start = end
    lookup = dict(zip(users.tolist(), owner.tolist()))
    return {s: np.array([lookup.get(u, -1) for u in getattr(splits, s).user_ids.tolist()], dtype=np.int64)
            for s in ("train", "valid", "test")}


def least_contrasting(miner: Any, k: int) -> Any:
    """A copy of the fitted miner exposing its k least contrasting qualified clusters instead.

    The clusters of one clusterer partition the rows, so any k of them are disjoint.
    """
    table = miner.candidates_
    pool = table[table["qualified"] & table["source"].isin(("kmeans", "gmm")) & (table["cohort"] < 0)]
    if len(pool):
        pool = pool[pool["source"] == pool["source"].iloc[0]]
    if len(pool) < k:
        raise C2ALError(f"least_contrast needs {k} qualified cluster candidates outside the mined cohorts, "
                        f"the miner has {len(pool)}; use --cohort-candidates kmeans or gmm")
    return miner.expose(pool.nsmallest(k, "contrast")["id"])


# ---------------------------------------------------------------- training and scoring


def train_c2al(cfg: Config, armed: Splits, arm: Arm, lam: float, info: DistInfo) -> tuple[Any, dict[str, Any]]:
    """Attach (the pipeline's `attach_heads`), fit (early-stopped) from the baseline's seeded start on `armed` (the
    splits carrying the arm's cohort ids), detach; returns the served model and facts."""
    acfg = dataclasses.replace(cfg, aux_cohorts=arm.k, aux_weight=(lam,), aux_head=arm.head)  # make_head maps clone to linear where over_arch has no parameters
    model = seeded_model(acfg, armed.schema)  # same seed: same start as the baseline
    wrapper = attach_heads(acfg, model, acfg.aux_weights(), towers=arm.towers, balance=arm.balance, aux_labels=arm.labels)
    before = [p.detach().clone() for p in wrapper.heads.parameters()]
    trained = fit(acfg, armed, wrapper, info, tag=arm.name)
    moved = [float((p.detach() - b).norm()) for p, b in zip(trained.model.heads.parameters(), before)]
    facts = {"train_seconds": trained.seconds, "head": acfg.aux_head, "head_params": len(before), "aux_weight": lam,
             "head_update_norm": float(np.sqrt(np.sum(np.square(moved)))) if moved else 0.0,
             "history": trained.history, "best": trained.best}
    return served_model(trained.model), facts  # shared-bottom: c2al.detach; mmoe: the main gate and experts stay


class ArmLoop:
    """The C2AL pipeline's training loop (`c2al.jobs.pipeline.Loop`) for one head arm: `train_c2al` per lambda, scored
    by its served model; `fit_candidates` runs it once per lambda and keeps auto's pick, as train.py does."""

    def __init__(self, cfg: Config, splits: Splits, arm: Arm, info: DistInfo) -> None:
        self.cfg, self.splits, self.arm, self.info = cfg, splits, arm, info

    def fit(self, armed: Splits, aux_weight: list[float], suffix: str) -> Candidate:
        served, facts = train_c2al(self.cfg, armed, self.arm, aux_weight[0], self.info)
        return Candidate(facts, served)

    def scores(self, candidate: Candidate, split: str) -> np.ndarray:
        return predict(candidate.served, getattr(self.splits, split), self.splits.schema, self.cfg.batch_size, self.info)

    def kept(self, trained: Any) -> dict[str, Any]:
        return {}  # the arm's row keeps its facts (best epoch included) beside its validation scores


def train_robust(cfg: Config, splits: Splits, ids: dict[str, np.ndarray], arm: Arm,
                 info: DistInfo) -> tuple[Any, dict[str, Any]]:
    """The plain model from the baseline's seeded start under Group DRO (mined cohorts + the rest) or CVaR."""
    objective = make_objective(arm.objective, counts=group_counts(ids["train"], arm.k), eta=cfg.dro_eta, adjust=cfg.dro_adjust,
                               alpha=cfg.cvar_alpha)
    trained = fit(cfg, splits.with_cohorts(ids), robust_model(seeded_model(cfg, splits.schema), objective), info, tag=arm.name)
    facts = {"train_seconds": trained.seconds, "history": trained.history, "best": trained.best, "objective": repr(objective)}
    if arm.objective == "group-dro":  # the kept epoch's group weights: cohort 0, cohort 1, the rest
        facts["group_weights"] = [float(v) for v in trained.model.objective.q]
    return unwrap(trained.model), facts


def valid_of(cfg: Config, splits: Splits, module: Any, mined: dict[str, np.ndarray], info: DistInfo) -> dict[str, Any]:
    """Validation NE overall and on the mined cohorts: what the gate and auto lambda read."""
    return valid_scores(predict(module, splits.valid, splits.schema, cfg.batch_size, info), splits.valid.labels, mined["valid"], 2)


def train_arm(cfg: Config, splits: Splits, ids: dict[str, np.ndarray], mined: dict[str, np.ndarray], arm: Arm,
              info: DistInfo, base_valid: dict[str, Any]) -> tuple[Any, np.ndarray, dict[str, Any], dict[str, Any]]:
    """One arm: (served model or None, test probabilities, validation scores on the mined cohorts, facts)."""
    if arm.kind == "feature":  # the mined cohort as one more sparse input field (0: reserved, 1: no cohort)
        fsplits = splits.with_feature("mined_cohort", {s: np.asarray(v) + 2 for s, v in mined.items()}, 4)
        trained = fit(cfg, fsplits, seeded_model(cfg, fsplits.schema), info, tag=arm.name)
        return None, predict(trained.module, fsplits.test, fsplits.schema, cfg.batch_size, info), \
            valid_of(cfg, fsplits, trained.module, mined, info), {"train_seconds": trained.seconds, "best": trained.best}
    if arm.kind == "bias":
        bsplits = splits.with_cohorts(mined)
        trained = fit(cfg, bsplits, seeded_model(cfg, splits.schema), info, tag=arm.name, cohort_bias=2)
        return None, predict(trained.module, bsplits.test, splits.schema, cfg.batch_size, info), \
            valid_of(cfg, bsplits, trained.module, mined, info), {"train_seconds": trained.seconds, "best": trained.best}
    if arm.kind == "regularised":
        return tuned_regularisation(cfg, splits, mined, arm, info)
    if arm.kind == "robust":
        served, facts = train_robust(cfg, splits, ids, arm, info)
        return served, predict(served, splits.test, splits.schema, cfg.batch_size, info), valid_of(cfg, splits, served, mined, info), facts
    grid = [[lam] for lam in (AUTO_GRID if arm.lam is None else (arm.lam,))]
    chosen, search = fit_candidates(cfg, ArmLoop(cfg, splits, arm, info), splits.with_cohorts(ids), grid, mined["valid"],
                                    splits.valid.labels, base_valid, 2)
    facts = chosen.trained if search is None else {**chosen.trained, "auto_candidates": search["candidates"]}
    return chosen.served, predict(chosen.served, splits.test, splits.schema, cfg.batch_size, info), chosen.valid, facts


def tuned_regularisation(cfg: Config, splits: Splits, mined: dict[str, np.ndarray], arm: Arm,
                         info: DistInfo) -> tuple[Any, np.ndarray, dict[str, Any], dict[str, Any]]:
    """lambda = 0 with dropout / weight decay picked on validation NE from REGULARISATION_GRID."""
    best = None
    for params in REGULARISATION_GRID:
        rcfg = dataclasses.replace(cfg, **params)
        trained = fit(rcfg, splits, seeded_model(rcfg, splits.schema), info, tag=arm.name)
        valid = valid_of(rcfg, splits, trained.module, mined, info)
        if best is None or valid["ne"] < best[2]["ne"]:
            best = (trained, params, valid)
    trained, params, valid = best
    return trained.model, predict(trained.module, splits.test, splits.schema, cfg.batch_size, info), valid, \
        {"train_seconds": trained.seconds, "best": trained.best, "regularisation": params}


def retrieval(model: Any, splits: Splits, info: DistInfo, k: int = RECALL_K) -> dict[str, float]:
    """recall@k / NDCG@k of test users' positive items over every item, train/valid items filtered."""
    got = retrieval_metrics(model, splits, info, ks=(k,))
    return {f"recall@{k}": got[f"recall@{k}"], f"ndcg@{k}": got[f"ndcg@{k}"]}


def attention_scalars(base_model: Any, model: Any, splits: Splits, cfg: Config, info: DistInfo) -> dict[str, Any]:
    att = attention_report(base_model, model, splits, cfg, info)
    return {m: att[m] for m in ("baseline", "c2al") if m in att}


def arm_cohorts(cfg: Config, splits: Splits, ids: dict[str, np.ndarray], miner: Any, arm: Arm, trained: Any,
                info: DistInfo) -> tuple[Any, dict[str, np.ndarray]]:
    """The cohorts an arm trains on: (their miner when they are not the mined ones, ids per split)."""
    if arm.cohorts == "random":
        arm_ids = random_cohorts(splits, ids["train"], arm.k, cfg.seed)
        own = copy.copy(miner)
        own.cohorts_ = [{"rule": f"random users {c}"} for c in range(arm.k)]
        own.contrast_ = np.full(arm.k, math.nan)
        return own, arm_ids
    if arm.cohorts == "least":
        own = least_contrasting(miner, arm.k)
        return own, {s: own.predict(cohort_frame(cfg, splits, s)) for s in ("train", "valid", "test")}
    if arm.cohorts == "kmeans":  # k-means candidates only: what mining without the tree's conjunctions finds
        tcfg = dataclasses.replace(cfg, aux_cohorts=arm.k, cohort_candidates="kmeans")
        with tempfile.TemporaryDirectory() as tmp:
            own = mine_cohorts(tcfg, splits, predict(trained.module, splits.valid, splits.schema, cfg.batch_size, info), Path(tmp), info,
                               null_test=False)
        return own, {s: own.predict(cohort_frame(cfg, splits, s)) for s in ("train", "valid", "test")}
    return None, {s: np.where(v < arm.k, v, -1) for s, v in ids.items()}  # K=1: cohort 0 only


def score_arm(cfg: Config, splits: Splits, base: dict[str, Any], p: np.ndarray, own: Any, own_ids: np.ndarray | None) -> dict[str, Any]:
    """Overall and mined-cohort NE against the baseline; own cohorts and planted ones where they differ."""
    rep = compare(dataclasses.replace(cfg, aux_cohorts=base["k"]), splits, base["ids"]["test"], base["p_test"], p, base["miner"])
    inside = base["ids"]["test"] >= 0
    y = splits.test.labels
    exposed = ne_diff_pct(summarize(p[inside], y[inside])["ne"], summarize(base["p_test"][inside], y[inside])["ne"])
    out = {"overall": rep["overall"], "exposed_ne_diff_pct": exposed, "cohorts": rep["cohorts"], "outside": rep["outside_cohorts"]}
    if own is not None:
        out["own_cohorts"] = compare(dataclasses.replace(cfg, aux_cohorts=len(own.cohorts_)), splits, own_ids,
                                     base["p_test"], p, own)["cohorts"]
    true = splits.test.true_cohorts
    if true is not None and (true >= 0).any():
        n = int(true.max()) + 1
        pb, pa = per_segment(base["p_test"], splits.test.labels, true, n), per_segment(p, splits.test.labels, true, n)
        out["planted"] = [{"id": b["id"], "share": b["share"], "ne_base": b["ne"], "ne_arm": a["ne"],
                           "ne_diff_pct": ne_diff_pct(a["ne"], b["ne"])} for b, a in zip(pb, pa)]
    return out


def run_model(cfg: Config, splits: Splits, arms: list[Arm], info: DistInfo, tick: Callable[[], Any]) -> list[dict[str, Any]]:
    """Baseline, mining, then every arm, for one (seed, model); tick() after each training."""
    spec = model_spec(cfg.model)  # what the model is judged by and predicts: its registry entry
    trained = fit(cfg, splits, seeded_model(cfg, splits.schema), info, tag="baseline")
    tick()
    with tempfile.TemporaryDirectory() as tmp:
        p_valid = predict(trained.module, splits.valid, splits.schema, cfg.batch_size, info)
        # the two most contrasting cohorts whether or not they beat the miner's permutation null: every arm is read on them
        miner = mine_cohorts(dataclasses.replace(cfg, aux_cohorts=2), splits, p_valid, Path(tmp), info, null_test=False)
    ids = {s: miner.predict(cohort_frame(cfg, splits, s)) for s in ("train", "valid", "test")}
    base = {"k": 2, "ids": ids, "miner": miner, "p_test": predict(trained.module, splits.test, splits.schema, cfg.batch_size, info)}
    base["valid"] = valid_of(cfg, splits, trained.module, ids, info)
    rows = [{"seed": cfg.seed, "model": cfg.model, "arm": "baseline", "train_seconds": trained.seconds,
             "ne": summarize(base["p_test"], splits.test.labels)["ne"], "valid": base["valid"], "best": trained.best,
             "mined": [{k: c[k] for k in ("rule", "share", "plr", "contrast")} for c in miner.cohorts_],
             "retrieval": retrieval(trained.model, splits, info) if spec.retrieval else {},
             "history": trained.history}]
    for arm in arms:
        own, arm_ids = arm_cohorts(cfg, splits, ids, miner, arm, trained, info)
        served, p, valid, facts = train_arm(cfg, splits, arm_ids, ids, arm, info, base["valid"])
        decision = judge_on_validation(base["valid"], valid, cfg.gate_tolerance)
        row = {"seed": cfg.seed, "model": cfg.model, "arm": arm.name, "spec": dataclasses.asdict(arm), **facts,
               "valid": valid, "decision": decision,
               **score_arm(cfg, splits, base, p, own, None if own is None else arm_ids["test"]),
               "attention": attention_scalars(trained.model, served, splits, cfg, info) if served is not None else {}}
        if spec.retrieval and served is not None:
            row["retrieval"] = retrieval(served, splits, info)
        rows.append(row)
        tick()
    return rows


_SPLITS: dict[str, Splits] = {}  # per process: a worker loads the data once for all its tasks


def setup_process(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_process()


def quiet_process() -> None:
    quiet_libraries()
    logging.getLogger("c2al").setLevel(logging.WARNING)  # training's per-epoch lines: many trainings run here


def run_task(base: Config, seed: int, model: str, arm_names: list[str], progress: Any = None) -> list[dict[str, Any]]:
    """One (seed, model) in this process or a worker: the same rows either way (seeded per training).

    Args:
        base: the benchmark's config; its data split is shared by every task (seed 0's split
            for random splits), exactly as in a one-process run.
        progress: anything with put(1), called after each training (a queue, a bar's update), or None.
    """
    info = init_distributed("cpu")
    tick = (lambda: progress.put(1)) if progress is not None else (lambda: None)
    return run_model(dataclasses.replace(base, seed=seed, model=model), splits_of(base), [ARMS[a] for a in arm_names], info, tick)


def splits_of(base: Config) -> Splits:
    key = repr(base)
    if key not in _SPLITS:
        _SPLITS[key] = load_splits(base)
    return _SPLITS[key]


# ---------------------------------------------------------------- summary, table, plot


def metric_values(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """The per-seed differences summarized for one arm row (NE_diff %, retrieval deltas)."""
    out = {"overall": row["overall"]["ne_diff_pct"], "exposed": row["exposed_ne_diff_pct"]}
    shipped = row.get("decision", {}).get("shipped") == "c2al"  # the gate ships the baseline otherwise: no change
    out["shipped_overall"] = out["overall"] if shipped else 0.0
    out["shipped_exposed"] = out["exposed"] if shipped else 0.0
    for c in row["cohorts"]:
        out[f"cohort_{c['id']}"] = c["ne_diff_pct"]
    for c in row.get("own_cohorts", []):
        out[f"own_cohort_{c['id']}"] = c["ne_diff_pct"]
    for c in row.get("planted", []):
        out[f"planted_{c['id']}"] = c["ne_diff_pct"]
    for key, value in row.get("retrieval", {}).items():
        out[f"{key}_diff"] = value - base["retrieval"][key]
    return out


def attention_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm and activity scalar: mean over seeds of the baseline's and the arm's value, and their paired difference."""
    out: dict[str, dict[str, Any]] = {}
    by_scalar: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        att = r.get("attention") or {}
        for key in att.get("baseline", {}):
            vals = by_scalar.setdefault(key, {"baseline": [], "arm": []})
            vals["baseline"].append(att["baseline"][key])
            vals["arm"].append(att["c2al"][key])
    for key, v in by_scalar.items():
        out[key] = {"baseline": float(np.mean(v["baseline"])), "arm": float(np.mean(v["arm"])),
                    "diff": describe([a - b for a, b in zip(v["arm"], v["baseline"])])}
    return out


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, arm) and metric: mean, 95% CI, t and Wilcoxon p over seeds; controls also against c2al."""
    bases = {(r["model"], r["seed"]): r for r in rows if r["arm"] == "baseline"}
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        if r["arm"] != "baseline":
            for k, v in metric_values(r, bases[(r["model"], r["seed"])]).items():
                values.setdefault((r["model"], r["arm"]), {}).setdefault(k, []).append(v)
    summary: dict[str, Any] = {}
    for (model, arm), metrics in values.items():
        summary.setdefault(model, {})[arm] = {k: describe(v) for k, v in metrics.items()}
        arm_rows = [r for r in rows if r["model"] == model and r["arm"] == arm]
        summary[model][arm]["gate_kept"] = f"{sum(r['decision']['shipped'] == 'baseline' for r in arm_rows)}/{len(arm_rows)}"
        att = attention_summary(arm_rows)
        if att:
            summary[model][arm]["attention"] = att
    by_seed = {(r["model"], r["arm"], r["seed"]): r for r in rows}
    for model, arms in summary.items():
        for arm in arms:
            if arm == "c2al" or (model, "c2al") not in values:
                continue
            seeds = sorted(s for (m, a, s) in by_seed if m == model and a == arm and (m, "c2al", s) in by_seed)
            diff = {k: [metric_values(by_seed[(model, arm, s)], bases[(model, s)])[k]
                        - metric_values(by_seed[(model, "c2al", s)], bases[(model, s)])[k] for s in seeds]
                    for k in ("overall", "exposed", "cohort_0", "cohort_1")
                    if k in arms[arm] and k in summary[model]["c2al"]}
            arms[arm]["minus_c2al"] = {k: describe(v) for k, v in diff.items()}
    add_holm(summary)
    return summary


def cell(d: dict[str, Any] | None, digits: int = 2) -> str:
    if not d or not math.isfinite(d["mean"]):
        return "-"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f},{hi:+.{digits}f}]"


def pval(d: dict[str, Any] | None, key: str) -> str:
    return "-" if not d or not math.isfinite(d[key]) else f"{d[key]:.3f}"


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for model, arms in summary.items():
        for arm, m in arms.items():
            out.append({"model": model, "arm": arm, "overall": cell(m.get("overall")), "p_t": pval(m.get("overall"), "t_p"),
                        "p_t holm": pval(m.get("overall"), "t_p_holm"), "p_wilcoxon": pval(m.get("overall"), "wilcoxon_p"),
                        "exposed": cell(m.get("exposed")), "p_exp": pval(m.get("exposed"), "t_p"),
                        "p_exp holm": pval(m.get("exposed"), "t_p_holm"),
                        "cohort 0": cell(m.get("cohort_0")), "cohort 1": cell(m.get("cohort_1")),
                        "shipped (gate)": cell(m.get("shipped_overall")), "gate kept base": m.get("gate_kept", "-"),
                        "vs c2al (exposed)": cell(m.get("minus_c2al", {}).get("exposed"))})
    return out


def print_summary(summary: dict[str, Any], n_seeds: int) -> None:
    cols = ["model", "arm", "overall", "p_t", "p_t holm", "p_wilcoxon", "exposed", "p_exp", "p_exp holm", "cohort 0", "cohort 1",
            "shipped (gate)", "gate kept base", "vs c2al (exposed)"]
    print(format_table(table_rows(summary), cols, title=f"test NE_diff % vs baseline on the mined cohorts, mean [95% CI] "
                                                         f"over {n_seeds} seeds (< 0 is better); p: paired t-test / Wilcoxon, "
                                                         f"holm: Holm-adjusted over the model's arms"))
    extra = []
    for model, arms in summary.items():
        for arm, m in arms.items():
            keys = [k for k in m if k.startswith(("own_", "planted_", "recall", "ndcg"))]
            extra += [{"model": model, "arm": arm, "metric": k, "mean [95% CI]": cell(m[k], 3 if "@" in k else 2),
                       "p_t": pval(m[k], "t_p")} for k in keys]
    if extra:
        print(format_table(extra, ["model", "arm", "metric", "mean [95% CI]", "p_t"],
                           title="own / planted cohorts (NE_diff %), retrieval deltas (arm - baseline)"))
    att = [{"model": model, "arm": arm, "scalar": key, "baseline": v["baseline"], "arm value": v["arm"],
            "diff [95% CI]": cell(v["diff"], 4), "p_t": pval(v["diff"], "t_p")}
           for model, arms in summary.items() for arm, m in arms.items() for key, v in m.get("attention", {}).items()]
    if att:
        print(format_table(att, ["model", "arm", "scalar", "baseline", "arm value", "diff [95% CI]", "p_t"],
                           title="attention activity on a test batch, mean over seeds (arm - baseline)"))


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [(model, arm) for model, arms in summary.items() for arm in arms]
    panels = ("overall", "exposed", "shipped_overall")
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.38 * len(labels) + 1.6), sharey=True)
    y = np.arange(len(labels))[::-1]
    for ax, key in zip(axes, panels):
        for yi, (model, arm) in zip(y, labels):
            d = summary[model][arm].get(key)
            if d and math.isfinite(d["mean"]):
                lo, hi = d["ci95"]
                color = "tab:green" if hi < 0 else "tab:red" if lo > 0 else "tab:gray"
                ax.errorbar(d["mean"], yi, xerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{key.replace('_', ' ')} NE_diff %")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{m}: {a}" for m, a in labels])
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="tab:green", label="95% CI below 0 (better)"), Patch(color="tab:red", label="95% CI above 0 (worse)"),
                        Patch(color="tab:gray", label="95% CI spans 0")], loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the legend under the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"movielens-100k (default), synthetic (here: {SYNTHETIC}), "
                                                  "synthetic:opts, or a CSV/Parquet PATH")
    add_config_flags(ap, DATA_FLAGS + MINER_FLAGS + TRAIN_FLAGS + BASELINE_FLAGS)
    harness.add_seeds_flag(ap, None, what="every (model, arm) (default 5, i.e. 0..4; --quick 2)")
    ap.add_argument("--models", default=None, help=f"comma-separated from {MODELS} (default all; --quick afm,two-tower)")
    ap.add_argument("--arms", default=None, help=f"arms run on the --control-models, from {list(ARMS)} (default all)")
    ap.add_argument("--control-models", default=None,
                    help="comma-separated models that run every arm; the others run c2al only (default: every model; --quick afm)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default Config's; --quick 1)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: fastest on a busy 2-core machine)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes training (seed, model) tasks side by side (default: min(2, cores); --quick 2); "
                         "rows are identical for any number")
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data, 1 epoch, 2 seeds, few arms (CI)")
    ap.add_argument("--out", default="", help="result JSON path (the PNG goes beside it); required with --quick")
    ap.add_argument("--parts", type=Path, default=None,
                    help="folder of the per-(seed, model) task files, kept as each task ends and reused by the next run "
                         "(default runs/minority_ne/<result name>; none with --quick unless given)")
    ap.add_argument("--redo", action="store_true", help="train every task again even where its file is in --parts")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line the result file names
    if args.quick and not args.out:
        ap.error("--quick needs --out PATH.json so it never overwrites committed results")
    args.data = args.data or (QUICK_DATA if args.quick else "movielens-100k")
    if args.data == "synthetic":
        args.data = SYNTHETIC
    narrowed = DATA_DEFAULTS.get(args.data, {})
    for name, value in narrowed.items():
        if getattr(args, name, None) is None:  # train.py flags are absent when not given, the tool's own are None
            setattr(args, name, value)
    args.seeds = args.seeds or harness.seed_list(2 if args.quick else 5)
    args.models = [m.strip() for m in (args.models or ("afm,two-tower" if args.quick else ",".join(MODELS))).split(",")]
    args.arms = [a.strip() for a in (args.arms or (",".join(QUICK_ARMS) if args.quick else ",".join(ARMS))).split(",")]
    args.control_models = [m.strip() for m in (args.control_models or ("afm" if args.quick else ",".join(args.models))).split(",")]
    args.workers = args.workers or (2 if args.quick else min(2, os.cpu_count() or 1))
    if args.workers < 1 or args.threads < 1:
        ap.error("--workers and --threads must be >= 1")
    bad = [m for m in args.models + args.control_models if m not in MODELS] + [a for a in args.arms if a not in ARMS]
    if bad:
        ap.error(f"unknown model/arm {bad}; models {MODELS}, arms {list(ARMS)}")
    if "c2al" not in args.arms:
        args.arms.insert(0, "c2al")
    if args.parts is None and not args.quick:
        args.parts = harness.ROOT / "runs" / "minority_ne" / result_path(args).stem
    return args


def base_config(args: argparse.Namespace) -> Config:
    """Config from the train.py flags given (data roles, miner options), quiet, on the CPU."""
    overrides: dict[str, Any] = {"data": args.data, "quiet": True, "device": "cpu"}
    if args.epochs or args.quick:
        overrides["epochs"] = args.epochs or 1
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    return config_from(args, **overrides)


def plan(args: argparse.Namespace, n_train: int, epochs: int) -> list[tuple[str, list[Arm]]]:
    per_seed = [(m, [ARMS[a] for a in (args.arms if m in args.control_models else ["c2al"]) if a not in NOT_ON.get(m, ())])
                for m in args.models]
    skipped = [f"{a} on {m}" for m in args.models if m in args.control_models for a in args.arms if a in NOT_ON.get(m, ())]
    if skipped:
        print(f"skipped (the model cannot run the arm): {', '.join(skipped)}")
    runs = len(args.seeds) * sum(1 + len(arms) for _, arms in per_seed)
    est = len(args.seeds) * sum((1 + len(arms)) * EPOCH_SECONDS[m] * epochs * n_train / 81_000 + 4 for m, arms in per_seed)
    print(f"plan: {len(args.seeds)} seeds x " + ", ".join(f"{m}: baseline + {[a.name for a in arms]}" for m, arms in per_seed))
    print(f"      {runs} trainings of {epochs} epoch(s) on {n_train} train rows, estimated {est / 60 / args.workers:.1f} min "
          f"on {args.workers} worker(s) of {args.threads} thread(s) on an idle machine")
    return per_seed


def result_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    name = "synthetic" if args.data == SYNTHETIC else Path(args.data).stem if Path(args.data).suffix else args.data
    return RESULTS / f"minority_ne_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.json"


def task_file(parts: Path, cfg: Config, task: tuple[int, str, list[str]]) -> Path:
    """Where one (seed, model) task's rows are kept: named by what decides them (config, seed, model, arms)."""
    seed, model, arms = task
    key = json.dumps({"config": cfg.to_dict(), "seed": seed, "model": model, "arms": arms}, sort_keys=True, default=str)
    return parts / f"seed{seed}-{model}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def run_tasks(cfg: Config, tasks: list[tuple[int, str, list[str]]], args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Every task's rows, in task order, from this process or a pool of spawned workers.

    Each task's rows are written to `args.parts` as soon as it ends, and a task whose file is there
    (same config, seed, model and arms) is read instead of trained again, so a grid of hours can span
    sessions and a killed run costs only the tasks in flight; `--redo` trains them all again.
    """
    files = [task_file(args.parts, cfg, t) for t in tasks] if args.parts else [None] * len(tasks)
    done = {i: json.loads(f.read_text())["rows"] for i, f in enumerate(files) if f is not None and f.exists() and not args.redo}
    if done:
        print(f"{len(done)} of {len(tasks)} (seed, model) tasks read from {args.parts} (--redo trains them again)")
    todo = [i for i in range(len(tasks)) if i not in done]
    bar = tqdm(total=len(todo), desc="(seed, model) tasks", dynamic_ncols=True, disable=not todo)

    def keep(j: int, rows: list[dict[str, Any]]) -> None:
        i = todo[j]
        if files[i] is not None:
            write_json({"task": list(tasks[i]), "git": harness.git_state(), "rows": rows}, files[i])
        bar.update(1)

    with bar:
        fresh = harness.run_pool(run_task, [(cfg, *tasks[i]) for i in todo], args.workers, args.threads,
                                 initializer=quiet_process, on_result=keep)
    done.update(zip(todo, fresh))
    return [done[i] for i in range(len(tasks))]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    threads = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # when called in-process (tests), leave the caller's setting as it was


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_process(args.threads)
    start = time.perf_counter()
    cfg = base_config(args)
    header = harness.start(__file__, args.argv, {"base": cfg.to_dict(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                                 "two_tower_head": "linear (its output head is a parameter-free sum)", "at": SHARED_AT},
                           torch_threads=args.threads)
    splits = splits_of(cfg)
    per_seed = plan(args, len(splits.train), cfg.epochs)
    tasks = [(seed, model, [a.name for a in arms]) for seed in args.seeds for model, arms in per_seed]
    rows = [row for task_rows in run_tasks(cfg, tasks, args) for row in task_rows]
    summary = summarize_rows(rows)
    print_summary(summary, len(args.seeds))
    path = result_path(args)
    header.config["arms"] = {a.name: dataclasses.asdict(a) for _, arms in per_seed for a in arms}
    result = harness.write_result(path, header, {"data": args.data, "seeds": list(args.seeds), "quick": args.quick,
                                                 "seconds": time.perf_counter() - start, "summary": summary, "rows": rows})
    plot(summary, path.with_suffix(".png"), f"C2AL vs baseline, {args.data}, {len(args.seeds)} seeds (95% CI)")
    print(f"wrote {path} and {path.with_suffix('.png')} in {result['seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
