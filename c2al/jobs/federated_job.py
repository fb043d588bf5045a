"""The federated jobs of train.py: `--federated` and `--federated --aux-cohorts`.

Baseline: rounds of federated training, then per-tier (and planted-cohort)
test metrics. C2AL: baseline rounds, federated cohort mining on the clients'
validation predictions, C2AL rounds from the same seed with auxiliary heads
(`c2al.attach`) trained on labels each client builds from its own cohort id,
heads stripped (`c2al.detach`), and the report of `c2al.eval.compare.compare`
plus per-tier NE, MDAC and the agreement of federated with centralized mining.
`--aux-weight auto` follows the centralized job's rule: C2AL rounds once per lambda of
`AUTO_GRID`, and `choose_aux_weight` keeps one on the clients' validation rows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from c2al.config import RESUME_FIELDS, Config
from c2al.data.schema import Splits, Table
from c2al.errors import C2ALError
from c2al.eval.compare import kept
from c2al.eval.metrics import ne_diff_pct, per_segment, summarize
from c2al.eval.report import format_table, write_json
from c2al.federated.aggregate import mdac
from c2al.federated.attacks import attack_client_fn, choose_attackers
from c2al.federated.client import (
    ClientData,
    LocalTrainer,
    group_by_user,
    model_layout,
    per_user_features,
)
from c2al.federated.heterogeneity import TIERS, TierSpec, assign_tiers
from c2al.federated.mining import FederatedCohortMiner
from c2al.federated.simulation import CPU, Evaluate, FedTrained, run_rounds
from c2al.federated.strategy import Aggregation, make_strategy
from c2al.jobs.pipeline import Candidate, attach_heads, cohort_frame, publish, run_c2al_pipeline, served_model
from c2al.models.registry import model_spec
from c2al.train.build import seeded_model
from c2al.train.task import TrainModule, predict

log = logging.getLogger(__name__)
EVAL_EVERY = 5  # rounds between validation evaluations when --eval-every is 0


def tier_spec(cfg: Config) -> TierSpec:
    if cfg.tiers == "none":
        return TierSpec.uniform()
    return TierSpec(shares=cfg.tier_shares, availability=cfg.tier_availability, dropout=cfg.tier_dropout, steps=cfg.tier_steps,
                    exclude_low=cfg.exclude_low)


def make_clients(splits: Splits) -> list[ClientData]:
    """One client per user with training rows; it also holds that user's valid and test rows."""
    by = {name: group_by_user(getattr(splits, name)) for name in ("train", "valid", "test")}
    empty = np.zeros(0, dtype=np.int64)
    return [ClientData(cid=i, user=u, train=rows, valid=by["valid"].get(u, empty), test=by["test"].get(u, empty))
            for i, (u, rows) in enumerate(sorted(by["train"].items()))]


def check_federated(cfg: Config, population: int) -> None:
    """What only the data decides: a round cannot sample more clients than hold training rows (every value a field
    alone decides, its range included, Config.check has refused already)."""
    if cfg.clients_per_round > population:
        raise C2ALError(f"--clients-per-round must be in [1, {population}] (the clients holding training rows), got {cfg.clients_per_round}")


def client_tiers(cfg: Config, splits: Splits, clients: list[ClientData]) -> np.ndarray:
    """Tier per client; correlated tiers follow --tier-feature (or the first numeric cohort feature, else activity)."""
    spec = tier_spec(cfg)
    feature = np.array([len(c.train) for c in clients], dtype=np.float64)  # activity
    frame = splits.train.cohort_frame
    name = cfg.tier_feature
    if not name and frame is not None:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        name = numeric[0] if numeric else "activity"
    if name and name != "activity":
        if frame is None or name not in frame.columns:
            raise C2ALError(f"unknown --tier-feature {name!r}; available: {[] if frame is None else list(frame.columns)} or activity")
        col = frame[name]
        values = col.to_numpy(dtype=np.float64) if pd.api.types.is_numeric_dtype(col) else pd.factorize(col)[0].astype(np.float64)
        feature = np.array([values[c.train[0]] for c in clients])
    t = splits.train  # RF^2's rules: training rows per client, the items of its positive training rows
    clicked = [t.item_ids[c.train][t.labels[c.train] > 0] for c in clients] if cfg.tiers == "rf2-dirichlet" else None
    return assign_tiers(len(clients), cfg.tiers, spec, cfg.seed, feature=feature, skew=cfg.tier_skew,
                        counts=np.array([len(c.train) for c in clients]), clicked=clicked)


