"""Evaluation metrics: NE and friends for rankers, recall/NDCG@K for retrieval.

Ranking metrics take 1-D arrays (numpy, lists or CPU torch tensors) of
predicted probabilities, labels in [0, 1] and optional non-negative weights,
and return python floats.

NE (He et al. 2014) is the mean log loss divided by the entropy of the
background positive rate of the same samples. The arithmetic is delegated to
`torchrec.metrics.ne` (`get_ne_states`, `compute_cross_entropy`, `compute_ne`),
so `ne` agrees with TorchRec's `NEMetric` by construction, with the same
conventions: logs in base 2 (NE itself does not depend on the base),
predictions clamped to [eps, 1 - eps] and the background rate clamped likewise,
eps = 1e-12.

One deliberate difference: when a set holds only one class (or no weight), the
entropy of its background rate is 0 and NE is undefined. TorchRec then returns
a meaningless huge number (a log loss divided by ~1e-12); c2al returns nan, so
a per-cohort table shows the hole instead of a fake value. `auc` and
`calibration` return nan in the same situations.

Retrieval metrics score a dense matrix `scores` [U, I] (U users, I items) against
binary relevance and average over users that have at least one relevant item.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchrec.metrics.ne import compute_cross_entropy, compute_ne, get_ne_states

from c2al.errors import C2ALError

EPS = 1e-12  # TorchRec's NEMetricComputation.eta

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]
# Binary relevance / exclusion: a boolean matrix [U, I] or one iterable of item ids per user.
ItemSets = Union[np.ndarray, torch.Tensor, Sequence[Iterable[int]]]

__all__ = [
    "auc",
    "calibration",
    "logloss",
    "ndcg_at_k",
    "ne",
    "ne_diff_pct",
    "per_segment",
    "positive_label_ratio",
    "recall_at_k",
    "segmented_ne",
    "summarize",
]


# ---------------------------------------------------------------- input checks


def _as_1d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise C2ALError(f"metrics: `{name}` must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise C2ALError(f"metrics: `{name}` contains nan or inf")
    return a


def _labels_weights(labels: ArrayLike, weights: Optional[ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 copies of (labels, weights); weights default to 1."""
    y = _as_1d(labels, "labels")
    w = np.ones_like(y) if weights is None else _as_1d(weights, "weights")
    if len(w) != len(y):
        raise C2ALError(f"metrics: `labels` and `weights` differ in length ({len(y)}, {len(w)})")
    if np.any((y < 0) | (y > 1)):
        raise C2ALError("metrics: `labels` must lie in [0, 1]")
    if np.any(w < 0):
        raise C2ALError("metrics: `weights` must be non-negative")
    return y, w


def _inputs(
    preds: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 copies of (preds, labels, weights); weights default to 1."""
    p = _as_1d(preds, "preds")
    y, w = _labels_weights(labels, weights)
    if len(p) != len(y):
        raise C2ALError(f"metrics: `preds` and `labels` differ in length ({len(p)}, {len(y)})")
    # Out-of-range predictions are almost always logits passed by mistake.
    if np.any((p < 0) | (p > 1)):
        raise C2ALError("metrics: `preds` must be probabilities in [0, 1] (were logits passed?)")
    return p, y, w


def _as_ids(segments: ArrayLike, n: int, n_segments: int) -> np.ndarray:
    """Validated integer segment ids [N]."""
    if isinstance(segments, torch.Tensor):
        segments = segments.detach().cpu().numpy()
    seg = np.asarray(segments)
    if seg.shape != (n,) or not (n == 0 or np.issubdtype(seg.dtype, np.integer)):
        raise C2ALError(f"metrics: `segments` must be {n} integer ids, got {seg.dtype} of shape {seg.shape}")
    if n_segments < 1:
        raise C2ALError(f"metrics: `n_segments` must be >= 1, got {n_segments}")
    return seg.astype(np.int64)


def _ne_from_sums(
    ce_sum: torch.Tensor, wsum: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, eps: float
) -> torch.Tensor:
    """TorchRec's NE from summed states, nan where the background entropy is 0."""
    value = compute_ne(ce_sum, wsum, pos, neg, eps)
    return torch.where((pos > 0) & (neg > 0), value, torch.full_like(value, math.nan))


# ---------------------------------------------------------------- ranking metrics


def ne(
    preds: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike] = None, eps: float = EPS
) -> float:
    """Normalized entropy: mean log loss / entropy of the samples' own positive rate.

    Args:
        preds: [N] predicted probabilities.
        labels: [N] labels in [0, 1].
        weights: [N] non-negative sample weights; all 1 when None.
        eps: clamp for predictions and the background rate (TorchRec's eta).

    Returns:
        NE as a float; below 1 beats predicting the background rate. nan when the
        (weighted) samples hold only one class or no weight at all.

    Example:
        >>> round(ne([0.75, 0.75, 0.25, 0.25], [1, 1, 0, 0]), 4)  # log2(4/3)
        0.415
    """
    p, y, w = _inputs(preds, labels, weights)
    # torch.tensor copies, so TorchRec's in-place clamp never touches the caller's data.
    states = get_ne_states(torch.tensor(y), torch.tensor(p), torch.tensor(w), eps)
    value = _ne_from_sums(
        states["cross_entropy_sum"],
        states["weighted_num_samples"],
        states["pos_labels"],
        states["neg_labels"],
        eps,
    )
    return float(value)


