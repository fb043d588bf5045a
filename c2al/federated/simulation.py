"""The in-process engine: rounds of sampled clients, run one after another in this process.

Each round: the strategy's `configure_fit` samples available clients; each
sampled client may drop out mid-round (its device tier's rate), else trains on
the shared working model (`LocalTrainer`); a client that raises is dropped
with its reason; `aggregate_fit` rejects NaN / Inf / mis-shaped updates and
averages the rest. The server state (shared parameters, server optimizer
state, round) and the clients' private rows checkpoint atomically after every
round, and `resume` continues from the last one. All randomness of a round
is drawn from (seed, round), so a resumed run equals an uninterrupted one.

Early stopping by rounds: every `eval_every` rounds (and after the last) the
global model with every client's private rows is scored on validation; the
best evaluation's shared parameters and client store are kept (a deep copy),
training stops after `patience` evaluations without a strictly lower NE, and
the best state is put back before returning. The checkpoint carries the best
state and the patience count, so a resumed run stops where an uninterrupted
one would. With `parallel` > 1 a round's clients train side by side
(`c2al.federated.vectorized`) instead of one after another.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from c2al.dist.checkpoint import FORMAT, atomic_torch_save, load_checkpoint
from c2al.dist.process import LOCAL_CPU
from c2al.errors import C2ALError
from c2al.federated.client import ClientData, FitResult, LocalTrainer, Rows
from c2al.federated.heterogeneity import TierSpec, drops_out, round_rng
from c2al.federated.strategy import FedAvg, Params

if TYPE_CHECKING:
    from c2al.federated.vectorized import VectorizedRunner

log = logging.getLogger("c2al.federated")
CPU = LOCAL_CPU
# A round of fewer clients runs them one after another even with `parallel`: side by side gains little
# there, and the one-by-one path is the one the Flower engine runs (small runs then match it exactly).
MIN_SIDE_BY_SIDE = 16


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

    def get(self, cid: int, ids_of: Callable[[str], np.ndarray]) -> dict[str, Rows]:
        if cid in self.rows:
            return self.rows[cid]
        return {n: (ids_of(n), self.init[n][ids_of(n)]) for n in self.init}

    def put(self, cid: int, private: dict[str, Rows]) -> None:
        self.rows[cid] = {n: (np.asarray(i), np.asarray(r).copy()) for n, (i, r) in private.items()}

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

    def stopped(self, patience: int) -> bool:
        return patience > 0 and self.bad >= patience

    @property
    def model(self) -> torch.nn.Module:
        """The working model holding the global parameters and every client's private rows."""
        return self.module.model

    @property
    def module(self) -> torch.nn.Module:
        """The working train module with the global parameters and every private row installed:
        `c2al.train.task.predict(trained.module, ...)` scores each row with its own user's private row."""
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


def initial_params(trainer: LocalTrainer) -> tuple[Params, dict[str, np.ndarray]]:
    """Shared parameters and private tables of the (seeded) working model, as numpy copies."""
    p = trainer.params
    shared = {n: p[n].detach().numpy().copy() for n in trainer.layout.shared}
    private = {n: p[n].detach().numpy().copy() for n in trainer.layout.private}
    return shared, private


ClientFn = Callable[[LocalTrainer, ClientData, Params, dict[str, Rows], dict[str, Any]], FitResult]


def default_client_fn(trainer: LocalTrainer, client: ClientData, params: Params, private: dict[str, Rows],
                      config: dict[str, Any]) -> FitResult:
    return trainer.fit(client, params, private, config)


Evaluate = Callable[["FedTrained"], dict[str, Any]]  # the installed global model -> validation {"ne", "auc", ...}


