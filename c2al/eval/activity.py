"""Attention-activity scalars: how much of a model's attention is actually in use.

C2AL's claim is that one global loss lets the attention that selects shared
embeddings collapse: many weights go inactive. The paper shows this only as
histograms; these pure functions turn it into numbers a report can tabulate.

Letters: B batch, F fields, K columns of Y, P pairs, H hidden units.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.errors import C2ALError

NEAR_ZERO_FRACTION = 0.01  # of the uniform weight 1/n


def near_zero_share(weights: torch.Tensor, threshold: float | None = None, dim: int = -1) -> float:
    """Share of attention weights below `threshold`.

    The default threshold is 1% of the uniform weight, 0.01 / n with n the
    number of options along `dim`: a weight below it contributes less than a
    hundredth of what an undecided attention would give that option, whatever n
    is, so the share is comparable between models with different F or P.

    Args:
        weights: attention weights, each slice along `dim` summing to 1
            (AFM [B, P] with dim=-1; AttentionFM's Y [B, F, K] with dim=1).
        threshold: absolute threshold; None for 0.01 / n.
        dim: the dimension the weights are normalized over.

    Returns:
        Share in [0, 1] of entries strictly below the threshold.
    """
    if weights.numel() == 0:
        raise C2ALError("near_zero_share: weights are empty")
    if threshold is None:
        threshold = NEAR_ZERO_FRACTION / weights.shape[dim]
    below = weights < threshold
    return int(below.sum()) / below.numel()  # integer count: exact, unlike a float32 mean


def attention_entropy(weights: torch.Tensor, dim: int = -1) -> float:
    """Mean entropy of attention distributions, normalized by its maximum log(n).

    Args:
        weights: attention weights, each slice along `dim` summing to 1.
        dim: the dimension the weights are normalized over (n options).

    Returns:
        Value in [0, 1]: 1 for uniform attention, 0 for one-hot; 0 when n == 1
        (a single option leaves nothing to spread over).
    """
    if weights.numel() == 0:
        raise C2ALError("attention_entropy: weights are empty")
    n = weights.shape[dim]
    if n == 1:
        return 0.0
    p = weights.double()
    entropy = -torch.special.xlogy(p, p).sum(dim=dim)  # xlogy makes 0 log 0 = 0
    return float((entropy / math.log(n)).mean())


def effective_rank(y: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, 2007) of each sample's Y, averaged.

    erank(Y) = exp(H(p)), p = sigma / sum(sigma) over the singular values
    sigma of Y. It lies in [1, min(F, K)]: 1 when all K columns select the same
    embedding mix, min(F, K) when they select orthogonal, equally strong ones.

    Args:
        y: [B, F, K] (or one [F, K] matrix).

    Returns:
        Mean effective rank; a zero matrix counts as 0.
    """
    if y.dim() == 2:
        y = y.unsqueeze(0)
    if y.dim() != 3 or y.numel() == 0:
        raise C2ALError(f"effective_rank: expected a non-empty [B, F, K] tensor, got shape {tuple(y.shape)}")
    sigma = torch.linalg.svdvals(y.double())  # [B, min(F, K)]
    total = sigma.sum(dim=-1, keepdim=True)
    p = sigma / torch.where(total > 0, total, torch.ones_like(total))
    erank = torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))  # [B]
    erank = torch.where(total.squeeze(-1) > 0, erank, torch.zeros_like(erank))
    return float(erank.mean())


def dead_relu_share(hidden_activations: torch.Tensor) -> float:
    """Share of ReLU units that are zero for every sample of the batch.

    Args:
        hidden_activations: [..., H] post-ReLU activations; every leading index
            (samples, and pairs for AFM) counts as one observation of the H units.

    Returns:
        Share in [0, 1] of the H units never active.
    """
    if hidden_activations.numel() == 0:
        raise C2ALError("dead_relu_share: activations are empty")
    flat = hidden_activations.reshape(-1, hidden_activations.shape[-1])  # [N, H]
    dead = (flat <= 0).all(dim=0)  # [H]
    return int(dead.sum()) / dead.numel()


def attention_activity(model: nn.Module, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, float]:
    """All activity scalars of an AFM or AttentionFM on one batch.

    Args:
        model: a model with `field_embeddings(dense, sparse)` and an `inter_arch`
            offering `attention(fields)`, `attention_hidden(fields)` and
            `attention_norm_dim` (AFM, AttentionFM).
        dense: [B, n_dense].
        sparse: KJT with every feature of the model's EBC.

    Returns:
        {"near_zero_share", "attention_entropy", "dead_relu_share"} and, where
        the attention is a matrix per sample (AttentionFM's Y), "effective_rank".
    """
    inter = getattr(model, "inter_arch", None)
    needed = ("attention", "attention_hidden", "attention_norm_dim")
    if not hasattr(model, "field_embeddings") or inter is None or not all(hasattr(inter, n) for n in needed):
        raise C2ALError(
            f"attention_activity: {type(model).__name__} has no readable attention "
            f"(needs field_embeddings() and inter_arch with {', '.join(needed)})"
        )
    with torch.no_grad():
        fields = model.field_embeddings(dense, sparse)  # [B, F, D]
        weights = inter.attention(fields)  # AFM [B, P]; AttentionFM [B, F, K]
        hidden = inter.attention_hidden(fields)
    dim = inter.attention_norm_dim
    out = {
        "near_zero_share": near_zero_share(weights, dim=dim),
        "attention_entropy": attention_entropy(weights, dim=dim),
        "dead_relu_share": dead_relu_share(hidden),
    }
    if weights.dim() == 3:
        out["effective_rank"] = effective_rank(weights)
    return out
