"""The lean AFM interaction (fused, chunked, hand-written backward) against the straightforward one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from c2al.models.afm import AFMInteractionArch, _AttentionPool, _dropout_lanes, _keep, afm_attention_pool

F, D, A = 5, 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def pair(chunk: int = 3) -> tuple[AFMInteractionArch, AFMInteractionArch]:
    """A lean arch and a straightforward one holding the same double-precision weights."""
    torch.manual_seed(0)
    lean = AFMInteractionArch(F, D, A, lean=True, chunk=chunk).double()
    ref = AFMInteractionArch(F, D, A, lean=False).double()
    ref.load_state_dict(lean.state_dict())
    return lean, ref


def grads(arch: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = arch(x)
    return [out.detach(), *torch.autograd.grad(out, [x, *arch.parameters()], g)]


def test_lean_forward_and_gradients_equal_the_straightforward_graph() -> None:
    lean, ref = pair(chunk=3)  # 7 rows: chunks of 3, 3 and 1
    x = torch.randn(7, F, D, dtype=torch.double)
    g = torch.randn(7, D, dtype=torch.double)
    for got, want in zip(grads(lean, x, g), grads(ref, x, g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_lean_float32_matches_the_straightforward_graph_at_benchmark_width() -> None:
    torch.manual_seed(1)
    lean = AFMInteractionArch(26, 16, 16, lean=True, chunk=64)
    ref = AFMInteractionArch(26, 16, 16, lean=False)
    ref.load_state_dict(lean.state_dict())
    x = torch.randn(100, 26, 16) * 0.3
    g = torch.randn(100, 16)
    for got, want in zip(grads(lean, x, g), grads(ref, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lean_gradients_pass_gradcheck_with_dropout() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, F, D, dtype=torch.double, requires_grad=True)
    w = torch.randn(A, D, dtype=torch.double, requires_grad=True)
    b = torch.randn(A, dtype=torch.double, requires_grad=True)
    h = torch.randn(1, A, dtype=torch.double, requires_grad=True)

    def pool(*t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(123)  # every numerical probe draws the same dropout mask
        return _AttentionPool.apply(*t, 0.3, 3)

    assert torch.autograd.gradcheck(pool, (x, w, b, h))


def test_lean_dropout_equals_the_reference_sum_under_the_same_mask() -> None:
    lean, ref = pair(chunk=8)
    x = torch.randn(8, F, D, dtype=torch.double)
    w, b, h = lean.hidden[0].weight, lean.hidden[0].bias, lean.score.weight
    torch.manual_seed(7)
    got = _AttentionPool.apply(x, w, b, h, 0.5, 8)  # one chunk: one draw of the whole mask
    pairs = ref.pairs(x)  # [B, P, D]
    torch.manual_seed(7)
    lanes, cut, scale = _dropout_lanes(tuple(pairs.shape), 0.5, pairs.device)
    mask = _keep(lanes, cut, pairs.dtype) * scale
    want = torch.bmm(ref.attention(x).unsqueeze(1), pairs * mask).squeeze(1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_lean_arch_applies_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    arch = AFMInteractionArch(F, D, A, dropout=0.5).double()
    x = torch.randn(6, F, D, dtype=torch.double)
    ref = AFMInteractionArch(F, D, A, lean=False).double()
    ref.load_state_dict(arch.state_dict())
    assert not torch.allclose(arch.train()(x), ref(x))
    torch.testing.assert_close(arch.eval()(x), ref(x), rtol=0, atol=1e-12)


def test_lean_pool_handles_an_empty_batch() -> None:
    lean, _ = pair()
    out = afm_attention_pool(torch.zeros(0, F, D, dtype=torch.double), lean.hidden[0].weight, lean.hidden[0].bias,
                             lean.score.weight)
    assert out.shape == (0, D)


def test_lean_arch_is_one_node_under_fx_tracing() -> None:
    lean, _ = pair()
    graph = torch.fx.symbolic_trace(lean).graph
    assert any(n.op == "call_function" and n.target is afm_attention_pool for n in graph.nodes)


def test_drop_mask_drops_at_the_asked_rate() -> None:
    torch.manual_seed(0)
    lanes, cut, scale = _dropout_lanes((1000, 50, 8), 0.2, torch.device("cpu"))
    keep = _keep(lanes, cut, torch.float32)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert keep.mean().item() == pytest.approx(0.8, abs=0.005)
    assert scale == pytest.approx(1 / 0.8, rel=1e-4)
