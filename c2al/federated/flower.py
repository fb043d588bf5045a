"""`--engine flower`: the federated rounds as a Flower ServerApp / ClientApp on Ray (flwr 1.41).

Server: a ServerApp (`FlowerRounds`) that drives `FlowerStrategy` (Flower's Strategy
interface around c2al's RowwiseFedAvg / RowwiseFedProx / RowwiseFedAdam / RowwiseFedYogi)
with the in-process engine's rounds loop and early-stopping rule (`rounds.drive_rounds`):
every `eval_every` rounds the clients score their own validation rows and the run stops
after `patience` evaluations without a better NE, as in-process. One of Flower's
strategies (`flwr.serverapp.strategy.FedAvg`, ...) can take c2al's place under Flower's
own `Strategy.start`: the ClientApp answers a train message without c2al's plan with its
full trained model, as Flower's strategies expect. Client: virtual node i holds client i
(`context.node_config["partition-id"]`), trains it with `LocalTrainer.fit` (the shared
task inside) and keeps its private rows in `context.state`, which Flower keeps between
messages. A deployment would change neither app.

The cost grows with the clients sampled, not with the population:
- node -> client map without a message: Flower's simulation registers virtual node i
  i-th and gives it partition-id i, so `grid.get_nodes()` sorted by registration time is
  the map (only nodes registered in the same microsecond would be asked); every reply
  names its client and a mismatch stops the run.
- a round sends one train message per sampled client and nothing to the other nodes.
- each Ray actor reads the model and the clients' data once, from a file: Flower's Ray
  backend pickles the ClientApp into every message, and with the data inside its closure
  that was 16 MB a message on MovieLens-100k.

What leaves a client in simulation: each round it is sampled, its update (dense deltas,
the deltas of the shared table rows it touched, its example count and loss); at each
evaluation (once at the end without one), its scores of its own validation and test rows
(early stopping, the report's per-tier and per-cohort tables and federated mining need
them). Its private rows never leave it, so `FedTrained.model` holds the seeded initial
private rows. An evaluation visits every client once, a few messages in flight at a time
(`WindowedGrid`), with a progress bar.
`--num-actors` Ray actors run the ClientApps. `--resume` is not supported here.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from c2al.data.schema import Table
from c2al.data.synthetic import concat_tables
from c2al.errors import C2ALError
from c2al.eval.metrics import logloss
from c2al.federated.client import ClientData, FitResult, LocalTrainer, Rows
from c2al.federated.heterogeneity import Devices, TierSpec
from c2al.federated.rounds import ClientStore, FedTrained, StopRule, drive_rounds, initial_params
from c2al.federated.strategy import RowwiseFedAvg
from c2al.train.task import predict, step_seed

log = logging.getLogger("c2al.federated")
# Messages in flight per Ray actor (see WindowedGrid): enough to keep an actor busy between Flower's
# delivery sweeps (0.1 s apart), few enough that a sweep over 6,040 nodes stays short.
WINDOW_PER_ACTOR = {"train": 4, "evaluate": 16}
SCORE_BATCH = 512  # rows a client scores per forward
_LOADED: dict[str, "ClientSide"] = {}  # one copy per Ray actor process


def _require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise C2ALError("--engine flower needs Flower: pip install '.[flower]' (flwr[simulation]==1.41)") from None


def backend_config(num_actors: int) -> dict[str, Any]:
    """Ray with `num_actors` CPUs and one CPU per ClientApp: Flower runs that many actors."""
    if num_actors < 1:
        raise C2ALError(f"--num-actors must be >= 1, got {num_actors}")
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_actors, "include_dashboard": False, "log_to_driver": False}}


# ------------------------------------------------------------------ client side
@dataclass
class ClientSide:
    """What the simulation's virtual nodes read: the working model and every client's rows."""

    trainer: LocalTrainer
    clients: list[ClientData]
    scored: Table  # the valid rows then the test rows: one forward scores a client's rows of both
    n_valid: int
    _key: bytes | None = field(default=None, repr=False)  # which global model the working model holds
    _params: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, trainer: LocalTrainer, clients: list[ClientData], valid: Table, test: Table) -> "ClientSide":
        return cls(trainer, clients, concat_tables([replace(valid, cohort_frame=None), replace(test, cohort_frame=None)]), len(valid))

    def rows(self, client: ClientData) -> np.ndarray:
        """The client's rows of `scored`: its valid rows, then its test rows."""
        return np.concatenate([client.valid, client.test + self.n_valid])

    def load_global(self, record: Any) -> dict[str, np.ndarray]:
        """A message's global shared parameters, decoded and written into the working model.

        Once per model: an actor's consecutive messages mostly carry the same one (the
        round's, then the final one), and decoding it cost half of an evaluation.
        `fit` and scoring leave the shared parameters as loaded.
        """
        from c2al.federated.flower_strategy import from_record

        key = hashlib.blake2b(b"".join(k.encode() + a.data for k, a in record.items()), digest_size=16).digest()
        if self._key != key:
            self._key, self._params = None, from_record(record)
            self.trainer.load(self._params)
            self._key = key
        return self._params

    def forget_global(self) -> None:
        """A client raised mid-fit: the working model may be half-updated."""
        self._key = None


