"""c2al.attach(..., aux_labels=): the paper's conflicting labels (default) vs the own-cohort multi-task control."""
from __future__ import annotations

import math

import pytest
import torch
from plugin_support import K, build, make_batch

import c2al
from c2al.errors import C2ALError
from c2al.plugin import AuxOutput

LOGITS = torch.tensor([0.0, 2.0, -1.0, 0.5], dtype=torch.float64)
AUX = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 3.0], [-2.0, 1.5]], dtype=torch.float64)
LABELS = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
COHORTS = torch.tensor([0, -1, 1, 1])  # row 1: a positive outside every cohort


def bce(x: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def main_term() -> float:
    return sum(bce(float(x), float(y)) for x, y in zip(LOGITS, LABELS)) / 4


def test_default_is_the_papers_conflicting_labels():
    default = c2al.attach(build("afm"), "inter_arch", 2, aux_weight=[0.5, 2.0])
    assert default.aux_labels == "conflicting"
    loss, _ = default.loss(AuxOutput(LOGITS, AUX), LABELS, COHORTS)
    aux0 = (bce(0.5, 1) + bce(1.0, 0) + bce(0.0, 0) + bce(-2.0, 0)) / 4  # rows 1 and 3 are positives pulled to 0
    aux1 = (bce(-0.5, 0) + bce(0.0, 0) + bce(3.0, 0) + bce(1.5, 1)) / 4
    assert loss.item() == pytest.approx(main_term() + 0.5 * aux0 + 2.0 * aux1, abs=1e-12)


def test_own_labels_train_each_head_on_its_cohort_rows_only():
    wrapper = c2al.attach(build("afm"), "inter_arch", 2, aux_weight=[0.5, 2.0], aux_labels="own")
    loss, parts = wrapper.loss(AuxOutput(LOGITS, AUX), LABELS, COHORTS)
    aux0 = bce(0.5, 1) / 4  # only row 0 is in cohort 0; the denominator stays the batch
    aux1 = (bce(3.0, 0) + bce(1.5, 1)) / 4  # rows 2 and 3
    assert parts["aux_0"].item() == pytest.approx(aux0, abs=1e-12)
    assert parts["aux_1"].item() == pytest.approx(aux1, abs=1e-12)
    assert loss.item() == pytest.approx(main_term() + 0.5 * aux0 + 2.0 * aux1, abs=1e-12)


def test_own_labels_give_no_gradient_to_a_head_from_other_rows():
    wrapper = c2al.attach(build("afm"), "inter_arch", 2, aux_labels="own")
    aux = AUX.clone().requires_grad_(True)
    loss, _ = wrapper.loss(AuxOutput(LOGITS, aux), LABELS, COHORTS)
    loss.backward()
    member = torch.stack([COHORTS == 0, COHORTS == 1], dim=1)  # [B, K]
    assert torch.all(aux.grad[~member] == 0)
    assert torch.all(aux.grad[member] != 0)


def test_own_labels_without_members_leave_only_the_main_loss():
    wrapper = c2al.attach(build("afm"), "inter_arch", 2, aux_weight=1.0, aux_labels="own")
    loss, _ = wrapper.loss(AuxOutput(LOGITS, AUX), LABELS, torch.full((4,), -1))
    assert loss.item() == pytest.approx(main_term(), abs=1e-12)


def test_unknown_aux_labels_mode_is_named():
    with pytest.raises(C2ALError, match="aux_labels must be one of"):
        c2al.attach(build("afm"), "inter_arch", 2, aux_labels="mine")


def test_softmax_two_tower_keeps_the_aux_loss():
    """In-batch softmax replaces only the main BCE; the lambda-weighted aux terms still train the heads."""
    from c2al.losses import bce_with_logits as weighted_bce
    from c2al.train.task import TrainModule

    model = build("two_tower")
    wrapper = c2al.attach(model, "inter_arch", K, aux_weight=0.5, head=lambda n: torch.nn.Linear(n, 1))
    batch = make_batch(3)
    with torch.no_grad():
        soft, _ = TrainModule(model, loss="softmax")(batch)
        total, (_, logits, parts) = TrainModule(wrapper, loss="softmax")(batch)
        out = wrapper(batch.dense, batch.sparse)
        aux = wrapper.loss(out, batch.labels, batch.cohort_ids, weights=batch.weights)[0] - weighted_bce(logits, batch.labels, batch.weights)
    assert float(aux) > 0
    assert float(total) == pytest.approx(float(soft) + float(aux), rel=1e-5)
