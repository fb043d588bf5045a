"""The in-process engine: rounds of sampled clients, trained in this process.

Each round is the one round body of `rounds` (the simulated devices' availability,
the strategy's `configure_train`, mid-round dropout; then `aggregate_train`, which
rejects NaN / Inf / mis-shaped updates and combines the rest); between the two halves
the clients train here, on the shared working model (`LocalTrainer`), side by side
with `parallel` > 1 (`c2al.federated.vectorized`), or over forked `workers`; a client
that raises is dropped with its reason. The server state (shared parameters, server
optimizer state, round) and the clients' private rows checkpoint atomically after every
round, and `resume` continues from the last one. All randomness of a round is drawn
from (seed, round), so a resumed run equals an uninterrupted one.

Early stopping by rounds is `rounds.drive_rounds`' rule, the Flower engine's too: every
`eval_every` rounds (and after the last) the global model with every client's private
rows is scored on validation, the best evaluation's state is kept and put back. The
checkpoint carries the best state and the patience count, so a resumed run stops where
an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from c2al.dist.checkpoint import FORMAT, atomic_torch_save, load_checkpoint
from c2al.dist.process import LOCAL_CPU
from c2al.errors import C2ALError
from c2al.federated.client import ClientData, FitResult, LocalTrainer, Rows
from c2al.federated.heterogeneity import Devices, TierSpec
from c2al.federated.rounds import (
    ClientStore,
    Evaluate,
    FedTrained,
    StopRule,
    begin_round,
    drive_rounds,
    end_round,
    initial_params,
)
from c2al.federated.strategy import Params, RowwiseFedAvg

if TYPE_CHECKING:
    from c2al.federated.vectorized import VectorizedRunner

log = logging.getLogger("c2al.federated")
CPU = LOCAL_CPU
# A round of fewer clients runs them one after another even with `parallel`: side by side gains little
# there, and the one-by-one path is the one the Flower engine runs (small runs then match it exactly).
MIN_SIDE_BY_SIDE = 16


ClientFn = Callable[[LocalTrainer, ClientData, Params, dict[str, Rows], dict[str, Any]], FitResult]


def default_client_fn(trainer: LocalTrainer, client: ClientData, params: Params, private: dict[str, Rows],
                      config: dict[str, Any]) -> FitResult:
    return trainer.fit(client, params, private, config)


def run_rounds(
    trainer: LocalTrainer,
    strategy: RowwiseFedAvg,
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
        spec: tier behaviour (availability, dropout, step budgets): with `tiers`, the simulated `Devices`.
        checkpoint: where the server state is saved after each round; None for no checkpoints.
        resume: continue from `checkpoint` when it exists.
        config: the run config, saved inside checkpoints and checked on resume on `shape_keys`.
        client_fn: how a client trains (tests inject failing clients here).
        workers: > 1 runs each round's clients over that many forked processes (same result).
        parallel: > 1 trains up to that many of a round's clients side by side (`vectorized`;
            the default client_fn only, and rounds of at least MIN_SIDE_BY_SIDE clients; else one after another).
        evaluate, eval_every, patience, criterion: the early-stopping rule (`rounds.StopRule`).
        show: tqdm bar over rounds.
        tag: label of the bar and log lines.

    Returns:
        FedTrained with the kept (best, or last) global parameters and client store.
    """
    params, private_init = initial_params(trainer)
    trained = FedTrained(trainer=trainer, params=params, store=ClientStore(private_init))
    start = 0
    if checkpoint is not None and resume and checkpoint.exists():
        start = _restore(trained, strategy, checkpoint, config, shape_keys)
        log.info(f"[{tag}] resumed from {checkpoint} after round {start}")
    devices, runner = Devices(tiers, spec), _runner(trainer, parallel, client_fn, workers)
    began = time.perf_counter() - trained.seconds  # a resumed run counts the interrupted run's time too

    def after_round(rnd: int) -> None:
        if checkpoint is not None:
            trained.seconds = time.perf_counter() - began
            save_state(trained, strategy, checkpoint, rnd + 1, config or {}, tag)

    def round_body(rnd: int) -> dict[str, Any]:
        return one_round(trained, strategy, clients, devices, rnd, seed, client_fn, workers, runner, parallel)

    threads = torch.get_num_threads()
    # A client's ops are tiny: on a busy machine intra-op thread spin-waits made them ~10x slower.
    torch.set_num_threads(1)
    try:
        drive_rounds(trained, round_body, StopRule(evaluate, eval_every, patience, criterion), start=start, rounds=rounds,
                     tag=tag, show=show, after_round=after_round)
    finally:
        torch.set_num_threads(threads)
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


def one_round(trained: FedTrained, strategy: RowwiseFedAvg, clients: list[ClientData], devices: Devices, rnd: int,
              seed: int, client_fn: ClientFn = default_client_fn, workers: int = 0, runner: "VectorizedRunner | None" = None,
              parallel: int = 0) -> dict[str, Any]:
    """`rounds.begin_round` -> the clients, here -> `rounds.end_round`; updates `trained` in place, returns the round's metrics."""
    plan = begin_round(strategy, devices, rnd, seed, trained.params)
    trainer, params = trained.trainer, trained.params
    jobs = []
    for cid, conf in plan.jobs:
        client = clients[cid]
        jobs.append((cid, client, trained.store.get(cid, lambda n: trainer.touched(client, trainer.layout.private[n])), conf))
    if runner is not None and len(jobs) >= MIN_SIDE_BY_SIDE:
        fitted = [r for i in range(0, len(jobs), parallel) for r in runner.fit(jobs[i:i + parallel], params)]
    elif workers > 1 and len(jobs) > 1:
        fitted = _in_pool(trainer, jobs, params, client_fn, workers)
    else:
        fitted = fit_clients(trainer, jobs, params, client_fn)
    trained.params, metrics, accepted = end_round(strategy, plan, params, fitted)
    for cid, res in accepted:  # a rejected client rolls its private rows back too
        trained.store.put(cid, res.private)
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


def save_state(trained: FedTrained, strategy: RowwiseFedAvg, path: Path, rounds_done: int, config: dict[str, Any], tag: str) -> None:
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


def _restore(trained: FedTrained, strategy: RowwiseFedAvg, path: Path, config: dict[str, Any] | None, keys: tuple[str, ...]) -> int:
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
