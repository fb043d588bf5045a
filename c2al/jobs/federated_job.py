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
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from torch import nn

from c2al.config import RESUME_FIELDS, Config
from c2al.data.schema import Splits, Table
from c2al.dist.checkpoint import save_checkpoint
from c2al.errors import C2ALError
from c2al.eval.compare import (
    AUTO_GRID,
    add_traits,
    attention_report,
    choose_aux_weight,
    compare,
    print_comparison,
    record_decision,
    ship_decision,
    valid_scores,
)
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
from c2al.jobs.pipeline import attach_heads, cohort_frame, served_model
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


def kept_round(best: dict[str, Any]) -> str:
    """'round 40 kept' for a federated training's best (or last) evaluation, as printed above tables."""
    return f"round {best['rounds']} kept" if best else "last round"


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
                          title=f"test split ({cfg.model}, federated, {kept_round(trained.best)})"))
    log.info(format_table(tier_table, ["tier", "n", "share", "plr", "ne_base", "auc_base"], title="per device tier"))
    write_json(report, out / "report.json")
    log.info(f"wrote {out / 'report.json'}")
    return report


def run_federated_c2al(cfg: Config, splits: Splits, clients: list[ClientData], tiers: np.ndarray, out: Path,
                       base: FedTrained | None = None) -> dict[str, Any]:
    """Baseline rounds (or the given `base`, trained with this cfg and seed), federated mining, C2AL rounds
    (one lambda, or each of --aux-weight auto's), the validation gate, report."""
    if base is None:
        base = federated_fit(cfg, splits, seeded_model(cfg, splits.schema), clients, tiers, out / "fed_baseline.pt", "baseline")
    p_valid = base.predict("valid", splits, cfg.batch_size)
    frame = cohort_frame(cfg, splits, "valid")
    # each client mines from its own validation rows: features, the baseline's scores, labels
    fed = FederatedCohortMiner(cfg.aux_cohorts, n_clusters=cfg.n_clusters, divergence=cfg.divergence, min_share=cfg.min_share,
                               max_share=cfg.max_share, iters=cfg.kmeans_iters, random_state=cfg.seed)
    fed.fit([frame.iloc[c.valid] for c in clients], [splits.valid.labels[c.valid] for c in clients], [p_valid[c.valid] for c in clients])
    agreement = mining_agreement(cfg, splits, fed, frame, p_valid)
    # clients compute their own cohort ids from the broadcast centroids (vectorized here)
    ids = {s: fed.predict(cohort_frame(cfg, splits, s)) for s in ("train", "valid", "test")}
    # the centralized job's choice of lambda and validation gate, on the clients' validation rows
    v_base = valid_scores(p_valid, splits.valid.labels, ids["valid"], cfg.aux_cohorts)
    arm, search = fit_c2al_arms(cfg, splits, ids, clients, tiers, out, v_base)
    trained, served = arm.trained, arm.served
    decision = ship_decision(v_base, arm.valid, cfg.gate, cfg.gate_tolerance)
    shipped = served if decision["shipped"] == "c2al" else base.model
    save_checkpoint(out / "c2al.pt", model_state=shipped.state_dict(), config=cfg.to_dict(), step=-1,
                    extra={"stripped": True, "shipped": decision["shipped"]})

    p_base = base.predict("test", splits, cfg.batch_size)
    p_c2al = arm_scores(cfg, splits, arm, "test")
    report = compare(cfg, splits, ids["test"], p_base, p_c2al, fed)
    report["miner"]["federated"] = True
    add_traits(report, cohort_frame(cfg, splits, "test"), ids["test"])
    tier_table = tier_rows(p_base, p_c2al, splits.test.labels, row_tiers(splits.test, clients, tiers))
    report["tiers"] = tier_table
    report["attention"] = attention_report(base.model, served, splits, cfg, CPU)
    report["history"] = {"baseline": base.history, "c2al": trained.history}
    report["train_seconds"] = {"baseline": base.seconds, "c2al": trained.seconds}
    report["world_size"] = 1
    report["federated"] = federated_summary(cfg, clients, tiers, {"baseline": base, "c2al": trained}, tier_table)
    report["federated"]["mining"] = agreement
    record_decision(report, decision)
    if search:
        report["aux_weight_search"] = search
    print_comparison(report)
    log.info(format_table(tier_table, ["tier", "n", "share", "plr", "ne_base", "ne_c2al", "ne_diff_pct"], title="per device tier (NE_diff % < 0 is better)"))
    log.info(f"MDAC (largest pairwise tier difference of the relative NE change): {report['federated']['mdac']:.6f}")
    log.info(f"federated vs centralized mining on validation rows: ARI {agreement['ari']:.3f} of the exposed cohorts, "
          f"{agreement.get('kmeans_ari', float('nan')):.3f} of the k-means clusters")
    write_json(report, out / "report.json")
    try:
        from c2al.eval.plots import plot_report

        plot_report(report, out / "report.png")
    except ImportError:
        pass
    log.info(f"wrote {out / 'report.json'}, {out / 'c2al.pt'}")
    return report


