"""Main-anchored control of the auxiliary gradients at the shared representation.

C2AL's cohort heads read the representation R (the output of the tapped
submodule) that the main head reads too. The harm C2AL can do comes from
auxiliary gradients at R that fight the main one. `split(R, K, mode)` returns
K + 1 copies of R, equal in value: the main path continues from the first, head
k reads copy k + 1. They come out of one autograd function, so its backward
receives the main gradient g and every head's gradient a_k together and sends
R a single gradient g + sum_k f(a_k, g). One backward pass still flows through
the trunk and the embedding tables, so TorchRec's fused table optimizers (which
update inside the backward and never expose per-task table gradients) work
unchanged; the extra cost is a few [B, H] reductions.

Modes (f(a, g) per head; rows are samples, cosines per row of [B, H]):
- none: a (the plain sum; `split` is then not called at all).
- agree: a on the rows where cos(a, g) > 0, else 0 (Du et al. 2018, arXiv 1812.02224,
  applied per sample: a cohort head's gradient counts where it agrees with the main task).
  Earlier versions called it "gate"; that spelling is still accepted (`c2al.config.balance_mode`),
  while --gate is the validation rule that decides what ships.
- project: a minus its component along g on the rows where a . g < 0 (PCGrad, Yu et
  al. 2020, one-way: the main gradient is never changed).
- magnitude: a * (r |g| / |a| + 1 - r), norms over the batch (MetaBalance, He et al.
  WWW 2022, arXiv 2203.06801, with relax factor r; Meta's MultiBalance applies it at the
  shared representation, arXiv 2411.11871). Norms are the current batch's rather than
  moving averages, which keeps the rule stateless (bit-identical resume, nothing to trace).
- magnitude+agree, magnitude+project: the direction rule first, then the magnitude rule.

Letters: B batch, H representation width (R may be [B, ...]; it is flattened per row), K heads.
"""
from __future__ import annotations

from typing import Any

import torch

from c2al.config import BALANCE_MODES, balance_mode
from c2al.errors import C2ALError

RELAX = 0.7  # MetaBalance's relax factor r: 1 sets |a| to |g|, 0 leaves a as it is
_EPS = 1e-12


def check_mode(mode: str) -> str:
    """`mode` as one of BALANCE_MODES (an old spelling mapped, e.g. "gate" -> "agree"); anything else is refused."""
    mode = balance_mode(mode)
    if mode not in BALANCE_MODES:
        raise C2ALError(f"aux balance must be one of {BALANCE_MODES}, got {mode!r}")
    return mode


def control(aux: torch.Tensor, main: torch.Tensor, mode: str, relax: float = RELAX) -> torch.Tensor:
    """f(a, g) of one head: its gradient at R after the main-anchored rule `mode`.

    Args:
        aux: [B, ...] a head's gradient at R.
        main: [B, ...] the main head's gradient at R.
        mode: one of BALANCE_MODES (or an old spelling of one).
        relax: MetaBalance's r for the magnitude modes.

    Returns:
        [B, ...] the gradient R receives from that head.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> a = torch.tensor([[-2.0, 1.0], [0.0, 3.0]])  # row 0 opposes g, row 1 agrees
        >>> control(a, g, "agree").tolist()
        [[0.0, 0.0], [0.0, 3.0]]
        >>> control(a, g, "project").tolist()
        [[0.0, 1.0], [0.0, 3.0]]
    """
    mode = check_mode(mode)
    a, g = aux.reshape(aux.shape[0], -1), main.reshape(main.shape[0], -1)  # [B, H]
    if mode.endswith("agree"):
        agree = (a * g).sum(1, keepdim=True) > 0  # [B, 1]; cos > 0 <=> dot > 0
        a = torch.where(agree, a, torch.zeros_like(a))
    elif mode.endswith("project"):
        dot = (a * g).sum(1, keepdim=True)  # [B, 1]
        a = a - torch.clamp(dot, max=0.0) / (g * g).sum(1, keepdim=True).clamp_min(_EPS) * g
    if mode.startswith("magnitude"):
        a_norm, g_norm = a.norm(), g.norm()
        scale = torch.where(a_norm > _EPS, relax * g_norm / a_norm.clamp_min(_EPS) + (1.0 - relax), torch.ones_like(a_norm))
        a = a * scale
    return a.reshape(aux.shape)


class _Split(torch.autograd.Function):
    """K + 1 equal copies forward; backward: g + sum_k control(a_k, g)."""

    @staticmethod
    def forward(ctx: Any, rep: torch.Tensor, n_heads: int, mode: str, relax: float) -> tuple[torch.Tensor, ...]:
        ctx.mode, ctx.relax = mode, relax
        return tuple(rep.clone() for _ in range(n_heads + 1))  # copies, not views: autograd owns each

    @staticmethod
    def backward(ctx: Any, main: torch.Tensor | None, *aux: torch.Tensor | None) -> tuple[Any, ...]:
        grads = [a for a in aux if a is not None]
        if main is None:  # nothing to anchor on (the main head does not read R): drop the heads' gradients
            return None, None, None, None
        total = main.clone()
        for a in grads:
            total = total + control(a, main, ctx.mode, ctx.relax)
        return total, None, None, None


def split(rep: torch.Tensor, n_heads: int, mode: str, relax: float = RELAX) -> tuple[torch.Tensor, ...]:
    """(main copy, head copies...) of R, equal in value; see the module docstring for the backward."""
    return _Split.apply(rep, n_heads, mode, relax)


torch.fx.wrap("split")  # one node under FX tracing (TrainPipelineSparseDist), run as this function
