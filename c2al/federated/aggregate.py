"""Aggregation maths as small pure functions on numpy arrays and weights.

Like Flower's `flwr.server.strategy.aggregate`, nothing here knows about
models, clients or rounds: strategies call these, and tests call them with
hand-computed arrays. Updates are deltas (client weights minus the global
weights they started from); embedding tables travel as (row ids, row deltas)
so a client that touched 30 rows of a million-row table sends 30 rows.

Letters: C clients, R rows of a table, D embedding dim, T tiers.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np

from c2al.errors import C2ALError


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg's core: sum_c w_c x_c / sum_c w_c.

    Args:
        arrays: C arrays of one shape.
        weights: C non-negative weights (examples each client trained on).

    Returns:
        The weighted mean, float64.

    Example:
        >>> weighted_mean([np.array([0.0, 2.0]), np.array([3.0, 5.0])], [1, 2]).tolist()
        [2.0, 4.0]
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(arrays) == 0 or len(arrays) != len(w):
        raise C2ALError(f"weighted_mean: {len(arrays)} arrays but {len(w)} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise C2ALError(f"weighted_mean: weights must be >= 0 with a positive sum, got {w.tolist()}")
    out = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for a, wc in zip(arrays, w):
        out += wc * np.asarray(a, dtype=np.float64)
    return out / w.sum()


def rowwise_mean(ids: Sequence[np.ndarray], rows: Sequence[np.ndarray], weights: Sequence[float],
                 n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of sparse row deltas, per row over the clients that touched it.

    A client that never saw item i says nothing about item i, so it does not
    pull item i's update toward zero (plain FedAvg over all C clients would
    divide a rare item's update by C).

    Args:
        ids: per client, the distinct row ids it sends [R_c].
        rows: per client, its deltas of those rows [R_c, D].
        weights: per client weight.
        n_rows: rows of the table.

    Returns:
        (ids [R] sorted, mean deltas [R, D]) over every row some client sent.

    Example:
        >>> i, v = rowwise_mean([np.array([0, 2]), np.array([2])], [np.ones((2, 1)), np.full((1, 1), 4.0)], [1, 3], 3)
        >>> i.tolist(), v.ravel().tolist()
        ([0, 2], [1.0, 3.25])
    """
    if not len(ids):
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    dim = int(np.shape(rows[0])[1])
    sums = np.zeros((n_rows, dim))
    wsum = np.zeros(n_rows)
    for i, r, w in zip(ids, rows, weights):
        i = np.asarray(i, dtype=np.int64)
        np.add.at(sums, i, w * np.asarray(r, dtype=np.float64))
        np.add.at(wsum, i, w)
    touched = np.flatnonzero(wsum > 0)
    return touched, sums[touched] / wsum[touched, None]


def fedavg_step(param: np.ndarray, delta: np.ndarray, lr: float = 1.0) -> np.ndarray:
    """Server SGD on the averaged delta; lr = 1 is plain FedAvg (the mean of client models)."""
    return param + lr * delta


def fedadam_step(param: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, t: int, *,
                 lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient -delta, as Flower's FedAdam.

    m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
    param += lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + tau).

    Args:
        param, delta, m, v: arrays of one shape (rows of a table, or a dense tensor).
        t: server step, 1 on the first aggregation.
        lr: server learning rate eta; tau: adaptivity (Reddi's epsilon).

    Returns:
        (new param, new m, new v).
    """
    m = beta1 * m + (1.0 - beta1) * delta
    v = beta2 * v + (1.0 - beta2) * delta * delta
    eta = lr * np.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    return param + eta * m / (np.sqrt(v) + tau), m, v


def check_update(name: str, value: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Why a client's array must be rejected, or None when it is fine.

    Args:
        name: parameter name, for the message.
        value: what the client sent.
        shape: the shape the server expects.

    Returns:
        A one-line reason ("wrong shape", "NaN", "Inf"), or None.
    """
    value = np.asarray(value)
    if tuple(value.shape) != tuple(shape):
        return f"{name}: shape {tuple(value.shape)}, expected {tuple(shape)}"
    if not np.issubdtype(value.dtype, np.number):
        return f"{name}: dtype {value.dtype} is not numeric"
    if np.isnan(value).any():
        return f"{name}: {int(np.isnan(value).sum())} NaN values"
    if not np.isfinite(value).all():
        return f"{name}: {int((~np.isfinite(value)).sum())} infinite values"
    return None


def relative_change(new: Sequence[float], base: Sequence[float]) -> np.ndarray:
    """(new - base) / base per entry, e.g. the NE change of C2AL over the baseline per tier."""
    new, base = np.asarray(new, dtype=np.float64), np.asarray(base, dtype=np.float64)
    return (new - base) / base


def mdac(new: Sequence[float], base: Sequence[float]) -> float:
    """RF^2's MDAC: the largest pairwise difference across tiers of the relative metric change.

    Args:
        new: metric per tier with the optimization (C2AL) [T].
        base: metric per tier without it (baseline) [T].

    Returns:
        max over tier pairs (a, b) of |r_a - r_b|, r = (new - base) / base; nan when
        fewer than two tiers have a finite change. Zero means every tier gained alike.

    Example:
        >>> round(mdac([0.9, 0.99, 1.0], [1.0, 1.0, 1.0]), 6)
        0.1
    """
    r = relative_change(new, base)
    r = r[np.isfinite(r)]
    if len(r) < 2:
        return float("nan")
    return float(max(abs(a - b) for a, b in combinations(r, 2)))
