"""One federated round body and one early-stopping rule, driven by either engine.

A round is `begin_round` (the simulated devices say which clients are online, the
strategy's `configure_train` samples among them and configures each, some sampled
devices drop out mid-round) -> the engine reaches the remaining clients (in process:
one after another, side by side or over forked workers; Flower: one train Message
each) -> `end_round` (a client that raised becomes a failure with its reason, the
strategy's `aggregate_train` rejects, combines and steps). Every draw of a round comes
from (seed, round) in that order, so both engines sample, drop and seed the same clients.

`drive_rounds` runs rounds with the one early-stopping rule: every `eval_every` rounds
(and after the last) the global model is scored on validation; the best evaluation's
state is kept (a deep copy), training stops after `patience` evaluations without a
strictly better criterion, and the best state is put back before returning.

`FedTrained` is what rounds produce; `ClientStore` the clients' private rows.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from c2al.errors import C2ALError
from c2al.federated.client import FitResult, LocalTrainer, Rows
from c2al.federated.heterogeneity import Devices, round_rng
from c2al.federated.strategy import Params, RowwiseFedAvg

log = logging.getLogger("c2al.federated")
MAXIMIZED = ("recall", "ndcg", "auc")  # criteria (by prefix) where higher is better


class ClientStore:
    """Each client's private rows, as its device would keep them between rounds.

    A client never seen yet starts from the initial table (the same seeded
    initialization every client can compute). The server never reads this;
    `tables` only serves evaluation in simulation, where writing every
    client's row into one table equals each client scoring its own rows.
    """

    def __init__(self, init: dict[str, np.ndarray]) -> None:
        self.init = {k: np.asarray(v) for k, v in init.items()}
        self.rows: dict[int, dict[str, Rows]] = {}
        self.writes = 0  # bumped by every change: FedTrained re-installs the working model only after one

    def get(self, cid: int, ids_of: Callable[[str], np.ndarray]) -> dict[str, Rows]:
        if cid in self.rows:
            return self.rows[cid]
        return {n: (ids_of(n), self.init[n][ids_of(n)]) for n in self.init}

    def put(self, cid: int, private: dict[str, Rows]) -> None:
        self.rows[cid] = {n: (np.asarray(i), np.asarray(r).copy()) for n, (i, r) in private.items()}
        self.writes += 1

    def copy(self) -> "ClientStore":
        """A deep copy (the best round's rows, kept while later rounds go on)."""
        out = ClientStore(self.init)
        out.rows = {c: {n: (i.copy(), r.copy()) for n, (i, r) in p.items()} for c, p in self.rows.items()}
        return out

    def tables(self) -> dict[str, np.ndarray]:
        out = {n: t.copy() for n, t in self.init.items()}
        for private in self.rows.values():
            for n, (ids, rows) in private.items():
                out[n][ids] = rows
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (loads with weights_only=True)."""
        cids = sorted(self.rows)
        out: dict[str, Any] = {}
        for n in self.init:
            ids = [self.rows[c][n][0] for c in cids]
            out[n] = {"cids": torch.tensor(np.repeat(cids, [len(i) for i in ids]), dtype=torch.int64),
                      "ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)) if ids else torch.zeros(0, dtype=torch.int64),
                      "rows": torch.from_numpy(np.concatenate([self.rows[c][n][1] for c in cids])) if ids
                      else torch.zeros(0, self.init[n].shape[1])}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = {}
        self.writes += 1
        for n, s in state.items():
            cids, ids, rows = s["cids"].numpy(), s["ids"].numpy(), s["rows"].numpy()
            for c in np.unique(cids):
                m = cids == c
                self.rows.setdefault(int(c), {})[n] = (ids[m], rows[m])


@dataclass
class FedTrained:
    """The outcome of federated rounds: global shared parameters and the clients' private rows."""

    trainer: LocalTrainer
    params: Params
    store: ClientStore
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # --engine flower: split -> the clients' own scores
    best: dict[str, Any] = field(default_factory=dict)  # {"round", "rounds", "valid_ne", "valid_auc"} of the state it holds
    bad: int = 0  # evaluations since the best one
    best_state: tuple[Params, ClientStore] | None = None  # deep copies of the best evaluation's params and client store
    best_scores: dict[str, np.ndarray] = field(default_factory=dict)  # --engine flower: the best evaluation's scores
    _installed: tuple[Any, ...] = field(default=(), repr=False)  # the state the working model holds (see `module`)

    def stopped(self, patience: int) -> bool:
        return patience > 0 and self.bad >= patience

    @property
    def model(self) -> torch.nn.Module:
        """The working model holding the global parameters and every client's private rows."""
        return self.module.model

    @property
    def module(self) -> torch.nn.Module:
        """The working train module with the global parameters and every private row installed:
        `c2al.train.task.predict(trained.module, ...)` scores each row with its own user's private row.
        Installed once per state: reading it again copies nothing until params, store or the working model change."""
        held = self._installed
        if not held or held[0] is not self.params or held[1] is not self.store or held[2:] != (self.store.writes, self.trainer.writes):
            self.install()
        return self.trainer.module

    def predict(self, split: str, splits: Any, batch_size: int) -> np.ndarray:
        """Probabilities for every row of `splits.<split>`, each row scored with its own user's private row:
        the scores the clients computed themselves (--engine flower), else `predict` on `module`."""
        from c2al.train.task import predict

        if split in self.scores:
            return self.scores[split]
        return predict(self.module, getattr(splits, split), splits.schema, batch_size)

    def install(self) -> None:
        """Write the global parameters and all private rows into the working model."""
        self.trainer.load(self.params)
        with torch.no_grad():
            for n, t in self.store.tables().items():
                self.trainer.params[n].copy_(torch.from_numpy(t))
        # References, not ids: a later params dict could reuse a freed one's id.
        self._installed = (self.params, self.store, self.store.writes, self.trainer.writes)


def initial_params(trainer: LocalTrainer) -> tuple[Params, dict[str, np.ndarray]]:
    """Shared parameters and private tables of the (seeded) working model, as numpy copies."""
    p = trainer.params
    shared = {n: p[n].detach().numpy().copy() for n in trainer.layout.shared}
    private = {n: p[n].detach().numpy().copy() for n in trainer.layout.private}
    return shared, private


# ------------------------------------------------------------------ the round body
@dataclass
class RoundPlan:
    """A round after sampling: who trains and with which config, who already dropped out."""

    server_round: int  # Flower's round number, from 1 (c2al's round index + 1)
    sampled: int
    jobs: list[tuple[int, dict[str, Any]]]  # (client, config) of the clients still in, in sampling order
    failures: list[tuple[int, str]]  # (client, reason) of the sampled clients that dropped out
    began: float = field(default_factory=time.perf_counter)


def begin_round(strategy: RowwiseFedAvg, devices: Devices, rnd: int, seed: int, params: Params) -> RoundPlan:
    """Online devices -> the strategy's sampling and configs -> mid-round dropout; each job's config gets
    its device's step budget (`max_steps`)."""
    rng = round_rng(seed, rnd)
    plan = strategy.configure_train(rnd + 1, params, {}, devices.online(rng))
    jobs, failures = [], []
    for cid, conf in plan:
        if devices.drops_out(cid, rng):
            failures.append((cid, "dropped out mid-round"))
        else:
            jobs.append((cid, {**conf, "max_steps": devices.steps(cid)}))
    if not plan:
        log.warning("round %d: no client available", rnd)
    return RoundPlan(rnd + 1, len(plan), jobs, failures)


def end_round(strategy: RowwiseFedAvg, plan: RoundPlan, params: Params, fitted: list[tuple[int, FitResult | str]]
              ) -> tuple[Params, dict[str, Any], list[tuple[int, FitResult]]]:
    """The clients' results (a string: why a client has none) -> the strategy's `aggregate_train`.

    Returns:
        (new parameters, the round's metrics, the (client, result) pairs the strategy accepted).
    """
    failures, results = list(plan.failures), []
    for cid, res in fitted:
        if isinstance(res, str):
            log.warning("round %d: client %d dropped: %s", plan.server_round - 1, cid, res)
            failures.append((cid, res))
        else:
            results.append((cid, res))
    new, metrics = strategy.aggregate_train(plan.server_round, params, results)
    rejected = metrics.pop("rejected", [])
    failures += rejected
    metrics["failures"] = [[int(c), r] for c, r in failures]
    metrics["sampled"] = plan.sampled
    refused = {c for c, _ in rejected}
    return new, metrics, [(c, r) for c, r in results if c not in refused]


# ------------------------------------------------------------------ the early-stopping rule
Evaluate = Callable[[FedTrained], dict[str, Any]]  # the installed global model -> validation {"ne", "auc", ...}


@dataclass(frozen=True)
class StopRule:
    """When to evaluate and when to stop.

    Attributes:
        evaluate: validation metrics of the global model; None never evaluates (and never stops early).
        eval_every: rounds between evaluations (the last round is always evaluated).
        patience: evaluations without a strictly better `criterion` before stopping; 0 runs every round
            and keeps the last state.
        criterion: the key of `evaluate`'s result that decides: "ne" (lower is better), or a retrieval
            metric such as "recall@10" (higher is better; see `MAXIMIZED`).
    """

    evaluate: Evaluate | None = None
    eval_every: int = 5
    patience: int = 0
    criterion: str = "ne"

    def due(self, rnd: int, rounds: int) -> bool:
        """Whether round `rnd` (from 0) of `rounds` ends with an evaluation."""
        return self.evaluate is not None and ((rnd + 1) % max(self.eval_every, 1) == 0 or rnd + 1 == rounds)


def drive_rounds(trained: FedTrained, one_round: Callable[[int], dict[str, Any]], stop: StopRule, *, start: int, rounds: int,
                 tag: str, show: bool, after_round: Callable[[int], None] | None = None) -> FedTrained:
    """Rounds `start`..`rounds - 1` of `one_round` (it updates `trained` and returns the round's metrics), evaluated
    and stopped by `stop`; the kept (best, or last) state is put back into `trained` at the end."""
    bar = tqdm(range(start, rounds), desc=f"[{tag}] rounds", disable=None if show else True, dynamic_ncols=True, leave=False)
    for rnd in bar:
        if trained.stopped(stop.patience):  # a resumed run that had already stopped
            break
        metrics = one_round(rnd)
        trained.history.append(metrics)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", ok=metrics["aggregated"], failed=len(metrics["failures"]))
        if stop.due(rnd, rounds):
            evaluate_round(trained, stop, rnd, tag, show)
        elif show and bar.disable:  # not a terminal (a log file): one line per round instead of a bar
            log.info(f"[{tag}] round {rnd + 1}/{rounds}  loss {metrics.get('loss', float('nan')):.4f}  "
                     f"aggregated {metrics['aggregated']}  failed {len(metrics['failures'])}")
        if after_round is not None:
            after_round(rnd)
    keep_best(trained, stop.patience, tag)
    return trained


def evaluate_round(trained: FedTrained, stop: StopRule, rnd: int, tag: str, show: bool) -> None:
    """Validation of the global model after round `rnd`: into the round's history entry, the best and the patience count."""
    criterion, patience = stop.criterion, stop.patience
    valid = stop.evaluate(trained)
    value = valid.get(criterion)
    if value is None or not math.isfinite(value):
        raise C2ALError(f"[{tag}] validation {criterion} is {value} after round {rnd + 1}: the validation split needs both labels")
    entry = trained.history[-1]
    entry.update({f"valid_{k}": float(valid[k]) if valid[k] is not None else None for k in dict.fromkeys(("ne", "auc", criterion)) if k in valid})
    key, sign = f"valid_{criterion}", -1.0 if criterion.startswith(MAXIMIZED) else 1.0
    improved = not trained.best or sign * entry[key] < sign * trained.best[key]
    if improved:
        trained.best, trained.bad = {"round": rnd, "rounds": rnd + 1, **{k: v for k, v in entry.items() if k.startswith("valid_")}}, 0
        if patience:
            trained.best_state = ({n: v.copy() for n, v in trained.params.items()}, trained.store.copy())
            trained.best_scores = dict(trained.scores)
    else:
        trained.bad += 1
    if show:
        mark = "  (best)" if improved else f"  (no gain {trained.bad}/{patience})" if patience else ""
        shown = "".join(f"  {k.removeprefix('valid_')} {v:.4f}" for k, v in entry.items() if k.startswith("valid_") and v is not None)
        log.info(f"[{tag}] round {rnd + 1}  loss {entry.get('loss', float('nan')):.4f}  valid{shown}{mark}")


def keep_best(trained: FedTrained, patience: int, tag: str) -> None:
    """Put the best evaluation's state back (patience > 0), or record the last evaluation as the one kept."""
    if patience and trained.best_state is not None:
        params, store = trained.best_state
        trained.params, trained.store = {n: v.copy() for n, v in params.items()}, store.copy()
        trained.scores = dict(trained.best_scores)
        done = len(trained.history)
        why = "patience ran out" if trained.stopped(patience) else "last round reached"
        shown = ", ".join(f"valid {k.removeprefix('valid_')} {v:.4f}" for k, v in trained.best.items() if k.startswith("valid_") and v is not None)
        log.info(f"[{tag}] kept round {trained.best['rounds']} of {done} ({shown}); {why}")
        return
    last = next((h for h in reversed(trained.history) if any(k.startswith("valid_") for k in h)), None)
    if last is not None:
        trained.best = {"round": last["round"], "rounds": last["round"] + 1, **{k: v for k, v in last.items() if k.startswith("valid_")}}