def run_rounds(
    trainer: LocalTrainer,
    strategy: FedAvg,
    clients: list[ClientData],
    tiers: np.ndarray,
    *,
    rounds: int,
    seed: int,
    spec: TierSpec,
    checkpoint: Path | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    shape_keys: tuple[str, ...] = (),
    client_fn: ClientFn = default_client_fn,
    show: bool = True,
    tag: str = "federated",
    workers: int = 0,
    parallel: int = 0,
    evaluate: Evaluate | None = None,
    eval_every: int = 5,
    patience: int = 0,
    criterion: str = "ne",
) -> FedTrained:
    """Run at most `rounds` federated rounds from the working model's current (seeded) weights.

    Args:
        trainer: the clients' runtime around the working model.
        strategy: configure/aggregate hooks and server optimizer.
        clients: every client, indexed by cid.
        tiers: device tier per client [N].
        rounds: most rounds (a resumed run does the remaining ones).
        seed: seed of sampling and dropout.
        spec: tier behaviour (dropout).
        checkpoint: where the server state is saved after each round; None for no checkpoints.
        resume: continue from `checkpoint` when it exists.
        config: the run config, saved inside checkpoints and checked on resume on `shape_keys`.
        client_fn: how a client trains (tests inject failing clients here).
        workers: > 1 runs each round's clients over that many forked processes (same result).
        parallel: > 1 trains up to that many of a round's clients side by side (`vectorized`;
            the default client_fn only, and rounds of at least MIN_SIDE_BY_SIDE clients; else one after another).
        evaluate: validation metrics of the global model; None never evaluates (and never stops early).
        eval_every: rounds between evaluations (the last round is always evaluated).
        patience: evaluations without a strictly better validation `criterion` before stopping; 0 runs
            every round and keeps the last state.
        criterion: the key of `evaluate`'s result that decides: "ne" (lower is better), or a
            retrieval metric such as "recall@10" (higher is better; see `MAXIMIZED`).
        show: tqdm bar over rounds.
        tag: label of the bar and log lines.

    Returns:
        FedTrained with the kept (best, or last) global parameters and client store.
    """
    params, private_init = initial_params(trainer)
    store = ClientStore(private_init)
    trained = FedTrained(trainer=trainer, params=params, store=store)
    start = 0
    if checkpoint is not None and resume and checkpoint.exists():
        start = _restore(trained, strategy, checkpoint, config, shape_keys)
        log.info(f"[{tag}] resumed from {checkpoint} after round {start}")
    runner = _runner(trainer, parallel, client_fn, workers)
    began = time.perf_counter() - trained.seconds  # a resumed run counts the interrupted run's time too
    threads = torch.get_num_threads()
    # A client's ops are tiny: on a busy machine intra-op thread spin-waits made them ~10x slower.
    torch.set_num_threads(1)
    try:
        bar = tqdm(range(start, rounds), desc=f"[{tag}] rounds", disable=None if show else True, dynamic_ncols=True, leave=False)
        for rnd in bar:
            if trained.stopped(patience):  # a resumed run that had already stopped
                break
            metrics = one_round(trained, strategy, clients, tiers, rnd, seed, spec, client_fn, workers, runner, parallel)
            trained.history.append(metrics)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", ok=metrics["aggregated"], failed=len(metrics["failures"]))
            if evaluate is not None and ((rnd + 1) % max(eval_every, 1) == 0 or rnd + 1 == rounds):
                _evaluate(trained, evaluate, rnd, patience, tag, show, criterion)
            elif show and bar.disable:  # not a terminal (a log file): one line per round instead of a bar
                log.info(f"[{tag}] round {rnd + 1}/{rounds}  loss {metrics.get('loss', float('nan')):.4f}  "
                         f"aggregated {metrics['aggregated']}  failed {len(metrics['failures'])}")
            if checkpoint is not None:
                trained.seconds = time.perf_counter() - began
                save_state(trained, strategy, checkpoint, rnd + 1, config or {}, tag)
    finally:
        torch.set_num_threads(threads)
    _keep_best(trained, patience, tag)
    trained.seconds = time.perf_counter() - began
    return trained


def _runner(trainer: LocalTrainer, parallel: int, client_fn: ClientFn, workers: int) -> "VectorizedRunner | None":
    """The vectorized runner when `parallel` asks for it and it applies, else None (one client after another)."""
    if parallel <= 1 or workers > 1:
        return None
    from c2al.federated.vectorized import VectorizedRunner

    why = VectorizedRunner.supports(trainer) or (None if client_fn is default_client_fn else "a custom client function")
    if why:
        log.info(f"clients train one after another: {why}")
        return None
    return VectorizedRunner(trainer)


