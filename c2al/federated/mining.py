"""Federated cohort mining: no raw feature leaves a client.

The centralized `CohortMiner` clusters user features and contrasts each
cluster's baseline-prediction histogram with the rest. Here each step is a
sum over clients, which is all a server (or secure aggregation) ever sees:

1. encoding statistics: clients send (count, sum, sum of squares) of numeric
   columns and the set of values of categorical ones; the server forms the
   standardization and the one-hot vocabulary (as the miner's design matrix);
2. federated k-means (Lloyd): clients assign their rows to the current
   centroids and send per-cluster sums and counts [K, D], [K]; the server
   divides; an empty cluster is re-seeded next to the cluster of largest
   squared error (clients also send per-cluster squared errors [K]);
3. contrast: clients send a fine histogram [K, FINE] of the baseline's
   predictions on their validation rows (in their own cluster's row), plus
   per-bin sums of predictions and per-cluster positives; the server re-bins
   at the pooled quantiles, as the miner does, and scores each cluster with
   `cohorts.divergence.contrast` / `pairwise` and the miner's `select_cohorts`.

Clients then receive the centroids and the exposed clusters, compute their
own cohort id locally, and build auxiliary labels from it.

Letters: N rows, D encoded features, K clusters, B bins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from c2al.cohorts import divergence as dv
from c2al.cohorts.miner import SCORE_BINS, select_cohorts
from c2al.errors import C2ALError

FINE = 1000  # client histogram resolution on [0, 1]


@dataclass
class Encoding:
    """Standardization of numeric columns and vocabulary of categorical ones, from aggregates."""

    columns: list[str]
    kinds: list[str]
    stats: list[Any]  # [mean, std] or sorted values

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """A client's rows -> [N, D], the miner's standardized one-hot design."""
        parts = []
        for col, kind, st in zip(self.columns, self.kinds, self.stats):
            v = frame[col]
            if kind == "numeric":
                parts.append(((v.to_numpy(dtype=np.float64) - st[0]) / (st[1] or 1.0))[:, None])
                continue
            codes = pd.Categorical(v.astype(str).to_numpy(dtype=object), categories=st).codes.astype(np.int64)
            onehot = np.zeros((len(v), len(st)))
            seen = codes >= 0
            onehot[np.flatnonzero(seen), codes[seen]] = 1.0
            parts.append(onehot)
        return np.hstack(parts)


def client_column_stats(frame: pd.DataFrame) -> list[Any]:
    """What one client sends for the encoding: (n, sum, sumsq) or its set of values, per column."""
    out = []
    for _, v in frame.items():
        if pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v):
            x = v.to_numpy(dtype=np.float64)
            out.append(np.array([len(x), x.sum(), (x * x).sum()]))
        else:
            out.append(set(v.astype(str)))
    return out


def server_encoding(columns: list[str], client_stats: Sequence[list[Any]]) -> Encoding:
    """Combine the clients' column statistics into an Encoding."""
    kinds, stats = [], []
    for j, col in enumerate(columns):
        parts = [s[j] for s in client_stats]
        if isinstance(parts[0], set):
            kinds.append("categorical")
            stats.append(sorted(set().union(*parts)))
        else:
            n, s, ss = np.sum(parts, axis=0)
            mean = s / n
            kinds.append("numeric")
            stats.append([float(mean), float(np.sqrt(max(ss / n - mean * mean, 0.0)))])
    return Encoding(columns, kinds, stats)