class Payload:
    """A ClientSide pickled to a file once; each process loads it once (a few bytes per message)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def write(cls, side: ClientSide, folder: Path) -> "Payload":
        path = folder / "client_side.pkl"
        with open(path, "wb") as f:
            pickle.dump(side, f, protocol=pickle.HIGHEST_PROTOCOL)
        return cls(str(path))

    def get(self) -> ClientSide:
        if self.path not in _LOADED:
            torch.set_num_threads(1)  # a client's ops are tiny: intra-op threads only spin
            with open(self.path, "rb") as f:
                _LOADED[self.path] = pickle.load(f)
        return _LOADED[self.path]


def _private_rows(t: LocalTrainer, client: ClientData, context: Any) -> dict[str, Rows]:
    """The node's stored private rows, or the seeded initial ones before its first round."""
    from c2al.federated.flower_strategy import from_record, unpack_rows

    if "private" in context.state:
        return unpack_rows(from_record(context.state["private"]))
    init = t.initial_private
    return {n: (t.touched(client, f), init[n][t.touched(client, f)]) for n, f in t.layout.private.items()}


def _full_model(params: dict[str, np.ndarray], res: FitResult) -> dict[str, np.ndarray]:
    """The client's trained shared parameters, for Flower's own strategies (they average models)."""
    out = {n: params[n] + d for n, d in res.dense.items()}
    for n, (ids, delta) in res.rows.items():
        out[n] = params[n].copy()
        out[n][ids] += delta
    return out


