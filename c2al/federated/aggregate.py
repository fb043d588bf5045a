"""Aggregation maths as small pure functions on numpy arrays and weights.

Like Flower's `flwr.server.strategy.aggregate`, nothing here knows about
models, clients or rounds: strategies call these, and tests call them with
hand-computed arrays. Updates are deltas (client weights minus the global
weights they started from); embedding tables travel as (row ids, row deltas)
so a client that touched 30 rows of a million-row table sends 30 rows.

Robust rules (median, trimmed mean, Krum) call Flower's own functions
(`flwr.server.strategy.aggregate`, `flwr.serverapp.strategy`); what Flower
lacks is written here: the same rules row-wise over sparse table updates,
norm clipping, and capping the example counts clients report.

Letters: C clients, R rows of a table, U rows some client sent, D embedding dim,
P entries of a whole update, T tiers.
"""
from __future__ import annotations

from itertools import combinations
from types import ModuleType
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


def cap_counts(counts: Sequence[float], *, median_multiple: float = 5.0, bound: float = 0.0) -> np.ndarray:
    """The example counts the server weights clients by: reported counts, capped by what it knows.

    FedAvg weights a client by the examples it says it trained on, so one
    client reporting 10^9 would set the global model alone. Each count is
    capped at `bound` (the most examples the step budget the server handed
    out allows: steps x local batch size) and at `median_multiple` times the
    round's median reported count: a liar then weighs at most that multiple
    of a typical client, as long as fewer than half the round's clients lie.

    Args:
        counts: reported examples per client [C].
        median_multiple: cap as a multiple of the round's median count (0: no such cap).
        bound: a cap the server knows for every client (0: none).

    Returns:
        float64 [C], each <= the caps.

    Example:
        >>> cap_counts([10, 20, 30, 10**9], median_multiple=2.0).tolist()
        [10.0, 20.0, 30.0, 50.0]
        >>> cap_counts([10, 20, 30], bound=15).tolist()
        [10.0, 15.0, 15.0]
    """
    c = np.asarray(counts, dtype=np.float64)
    if median_multiple < 0 or bound < 0:
        raise C2ALError(f"cap_counts: median_multiple and bound must be >= 0, got {median_multiple}, {bound}")
    if median_multiple > 0 and len(c):
        c = np.minimum(c, median_multiple * np.median(c))
    return np.minimum(c, bound) if bound > 0 else c


def _flower(module: str) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise C2ALError("--aggregation median, trimmed-mean and krum use Flower's aggregation functions: "
                        "pip install .[flower] (flwr 1.41)") from None


def coordinatewise(arrays: Sequence[np.ndarray], rule: str, trim_fraction: float = 0.2) -> np.ndarray:
    """Per-coordinate median or trimmed mean of C arrays of one shape, by Flower's functions.

    Both ignore example counts (one client, one vote), so a lying count cannot sway them.

    Args:
        arrays: C arrays of one shape.
        rule: "median" or "trimmed-mean" (cuts int(trim_fraction * C) values from each end).
        trim_fraction: share cut from each end, in [0, 0.5).

    Returns:
        float64 array of that shape.

    Example:
        >>> coordinatewise([np.array([1.0]), np.array([2.0]), np.array([100.0])], "median").tolist()
        [2.0]
        >>> coordinatewise([np.array([v]) for v in (-50.0, 1.0, 2.0, 3.0, 90.0)], "trimmed-mean", 0.2).tolist()
        [2.0]
    """
    fa = _flower("flwr.server.strategy.aggregate")
    results = [([np.asarray(a, dtype=np.float64)], 1) for a in arrays]
    if rule == "median":
        return fa.aggregate_median(results)[0]
    if rule == "trimmed-mean":
        if not 0 <= trim_fraction < 0.5:
            raise C2ALError(f"--trim-fraction must lie in [0, 0.5), got {trim_fraction}")
        return fa.aggregate_trimmed_avg(results, trim_fraction)[0]
    raise C2ALError(f"coordinatewise: rule must be median or trimmed-mean, got {rule!r}")


