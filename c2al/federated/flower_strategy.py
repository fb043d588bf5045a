"""Flower's own Strategy interface around c2al's strategies (RowwiseFedAvg, RowwiseFedProx, RowwiseFedAdam, ...).

`FlowerStrategy` is a `flwr.serverapp.strategy.Strategy`. Its hooks are the two halves
of the one round body (`rounds.begin_round` / `rounds.end_round`) with Messages between
them, so both engines share the devices' availability and dropout, the sampling, the
client configs, the validation of updates, the aggregation maths and the server optimizer:

- configure_train: `begin_round` (online devices, the c2al strategy's `configure_train`,
  mid-round dropout, seeded by (seed, round) as in-process), then one train Message to
  the node of each remaining client; no other node hears anything.
- aggregate_train: the replies become FitResults in sampling order and `end_round`
  rejects, combines and steps, as `simulation.one_round` does.
- configure_evaluate / aggregate_evaluate: evaluate Messages to the clients the c2al
  strategy's `configure_evaluate` names (those in config["cids"]; none otherwise); each
  reply carries the client's scores of its own rows, and the test log loss is pooled
  by the c2al strategy's `aggregate_evaluate`.

c2al's ServerApp (`flower.FlowerRounds`) drives these hooks with the same rounds loop and
early-stopping rule as the in-process engine; Flower's `Strategy.start` drives them too
(every round, no early stopping). Flower counts rounds from 1, as c2al's hooks do; the
round index in metrics is Flower's round - 1. Every reply names its client
(`partition-id`); a reply from a node holding another client than the map says stops
the run instead of training on the wrong data.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from c2al.errors import C2ALError
from c2al.federated.client import FitResult, Rows
from c2al.federated.heterogeneity import Devices
from c2al.federated.rounds import RoundPlan, begin_round, end_round
from c2al.federated.strategy import Params, RowwiseFedAvg

log = logging.getLogger("c2al.federated")


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> a Flower ArrayRecord (names kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}) if arrays else ArrayRecord()


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def pack_rows(rows: dict[str, Rows]) -> dict[str, np.ndarray]:
    """Row updates as flat arrays: table -> (ids [R], rows [R, D]) becomes `table|ids`, `table|rows`."""
    out = {}
    for n, (ids, vals) in rows.items():
        out[f"{n}|ids"], out[f"{n}|rows"] = np.asarray(ids, dtype=np.int64), np.ascontiguousarray(vals)
    return out


def unpack_rows(arrays: dict[str, np.ndarray]) -> dict[str, Rows]:
    names = {k.rsplit("|", 1)[0] for k in arrays if "|" in k}
    return {n: (arrays[f"{n}|ids"], arrays[f"{n}|rows"]) for n in names}


class FlowerStrategy(Strategy):
    """A c2al strategy behind Flower's Strategy interface.

    Args:
        inner: the c2al strategy (sampling, client configs, validation, aggregation, server optimizer).
        params: initial global shared parameters; `params` always holds the current ones.
        devices: the simulated devices (availability, mid-round dropout, step budgets).
        seed: seed of sampling and dropout (as `simulation.run_rounds`).

    Attributes:
        node_of: client -> Flower node id (set by the ServerApp before the first round).
        history: per-round metrics, as `FedTrained.history` of the in-process engine, plus seconds.
        scores: client -> {"valid": [n_valid], "test": [n_test]} from evaluate replies.

    Example:
        Inside a ServerApp's main, with `node_of` known (see `c2al.federated.flower`):

        >>> strategy = FlowerStrategy(RowwiseFedAvg(layout, 50), params, Devices(tiers, spec), seed=0)  # doctest: +SKIP
        >>> strategy.node_of = node_of                                                                 # doctest: +SKIP
        >>> strategy.start(grid, to_record(params), num_rounds=30)                                     # doctest: +SKIP
    """

    def __init__(self, inner: RowwiseFedAvg, params: Params, devices: Devices, *, seed: int) -> None:
        self.inner, self.params, self.devices, self.seed = inner, params, devices, seed
        self.node_of: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self.scores: dict[int, dict[str, np.ndarray]] = {}
        self._plan: RoundPlan | None = None

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """`rounds.begin_round`, then one train Message per client still in; nothing to the other nodes."""
        self._plan = plan = begin_round(self.inner, self.devices, server_round - 1, self.seed, self.params)
        messages = []
        for cid, conf in plan.jobs:
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), **conf, "server-round": server_round})})
            messages.append(Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """Replies -> FitResults in sampling order -> `rounds.end_round`."""
        plan = self._plan
        by_node = {m.metadata.src_node_id: m for m in replies}
        fitted = [(cid, self._fit_result(cid, by_node.get(self.node_of[cid]))) for cid, _ in plan.jobs]
        self.params, metrics, _ = end_round(self.inner, plan, self.params, fitted)
        metrics["seconds"] = time.perf_counter() - plan.began
        self.history.append(metrics)
        scalars = {k: metrics[k] for k in ("aggregated", "sampled", "examples", "loss") if k in metrics}
        return to_record(self.params), MetricRecord(scalars)

    def _fit_result(self, cid: int, reply: Message | None) -> FitResult | str:
        """A client's reply as the FitResult the in-process engine would have, or why there is none."""
        if reply is None:
            return "no reply"
        if reply.has_error():
            return f"raised: {reply.error.reason}"
        self._check_client(cid, reply)
        m = reply.content["metrics"]
        update = from_record(reply.content["update"])
        return FitResult(num_examples=int(m["num-examples"]), dense={k: v for k, v in update.items() if "|" not in k},
                         rows=unpack_rows(update), private={}, metrics={"loss": float(m["loss"])})

    def _check_client(self, cid: int, reply: Message) -> None:
        held = int(reply.content["metrics"]["partition-id"])
        if held != cid:
            raise C2ALError(f"Flower node {reply.metadata.src_node_id} holds client {held}, not {cid}: the node -> client "
                            "map built from Flower's registration order is wrong for this Flower version")

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Evaluate Messages to the clients the c2al strategy names (config["cids"]; none unless named)."""
        plan = self.inner.configure_evaluate(server_round, self.params, dict(config), grid)
        return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}), dst_node_id=self.node_of[c],
                        message_type=MessageType.EVALUATE) for c, conf in plan]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each client's scores; the c2al strategy pools the test log loss (None without replies)."""
        client_of = {n: c for c, n in self.node_of.items()}
        answers = []
        for reply in replies:
            cid = client_of.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                raise C2ALError(f"evaluation failed on client {cid}: {reply.error.reason}")
            self._check_client(cid, reply)
            self.scores[cid] = from_record(reply.content["scores"])
            answers.append((cid, dict(reply.content["metrics"])))
        pooled = self.inner.aggregate_evaluate(server_round, answers)
        return None if pooled is None else MetricRecord(pooled)

    def summary(self) -> None:
        """Flower logs this when `start` begins."""
        from flwr.supercore import log as flwr_log

        s = self.inner
        flwr_log(logging.INFO, "\t├── c2al %s: %d clients per round, %d local epoch(s), server lr %g, device availability %s",
                 s.name, s.clients_per_round, s.epochs, s.server_lr, list(self.devices.spec.availability))