def client_kmeans_step(Z: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign a client's rows [N, D] to centers [K, D]; send (sums [K, D], counts [K], squared errors [K])."""
    d2 = ((Z[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # [N, K]
    a = np.argmin(d2, axis=1)
    k = len(centers)
    sums = np.zeros_like(centers)
    np.add.at(sums, a, Z)
    return sums, np.bincount(a, minlength=k).astype(np.float64), np.bincount(a, weights=d2[np.arange(len(Z)), a], minlength=k)


def server_kmeans_step(centers: np.ndarray, sums: np.ndarray, counts: np.ndarray, sse: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """New centers from aggregated sums/counts; an empty cluster restarts near the worst one."""
    new = centers.copy()
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    for j in np.flatnonzero(~full):
        worst = int(np.argmax(np.where(full, sse / np.maximum(counts, 1), -np.inf)))
        spread = np.sqrt(sse[worst] / max(counts[worst], 1) / centers.shape[1])
        new[j] = new[worst] + rng.normal(scale=max(spread, 1e-3), size=centers.shape[1])
    return new


def federated_kmeans(client_data: Sequence[np.ndarray], k: int, *, iters: int = 50, init: np.ndarray | None = None,
                     seed: int = 0, n_init: int = 3, tol: float = 1e-8) -> tuple[np.ndarray, float]:
    """Lloyd's k-means where every step is a sum of client messages.

    Initial centers without raw data: drawn from N(mean, std) of the encoded
    columns (itself an aggregate); the best of `n_init` runs by total squared
    error is kept. With `init` given, one run from it (equals scikit-learn's
    KMeans(init=init, n_init=1, algorithm="lloyd") on the pooled rows).

    Args:
        client_data: each client's encoded rows [N_c, D].
        k: clusters.
        iters: Lloyd iterations at most.
        init: initial centers [K, D], or None.
        seed: RNG seed of initialization and re-seeding.
        n_init: random restarts without `init`.
        tol: stop when no center moves more than this (squared).

    Returns:
        (centers [K, D], inertia).
    """
    rng = np.random.default_rng(seed)
    d = client_data[0].shape[1]
    n = sum(len(z) for z in client_data)
    mean = sum(z.sum(0) for z in client_data) / n
    std = np.sqrt(np.maximum(sum((z * z).sum(0) for z in client_data) / n - mean**2, 0.0))
    starts = [np.asarray(init, dtype=np.float64)] if init is not None else [
        mean + std * rng.standard_normal((k, d)) for _ in range(n_init)]
    best, best_sse = None, np.inf
    for centers in starts:
        for _ in range(iters):
            msgs = [client_kmeans_step(z, centers) for z in client_data if len(z)]
            sums, counts, sse = (np.sum([m[i] for m in msgs], axis=0) for i in range(3))
            new = server_kmeans_step(centers, sums, counts, sse, rng)
            moved = float(((new - centers) ** 2).sum(1).max())
            centers = new
            if moved <= tol:
                break
        msgs = [client_kmeans_step(z, centers) for z in client_data if len(z)]
        total = float(np.sum([m[2].sum() for m in msgs]))
        if total < best_sse:
            best, best_sse = centers, total
    return best, best_sse


def client_histogram(cluster: int, scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A client's contrast message: fine histogram [K, FINE], per-bin score sums [FINE], positives [K]."""
    fine = np.minimum((np.asarray(scores) * FINE).astype(np.int64), FINE - 1)
    hist = np.zeros((k, FINE))
    hist[cluster] = np.bincount(fine, minlength=FINE)
    pos = np.zeros(k)
    pos[cluster] = float(np.sum(labels))
    return hist, np.bincount(fine, weights=scores, minlength=FINE), pos


def rebin(hist: np.ndarray, score_sums: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine histograms [K, FINE] -> [K, B] at the pooled quantiles, and bin positions [B] (mean score)."""
    pooled = hist.sum(0)
    cdf = np.cumsum(pooled) / pooled.sum()
    cuts = np.unique(np.searchsorted(cdf, np.linspace(0, 1, n_bins + 1)[1:-1], side="right"))
    group = np.searchsorted(cuts, np.arange(FINE), side="right")  # fine bin -> coarse bin
    b = int(group.max()) + 1
    coarse = np.zeros((len(hist), b))
    for j in range(b):
        coarse[:, j] = hist[:, group == j].sum(1)
    counts = np.bincount(group, weights=pooled, minlength=b)
    support = np.bincount(group, weights=score_sums, minlength=b) / np.maximum(counts, 1)
    return coarse, support


@dataclass
class FederatedCohorts:
    """The outcome of federated mining; clients use it to find their own cohort.

    Attributes mirror CohortMiner's so `c2al.jobs.centralized.compare` can report it:
    `cohorts_` (one dict per exposed cohort), `contrast_` [K], `cluster_centers_`,
    plus `cluster_to_cohort_` (cluster -> cohort id, -1 for none) and `candidates_`.
    """

    encoding: Encoding
    cluster_centers_: np.ndarray
    cluster_to_cohort_: np.ndarray
    contrast_: np.ndarray
    cohorts_: list[dict[str, Any]]
    candidates_: pd.DataFrame = field(default_factory=pd.DataFrame)

    def clusters(self, frame: pd.DataFrame) -> np.ndarray:
        """Nearest centroid of each row (what each client computes for itself)."""
        Z = self.encoding.encode(frame)
        d2 = (Z * Z).sum(1)[:, None] - 2 * Z @ self.cluster_centers_.T + (self.cluster_centers_**2).sum(1)[None]
        return np.argmin(d2, axis=1)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Cohort id per row, -1 outside every exposed cohort."""
        return self.cluster_to_cohort_[self.clusters(frame)]


def mine_federated(frames: Sequence[pd.DataFrame], scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
                   n_cohorts: int, n_clusters: int, divergence: str = "js", min_share: float = 0.02,
                   max_share: float = 0.2, seed: int = 0, iters: int = 50) -> FederatedCohorts:
    """Run steps 1-3 of the module docstring over clients' (features, scores, labels).

    Args:
        frames: per client, its rows' cohort features (a client is one user: its rows share them).
        scores: per client, the baseline's predictions on those rows.
        labels: per client, the rows' labels.
        n_cohorts, n_clusters, divergence, min_share, max_share: as CohortMiner's.
        seed: initialization seed.
        iters: Lloyd iterations.

    Returns:
        FederatedCohorts.
    """
    columns = list(frames[0].columns)
    enc = server_encoding(columns, [client_column_stats(f) for f in frames if len(f)])
    Z = [enc.encode(f) if len(f) else np.zeros((0, 1)) for f in frames]
    centers, _ = federated_kmeans([z for z in Z if len(z)], n_clusters, iters=iters, seed=seed)
    fed = FederatedCohorts(enc, centers, np.full(n_clusters, -1), np.zeros(0), [])
    hist, sums, pos = np.zeros((n_clusters, FINE)), np.zeros(FINE), np.zeros(n_clusters)
    for f, s, y in zip(frames, scores, labels):
        if not len(f):
            continue
        cluster = np.bincount(fed.clusters(f), minlength=n_clusters).argmax()  # a user's rows share one cluster
        h, ss, p = client_histogram(int(cluster), s, y, n_clusters)
        hist, sums, pos = hist + h, sums + ss, pos + p
    counts, support = rebin(hist, sums, SCORE_BINS[divergence])
    size = counts.sum(1)
    share = size / size.sum()
    pooled = counts.sum(0)
    contrast = np.where(size > 0, dv.contrast(divergence, counts, pooled, support), -np.inf)
    qualified = np.flatnonzero((share >= min_share) & (share <= max_share) & (size > 0))
    pair = dv.pairwise(divergence, counts[qualified], support, prior=pooled)
    disjoint = ~np.eye(len(qualified), dtype=bool)  # clusters never share a row
    picked = select_cohorts(contrast[qualified], pair, disjoint, n_cohorts)
    if len(picked) < n_cohorts:
        raise C2ALError(f"federated mining: {n_cohorts} cohorts asked for but only {len(qualified)} clusters have a share in "
                        f"[min_share={min_share}, max_share={max_share}]; lower --aux-cohorts or --min-share, or raise --n-clusters / --max-share")
    chosen = [int(qualified[i]) for i in sorted(picked, key=lambda i: -contrast[qualified][i])]
    fed.cluster_to_cohort_[chosen] = np.arange(len(chosen))
    fed.contrast_ = contrast[chosen].astype(np.float64)
    plr = pos / np.maximum(size, 1)
    fed.cohorts_ = [{"cohort": k, "source": "federated-kmeans", "cluster": c, "rule": f"federated-kmeans cluster {c}",
                     "share": float(share[c]), "plr": float(plr[c]), "contrast": float(contrast[c])} for k, c in enumerate(chosen)]
    fed.candidates_ = pd.DataFrame({"cluster": np.arange(n_clusters), "size": size, "share": share, "plr": plr,
                                    "contrast": contrast, "cohort": fed.cluster_to_cohort_})
    return fed