def train_module(cfg: Config, model: nn.Module) -> TrainModule:
    if cfg.two_tower_hinge:
        from c2al.train.task import HingeTrainModule

        return HingeTrainModule(model)
    return TrainModule(model, loss=model_spec(cfg.model).loss(cfg))  # bce or softmax: the model's registry entry says


def aggregation(cfg: Config, spec: TierSpec) -> Aggregation:
    """--aggregation and its options; no client can have trained on more examples than its step budget allows."""
    budget = max(spec.steps) * cfg.local_batch_size if min(spec.steps) > 0 else 0
    return Aggregation(cfg.aggregation, trim_fraction=cfg.trim_fraction, clip_norm=cfg.clip_norm, krum_f=cfg.krum_f,
                       count_cap=cfg.count_cap, max_examples=budget)


def federated_fit(cfg: Config, splits: Splits, model: nn.Module, clients: list[ClientData], tiers: np.ndarray,
                  checkpoint: Path | None, tag: str, *, evaluate: Evaluate | None = None) -> FedTrained:
    """Rounds of the configured engine over `clients`, from `model`'s (seeded) weights, early-stopped on
    validation (`validation`; `evaluate` replaces it, e.g. to also record what a benchmark measures)."""
    module = train_module(cfg, model)
    layout = model_layout(module.model, per_user_features(splits.train, splits.schema))
    trainer = LocalTrainer(module, layout, splits.schema, splits.train, dense_optimizer=cfg.dense_optimizer, lr=cfg.lr,
                           table_optimizer=cfg.table_optimizer, table_lr=cfg.table_lr, batch_size=cfg.local_batch_size,
                           weight_decay=cfg.weight_decay, normalized=cfg.normalized_updates)
    spec = tier_spec(cfg)
    strategy = make_strategy(cfg.server_optimizer, layout, cfg.clients_per_round, server_lr=cfg.server_lr,
                             proximal_mu=cfg.proximal_mu, epochs=cfg.local_epochs, sam_rho=cfg.sam_rho, seed=cfg.seed,
                             aggregation=aggregation(cfg, spec))
    criterion = "recall@10" if retrieval_loss(cfg) else "ne"
    kw = dict(rounds=cfg.rounds, seed=cfg.seed, spec=spec, checkpoint=checkpoint, resume=cfg.resume,
              config=cfg.to_dict(), shape_keys=RESUME_FIELDS, show=not cfg.quiet, tag=tag, criterion=criterion,
              evaluate=evaluate or (lambda fed: validation(cfg, splits, fed, criterion)), eval_every=cfg.eval_rounds or cfg.eval_every or EVAL_EVERY,
              patience=cfg.patience)  # both engines stop early by the same rule
    if cfg.engine == "flower":
        if cfg.attack != "none":
            raise C2ALError("--attack is simulated by --engine simulation only")
        from c2al.federated.flower import run_rounds_flower

        return run_rounds_flower(trainer, strategy, clients, tiers, cfg=cfg, splits=splits, **kw)
    attackers = choose_attackers(len(clients), cfg.attack_share, cfg.seed) if cfg.attack != "none" else np.zeros(0, np.int64)
    if len(attackers):
        log.info(f"[{tag}] attack {cfg.attack} by {len(attackers)} of {len(clients)} clients (--attack-scale {cfg.attack_scale:g})")
    return run_rounds(trainer, strategy, clients, tiers, workers=cfg.workers, parallel=cfg.parallel_clients,
                      client_fn=attack_client_fn(cfg.attack, attackers, cfg.attack_scale), **kw)


def retrieval_loss(cfg: Config) -> bool:
    """A two-tower trained for retrieval (in-batch softmax or the hinge): its dot products rank items but are
    no calibrated logits, so it is judged, like the centralized loop judges it, by validation recall@10."""
    return model_spec(cfg.model).criterion(cfg) != "ne"


