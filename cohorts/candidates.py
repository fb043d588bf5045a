"""Candidate cohorts: clusters, axis buckets and decision-tree conjunctions.

Candidates come in families. A family's rules never share a row (the clusters of
one clusterer, the values of one categorical column, the quintiles of a numeric
one, the nodes at one depth of the tree), so `selection.disjoint` can tell which
candidates of two families overlap from one contingency table.

Letters: N rows, D encoded features, K clusters.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import MiniBatchKMeans
from sklearn.mixture import GaussianMixture
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from threadpoolctl import threadpool_limits

from c2al.cohorts.encoding import CHUNK, Encoding, nearest_center
from c2al.cohorts.rules import members, rule_text
from c2al.errors import C2ALError

SOURCES = ("kmeans", "gmm", "axes", "tree")
CLUSTERERS = ("kmeans", "gmm")
ONEHOT_SOURCES = ("kmeans", "gmm", "tree")  # sources that one-hot encode categorical columns
# clusterers (and the tree) fit on a subsample this large, then every row is assigned; EM costs more per row
FIT_ROWS = {"kmeans": 100_000, "gmm": 20_000, "tree": 200_000}
KMEANS_BATCH = 2048  # scikit-learn advises > 256 * cores; larger batches buy little on 2-8 cores
QUINTILES = (0.2, 0.4, 0.6, 0.8)
TAIL = 0.05  # top and bottom 5%: the paper's head and tail users by value
# conjunctions of at most this many conditions stay readable (`region=3 & age>=55 & tenure<2`)
TREE_DEPTH = 4
# a split of the regression tree must explain this share of the target's variance: without it the
# tree halves a homogeneous cohort on noise and the selection prefers the more extreme half
# (planted conjunctions at 4% / 3% of traffic, 3 seeds: mean ARI 0.80 -> 0.93; 1e-3 already loses cohorts)
TREE_MIN_DECREASE = 3e-4
# the classification tree's counterpart: a split must gain this many times the information a split on
# pure noise gains on average ((B - 1) / (2 N) nats, weighted by the node's share, for B bins and N rows);
# 2 rather than 4 on benchmarks/cohort_recovery_worlds.py's tuning worlds with the project's conjunctions
TREE_MIN_GAIN = 2.0


def subsample(Z: np.ndarray, rows: int, rng: np.random.RandomState) -> np.ndarray:
    return Z[rng.choice(len(Z), rows, replace=False)] if len(Z) > rows else Z


def likeliest_component(Z: np.ndarray, weights: np.ndarray, means: np.ndarray,
                        prec_chol: np.ndarray) -> np.ndarray:
    """MAP mixture component of each row, with full precision Cholesky factors [K, D, D]."""
    k, d = means.shape
    log_norm = np.log(weights) + np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)  # [K]
    stacked = prec_chol.transpose(1, 0, 2).reshape(d, k * d)  # one matmul serves all K components
    shift = np.einsum("kd,kde->ke", means, prec_chol).reshape(k * d)
    out = np.empty(len(Z), dtype=np.int64)
    for start in range(0, len(Z), CHUNK):
        white = (Z[start:start + CHUNK] @ stacked - shift).reshape(-1, k, d)  # [CHUNK, K, D]
        out[start:start + CHUNK] = np.argmax(log_norm - 0.5 * np.square(white).sum(axis=2), axis=1)
    return out


def fit_clusterers(Z: np.ndarray, used: list[str], n_clusters: int,
                   rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """Fit the clusterers in `used` on (a subsample of) Z [N, D].

    Returns:
        The fitted arrays by miner attribute: cluster_centers_ (k-means centers, or the
        mixture means when only "gmm" is used) and gmm_weights_ / gmm_means_ /
        gmm_precisions_cholesky_.
    """
    k = min(n_clusters, len(Z))
    out = {}
    # D is small, so each step of either fit is too small to gain from threads; on a busy machine
    # their spin-waits made MiniBatchKMeans ~25x slower (100k rows: 0.14 s on one thread, 3.6 s on two)
    with threadpool_limits(limits=1):
        if "gmm" in used:
            gmm = GaussianMixture(k, reg_covar=1e-4, init_params="k-means++", random_state=rng)
            gmm.fit(subsample(Z, FIT_ROWS["gmm"], rng))
            out.update(gmm_weights_=gmm.weights_, gmm_means_=gmm.means_,
                       gmm_precisions_cholesky_=gmm.precisions_cholesky_, cluster_centers_=gmm.means_)
        if "kmeans" in used:
            km = MiniBatchKMeans(k, batch_size=KMEANS_BATCH, n_init=3, random_state=rng)
            out["cluster_centers_"] = km.fit(subsample(Z, FIT_ROWS["kmeans"], rng)).cluster_centers_
    return out


def cluster_labels(Z: np.ndarray, used: list[str], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cluster of each row [N] per clusterer in `used`, from the fitted arrays of `fit_clusterers`."""
    out = {}
    if "kmeans" in used:
        out["kmeans"] = nearest_center(Z, arrays["cluster_centers_"])
    if "gmm" in used:
        out["gmm"] = likeliest_component(Z, arrays["gmm_weights_"], arrays["gmm_means_"],
                                         arrays["gmm_precisions_cholesky_"])
    return out


