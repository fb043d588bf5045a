"""Heads-free robust objectives: Group DRO over cohorts and CVaR DRO over examples.

Both change only the training loss of the plain model, so what ships is the
model itself, as after ordinary training. They are the group-robust baselines a
reviewer sets beside C2AL's auxiliary heads.

* Group DRO (Sagawa et al., ICLR 2020, arXiv 1911.08731). The groups are the K
  mined cohorts plus "the rest" (cohort id -1), G = K + 1. Each step takes the
  batch's mean loss per group, loss_g, moves the group weights by one
  exponentiated-gradient step, q_g <- q_g exp(eta (loss_g + C / sqrt(n_g))),
  renormalises them, and trains on sum_g q_g loss_g. n_g is group g's number of
  training rows; C / sqrt(n_g) is the group adjustment that favours small groups,
  whose training loss understates their test loss. A group absent from the batch
  keeps its weight before the renormalisation (this step says nothing about it).
* CVaR DRO (Levy et al., NeurIPS 2020, arXiv 2010.05893): the mean of the worst
  alpha-fraction of the batch's per-example losses; no groups needed.

`robust_model(model, objective)` wraps the user's model as `c2al.attach` does
(same object, same parameters); `TrainModule` trains a wrapper with its
`loss`, and `unwrap` hands back the model to serve. The group weights q are a
persistent buffer of the objective, so they are in the train module's
state_dict: checkpoints save them and a resumed run goes on with them.

Letters: B batch, G groups (K cohorts + the rest).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from c2al.errors import C2ALError
from c2al.losses import bce_with_logits

OBJECTIVES = ("erm", "group-dro", "cvar")


def per_row_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] binary cross-entropy of each row, through the one BCE of c2al.

    Args:
        logits: [B].
        labels: [B] in {0, 1}.

    Returns:
        [B] per-row losses (differentiable).

    Example:
        >>> [round(v, 4) for v in per_row_bce(torch.zeros(2), torch.tensor([1.0, 0.0])).tolist()]
        [0.6931, 0.6931]
    """
    # Seen as one sample of B "heads", bce_with_logits' [1, B] form returns each column's loss over a denominator of 1.
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    return bce_with_logits(logits.reshape(1, -1), labels.reshape(1, -1).to(logits.dtype), denominator=one)