def validation(cfg: Config, splits: Splits, fed: FedTrained, criterion: str = "ne") -> dict[str, Any]:
    """Validation metrics of the global model with every client's private rows: NE and AUC, and for
    criterion "recall@10" the recall over the full catalog (train items filtered)."""
    out = summarize(fed.predict("valid", splits, cfg.batch_size), splits.valid.labels)
    if criterion != "ne":
        from c2al.eval.retrieval import retrieval_metrics

        out[criterion] = retrieval_metrics(fed.model, splits, CPU, batch_size=max(cfg.batch_size, 1024), ks=(10,), split="valid")[criterion]
    return out


def row_tiers(table: Table, clients: list[ClientData], tiers: np.ndarray) -> np.ndarray:
    """Tier of each row's user (-1 for users without a client)."""
    lookup = {c.user: int(tiers[c.cid]) for c in clients}
    return np.array([lookup.get(int(u), -1) for u in table.user_ids], dtype=np.int64)


def tier_rows(p_base: np.ndarray, p_new: np.ndarray | None, labels: np.ndarray, row_tier: np.ndarray) -> list[dict[str, Any]]:
    rows_b = per_segment(p_base, labels, row_tier, len(TIERS))
    rows_n = per_segment(p_new, labels, row_tier, len(TIERS)) if p_new is not None else rows_b
    out = []
    for t, (rb, rn) in enumerate(zip(rows_b, rows_n)):
        row = {"tier": TIERS[t], "n": rb["n"], "share": rb["share"], "plr": rb["plr"], "ne_base": rb["ne"], "auc_base": rb["auc"]}
        if p_new is not None:
            row.update(ne_c2al=rn["ne"], auc_c2al=rn["auc"], ne_diff_pct=ne_diff_pct(rn["ne"], rb["ne"]))
        out.append(row)
    return out


def federated_summary(cfg: Config, clients: list[ClientData], tiers: np.ndarray, phases: dict[str, FedTrained],
                      tier_table: list[dict[str, Any]]) -> dict[str, Any]:
    spec = tier_spec(cfg)
    summary = {
        "engine": cfg.engine, "rounds": cfg.rounds, "clients_per_round": cfg.clients_per_round, "population": len(clients),
        "server_optimizer": cfg.server_optimizer, "local_epochs": cfg.local_epochs, "local_batch_size": cfg.local_batch_size,
        "sam_rho": cfg.sam_rho, "proximal_mu": cfg.proximal_mu if cfg.server_optimizer == "fedprox" else None,
        "tiers": {"mode": cfg.tiers, "names": list(TIERS), "clients": np.bincount(tiers, minlength=len(TIERS)).tolist(),
                  "availability": list(spec.availability), "dropout": list(spec.dropout), "steps": list(spec.steps)},
        "history": {k: v.history for k, v in phases.items()},  # per round; evaluated rounds carry valid_ne / valid_auc
        "best": {k: v.best for k, v in phases.items()},  # the evaluation whose state was kept (rounds: rounds done then)
        "train_seconds": {k: v.seconds for k, v in phases.items()},
    }
    if tier_table and "ne_c2al" in tier_table[0]:
        summary["mdac"] = mdac([r["ne_c2al"] for r in tier_table], [r["ne_base"] for r in tier_table])
    return summary


