"""Batch-insensitive two-tower loss for clients with few rows (Ning et al. 2021).

A client holds one user's handful of interactions, so a local batch offers
almost no in-batch negatives: in-batch softmax degrades with the batch. Ning et
al. train federated two-towers with losses whose per-example value does not
depend on the rest of the batch: a squared hinge on each (query, item) pair's
cosine, plus a spread-out regularizer (Zhang et al. 2017) that pushes the
batch's item embeddings apart so the towers do not collapse.

Letters: B batch, H tower output size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2al.data.batch import Batch
from c2al.train.task import TrainModule

POS_MARGIN = 0.8  # a positive pair is pulled until its cosine reaches this
NEG_MARGIN = 0.0  # a negative pair is pushed until its cosine drops below this
SPREAD_WEIGHT = 0.1


def squared_hinge_spreadout(query: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of y relu(m+ - cos)^2 + (1 - y) relu(cos - m-)^2, plus the spread-out term.

    Args:
        query: u [B, H]; candidate: v [B, H]; labels, weights: [B].

    Returns:
        Scalar loss.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); v = torch.tensor([[1.0, 0.0]])
        >>> float(squared_hinge_spreadout(q, v, torch.ones(1), torch.ones(1)))
        0.0
    """
    u, v = F.normalize(query.float(), dim=-1), F.normalize(candidate.float(), dim=-1)
    cos = (u * v).sum(-1)  # [B]
    per_row = labels * F.relu(POS_MARGIN - cos) ** 2 + (1 - labels) * F.relu(cos - NEG_MARGIN) ** 2
    loss = (per_row * weights).sum() / weights.sum().clamp_min(1.0)
    return loss + SPREAD_WEIGHT * spread_out(v, weights)


def spread_out(v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the distinct real rows of a batch (Zhang et al. 2017's spread-out).

    Pairs weigh w_i w_j, so padding rows (weight 0) drop out without indexing by a mask: the
    batch keeps its shape, which vectorized clients (vmap) need. 0 with fewer than two real rows.

    Args:
        v: unit rows [B, H]; weights: [B] in {0, 1}.

    Returns:
        Scalar.

    Example:
        >>> float(spread_out(torch.eye(2), torch.ones(2)))  # orthogonal rows: nothing to spread
        0.0
    """
    gram = v @ v.T  # [B, B]
    pair = weights.unsqueeze(0) * weights.unsqueeze(1) * (1 - torch.eye(len(v), dtype=v.dtype, device=v.device))  # [B, B]
    return (pair * gram**2).sum() / pair.sum().clamp_min(1.0)


class HingeTrainModule(TrainModule):
    """TrainModule whose two-tower loss is `squared_hinge_spreadout` (forward and prediction unchanged)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, loss="softmax")  # routes the loss through _softmax_loss below

    def _softmax_loss(self, batch: Batch) -> torch.Tensor:
        inner = getattr(self.model, "model", self.model)
        query, candidate = inner.towers(batch.dense, batch.sparse)
        return squared_hinge_spreadout(query, candidate, batch.labels, batch.weights)