MAXIMIZED = ("recall", "ndcg", "auc")  # criteria (by prefix) where higher is better


def _evaluate(trained: FedTrained, evaluate: Evaluate, rnd: int, patience: int, tag: str, show: bool, criterion: str = "ne") -> None:
    """Validation of the global model after round `rnd`: into the round's history entry, the best and the patience count."""
    valid = evaluate(trained)
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
    else:
        trained.bad += 1
    if show:
        mark = "  (best)" if improved else f"  (no gain {trained.bad}/{patience})" if patience else ""
        shown = "".join(f"  {k.removeprefix('valid_')} {v:.4f}" for k, v in entry.items() if k.startswith("valid_") and v is not None)
        log.info(f"[{tag}] round {rnd + 1}  loss {entry.get('loss', float('nan')):.4f}  valid{shown}{mark}")


def _keep_best(trained: FedTrained, patience: int, tag: str) -> None:
    """Put the best evaluation's state back (patience > 0), or record the last evaluation as the one kept."""
    if patience and trained.best_state is not None:
        params, store = trained.best_state
        trained.params, trained.store = {n: v.copy() for n, v in params.items()}, store.copy()
        done = len(trained.history)
        why = "patience ran out" if trained.stopped(patience) else "last round reached"
        shown = ", ".join(f"valid {k.removeprefix('valid_')} {v:.4f}" for k, v in trained.best.items() if k.startswith("valid_") and v is not None)
        log.info(f"[{tag}] kept round {trained.best['rounds']} of {done} ({shown}); {why}")
        return
    last = next((h for h in reversed(trained.history) if any(k.startswith("valid_") for k in h)), None)
    if last is not None:
        trained.best = {"round": last["round"], "rounds": last["round"] + 1, **{k: v for k, v in last.items() if k.startswith("valid_")}}


def one_round(trained: FedTrained, strategy: FedAvg, clients: list[ClientData], tiers: np.ndarray, rnd: int,
              seed: int, spec: TierSpec, client_fn: ClientFn, workers: int = 0, runner: "VectorizedRunner | None" = None,
              parallel: int = 0) -> dict[str, Any]:
    """configure_fit -> clients (with dropout and failures) -> aggregate_fit; updates `trained` in place."""
    rng = round_rng(seed, rnd)
    plan = strategy.configure_fit(rnd, tiers, rng)
    trainer, params = trained.trainer, trained.params
    failures: list[tuple[int, str]] = []
    jobs = []
    for cid, conf in plan:
        if drops_out(int(tiers[cid]), spec, rng):
            failures.append((cid, "dropped out mid-round"))
            continue
        client = clients[cid]
        private = trained.store.get(cid, lambda n: trainer.touched(client, trainer.layout.private[n]))
        jobs.append((cid, client, private, conf))
    if not plan:
        log.warning("round %d: no client available", rnd)
    results: list[tuple[int, FitResult]] = []
    if runner is not None and len(jobs) >= MIN_SIDE_BY_SIDE:
        fitted = [r for i in range(0, len(jobs), parallel) for r in runner.fit(jobs[i:i + parallel], params)]
    elif workers > 1 and len(jobs) > 1:
        fitted = _in_pool(trainer, jobs, params, client_fn, workers)
    else:
        fitted = fit_clients(trainer, jobs, params, client_fn)
    for cid, res in fitted:
        if isinstance(res, str):
            log.warning("round %d: client %d dropped: %s", rnd, cid, res)
            failures.append((cid, res))
        else:
            results.append((cid, res))
    new, metrics = strategy.aggregate_fit(rnd, params, results, failures)
    rejected = {cid for cid, _ in failures}
    for cid, res in results:
        if cid not in rejected:  # a rejected client rolls its private rows back too
            trained.store.put(cid, res.private)
    trained.params = new
    metrics["sampled"] = len(plan)
    metrics["failures"] = [[int(c), r] for c, r in failures]
    return metrics


Job = tuple[int, ClientData, dict[str, Rows], dict[str, Any]]