def make_client_app(payload: Payload) -> Any:
    """A Flower ClientApp: virtual node i trains and evaluates client i (its partition-id)."""
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from c2al.federated.flower_strategy import pack_rows, to_record

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        side, cid = payload.get(), int(context.node_config["partition-id"])
        t, client = side.trainer, side.clients[cid]
        params, conf = side.load_global(msg.content["arrays"]), dict(msg.content["config"])
        native = "seed" not in conf  # one of Flower's own strategies: it sends only server-round
        if native:
            conf = {"seed": step_seed(int(conf.get("server-round", 0)), 0, stream=cid), "epochs": 1}  # the round's batch order
        try:
            res = t.fit(client, params, _private_rows(t, client, context), conf)
        except Exception:
            side.forget_global()
            raise
        context.state["private"] = to_record(pack_rows(res.private))
        update = ("arrays", _full_model(params, res)) if native else ("update", {**res.dense, **pack_rows(res.rows)})
        metrics = MetricRecord({"num-examples": res.num_examples, "loss": float(res.metrics.get("loss", 0.0)), "partition-id": cid})
        return Message(RecordDict({update[0]: to_record(update[1]), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        side, cid = payload.get(), int(context.node_config["partition-id"])
        t, client = side.trainer, side.clients[cid]
        side.load_global(msg.content["arrays"])
        t.write_private(_private_rows(t, client, context))
        probs = predict(t.module, side.scored, t.schema, SCORE_BATCH, rows=side.rows(client))
        scores = {"valid": probs[:len(client.valid)], "test": probs[len(client.valid):]}
        y = side.scored.labels[client.test + side.n_valid]
        loss_sum = logloss(scores["test"], y) * len(y) if len(y) else 0.0
        metrics = MetricRecord({"num-examples": len(client.test), "logloss-sum": float(loss_sum), "partition-id": cid})
        return Message(RecordDict({"scores": to_record(scores), "metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:  # only nodes whose registration times tie
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}), reply_to=msg)

    return app


# ------------------------------------------------------------------ server side
def client_nodes(grid: Any, population: int, poll_s: float = 0.05) -> dict[int, int]:
    """Client -> node id from Flower's node registry: virtual node i is the i-th registered.

    No message goes out unless two nodes registered in the same microsecond (registering
    takes about 10 us a node); only those nodes are then asked for their partition-id.
    """
    from flwr.app import Message, RecordDict

    while len(nodes := list(grid.get_nodes())) < population:  # virtual nodes register as the ServerApp starts
        time.sleep(poll_s)
    key = {n.node_id: (datetime.fromisoformat(n.registered_at), n.last_activated_at or "") for n in nodes}
    order = sorted(key, key=key.get)
    node_of = dict(enumerate(order))
    times = Counter(key.values())
    tied = [n for n in order if times[key[n]] > 1]
    if tied:
        ask = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in tied]
        slots = sorted(c for c, n in node_of.items() if n in set(tied))
        answers = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id for r in grid.send_and_receive(ask)}
        if sorted(answers) != slots:
            raise C2ALError(f"Flower nodes {tied} registered at the same time and did not all say which client they hold")
        node_of.update(answers)
    return node_of


class WindowedGrid:
    """Flower's Grid whose `send_and_receive` keeps at most `window` messages in flight.

    Flower's in-memory link state looks through every stored message for every node
    on each delivery sweep (ten a second), so a sweep costs nodes x messages in flight:
    sending a whole evaluation at once made each sweep scan 943 x 943 messages. Pushing
    the next message as a reply comes back keeps the actors busy at a fraction of that.
    Everything else is the wrapped Grid's.
    """

    def __init__(self, grid: Any, window: int, poll_s: float = 0.02, on_first_reply: Callable[[], None] | None = None) -> None:
        self.grid, self.window, self.poll_s, self.on_first_reply = grid, window, poll_s, on_first_reply
        self.first_reply_at: float | None = None  # when the first ClientApp answered: Ray and an actor are up
        self.on_replies: Callable[[list[Any]], None] | None = None  # each batch of replies (a progress bar)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        queue, pending, replies = list(messages)[::-1], set(), []
        end = None if timeout is None else time.time() + timeout
        while (queue or pending) and (end is None or time.time() < end):
            while queue and len(pending) < self.window:
                pending.update(self.grid.push_messages([queue.pop()]))
            got = list(self.grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            replies.extend(got)
            if got and self.first_reply_at is None:
                self.first_reply_at = time.perf_counter()
                if self.on_first_reply is not None:
                    self.on_first_reply()
            if got and self.on_replies is not None:
                self.on_replies(got)
            if not got:
                time.sleep(self.poll_s)
        return replies


def evaluate_clients(grid: WindowedGrid, strategy: Any, server_round: int, arrays: Any, population: int, *, show: bool, tag: str) -> None:
    """Every client scores its own rows: one Flower evaluate message per client, `grid.window` in flight."""
    from flwr.app import ConfigRecord
    from tqdm.auto import tqdm

    with tqdm(total=population, desc=f"[{tag}] evaluating on the clients", disable=None if show else True, leave=False) as bar:
        grid.on_replies = lambda got: bar.update(len(got))
        config = ConfigRecord({"cids": list(range(population))})
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, config, grid)))
        grid.on_replies = None


