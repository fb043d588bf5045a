"""Synthetic click data with planted cohorts, streamed chunk by chunk.

Users live in clusters of a user-feature space (three numeric features and a
categorical region). The first M clusters are the minority cohorts, each with a
small share of traffic (`minority_shares`). Their clicks follow another rule than
the majority's: another base rate, and the item-category x device interaction has
the opposite sign. A model fitted to the pooled data learns the majority's sign and
serves the minorities worse, which is the situation C2AL targets.

Click model of one row (user u in cluster c, item i of category k, device v, hour h,
dense x):
    logit = b[cohort] + item_bias[i] + affinity[c, k] + s[cohort] * flip[k, v]
            + hour_effect[h] + x @ w,        s = +1 for the majority, -1 for minorities,
with b[cohort] solved at construction so each cohort's click rate hits its target.

With `conjunctions=True` the minorities are not clusters but conjunctions of user
features that cut across them (cohort 0: `region=r0 & age_z>=a`, cohort 1:
`region=r1 & tenure_z<t & activity_z>=v`, thresholds at quantiles of the region's
users), the readable rules a decision tree can find and k-means over the same
features finds poorly. Rows are drawn by group: each minority cohort, then the
rest of each cluster; a cluster's affinities and devices still follow the cluster.
Every table the model reads is drawn once from `seed`; chunk j of a stream is drawn
from (seed, j), so a stream is reproducible and never materialized whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Splits, Table
from c2al.data.tabular import TEST, TRAIN, VALID, split_random
from c2al.errors import C2ALError

USER_NUMERIC = ("age_z", "tenure_z", "activity_z")  # standardized user features, the miner's X with region
N_DEVICES = 3
N_HOURS = 24


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic source.

    Args:
        n_users: users (vocabulary of user_id).
        n_items: items (vocabulary of item_id).
        n_rows: rows in all (stream length, or train + valid + test).
        n_clusters: user clusters, minority cohorts included.
        minority_shares: traffic share of each minority cohort (one entry per cohort).
        minority_ctrs: click rate of each minority cohort (cycled if shorter).
        majority_ctr: click rate of the majority.
        extra_fields: Criteo-like noise fields f0.. (throughput benchmarks).
        vocab_sizes: vocabulary of each extra field; empty: log-spaced from 1e2 to 1e6.
        n_dense: dense fields (standard normal, each with a linear effect).
        n_categories: item categories.
        n_regions: user regions.
        conjunctions: minority cohorts are conjunctions of user features, not clusters
            (module docstring); the clusters then all have the same number of users.
        seed: seed of everything.

    Example:
        >>> SyntheticConfig(n_rows=10_000, extra_fields=26).extra_vocab_sizes[-1]
        1000000
    """

    n_users: int = 20000
    n_items: int = 2000
    n_rows: int = 200000
    n_clusters: int = 6
    minority_shares: tuple[float, ...] = (0.03, 0.02)
    minority_ctrs: tuple[float, ...] = (0.35, 0.06)
    majority_ctr: float = 0.15
    extra_fields: int = 0
    vocab_sizes: tuple[int, ...] = ()
    n_dense: int = 2
    n_categories: int = 16
    n_regions: int = 8
    conjunctions: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        m = len(self.minority_shares)
        if self.n_clusters <= m:
            raise C2ALError(f"n_clusters ({self.n_clusters}) must exceed the number of minority cohorts ({m})")
        if any(not 0 < s < 1 for s in self.minority_shares) or sum(self.minority_shares) >= 1:
            raise C2ALError(f"minority_shares must be in (0, 1) and sum below 1, got {self.minority_shares}")
        if m and not self.minority_ctrs:
            raise C2ALError("minority_ctrs must not be empty when there are minority cohorts")
        if not 0 < self.majority_ctr < 1 or any(not 0 < v < 1 for v in self.minority_ctrs):
            raise C2ALError(f"majority_ctr and minority_ctrs must be in (0, 1), got {self.majority_ctr}, {self.minority_ctrs}")
        if self.vocab_sizes and self.extra_fields not in (0, len(self.vocab_sizes)):
            raise C2ALError(f"extra_fields ({self.extra_fields}) disagrees with len(vocab_sizes) ({len(self.vocab_sizes)})")
        if any(v < 1 for v in self.vocab_sizes):
            raise C2ALError(f"vocab_sizes must be >= 1, got {self.vocab_sizes}")
        if self.n_users < self.n_clusters or self.n_items < 1 or self.n_rows < 1:
            raise C2ALError("need n_users >= n_clusters, n_items >= 1 and n_rows >= 1")
        if self.conjunctions not in (True, False, 0, 1):
            raise C2ALError(f"conjunctions must be a boolean (or 0 / 1), got {self.conjunctions!r}")
        if self.conjunctions and m > self.n_regions:
            raise C2ALError(f"conjunctions: each of the {m} minority cohorts needs its own region; n_regions is {self.n_regions}")

    @property
    def extra_vocab_sizes(self) -> tuple[int, ...]:
        if self.vocab_sizes:
            return tuple(int(v) for v in self.vocab_sizes)
        return tuple(int(v) for v in np.geomspace(1e2, 1e6, self.extra_fields).round())

    @property
    def n_minority(self) -> int:
        return len(self.minority_shares)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _draw_from_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling; `cdf` is increasing and ends at 1."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


