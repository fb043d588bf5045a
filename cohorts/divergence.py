"""Divergences between 1-D distributions, computed from histograms.

The miner compares, for every candidate cohort, the distribution of the
baseline's predicted probabilities inside the cohort with the one outside it.
Doing that per candidate on raw samples would cost a sort per candidate; instead
every sample is put once into a bin (`bin_index`), per-candidate histograms come
from one `np.bincount`, and the divergences below run on the [C, B] histograms
(C candidates, B bins) in one vectorized call.

Distributions are probability vectors along the last axis, over the same
ordered support points. Logarithms are natural, so JS lies in [0, ln 2].
"""
from __future__ import annotations

import numpy as np

METRICS = ("js", "kl", "wasserstein")
SMOOTHING = 0.5  # Jeffreys pseudo-count per bin: tiny cohorts are shrunk toward uniform


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Kullback-Leibler divergence KL(p || q) along the last axis.

    Args:
        p: probabilities [..., B]; zeros contribute nothing (0 log 0 = 0).
        q: probabilities [..., B]; must be positive wherever p is.

    Returns:
        Divergences [...] in nats.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    ratio = np.divide(p, q, out=np.ones(np.broadcast_shapes(p.shape, q.shape)), where=p > 0)
    return np.sum(p * np.log(ratio), axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence along the last axis (symmetric, at most ln 2).

    Args:
        p: probabilities [..., B].
        q: probabilities [..., B].

    Returns:
        Divergences [...] in nats.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def wasserstein_distance(p: np.ndarray, q: np.ndarray, support: np.ndarray) -> np.ndarray:
    """1-Wasserstein distance between distributions on sorted support points.

    In one dimension W1 is the area between the two CDFs, which between support
    points is a constant gap times the gap between the points.

    Args:
        p: probabilities [..., B].
        q: probabilities [..., B].
        support: increasing positions of the B support points.

    Returns:
        Distances [...] in the units of `support`.
    """
    gap = np.abs(np.cumsum(p, axis=-1) - np.cumsum(q, axis=-1))[..., :-1]
    return np.sum(gap * np.diff(np.asarray(support, dtype=np.float64)), axis=-1)


def to_probabilities(counts: np.ndarray, alpha: float = 0.0, prior: np.ndarray | None = None) -> np.ndarray:
    """Normalize histograms [..., B] to probabilities after adding pseudo-counts.

    Args:
        counts: histograms [..., B].
        alpha: pseudo-count per bin on average; 0 for plain frequencies.
        prior: how the alpha * B pseudo-counts spread over bins [B] (uniform if None).
            The pooled distribution is the right prior for a cohort: with little
            evidence a small cohort then looks like everyone, not like uniform noise.

    Returns:
        Probabilities [..., B]; an empty histogram becomes the prior (uniform) rather
        than NaN, so a candidate covering every sample (empty "outside") needs no special case.
    """
    n_bins = np.shape(counts)[-1]
    prior = np.full(n_bins, 1.0 / n_bins) if prior is None else np.asarray(prior, dtype=np.float64) / np.sum(prior)
    counts = np.asarray(counts, dtype=np.float64) + alpha * n_bins * prior
    total = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, total, out=np.broadcast_to(prior, counts.shape).copy(), where=total > 0)


def divergence(metric: str, p_counts: np.ndarray, q_counts: np.ndarray,
               support: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """Divergence between the histograms p_counts and q_counts [..., B].

    js and kl smooth the counts with `SMOOTHING` pseudo-counts per bin toward
    `prior` first (a cohort of 20 samples would otherwise get an infinite KL from
    one empty bin); wasserstein uses the raw frequencies. kl is KL(p || q).

    Args:
        metric: one of `METRICS`.
        p_counts: counts [..., B].
        q_counts: counts [..., B], broadcastable against p_counts.
        support: positions of the B bins (used by wasserstein only).
        prior: smoothing target [B], e.g. the pooled histogram; uniform if None.

    Returns:
        Divergences [...].
    """
    if metric == "wasserstein":
        return wasserstein_distance(to_probabilities(p_counts), to_probabilities(q_counts), support)
    p, q = to_probabilities(p_counts, SMOOTHING, prior), to_probabilities(q_counts, SMOOTHING, prior)
    if metric == "js":
        return js_divergence(p, q)
    if metric == "kl":
        return kl_divergence(p, q)
    raise ValueError(f"unknown divergence {metric!r}; expected one of {METRICS}")


def contrast(metric: str, counts_in: np.ndarray, total: np.ndarray,
             support: np.ndarray) -> np.ndarray:
    """Divergence of each candidate's histogram against the rest of the samples.

    Args:
        metric: one of `METRICS`.
        counts_in: per-candidate histograms [C, B].
        total: histogram of all samples [B]; outside = total - inside. Also the smoothing prior.
        support: positions of the B bins.

    Returns:
        Contrast [C]: divergence(inside, outside).
    """
    return divergence(metric, counts_in, total[None, :] - counts_in, support, prior=total)


def pairwise(metric: str, counts: np.ndarray, support: np.ndarray,
             prior: np.ndarray | None = None) -> np.ndarray:
    """Divergence between every pair of histograms, symmetrized.

    kl is averaged over both directions so that the pair (a, b) scores the same
    as (b, a); js and wasserstein are symmetric already.

    Args:
        metric: one of `METRICS`.
        counts: histograms [C, B].
        support: positions of the B bins.
        prior: smoothing target [B] (see `divergence`).

    Returns:
        Matrix [C, C] with a zero diagonal.
    """
    # one row at a time keeps memory at [C, B] instead of [C, C, B]
    d = np.zeros((len(counts), len(counts)))
    for i, row in enumerate(counts):
        d[i] = divergence(metric, row[None, :], counts, support, prior)
    return 0.5 * (d + d.T) if metric == "kl" else d


def bin_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges at the pooled quantiles of `values` (at most n_bins - 1).

    Quantile edges rather than a uniform grid on [0, 1]: ad click models put
    most predictions below a few percent, where a uniform grid would see one bin.
    """
    inner = np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return np.unique(inner)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value given inner edges: bin i holds edges[i-1] <= v < edges[i]."""
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def bin_support(values: np.ndarray, index: np.ndarray, n_bins: int) -> np.ndarray:
    """Position of each bin: the mean of the values that fell in it.

    Means, not edge midpoints, so the binned Wasserstein distance stays close
    to the exact one even in wide tail bins. An empty bin (ties at an edge)
    gets 0; its position cancels out of the Wasserstein sum since no mass sits there.
    """
    sums = np.bincount(index, weights=values, minlength=n_bins)
    counts = np.bincount(index, minlength=n_bins)
    return sums / np.maximum(counts, 1)