@dataclass
class FlowerRounds:
    """The ServerApp's body: the in-process engine's rounds loop and early-stopping rule (`rounds.drive_rounds`),
    each round the c2al strategy's hooks behind `FlowerStrategy` over Flower's Grid.

    An evaluation asks every client to score its own validation and test rows (`evaluate_clients`);
    `stop.evaluate` then reads the gathered validation scores, as the in-process engine reads its
    own, so both engines stop after the same round. Without `stop.evaluate` the clients score
    the final model once.

    Args:
        adapter: the c2al strategy behind Flower's Strategy interface.
        trained: receives each round's parameters and history; holds the kept state at the end.
        clients: every client, indexed by cid.
        tables: the splits the clients score ("valid", "test").
        rounds: most rounds.
        stop: the early-stopping rule.
        clock: phase times, filled in (`timing_line` reads them).
        actors: Ray actors (the windows of messages in flight scale with them).
    """

    adapter: Any
    trained: FedTrained
    clients: list[ClientData]
    tables: dict[str, Table]
    rounds: int
    stop: StopRule
    clock: dict[str, float]
    actors: int = 1
    show: bool = True
    tag: str = "federated"
    grid: WindowedGrid | None = None
    arrays: Any = None  # the global model as Flower's ArrayRecord

    def app(self) -> Any:
        """The ServerApp running `main`."""
        from flwr.serverapp import ServerApp

        app = ServerApp()
        app.main()(self.main)
        return app

    def main(self, grid: Any, context: Any) -> None:
        """Map nodes, drive the rounds, and let the clients score the kept model if no evaluation did."""
        from c2al.federated.flower_strategy import to_record

        self.adapter.node_of = client_nodes(grid, len(self.clients))
        self.grid = WindowedGrid(grid, WINDOW_PER_ACTOR["train"] * self.actors, on_first_reply=self._up)
        self.arrays, self.clock["round_eval_s"] = to_record(self.adapter.params), 0.0
        stop = replace(self.stop, evaluate=self._evaluate) if self.stop.evaluate is not None else self.stop
        drive_rounds(self.trained, self._round, stop, start=0, rounds=self.rounds, tag=self.tag, show=self.show)
        self.clock["trained"] = time.perf_counter()
        self.clock["first_reply"] = self.grid.first_reply_at or self.clock["trained"]
        if not self.trained.scores:
            self._score(len(self.trained.history))
        self.clock["evaluated"] = time.perf_counter()

    def _up(self) -> None:  # the start-up is the long silent part: say when it is over
        log.info(f"[{self.tag}] flower: first ClientApp reply {time.perf_counter() - self.clock['began']:.1f} s after the engine "
                 "started (Ray and the actors are up)")

    def _round(self, rnd: int) -> dict[str, Any]:
        """Round `rnd` (from 0): configure_train -> the Grid -> aggregate_train."""
        from flwr.app import ConfigRecord

        self.grid.window = WINDOW_PER_ACTOR["train"] * self.actors
        messages = self.adapter.configure_train(rnd + 1, self.arrays, ConfigRecord(), self.grid)
        self.arrays, _ = self.adapter.aggregate_train(rnd + 1, self.grid.send_and_receive(messages))
        self.trained.params = self.adapter.params
        return self.adapter.history[-1]

    def _score(self, server_round: int) -> None:
        """Every client scores its rows with the current global model; the scores land in `trained.scores`."""
        from c2al.federated.flower_strategy import to_record

        self.grid.window = WINDOW_PER_ACTOR["evaluate"] * self.actors
        arrays = to_record(self.trained.params)
        evaluate_clients(self.grid, self.adapter, server_round, arrays, len(self.clients), show=self.show, tag=self.tag)
        self.trained.scores = gather_scores(self.adapter.scores, self.trained.params, self.trained.trainer, self.clients, self.tables)

    def _evaluate(self, trained: FedTrained) -> dict[str, Any]:
        began = time.perf_counter()
        self._score(len(trained.history))
        self.clock["round_eval_s"] += time.perf_counter() - began
        return self.stop.evaluate(trained)


