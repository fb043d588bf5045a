"""Simulated poisoning clients, to measure what an aggregation rule withstands (--attack).

A seeded share of the population is compromised for the whole run (a
device, once taken over, stays so). Each attacker trains as usual and then
sends a poisoned update, or trains on poisoned data:

  nan         every value of its update is NaN (the server's check must reject it);
  scale       its update times S (a model-replacement attack: one client pulls the mean to it);
  sign-flip   its update times -S (it pushes the model the other way, S times as hard);
  label-flip  it trains honestly on its rows with every label flipped (y -> 1 - y).

Only shared parameters are poisoned; an attacker's private user rows are its
own. The attack wraps the simulation's client function, so the engine,
the trainer and the strategy run unchanged.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from c2al.data.schema import Table
from c2al.errors import C2ALError
from c2al.federated.client import ClientData, FitResult, LocalTrainer, Rows
from c2al.federated.simulation import ClientFn, default_client_fn
from c2al.federated.strategy import Params

ATTACKS = ("none", "nan", "scale", "sign-flip", "label-flip")


def choose_attackers(population: int, share: float, seed: int) -> np.ndarray:
    """The compromised clients: round(share * N) of them, at least one when share > 0.

    Args:
        population: clients N.
        share: F, the share of clients attacking, in [0, 1].
        seed: the run's seed (its own stream: the same seed picks the same attackers
            whatever the rule or attack, so runs compare like with like).

    Returns:
        sorted client ids.

    Example:
        >>> len(choose_attackers(100, 0.05, 0)), len(choose_attackers(10, 0.01, 0)), len(choose_attackers(10, 0.0, 0))
        (5, 1, 0)
    """
    if not 0 <= share <= 1:
        raise C2ALError(f"--attack-share must lie in [0, 1], got {share}")
    k = 0 if share == 0 else max(1, int(round(share * population)))
    return np.sort(np.random.default_rng([seed, 0xA77AC]).choice(population, size=k, replace=False))


def poison(res: FitResult, kind: str, scale: float) -> FitResult:
    """The update an attacker sends instead of its honest `res`.

    Args:
        res: the honest result.
        kind: nan, scale or sign-flip.
        scale: S.

    Returns:
        A new FitResult; examples, private rows and metrics as reported honestly.

    Example:
        >>> r = FitResult(1, {"w": np.array([1.0, -2.0])}, {}, {}, {})
        >>> poison(r, "sign-flip", 10.0).dense["w"].tolist(), poison(r, "scale", 3.0).dense["w"].tolist()
        ([-10.0, 20.0], [3.0, -6.0])
    """
    factor = {"nan": np.nan, "scale": scale, "sign-flip": -scale}.get(kind)
    if factor is None:
        raise C2ALError(f"poison: kind must be nan, scale or sign-flip, got {kind!r}")
    dense = {n: np.asarray(d) * factor for n, d in res.dense.items()}
    rows: dict[str, Rows] = {n: (ids, np.asarray(r) * factor) for n, (ids, r) in res.rows.items()}
    return replace(res, dense=dense, rows=rows)


def flip_labels(table: Table) -> Table:
    """The same rows with every label y replaced by 1 - y."""
    return replace(table, labels=(1.0 - table.labels).astype(table.labels.dtype))


def attack_client_fn(kind: str, attackers: np.ndarray, scale: float = 10.0, base: ClientFn = default_client_fn) -> ClientFn:
    """A client function (`simulation.run_rounds(client_fn=...)`) in which `attackers` attack.

    Args:
        kind: one of ATTACKS.
        attackers: the compromised client ids (`choose_attackers`).
        scale: S of scale and sign-flip.
        base: how an honest client trains.

    Returns:
        `base` itself for --attack none, else a wrapper that poisons the attackers.
    """
    if kind not in ATTACKS:
        raise C2ALError(f"--attack must be one of {list(ATTACKS)}, got {kind!r}")
    if kind in ("scale", "sign-flip") and not (np.isfinite(scale) and scale > 0):
        raise C2ALError(f"--attack-scale must be a positive number, got {scale}")
    if kind == "none" or len(attackers) == 0:
        return base
    bad = {int(c) for c in attackers}
    flipped: list[Table] = []  # [honest table, its flipped copy]; the C2AL phase trains on another table

    def fn(trainer: LocalTrainer, client: ClientData, params: Params, private: dict[str, Rows],
           config: dict[str, Any]) -> FitResult:
        if client.cid not in bad:
            return base(trainer, client, params, private, config)
        if kind != "label-flip":
            return poison(base(trainer, client, params, private, config), kind, scale)
        honest = trainer.train
        if not flipped or flipped[0] is not honest:
            flipped[:] = [honest, flip_labels(honest)]
        trainer.train = flipped[1]
        try:
            return base(trainer, client, params, private, config)
        finally:
            trainer.train = honest

    return fn