def axis_positions(axes: list[str | int] | None, names: list[str], sources: list[str]) -> list[int]:
    """Positions of the columns to bucket: `axes` by name or position, or all when None."""
    if "axes" not in sources:
        return []
    if axes is None:
        return list(range(len(names)))
    positions = []
    for axis in axes:
        if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis < len(names):
            positions.append(int(axis))
        elif isinstance(axis, str) and axis in names:
            positions.append(names.index(axis))
        else:
            raise C2ALError(f"axes: unknown column {axis!r}; X has columns {names}")
    return positions


def axis_rules(name: str, values: np.ndarray, kind: str, stat: list[Any]) -> list[list[dict[str, Any]]]:
    """Rule families of one axis column: its values, or its quintiles and its 5% tails."""
    source = f"axis:{name}"
    if kind == "categorical":
        return [[{"source": source, "column": name, "value": v} for v in stat]]
    q = [float(v) for v in np.quantile(values, QUINTILES + (TAIL, 1.0 - TAIL))]
    cuts = [None, *q[:4], None]
    quintiles = [{"source": source, "column": name, "low": lo, "high": hi} for lo, hi in zip(cuts, cuts[1:])]
    tails = [{"source": source, "column": name, "low": None, "high": q[4]},
             {"source": source, "column": name, "low": q[5], "high": None}]
    return [quintiles, tails]


def families(enc: Encoding, columns: list[np.ndarray], clusters: dict[str, np.ndarray], n_clusters: int,
             axes: list[int], extra: list[list[dict[str, Any]]]) -> tuple[list[np.ndarray], list[list[dict[str, Any]]]]:
    """Candidate families: label arrays [N] (-1: in none) and each family's rules.

    Args:
        enc: the miner's encoding (column names, kinds, values).
        columns: per-column arrays of X.
        clusters: cluster of each row per clusterer.
        n_clusters: clusters per clusterer.
        axes: positions of the axis columns.
        extra: further rule families (the tree's).

    Returns:
        (labels, rules): one label array and one list of rules per family.
    """
    rules: list[list[dict[str, Any]]] = [
        [{"source": s, "cluster": j} for j in range(n_clusters)] for s in clusters]
    for pos in axes:
        rules += axis_rules(enc.columns[pos], columns[pos], enc.kinds[pos], enc.stats[pos])
    rules += extra
    labels = []
    for family in rules:
        for rule in family:
            rule["rule"] = rule_text(rule)
        if "value" in family[0]:  # one pass instead of one mask per value of a wide column
            values = columns[enc.columns.index(family[0]["column"])]
            labels.append(pd.Categorical(values, categories=[r["value"] for r in family]).codes.astype(np.int64))
            continue
        member = np.full(len(columns[0]), -1, dtype=np.int64)
        for j, rule in enumerate(family):
            # membership through the same code path as predict, so fit and predict agree
            member[members(rule, enc.columns, columns, clusters)] = j
        labels.append(member)
    return labels, rules


