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

`FederatedCohortMiner.fit` runs the three steps; the estimator it leaves has
the fitted attributes of a `CohortMiner` (`cohorts_`, `contrast_`,
`candidates_`, `rules_`, `cluster_centers_`). Clients then receive the
centroids and the exposed clusters, compute their own cohort id locally
(`predict`), and build auxiliary labels from it.

Letters: N rows, D encoded features, K clusters, B bins.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from c2al.cohorts import divergence as dv
from c2al.cohorts.describe import describe_cohorts
from c2al.cohorts.encoding import Encoding, is_categorical, nearest_center
from c2al.cohorts.selection import SCORE_BINS, select_cohorts
from c2al.errors import C2ALError

FINE = 1000  # client histogram resolution on [0, 1]
SOURCE = "federated-kmeans"


def client_column_stats(frame: pd.DataFrame) -> list[Any]:
    """What one client sends for the encoding: (n, sum, sumsq) or its set of values, per column."""
    out = []
    for _, v in frame.items():
        if is_categorical(v):
            out.append(set(v.astype(str)))
        else:
            x = v.to_numpy(dtype=np.float64)
            out.append(np.array([len(x), x.sum(), (x * x).sum()]))
    return out


def server_encoding(columns: list[str], client_stats: Sequence[list[Any]]) -> Encoding:
    """Combine the clients' column statistics into the miner's Encoding (mean/std, sorted values)."""
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
    a = nearest_center(Z, centers)
    k = len(centers)
    sums = np.zeros_like(centers)
    np.add.at(sums, a, Z)
    d2 = ((Z - centers[a]) ** 2).sum(1)  # [N], to the assigned centre only
    return sums, np.bincount(a, minlength=k).astype(np.float64), np.bincount(a, weights=d2, minlength=k)


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