def run_federated(cfg: Config, splits: Splits, out: Path) -> dict[str, Any]:
    """`train.py --federated` (and `--aux-cohorts`): returns the report written to OUT/report.json."""
    clients = make_clients(splits)
    check_federated(cfg, len(clients))
    tiers = client_tiers(cfg, splits, clients)
    log.info(f"federated: {len(clients)} clients, {cfg.clients_per_round} per round, {cfg.rounds} rounds, {cfg.server_optimizer}, "
          f"tiers {cfg.tiers} (low/mid/high: {np.bincount(tiers, minlength=len(TIERS)).tolist()})")
    if cfg.aux_cohorts:
        return run_federated_c2al(cfg, splits, clients, tiers, out)
    trained = federated_fit(cfg, splits, seeded_model(cfg, splits.schema), clients, tiers, out / "fed_checkpoint.pt", "federated")
    probs = trained.predict("test", splits, cfg.batch_size)
    test = splits.test
    tier_table = tier_rows(probs, None, test.labels, row_tiers(test, clients, tiers))
    segments = []
    if test.true_cohorts is not None and (test.true_cohorts >= 0).any():
        segments = per_segment(probs, test.labels, test.true_cohorts, int(test.true_cohorts.max()) + 1)
    report = {"config": cfg.to_dict(), "overall": summarize(probs, test.labels), "segments": segments, "tiers": tier_table,
              "best": trained.best, "federated": federated_summary(cfg, clients, tiers, {"train": trained}, tier_table)}
    log.info(format_table([report["overall"]], ["n", "plr", "ne", "auc", "logloss", "calibration"],
                          title=f"test split ({cfg.model}, federated, {kept(trained.best, 'round')})"))
    log.info(format_table(tier_table, ["tier", "n", "share", "plr", "ne_base", "auc_base"], title="per device tier"))
    write_json(report, out / "report.json")
    log.info(f"wrote {out / 'report.json'}")
    return report


def run_federated_c2al(cfg: Config, splits: Splits, clients: list[ClientData], tiers: np.ndarray, out: Path,
                       base: FedTrained | None = None) -> dict[str, Any]:
    """Baseline rounds (or the given `base`, trained with this cfg and seed), federated mining, C2AL rounds
    (one lambda, or each of --aux-weight auto's), the validation gate, report: `pipeline.run_c2al_pipeline`
    with federated rounds, plus per-tier NE, MDAC and the agreement of federated with centralized mining."""
    loop = FederatedLoop(cfg, splits, clients, tiers, out, base)
    run = run_c2al_pipeline(cfg, splits, loop, out)
    report = run.report
    p_base = run.p_test["baseline"] if run.chosen is not None else loop.scores(run.base, "test")
    p_c2al = run.p_test.get("c2al")
    tier_table = tier_rows(p_base, p_c2al, splits.test.labels, row_tiers(splits.test, clients, tiers))
    phases = {"baseline": run.base.trained} | ({"c2al": run.chosen.trained} if run.chosen is not None else {})
    report["tiers"] = tier_table
    report["federated"] = federated_summary(cfg, clients, tiers, phases, tier_table)
    report["federated"]["mining"] = loop.agreement
    report.setdefault("miner", {})["federated"] = True

    def federated_lines() -> None:
        log.info(format_table(tier_table, ["tier", "n", "share", "plr", "ne_base", "ne_c2al", "ne_diff_pct"],
                              title="per device tier (NE_diff % < 0 is better)"))
        log.info(f"MDAC (largest pairwise tier difference of the relative NE change): {report['federated']['mdac']:.6f}")
        log.info(f"federated vs centralized mining on validation rows: ARI {loop.agreement['ari']:.3f} of the exposed cohorts, "
                 f"{loop.agreement.get('kmeans_ari', float('nan')):.3f} of the k-means clusters")

    publish(run, out, CPU, f"{out / 'c2al.pt'}", then=federated_lines)
    return report