# -------------------------------------------------------------------- tree
def tree_rules(enc: Encoding, columns: list[np.ndarray], target: np.ndarray, min_share: float,
               n_leaves: int, rng: np.random.RandomState, classify: bool = False) -> list[list[dict[str, Any]]]:
    """Conjunction candidates: the nodes of a decision tree of `target` on the cohort features.

    Two trees, each finding what the other misses. The regression tree of the scores splits
    where their mean moves (a cohort with its own click rate). The classification tree of the
    score bins (`classify`, entropy criterion) splits where their distribution moves: its gain is
    the mutual information between the side and the bin, the weighted Jensen-Shannon divergence
    of the two sides, so it also finds a cohort whose scores spread differently around the same
    mean (an opposite taste). Both read raw numeric columns (thresholds stay in the column's
    units) and one-hot categorical ones; no leaf holds fewer than min_share of the rows, so every
    node could be exposed. Leaves and internal nodes are candidates: an internal node is the
    cohort when the tree went on to split it.

    Args:
        enc: the miner's encoding.
        columns: per-column arrays of X.
        target: what the tree explains [N]: scores (or labels), or score bins when classify.
        min_share: smallest share of rows in a leaf.
        n_leaves: most leaves the tree grows (best first).
        rng: seeds the subsample and the tree's tie breaks.
        classify: grow the classification tree of bins (non-negative integers) instead.

    Returns:
        One family per depth 1..TREE_DEPTH: the rules of that depth's nodes.
    """
    design = enc.transform(columns, scaled=False)  # [N, D]
    rows = rng.choice(len(design), FIT_ROWS["tree"], replace=False) if len(design) > FIT_ROWS["tree"] else slice(None)
    n = len(target[rows])
    shape = dict(max_depth=TREE_DEPTH, max_leaf_nodes=max(n_leaves, 2), min_samples_leaf=max(1, int(np.ceil(min_share * n))),
                 random_state=rng.randint(np.iinfo(np.int32).max))
    if classify:
        # sklearn's entropy is in bits and its impurity decrease is weighted by the node's share
        noise_gain = int(target.max()) / (2.0 * n * np.log(2.0))
        tree = DecisionTreeClassifier(criterion="entropy", min_impurity_decrease=TREE_MIN_GAIN * noise_gain, **shape)
    else:
        tree = DecisionTreeRegressor(min_impurity_decrease=TREE_MIN_DECREASE * float(np.var(target[rows])), **shape)
    fitted = tree.fit(design[rows], target[rows])
    by_depth: dict[int, list[dict[str, Any]]] = {}
    for depth, path in _node_paths(fitted.tree_):
        if depth > 0:
            conds = _simplify([_condition(enc, feature, threshold, right) for feature, threshold, right in path])
            by_depth.setdefault(depth, []).append({"source": "tree", "conditions": conds})
    return [by_depth[d] for d in sorted(by_depth)]


def _node_paths(tree: Any) -> list[tuple[int, list[tuple[int, float, bool]]]]:
    """(depth, path) of every node; a path lists (feature, threshold, went right) from the root."""
    out, stack = [], [(0, [])]
    while stack:
        node, path = stack.pop()
        out.append((len(path), path))
        left, right = tree.children_left[node], tree.children_right[node]
        if left >= 0:
            f, t = int(tree.feature[node]), float(tree.threshold[node])
            stack += [(right, path + [(f, t, True)]), (left, path + [(f, t, False)])]
    return sorted(out, key=lambda item: item[0])


def _condition(enc: Encoding, feature: int, threshold: float, right: bool) -> dict[str, Any]:
    """A tree split as a condition on X's column: x <= t / x > t, or col == v / col != v for a one-hot."""
    column, value = enc.source_of(feature)
    if value is None:
        return {"column": column, "op": ">" if right else "<=", "value": threshold}
    return {"column": column, "op": "==" if right else "!=", "value": value}  # one-hot: right means 1


def _simplify(conds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop conditions implied by others: looser bounds, and `!=` beside an `==` on the same column."""
    equal = {c["column"] for c in conds if c["op"] == "=="}
    out: list[dict[str, Any]] = []
    for c in conds:
        if c["op"] == "!=" and c["column"] in equal:
            continue
        same = next((i for i, o in enumerate(out) if o["column"] == c["column"] and o["op"] == c["op"]
                     and c["op"] in ("<=", ">")), None)
        if same is None:
            out.append(dict(c))
        else:
            tighter = min if c["op"] == "<=" else max
            out[same]["value"] = tighter(out[same]["value"], c["value"])
    return out