def group_losses(per_row: torch.Tensor, groups: torch.Tensor, n_groups: int,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss of each group in a batch.

    Args:
        per_row: [B] per-example losses.
        groups: [B] int group of each row in 0..G-1.
        n_groups: G.
        weights: [B] row weights (0 for padding); None weighs every row 1.

    Returns:
        (losses [G], mass [G]): the weighted mean loss of each group (0 for a group with no
        weight in the batch) and the group's total row weight.

    Example:
        >>> group_losses(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
        (tensor([2., 0., 5.]), tensor([2., 0., 1.]))
    """
    w = torch.ones_like(per_row) if weights is None else weights.reshape(-1).to(per_row.dtype)  # [B]
    member = (groups.reshape(-1, 1) == torch.arange(n_groups, device=groups.device)).to(per_row.dtype)  # [B, G]
    mass = (w.unsqueeze(1) * member).sum(0)  # [G]
    sums = ((w * per_row).unsqueeze(1) * member).sum(0)  # [G]
    return sums / torch.where(mass > 0, mass, torch.ones_like(mass)), mass


def group_dro_step(q: torch.Tensor, losses: torch.Tensor, present: torch.Tensor, counts: torch.Tensor,
                   eta: float, adjust: float = 0.0) -> torch.Tensor:
    """One exponentiated-gradient step on the group weights (Sagawa et al. 2020).

    q_g <- q_g exp(eta (loss_g + C / sqrt(n_g))) for the groups present in the batch,
    unchanged for the others, then normalised to sum to 1 (computed in log space).

    Args:
        q: [G] current group weights (positive, summing to 1).
        losses: [G] the batch's mean loss per group.
        present: [G] bool, whether the group has rows in the batch.
        counts: [G] training rows n_g of each group (>= 1).
        eta: step size.
        adjust: the group adjustment C (0: none).

    Returns:
        [G] the new weights, without a gradient.

    Example:
        >>> group_dro_step(torch.tensor([0.5, 0.5]), torch.tensor([0.0, math.log(3.0)]),
        ...                torch.tensor([True, True]), torch.tensor([1.0, 1.0]), eta=1.0)
        tensor([0.2500, 0.7500])
    """
    step = eta * (losses.detach() + adjust / counts.to(losses.dtype).sqrt())  # [G]
    logits = q.log() + torch.where(present, step, torch.zeros_like(step))
    return torch.softmax(logits, dim=0)


def cvar(per_row: torch.Tensor, alpha: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """CVaR at level alpha: the mean of the worst alpha-fraction of the losses (Levy et al. 2020).

    With m = alpha * (total row weight), the losses are taken from the largest down
    until they hold weight m; the row that crosses m counts with its remaining share, so
    the value is exact for any alpha: for B unit rows, (sum of the floor(m) largest
    + (m - floor(m)) * the next) / m. alpha = 1 is the mean.

    Args:
        per_row: [B] per-example losses.
        alpha: the fraction in (0, 1].
        weights: [B] row weights (0 for padding); None weighs every row 1.

    Returns:
        Scalar; the gradient flows into the losses that count, with their shares.

    Example:
        >>> float(cvar(torch.tensor([1.0, 4.0, 2.0, 3.0]), 0.5))  # the worst two: (4 + 3) / 2
        3.5
    """
    if not 0 < alpha <= 1:
        raise C2ALError(f"cvar: alpha must be in (0, 1], got {alpha}")
    w = torch.ones_like(per_row) if weights is None else weights.reshape(-1).to(per_row.dtype)  # [B]
    order = torch.argsort(per_row.detach(), descending=True)
    losses, w = per_row[order], w[order]  # [B], worst first
    m = alpha * w.sum()
    before = torch.cumsum(w, 0) - w  # weight already taken above each row
    share = torch.minimum(w, (m - before).clamp(min=0))  # [B]
    return (share * losses).sum() / torch.where(m > 0, m, torch.ones_like(m))


class GroupDRO(nn.Module):
    """The Group DRO objective over K cohorts plus the rest, with its group weights as state.

    Args:
        counts: the training rows of each group: K cohorts first, the rest (cohort id -1) last; a group
            without rows (a cohort the miner did not fill) keeps its weight, as a group absent from a batch.
        eta: exponentiated-gradient step size.
        adjust: group adjustment C of the step (0: none).

    Example:
        >>> dro = GroupDRO([30, 10, 60], eta=0.1)
        >>> loss = dro(torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 1, -1, -1]))
        >>> round(float(dro.q.sum()), 6), dro.q.shape
        (1.0, torch.Size([3]))
    """

    def __init__(self, counts: Sequence[int], eta: float = 0.01, adjust: float = 0.0) -> None:
        super().__init__()
        if len(counts) < 2 or min(counts) < 0 or sum(1 for c in counts if c > 0) < 2:
            raise C2ALError(f"Group DRO needs >= 2 groups holding training rows, got row counts {list(counts)}; "
                            f"mine cohorts with --aux-cohorts that hold training rows")
        if not (math.isfinite(eta) and eta > 0) or not (math.isfinite(adjust) and adjust >= 0):
            raise C2ALError(f"Group DRO: --dro-eta must be > 0 and --dro-adjust >= 0, got {eta} and {adjust}")
        self.eta, self.adjust = float(eta), float(adjust)
        g = len(counts)
        self.register_buffer("q", torch.full((g,), 1.0 / g))  # persistent: checkpoints carry it
        # a data statistic, not state; a group without training rows is never in a batch, so its n_g is never read (1 avoids 1/0)
        self.register_buffer("counts", torch.tensor([float(max(c, 1)) for c in counts]), persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, cohort_ids: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """sum_g q_g loss_g with q updated first (in training mode only; evaluation leaves q alone).

        Args:
            logits: [B]; labels: [B]; cohort_ids: [B] in -1..K-1; weights: [B] or None.

        Returns:
            The scalar robust loss.
        """
        g = self.q.shape[0]
        groups = torch.where(cohort_ids < 0, torch.full_like(cohort_ids, g - 1), cohort_ids)  # the rest: group G-1
        losses, mass = group_losses(per_row_bce(logits, labels), groups, g, weights)  # [G], [G]
        q = self.q
        if self.training:
            q = group_dro_step(self.q, losses, mass > 0, self.counts, self.eta, self.adjust)
            with torch.no_grad():
                self.q.copy_(q)
        return (q * losses).sum()

    def extra_repr(self) -> str:
        return f"groups={self.q.shape[0]}, eta={self.eta:g}, adjust={self.adjust:g}"


class CVaR(nn.Module):
    """The CVaR DRO objective: the mean of the worst alpha-fraction of a batch's BCE losses.

    Args:
        alpha: the fraction in (0, 1].

    Example:
        >>> float(CVaR(0.5)(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([-1, -1])))
        0.6931471824645996
    """

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        if not (math.isfinite(alpha) and 0 < alpha <= 1):
            raise C2ALError(f"CVaR: --cvar-alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, cohort_ids: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """CVaR_alpha of the per-row BCE; cohort_ids are not used (same signature as GroupDRO)."""
        return cvar(per_row_bce(logits, labels), self.alpha, weights)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class RobustModel(nn.Module):
    """A model trained under a robust objective; build it with `robust_model`.

    Attributes:
        model: the user's model object, untouched.
        objective: GroupDRO or CVaR.
    """

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        if not isinstance(objective, (GroupDRO, CVaR)):
            raise C2ALError(f"robust_model: objective must be GroupDRO or CVaR, got {type(objective).__name__}")
        self.model = model
        self.objective = objective

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's own forward, unchanged."""
        return self.model(*args, **kwargs)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, cohort_ids: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(robust loss, parts): parts["main"] is the plain weighted BCE, for logging beside "robust".

        Args:
            logits: [B] (or [B, 1]); labels: [B]; cohort_ids: [B]; weights: [B] or None.
        """
        flat = logits.reshape(-1)  # [B]
        robust = self.objective(flat, labels, cohort_ids, weights)
        return robust, {"main": bce_with_logits(flat, labels.to(flat.dtype), weights).detach(), "robust": robust.detach()}


def robust_model(model: nn.Module, objective: nn.Module) -> RobustModel:
    """Wrap `model` so that TrainModule trains it under `objective` (GroupDRO or CVaR).

    Example:
        >>> net = nn.Linear(3, 1)
        >>> unwrap(robust_model(net, CVaR(0.2))) is net
        True
    """
    return RobustModel(model, objective)


def unwrap(wrapper: RobustModel) -> nn.Module:
    """The model to serve: the one passed to `robust_model`, with no objective attached."""
    if not isinstance(wrapper, RobustModel):
        raise C2ALError(f"c2al.robust.unwrap: expected what robust_model returned, got {type(wrapper).__name__}")
    return wrapper.model


def make_objective(kind: str, *, counts: Sequence[int] = (), eta: float = 0.01, adjust: float = 0.0,
                   alpha: float = 0.5) -> nn.Module:
    """The objective module a --objective names ("group-dro" needs the groups' training row counts).

    Args:
        kind: "group-dro" or "cvar".
        counts: Group DRO: training rows per group, the K cohorts then the rest.
        eta, adjust: Group DRO's step size and group adjustment C.
        alpha: CVaR's fraction.

    Returns:
        A GroupDRO or CVaR module.
    """
    if kind == "group-dro":
        return GroupDRO(counts, eta=eta, adjust=adjust)
    if kind == "cvar":
        return CVaR(alpha)
    raise C2ALError(f"--objective {kind!r}: a robust objective is one of {OBJECTIVES[1:]}")


def group_counts(cohort_ids: Any, n_cohorts: int) -> list[int]:
    """Training rows of each Group DRO group: cohorts 0..K-1, then the rest (id -1).

    Example:
        >>> group_counts([0, 0, 1, -1, -1, -1], 2)
        [2, 1, 3]
    """
    ids = torch.as_tensor(cohort_ids).reshape(-1)
    return [int((ids == k).sum()) for k in range(n_cohorts)] + [int((ids < 0).sum())]
