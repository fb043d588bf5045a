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


# ------------------------------------------------------- next-item dual encoder (Ning et al. 2021)
# Letters: B batch, V catalog size, H embedding size. Every function takes UNIT rows (cosine scores)
# and row weights w in {0, 1}: a weight-0 row (the padding a client's last local batch carries) is
# neither a positive nor a negative nor part of any spread-out pair.


def _offdiag_gram_norm(x: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_{i != j} (x_i . x_j)^2) without the [N, N] Gram matrix.

    sum_{i, j} (x_i . x_j)^2 = ||x^T x||_F^2 (an [H, H] matrix), and the diagonal holds
    sum_i |x_i|^4, so a whole-catalog term costs O(V H^2) instead of O(V^2 H). Zero rows
    (padding) drop out of both sums.

    Args:
        x: [N, H] rows (unit rows, or zero rows for padding).

    Returns:
        Scalar, >= 0.
    """
    cov = x.T @ x  # [H, H]
    total = (cov * cov).sum() - ((x * x).sum(-1) ** 2).sum()
    # Cancellation can leave a tiny negative; the floor also keeps sqrt's gradient finite at 0.
    return total.clamp_min(1e-12).sqrt()


def _offdiag_cross_norm(query: torch.Tensor, candidate: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_{i != j} w_i w_j (q_i . c_j)^2): the batch similarities off the positive diagonal.

    Args:
        query: [B, H] unit rows; candidate: [B, H] unit rows (row i is query i's positive).
        weights: [B] in {0, 1}.

    Returns:
        Scalar, >= 0.
    """
    sim = query @ candidate.T  # [B, B]
    pair = weights.unsqueeze(1) * weights.unsqueeze(0) * (1 - torch.eye(len(sim), dtype=sim.dtype, device=sim.device))
    return (pair * sim * sim).sum().clamp_min(1e-12).sqrt()


def spreadout_terms(query: torch.Tensor, candidate: torch.Tensor, catalog: torch.Tensor, weights: torch.Tensor,
                    lambdas: tuple[float, float, float] = (1e-3, 1e-3, 1e-3)) -> torch.Tensor:
    """Spread-out regularisation (Zhang et al. 2017) as Ning et al.'s dual encoder applies it.

    Each term is the Frobenius norm of a similarity matrix with its positive entries removed:
    context (the batch's queries among themselves), label (the WHOLE catalog's item vectors among
    themselves, so items no client touches are pushed apart too) and cross (each query against the
    other rows' positives, the negative half of a batch softmax).

    Args:
        query: [B, H] unit context vectors.
        candidate: [B, H] unit label vectors (row i: query i's next item).
        catalog: [V, H] unit vectors of every item.
        weights: [B] in {0, 1}.
        lambdas: (context, label, cross) scales.

    Returns:
        Scalar lambda_c |Q Q^T|_off + lambda_l |C C^T|_off + lambda_x |Q V_b^T|_off.

    Example:
        >>> e = torch.eye(2)
        >>> round(float(spreadout_terms(e, e, e, torch.ones(2))), 6)  # orthogonal everything: nothing to spread
        0.0
    """
    lam_c, lam_l, lam_x = lambdas
    w = weights.to(query.dtype)
    out = lam_c * _offdiag_gram_norm(query * w.unsqueeze(1))
    out = out + lam_l * _offdiag_gram_norm(catalog)
    return out + lam_x * _offdiag_cross_norm(query, candidate, w)


def global_softmax_loss(query: torch.Tensor, catalog: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Softmax of each query over the whole catalog (every other item a negative), weighted mean over rows.

    Args:
        query: [B, H] unit context vectors.
        catalog: [V, H] unit item vectors.
        targets: [B] int64 catalog row of each query's next item.
        weights: [B] in {0, 1}.
        temperature: logits are cosine / temperature (Ning et al.'s code: 1, raw cosine).

    Returns:
        Scalar; 0 with a gradient for an all-padding batch.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); items = torch.eye(2)
        >>> round(float(global_softmax_loss(q, items, torch.tensor([0]), torch.ones(1))), 4)  # -log(e / (e + 1))
        0.3133
    """
    if temperature <= 0:
        raise C2ALError(f"global_softmax_loss: temperature must be > 0, got {temperature}")
    logits = query @ catalog.T / temperature  # [B, V]
    per_row = F.cross_entropy(logits, targets, reduction="none")  # [B]
    return _weighted_mean(per_row, weights.to(per_row.dtype))


def positive_hinge_loss(query: torch.Tensor, candidate: torch.Tensor, weights: torch.Tensor, margin: float = 0.9) -> torch.Tensor:
    """Squared hinge on each positive pair's cosine, relu(margin - cos)^2, weighted mean over rows.

    Batch-insensitive: a row's value does not depend on the other rows of its batch.

    Args:
        query: [B, H] unit context vectors; candidate: [B, H] unit label vectors.
        weights: [B] in {0, 1}.
        margin: the cosine a positive is pulled up to (0.9 in Ning et al.'s code).

    Returns:
        Scalar.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); c = torch.tensor([[0.0, 1.0]])
        >>> round(float(positive_hinge_loss(q, c, torch.ones(1))), 4)  # (0.9 - 0)^2
        0.81
    """
    cos = (query * candidate).sum(-1)  # [B]
    return _weighted_mean(F.relu(margin - cos) ** 2, weights.to(cos.dtype))


# ----------------------------------------------------------------- batch-insensitive two-tower loss (federated clients)
# A client holds one user's handful of interactions, so a local batch offers almost no in-batch negatives.
# Ning et al. 2021 train federated two-towers with a squared hinge on each (query, item) pair's cosine plus a
# spread-out regularizer (Zhang et al. 2017) over the batch's items. This is c2al's batch-local variant (the
# paper's own protocol, with the spread-out over the whole vocabulary, is `positive_hinge_loss` +
# `spreadout_terms` above).
HINGE_POS_MARGIN = 0.8  # a positive pair is pulled until its cosine reaches this
HINGE_NEG_MARGIN = 0.0  # a negative pair is pushed until its cosine drops below this
HINGE_SPREAD_WEIGHT = 0.1


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
    per_row = labels * F.relu(HINGE_POS_MARGIN - cos) ** 2 + (1 - labels) * F.relu(cos - HINGE_NEG_MARGIN) ** 2
    loss = (per_row * weights).sum() / weights.sum().clamp_min(1.0)
    return loss + HINGE_SPREAD_WEIGHT * spread_out(v, weights)


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