class Arm(NamedTuple):
    """One federated C2AL training: its rounds, the stripped model, and its validation scores."""

    trained: FedTrained
    served: nn.Module  # heads detached: the serving model
    valid: dict[str, Any]  # aux_weight, validation ne / cohort_ne / cohorts (valid_scores), best_round


def fit_c2al_arms(cfg: Config, splits: Splits, ids: dict[str, np.ndarray], clients: list[ClientData], tiers: np.ndarray,
                  out: Path, v_base: dict[str, Any]) -> tuple[Arm, dict[str, Any] | None]:
    """C2AL rounds with --aux-weight, or once per lambda of AUTO_GRID (--aux-weight auto) and the arm
    `choose_aux_weight` keeps on validation (the centralized job's rule).

    Args:
        ids: mined cohort id per row of each split ("train", "valid", "test").
        v_base: the baseline's validation scores (`valid_scores`), what auto compares with.

    Returns:
        (the arm to gate and report, the search {"candidates", "chosen", "baseline"} or None for one lambda).
    """
    if cfg.aux_weight != "auto":
        return fit_arm(cfg, splits, ids, clients, tiers, cfg.aux_weights(), out / "fed_c2al.pt", "c2al"), None
    arms = [fit_arm(cfg, splits, ids, clients, tiers, [lam] * cfg.aux_cohorts, out / f"fed_c2al_lambda{lam:g}.pt", f"c2al lambda={lam:g}")
            for lam in AUTO_GRID]
    chosen = choose_aux_weight([a.valid for a in arms], v_base, cfg.gate_tolerance)
    arm = next(a for a in arms if a.valid is chosen)
    tried = ", ".join(f"{a.valid['aux_weight']:g}: valid NE {a.valid['ne']:.4f}" for a in arms)
    log.info(f"--aux-weight auto: lambda {chosen['aux_weight']:g} kept on validation (tried {tried})")
    return arm, {"candidates": [a.valid for a in arms], "chosen": chosen["aux_weight"], "baseline": v_base}


def fit_arm(cfg: Config, splits: Splits, ids: dict[str, np.ndarray], clients: list[ClientData], tiers: np.ndarray,
            aux_weight: list[float], checkpoint: Path, tag: str) -> Arm:
    """One federated C2AL training from the baseline's seeded start, with lambda `aux_weight` (one per cohort)."""
    model = seeded_model(cfg, splits.schema)  # same seed: same start as the baseline
    wrapper = attach_heads(cfg, model, aux_weight, balance=cfg.aux_balance)
    trained = federated_fit(cfg, splits.with_cohorts(ids), wrapper, clients, tiers, checkpoint, tag)
    trained.install()
    arm = Arm(trained, served_model(wrapper), {})
    scores = valid_scores(arm_scores(cfg, splits, arm, "valid"), splits.valid.labels, ids["valid"], cfg.aux_cohorts)
    lam = aux_weight[0] if len(set(aux_weight)) == 1 else aux_weight
    arm.valid.update(aux_weight=lam, **scores, best_round=trained.best.get("rounds"))
    return arm


def arm_scores(cfg: Config, splits: Splits, arm: Arm, split: str) -> np.ndarray:
    """Probabilities of an arm's served model for `split`; --engine flower: the scores the clients computed
    with the wrapper's main output (equal to the stripped model's)."""
    if split in arm.trained.scores:
        return arm.trained.scores[split]
    return predict(arm.served, getattr(splits, split), splits.schema, cfg.batch_size)


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