class FederatedLoop:
    """`pipeline.Loop` of train.py's federated job: rounds over the clients, early-stopped on their validation rows.

    The baseline trains to OUT/fed_baseline.pt (or is given); the miner is `FederatedCohortMiner` over each client's
    own validation rows (features, the baseline's scores, labels), its agreement with the centralized miner kept in
    `agreement`; clients compute their own cohort ids from the broadcast centroids (vectorized here). Each C2AL
    training goes to OUT/fed_c2al{suffix}.pt and is installed, its served model detached at once: the federated
    scores (`FedTrained.predict`, or the scores the Flower clients computed) are the served model's.
    """

    info = CPU

    def __init__(self, cfg: Config, splits: Splits, clients: list[ClientData], tiers: np.ndarray, out: Path,
                 base: FedTrained | None = None) -> None:
        self.cfg, self.splits, self.clients, self.tiers, self.out = cfg, splits, clients, tiers, out
        self.given = base
        self.base: Candidate | None = None
        self.agreement: dict[str, Any] = {}

    def baseline(self) -> Candidate:
        cfg, splits = self.cfg, self.splits
        trained = self.given or federated_fit(cfg, splits, seeded_model(cfg, splits.schema), self.clients, self.tiers,
                                              self.out / "fed_baseline.pt", "baseline")
        self.base = Candidate(trained, trained.model)
        return self.base

    def mine(self, p_valid: np.ndarray) -> Any:
        cfg, splits, clients = self.cfg, self.splits, self.clients
        frame = cohort_frame(cfg, splits, "valid")
        miner = FederatedCohortMiner(cfg.aux_cohorts, n_clusters=cfg.n_clusters, divergence=cfg.divergence, min_share=cfg.min_share,
                                     max_share=cfg.max_share, iters=cfg.kmeans_iters, random_state=cfg.seed)
        miner.fit([frame.iloc[c.valid] for c in clients], [splits.valid.labels[c.valid] for c in clients], [p_valid[c.valid] for c in clients])
        self.agreement = mining_agreement(cfg, splits, miner, frame, p_valid)
        return miner

    def with_cohorts(self, miner: Any, ids: dict[str, np.ndarray]) -> Any:
        return self.splits.with_cohorts({"train": miner.predict(cohort_frame(self.cfg, self.splits, "train")), **ids})

    def fit(self, splits: Any, aux_weight: list[float], suffix: str) -> Candidate:
        wrapper = attach_heads(self.cfg, seeded_model(self.cfg, splits.schema), aux_weight, balance=self.cfg.aux_balance)  # the baseline's seed
        tag = f"c2al lambda={aux_weight[0]:g}" if suffix else "c2al"
        trained = federated_fit(self.cfg, splits, wrapper, self.clients, self.tiers, self.out / f"fed_c2al{suffix}.pt", tag)
        trained.install()
        return Candidate(trained, served_model(wrapper))

    def scores(self, candidate: Candidate, split: str) -> np.ndarray:
        """The global model's probabilities with every client's rows; --engine flower: a C2AL candidate's scores
        as its clients computed them with the wrapper's main output (equal to the stripped model's)."""
        if candidate is self.base:
            return candidate.trained.predict(split, self.splits, self.cfg.batch_size)
        if split in candidate.trained.scores:
            return candidate.trained.scores[split]
        return predict(candidate.served, getattr(self.splits, split), self.splits.schema, self.cfg.batch_size)

    def kept(self, trained: FedTrained) -> dict[str, Any]:
        return {"best_round": trained.best.get("rounds")}


def mining_agreement(cfg: Config, splits: Splits, fed: FederatedCohortMiner, frame: pd.DataFrame, scores: np.ndarray) -> dict[str, Any]:
    """Agreement of federated cohorts with the centralized CohortMiner's on the same rows and scores.

    The centralized miner sees every raw feature; it is run here only as a
    reference (a real federation could not).
    """
    from sklearn.metrics import adjusted_rand_score

    from c2al.cohorts import CohortMiner
    from c2al.cohorts.encoding import nearest_center

    central = CohortMiner(n_cohorts=cfg.aux_cohorts, candidates="kmeans", n_clusters=cfg.n_clusters, divergence=cfg.divergence,
                          min_share=cfg.min_share, max_share=cfg.max_share, random_state=cfg.seed)
    try:
        central.fit(frame, splits.valid.labels, scores=scores)
    except C2ALError as e:
        return {"ari": float("nan"), "error": str(e)}
    a, b = fed.predict(frame), central.predict(frame)
    # the two k-means partitions themselves: both live in the same standardized one-hot space
    central_clusters = nearest_center(fed.encoding_.encode(frame), central.cluster_centers_)
    jaccard = [[float(((a == i) & (b == j)).sum() / max(((a == i) | (b == j)).sum(), 1)) for j in range(cfg.aux_cohorts)]
               for i in range(cfg.aux_cohorts)]
    return {"ari": float(adjusted_rand_score(a, b)), "kmeans_ari": float(adjusted_rand_score(fed.clusters(frame), central_clusters)),
            "jaccard": jaccard,
            "federated": [{k: c[k] for k in ("rule", "share", "plr", "contrast")} for c in fed.cohorts_],
            "centralized": [{k: c.get(k) for k in ("rule", "share", "plr", "contrast")} for c in central.cohorts_]}
