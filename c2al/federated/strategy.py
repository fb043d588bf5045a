"""Server strategies shaped like Flower's `Strategy`: configure_fit / aggregate_fit hooks.

`configure_fit` picks the round's clients among the available ones and says
how each trains (seed, local epochs, step budget of its device tier, FedProx's
mu, SAM's rho). `aggregate_fit` rejects malformed updates, averages the rest
with the pure functions of `aggregate`, and steps the server optimizer.
FedAvg (server lr 1: the mean model), FedProx (FedAvg on the server, a
proximal term on the clients) and FedAdam (Reddi et al. 2021) are provided.

Parameters are a dict name -> numpy array holding only SHARED parameters:
users' private rows never reach the server.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from c2al.errors import C2ALError
from c2al.federated import aggregate as agg
from c2al.federated.client import SEED_STRIDE, FitResult, Layout
from c2al.federated.heterogeneity import TierSpec, available

log = logging.getLogger("c2al.federated")
Params = dict[str, np.ndarray]


class FedAvg:
    """FedAvg (McMahan et al. 2017) with row-wise averaging of embedding tables.

    Args:
        layout: which parameters are tables (row updates) and which are dense.
        clients_per_round: clients sampled per round (fewer when fewer are available).
        epochs: local epochs per round.
        server_lr: step on the averaged delta (1.0: the mean of the client models).
        sam_rho: local SAM radius (0: plain local steps).
        spec: device tiers (step budgets).
        seed: base seed of the clients' shuffles.
    """

    name = "fedavg"

    def __init__(self, layout: Layout, clients_per_round: int, *, epochs: int = 1, server_lr: float = 1.0,
                 sam_rho: float = 0.0, spec: TierSpec | None = None, seed: int = 0) -> None:
        self.layout, self.clients_per_round, self.epochs = layout, clients_per_round, epochs
        self.server_lr, self.sam_rho, self.spec, self.seed = server_lr, sam_rho, spec or TierSpec.uniform(), seed

    # ------------------------------------------------------------------ hooks
    def configure_fit(self, rnd: int, tiers: np.ndarray, rng: np.random.Generator) -> list[tuple[int, dict[str, Any]]]:
        """(client index, config) for each client sampled this round from the available ones."""
        pool = available(tiers, self.spec, rng)
        if len(pool) == 0:
            return []
        chosen = np.sort(rng.choice(pool, size=min(self.clients_per_round, len(pool)), replace=False))
        return [(int(c), self.fit_config(rnd, int(c), int(tiers[c]), len(tiers))) for c in chosen]

    def fit_config(self, rnd: int, cid: int, tier: int, population: int) -> dict[str, Any]:
        # Round 0's client 0 draws what centralized training draws (batch order seed*1000 + epoch,
        # dropout reseeded per step from seed*1_000_003): one client holding all data then equals it.
        pair = rnd * population + cid
        return {"round": rnd, "seed": self.seed * 1000 + pair * 1009, "step_seed": self.seed * 1_000_003 + pair * SEED_STRIDE,
                "epochs": self.epochs, "max_steps": int(self.spec.steps[tier]), "sam_rho": self.sam_rho, "proximal_mu": 0.0}

    def aggregate_fit(self, rnd: int, params: Params, results: Sequence[tuple[int, FitResult]],
                      failures: list[tuple[int, str]]) -> tuple[Params, dict[str, Any]]:
        """Validate, average and step; returns new params and round metrics."""
        good = []
        for cid, res in results:
            reason = self.validate(params, res)
            if reason is None:
                good.append((cid, res))
            else:
                log.warning("round %d: client %d rejected: %s", rnd, cid, reason)
                failures.append((cid, f"rejected: {reason}"))
        metrics: dict[str, Any] = {"round": rnd, "aggregated": len(good), "failures": failures}
        if not good:
            log.warning("round %d: no client update to aggregate; the global model is unchanged", rnd)
            return params, metrics
        weights = [float(r.num_examples) for _, r in good]
        deltas: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
        for n in self.layout.dense:
            deltas[n] = (None, agg.weighted_mean([r.dense[n] for _, r in good], weights))
        for n in self.layout.tables:
            ids, mean = agg.rowwise_mean([r.rows[n][0] for _, r in good], [r.rows[n][1] for _, r in good],
                                         weights, params[n].shape[0])
            deltas[n] = (ids, mean)
        metrics["loss"] = float(np.average([r.metrics.get("loss", np.nan) for _, r in good], weights=weights))
        metrics["examples"] = int(sum(weights))
        return self.server_step(rnd, params, deltas), metrics

    # -------------------------------------------------------------- internals
    def validate(self, params: Params, res: FitResult) -> str | None:
        """Why an update is unusable (wrong shape, NaN, Inf, bad row ids, no examples), or None."""
        if not isinstance(res, FitResult):
            return f"returned {type(res).__name__}, not a FitResult"
        if not np.isfinite(res.num_examples) or res.num_examples <= 0:
            return f"num_examples {res.num_examples}"
        for n in self.layout.dense:
            if n not in res.dense:
                return f"{n}: missing"
            reason = agg.check_update(n, res.dense[n], params[n].shape)
            if reason:
                return reason
        for n in self.layout.tables:
            if n not in res.rows:
                return f"{n}: missing"
            ids, rows = res.rows[n]
            ids = np.asarray(ids)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (len(ids) and (ids.min() < 0 or ids.max() >= params[n].shape[0])):
                return f"{n}: row ids outside [0, {params[n].shape[0]})"
            if len(np.unique(ids)) != len(ids):
                return f"{n}: repeated row ids"
            reason = agg.check_update(n, rows, (len(ids), params[n].shape[1]))
            if reason:
                return reason
        return None

    def server_step(self, rnd: int, params: Params, deltas: dict[str, tuple[np.ndarray | None, np.ndarray]]) -> Params:
        out = dict(params)
        for n, (ids, delta) in deltas.items():
            new = params[n].copy()
            if ids is None:
                new = agg.fedavg_step(new.astype(np.float64), delta, self.server_lr)
            else:
                new[ids] = agg.fedavg_step(new[ids].astype(np.float64), delta, self.server_lr)
            out[n] = new.astype(params[n].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server, mu/2 |w - w_global|^2 on every client."""

    name = "fedprox"

    def __init__(self, layout: Layout, clients_per_round: int, *, proximal_mu: float = 0.01, **kw: Any) -> None:
        super().__init__(layout, clients_per_round, **kw)
        if proximal_mu < 0:
            raise C2ALError(f"--proximal-mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def fit_config(self, rnd: int, cid: int, tier: int, population: int) -> dict[str, Any]:
        return {**super().fit_config(rnd, cid, tier, population), "proximal_mu": self.proximal_mu}


class FedAdam(FedAvg):
    """FedAdam (Reddi et al. 2021): server Adam on the averaged delta; lazy on table rows."""

    name = "fedadam"

    def __init__(self, layout: Layout, clients_per_round: int, *, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, **kw: Any) -> None:
        super().__init__(layout, clients_per_round, **kw)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def server_step(self, rnd: int, params: Params, deltas: dict[str, tuple[np.ndarray | None, np.ndarray]]) -> Params:
        self.t += 1
        out = dict(params)
        for n, (ids, delta) in deltas.items():
            m = self.m.setdefault(n, np.zeros(params[n].shape))
            v = self.v.setdefault(n, np.zeros(params[n].shape))
            sel = slice(None) if ids is None else ids
            new = params[n].astype(np.float64)
            new[sel], m[sel], v[sel] = agg.fedadam_step(new[sel], delta, m[sel], v[sel], self.t, lr=self.server_lr,
                                                        beta1=self.beta1, beta2=self.beta2, tau=self.tau)
            out[n] = new.astype(params[n].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state.get("t", 0))
        self.m = {k: np.asarray(v, dtype=np.float64) for k, v in state.get("m", {}).items()}
        self.v = {k: np.asarray(v, dtype=np.float64) for k, v in state.get("v", {}).items()}


STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "fedadam": 0.01}


def make_strategy(name: str, layout: Layout, clients_per_round: int, *, server_lr: float = 0.0,
                  proximal_mu: float = 0.01, **kw: Any) -> FedAvg:
    """The strategy named by --server-optimizer; server_lr 0 takes the strategy's default."""
    if name not in STRATEGIES:
        raise C2ALError(f"--server-optimizer must be one of {sorted(STRATEGIES)}, got {name!r}")
    lr = server_lr or DEFAULT_SERVER_LR[name]
    if name == "fedprox":
        return FedProx(layout, clients_per_round, proximal_mu=proximal_mu, server_lr=lr, **kw)
    return STRATEGIES[name](layout, clients_per_round, server_lr=lr, **kw)