def logloss(
    preds: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike] = None, eps: float = EPS
) -> float:
    """Weighted mean binary cross-entropy in nats (natural log, as `torch.nn.BCELoss`).

    TorchRec's `include_logloss` reports the same quantity in bits: divide by ln 2.

    Args:
        preds: [N] predicted probabilities.
        labels: [N] labels in [0, 1].
        weights: [N] non-negative sample weights; all 1 when None.
        eps: clamp for predictions.

    Returns:
        The mean log loss; nan when the total weight is 0.

    Example:
        >>> round(logloss([0.5, 0.5], [1, 0]), 4)  # ln 2
        0.6931
    """
    p, y, w = _inputs(preds, labels, weights)
    if w.sum() <= 0:
        return math.nan
    ce_bits = compute_cross_entropy(torch.tensor(y), torch.tensor(p), torch.tensor(w), eps)
    return float(ce_bits.sum()) * math.log(2.0) / float(w.sum())


def auc(preds: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike] = None) -> float:
    """Area under the ROC curve (scikit-learn's `roc_auc_score`).

    Args:
        preds: [N] scores (any monotone transform gives the same AUC).
        labels: [N] binary labels.
        weights: [N] non-negative sample weights; all 1 when None.

    Returns:
        The AUC; nan when either class has no weight (one-class set).

    Example:
        >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    p, y, w = _inputs(preds, labels, weights)
    if not np.all((y == 0) | (y == 1)):
        raise C2ALError("metrics: `labels` must be 0 or 1 for auc")
    keep = w > 0
    p, y, w = p[keep], y[keep], w[keep]
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, p, sample_weight=w))


def calibration(preds: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike] = None) -> float:
    """Mean prediction over the base rate: sum(w * p) / sum(w * y); 1 is calibrated.

    Args:
        preds: [N] predicted probabilities.
        labels: [N] labels in [0, 1].
        weights: [N] non-negative sample weights; all 1 when None.

    Returns:
        The ratio; nan when there is no positive weight (TorchRec returns 0 there).

    Example:
        >>> calibration([0.25, 0.5], [0, 1])
        0.75
    """
    p, y, w = _inputs(preds, labels, weights)
    pos = float((w * y).sum())
    return float((w * p).sum()) / pos if pos > 0 else math.nan


def positive_label_ratio(labels: ArrayLike, weights: Optional[ArrayLike] = None) -> float:
    """Weighted share of positives (PLR): sum(w * y) / sum(w).

    Args:
        labels: [N] labels in [0, 1].
        weights: [N] non-negative sample weights; all 1 when None.

    Returns:
        The ratio; nan when the total weight is 0.

    Example:
        >>> positive_label_ratio([1, 0, 0, 0])
        0.25
    """
    y, w = _labels_weights(labels, weights)
    total = float(w.sum())
    return float((w * y).sum()) / total if total > 0 else math.nan


def segmented_ne(
    preds: ArrayLike,
    labels: ArrayLike,
    segments: ArrayLike,
    n_segments: int,
    weights: Optional[ArrayLike] = None,
    eps: float = EPS,
) -> np.ndarray:
    """NE of each segment, each from its own samples and its own background rate.

    Equals `ne` on each segment's subset, and TorchRec's `SegmentedNEMetric` for
    ids in range. Unlike TorchRec, ids outside [0, n_segments) (e.g. -1, "in no
    cohort") are ignored rather than wrapped or rejected.

    Args:
        preds: [N] predicted probabilities.
        labels: [N] labels in [0, 1].
        segments: [N] integer segment ids.
        n_segments: number of segments S.
        weights: [N] non-negative sample weights; all 1 when None.
        eps: clamp for predictions and background rates.

    Returns:
        float64 [S]; nan for empty or one-class segments.

    Example:
        >>> segmented_ne([0.75, 0.25, 0.5, 0.5], [1, 0, 1, 0], [0, 0, 1, -1], 2).round(4)
        array([0.415,   nan])
    """
    p, y, w = _inputs(preds, labels, weights)
    seg = _as_ids(segments, len(p), n_segments)
    keep = (seg >= 0) & (seg < n_segments)
    idx = torch.as_tensor(seg[keep], dtype=torch.long)
    y_t, w_t = torch.tensor(y[keep]), torch.tensor(w[keep])
    ce = compute_cross_entropy(y_t, torch.tensor(p[keep]), w_t, eps)  # [N'] bits

    def per_seg(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_segments, dtype=torch.float64).index_add_(0, idx, values)

    value = _ne_from_sums(per_seg(ce), per_seg(w_t), per_seg(w_t * y_t), per_seg(w_t * (1 - y_t)), eps)
    return value.numpy()


def summarize(
    preds: ArrayLike, labels: ArrayLike, weights: Optional[ArrayLike] = None
) -> dict[str, float]:
    """All ranking metrics of one set of samples.

    Args:
        preds: [N] predicted probabilities.
        labels: [N] binary labels.
        weights: [N] non-negative sample weights; all 1 when None.

    Returns:
        {"ne", "auc", "logloss", "calibration", "plr", "n"}; n is the sample count.

    Example:
        >>> summarize([0.75, 0.25], [1, 0])["auc"]
        1.0
    """
    return {
        "ne": ne(preds, labels, weights),
        "auc": auc(preds, labels, weights),
        "logloss": logloss(preds, labels, weights),
        "calibration": calibration(preds, labels, weights),
        "plr": positive_label_ratio(labels, weights),
        "n": len(_as_1d(preds, "preds")),
    }


def per_segment(
    preds: ArrayLike,
    labels: ArrayLike,
    segments: ArrayLike,
    n_segments: int,
    weights: Optional[ArrayLike] = None,
) -> list[dict[str, float]]:
    """One row of metrics per segment, for cohort tables.

    Args:
        preds: [N] predicted probabilities.
        labels: [N] binary labels.
        segments: [N] integer segment ids; ids outside [0, n_segments) are ignored.
        n_segments: number of segments S.
        weights: [N] non-negative sample weights; all 1 when None.

    Returns:
        S dicts with "id", "n" (sample count), "share" (n over all N samples,
        ignored ids included), "plr", "ne" and "auc"; metrics that are undefined
        for a segment (empty, one class) are nan.

    Example:
        >>> [r["n"] for r in per_segment([0.5, 0.5, 0.5], [1, 0, 1], [0, 0, 1], 2)]
        [2, 1]
    """
    p, y, w = _inputs(preds, labels, weights)
    seg_ne = segmented_ne(p, y, segments, n_segments, w)
    seg = _as_ids(segments, len(p), n_segments)
    rows = []
    for s in range(n_segments):
        m = seg == s
        n = int(m.sum())
        rows.append(
            {
                "id": s,
                "n": n,
                "share": n / len(p) if len(p) else math.nan,
                "plr": positive_label_ratio(y[m], w[m]),
                "ne": float(seg_ne[s]),
                "auc": auc(p[m], y[m], w[m]),
            }
        )
    return rows


def ne_diff_pct(ne_new: float, ne_base: float) -> float:
    """Relative NE change in percent, (ne_new - ne_base) / ne_base * 100; negative is better.

    Args:
        ne_new: NE of the candidate (e.g. C2AL).
        ne_base: NE of the baseline.

    Returns:
        The change in percent; nan when ne_base is 0 or either input is nan.

    Example:
        >>> round(ne_diff_pct(0.99, 1.0), 6)
        -1.0
    """
    if ne_base == 0 or math.isnan(ne_base) or math.isnan(ne_new):
        return math.nan
    return (ne_new - ne_base) / ne_base * 100.0


# ---------------------------------------------------------------- retrieval metrics


def _as_mask(x: ItemSets, shape: tuple[int, int], name: str) -> torch.Tensor:
    """A bool [U, I] mask from a matrix or from one iterable of item ids per user."""
    n_users, n_items = shape
    if isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 2:
        m = torch.as_tensor(x)
        if tuple(m.shape) != shape:
            raise C2ALError(f"metrics: `{name}` has shape {tuple(m.shape)}, expected {shape} like `scores`")
        return m.to(torch.bool)
    if len(x) != n_users:
        raise C2ALError(f"metrics: `{name}` has {len(x)} users, `scores` has {n_users}")
    rows = [np.fromiter((int(i) for i in items), dtype=np.int64) for items in x]
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_items):
        raise C2ALError(f"metrics: `{name}` holds item ids outside [0, {n_items})")
    users = np.repeat(np.arange(n_users), [len(r) for r in rows])
    m = torch.zeros(shape, dtype=torch.bool)
    m[torch.as_tensor(users), torch.as_tensor(flat)] = True
    return m


def _topk_hits(
    scores: Union[np.ndarray, torch.Tensor], relevant: ItemSets, k: int, exclude: Optional[ItemSets]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of each user's top-k items [U, k] and each user's relevant count [U]."""
    s = torch.as_tensor(scores).detach().cpu().to(torch.float64)
    if s.ndim != 2:
        raise C2ALError(f"metrics: `scores` must be [users, items], got shape {tuple(s.shape)}")
    if torch.isnan(s).any():
        raise C2ALError("metrics: `scores` contains nan")
    if k < 1:
        raise C2ALError(f"metrics: `k` must be >= 1, got {k}")
    shape = (s.shape[0], s.shape[1])
    rel = _as_mask(relevant, shape, "relevant")
    if exclude is not None:
        ex = _as_mask(exclude, shape, "exclude")
        s = s.masked_fill(ex, -math.inf)
        # An excluded item cannot be recommended, so it is not counted as relevant either.
        rel = rel & ~ex
    top = torch.topk(s, min(k, shape[1]), dim=1).indices  # [U, k]; tie order unspecified
    return torch.gather(rel, 1, top), rel.sum(dim=1)


def recall_at_k(
    scores: Union[np.ndarray, torch.Tensor],
    relevant: ItemSets,
    k: int,
    exclude: Optional[ItemSets] = None,
) -> float:
    """Mean over users of (relevant items in the top k) / (number of relevant items).

    The denominator is the full |relevant| (the usual recall@K), so a user with
    more than k relevant items cannot reach 1.

    Args:
        scores: [U, I] higher is better.
        relevant: bool [U, I], or one iterable of relevant item ids per user.
        k: cut-off.
        exclude: same forms as `relevant`; items (e.g. seen in training) that are
            never recommended and are dropped from the relevant sets.

    Returns:
        The mean over users with at least one relevant item; nan if there are none.

    Example:
        >>> recall_at_k(np.array([[0.9, 0.1, 0.5]]), [{1, 2}], k=2)
        0.5
    """
    hits, n_rel = _topk_hits(scores, relevant, k, exclude)
    users = n_rel > 0
    if not users.any():
        return math.nan
    per_user = hits.sum(dim=1)[users].double() / n_rel[users].double()
    return float(per_user.mean())


def ndcg_at_k(
    scores: Union[np.ndarray, torch.Tensor],
    relevant: ItemSets,
    k: int,
    exclude: Optional[ItemSets] = None,
) -> float:
    """Mean over users of binary-relevance NDCG@k.

    DCG = sum over ranks r = 1..k of rel_r / log2(r + 1); the ideal DCG puts
    min(k, |relevant|) relevant items at the top.

    Args:
        scores: [U, I] higher is better.
        relevant: bool [U, I], or one iterable of relevant item ids per user.
        k: cut-off.
        exclude: as in `recall_at_k`.

    Returns:
        The mean over users with at least one relevant item; nan if there are none.

    Example:
        >>> round(ndcg_at_k(np.array([[0.9, 0.1, 0.5]]), [{2}], k=2), 4)  # 1 / log2(3)
        0.6309
    """
    hits, n_rel = _topk_hits(scores, relevant, k, exclude)
    users = n_rel > 0
    if not users.any():
        return math.nan
    discount = 1.0 / torch.log2(torch.arange(2, hits.shape[1] + 2, dtype=torch.float64))  # [k]
    dcg = (hits.double() * discount).sum(dim=1)
    ideal = torch.cumsum(discount, 0)[n_rel.clamp(max=hits.shape[1]).clamp(min=1) - 1]
    return float((dcg[users] / ideal[users]).mean())