def fit_clients(trainer: LocalTrainer, jobs: list[Job], params: Params, client_fn: ClientFn) -> list[tuple[int, FitResult | str]]:
    """Fit clients one after another on the working model; a client that raises becomes its reason."""
    trainer.load(params)
    out: list[tuple[int, FitResult | str]] = []
    for cid, client, private, conf in jobs:
        try:
            out.append((cid, client_fn(trainer, client, params, private, conf)))
        except Exception as e:  # noqa: BLE001 - a failing device must not stop the federation
            out.append((cid, f"raised {type(e).__name__}: {' '.join(str(e).split())[:200]}"))
            trainer.load(params)  # the client may have left the working model half-updated
    return out


_FORKED: dict[str, Any] = {}  # what forked workers inherit: the working model, the round's params, client_fn


def _fit_chunk(jobs: list[Job]) -> list[tuple[int, FitResult | str]]:
    return fit_clients(_FORKED["trainer"], jobs, _FORKED["params"], _FORKED["client_fn"])


def _in_pool(trainer: LocalTrainer, jobs: list[Job], params: Params, client_fn: ClientFn, workers: int) -> list[tuple[int, FitResult | str]]:
    """The round's clients over `workers` forked processes, each with its own copy of the working model.

    Results come back in job order, so aggregation (and the model) equals the sequential run's.
    """
    import multiprocessing as mp

    _FORKED.update(trainer=trainer, params=params, client_fn=client_fn)
    chunks = [list(c) for c in np.array_split(np.arange(len(jobs)), min(workers, len(jobs)))]
    try:
        with mp.get_context("fork").Pool(len(chunks)) as pool:
            parts = pool.map(_fit_chunk, [[jobs[i] for i in c] for c in chunks])
    finally:
        _FORKED.clear()
    return [r for part in parts for r in part]


def save_state(trained: FedTrained, strategy: FedAvg, path: Path, rounds_done: int, config: dict[str, Any], tag: str) -> None:
    """Server state + client store, atomically, as plain tensors."""
    strategy_state = _tensors(strategy.state_dict())
    atomic_torch_save({
        "format": FORMAT, "config": json.dumps(config, sort_keys=True), "step": int(rounds_done),
        "model": {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in trained.params.items()},
        "optimizer": {"strategy": strategy_state, "clients": trained.store.state_dict()},
        "extra": json.dumps({"history": trained.history, "tag": tag, "federated": True, "seconds": trained.seconds,
                             "best": trained.best, "bad": trained.bad}),
        "best": None if trained.best_state is None else {
            "model": {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in trained.best_state[0].items()},
            "clients": trained.best_state[1].state_dict()},
    }, path)


def _restore(trained: FedTrained, strategy: FedAvg, path: Path, config: dict[str, Any] | None, keys: tuple[str, ...]) -> int:
    payload = load_checkpoint(path, expect_config=config, keys=keys)
    if not payload["extra"].get("federated"):
        raise C2ALError(f"checkpoint {str(path)!r} is not a federated checkpoint")
    model = payload["model"]
    for n, v in trained.params.items():
        if n not in model or tuple(model[n].shape) != v.shape:
            raise C2ALError(f"checkpoint {str(path)!r}: parameter {n!r} missing or of another shape")
        trained.params[n] = model[n].numpy().astype(v.dtype)
    strategy.load_state_dict(_arrays(payload["optimizer"]["strategy"]))
    trained.store.load_state_dict(payload["optimizer"]["clients"])
    trained.history = payload["extra"].get("history", [])
    trained.seconds = float(payload["extra"].get("seconds", 0.0))
    trained.best, trained.bad = payload["extra"].get("best") or {}, int(payload["extra"].get("bad", 0))
    if payload.get("best") is not None:
        best_store = ClientStore(trained.store.init)
        best_store.load_state_dict(payload["best"]["clients"])
        trained.best_state = ({n: payload["best"]["model"][n].numpy().astype(v.dtype) for n, v in trained.params.items()}, best_store)
    return int(payload["step"])


def _tensors(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


def _arrays(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    return obj
