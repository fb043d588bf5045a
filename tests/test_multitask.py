"""c2al.towers: MMoE shapes and gates, the served model without cohort towers, shared-bottom, and train.py --aux-towers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from plugin_support import K, build, make_batch
from torch import nn

from c2al.errors import C2ALError
from c2al.eval.activity import attention_activity
from c2al.plugin import C2ALWrapper
from c2al.towers import MixedArch, MMoE, attach_towers, detach_towers
from c2al.train.task import TrainModule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "synthetic:n_rows=24000,n_users=1500,n_items=200,minority_shares=0.05/0.04"  # as test_c2al_run.py: both cohorts beat the null


def test_mmoe_gives_one_mixture_per_task_with_softmax_gates():
    torch.manual_seed(0)
    mmoe = MMoE(in_features=5, n_tasks=3, n_experts=4, hidden=7)
    rep = torch.randn(6, 5)  # [B, H]
    gates = mmoe.gate_weights(rep)  # [B, T, M]
    assert mmoe(rep).shape == (6, 3, 5) and gates.shape == (6, 3, 4)
    assert torch.allclose(gates.sum(-1), torch.ones(6, 3)) and bool((gates > 0).all())
    experts = torch.stack([e(rep) for e in mmoe.experts], dim=1)  # [B, M, H]
    assert torch.allclose(mmoe(rep)[:, 2], (gates[:, 2].unsqueeze(-1) * experts).sum(1), atol=1e-6)


@pytest.mark.parametrize("name", ["afm", "attention_fm"])
def test_mmoe_towers_give_k_cohort_logits_and_a_main_logit_per_row(name):
    wrapper = attach_towers(build(name), "inter_arch", K, head=None, kind="mmoe", n_experts=3)
    batch = make_batch()
    out = wrapper(batch.dense, batch.sparse)
    assert out.logits.shape == (batch.labels.shape[0],) and out.aux_logits.shape == (batch.labels.shape[0], K)
    assert len(wrapper.model.inter_arch.mmoe.gates) == K + 1


@pytest.mark.parametrize("name", ["afm", "attention_fm"])
def test_the_served_mmoe_model_drops_the_cohort_towers_and_gates_and_equals_the_main_output(name):
    wrapper = attach_towers(build(name), "inter_arch", K, aux_weight=0.5, kind="mmoe", n_experts=3).eval()
    batch = make_batch(seed=1)
    with torch.no_grad():
        main = wrapper(batch.dense, batch.sparse).logits
    tower_params = {id(p) for p in wrapper.heads.parameters()}
    served = detach_towers(wrapper)
    assert not tower_params & {id(p) for p in served.parameters()}
    assert len(served.inter_arch.mmoe.gates) == 1  # the main gate only
    assert not any(k.startswith("heads") or "tower" in k for k in served.state_dict())
    with torch.no_grad():
        assert torch.allclose(served(batch.dense, batch.sparse), main, atol=1e-6)


def test_the_served_mmoe_model_still_reports_its_attention():
    served = detach_towers(attach_towers(build("afm"), "inter_arch", K, kind="mmoe"))
    assert isinstance(served.inter_arch, MixedArch)
    batch = make_batch()
    assert set(attention_activity(served, batch.dense, batch.sparse)) >= {"near_zero_share", "attention_entropy"}


def test_mmoe_towers_train_every_part_through_the_c2al_loss():
    torch.manual_seed(0)
    module = TrainModule(attach_towers(build("afm"), "inter_arch", K, aux_weight=1.0, kind="mmoe"))
    loss, (_, _, parts) = module(make_batch())
    loss.backward()
    mmoe = module.model.model.inter_arch.mmoe
    assert {"main", "aux", "aux_0", "aux_1"} <= set(parts)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for g in mmoe.gates for p in g.parameters())
    assert all(p.grad is not None for p in module.model.heads.parameters())


def test_shared_bottom_towers_are_c2al_heads_and_serve_the_untouched_model():
    model = build("afm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapper = attach_towers(model, "inter_arch", K, kind="shared-bottom")
    assert isinstance(wrapper, C2ALWrapper) and wrapper.model is model
    served = detach_towers(wrapper)
    assert served is model and served.state_dict().keys() == before.keys()


def test_attach_towers_refuses_an_unknown_kind_and_a_second_mmoe_naming_them():
    model = build("afm")
    with pytest.raises(C2ALError, match="--aux-towers 'ple'"):
        attach_towers(model, "inter_arch", K, kind="ple")
    attach_towers(model, "inter_arch", K, kind="mmoe")
    with pytest.raises(C2ALError, match="already carries MMoE towers"):
        attach_towers(model, "inter_arch", K, kind="mmoe")


def test_attach_towers_without_a_width_asks_for_in_features():
    net = nn.Sequential(nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(C2ALError, match="pass in_features="):
        attach_towers(net, "0", 1, kind="mmoe")


@pytest.mark.slow  # a whole train.py job
def test_train_py_aux_towers_mmoe_runs_and_ships_experts_with_the_main_gate_only(tmp_path):
    assert train.main(["--data", TINY, "--epochs", "1", "--batch-size", "256", "--quiet", "--aux-cohorts", "--aux-towers", "mmoe",
                       "--mmoe-experts", "3", "--no-gate", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert math.isfinite(report["overall"]["ne_c2al"]) and len(report["cohorts"]) == 2
    served = torch.load(tmp_path / "c2al.pt", weights_only=True)["model"]
    assert {k for k in served if k.startswith("inter_arch.mmoe.gates")} == {"inter_arch.mmoe.gates.0.weight", "inter_arch.mmoe.gates.0.bias"}
    assert sum(k.startswith("inter_arch.mmoe.experts") for k in served) == 3 * 4  # 3 experts, 2 linears of weight + bias each
    assert not any(k.startswith("heads") for k in served)
