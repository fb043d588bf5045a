"""Server strategies in Flower 1.41's words: configure_train / aggregate_train / configure_evaluate / aggregate_evaluate.

`configure_train` samples the round's clients among the online ones (which devices
are online, which drop out and how many steps each affords is `heterogeneity.Devices`,
not the strategy) and says how each trains (seed, local epochs, FedProx's mu, SAM's
rho). `aggregate_train` rejects malformed updates, combines the rest with the pure
functions of `aggregate`, and steps the server optimizer. RowwiseFedAvg (server lr 1:
the mean model), RowwiseFedProx (FedAvg on the server, a proximal term on the clients),
RowwiseFedAdam and RowwiseFedYogi (Reddi et al. 2021) and RowwiseFedAdagrad (RF^2's server) are provided; "Rowwise" because
shared embedding tables are averaged and stepped row by row over the clients that
touched each row, and so that they do not shadow Flower's own FedAvg / FedProx / FedAdam,
which `flower_strategy` lets a user swap in. How the accepted updates are combined before
the server step is an `Aggregation` (--aggregation): the weighted mean, or a rule robust
to poisoned updates (coordinate-wise median, trimmed mean, norm clipping, Multi-Krum).

Parameters are a dict name -> numpy array holding only SHARED parameters:
users' private rows never reach the server.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from c2al.errors import C2ALError
from c2al.federated import aggregate as agg
from c2al.federated.client import SEED_STRIDE, FitResult, Layout
from c2al.federated.heterogeneity import RoundDevices

log = logging.getLogger("c2al.federated")
Params = dict[str, np.ndarray]
Deltas = dict[str, tuple[np.ndarray | None, np.ndarray]]  # name -> (row ids, or None for dense; delta)
AGGREGATIONS = ("mean", "median", "trimmed-mean", "norm-clip", "krum")


@dataclass(frozen=True)
class Aggregation:
    """How `aggregate_train` combines the accepted updates into one delta per parameter.

    Dense parameters are combined whole; shared tables row by row over the
    clients that sent each row; private user rows never reach the server.
    Every rule first caps the example counts clients report
    (`aggregate.cap_counts`): a client lying about its data weighs at most
    `count_cap` typical clients (the mean and the clipped mean weigh by the
    capped counts; median, trimmed mean and Krum's choice ignore counts).

    Attributes:
        rule: mean (FedAvg's weighted mean); median or trimmed-mean (per coordinate,
            unweighted, by Flower's functions; each client's table rows are first
            clipped to the round's median row norm, see `aggregate.rowwise`);
            norm-clip (each client's whole update, dense and rows together, clipped
            to `clip_norm`, then the weighted mean);
            krum (Flower's Multi-Krum keeps the C - f updates closest to their
            neighbours, then their weighted mean).
        trim_fraction: share cut from each end of a coordinate's values (trimmed-mean).
        clip_norm: norm-clip threshold; 0 takes the round's median update norm.
        krum_f: clients Krum assumes Byzantine per round: a share of the round's
            updates when < 1, else a count; at most (C - 3) // 2, Krum's limit.
        count_cap: a count weighs at most this multiple of the round's median count (0: no cap).
        max_examples: the most examples any client's step budget allows (0: unknown).

    Example:
        >>> Aggregation("krum").krum_count(50), Aggregation("krum", krum_f=3).krum_count(50)
        (12, 3)
    """

    rule: str = "mean"
    trim_fraction: float = 0.2
    clip_norm: float = 0.0
    krum_f: float = 0.25
    count_cap: float = 5.0
    max_examples: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATIONS:
            raise C2ALError(f"--aggregation must be one of {list(AGGREGATIONS)}, got {self.rule!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise C2ALError(f"--trim-fraction must lie in [0, 0.5), got {self.trim_fraction}")
        for flag, value in (("--clip-norm", self.clip_norm), ("--krum-f", self.krum_f), ("--count-cap", self.count_cap)):
            if not value >= 0:
                raise C2ALError(f"{flag} must be >= 0, got {value}")

    def krum_count(self, n: int) -> int:
        """f for a round of n updates."""
        f = int(self.krum_f * n) if self.krum_f < 1 else int(self.krum_f)
        return max(0, min(f, (n - 3) // 2))

    def combine(self, updates: Sequence[FitResult], layout: Layout, params: Params
                ) -> tuple[Deltas, np.ndarray, dict[str, Any]]:
        """One delta per shared parameter from the accepted updates.

        Args:
            updates: the accepted clients' results [C].
            layout: which parameters are dense and which are tables.
            params: the global parameters (table sizes).

        Returns:
            (deltas, the capped example counts [C], metrics of the rule).
        """
        counts = np.array([float(r.num_examples) for r in updates])
        weights = agg.cap_counts(counts, median_multiple=self.count_cap, bound=self.max_examples)
        info: dict[str, Any] = {"capped": int((weights < counts).sum())}
        dense = {n: [r.dense[n] for r in updates] for n in layout.dense}
        tables = {n: ([r.rows[n][0] for r in updates], [r.rows[n][1] for r in updates]) for n in layout.tables}
        if self.rule in ("median", "trimmed-mean"):
            deltas: Deltas = {n: (None, agg.coordinatewise(a, self.rule, self.trim_fraction)) for n, a in dense.items()}
            deltas.update({n: agg.rowwise(i, r, self.rule, self.trim_fraction) for n, (i, r) in tables.items()})
            return deltas, weights, info
        keep, scale = np.arange(len(updates)), np.ones(len(updates))
        if self.rule == "norm-clip":
            norms = np.linalg.norm(agg.flat_updates(list(dense.values()), list(tables.values())), axis=1)
            scale, info["clip_norm"] = agg.clip_factors(norms, self.clip_norm)
            info["clipped"] = int((scale < 1).sum())
        elif self.rule == "krum":
            f = self.krum_count(len(updates))
            keep = agg.krum_select(agg.flat_updates(list(dense.values()), list(tables.values())), f, len(updates) - f)
            info["krum_kept"] = len(keep)
        w = weights[keep]
        deltas = {n: (None, agg.weighted_mean([a[c] * scale[c] for c in keep], w)) for n, a in dense.items()}
        for n, (ids, rows) in tables.items():
            deltas[n] = agg.rowwise_mean([ids[c] for c in keep], [rows[c] * scale[c] for c in keep], w, params[n].shape[0])
        return deltas, weights, info


class RowwiseFedAvg:
    """FedAvg (McMahan et al. 2017) with row-wise averaging of embedding tables, in Flower 1.41's hook names.

    In-process the hooks speak numpy dicts (shared parameter name -> array) and (client, config)
    pairs instead of ArrayRecords and Messages: the clients live in this process, so a message
    would only wrap and unwrap the same arrays. `flower_strategy.FlowerStrategy` puts them behind
    Flower's own `Strategy`, over ArrayRecord / MetricRecord. Which clients are online is the
    simulated devices' doing (`heterogeneity.Devices`): the strategy samples among them.

    Args:
        layout: which parameters are tables (row updates) and which are dense.
        clients_per_round: clients sampled per round (fewer when fewer are online).
        epochs: local epochs per round.
        server_lr: step on the averaged delta (1.0: the mean of the client models).
        sam_rho: local SAM radius (0: plain local steps).
        seed: base seed of the clients' shuffles and dropout.
        aggregation: how updates are combined (an `Aggregation`, or a rule name with default options).

    Example:
        >>> from c2al.federated.heterogeneity import RoundDevices
        >>> grid = RoundDevices(np.arange(10), 10, np.random.default_rng(0))
        >>> [cid for cid, _ in RowwiseFedAvg(None, 3).configure_train(1, {}, {}, grid)]
        [5, 6, 9]
    """

    name = "fedavg"

    def __init__(self, layout: Layout, clients_per_round: int, *, epochs: int = 1, server_lr: float = 1.0,
                 sam_rho: float = 0.0, seed: int = 0, aggregation: Aggregation | str = "mean") -> None:
        self.layout, self.clients_per_round, self.epochs = layout, clients_per_round, epochs
        self.server_lr, self.sam_rho, self.seed = server_lr, sam_rho, seed
        self.aggregation = Aggregation(aggregation) if isinstance(aggregation, str) else aggregation

    # ------------------------------------------------------------------ hooks
    def configure_train(self, server_round: int, arrays: Params, config: dict[str, Any], grid: RoundDevices
                        ) -> list[tuple[int, dict[str, Any]]]:
        """(client, train config) for each client sampled among the round's online ones.

        Args:
            server_round: Flower's round number, from 1.
            arrays: the global shared parameters (they travel with the jobs in-process).
            config: merged into every client's config.
            grid: the round's online devices and its generator.

        Returns:
            [(client index, config)] in ascending client order.
        """
        pool = grid.online
        if len(pool) == 0:
            return []
        chosen = np.sort(grid.rng.choice(pool, size=min(self.clients_per_round, len(pool)), replace=False))
        return [(int(c), {**config, **self.train_config(server_round, int(c), grid.population)}) for c in chosen]

    def train_config(self, server_round: int, cid: int, population: int) -> dict[str, Any]:
        """How client `cid` trains in `server_round`: its batch-order seed, dropout stream, epochs, SAM and FedProx terms."""
        # Round 1's client 0 draws what centralized training draws (batch order seed*1000 + epoch,
        # dropout from `task.step_seed(seed, step)`): one client holding all data then equals it.
        rnd = server_round - 1
        pair = rnd * population + cid
        return {"round": rnd, "seed": self.seed * 1000 + pair * 1009, "dropout_seed": self.seed, "dropout_stream": pair * SEED_STRIDE,
                "epochs": self.epochs, "sam_rho": self.sam_rho, "proximal_mu": 0.0}

    def aggregate_train(self, server_round: int, arrays: Params, replies: Sequence[tuple[int, FitResult]]
                        ) -> tuple[Params, dict[str, Any]]:
        """Validate, combine and step.

        Args:
            server_round: Flower's round number, from 1.
            arrays: the global shared parameters the round started from.
            replies: (client, its update) for every client that answered.

        Returns:
            (new parameters, round metrics); metrics["rejected"] lists (client, reason) of refused updates.
        """
        rnd = server_round - 1
        good, rejected = [], []
        for cid, res in replies:
            reason = self.validate(arrays, res)
            if reason is None:
                good.append((cid, res))
            else:
                log.warning("round %d: client %d rejected: %s", rnd, cid, reason)
                rejected.append((cid, f"rejected: {reason}"))
        metrics: dict[str, Any] = {"round": rnd, "aggregated": len(good), "rejected": rejected}
        if not good:
            log.warning("round %d: no client update to aggregate; the global model is unchanged", rnd)
            return arrays, metrics
        deltas, weights, info = self.aggregation.combine([r for _, r in good], self.layout, arrays)
        metrics.update(info)
        metrics["loss"] = float(np.average([r.metrics.get("loss", np.nan) for _, r in good], weights=weights))
        metrics["examples"] = int(sum(weights))
        return self.server_step(rnd, arrays, deltas), metrics

    def configure_evaluate(self, server_round: int, arrays: Params, config: dict[str, Any], grid: Any) -> list[tuple[int, dict[str, Any]]]:
        """(client, evaluate config) for the clients named in config["cids"] (none unless named)."""
        return [(int(c), {"server-round": server_round}) for c in config.get("cids", [])]

    def aggregate_evaluate(self, server_round: int, replies: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float] | None:
        """The clients' test log loss pooled over their rows (None without replies).

        Example:
            >>> RowwiseFedAvg(None, 1).aggregate_evaluate(1, [(0, {"num-examples": 1, "logloss-sum": 2.0}),
            ...                                               (1, {"num-examples": 3, "logloss-sum": 2.0})])
            {'num-examples': 4, 'logloss': 1.0}
        """
        n = sum(int(m["num-examples"]) for _, m in replies)
        return {"num-examples": n, "logloss": sum(float(m["logloss-sum"]) for _, m in replies) / n} if n else None

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


class RowwiseFedProx(RowwiseFedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server, mu/2 |w - w_global|^2 on every client."""

    name = "fedprox"

    def __init__(self, layout: Layout, clients_per_round: int, *, proximal_mu: float = 0.01, **kw: Any) -> None:
        super().__init__(layout, clients_per_round, **kw)
        if proximal_mu < 0:
            raise C2ALError(f"--proximal-mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def train_config(self, server_round: int, cid: int, population: int) -> dict[str, Any]:
        return {**super().train_config(server_round, cid, population), "proximal_mu": self.proximal_mu}


class RowwiseFedAdam(RowwiseFedAvg):
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


class RowwiseFedYogi(RowwiseFedAdam):
    """FedYogi (Reddi et al. 2021): FedAdam with Yogi's additive second moment (no bias correction,
    as Reddi's Algorithm 2 and Flower's FedYogi); lazy on table rows."""

    name = "fedyogi"

    def server_step(self, rnd: int, params: Params, deltas: dict[str, tuple[np.ndarray | None, np.ndarray]]) -> Params:
        self.t += 1
        out = dict(params)
        for n, (ids, delta) in deltas.items():
            m = self.m.setdefault(n, np.zeros(params[n].shape))
            v = self.v.setdefault(n, np.zeros(params[n].shape))
            sel = slice(None) if ids is None else ids
            new = params[n].astype(np.float64)
            new[sel], m[sel], v[sel] = agg.fedyogi_step(new[sel], delta, m[sel], v[sel], lr=self.server_lr,
                                                        beta1=self.beta1, beta2=self.beta2, tau=self.tau)
            out[n] = new.astype(params[n].dtype)
        return out


class RowwiseFedAdagrad(RowwiseFedAvg):
    """FedAdagrad: Adagrad on the pseudo-gradient -delta, as torch.optim.Adagrad steps RF^2's server (Maeng et al. 2022).

    v += delta^2; param += lr * delta / (sqrt(v) + tau). A row no client touched has delta 0 and
    keeps its state, so stepping only the touched rows is exact. tau defaults to torch's eps.

    Example:
        >>> s = RowwiseFedAdagrad(None, 1, server_lr=0.1)
        >>> [round(float(s.server_step(0, {"w": np.zeros(1)}, {"w": (None, np.array([d]))})["w"][0]), 4) for d in (2.0, 2.0)]
        [0.1, 0.0707]
    """

    name = "fedadagrad"

    def __init__(self, layout: Layout, clients_per_round: int, *, tau: float = 1e-10, **kw: Any) -> None:
        super().__init__(layout, clients_per_round, **kw)
        self.tau = tau
        self.v: dict[str, np.ndarray] = {}

    def server_step(self, rnd: int, params: Params, deltas: dict[str, tuple[np.ndarray | None, np.ndarray]]) -> Params:
        out = dict(params)
        for n, (ids, delta) in deltas.items():
            v = self.v.setdefault(n, np.zeros(params[n].shape))
            sel = slice(None) if ids is None else ids
            new = params[n].astype(np.float64)
            v[sel] += delta * delta
            new[sel] += self.server_lr * delta / (np.sqrt(v[sel]) + self.tau)
            out[n] = new.astype(params[n].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v = {k: np.asarray(v, dtype=np.float64) for k, v in state.get("v", {}).items()}


STRATEGIES = {"fedavg": RowwiseFedAvg, "fedprox": RowwiseFedProx, "fedadam": RowwiseFedAdam, "fedyogi": RowwiseFedYogi,
              "fedadagrad": RowwiseFedAdagrad}
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.1}


def make_strategy(name: str, layout: Layout, clients_per_round: int, *, server_lr: float = 0.0,
                  proximal_mu: float = 0.01, **kw: Any) -> RowwiseFedAvg:
    """The strategy named by --server-optimizer; server_lr 0 takes the strategy's default."""
    if name not in STRATEGIES:
        raise C2ALError(f"--server-optimizer must be one of {sorted(STRATEGIES)}, got {name!r}")
    lr = server_lr or DEFAULT_SERVER_LR[name]
    if name == "fedprox":
        return RowwiseFedProx(layout, clients_per_round, proximal_mu=proximal_mu, server_lr=lr, **kw)
    return STRATEGIES[name](layout, clients_per_round, server_lr=lr, **kw)