class FederatedCohortMiner(BaseEstimator):
    """CohortMiner's k-means path where the server sees only sums of client messages.

    Args:
        n_cohorts: K, how many cohorts to expose.
        n_clusters: clusters of the federated k-means, each one candidate.
        divergence: "js", "kl" or "wasserstein", as CohortMiner's.
        min_share: smallest share of rows an exposed cohort may have.
        max_share: largest share of rows an exposed cohort may have.
        iters: Lloyd iterations at most.
        random_state: seed of the k-means initialization and re-seeding.

    Attributes:
        cohorts_: one dict per exposed cohort (id order): rule, source, cluster, share, plr, contrast.
        contrast_: contrast of each exposed cohort against the rest [K], decreasing.
        candidates_: one row per cluster: id, source, rule, cluster, size, share, plr, contrast,
            qualified, cohort (-1 if not exposed).
        rules_: the rule of every candidate (cluster), by candidate id.
        cluster_centers_: centroids [n_clusters, D] in the encoded space.
        cluster_to_cohort_: cohort id of each cluster [n_clusters], -1 for none.
        encoding_: the standardization and vocabulary formed from the clients' column statistics.
        n_features_in_: number of cohort feature columns.
        feature_names_in_: their names.

    Example:
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> frames = [pd.DataFrame({"age": [a] * 5}) for a in rng.normal(size=200)]  # 200 one-user clients
        >>> scores = [np.full(5, 0.9 if f["age"][0] > 1.5 else 0.2) for f in frames]
        >>> labels = [(rng.random(5) < s).astype(int) for s in scores]
        >>> miner = FederatedCohortMiner(1, n_clusters=8, max_share=0.5, random_state=0).fit(frames, labels, scores)
        >>> bool(miner.predict(pd.DataFrame({"age": [2.5, -1.0]}))[0] == 0)
        True
    """

    def __init__(self, n_cohorts: int = 2, *, n_clusters: int = 16, divergence: str = "js", min_share: float = 0.02,
                 max_share: float = 0.2, iters: int = 50, random_state: int | None = None) -> None:
        self.n_cohorts = n_cohorts
        self.n_clusters = n_clusters
        self.divergence = divergence
        self.min_share = min_share
        self.max_share = max_share
        self.iters = iters
        self.random_state = random_state

    def fit(self, X: Sequence[pd.DataFrame], y: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> FederatedCohortMiner:
        """Steps 1-3 of the module docstring over the clients' (features, labels, scores).

        Args:
            X: per client, its rows' cohort features (a client is one user: its rows share them).
            y: per client, the rows' labels.
            scores: per client, the baseline's predictions on those rows.

        Returns:
            self, fitted.
        """
        if self.divergence not in dv.METRICS:
            raise C2ALError(f"divergence={self.divergence!r}: expected one of {dv.METRICS}")
        columns = list(X[0].columns)
        self.encoding_ = server_encoding(columns, [client_column_stats(f) for f in X if len(f)])
        self.n_features_in_, self.feature_names_in_ = len(columns), np.asarray(columns, dtype=object)
        Z = [self.encoding_.encode(f) for f in X if len(f)]
        self.cluster_centers_, _ = federated_kmeans(Z, self.n_clusters, iters=self.iters, seed=self.random_state)
        hist, sums, pos = self._contrast_messages(Z, [s for f, s in zip(X, scores) if len(f)],
                                                  [t for f, t in zip(X, y) if len(f)])
        counts, support = rebin(hist, sums, SCORE_BINS[self.divergence])
        self._select(counts, support, pos)
        return self

    def _contrast_messages(self, Z: list[np.ndarray], scores: list[np.ndarray], labels: list[np.ndarray]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sum of the clients' histogram messages: [K, FINE], [FINE], [K]."""
        k = self.n_clusters
        hist, sums, pos = np.zeros((k, FINE)), np.zeros(FINE), np.zeros(k)
        for z, s, t in zip(Z, scores, labels):
            cluster = np.bincount(nearest_center(z, self.cluster_centers_), minlength=k).argmax()  # a user's rows share one
            h, ss, p = client_histogram(int(cluster), s, t, k)
            hist, sums, pos = hist + h, sums + ss, pos + p
        return hist, sums, pos

    def _select(self, counts: np.ndarray, support: np.ndarray, positives: np.ndarray) -> None:
        """Score every cluster, expose the K best disjoint ones (CohortMiner's rule), fill the attributes."""
        metric, size = self.divergence, counts.sum(1)
        share, pooled = size / size.sum(), counts.sum(0)
        contrast = np.where(size > 0, dv.contrast(metric, counts, pooled, support), -np.inf)
        qualified = (share >= self.min_share) & (share <= self.max_share) & (size > 0)
        q = np.flatnonzero(qualified)
        pair = dv.pairwise(metric, counts[q], support, prior=pooled)
        picked = select_cohorts(contrast[q], pair, ~np.eye(len(q), dtype=bool), self.n_cohorts)  # clusters never share a row
        if len(picked) < self.n_cohorts:
            raise C2ALError(f"federated mining: {self.n_cohorts} cohorts asked for but only {len(q)} clusters have a share in "
                            f"[min_share={self.min_share}, max_share={self.max_share}]; lower --aux-cohorts or --min-share, "
                            "or raise --n-clusters / --max-share")
        chosen = [int(q[i]) for i in sorted(picked, key=lambda i: -contrast[q][i])]
        self.cluster_to_cohort_ = np.full(self.n_clusters, -1)
        self.cluster_to_cohort_[chosen] = np.arange(len(chosen))
        self.contrast_ = contrast[chosen].astype(np.float64)
        plr = positives / np.maximum(size, 1)
        self.rules_ = [{"source": SOURCE, "cluster": j, "rule": f"{SOURCE} cluster {j}"} for j in range(self.n_clusters)]
        self.cohorts_ = [dict(self.rules_[c], cohort=k, candidate=c, share=float(share[c]), plr=float(plr[c]),
                              contrast=float(contrast[c])) for k, c in enumerate(chosen)]
        self.candidates_ = pd.DataFrame({
            "id": np.arange(self.n_clusters), "source": SOURCE, "rule": [r["rule"] for r in self.rules_],
            "cluster": np.arange(self.n_clusters), "size": size, "share": share, "plr": plr, "contrast": contrast,
            "qualified": qualified, "cohort": self.cluster_to_cohort_})

    def clusters(self, X: pd.DataFrame) -> np.ndarray:
        """Nearest centroid of each row [N] (what each client computes for itself)."""
        check_is_fitted(self, "cohorts_")
        missing = [c for c in self.encoding_.columns if c not in X.columns]
        if missing:
            raise C2ALError(f"X lacks the cohort feature columns {missing} the federated miner was fitted on")
        return nearest_center(self.encoding_.encode(X), self.cluster_centers_)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Cohort id of each row [N]: 0..K-1 in decreasing contrast, -1 outside every exposed cohort."""
        return self.cluster_to_cohort_[self.clusters(X)]

    def describe(self, X: pd.DataFrame, top: int = 3) -> list[dict[str, Any]]:
        """What sets each exposed cohort apart in X (see `c2al.cohorts.describe_cohorts`)."""
        return describe_cohorts(X, self.predict(X), len(self.cohorts_), top)
