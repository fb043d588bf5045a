"""FedRecGEL's protocol: leave-last-out implicit splits, sampled-candidate HR/NDCG, NCF with private user rows, the SAM step, sharpness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_ml1m
from torch.func import functional_call, grad

from c2al.data.implicit import leave_last_out, sample_candidates, sample_training_pairs
from c2al.data.sequences import Timelines
from c2al.errors import C2ALError
from c2al.eval.sampled import candidate_ranks, hr_ndcg, sharpness
from c2al.federated.private import PrivateRoundSettings, PrivateUsers, SharedServer, client_update, train_rounds
from c2al.models.ncf import NCF

pytestmark = pytest.mark.usefixtures("one_thread")


def _timelines() -> Timelines:
    # user 10: items 4 2 6 1 3 (5 ratings, kept); user 20: 5 7 (2, dropped); user 30: 2 4 6 8 9 1 (6, kept)
    return Timelines(users=np.array([10, 20, 30]), items=np.array([4, 2, 6, 1, 3, 5, 7, 2, 4, 6, 8, 9, 1]),
                     lengths=np.array([5, 2, 6]), num_items=9)


# ---------------------------------------------------------------- data


def test_users_under_the_threshold_are_dropped_and_their_only_items_with_them():
    s = leave_last_out(_timelines(), min_interactions=5)
    assert s.users.tolist() == [10, 30]
    assert s.num_items == 7  # items 5 and 7 were rated only by user 20: renumbered away (1 2 3 4 6 8 9 -> 0..6)


def test_the_latest_rating_is_the_test_item_and_the_one_before_it_validation():
    s = leave_last_out(_timelines(), min_interactions=5)
    # catalog 1 2 3 4 6 8 9 -> ids 0 1 2 3 4 5 6
    assert s.train_items(0).tolist() == [3, 1, 4] and s.valid[0] == 0 and s.test[0] == 2  # 4 2 6 | 1 | 3
    assert s.train_items(1).tolist() == [1, 3, 4, 5] and s.valid[1] == 6 and s.test[1] == 0  # 2 4 6 8 | 9 | 1
    one = leave_last_out(_timelines(), min_interactions=5, holdout=1)
    assert one.valid is None and one.train_items(0).tolist() == [3, 1, 4, 0] and one.test[0] == 2


def test_a_threshold_that_leaves_no_training_item_is_refused():
    with pytest.raises(C2ALError, match="min_interactions"):
        leave_last_out(_timelines(), min_interactions=2, holdout=2)
    with pytest.raises(C2ALError, match="no user has >= 50"):
        leave_last_out(_timelines(), min_interactions=50)


def test_candidates_are_the_positive_then_distinct_unrated_items_the_same_for_a_seed():
    s = leave_last_out(_timelines(), min_interactions=5)
    c = sample_candidates(s, s.test, n_negatives=1, seed=3)
    assert c[:, 0].tolist() == s.test.tolist()
    assert c[0, 1] in (5, 6) and c[1, 1] == 2  # user 10 never rated 5 or 6, user 30 only 2
    for u in range(s.num_users):
        assert not set(c[u, 1:]) & set(s.rated(u).tolist())
    assert np.array_equal(c, sample_candidates(s, s.test, n_negatives=1, seed=3))
    with pytest.raises(C2ALError, match="user 30 rated all but 1 of 7 items: cannot draw 2"):
        sample_candidates(s, s.test, n_negatives=2, seed=0)


def test_training_negatives_avoid_the_clients_positives():
    items, labels = sample_training_pairs(np.array([0, 2, 5]), num_items=7, n_negatives=4, rng=np.random.default_rng(0))
    assert items.reshape(3, 5)[:, 0].tolist() == [0, 2, 5] and labels.reshape(3, 5).tolist() == [[1, 0, 0, 0, 0]] * 3
    assert not set(items.reshape(3, 5)[:, 1:].ravel()) & {0, 2, 5}


# ---------------------------------------------------------------- metrics


def test_hit_rate_and_ndcg_of_hand_made_ranks():
    got = hr_ndcg(np.array([0, 3, 9, 10, 50]), k=10)
    assert got["hr@10"] == pytest.approx(3 / 5)
    assert got["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(5) + 1 / np.log2(11)) / 5)


def test_a_negative_tied_with_the_positive_ranks_above_it():
    assert candidate_ranks(np.array([[0.5, 0.5, 0.1], [0.5, 0.6, 0.7], [0.9, 0.1, 0.2]])).tolist() == [1, 2, 0]


def test_sharpness_is_zero_for_a_flat_loss_and_positive_at_a_minimum():
    w = torch.ones(4)
    flat = sharpness([w], lambda: {"q": 0.7}, radii=[0.01, 0.1], draws=3, seed=0)
    assert flat == {"0.01": {"q": 0.0}, "0.1": {"q": 0.0}}
    bowl = sharpness([w], lambda: {"q": -float(((w - 1) ** 2).sum())}, radii=[0.01, 0.1], draws=3, seed=0)
    assert bowl["0.01"]["q"] == pytest.approx(0.01**2 * 4, rel=1e-4) and bowl["0.1"]["q"] == pytest.approx(0.1**2 * 4, rel=1e-4)
    assert w.tolist() == [1.0] * 4  # restored


# ---------------------------------------------------------------- model and rounds


def _tiny() -> tuple[NCF, PrivateUsers, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    model = NCF(6, factor=2, layers=2)
    users = PrivateUsers(3, model.factor, model.width, torch.Generator().manual_seed(1))
    return model, users, np.array([1, 3, 4, 1, 5, 0]), np.array([1, 0, 0, 1, 0, 0], np.float32)


def test_the_split_first_layer_equals_the_mlp_on_the_concatenation():
    model, users, items, _ = _tiny()
    ug, um = users.rows(0)
    x = torch.cat([um.expand(len(items), -1), model.item_mlp(torch.from_numpy(items))], dim=-1)
    assert torch.allclose(model.tower(um, model.item_mlp(torch.from_numpy(items))), model.mlp(x), atol=1e-6)


def test_the_server_holds_no_user_row_and_a_client_sends_only_item_rows_and_the_tower():
    model, users, items, labels = _tiny()
    server = SharedServer(model, lr=0.001)
    assert [n for n in model.state_dict() if "user" in n] == []
    assert {p.shape[0] for p in server.params[:2]} == {6}  # the item tables; the rest is the tower
    before = [t.detach().clone() for u in (1, 2) for t in users.rows(u)]
    up = client_update(model, users, 0, items, labels, PrivateRoundSettings(sam=True))
    assert up.rows.tolist() == [0, 1, 3, 4, 5] and up.item_gmf.shape == (5, 2) and up.item_mlp.shape == (5, model.width)
    assert [g.shape for g in up.tower] == [p.shape for p in model.tower_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, [t for u in (1, 2) for t in users.rows(u)]))  # others untouched


def test_a_sam_step_takes_each_gradient_at_its_own_perturbation():
    model, users, items, labels = _tiny()
    s = PrivateRoundSettings(sam=True, rho_shared=0.3, rho_private=0.2)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ug0, um0 = [t.detach().clone() for t in users.rows(0)]

    def loss(w: dict, ug: torch.Tensor, um: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, w, (ug.expand(6, -1), um.expand(6, -1), torch.from_numpy(items)))
        return F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels), reduction="sum") / 128

    gw = grad(loss, 0)(w0, ug0, um0)
    norm = torch.sqrt(sum((g**2).sum() for g in gw.values()))
    expect = grad(loss, 0)({n: w0[n] + 0.3 * gw[n] / norm for n in w0}, ug0, um0)  # shared grad at w + rho g / |g|
    gu = grad(loss, (1, 2))(w0, ug0, um0)
    nu = torch.sqrt(sum((g**2).sum() for g in gu))
    gu_sam = grad(loss, (1, 2))(w0, ug0 + 0.2 * gu[0] / nu, um0 + 0.2 * gu[1] / nu)  # private grad at u + rho g_u / |g_u|

    up = client_update(model, users, 0, items, labels, s)
    rows = up.rows.numpy()
    assert torch.allclose(up.item_gmf, expect["item_gmf.weight"][rows], atol=1e-6)
    assert torch.allclose(up.item_mlp, expect["item_mlp.weight"][rows], atol=1e-6)
    tower_names = [n for n in w0 if not n.startswith("item")]
    assert all(torch.allclose(g, expect[n], atol=1e-6) for g, n in zip(up.tower, tower_names))
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())  # the moves are undone
    # Adam's first step moves each coordinate by lr against the sign of its gradient
    assert torch.allclose(users.rows(0)[0].detach(), ug0 - 0.1 * gu_sam[0] / (gu_sam[0].abs() + 1e-8), atol=1e-6)


def test_the_server_averages_the_clients_gradients_before_its_adam_step():
    model, users, items, labels = _tiny()
    server = SharedServer(model, lr=0.01)
    s = PrivateRoundSettings()
    w0 = model.predict.bias.detach().clone()
    server.begin()
    ups = [client_update(model, users, u, items, labels, s) for u in (0, 1)]
    for up in ups:
        server.add(up)
    server.finish()
    mean = (ups[0].tower[-1] + ups[1].tower[-1]) / 2  # the prediction bias's gradient
    assert torch.allclose(model.predict.bias.detach(), w0 - 0.01 * mean / (mean.abs() + 1e-8), atol=1e-7)
    with pytest.raises(C2ALError, match="without a client update"):
        server.begin()
        server.finish()


def test_two_arms_of_a_seed_sample_the_same_clients():
    split = leave_last_out(_timelines(), min_interactions=5)
    seen: dict[bool, list[float]] = {}
    for sam in (False, True):
        torch.manual_seed(0)
        model = NCF(split.num_items, factor=2, layers=2)
        users = PrivateUsers(split.num_users, 2, model.width, torch.Generator().manual_seed(0))
        before = [t.detach().clone() for u in range(split.num_users) for t in users.rows(u)]
        seen[sam] = train_rounds(SharedServer(model, 0.001), users, split, PrivateRoundSettings(rounds=2, fraction=0.5, sam=sam), seed=4)
        moved = [not torch.equal(a, b) for a, b in zip(before, [t for u in range(split.num_users) for t in users.rows(u)])]
        assert any(moved)
    assert seen[False][0] == seen[True][0]  # round 1: same clients, same pairs, same starting loss


# ---------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_the_quick_benchmark_writes_every_run_and_the_summary(tmp_path: Path, fake_movielens):
    import fedrecgel_protocol

    data = write_ml1m(tmp_path / "ml", fake_movielens)
    out = tmp_path / "f.json"
    argv = ["--quick", "--data", f"movielens:{data}", "--seeds", "0,1", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    result = fedrecgel_protocol.main(argv)
    summary = json.loads(out.read_text())["summary"]
    for arm in ("plain", "sam"):
        for m in ("hr@10", "ndcg@10"):
            cell = summary[arm][m]
            assert cell["n"] == 2 and 0.0 <= cell["mean"] <= 1.0 and len(cell["ci95"]) == 2
        assert 0.0 < summary[arm]["stability_cosine"]["mean"] <= 1.0
    assert summary["summary_data"] == f"movielens:{data}" and "sam_minus_plain" in summary
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4 and len(result["runs"]) == 4
    assert summary[f"movielens:{data}"]["most_popular"]["hr@10"]["n"] == 2
    again = fedrecgel_protocol.main(argv)  # every run file is reused: the same numbers
    assert again["summary"]["sam"] == result["summary"]["sam"]
    merged = fedrecgel_protocol.main([*argv[:4], "0,1,5", *argv[5:], "--merge-only"])  # seed 5 never ran: left out, not run
    assert sorted(merged["missing_runs"]) == ["ml_plain_seed5", "ml_sam_seed5"] and len(merged["runs"]) == 4


def test_the_federated_benchmark_runs_this_protocol_as_a_part(monkeypatch):
    import federated
    import fedrecgel_protocol

    seen = []
    monkeypatch.setattr(fedrecgel_protocol, "main", lambda argv: seen.append(argv))
    assert federated.main(["--parts", "fedrecgel-protocol", "--seeds", "0,1"]) == {}
    assert seen == [["--seeds", "0,1,"]]
