"""`--engine flower`: c2al's strategies behind Flower's Strategy interface, as a ServerApp / ClientApp (flwr 1.41).

One test runs Flower's Ray simulation; the others run the same ServerApp and
ClientApp through `FakeGrid`, Flower's Grid without Ray, which logs every message.
"""
from __future__ import annotations

import json
import uuid
import warnings
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, Iterable

import numpy as np
import pytest

import train

pytest.importorskip("flwr")
from flwr.app import Context, Error, Message, RecordDict

from c2al.errors import C2ALError
from c2al.federated import flower

warnings.filterwarnings("ignore")
DATA = "synthetic:n_rows=600,n_users=6,n_items=40,n_clusters=3"
ARGS = ["--federated", "--data", DATA, "--rounds", "2", "--clients-per-round", "3", "--tiers", "none", "--quiet"]
# tiers with availability and dropout, so rounds sample different clients and some drop out
TIERED = ["--federated", "--data", DATA, "--rounds", "4", "--clients-per-round", "3", "--tiers", "independent",
          "--tier-dropout", "0.3,0.3,0.3", "--quiet"]


class FakeGrid:
    """Flower's simulation Grid without Ray: node i (random id, registered i-th) holds partition i,
    runs the ClientApp in this process with its own Context, and every message sent is kept."""

    def __init__(self, client_app: Any, population: int, same_time: tuple[int, ...] = ()) -> None:
        self.node_ids = [int(n) for n in np.random.default_rng(1).choice(2**40, population, replace=False) + 2]
        t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        at = [t0 + timedelta(microseconds=10 * (min(same_time) if i in same_time else i)) for i in range(population)]
        self.infos = [SimpleNamespace(node_id=n, registered_at=t.isoformat(), last_activated_at=None) for n, t in zip(self.node_ids, at)]
        self.contexts = {n: Context(run_id=7, node_id=n, node_config={"partition-id": i, "num-partitions": population},
                                    state=RecordDict(), run_config={}) for i, n in enumerate(self.node_ids)}
        self.app, self.sent, self.replies, self.max_in_flight = client_app, [], [], 0
        self._waiting: dict[str, Message] = {}

    def partition(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def get_node_ids(self) -> list[int]:
        return sorted(self.node_ids)  # not the registration order

    def get_nodes(self) -> list[Any]:
        return sorted(self.infos, key=lambda n: n.node_id)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid does
            self.sent.append(m)
            try:
                reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001 - Flower turns a raising ClientApp into an error reply
                reply = Message(Error(code=0, reason=str(e)), reply_to=m)
            self.replies.append(reply)
            self._waiting[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        self.max_in_flight = max(self.max_in_flight, len(self._waiting))
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self._waiting.pop(i) for i in list(ids) if i in self._waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def of_type(self, kind: str) -> list[Message]:
        return [m for m in self.sent if m.metadata.message_type == kind]


@pytest.fixture
def grids(monkeypatch: pytest.MonkeyPatch) -> list[FakeGrid]:
    """Run --engine flower on FakeGrid instead of Ray; the grids of the run land in the list."""
    from flwr.supercore.task_identity import TaskIdentity

    for k, v in (("_task_id", 1), ("_run_id", 7), ("_node_id", 1)):  # what run_simulation sets before messages exist
        monkeypatch.setattr(TaskIdentity, k, v)
    made: list[FakeGrid] = []

    def run_simulation(server_app: Any, client_app: Any, num_supernodes: int, **_: Any) -> None:
        made.append(FakeGrid(client_app, num_supernodes))
        server_app(made[-1], Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    monkeypatch.setattr("flwr.simulation.run_simulation", run_simulation)
    return made


def report(path: Any) -> dict[str, Any]:
    return json.loads((path / "report.json").read_text())


@pytest.mark.slow
def test_flower_simulation_runs_two_rounds_like_the_in_process_engine(tmp_path):
    assert train.main([*ARGS, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    fed_report = report(tmp_path / "flower")
    fed = fed_report["federated"]
    assert fed["engine"] == "flower" and len(fed["history"]["train"]) == 2
    assert all(h["sampled"] == h["aggregated"] == 3 and not h["failures"] for h in fed["history"]["train"])
    assert np.isfinite(fed_report["overall"]["ne"])
    # same seeds, same hooks, same client code: the in-process engine lands on the same model
    assert train.main([*ARGS, "--out", str(tmp_path / "sim")]) == 0
    sim = report(tmp_path / "sim")
    assert fed_report["overall"]["ne"] == pytest.approx(sim["overall"]["ne"], rel=1e-6)
    assert [h["loss"] for h in fed["history"]["train"]] == pytest.approx([h["loss"] for h in sim["federated"]["history"]["train"]], rel=1e-6)


def test_flower_strategy_rounds_equal_the_in_process_engine_with_dropouts(tmp_path, grids):
    assert train.main([*TIERED, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    assert train.main([*TIERED, "--out", str(tmp_path / "sim")]) == 0
    fed, sim = report(tmp_path / "flower"), report(tmp_path / "sim")
    hist_f, hist_s = fed["federated"]["history"]["train"], sim["federated"]["history"]["train"]
    assert any(h["failures"] for h in hist_s)  # the tiers did drop clients
    for key in ("sampled", "aggregated", "failures", "examples"):
        assert [h[key] for h in hist_f] == [h[key] for h in hist_s]
    assert [h["loss"] for h in hist_f] == pytest.approx([h["loss"] for h in hist_s], rel=1e-9)
    assert fed["overall"]["ne"] == pytest.approx(sim["overall"]["ne"], rel=1e-6)


def test_train_messages_go_only_to_the_sampled_clients(tmp_path, grids):
    from c2al.config import parse_args
    from c2al.data.sources import load_splits
    from c2al.federated.heterogeneity import Devices, round_rng
    from c2al.federated.strategy import RowwiseFedAvg
    from c2al.jobs.federated_job import client_tiers, make_clients, tier_spec

    assert train.main([*TIERED, "--engine", "flower", "--out", str(tmp_path)]) == 0
    grid = grids[0]
    cfg = parse_args([*TIERED, "--engine", "flower"])
    splits = load_splits(cfg)
    tiers, spec = client_tiers(cfg, splits, make_clients(splits)), tier_spec(cfg)
    sampler, devices = RowwiseFedAvg(None, cfg.clients_per_round), Devices(tiers, spec)  # configure_train needs no layout
    for rnd in range(cfg.rounds):
        rng = round_rng(cfg.seed, rnd)
        kept = [c for c, _ in sampler.configure_train(rnd + 1, {}, {}, devices.online(rng)) if not devices.drops_out(c, rng)]
        got = [grid.partition(m.metadata.dst_node_id) for m in grid.of_type("train") if m.metadata.group_id == str(rnd + 1)]
        assert got == kept
    assert not grid.of_type("query")  # the node -> client map cost no message
    assert len(grid.sent) == len(grid.of_type("train")) + len(grid.of_type("evaluate"))


def test_evaluation_asks_each_client_once_and_no_reply_carries_private_rows(tmp_path, grids):
    assert train.main([*TIERED, "--engine", "flower", "--out", str(tmp_path)]) == 0
    grid = grids[0]
    evaluated = sorted(grid.partition(m.metadata.dst_node_id) for m in grid.of_type("evaluate"))
    assert evaluated == list(range(len(grid.node_ids)))
    private = {k.rsplit("|", 1)[0] for c in grid.contexts.values() if "private" in c.state for k in c.state["private"].keys()}
    assert private  # the clients that trained keep their user rows
    for reply in grid.replies:
        assert set(reply.content.keys()) in ({"update", "metrics"}, {"scores", "metrics"})
        names = {k.rsplit("|", 1)[0] for r in reply.content.array_records.values() for k in r.keys()}
        assert not names & private
    assert len(report(tmp_path)["tiers"]) and np.isfinite(report(tmp_path)["overall"]["ne"])  # every test row was scored


def test_node_map_comes_from_registration_order_without_a_message():
    grid = FakeGrid(client_app=None, population=5)
    assert flower.client_nodes(grid, 5) == dict(enumerate(grid.node_ids))
    assert grid.sent == []


def test_nodes_registered_in_the_same_microsecond_are_asked_and_only_they(grids):
    grid = FakeGrid(flower.make_client_app(flower.Payload("unused")), population=5, same_time=(2, 3))
    assert flower.client_nodes(grid, 5) == dict(enumerate(grid.node_ids))
    assert sorted(grid.partition(m.metadata.dst_node_id) for m in grid.sent) == [2, 3]
    assert {m.metadata.message_type for m in grid.sent} == {"query"}


def test_a_reply_from_another_client_than_the_map_says_stops_the_run(tmp_path, grids, monkeypatch, capsys):
    shifted = lambda grid, n: {c: grid.node_ids[(c + 1) % n] for c in range(n)}  # noqa: E731
    monkeypatch.setattr(flower, "client_nodes", shifted)
    assert train.main([*ARGS, "--engine", "flower", "--out", str(tmp_path)]) == 2
    assert "holds client" in capsys.readouterr().err


def test_flowers_own_fedavg_can_drive_the_same_client_app(tmp_path, grids):
    from flwr.serverapp.strategy import FedAvg

    assert train.main([*ARGS, "--engine", "flower", "--out", str(tmp_path)]) == 0
    grid = grids[0]
    initial = grid.of_type("train")[0].content["arrays"]
    before = len(grid.sent)
    result = FedAvg(fraction_train=0.5, fraction_evaluate=0.0).start(grid, initial, num_rounds=1)
    assert len(grid.sent) - before == 3  # half of the 6 nodes
    assert set(result.arrays.keys()) == set(initial.keys())
    assert any(not np.array_equal(result.arrays[k].numpy(), initial[k].numpy()) for k in initial.keys())


def test_windowed_grid_keeps_at_most_window_messages_in_flight(grids):
    grid = FakeGrid(flower.make_client_app(flower.Payload("unused")), population=6)
    queries = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.node_ids]
    replies = flower.WindowedGrid(grid, window=2).send_and_receive(queries)
    assert grid.max_in_flight == 2
    assert sorted(int(r.content["metrics"]["partition-id"]) for r in replies) == list(range(6))


def test_num_actors_sets_rays_cpus_and_must_be_positive():
    assert flower.backend_config(3)["init_args"]["num_cpus"] == 3
    assert flower.backend_config(3)["client_resources"]["num_cpus"] == 1
    with pytest.raises(C2ALError, match="--num-actors"):
        flower.backend_config(0)


def test_federated_c2al_on_the_flower_engine_equals_the_in_process_engine(tmp_path, grids):
    args = [*ARGS, "--aux-cohorts", "2", "--n-clusters", "4"]
    assert train.main([*args, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    assert train.main([*args, "--out", str(tmp_path / "sim")]) == 0
    fed, sim = report(tmp_path / "flower"), report(tmp_path / "sim")
    assert len(grids) == 2  # the baseline and the C2AL phase
    for phase in ("baseline", "c2al"):
        assert [h["loss"] for h in fed["history"][phase]] == pytest.approx([h["loss"] for h in sim["history"][phase]], rel=1e-9)
    for key in ("ne_base", "ne_c2al"):  # the clients' own scores, the stripped model's in-process
        assert fed["overall"][key] == pytest.approx(sim["overall"][key], rel=1e-6)


# FedAvg with large local steps: validation NE turns up after round 4 of 10, so patience 1 stops the run after round 5
STOPPING = ["--federated", "--data", DATA, "--rounds", "10", "--clients-per-round", "3", "--tiers", "none", "--quiet",
            "--eval-every", "1", "--patience", "1", "--server-optimizer", "fedavg", "--lr", "0.05", "--table-lr", "0.5"]


def test_flower_engine_stops_early_by_the_simulations_rule(tmp_path, grids):
    assert train.main([*STOPPING, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    assert train.main([*STOPPING, "--out", str(tmp_path / "sim")]) == 0
    fed, sim = report(tmp_path / "flower"), report(tmp_path / "sim")
    hist_f, hist_s = fed["federated"]["history"]["train"], sim["federated"]["history"]["train"]
    assert 1 < len(hist_s) < 10 and len(hist_f) == len(hist_s)  # patience ran out before --rounds
    assert [h["valid_ne"] for h in hist_f] == pytest.approx([h["valid_ne"] for h in hist_s], rel=1e-6)
    assert fed["best"]["rounds"] == sim["best"]["rounds"] < len(hist_s)  # the best round's state is the one kept
    assert fed["overall"]["ne"] == pytest.approx(sim["overall"]["ne"], rel=1e-6)
    grid = grids[0]
    assert len({m.metadata.group_id for m in grid.of_type("train")}) == len(hist_f)  # no train message after the stop
    assert len(grid.of_type("evaluate")) == len(hist_f) * len(grid.node_ids)  # each evaluation asks every client once


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--parallel-clients", "8"]])
def test_simulation_only_flags_are_refused_by_the_flower_engine(flag, tmp_path, capsys):
    assert train.main([*ARGS, "--engine", "flower", *flag, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag[0]} is an --engine simulation setting") and "\n" not in err
    assert not (tmp_path / "report.json").exists()


def test_early_stopping_on_recall_is_refused_by_the_flower_engine(tmp_path, capsys):
    args = [*ARGS, "--engine", "flower", "--model", "two-tower", "--two-tower-loss", "softmax", "--out", str(tmp_path)]
    assert train.main(args) == 2  # recall@10 needs every client's private rows on the server
    err = capsys.readouterr().err.strip()
    assert "--patience on validation recall@10 needs --engine simulation" in err and "\n" not in err
