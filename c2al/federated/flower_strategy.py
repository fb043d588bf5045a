"""Flower's own Strategy interface around c2al's strategies (FedAvg, FedProx, FedAdam).

`FlowerStrategy` is a `flwr.serverapp.strategy.Strategy`: Flower's `Strategy.start`
drives the rounds (configure_train -> Grid.send_and_receive -> aggregate_train ->
configure_evaluate -> aggregate_evaluate) exactly as it drives Flower's FedAvg. Each
hook calls the c2al strategy's hooks, so both engines share the sampling, the client
configs, the validation of updates, the aggregation maths and the server optimizer:

- configure_train: `configure_fit` samples the round's clients among the available ones
  (seeded by (seed, round) as in-process), mid-round dropout removes some, and one train
  Message goes to the node of each remaining client; no other node hears anything.
- aggregate_train: the replies become FitResults in sampling order and `aggregate_fit`
  rejects, averages and steps, as `simulation.one_round` does.
- configure_evaluate / aggregate_evaluate: evaluate Messages to the clients named in the
  config (none during `start`: rounds run without evaluation, as Flower's FedAvg with
  fraction_evaluate=0); each reply carries the client's scores of its own rows.

Flower counts rounds from 1, c2al from 0: Flower's round r is c2al's round r - 1.
Every reply names its client (`partition-id`); a reply from a node holding another
client than the map says stops the run instead of training on the wrong data.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from c2al.errors import C2ALError
from c2al.federated.client import FitResult, Rows
from c2al.federated.heterogeneity import TierSpec, drops_out, round_rng
from c2al.federated.strategy import FedAvg, Params

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
    """A c2al strategy behind Flower's Strategy interface, driven by Flower's `start`.

    Args:
        inner: the c2al strategy (sampling, client configs, validation, aggregation, server optimizer).
        params: initial global shared parameters; `params` always holds the current ones.
        tiers: device tier per client [N].
        seed: seed of sampling and dropout (as `simulation.run_rounds`).
        spec: the tiers' mid-round dropout.
        on_round: called with each round's metrics (a progress bar).

    Attributes:
        node_of: client -> Flower node id (set by the ServerApp before `start`).
        history: per-round metrics, as `FedTrained.history` of the in-process engine, plus seconds.
        scores: client -> {"valid": [n_valid], "test": [n_test]} from evaluate replies.

    Example:
        Inside a ServerApp's main, with `node_of` known (see `c2al.federated.flower`):

        >>> strategy = FlowerStrategy(FedAvg(layout, 50), params, tiers, seed=0)  # doctest: +SKIP
        >>> strategy.node_of = node_of                                             # doctest: +SKIP
        >>> strategy.start(grid, to_record(params), num_rounds=30)                 # doctest: +SKIP
    """

    def __init__(self, inner: FedAvg, params: Params, tiers: np.ndarray, *, seed: int, spec: TierSpec | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.inner, self.params, self.tiers, self.seed = inner, params, tiers, seed
        self.spec = spec or inner.spec
        self.on_round = on_round
        self.node_of: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self.scores: dict[int, dict[str, np.ndarray]] = {}
        self._round: dict[str, Any] = {}

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """One train Message per sampled client that does not drop out; nothing to the other nodes."""
        rnd = server_round - 1
        rng = round_rng(self.seed, rnd)
        plan = self.inner.configure_fit(rnd, self.tiers, rng)
        failures: list[tuple[int, str]] = []
        messages, sent = [], []
        for cid, conf in plan:
            if drops_out(int(self.tiers[cid]), self.spec, rng):  # same draw order as simulation.one_round
                failures.append((cid, "dropped out mid-round"))
                continue
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), **conf, "server-round": server_round})})
            messages.append(Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN, group_id=str(server_round)))
            sent.append(cid)
        if not plan:
            log.warning("round %d: no client available", rnd)
        self._round = {"sampled": len(plan), "sent": sent, "failures": failures, "began": time.perf_counter()}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """Replies -> FitResults in sampling order -> the c2al strategy's `aggregate_fit`."""
        rnd, state = server_round - 1, self._round
        by_node = {m.metadata.src_node_id: m for m in replies}
        results, failures = [], state["failures"]
        for cid in state["sent"]:
            res = self._fit_result(cid, by_node.get(self.node_of[cid]))
            if isinstance(res, str):
                log.warning("round %d: client %d dropped: %s", rnd, cid, res)
                failures.append((cid, res))
            else:
                results.append((cid, res))
        self.params, metrics = self.inner.aggregate_fit(rnd, self.params, results, failures)
        metrics["sampled"] = state["sampled"]
        metrics["failures"] = [[int(c), r] for c, r in failures]
        metrics["seconds"] = time.perf_counter() - state["began"]
        self.history.append(metrics)
        if self.on_round is not None:
            self.on_round(metrics)
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
        """Evaluate Messages to the clients in config["cids"] (none unless named)."""
        cids = [int(c) for c in config.get("cids", [])]
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
        return [Message(content, dst_node_id=self.node_of[c], message_type=MessageType.EVALUATE) for c in cids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each client's scores; return the test log loss over the replies (None without replies)."""
        client_of = {n: c for c, n in self.node_of.items()}
        n, loss = 0, 0.0
        for reply in replies:
            cid = client_of.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                raise C2ALError(f"evaluation failed on client {cid}: {reply.error.reason}")
            self._check_client(cid, reply)
            self.scores[cid] = from_record(reply.content["scores"])
            n += int(reply.content["metrics"]["num-examples"])
            loss += float(reply.content["metrics"]["logloss-sum"])
        return MetricRecord({"num-examples": n, "logloss": loss / n}) if n else None

    def summary(self) -> None:
        """Flower logs this when `start` begins."""
        from flwr.supercore import log as flwr_log

        s = self.inner
        flwr_log(logging.INFO, "\t├── c2al %s: %d clients per round, %d local epoch(s), server lr %g, tiers %s",
                 s.name, s.clients_per_round, s.epochs, s.server_lr, list(self.spec.availability))