class SyntheticGenerator:
    """Draws the world (users, items, effects) from `cfg.seed` and streams rows from it.

    Args:
        cfg: the SyntheticConfig.

    Example:
        >>> gen = SyntheticGenerator(SyntheticConfig(n_rows=1000))
        >>> sum(len(t) for t in gen.stream(300))
        1000
    """

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        m, c = cfg.n_minority, cfg.n_clusters
        # traffic: minorities get their shares, the majority clusters split the rest evenly
        self.traffic = np.concatenate([cfg.minority_shares, np.full(c - m, (1 - sum(cfg.minority_shares)) / (c - m))])
        # users per cluster follow traffic (at least one each); ids are shuffled so id order hides clusters
        counts = np.maximum(np.floor((np.full(c, 1 / c) if cfg.conjunctions else self.traffic) * cfg.n_users).astype(int), 1)
        counts[-1] += cfg.n_users - counts.sum()
        self.user_cluster = rng.permutation(np.repeat(np.arange(c), counts))
        centers = rng.normal(0.0, 2.5, size=(c, len(USER_NUMERIC)))
        self.user_numeric = centers[self.user_cluster] + rng.normal(0.0, 1.0, size=(cfg.n_users, len(USER_NUMERIC)))
        home = np.arange(c) % cfg.n_regions
        at_home = rng.random(cfg.n_users) < 0.7
        self.user_region = np.where(at_home, home[self.user_cluster], rng.integers(0, cfg.n_regions, cfg.n_users))
        # a group is one cohort's users: minority cohorts first, then the majority's; without
        # conjunctions the groups are the clusters
        self.conjunction_rules: list[list[tuple[str, str, float]]] = []
        self.user_group = self._conjunction_groups() if cfg.conjunctions else self.user_cluster
        if cfg.conjunctions:
            self.traffic = np.concatenate([cfg.minority_shares, np.full(c, (1 - sum(cfg.minority_shares)) / c)])
        # within a group, user activity is Zipf-like
        self.group_users = [np.flatnonzero(self.user_group == k) for k in range(len(self.traffic))]
        self.group_user_cdf = [self._zipf_cdf(len(u), 0.8, rng) for u in self.group_users]
        self.item_category = rng.integers(0, cfg.n_categories, cfg.n_items)
        self.item_cdf = self._zipf_cdf(cfg.n_items, 0.9, rng)
        self.device_cdf = np.cumsum(rng.dirichlet(np.full(N_DEVICES, 2.0), size=c), axis=1)
        self.device_cdf[:, -1] = 1.0
        # effects of the click model
        self.item_bias = rng.normal(0.0, 0.6, cfg.n_items)
        self.affinity = rng.normal(0.0, 0.8, (c, cfg.n_categories))
        self.flip = rng.choice([-1.2, 1.2], size=(cfg.n_categories, N_DEVICES))
        self.hour_effect = 0.4 * np.sin(2 * np.pi * np.arange(N_HOURS) / N_HOURS + rng.uniform(0, 2 * np.pi))
        self.dense_w = rng.normal(0.0, 0.4, cfg.n_dense)
        self.sign = np.where(np.arange(len(self.traffic)) < m, -1.0, 1.0)  # per group: the minorities' flipped interaction
        self.intercept = np.zeros(len(self.traffic))
        self._calibrate()
        self.schema = self._schema()

    @staticmethod
    def _zipf_cdf(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
        w = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -a)
        cdf = np.cumsum(w) / w.sum()
        cdf[-1] = 1.0
        return cdf

    def _conjunction_groups(self) -> np.ndarray:
        """Group of each user: minority cohort k where its conjunction holds, else m + its cluster."""
        cfg, m = self.cfg, self.cfg.n_minority
        rng = np.random.default_rng([cfg.seed, 3])  # its own stream: the default world draws nothing more
        regions = rng.choice(cfg.n_regions, m, replace=False)
        age, tenure, activity = self.user_numeric.T
        group = m + self.user_cluster
        for k, region in enumerate(regions):
            home = self.user_region == region
            if k % 2 == 0:  # two conditions: the region's older half
                rule = [("region", "==", float(region)), ("age_z", ">=", float(np.quantile(age[home], 0.5)))]
            else:  # three: the region's shorter-tenure, more active users
                low = tenure[home] < np.quantile(tenure[home], 0.6)
                rule = [("region", "==", float(region)), ("tenure_z", "<", float(np.quantile(tenure[home], 0.6))),
                        ("activity_z", ">=", float(np.quantile(activity[home][low], 0.3)))]
            inside = home & (group >= m) & self._holds(rule)
            if not inside.any():
                raise C2ALError(f"conjunctions: cohort {k} ({rule}) holds no user; raise n_users")
            group[inside] = k
            self.conjunction_rules.append(rule)
        empty = [j for j in range(cfg.n_clusters) if not (group == m + j).any()]
        if empty:
            raise C2ALError(f"conjunctions: clusters {empty} keep no user outside the cohorts; raise n_users")
        return group

    def _holds(self, rule: list[tuple[str, str, float]]) -> np.ndarray:
        """Which users meet every condition of a conjunction [n_users]."""
        ok = np.ones(self.cfg.n_users, dtype=bool)
        for column, op, value in rule:
            values = self.user_region if column == "region" else self.user_numeric[:, USER_NUMERIC.index(column)]
            ok &= {"==": values == value, ">=": values >= value, "<": values < value}[op]
        return ok

    def _cohort_target(self, group: int) -> float:
        m = self.cfg.n_minority
        return self.cfg.minority_ctrs[group % len(self.cfg.minority_ctrs)] if group < m else self.cfg.majority_ctr

    def _calibrate(self) -> None:
        """Solve each group's intercept so its mean click probability is its cohort's target."""
        rng = np.random.default_rng([self.cfg.seed, 1])
        for k in range(len(self.traffic)):
            rows = self._draw(rng, 20000, groups=np.full(20000, k))
            z = rows["logit"]
            lo, hi = -15.0, 15.0
            for _ in range(60):  # bisection: the mean of sigmoid(b + z) increases with b
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _sigmoid(mid + z).mean() < self._cohort_target(k) else (lo, mid)
            self.intercept[k] = (lo + hi) / 2

    def _draw(self, rng: np.random.Generator, n: int, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw draws of n rows (0-based ids) and their logits."""
        cfg = self.cfg
        if groups is None:
            groups = _draw_from_cdf(np.cumsum(self.traffic), rng.random(n))
        users = np.empty(n, dtype=np.int64)
        for k in range(len(self.traffic)):  # few groups: loop over them, vectorize within
            rows = np.flatnonzero(groups == k)
            users[rows] = self.group_users[k][_draw_from_cdf(self.group_user_cdf[k], rng.random(len(rows)))]
        clusters = self.user_cluster[users]
        items = _draw_from_cdf(self.item_cdf, rng.random(n))
        device = (rng.random(n)[:, None] > self.device_cdf[clusters]).sum(axis=1)
        hour = rng.integers(0, N_HOURS, n)
        dense = rng.standard_normal((n, cfg.n_dense)).astype(np.float32)
        cat = self.item_category[items]
        logit = (
            self.intercept[groups] + self.item_bias[items] + self.affinity[clusters, cat]
            + self.sign[groups] * self.flip[cat, device] + self.hour_effect[hour] + dense @ self.dense_w
        )
        return {"group": groups, "cluster": clusters, "user": users, "item": items, "category": cat, "device": device,
                "hour": hour, "dense": dense, "logit": logit}

    def _schema(self) -> Schema:
        cfg = self.cfg
        sparse = [
            SparseFeature("user_id", cfg.n_users + 1, "user"),
            SparseFeature("region", cfg.n_regions + 1, "user"),
            SparseFeature("item_id", cfg.n_items + 1, "item"),
            SparseFeature("item_category", cfg.n_categories + 1, "item"),
            SparseFeature("device", N_DEVICES + 1, "context"),
            SparseFeature("hour", N_HOURS + 1, "context"),
        ]
        sparse += [SparseFeature(f"f{j}", v + 1, "context") for j, v in enumerate(cfg.extra_vocab_sizes)]
        return Schema(
            sparse=tuple(sparse),
            dense=tuple(f"dense_{j}" for j in range(cfg.n_dense)),
            cohort_features=(*USER_NUMERIC, "region"),
            name="synthetic",
        )

    def chunk(self, index: int, n_rows: int, first_row: int = 0) -> Table:
        """Rows of chunk `index`, drawn from (seed, index); `first_row` numbers their timestamps.

        Ids are the 0-based draws plus one, since id 0 is reserved for unseen values.
        """
        rng = np.random.default_rng([self.cfg.seed, 2, index])
        d = self._draw(rng, n_rows)
        labels = (rng.random(n_rows) < _sigmoid(d["logit"])).astype(np.float32)
        ids = {"user_id": d["user"], "region": self.user_region[d["user"]], "item_id": d["item"],
               "item_category": d["category"], "device": d["device"], "hour": d["hour"]}
        for j, v in enumerate(self.cfg.extra_vocab_sizes):
            # power-law ids (a few hot, a long tail), like hashed Criteo features; no effect on the label
            ids[f"f{j}"] = np.minimum((v * rng.random(n_rows) ** 3).astype(np.int64), v - 1)
        cohort_frame = pd.DataFrame(self.user_numeric[d["user"]], columns=list(USER_NUMERIC))
        cohort_frame["region"] = self.user_region[d["user"]]
        if self.cfg.conjunctions:  # a region is a category (`region=3`), not a number to bucket
            cohort_frame["region"] = pd.Categorical(cohort_frame["region"], categories=np.arange(self.cfg.n_regions))
        m = self.cfg.n_minority
        return Table(
            sparse={k: JaggedColumn.from_ids(v + 1) for k, v in ids.items()},
            dense=d["dense"],
            labels=labels,
            user_ids=d["user"].astype(np.int64),
            item_ids=d["item"].astype(np.int64),
            cohort_frame=cohort_frame,
            true_cohorts=np.where(d["group"] < m, d["group"], -1).astype(np.int64),
            timestamps=np.arange(first_row, first_row + n_rows, dtype=np.int64),
        )

    def stream(self, chunk_rows: int = 1 << 18) -> Iterator[Table]:
        """Yield `cfg.n_rows` rows as tables of `chunk_rows` rows (the last one shorter).

        Args:
            chunk_rows: rows per chunk.

        Returns:
            an iterator of Tables; chunk j depends only on (seed, j, chunk_rows).
        """
        if chunk_rows < 1:
            raise C2ALError(f"chunk_rows must be >= 1, got {chunk_rows}")
        for index, start in enumerate(range(0, self.cfg.n_rows, chunk_rows)):
            yield self.chunk(index, min(chunk_rows, self.cfg.n_rows - start), first_row=start)


def concat_tables(tables: list[Table]) -> Table:
    """One table holding the rows of `tables` in order (same fields in each)."""

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(t, name) for t in tables]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    frames = [t.cohort_frame for t in tables]
    return Table(
        sparse={
            k: JaggedColumn(np.concatenate([t.sparse[k].values for t in tables]),
                            np.concatenate([t.sparse[k].lengths for t in tables]))
            for k in tables[0].sparse
        },
        dense=np.concatenate([t.dense for t in tables]),
        labels=np.concatenate([t.labels for t in tables]),
        user_ids=np.concatenate([t.user_ids for t in tables]),
        item_ids=cat("item_ids"),
        cohort_frame=None if any(f is None for f in frames) else pd.concat(frames, ignore_index=True),
        cohort_ids=cat("cohort_ids"),
        true_cohorts=cat("true_cohorts"),
        timestamps=cat("timestamps"),
    )


def make_synthetic_splits(
    cfg: SyntheticConfig | None = None, *, valid_frac: float = 0.1, test_frac: float = 0.1, chunk_rows: int = 1 << 18
) -> Splits:
    """Materialize `cfg.n_rows` synthetic rows and split them at random (80/10/10 by default).

    The vocabularies are known by construction (ids 1..n), so no id maps to 0.

    Args:
        cfg: the config; None for the defaults.
        valid_frac: share of rows for validation.
        test_frac: share of rows for test.
        chunk_rows: chunk size of the underlying stream (the rows depend on it).

    Returns:
        validated Splits with `true_cohorts` filled.

    Example:
        >>> s = make_synthetic_splits(SyntheticConfig(n_rows=5000))
        >>> len(s.train), s.schema.feature_names[:3]
        (4000, ['user_id', 'region', 'item_id'])
    """
    gen = SyntheticGenerator(cfg or SyntheticConfig())
    full = concat_tables(list(gen.stream(chunk_rows)))
    split = split_random(len(full), valid_frac, test_frac, seed=gen.cfg.seed)
    tables = [full.take(np.flatnonzero(split == code)) for code in (TRAIN, VALID, TEST)]
    return Splits(gen.schema, *tables).validate()
