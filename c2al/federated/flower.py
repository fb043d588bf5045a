"""`--engine flower`: the same client and server logic as a Flower ClientApp / ServerApp.

The ClientApp's train handler is `LocalTrainer.fit` (the shared task inside);
the ServerApp's loop calls the same strategy hooks (`configure_fit`,
`aggregate_fit`) as the in-process engine. Only the transport differs:
parameters travel as Flower ArrayRecords, configs as ConfigRecords, and each
client's private rows live in its node's `Context.state`, which Flower keeps
between rounds. Moving to Flower's deployment engine (real devices) changes
neither the model code nor these two apps.

Simulation runs on Flower's Ray backend (flwr[simulation] 1.41, optional:
`pip install .[flower]`). Virtual node i holds client i (its partition-id).
For the simulation's report the server finally asks every node that trained
for its private rows (a deployment would instead run a Flower evaluate round
returning NE sums); `--resume` is not supported by this engine.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from c2al.errors import C2ALError
from c2al.federated.client import ClientData, FitResult, LocalTrainer
from c2al.federated.heterogeneity import drops_out, round_rng
from c2al.federated.simulation import ClientStore, FedTrained, initial_params
from c2al.federated.strategy import FedAvg

_TRAINERS: dict[str, LocalTrainer] = {}  # one working model per Ray actor process and phase


def _require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise C2ALError("--engine flower needs Flower: pip install '.[flower]' (flwr[simulation]==1.41)") from None


def _pack_rows(rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for n, (ids, vals) in rows.items():
        out[f"{n}|ids"], out[f"{n}|rows"] = np.asarray(ids, dtype=np.int64), np.ascontiguousarray(vals)
    return out


def _unpack_rows(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = {k.rsplit("|", 1)[0] for k in arrays}
    return {n: (arrays[f"{n}|ids"], arrays[f"{n}|rows"]) for n in names}


def _record(arrays: dict[str, np.ndarray]) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}) if arrays else ArrayRecord()


def _arrays(record: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def make_client_app(factory: Any, clients: list[ClientData], tag: str) -> Any:
    """A Flower ClientApp whose train handler is LocalTrainer.fit on the node's own client."""
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def trainer() -> LocalTrainer:
        if tag not in _TRAINERS:
            torch.set_num_threads(1)
            _TRAINERS[tag] = factory()
        return _TRAINERS[tag]

    def private_rows(t: LocalTrainer, client: ClientData, context: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if "private" in context.state:
            return _unpack_rows(_arrays(context.state["private"]))
        init = t.initial_private
        return {n: (t.touched(client, f), init[n][t.touched(client, f)]) for n, f in t.layout.private.items()}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t = trainer()
        client = clients[int(context.node_config["partition-id"])]
        params = _arrays(msg.content["arrays"])
        conf = dict(msg.content["config"])
        t.load(params)
        res = t.fit(client, params, private_rows(t, client, context), conf)
        context.state["private"] = _record(_pack_rows(res.private))
        return Message(RecordDict({"dense": _record(res.dense), "rows": _record(_pack_rows(res.rows)),
                                   "metrics": MetricRecord({"num_examples": res.num_examples, "loss": float(res.metrics.get("loss", 0.0))})}),
                       reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        t = trainer()
        client = clients[int(context.node_config["partition-id"])]
        content = {"metrics": MetricRecord({"cid": client.cid})}
        if msg.content["config"]["what"] == "private" and "private" in context.state:
            content["private"] = context.state["private"]
        return Message(RecordDict(content), reply_to=msg)

    return app


def make_server_app(trained: FedTrained, strategy: FedAvg, clients: list[ClientData], tiers: np.ndarray, *,
                    rounds: int, seed: int, spec: Any, show: bool, tag: str) -> Any:
    """A Flower ServerApp running the strategy's hooks for `rounds` rounds; results land in `trained`."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from tqdm.auto import tqdm

    app = ServerApp()

    def ask(grid: Grid, nodes: list[int], what: str) -> list[Message]:
        msgs = [Message(RecordDict({"config": ConfigRecord({"what": what})}), dst_node_id=n, message_type="query") for n in nodes]
        return list(grid.send_and_receive(msgs))

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        nodes = list(grid.get_node_ids())
        while len(nodes) < len(clients):  # virtual nodes register asynchronously
            time.sleep(0.2)
            nodes = list(grid.get_node_ids())
        node_of = {int(m.content["metrics"]["cid"]): m.metadata.src_node_id for m in ask(grid, nodes, "cid")}
        for rnd in tqdm(range(rounds), desc=f"[{tag}] flower rounds", disable=not show, leave=False):
            rng = round_rng(seed, rnd)
            plan = strategy.configure_fit(rnd, tiers, rng)
            failures: list[tuple[int, str]] = []
            msgs, sent = [], []
            for cid, conf in plan:
                if drops_out(int(tiers[cid]), spec, rng):
                    failures.append((cid, "dropped out mid-round"))
                    continue
                msgs.append(Message(RecordDict({"arrays": _record(trained.params),
                                                "config": ConfigRecord(conf)}), dst_node_id=node_of[cid], message_type="train",
                                    group_id=str(rnd)))
                sent.append(cid)
            by_node = {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs)} if msgs else {}
            results = []
            for cid in sent:
                reply = by_node.get(node_of[cid])
                if reply is None or reply.has_error():
                    failures.append((cid, f"raised: {reply.error.reason if reply is not None else 'no reply'}"))
                    continue
                m = reply.content["metrics"]
                results.append((cid, FitResult(num_examples=int(m["num_examples"]), dense=_arrays(reply.content["dense"]),
                                               rows=_unpack_rows(_arrays(reply.content["rows"])), private={}, metrics={"loss": float(m["loss"])})))
            trained.params, metrics = strategy.aggregate_fit(rnd, trained.params, results, failures)
            metrics["sampled"] = len(plan)
            metrics["failures"] = [[int(c), r] for c, r in failures]
            trained.history.append(metrics)
        for reply in ask(grid, nodes, "private"):  # simulation report only (see module docstring)
            if reply.has_content() and "private" in reply.content:
                trained.store.put(int(reply.content["metrics"]["cid"]), _unpack_rows(_arrays(reply.content["private"])))

    return app


def run_rounds_flower(trainer: LocalTrainer, strategy: FedAvg, clients: list[ClientData], tiers: np.ndarray, *, cfg: Any,
                      splits: Any, rounds: int, seed: int, spec: Any, checkpoint: Any = None, resume: bool = False,
                      config: Any = None, shape_keys: tuple = (), show: bool = True, tag: str = "federated") -> FedTrained:
    """The Flower twin of `simulation.run_rounds` (same arguments), on Flower's Ray simulation backend.

    One Ray actor: each actor imports torch and TorchRec once, which on a 2-core machine costs
    more than the clients' training; the clients of a round run one after another, as in-process.
    """
    _require_flower()
    from flwr.simulation import run_simulation

    if resume:
        raise C2ALError("--resume is not supported with --engine flower; use --engine simulation")
    params, private_init = initial_params(trainer)
    trainer.initial_private = private_init
    trained = FedTrained(trainer=trainer, params=params, store=ClientStore(private_init))
    factory = _Factory(trainer)
    began = time.perf_counter()
    run_simulation(server_app=make_server_app(trained, strategy, clients, tiers, rounds=rounds, seed=seed, spec=spec, show=show, tag=tag),
                   client_app=make_client_app(factory, clients, tag), num_supernodes=len(clients),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False, "log_to_driver": False}})
    trained.seconds = time.perf_counter() - began
    if len(trained.history) != rounds:
        raise C2ALError(f"Flower simulation stopped after {len(trained.history)} of {rounds} rounds (see Flower's log above)")
    return trained


class _Factory:
    """Ships the working model to each Ray actor once (pickled), where it becomes that actor's trainer."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer

    def __call__(self) -> LocalTrainer:
        return self.trainer
