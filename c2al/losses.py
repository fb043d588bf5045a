"""Loss functions shared by the train wrappers (models never own their loss).

Letters: B batch, H tower output size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2al.errors import C2ALError


def _traced(*tensors: torch.Tensor | None) -> bool:
    """Whether torch.fx is tracing: TorchRec's pipelines trace the train wrapper's
    forward, loss included, and a Proxy's shape cannot drive an `if`."""
    return any(isinstance(t, torch.fx.Proxy) for t in tensors)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w), and 0 (still differentiable) when every weight is 0."""
    total = weights.sum()
    # torch.where instead of an `if`: no device sync, and the 0 keeps its grad_fn.
    return (values * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


def bce_with_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged with sample weights: the one BCE of c2al.

    Args:
        logits: [B], or [B, K] for K heads at once.
        labels: same shape as logits, in {0, 1} (soft labels in [0, 1] also work).
        weights: non-negative row weights broadcastable to logits ([B], or [B, 1] / [B, K]
            for [B, K] logits); rows of weight 0 (padding) do not count. None weighs every row 1.
        denominator: what the weighted sum is divided by; default the sum of `weights`.
            The C2AL heads divide by the main term's row count, so a cohort head's
            term shrinks with its cohort instead of being a mean over its own rows.

    Returns:
        Scalar for [B] logits, [K] for [B, K]; 0 with a gradient when the
        denominator is 0 (an all-padding batch).

    Example:
        >>> float(bce_with_logits(torch.zeros(2), torch.tensor([1.0, 0.0])))  # log 2
        0.6931471824645996
    """
    if not _traced(logits, labels) and logits.shape != labels.shape:
        raise C2ALError(f"bce_with_logits: logits have shape {tuple(logits.shape)}, labels {tuple(labels.shape)}")
    per_row = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")  # [B] or [B, K]
    if weights is None and denominator is None:
        return per_row.mean()
    if weights is None:
        weights = torch.ones_like(per_row)
    if not _traced(weights, labels) and weights.dim() == 1 and weights.shape != labels.shape:
        raise C2ALError(f"bce_with_logits: weights have shape {tuple(weights.shape)}, labels {tuple(labels.shape)}")
    w = weights.to(per_row.dtype)
    total = w.sum() if denominator is None else denominator
    # torch.where instead of an `if`: no device sync, and the 0 keeps its grad_fn.
    return (per_row * w).sum(0) / torch.where(total > 0, total, torch.ones_like(total))


def in_batch_softmax_loss(
    query: torch.Tensor,
    candidate: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.05,
    normalize: bool = True,
    weights: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives, over the positive pairs.

    Row i with label 1 is a positive pair (query_i, candidate_i); its softmax
    runs over every candidate of the batch, the other B-1 acting as negatives:
    loss_i = -log softmax_j(<q_i, c_j> / temperature)[i]. The loss is the mean
    over positive rows. A batch holding the same item twice counts the copy as
    a negative.

    In-batch negatives are drawn by popularity, so without correction popular
    items are pushed down as negatives far more often than a full softmax would.
    `log_q` applies the logQ correction of Yi et al. (2019): every logit of
    candidate j becomes <q_i, c_j> / temperature - log Q_j, Q_j being the
    probability that candidate j is sampled into a batch (its share of the
    training rows; a constant factor cancels in the softmax).

    By default q and c are L2-normalized (cosine similarity), which is what a
    small temperature such as 0.05 is calibrated for; with normalize=False the
    raw dot product (what TwoTower's forward scores) is divided by temperature.

    Args:
        query: u [B, H].
        candidate: v [B, H].
        labels: [B]; rows with label 1 are the positives.
        temperature: softmax temperature (> 0).
        normalize: L2-normalize query and candidate before the dot product.
        weights: [B] sample weights; a row of weight 0 (padding) is neither a
            positive nor a negative. None weighs every row 1.
        log_q: [B] log sampling probability of each row's candidate; None: no correction.

    Returns:
        Scalar loss; 0 with a gradient when the batch has no positives.
    """
    if temperature <= 0:
        raise C2ALError(f"in_batch_softmax_loss: temperature must be > 0, got {temperature}")
    if not _traced(query, candidate, labels):
        if query.shape != candidate.shape or query.dim() != 2:
            raise C2ALError(
                f"in_batch_softmax_loss: query {tuple(query.shape)} and candidate {tuple(candidate.shape)} "
                "must both be [B, H]"
            )
        if labels.shape != query.shape[:1]:
            raise C2ALError(
                f"in_batch_softmax_loss: labels have shape {tuple(labels.shape)}, expected ({query.shape[0]},)"
            )
        if log_q is not None and log_q.shape != labels.shape:
            raise C2ALError(f"in_batch_softmax_loss: log_q has shape {tuple(log_q.shape)}, expected ({query.shape[0]},)")
    # float32 whatever the model's dtype: a softmax over B candidates at temperature 0.05
    # is too sharp for half precision.
    query, candidate = query.float(), candidate.float()
    if normalize:
        query, candidate = F.normalize(query, dim=-1), F.normalize(candidate, dim=-1)
    scores = query @ candidate.T / temperature  # [B, B]: row i scores every candidate of the batch
    if log_q is not None:
        scores = scores - log_q.float().unsqueeze(0)  # column j: candidate j's correction, for every query
    row_weights = (labels > 0.5).float()  # [B]
    if weights is not None:
        row_weights = row_weights * weights.float()
        # Padding candidates are no negatives either. The most negative finite value
        # rather than -inf keeps an all-padding batch free of NaN gradients.
        scores = scores.masked_fill((weights <= 0).unsqueeze(0), torch.finfo(torch.float32).min)
    target = torch.arange(scores.shape[0], device=scores.device)
    per_row = F.cross_entropy(scores, target, reduction="none")  # [B]
    # Padding rows whose own candidate is masked hold a huge loss; zero them before weighting.
    per_row = torch.where(row_weights > 0, per_row, torch.zeros_like(per_row))
    return _weighted_mean(per_row, row_weights)