def stack_rows(ids: Sequence[np.ndarray], rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clients' sparse row deltas on a common grid: the union of the rows any of them sent.

    Args:
        ids: per client, its distinct row ids [R_c].
        rows: per client, its deltas of those rows [R_c, D].

    Returns:
        (union ids [U] sorted, values [C, U, D] zero where a client sent no row, sent [C, U] bool).

    Example:
        >>> u, v, sent = stack_rows([np.array([3]), np.array([1, 3])], [np.ones((1, 1)), np.full((2, 1), 2.0)])
        >>> u.tolist(), v[..., 0].tolist(), sent.tolist()
        ([1, 3], [[0.0, 1.0], [2.0, 2.0]], [[False, True], [True, True]])
    """
    union = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])) if len(ids) else np.zeros(0, np.int64)
    dim = int(np.shape(rows[0])[1]) if len(rows) else 0
    values = np.zeros((len(ids), len(union), dim))
    sent = np.zeros((len(ids), len(union)), dtype=bool)
    for c, (i, r) in enumerate(zip(ids, rows)):
        pos = np.searchsorted(union, np.asarray(i, dtype=np.int64))
        values[c, pos] = np.asarray(r, dtype=np.float64)
        sent[c, pos] = True
    return union, values, sent


def rowwise(ids: Sequence[np.ndarray], rows: Sequence[np.ndarray], rule: str,
            trim_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """`coordinatewise` per table row, over the clients that sent that row, after a row norm clip.

    As in `rowwise_mean`, a client that never saw item i has no vote on item
    i, so a row's vote is small: a rare item is sent by one or two clients,
    and two attackers among three or four senders set its median. So each
    client's row delta is first clipped to the median norm of all row deltas
    of the round (over every client and row): no client moves an item further
    than an honest client typically does, and the rule then decides the
    direction. Rows sent by the same number k of clients go to Flower's
    function together, as k arrays [R_k, D].

    Args:
        ids: per client, its distinct row ids [R_c].
        rows: per client, its deltas of those rows [R_c, D].
        rule: "median" or "trimmed-mean".
        trim_fraction: share cut from each end of every row's k values.

    Returns:
        (ids [U] sorted, aggregated deltas [U, D]).

    Example (row norms 5, 1, 2, 900: every row is clipped to their median 3.5; row 1 is then
    median(1, 2, 3.5), row 0, sent by one client, its clipped 3.5):
        >>> i, v = rowwise([np.array([0, 1]), np.array([1]), np.array([1])],
        ...                [np.array([[5.0], [1.0]]), np.array([[2.0]]), np.array([[900.0]])], "median")
        >>> i.tolist(), v.ravel().tolist()
        ([0, 1], [3.5, 2.0])
    """
    union, values, sent = stack_rows(ids, rows)
    out = np.zeros(values.shape[1:])
    if not sent.any():
        return union, out
    norms = np.linalg.norm(values, axis=2, keepdims=True)  # [C, U, 1]
    cap = float(np.median(norms[sent]))
    values = values * np.where(norms > cap, cap / np.maximum(norms, 1e-300), 1.0)
    count = sent.sum(0)  # [U] clients per row
    for k in np.unique(count):
        cols = np.flatnonzero(count == k)
        who = np.argsort(~sent[:, cols], axis=0, kind="stable")[:k]  # [k, R_k]: each row's senders first
        out[cols] = coordinatewise(list(values[who, cols[None, :]]), rule, trim_fraction)  # k x [R_k, D]
    return union, out


def flat_updates(dense: Sequence[Sequence[np.ndarray]],
                 tables: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]]) -> np.ndarray:
    """Each client's whole update as one vector: dense parameters, then every table on its `stack_rows` grid.

    Args:
        dense: per dense parameter, the C clients' deltas.
        tables: per table, (C clients' row ids, C clients' row deltas).

    Returns:
        float64 [C, P]; rows a client did not send are 0, so distances and norms are those of
        the full tables' updates.

    Example:
        >>> flat_updates([[np.array([1.0]), np.array([2.0])]], [([np.array([4]), np.array([])],
        ...              [np.array([[3.0]]), np.zeros((0, 1))])]).tolist()
        [[1.0, 3.0], [2.0, 0.0]]
    """
    parts = [np.stack([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) for arrays in dense]
    for ids, rows in tables:
        _, values, _ = stack_rows(ids, rows)
        parts.append(values.reshape(len(values), -1))
    return np.concatenate(parts, axis=1)


def clip_factors(norms: Sequence[float], clip_norm: float = 0.0) -> tuple[np.ndarray, float]:
    """Scale factors min(1, c / |u_c|) that clip each client's update norm to c.

    Args:
        norms: L2 norm of each client's whole update [C].
        clip_norm: c; 0 takes the round's median norm, so the threshold follows the
            honest majority's scale without tuning (a median-based clip).

    Returns:
        (factors [C], the threshold c used).

    Example:
        >>> f, c = clip_factors([1.0, 2.0, 4.0]); f.tolist(), c
        ([1.0, 1.0, 0.5], 2.0)
        >>> clip_factors([0.0, 4.0], 2.0)[0].tolist()
        [1.0, 0.5]
    """
    n = np.asarray(norms, dtype=np.float64)
    if clip_norm < 0:
        raise C2ALError(f"--clip-norm must be >= 0, got {clip_norm}")
    c = float(clip_norm or np.median(n))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > c, c / n, 1.0), c


def krum_select(vectors: np.ndarray, f: int, m: int) -> np.ndarray:
    """The m updates Flower's (Multi-)Krum keeps (Blanchard et al. 2017, El Mhamdi et al. 2018).

    Each client is scored by the summed squared distance to its C - f - 2 nearest
    others; the m lowest scores are kept. Flower's `select_multikrum` returns the
    kept updates themselves; here it picks from record dicts whose identity says
    which client each is, so the caller can average the kept clients' sparse rows too.

    Args:
        vectors: whole updates [C, P] (`flat_updates`).
        f: Byzantine clients assumed.
        m: updates kept (1: Krum).

    Returns:
        sorted indices of the kept clients [m].

    Example:
        >>> krum_select(np.array([[0.0], [0.1], [0.3], [50.0]]), f=1, m=2).tolist()
        [0, 1]
    """
    rec = _flower("flwr.app")
    mk = _flower("flwr.serverapp.strategy.multikrum")
    contents = [rec.RecordDict({"update": rec.ArrayRecord([v])}) for v in np.asarray(vectors, dtype=np.float64)]
    where = {id(c): i for i, c in enumerate(contents)}
    kept = mk.select_multikrum(contents, num_malicious_nodes=int(f), num_nodes_to_select=int(m))
    return np.sort([where[id(c)] for c in kept])


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


def fedyogi_step(param: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, *,
                 lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedYogi (Reddi et al. 2021, Algorithm 2), as Flower's FedYogi: Adam's m with Yogi's additive v.

    m = b1 m + (1 - b1) delta; v = v - (1 - b2) delta^2 sign(v - delta^2);
    param += lr * m / (sqrt(v) + tau). v moves toward delta^2 by a step that does not
    grow with v, so a burst of large updates raises the denominator slowly and it
    decays slowly after (Adam's v follows delta^2 multiplicatively).

    Args:
        param, delta, m, v: arrays of one shape (rows of a table, or a dense tensor).
        lr: server learning rate eta; tau: adaptivity.

    Returns:
        (new param, new m, new v).

    Example:
        >>> p, m, v = fedyogi_step(np.zeros(1), np.array([0.5]), np.zeros(1), np.zeros(1), lr=0.1, tau=0.0)
        >>> [round(float(x), 6) for x in (p[0], m[0], v[0])]  # m = 0.05, v = 0.0025: one step of lr
        [0.1, 0.05, 0.0025]
    """
    sq = delta * delta
    m = beta1 * m + (1.0 - beta1) * delta
    v = v - (1.0 - beta2) * sq * np.sign(v - sq)
    return param + lr * m / (np.sqrt(v) + tau), m, v


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