def gather_scores(scores: dict[int, dict[str, np.ndarray]], params: dict[str, np.ndarray], trainer: LocalTrainer,
                  clients: list[ClientData], tables: dict[str, Table]) -> dict[str, np.ndarray]:
    """The clients' scores (client -> split -> [rows]) put back in row order; rows of users without a client
    (none hold them) are scored here with the global `params` and the seeded initial private rows."""
    trainer.load(params)
    out = {}
    for split, table in tables.items():
        probs = np.full(len(table), np.nan, dtype=np.float32)
        for c in clients:
            probs[getattr(c, split)] = scores[c.cid][split]
        rest = np.flatnonzero(np.isnan(probs))
        if len(rest):
            probs[rest] = predict(trainer.module, table, trainer.schema, SCORE_BATCH, rows=rest)
        out[split] = probs
    return out


def run_rounds_flower(trainer: LocalTrainer, strategy: RowwiseFedAvg, clients: list[ClientData], tiers: np.ndarray, *, cfg: Any,
                      splits: Any, rounds: int, seed: int, spec: TierSpec, checkpoint: Any = None, resume: bool = False,
                      config: Any = None, shape_keys: tuple = (), show: bool = True, tag: str = "federated",
                      evaluate: Any = None, eval_every: int = 5, patience: int = 0, criterion: str = "ne") -> FedTrained:
    """The Flower twin of `simulation.run_rounds` (the same arguments but workers / parallel / client_fn),
    on Flower's Ray simulation backend, stopped early by the same rule.

    `cfg.num_actors` Ray actors run the ClientApps (each imports torch once). The
    returned FedTrained carries the clients' own scores of the valid and test splits
    from the evaluation whose state it keeps; its `seconds` include the start-up (Ray,
    the actors importing torch).
    """
    _require_flower()
    from flwr.simulation import run_simulation

    from c2al.federated.flower_strategy import FlowerStrategy

    if resume:
        raise C2ALError("--resume is not supported with --engine flower; use --engine simulation")
    actors = int(getattr(cfg, "num_actors", 1))
    backend = backend_config(actors)
    params, private_init = initial_params(trainer)
    trainer.initial_private = private_init
    if not show:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    log.info(f"[{tag}] flower engine: {len(clients)} virtual nodes, {actors} Ray actor(s) running ClientApps (--num-actors)")
    trained = FedTrained(trainer=trainer, params=params, store=ClientStore(private_init))
    clock = {"began": time.perf_counter()}
    body = FlowerRounds(FlowerStrategy(strategy, params, Devices(tiers, spec), seed=seed), trained, clients,
                        {"valid": splits.valid, "test": splits.test}, rounds, StopRule(evaluate, eval_every, patience, criterion),
                        clock, actors=actors, show=show, tag=tag)
    with tempfile.TemporaryDirectory(prefix="c2al-flower-") as folder:
        payload = Payload.write(ClientSide.of(trainer, clients, splits.valid, splits.test), Path(folder))
        run_simulation(server_app=body.app(), client_app=make_client_app(payload), num_supernodes=len(clients),
                       backend_config=backend)
    clock["ended"] = time.perf_counter()
    if "evaluated" not in clock:
        raise C2ALError(f"Flower simulation stopped after {len(trained.history)} of {rounds} rounds (see Flower's log above)")
    trained.seconds = clock["trained"] - clock["began"]
    log.info(timing_line(clock, actors, len(clients), tag))
    return trained


def timing_line(clock: dict[str, float], actors: int, nodes: int, tag: str) -> str:
    """The engine's phases on one line (benchmarks/flower_engine.py reads it).

    startup: until the first ClientApp replied (Ray, actors importing torch and reading
    the data, one client's training); rounds: from there to the last aggregation, less the
    evaluations between rounds; eval: every evaluation on the clients (between rounds and after them).
    """
    between = clock.get("round_eval_s", 0.0)
    phases = {"startup_s": clock["first_reply"] - clock["began"], "rounds_s": clock["trained"] - clock["first_reply"] - between,
              "eval_s": clock["evaluated"] - clock["trained"] + between, "shutdown_s": clock["ended"] - clock["evaluated"]}
    return f"[{tag}] flower timings: " + " ".join(f"{k}={v:.2f}" for k, v in phases.items()) + f" actors={actors} nodes={nodes}"
