"""c2al.robust: Group DRO's weights and CVaR on hand-made numbers, the weights as train-module state, the train.py options."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from c2al import config, robust, towers
from c2al.config import Config
from c2al.errors import C2ALError
from c2al.train.task import TrainModule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "synthetic:n_rows=24000,n_users=1500,n_items=200,minority_shares=0.05/0.04"  # as test_c2al_run.py: both cohorts beat the null
FAST = ["--data", TINY, "--epochs", "1", "--batch-size", "256", "--quiet"]


def _bce(logit: float, label: float) -> float:
    return math.log1p(math.exp(-logit)) if label == 1 else math.log1p(math.exp(logit))


# --- Group DRO ----------------------------------------------------------------------------------


def test_group_dro_step_equals_the_hand_computed_exponentiated_gradient_update():
    # adjusted losses: loss_g + C / sqrt(n_g) = 1 + 2/2, 0.5 + 2/4, 0.2 + 2/10 = 2, 1, 0.4
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    new = robust.group_dro_step(q, torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64), torch.tensor([True, True, True]),
                                torch.tensor([4.0, 16.0, 100.0]), eta=0.5, adjust=2.0)
    raw = [0.2 * math.exp(0.5 * 2.0), 0.3 * math.exp(0.5 * 1.0), 0.5 * math.exp(0.5 * 0.4)]
    assert new.tolist() == pytest.approx([r / sum(raw) for r in raw], abs=1e-12)


def test_a_group_absent_from_the_batch_keeps_its_weight_before_renormalisation():
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    new = robust.group_dro_step(q, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([True, False, True]),
                                torch.tensor([1.0, 1.0, 1.0]), eta=1.0)
    raw = [0.25 * math.e ** 2, 0.25, 0.5 * math.e]
    assert new.tolist() == pytest.approx([r / sum(raw) for r in raw], abs=1e-12)


def test_group_losses_are_weighted_means_and_padding_rows_do_not_count():
    losses, mass = robust.group_losses(torch.tensor([1.0, 3.0, 5.0, 100.0]), torch.tensor([0, 0, 2, 1]), 3,
                                       torch.tensor([1.0, 3.0, 1.0, 0.0]))
    assert losses.tolist() == pytest.approx([(1 + 9) / 4, 0.0, 5.0])
    assert mass.tolist() == [4.0, 0.0, 1.0]


def test_group_dro_loss_is_the_updated_q_weighting_of_the_group_bces_with_the_rest_as_last_group():
    logits, labels = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    dro = robust.GroupDRO([10, 40, 50], eta=0.2, adjust=1.0)
    loss = dro(logits, labels, torch.tensor([0, 0, -1, 1]))
    group = [(_bce(2.0, 1) + _bce(-1.0, 1)) / 2, _bce(0.0, 1), _bce(0.5, 0)]  # cohort 0, cohort 1, the rest
    raw = [math.exp(0.2 * (g + 1.0 / math.sqrt(n))) / 3 for g, n in zip(group, (10, 40, 50))]
    q = [r / sum(raw) for r in raw]
    assert dro.q.tolist() == pytest.approx(q, abs=1e-6)
    assert float(loss) == pytest.approx(sum(a * b for a, b in zip(q, group)), abs=1e-6)


def test_group_dro_leaves_its_weights_alone_in_evaluation():
    dro = robust.GroupDRO([5, 5, 5], eta=1.0).eval()
    dro(torch.tensor([3.0, -3.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 1]))
    assert dro.q.tolist() == pytest.approx([1 / 3] * 3)


def test_group_dro_weights_are_train_module_state_that_a_checkpoint_restores():
    def module() -> TrainModule:
        return TrainModule(robust.robust_model(nn.Linear(2, 1), robust.GroupDRO([3, 4, 5], eta=0.5)))

    trained = module()
    trained.model.objective(torch.tensor([4.0, -4.0]), torch.tensor([0.0, 1.0]), torch.tensor([0, -1]))  # one training step of q
    state = trained.state_dict()
    assert "model.objective.q" in state and "model.objective.counts" not in state  # counts: a data statistic, not state
    fresh = module()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model.objective.q, trained.model.objective.q)
    assert not torch.allclose(fresh.model.objective.q, torch.full((3,), 1 / 3))


def test_group_dro_refuses_fewer_than_two_groups_with_rows_naming_the_flag():
    with pytest.raises(C2ALError, match="--aux-cohorts"):
        robust.GroupDRO([0, 0, 90])


# --- CVaR ---------------------------------------------------------------------------------------


def test_cvar_of_a_hand_made_batch_is_the_mean_of_its_worst_alpha_fraction():
    losses = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert float(robust.cvar(losses, 0.5)) == pytest.approx((4 + 3) / 2)
    assert float(robust.cvar(losses, 0.3)) == pytest.approx((4 + 0.2 * 3) / 1.2)  # m = 1.2 rows: the next one counts 0.2
    assert float(robust.cvar(losses, 1.0)) == pytest.approx(2.5)  # alpha = 1: the mean


def test_cvar_skips_padding_rows_and_its_gradient_goes_to_the_counted_losses_by_share():
    losses = torch.tensor([1.0, 4.0, 2.0, 9.0, 3.0], requires_grad=True)
    value = robust.cvar(losses, 0.3, weights=torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))  # the 9 is padding
    value.backward()
    assert float(value.detach()) == pytest.approx((4 + 0.2 * 3) / 1.2)
    assert losses.grad.tolist() == pytest.approx([0.0, 1 / 1.2, 0.0, 0.0, 0.2 / 1.2])


def test_cvar_objective_on_bce_matches_the_hand_computed_worst_half():
    logits, labels = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    per_row = sorted((_bce(x, y) for x, y in zip(logits.tolist(), labels.tolist())), reverse=True)
    assert float(robust.CVaR(0.5)(logits, labels, torch.full((4,), -1))) == pytest.approx((per_row[0] + per_row[1]) / 2, abs=1e-6)


def test_cvar_refuses_alpha_outside_the_unit_interval_naming_the_flag():
    with pytest.raises(C2ALError, match="--cvar-alpha"):
        robust.CVaR(0.0)


# --- flags ---------------------------------------------------------------------------------------


def test_config_choices_are_the_library_names():
    assert config.OBJECTIVES == robust.OBJECTIVES and config.TOWERS == towers.TOWERS


@pytest.mark.parametrize("flags, message", [
    (dict(objective="group-dro"), "--objective group-dro needs groups"),
    (dict(objective="cvar", federated=True), "not with --federated"),
    (dict(objective="cvar", aux_cohorts=2, aux_towers="mmoe"), "without heads"),
    (dict(cvar_alpha=1.5), "--cvar-alpha must be in (0, 1]"),
    (dict(dro_eta=0.0), "--dro-eta must be > 0"),
])
def test_config_refuses_objective_combinations_naming_the_flag(flags, message):
    with pytest.raises(C2ALError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        Config(**flags).check()


# --- train.py ------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole train.py job
def test_train_py_cvar_baseline_runs_and_trains_the_robust_loss(tmp_path):
    assert train.main([*FAST, "--objective", "cvar", "--cvar-alpha", "0.3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["objective"] == "cvar" and math.isfinite(report["overall"]["ne"])
    assert "robust" in report["history"][0]  # the logged robust term beside the plain BCE
    assert report["history"][0]["robust"] > report["history"][0]["main"]  # the worst 30% lose more than the mean


@pytest.mark.slow  # a whole train.py job
def test_train_py_group_dro_ships_the_plain_model_and_checkpoints_the_group_weights(tmp_path):
    assert train.main([*FAST, "--aux-cohorts", "--objective", "group-dro", "--dro-eta", "0.1",
                       "--no-gate", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["cohorts"]) == 2 and math.isfinite(report["overall"]["ne_c2al"])
    served = torch.load(tmp_path / "c2al.pt", weights_only=True)["model"]
    base = {k.removeprefix("model."): v.shape for k, v in torch.load(tmp_path / "baseline.pt", weights_only=True)["model"].items()}
    assert {k: v.shape for k, v in served.items()} == base  # heads-free: the served model is the plain model
    q = torch.load(tmp_path / "c2al_train.pt", weights_only=True)["model"]["model.objective.q"]
    assert q.shape == (3,) and float(q.sum()) == pytest.approx(1.0) and not torch.allclose(q, torch.full((3,), 1 / 3))
