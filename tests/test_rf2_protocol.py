"""RF^2's protocol: click examples, its tier rules, over-selection, the pooled round, MDAC and the benchmark."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_ml1m, write_ml20m

from c2al.data.rf2 import click_history, rf2_click_splits, temporal_split
from c2al.errors import C2ALError
from c2al.federated.aggregate import mdac
from c2al.federated.client import ClientData, LocalTrainer, model_layout
from c2al.federated.heterogeneity import overselect_round, rf2_dirichlet_tiers, rf2_independent_tiers
from c2al.models.common import make_ebc
from c2al.models.dlrm import DLRM, build_dlrm
from c2al.train.task import TrainModule

pytestmark = pytest.mark.usefixtures("one_thread")
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


@pytest.fixture
def click_movielens() -> dict[str, pd.DataFrame]:
    """40 users x 30 ratings over 50 movies, about a third of them 5 stars; some timestamps tie within a user."""
    rng = np.random.default_rng(7)
    rows = []
    for u in range(1, 41):
        items = rng.choice(np.arange(1, 51), size=30, replace=False)
        times = 900_000_000 + np.sort(rng.integers(0, 20, size=30)) * 60 + 10_000 * u  # repeats: ties
        for i, t in zip(items, times):
            rows.append((u, int(i), int(rng.choice([1, 2, 3, 4, 5], p=[0.1, 0.1, 0.2, 0.25, 0.35])), int(t)))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    users = pd.DataFrame({"user": np.arange(1, 41), "age": 25, "gender": "M", "occupation": "writer", "zip": "01234"})
    items = pd.DataFrame({"item": np.arange(1, 51), "title": [f"Movie {i}" for i in range(1, 51)], "year": 1990,
                          "genres": [[GENRES[i % 5]] + ([GENRES[(i + 1) % 5]] if i % 4 == 0 else []) for i in range(1, 51)]})
    return {"ratings": ratings, "users": users, "items": items}


def _bags(col) -> list[list[int]]:
    return [col.values[a:b].tolist() for a, b in zip(col.offsets[:-1], col.offsets[1:])]


# ---------------------------------------------------------------- click examples


def test_the_history_holds_the_last_clicks_before_the_row_never_the_row_itself():
    users = np.array([1, 1, 1, 1, 1, 2, 2])
    items = np.array([10, 11, 12, 13, 14, 20, 21])
    clicks = np.array([1, 1, 0, 1, 1, 1, 0])
    assert _bags(click_history(users, items, clicks, history=2)) == [[], [10], [10, 11], [10, 11], [11, 13], [], [20]]


def test_a_history_never_crosses_into_another_user():
    h = click_history(np.array([1, 1, 2]), np.array([5, 6, 7]), np.array([1, 1, 0]), history=10)
    assert _bags(h) == [[], [5], []]


def test_a_history_length_below_one_is_refused():
    with pytest.raises(C2ALError, match="history length"):
        click_history(np.array([1]), np.array([1]), np.array([1]), history=0)


def test_the_temporal_split_puts_position_i_of_n_in_train_when_i_is_below_nine_tenths_of_n():
    part = temporal_split(np.repeat([1, 2], [20, 11]))
    assert part[:20].tolist() == [0] * 18 + [2] * 2 and part[20:].tolist() == [0] * 10 + [2]


def test_a_validation_slice_is_the_latest_train_rows_of_each_user():
    part = temporal_split(np.repeat([1], 20), valid_frac=0.25)
    assert part.tolist() == [0] * 14 + [1] * 4 + [2] * 2  # 18 train rows; positions >= 13.5 validate


def test_clicks_are_five_star_ratings_and_features_are_what_came_before(tmp_path, click_movielens):
    s = rf2_click_splits(write_ml1m(tmp_path / "ml", click_movielens))
    ratings = click_movielens["ratings"]
    assert [f.name for f in s.schema.sparse] == ["movie", "genres", "history"]
    catalog = np.unique(ratings["item"])
    for table in (s.train, s.test):
        hist = _bags(table.sparse["history"])
        for r in range(0, len(table), 37):
            user, movie, ts = table.user_ids[r], catalog[table.item_ids[r] - 1], table.timestamps[r]
            log = ratings[ratings["user"] == user].assign(click=lambda d: (d["rating"] == 5).astype(int))
            log = log.sort_values(["timestamp", "click", "item"], kind="stable").reset_index(drop=True)
            me = int(np.flatnonzero(log["item"].to_numpy() == movie)[0])
            assert table.labels[r] == float(log.loc[me, "rating"] == 5)
            earlier = log.iloc[:me]
            expected = earlier[earlier["click"] == 1]["item"].to_numpy()[-10:]
            assert [catalog[i - 1] for i in hist[r]] == expected.tolist()  # the row's own click never in its history
            assert (earlier["timestamp"] <= ts).all() and movie not in [catalog[i - 1] for i in hist[r]]


def test_train_rows_never_come_after_a_users_test_rows(tmp_path, click_movielens):
    s = rf2_click_splits(write_ml1m(tmp_path / "ml", click_movielens))
    for u in np.unique(s.test.user_ids):
        assert s.train.timestamps[s.train.user_ids == u].max() <= s.test.timestamps[s.test.user_ids == u].min()
    assert len(s.train) == 40 * 27 and len(s.test) == 40 * 3 and s.valid is None


def test_the_ml20m_layout_gives_the_same_examples(tmp_path, click_movielens):
    a = rf2_click_splits(write_ml1m(tmp_path / "ml1", click_movielens))
    b = rf2_click_splits(write_ml20m(tmp_path / "ml20", click_movielens))
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.labels, y.labels)
        for f in ("movie", "genres", "history"):
            assert _bags(x.sparse[f]) == _bags(y.sparse[f])


# ---------------------------------------------------------------- tiers and selection


def test_independent_tiers_deal_clients_by_training_rows_in_turn():
    counts = np.array([3, 10, 7, 10, 1, 7])  # ranked: 1, 3, 2, 5, 0, 4
    assert rf2_independent_tiers(counts).tolist() == [1, 0, 2, 1, 2, 0]


def test_correlated_tiers_send_an_items_new_users_to_the_smallest_tier():
    clicked = [np.array([1, 2]), np.array([1]), np.array([1]), np.array([2]), np.array([3]), np.array([], dtype=np.int64)]
    # item 1 (3 users) -> tier 0; item 2's new user 3 -> tier 1 (smallest); item 3 -> tier 2; the no-click group -> tier 1
    got = rf2_dirichlet_tiers(clicked, 0.005, seed=0, draw=lambda rng: np.array([0.0, 1.0, 0.0]))
    assert got.tolist() == [0, 0, 0, 1, 2, 1]


def test_correlated_tiers_give_the_largest_share_to_the_smallest_tier():
    clicked = [np.array([1])] * 10 + [np.array([2])] * 10 + [np.array([1, 2])]  # item 1: 11 users, item 2: 10 new
    got = rf2_dirichlet_tiers(clicked, 0.005, seed=3, draw=lambda rng: np.array([0.2, 0.5, 0.3]))
    # item 1: 11 users cut at int(5.5)=5, int(8.8)=8 -> tiers 0,1,2 get 5,3,3; item 2: sizes 5,3,3 -> tier 1 gets
    # 5 (int(5.0)), tier 2 gets 3, tier 0 gets 2
    assert np.bincount(got, minlength=3).tolist() == [7, 8, 6]
    assert set(got[:10].tolist() + [got[20]]) <= {0, 1, 2}


def test_correlated_tiers_refuse_a_non_positive_alpha():
    with pytest.raises(C2ALError, match="alpha"):
        rf2_dirichlet_tiers([np.array([1])], 0.0, seed=0)


def test_over_selection_drops_the_slowest_from_the_low_tier_first():
    tiers = np.array([0, 1, 0, 2, 0, 1])
    got = overselect_round(np.array([5, 0, 3, 2, 4, 1]), tiers, per_round=3, overselect=1.0)  # drop 3: all low ones
    assert got.tolist() == [5, 1, 3]
    got = overselect_round(np.array([5, 0, 3, 2, 4, 1]), tiers, per_round=4, overselect=0.5)  # drop 2 of the 3 low
    assert got.tolist() == [0, 5, 1, 3]


def test_a_round_plan_excludes_the_low_tier_or_trims_each_round():
    import rf2_protocol

    tiers = np.arange(30) % 3
    counts = np.arange(1, 31)
    settings = {"clients_per_round": 4, "overselect": 0.5}
    base = rf2_protocol.round_plan(tiers, counts, "base", 0, 0, settings)
    assert sorted(np.concatenate(base).tolist()) == list(range(30)) and max(len(r) for r in base) == 4
    low = rf2_protocol.round_plan(tiers, counts, "exclude_low", 0, 0, settings)
    assert (tiers[np.concatenate(low)] > 0).all() and len(np.concatenate(low)) == 20
    over = rf2_protocol.round_plan(tiers, counts, "over_selection", 0, 0, settings)
    assert all(len(r) == 4 for r in over[:-1]) and len(over) == 5  # 6 selected a round, 2 dropped
    assert rf2_protocol.round_plan(tiers, counts, "base", 1, 0, settings)[0].tolist() != base[0].tolist()


# ---------------------------------------------------------------- model and the pooled round


def _tiny(tmp_path, click_movielens):
    return rf2_click_splits(write_ml1m(tmp_path / "ml", click_movielens))


def test_the_dlrm_top_mlp_reads_the_pairwise_dots_of_its_fields(tmp_path, click_movielens):
    s = _tiny(tmp_path, click_movielens)
    torch.manual_seed(0)
    model = build_dlrm(s.schema, embedding_dim=4, top_layers=(8,))
    from c2al.data.batch import make_batch

    batch = make_batch(s.train, s.schema, np.arange(5))
    e = model.sparse_arch(batch.sparse)  # [5, 3, 4]
    dots = torch.stack([(e[:, 1] * e[:, 0]).sum(-1), (e[:, 2] * e[:, 0]).sum(-1), (e[:, 2] * e[:, 1]).sum(-1)], dim=1)
    torch.testing.assert_close(model.inter_arch(None, e), dots)
    torch.testing.assert_close(model(batch.dense, batch.sparse), model.over_arch(dots).squeeze(-1))


def test_the_dlrm_adds_a_bottom_mlp_field_for_dense_input():
    from c2al.data.schema import Schema, SparseFeature

    model = DLRM(make_ebc(Schema(sparse=(SparseFeature("a", 5), SparseFeature("b", 5))), 4), dense_in_features=3)
    assert model.inter_arch.out_features == 4 + 3  # the dense field itself + 3 pairs of 3 fields


@pytest.mark.parametrize("mu", [0.0, 0.01])
def test_a_pooled_round_equals_rf2s_weighted_mean_of_full_batch_clients(tmp_path, click_movielens, mu):
    import rf2_protocol

    s = _tiny(tmp_path, click_movielens)
    users = np.unique(s.train.user_ids)[:5]
    rows = [np.flatnonzero(s.train.user_ids == u) for u in users]
    torch.manual_seed(1)
    pooled = TrainModule(build_dlrm(s.schema, embedding_dim=4, top_layers=(8,), init_std=0.1))
    clients = TrainModule(build_dlrm(s.schema, embedding_dim=4, top_layers=(8,), init_std=0.1))
    clients.load_state_dict(pooled.state_dict())
    settings = {"client_lr": 1.0, "l2_embedding": 0.0}
    grads, _ = rf2_protocol.round_gradient(pooled, s, np.concatenate(rows), settings, mu)

    layout = model_layout(clients.model, [])
    trainer = LocalTrainer(clients, layout, s.schema, s.train, dense_optimizer="sgd", lr=1.0, table_optimizer="sgd",
                           table_lr=1.0, batch_size=max(len(r) for r in rows))
    state = {n: p.detach().numpy().copy() for n, p in trainer.params.items()}
    mean = {n: np.zeros_like(v, dtype=np.float64) for n, v in state.items()}
    total = 0.0
    for cid, r in enumerate(rows):  # one full-batch step each, from the global weights
        res = trainer.fit(ClientData(cid=cid, user=int(users[cid]), train=r), state, {},
                          {"seed": 0, "epochs": 1, "max_steps": 0, "proximal_mu": mu})
        total += res.num_examples
        for n, d in res.dense.items():
            mean[n] += res.num_examples * d
        for n, (ids, d) in res.rows.items():
            mean[n][ids] += res.num_examples * d  # RF^2's fedavg: every parameter over all the round's samples
    names = [n for n, p in pooled.model.named_parameters() if p.requires_grad]
    for n, g in zip(names, grads):
        np.testing.assert_allclose(-mean[n] / total, g.numpy(), rtol=1e-4, atol=1e-7, err_msg=n)


# ---------------------------------------------------------------- MDAC and the summary


def test_mdac_is_the_largest_gap_between_tiers_relative_changes():
    assert mdac([0.70, 0.76, 0.80], [0.80, 0.80, 0.80]) == pytest.approx(0.125)  # changes -0.125, -0.05, 0


def _run(mode: str, arm: str, seed: int, tier_auc: list[float]) -> dict:
    tiers = {t: {"auc": a, "ne": 1.0 - a, "rows": 10} for t, a in zip(("low", "mid", "high"), tier_auc)}
    return {"mode": mode, "arm": arm, "seed": seed, "test": {"auc": float(np.mean(tier_auc)), "ne": 0.5, "tiers": tiers}}


def test_the_summary_pairs_each_optimization_with_its_base_and_takes_the_ratio_per_seed():
    import rf2_protocol

    runs = [_run("independent", "base", 0, [0.8, 0.8, 0.8]), _run("independent", "exclude_low", 0, [0.78, 0.8, 0.8]),
            _run("correlated", "base", 0, [0.8, 0.8, 0.8]), _run("correlated", "exclude_low", 0, [0.72, 0.8, 0.8]),
            _run("independent", "base", 1, [0.5, 0.5, 0.5]), _run("independent", "exclude_low", 1, [0.5, 0.49, 0.5]),
            _run("correlated", "base", 1, [0.5, 0.5, 0.5]), _run("correlated", "exclude_low", 1, [0.5, 0.5, 0.46])]
    summary = rf2_protocol.summarize(runs, [0, 1])["exclude_low"]
    assert summary["independent"]["mdac"]["values"] == pytest.approx([0.025, 0.02])
    assert summary["correlated"]["mdac"]["values"] == pytest.approx([0.1, 0.08])
    assert summary["ratio"]["mean"] == pytest.approx(4.0) and summary["ratio"]["values"] == pytest.approx([4.0, 4.0])
    assert summary["independent"]["delta_auc"]["low"]["values"] == pytest.approx([-0.025, 0.0])


# ---------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_the_quick_benchmark_writes_every_run_and_the_summary(tmp_path: Path, click_movielens):
    import rf2_protocol

    data = write_ml1m(tmp_path / "ml", click_movielens)
    out = tmp_path / "rf2.json"
    argv = ["--quick", "--data", f"movielens:{data}", "--seeds", "0,1", "--out", str(out)]
    result = rf2_protocol.main(argv)
    summary = json.loads(out.read_text())["summary"]
    for opt in ("exclude_low", "over_selection", "fedprox"):
        for mode in ("independent", "correlated"):
            cell = summary[opt][mode]["mdac"]
            assert cell["n"] == 2 and cell["mean"] >= 0 and len(cell["ci95"]) == 2
        assert set(summary[opt]["ratio"]) >= {"mean", "ci95"}
    assert summary["fedprox"]["independent"]["mdac"]["mean"] == pytest.approx(0.0, abs=1e-6)  # one local step: FedProx = FedAvg
    assert summary["exclude_low"]["independent"]["mdac"]["mean"] > 0
    assert len(list((tmp_path / "rf2").glob("*.json"))) == 16 and len(result["runs"]) == 16
    again = rf2_protocol.main(argv)  # every run file is reused: the same numbers
    assert again["summary"]["exclude_low"] == result["summary"]["exclude_low"]


def test_federated_py_runs_the_protocol_scripts_as_parts(monkeypatch):
    import federated
    import ning_protocol
    import rf2_protocol

    seen = []
    monkeypatch.setattr(rf2_protocol, "main", lambda argv: seen.append(("rf2", argv)))
    monkeypatch.setattr(ning_protocol, "main", lambda argv: seen.append(("ning", argv)))
    assert federated.main(["--parts", "rf2-protocol,ning-protocol", "--seeds", "3,"]) == {}
    assert seen == [("rf2", ["--seeds", "3,"]), ("ning", ["--seeds", "3,"])]


# ---------------------------------------------------------------- train.py --federated


def test_assign_tiers_offers_rf2s_rules_by_name():
    from c2al.federated.heterogeneity import TierSpec, assign_tiers

    counts = np.array([3, 10, 7, 10, 1, 7])
    assert assign_tiers(6, "rf2-independent", TierSpec(), 0, counts=counts).tolist() == rf2_independent_tiers(counts).tolist()
    clicked = [np.array([1, 2]), np.array([1]), np.array([3]), np.array([], dtype=np.int64)]
    assert assign_tiers(4, "rf2-dirichlet", TierSpec(), 5, clicked=clicked).tolist() == rf2_dirichlet_tiers(clicked, 0.005, 5).tolist()
    with pytest.raises(C2ALError, match="clicked-item list per client"):
        assign_tiers(4, "rf2-dirichlet", TierSpec(), 5)


def test_excluded_low_end_devices_are_never_online():
    from c2al.federated.heterogeneity import Devices, TierSpec

    tiers = np.arange(30) % 3
    spec = TierSpec(availability=(1.0, 1.0, 1.0), exclude_low=True)
    online = Devices(tiers, spec).online(np.random.default_rng(0)).online
    assert sorted(online.tolist()) == np.flatnonzero(tiers > 0).tolist()
    assert len(Devices(tiers, TierSpec(availability=(1.0, 1.0, 1.0))).online(np.random.default_rng(0)).online) == 30


@pytest.mark.slow
def test_train_py_federated_takes_rf2s_tiers_and_exclude_low(tmp_path):
    import train

    argv = ["--federated", "--rounds", "2", "--tiers", "rf2-dirichlet", "--exclude-low", "--out", str(tmp_path),
            "--data", "synthetic:n_rows=4000,n_users=120,n_items=300", "--clients-per-round", "20", "--quiet"]
    assert train.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    fed = report["federated"]
    assert fed["tiers"]["mode"] == "rf2-dirichlet" and sum(fed["tiers"]["clients"]) == 120
    assert report["config"]["exclude_low"] is True


def test_the_fedadagrad_server_steps_as_torch_adagrad_on_the_pseudo_gradient():
    from c2al.federated.strategy import make_strategy

    strategy = make_strategy("fedadagrad", None, 1)
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    torch_opt = torch.optim.Adagrad([w], lr=0.1)
    params = {"w": w.detach().numpy().copy()}
    for delta in ([0.2, -0.1, 0.0], [0.4, 0.3, 0.0], [-0.1, 0.0, 0.5]):
        w.grad = -torch.tensor(delta, dtype=torch.float64)
        torch_opt.step()
        params = strategy.server_step(0, params, {"w": (None, np.array(delta))})
    np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-7)


def test_train_py_accepts_the_fedadagrad_server():
    from c2al.config import parse_args

    cfg = parse_args(["--federated", "--server-optimizer", "fedadagrad", "--tiers", "rf2-independent", "--exclude-low"])
    assert (cfg.server_optimizer, cfg.tiers, cfg.exclude_low) == ("fedadagrad", "rf2-independent", True)
