"""Main-anchored auxiliary gradients (c2al.balance): hand-made gradients, the wrapper's backward, and training."""
import pytest
import torch
from torch import nn

import c2al
from c2al.balance import RELAX, control, split
from c2al.config import Config, parse_args
from c2al.errors import C2ALError

G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])  # the main gradient at R, 3 samples


@pytest.mark.parametrize("mode", ["agree", "project", "magnitude+agree", "magnitude+project"])
def test_exactly_opposed_aux_gradient_leaves_the_main_one(mode):
    rep = torch.randn(3, 3, requires_grad=True)
    main, head = split(rep, 1, mode)
    (main * G).sum().backward(inputs=[rep], retain_graph=True)
    alone = rep.grad.clone()
    rep.grad = None
    ((main * G).sum() + (head * -5.0 * G).sum()).backward(inputs=[rep])  # the head's gradient is -5 g on every row
    assert torch.equal(rep.grad, alone)


def test_agree_keeps_agreeing_rows_and_drops_opposing_ones():
    a = torch.tensor([[-1.0, 4.0, 0.0], [0.0, 1.0, 5.0], [1.0, -3.0, 1.0]])  # dots with G: -1, 2, -1
    assert control(a, G, "agree").tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 5.0], [0.0, 0.0, 0.0]]


def test_project_removes_only_the_opposing_component():
    a = torch.tensor([[-1.0, 4.0, 0.0], [0.0, 1.0, 5.0], [1.0, -4.0, 1.0]])  # dots with G: -1, 2, -2
    out = control(a, G, "project")
    assert out[0].tolist() == [0.0, 4.0, 0.0]  # a - (-1 / 1) * g
    assert out[1].tolist() == a[1].tolist()  # agreeing row untouched
    torch.testing.assert_close(out[2], a[2] + 2 / 3 * G[2])
    assert torch.all((out * G).sum(1) >= -1e-6)  # no row opposes the main gradient any more


def test_magnitude_moves_the_norm_ratio_toward_one_by_the_relax_factor():
    a = 10.0 * torch.randn(3, 3)
    for relax in (RELAX, 1.0, 0.0):
        ratio = control(a, G, "magnitude", relax).norm() / G.norm()
        expected = relax + (1 - relax) * a.norm() / G.norm()
        assert float(ratio) == pytest.approx(float(expected), rel=1e-5)
    assert float(control(a, G, "magnitude", 1.0).norm()) == pytest.approx(float(G.norm()), rel=1e-5)


def test_unknown_mode_is_named():
    with pytest.raises(C2ALError, match="sideways"):
        control(G, G, "sideways")
    with pytest.raises(C2ALError, match="sideways"):
        c2al.attach(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), at="0", n_cohorts=1, balance="sideways")


@pytest.mark.parametrize("old, new", [("gate", "agree"), ("magnitude+gate", "magnitude+agree")])
def test_old_spelling_of_the_agree_modes_gives_the_same_mode(old, new):
    """"gate" was the agreement rule's name before --gate (the ship rule) kept it: attach, the rule and the flag
    map it to the new mode, and the trunk receives the very same gradient."""
    a = torch.tensor([[-1.0, 4.0, 0.0], [0.0, 1.0, 5.0], [1.0, -3.0, 1.0]])
    assert torch.equal(control(a, G, old), control(a, G, new))
    grads_by = {}
    for mode in (old, new):
        net, x, y, cohorts = net_and_batch(4)
        wrapper = c2al.attach(net, at="0", n_cohorts=2, aux_weight=[0.5, 2.0], head=lambda h: nn.Linear(h, 1), balance=mode)
        assert wrapper.balance == new
        wrapper.loss(wrapper(x), y, cohorts)[0].backward()
        grads_by[mode] = grads(net[0])
    assert all(torch.equal(a, b) for a, b in zip(grads_by[old], grads_by[new]))
    assert parse_args(["--aux-balance", old]).aux_balance == new
    assert Config(aux_balance=old).aux_balance == new == Config.from_dict({"aux_balance": old}).aux_balance


