"""Sampled-candidate ranking metrics (HR@K, NDCG@K over 1 positive + N negatives) and loss-landscape sharpness.

HR@K / NDCG@K as NCF and FedRecGEL report them: each user's held-out positive is ranked among
its sampled negatives; HR@K = 1 if its rank (0-based) is below K, NDCG@K = 1 / log2(rank + 2)
then, else 0; both averaged over users. A negative scoring the same as the positive counts as
ranked above it (a constant model earns nothing).

Sharpness as the papers on flat minima plot it (Li et al. 2018's random directions): the drop
of a quality under random perturbations of a set of parameters, each tensor moved by a Gaussian
direction scaled to `radius` times the tensor's own norm, averaged over seeded draws.

Letters: U users, Q = 1 + N candidates.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def candidate_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of column 0 (the positive) among each row's candidates.

    Args:
        scores: [U, Q], column 0 the positive.

    Returns:
        [U] the number of negatives scoring at least as high as the positive.

    Example:
        >>> candidate_ranks(np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.2]])).tolist()
        [0, 2]
    """
    return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def hr_ndcg(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of 0-based ranks.

    Example:
        >>> {m: round(v, 4) for m, v in hr_ndcg(np.array([0, 1, 10]), k=10).items()}
        {'hr@10': 0.6667, 'ndcg@10': 0.5436}
    """
    ranks = np.asarray(ranks)
    hit = ranks < k
    gain = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(gain.mean())}


@torch.no_grad()
def sharpness(params: Sequence[torch.Tensor], quality: Callable[[], dict[str, float]], radii: Sequence[float],
              draws: int, seed: int) -> dict[str, dict[str, float]]:
    """Mean drop of each quality under random relative perturbations of `params`.

    Args:
        params: the tensors to perturb (restored exactly afterwards).
        quality: name -> value, higher is better (pass a loss negated).
        radii: relative radii r: each tensor moves by d |p| / |d|, d ~ N(0, I), times r.
        draws: perturbations per radius (seeded by `seed` and the draw's number).
        seed: seed of the directions.

    Returns:
        {str(r): {name: mean over draws of quality(p) - quality(p + e)}}; 0 for a flat quality.

    Example:
        >>> w = torch.ones(3)
        >>> sharpness([w], lambda: {"q": 1.0}, [0.1], 2, 0), w.tolist()
        ({'0.1': {'q': 0.0}}, [1.0, 1.0, 1.0])
    """
    base = quality()
    saved = [p.detach().clone() for p in params]
    out = {}
    for r in radii:
        drops: dict[str, list[float]] = {name: [] for name in base}
        for k in range(draws):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
            for p, p0 in zip(params, saved):
                d = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.copy_(p0 + d * (r * p0.norm() / d.norm().clamp_min(1e-12)))
            moved = quality()
            for name in base:
                drops[name].append(base[name] - moved[name])
        for p, p0 in zip(params, saved):
            p.copy_(p0)
        out[str(r)] = {name: float(np.mean(v)) for name, v in drops.items()}
    return out