def test_a_checkpoint_written_with_the_old_spelling_resumes_under_the_new_one(tmp_path):
    from c2al.dist.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "c.pt", model_state={}, config={"aux_balance": "magnitude+gate"}, step=0)
    load_checkpoint(tmp_path / "c.pt", expect_config={"aux_balance": "magnitude+agree"}, keys=("aux_balance",))
    with pytest.raises(C2ALError, match=r"aux_balance='magnitude\+gate' \(now 'project'\)"):
        load_checkpoint(tmp_path / "c.pt", expect_config={"aux_balance": "project"}, keys=("aux_balance",))


def net_and_batch(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1))
    x, y = torch.randn(16, 5), (torch.rand(16) > 0.5).float()
    cohorts = torch.randint(-1, 2, (16,))
    return net, x, y, cohorts


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_none_matches_the_plain_sum_bit_for_bit():
    """balance="none" gives the trunk exactly the gradient of BCE + sum_k lambda_k BCE_k, as before balance existed."""
    net, x, y, cohorts = net_and_batch()
    wrapper = c2al.attach(net, at="0", n_cohorts=2, aux_weight=0.3, head=lambda h: nn.Linear(h, 1))
    wrapper.loss(wrapper(x), y, cohorts)[0].backward()
    got = grads(net)
    net.zero_grad()
    wrapper.heads.zero_grad()
    rep = net[0](x)  # the plain computation: heads on the flattened representation, one cat
    logits = net[2](net[1](rep))
    flat = rep.unsqueeze(-1).flatten(1)
    aux = torch.cat([h(flat).reshape(16, 1) for h in wrapper.heads], dim=1)
    wrapper.loss(c2al.AuxOutput(logits, aux), y, cohorts)[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(got, grads(net)))


@pytest.mark.parametrize("mode", ["agree", "project", "magnitude", "magnitude+project"])
def test_wrapper_backward_applies_the_rule_per_head(mode):
    """The trunk receives g + sum_k control(a_k, g), with g and a_k the gradients at the representation."""
    net, x, y, cohorts = net_and_batch(1)
    wrapper = c2al.attach(net, at="0", n_cohorts=2, aux_weight=[0.5, 2.0], head=lambda h: nn.Linear(h, 1), balance=mode)
    wrapper.loss(wrapper(x), y, cohorts)[0].backward()
    got = grads(net[0])  # the first Linear: the trunk below the representation

    net.zero_grad()
    rep = net[0](x)
    r = rep.detach().requires_grad_(True)
    logits = net[2](net[1](r))
    flat = r.unsqueeze(-1).flatten(1)
    aux = torch.cat([h(flat).reshape(16, 1) for h in wrapper.heads], dim=1)
    _, parts = wrapper.loss(c2al.AuxOutput(logits, aux), y, cohorts)
    g = torch.autograd.grad(parts["main"], r, retain_graph=True)[0]
    from c2al.losses import bce_with_logits
    from c2al.plugin import aux_labels

    targets = aux_labels(y, cohorts, 2)
    per_head = [w * bce_with_logits(aux[:, k], targets[:, k], torch.ones(16), denominator=torch.tensor(16.0))
                for k, w in enumerate((0.5, 2.0))]
    total = g + sum(control(torch.autograd.grad(t, r, retain_graph=True)[0], g, mode) for t in per_head)
    rep.backward(total)
    for a, b in zip(got, grads(net[0])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_heads_still_learn_under_every_mode():
    """The rules act on the trunk's gradient only: every head's own parameters get their full gradient."""
    for mode in ("agree", "project", "magnitude+agree"):
        net, x, y, cohorts = net_and_batch(2)
        wrapper = c2al.attach(net, at="0", n_cohorts=2, head=lambda h: nn.Linear(h, 1), balance=mode)
        wrapper.loss(wrapper(x), y, cohorts)[0].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in wrapper.heads.parameters())


def test_detach_after_balance_restores_the_plain_forward():
    net, x, _, _ = net_and_batch(3)
    before = net(x)
    wrapper = c2al.attach(net, at="0", n_cohorts=2, balance="project")
    assert torch.equal(wrapper(x).logits, before)
    assert torch.equal(c2al.detach(wrapper)(x), before)
