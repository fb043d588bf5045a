"""CohortMiner: finds the cohorts whose baseline predictions contrast most.

C2AL gives each exposed cohort an auxiliary head. The paper chose cohorts by
hand along interpretable axes; the miner searches instead. It builds candidate
cohorts from clustering user features (k-means or a Gaussian mixture) and from
axis buckets (quantiles of a numeric column, values of a categorical one),
scores each by the divergence between the baseline's predictions inside and
outside it, and exposes the K best disjoint candidates whose share of samples
lies in [min_share, max_share].

Selection rule. For K >= 2 the first two cohorts are the paper's head/tail
pair: among disjoint qualifying pairs, the one whose two inside-distributions
diverge most from each other (a high-score cohort against a low-score one,
rather than two cohorts that are both unusual in the same direction). Further
cohorts are added greedily, each the most contrasting candidate (against the
rest) disjoint from those already chosen. For K = 1 it is the most contrasting
candidate. Exposed ids are then ordered by contrast against the rest, 0 first.

Letters: N samples, D encoded features, C candidates, B histogram bins, K cohorts.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import MiniBatchKMeans
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_random_state
from sklearn.utils import ClassifierTags, Tags
from sklearn.utils.validation import check_array, check_is_fitted
from threadpoolctl import threadpool_limits

from c2al.cohorts import divergence as dv
from c2al.dist.atomic import atomic_write_bytes
from c2al.errors import C2ALError

SOURCES = ("kmeans", "gmm", "axes")
CLUSTERERS = ("kmeans", "gmm")
# clusterers fit on a subsample this large, then every row is assigned; EM costs more per row
FIT_ROWS = {"kmeans": 100_000, "gmm": 20_000}
KMEANS_BATCH = 2048  # scikit-learn advises > 256 * cores; larger batches buy little on 2-8 cores
MAX_ONEHOT = 256  # categories per column that clustering will one-hot encode ([N, D] stays dense)
CHUNK = 65_536  # rows per block when assigning clusters, bounds temporaries to [CHUNK, max(D, K)]
QUINTILES = (0.2, 0.4, 0.6, 0.8)
TAIL = 0.05  # top and bottom 5%: the paper's head and tail users by value
FORMAT = "c2al.cohorts.CohortMiner/1"
ARRAYS = ("contrast_", "cluster_centers_", "gmm_weights_", "gmm_means_", "gmm_precisions_cholesky_")
STATE = ("n_features_in_", "_names", "_kinds", "_stats", "cohorts_")
OPTIONAL_STATE = ("rules_",)  # absent from miners saved before it existed; only `expose` needs it
SCORE_BINS = {"js": 20, "kl": 20, "wasserstein": 200}


def _trait(name: str, values: np.ndarray, kind: str, inside: np.ndarray) -> dict[str, Any]:
    """One column's standardized difference between a cohort and the rest (see CohortMiner.describe)."""
    if kind == "numeric":
        values = values.astype(np.float64)
        a, b, sd = values[inside].mean(), values[~inside].mean(), values.std()
        effect = 0.0 if sd == 0 else (a - b) / sd
        return {"column": name, "text": f"{name} {a:.3g} (rest {b:.3g})", "effect": float(effect)}
    cats, codes = np.unique(values.astype(str), return_inverse=True)
    p_in = np.bincount(codes[inside], minlength=len(cats)) / inside.sum()
    p_out = np.bincount(codes[~inside], minlength=len(cats)) / (~inside).sum()
    p_all = np.bincount(codes, minlength=len(cats)) / len(codes)
    gap = (p_in - p_out) / np.sqrt(np.clip(p_all * (1 - p_all), 1e-12, None))
    j = int(np.argmax(gap))
    return {"column": name, "text": f"{name}={cats[j]} {p_in[j]:.0%} (rest {p_out[j]:.0%})", "effect": float(gap[j])}


def describe_cohorts(X: Any, ids: Any, n_cohorts: int, top: int = 3) -> list[dict[str, Any]]:
    """What sets each cohort apart in X, for cohort ids from any miner (centralized or federated).

    A numeric column's trait is its mean inside vs outside the cohort; a
    categorical column's is the value most over-represented inside. Traits
    are ranked by standardized difference (mean gap over the column's std;
    share gap over the value's Bernoulli std).

    Args:
        X: per-row features [N, F], array or DataFrame.
        ids: cohort id of each row [N], -1 for none.
        n_cohorts: K; cohorts 0..K-1 are described (an empty one gets no traits).
        top: traits kept per cohort.

    Returns:
        One dict per cohort: {"cohort", "share", "traits": [{"column", "text", "effect"}]}.
    """
    names, columns, kinds = _read_columns(X)
    ids = np.asarray(ids)
    if ids.shape != (len(columns[0]),):
        raise C2ALError(f"describe_cohorts: {ids.shape[0] if ids.ndim else 0} cohort ids for {len(columns[0])} rows of X")
    out = []
    for k in range(n_cohorts):
        inside = ids == k
        traits = []
        if inside.any() and (~inside).any():
            traits = [_trait(name, values, kind, inside) for name, values, kind in zip(names, columns, kinds)]
        traits.sort(key=lambda t: -abs(t["effect"]))
        out.append({"cohort": k, "share": float(inside.mean()), "traits": traits[:top]})
    return out


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _label(name: str) -> str:
    return f"X column {name!r}"


def _read_columns(X: Any) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Split X into column names, per-column arrays and kinds ("numeric"/"categorical")."""
    if not isinstance(X, pd.DataFrame):
        try:  # scikit-learn's messages for empty, 1-D, sparse or complex input are fine
            arr = check_array(X, dtype=np.float64, ensure_all_finite=False, input_name="X")
        except ValueError as err:
            raise C2ALError(f"X: {_one_line(err)}; pass a pandas DataFrame for categorical columns") from err
        return [f"x{j}" for j in range(arr.shape[1])], list(arr.T), ["numeric"] * arr.shape[1]
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise C2ALError(f"X: DataFrame of shape {X.shape} has no rows or no columns")
    names, columns, kinds = [], [], []
    for name, series in X.items():
        categorical = pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series)
        if categorical and series.isna().any():
            row = int(np.flatnonzero(series.isna().to_numpy())[0])
            raise C2ALError(f"{_label(str(name))} contains NaN / missing values (first at row {row})")
        names.append(str(name))
        kinds.append("categorical" if categorical else "numeric")
        columns.append(series.astype(str).to_numpy(dtype=object) if categorical
                       else series.to_numpy(dtype=np.float64, na_value=np.nan))
    return names, columns, kinds


def _check_finite(names: list[str], columns: list[np.ndarray], kinds: list[str]) -> None:
    for name, values, kind in zip(names, columns, kinds):
        if kind == "numeric" and not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise C2ALError(f"{_label(name)} contains NaN or infinite values (first at row {row})")


def _check_informative(names: list[str], columns: list[np.ndarray]) -> None:
    # a constant column cannot split users into cohorts and would divide by a zero std
    for name, values in zip(names, columns):
        if (values[1:] == values[0]).all():
            raise C2ALError(f"{_label(name)} is constant ({values[0]!r}): it carries no information "
                            "for cohorts; drop it")


def _check_labels(y: Any, n: int) -> np.ndarray:
    if y is None:
        raise C2ALError("CohortMiner requires y to be passed, but the target y is None: pass binary labels")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise C2ALError(f"y should be a 1d array of {n} labels (one per row of X), got shape {y.shape}")
    try:
        y = y.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise C2ALError(f"y must be binary 0/1 labels: {_one_line(err)}") from err
    other = ~np.isin(y, (0.0, 1.0))
    if other.any():
        raise C2ALError(f"y must be binary 0/1 labels; found {int(other.sum())} other values, "
                        f"e.g. {y[other][0]:g} at row {int(np.flatnonzero(other)[0])}")
    return y


def _check_scores(scores: Any, n: int) -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise C2ALError(f"scores must be predicted probabilities: {_one_line(err)}") from err
    if s.ndim != 1 or len(s) != n:
        raise C2ALError(f"scores should be a 1d array of {n} probabilities (one per row of X), got shape {s.shape}")
    if np.isnan(s).any():
        raise C2ALError(f"scores contain NaN (first at row {int(np.flatnonzero(np.isnan(s))[0])})")
    if s.min() < 0.0 or s.max() > 1.0:
        raise C2ALError(f"scores must be probabilities in [0, 1]; found values in [{s.min():g}, {s.max():g}]")
    return s


def _subsample(Z: np.ndarray, rows: int, rng: np.random.RandomState) -> np.ndarray:
    return Z[rng.choice(len(Z), rows, replace=False)] if len(Z) > rows else Z


def _nearest_center(Z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the closest center for each row of Z [N, D]; centers [K, D]."""
    sq = np.einsum("kd,kd->k", centers, centers)
    out = np.empty(len(Z), dtype=np.int64)
    for start in range(0, len(Z), CHUNK):
        block = Z[start:start + CHUNK]
        out[start:start + CHUNK] = np.argmin(sq[None, :] - 2.0 * block @ centers.T, axis=1)  # [CHUNK, K]
    return out


def _likeliest_component(Z: np.ndarray, weights: np.ndarray, means: np.ndarray,
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


def _rule_text(desc: dict[str, Any]) -> str:
    if "cluster" in desc:
        return f"{desc['source']} cluster {desc['cluster']}"
    if "value" in desc:
        return f"{desc['column']} == {desc['value']!r}"
    low, high, col = desc["low"], desc["high"], desc["column"]
    if low is None:
        return f"{col} < {high:g}"
    return f"{col} >= {low:g}" if high is None else f"{low:g} <= {col} < {high:g}"


def _disjoint(families: list[np.ndarray], family: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Whether candidates i and j share no sample, [C, C], from one contingency table per family pair."""
    same = family[:, None] == family[None, :]
    ok = same & (label[:, None] != label[None, :])  # a family is a partition of (some) rows
    for f in np.unique(family):
        for g in np.unique(family[family > f]):
            a, b = families[f], families[g]
            both = (a >= 0) & (b >= 0)
            n_b = int(b.max()) + 1
            shared = np.bincount(a[both] * n_b + b[both], minlength=(int(a.max()) + 1) * n_b) > 0
            rows, cols = np.flatnonzero(family == f), np.flatnonzero(family == g)
            block = ~shared.reshape(-1, n_b)[np.ix_(label[rows], label[cols])]
            ok[np.ix_(rows, cols)] = block
            ok[np.ix_(cols, rows)] = block.T
    return ok


def select_cohorts(contrast: np.ndarray, pair: np.ndarray, disjoint: np.ndarray, k: int) -> list[int]:
    """Pick up to k mutually disjoint candidates (the rule in the module docstring).

    Args:
        contrast: contrast of each qualifying candidate against the rest [C].
        pair: divergence between the candidates' own distributions [C, C].
        disjoint: whether two candidates share no sample [C, C].
        k: how many to pick.

    Returns:
        Indices into the candidates, fewer than k when no more disjoint ones exist.
    """
    if len(contrast) == 0:
        return []
    chosen = [int(np.argmax(contrast))]
    pair_score = np.where(disjoint, pair, -np.inf)
    if k >= 2 and np.isfinite(pair_score).any():
        # JS saturates at ln 2 for disjoint supports; break such ties by the contrasts' sum
        best = pair_score >= pair_score.max() - 1e-12
        total = np.where(best, contrast[:, None] + contrast[None, :], -np.inf)
        chosen = [int(i) for i in np.unravel_index(np.argmax(total), total.shape)]
    while len(chosen) < k:
        free = disjoint[chosen].all(axis=0)
        if not free.any():
            break
        chosen.append(int(np.argmax(np.where(free, contrast, -np.inf))))
    return chosen[:k]


class CohortMiner(ClusterMixin, BaseEstimator):
    """Mine K disjoint cohorts whose baseline predictions contrast most with the rest.

    Args:
        n_cohorts: K, how many cohorts to expose (2: the paper's head and tail).
        candidates: where candidates come from, "+"-joined: "kmeans" (MiniBatchKMeans),
            "gmm" (GaussianMixture), "axes" (axis buckets only), e.g. "kmeans+axes".
        n_clusters: clusters (or mixture components) per clusterer.
        axes: column names or positions to bucket. Numeric columns give quintiles plus
            the bottom and top 5%; categorical ones one bucket per value. None means
            no axis buckets, or every column when candidates include "axes".
        divergence: "js" (Jensen-Shannon, nats), "kl" (KL(inside || outside)) or
            "wasserstein" (W1 on a 200-bin quantile histogram).
        min_share: smallest share of samples an exposed cohort may have.
        max_share: largest share of samples an exposed cohort may have.
        random_state: seed for the clustering and its subsample.

    Attributes:
        cohorts_: one dict per exposed cohort (id order): its rule, source, share, plr, contrast.
        contrast_: contrast of each exposed cohort against the rest [K], decreasing.
        candidates_: DataFrame of every non-empty candidate: id, source, rule, size, share,
            plr, contrast, qualified (share within bounds), cohort (-1 if not exposed).
        rules_: the membership rule of every candidate, by candidate id (see `expose`).
        cluster_centers_: k-means centers [n_clusters, D] in the standardized, one-hot
            space (mixture means when only "gmm" is used); absent for axes only.
        labels_: cohort id of each training row, as `predict` would give it.
        n_features_in_: number of columns of X.
        feature_names_in_: column names, when X was a DataFrame with string names.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(5000, 3))
        >>> scores = 1 / (1 + np.exp(-2 * X[:, 0] - rng.normal(size=5000)))  # baseline leans on x0
        >>> y = (rng.random(5000) < scores).astype(int)
        >>> miner = CohortMiner(candidates="axes", max_share=0.1, random_state=0).fit(X, y, scores)
        >>> [(c["rule"].split()[0], c["share"]) for c in miner.cohorts_]   # bottom and top 5% of x0
        [('x0', 0.05), ('x0', 0.05)]
        >>> np.unique(miner.predict(X)).tolist()   # -1: in no exposed cohort
        [-1, 0, 1]
    """

    def __init__(self, n_cohorts: int = 2, *, candidates: str = "kmeans", n_clusters: int = 16,
                 axes: list[str | int] | None = None, divergence: str = "js", min_share: float = 0.02,
                 max_share: float = 0.2, random_state: int | np.random.RandomState | None = None) -> None:
        self.n_cohorts = n_cohorts
        self.candidates = candidates
        self.n_clusters = n_clusters
        self.axes = axes
        self.divergence = divergence
        self.min_share = min_share
        self.max_share = max_share
        self.random_state = random_state

    def __sklearn_tags__(self) -> Tags:  # noqa: D105 - scikit-learn protocol
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # y is the label the cohorts are contrasted on
        # declares the target binary, so estimator checks binarize the y they pass to fit
        tags.classifier_tags = ClassifierTags(multi_class=False)
        return tags

    # ---------------------------------------------------------------- fitting
    def fit(self, X: Any, y: Any = None, scores: Any = None) -> CohortMiner:
        """Build candidates, score them and expose the n_cohorts best disjoint ones.

        Args:
            X: per-sample cohort features [N, F], array or DataFrame (object, string,
                category and bool columns are categorical).
            y: binary labels [N].
            scores: the baseline's predicted probabilities [N]; None contrasts labels.

        Returns:
            self, fitted.
        """
        sources, metric = self._check_params()
        names, columns, kinds = self._read_fit_X(X, sources)
        axes = self._axis_positions(names, sources)
        y = _check_labels(y, len(columns[0]))
        scores = None if scores is None else _check_scores(scores, len(y))
        clusters = self._fit_clusters(columns, sources, check_random_state(self.random_state))
        families, rules = self._families(names, columns, clusters, axes)
        bins, support = self._target_bins(y, scores, metric)
        counts, table, kept = self._score(families, rules, bins, support, y, metric)
        chosen = self._choose(families, table, counts, support, metric)
        self.rules_ = kept
        self._set_cohorts(table.drop(columns=["family", "label"]), chosen)
        self.labels_ = self._assign(columns, clusters)
        return self

    def expose(self, candidate_ids: Any) -> CohortMiner:
        """A copy of this fitted miner exposing the given candidates as its cohorts instead.

        For controls and hand-picked cohorts: e.g. the least contrasting
        candidates, `miner.expose(miner.candidates_.nsmallest(2, "contrast")["id"])`.
        The copy predicts through the same rules; no refit.

        Args:
            candidate_ids: ids from `candidates_["id"]`, in the cohort order wanted.
                Rows in two of them go to the lower cohort id, as in `predict`.

        Returns:
            A fitted CohortMiner whose `cohorts_`, `contrast_` and `candidates_["cohort"]`
            follow candidate_ids. It has no `labels_` (those were the training rows'
            ids under the original cohorts).
        """
        check_is_fitted(self, "cohorts_")
        if not hasattr(self, "rules_"):
            raise C2ALError("this CohortMiner was saved before candidate rules were kept; fit it again to expose candidates")
        ids = [int(i) for i in np.asarray(candidate_ids).ravel()]
        bad = [i for i in ids if not 0 <= i < len(self.rules_)]
        if not ids or bad or len(set(ids)) != len(ids):
            raise C2ALError(f"expose needs distinct candidate ids in [0, {len(self.rules_)}), got {ids}")
        out = copy.copy(self)
        out._set_cohorts(self.candidates_.copy(), ids)
        out.__dict__.pop("labels_", None)
        return out

    def _set_cohorts(self, table: pd.DataFrame, ids: list[int]) -> None:
        """Expose candidates `ids` (in cohort order): cohorts_, contrast_, and candidates_ = table marked."""
        self.cohorts_ = [dict(self.rules_[i], cohort=k, candidate=i,
                              **{c: float(table.at[i, c]) for c in ("share", "plr", "contrast")})
                         for k, i in enumerate(ids)]
        self.contrast_ = table.loc[ids, "contrast"].to_numpy(dtype=np.float64)
        table["cohort"] = -1
        table.loc[ids, "cohort"] = np.arange(len(ids))
        self.candidates_ = table

    def _check_params(self) -> tuple[list[str], str]:
        parts = self.candidates.split("+") if isinstance(self.candidates, str) else [None]
        if not parts or any(p not in SOURCES for p in parts) or len(set(parts)) != len(parts):
            raise C2ALError(f"candidates={self.candidates!r}: expected '+'-joined names from {SOURCES}")
        if self.divergence not in dv.METRICS:
            raise C2ALError(f"divergence={self.divergence!r}: expected one of {dv.METRICS}")
        for name in ("n_cohorts", "n_clusters"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise C2ALError(f"{name}={value!r}: expected a positive integer")
        shares = (self.min_share, self.max_share)
        numeric = all(isinstance(v, (int, float, np.number)) for v in shares)
        if not numeric or not 0 <= shares[0] <= shares[1] <= 1:
            raise C2ALError(f"min_share={self.min_share!r}, max_share={self.max_share!r}: "
                            "expected 0 <= min_share <= max_share <= 1")
        if self.axes is not None and "axes" not in parts:
            parts.append("axes")
        return parts, self.divergence

    def _read_fit_X(self, X: Any, sources: list[str]) -> tuple[list[str], list[np.ndarray], list[str]]:
        names, columns, kinds = _read_columns(X)
        if len(columns[0]) < 2:
            raise C2ALError(f"X has n_samples={len(columns[0])}; a cohort needs other samples to contrast with")
        _check_finite(names, columns, kinds)
        _check_informative(names, columns)
        for name in (*ARRAYS, "feature_names_in_"):  # a refit must not keep the previous fit's state
            self.__dict__.pop(name, None)
        self.n_features_in_ = len(names)
        if isinstance(X, pd.DataFrame) and all(isinstance(c, str) for c in X.columns):
            self.feature_names_in_ = np.asarray(names, dtype=object)
        self._names, self._kinds = names, kinds
        self._stats = [sorted(set(v)) if k == "categorical" else [float(v.mean()), float(v.std())]
                       for v, k in zip(columns, kinds)]
        wide = [n for n, st, k in zip(names, self._stats, kinds) if k == "categorical" and len(st) > MAX_ONEHOT]
        if wide and any(s in CLUSTERERS for s in sources):
            raise C2ALError(f"{_label(wide[0])} has more than {MAX_ONEHOT} values, too many to one-hot "
                            "encode for clustering; bucket it, or use it with candidates='axes'")
        return names, columns, kinds

    def _design(self, columns: list[np.ndarray]) -> np.ndarray:
        """Clustering input [N, D]: standardized numeric columns, one-hot categorical ones."""
        parts = []
        for values, kind, stat in zip(columns, self._kinds, self._stats):
            if kind == "numeric":
                parts.append(((values - stat[0]) / stat[1])[:, None])
                continue
            codes = pd.Categorical(values, categories=stat).codes.astype(np.int64)
            onehot = np.zeros((len(values), len(stat)))
            seen = codes >= 0  # a category unseen at fit belongs to no one-hot column
            onehot[np.flatnonzero(seen), codes[seen]] = 1.0
            parts.append(onehot)
        return np.hstack(parts)

    def _fit_clusters(self, columns: list[np.ndarray], sources: list[str],
                      rng: np.random.RandomState) -> dict[str, np.ndarray]:
        used = [s for s in CLUSTERERS if s in sources]
        if not used:
            return {}
        Z = self._design(columns)  # [N, D]
        k = min(self.n_clusters, len(Z))
        # D is small, so each step of either fit is too small to gain from threads; on a busy machine
        # their spin-waits made MiniBatchKMeans ~25x slower (100k rows: 0.14 s on one thread, 3.6 s on two)
        with threadpool_limits(limits=1):
            if "gmm" in used:
                gmm = GaussianMixture(k, reg_covar=1e-4, init_params="k-means++", random_state=rng)
                gmm.fit(_subsample(Z, FIT_ROWS["gmm"], rng))
                self.gmm_weights_, self.gmm_means_ = gmm.weights_, gmm.means_
                self.gmm_precisions_cholesky_ = gmm.precisions_cholesky_
                self.cluster_centers_ = gmm.means_
            if "kmeans" in used:
                km = MiniBatchKMeans(k, batch_size=KMEANS_BATCH, n_init=3, random_state=rng)
                self.cluster_centers_ = km.fit(_subsample(Z, FIT_ROWS["kmeans"], rng)).cluster_centers_
        return self._cluster_labels(Z, used)

    def _cluster_labels(self, Z: np.ndarray, used: list[str]) -> dict[str, np.ndarray]:
        out = {}
        if "kmeans" in used:
            out["kmeans"] = _nearest_center(Z, self.cluster_centers_)
        if "gmm" in used:
            out["gmm"] = _likeliest_component(Z, self.gmm_weights_, self.gmm_means_,
                                              self.gmm_precisions_cholesky_)
        return out

    # ------------------------------------------------------------- candidates
    def _axis_positions(self, names: list[str], sources: list[str]) -> list[int]:
        if "axes" not in sources:
            return []
        if self.axes is None:
            return list(range(len(names)))
        positions = []
        for axis in self.axes:
            if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis < len(names):
                positions.append(int(axis))
            elif isinstance(axis, str) and axis in names:
                positions.append(names.index(axis))
            else:
                raise C2ALError(f"axes: unknown column {axis!r}; X has columns {names}")
        return positions

    def _axis_rules(self, name: str, values: np.ndarray, kind: str) -> list[list[dict[str, Any]]]:
        """Rule families of one axis column; the rules of a family never overlap."""
        source = f"axis:{name}"
        if kind == "categorical":
            return [[{"source": source, "column": name, "value": v} for v in self._stats[self._names.index(name)]]]
        q = [float(v) for v in np.quantile(values, QUINTILES + (TAIL, 1.0 - TAIL))]
        cuts = [None, *q[:4], None]
        quintiles = [{"source": source, "column": name, "low": lo, "high": hi} for lo, hi in zip(cuts, cuts[1:])]
        tails = [{"source": source, "column": name, "low": None, "high": q[4]},
                 {"source": source, "column": name, "low": q[5], "high": None}]
        return [quintiles, tails]

    def _families(self, names: list[str], columns: list[np.ndarray], clusters: dict[str, np.ndarray],
                  axes: list[int]) -> tuple[list[np.ndarray], list[list[dict[str, Any]]]]:
        """Candidate families: label arrays [N] (-1: in none) and each family's rules."""
        families: list[list[dict[str, Any]]] = [
            [{"source": s, "cluster": j} for j in range(len(self.cluster_centers_))] for s in clusters]
        for pos in axes:
            families += self._axis_rules(names[pos], columns[pos], self._kinds[pos])
        labels = []
        for rules in families:
            for rule in rules:
                rule["rule"] = _rule_text(rule)
            if "value" in rules[0]:  # one pass instead of one mask per value of a wide column
                values = columns[self._names.index(rules[0]["column"])]
                labels.append(pd.Categorical(values, categories=[r["value"] for r in rules]).codes.astype(np.int64))
                continue
            member = np.full(len(columns[0]), -1, dtype=np.int64)
            for j, rule in enumerate(rules):
                # membership through the same code path as predict, so fit and predict agree
                member[self._members(rule, columns, clusters)] = j
            labels.append(member)
        return labels, families

    def _members(self, rule: dict[str, Any], columns: list[np.ndarray],
                 clusters: dict[str, np.ndarray]) -> np.ndarray:
        if "cluster" in rule:
            return clusters[rule["source"]] == rule["cluster"]
        values = columns[self._names.index(rule["column"])]
        if "value" in rule:
            return values == rule["value"]
        mask = np.ones(len(values), dtype=bool)
        if rule["low"] is not None:
            mask &= values >= rule["low"]
        if rule["high"] is not None:
            mask &= values < rule["high"]
        return mask

    # ---------------------------------------------------------------- scoring
    @staticmethod
    def _target_bins(y: np.ndarray, scores: np.ndarray | None, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Histogram bin of each sample and the bins' positions [B]."""
        if scores is None:  # Bernoulli labels: two bins at 0 and 1
            return y.astype(np.int64), np.array([0.0, 1.0])
        edges = dv.bin_edges(scores, SCORE_BINS[metric])
        bins = dv.bin_index(scores, edges)
        return bins, dv.bin_support(scores, bins, len(edges) + 1)

    def _score(self, families: list[np.ndarray], rules: list[list[dict[str, Any]]], bins: np.ndarray,
               support: np.ndarray, y: np.ndarray, metric: str
               ) -> tuple[np.ndarray, pd.DataFrame, list[dict[str, Any]]]:
        """Histogram [C, B], table row and rule of every candidate (empty ones dropped)."""
        n_bins, n = len(support), len(y)
        self._pooled = np.bincount(bins, minlength=n_bins)  # histogram of all samples [B]
        counts, positives, family, label = [], [], [], []
        descs = [rule for family_rules in rules for rule in family_rules]
        for f, member in enumerate(families):
            n_rules, inside = len(rules[f]), member >= 0
            hist = np.bincount(member[inside] * n_bins + bins[inside], minlength=n_rules * n_bins)
            counts.append(hist.reshape(n_rules, n_bins))
            positives.append(np.bincount(member[inside], weights=y[inside], minlength=n_rules))
            family.append(np.full(n_rules, f))
            label.append(np.arange(n_rules))
        counts, positives = np.concatenate(counts), np.concatenate(positives)
        size = counts.sum(axis=1)
        keep = np.flatnonzero(size > 0)
        share = size / n
        table = pd.DataFrame({
            "id": np.arange(len(keep)), "source": [descs[i]["source"] for i in keep],
            "rule": [descs[i]["rule"] for i in keep], "size": size[keep], "share": share[keep],
            "plr": positives[keep] / size[keep],
            "contrast": dv.contrast(metric, counts[keep], self._pooled, support),
            "qualified": (share[keep] >= self.min_share) & (share[keep] <= self.max_share),
            "cohort": -1, "family": np.concatenate(family)[keep], "label": np.concatenate(label)[keep]})
        return counts[keep], table, [descs[i] for i in keep]

    def _choose(self, families: list[np.ndarray], table: pd.DataFrame, counts: np.ndarray,
                support: np.ndarray, metric: str) -> list[int]:
        """Ids of the exposed candidates, most contrasting first."""
        q = np.flatnonzero(table["qualified"].to_numpy())
        disjoint = _disjoint(families, table["family"].to_numpy()[q], table["label"].to_numpy()[q])
        contrast = table["contrast"].to_numpy()[q]
        pair = dv.pairwise(metric, counts[q], support, prior=self._pooled)
        picked = select_cohorts(contrast, pair, disjoint, self.n_cohorts)
        if len(picked) < self.n_cohorts:
            raise C2ALError(
                f"n_cohorts={self.n_cohorts} but only {len(q)} candidates have a share in "
                f"[min_share={self.min_share}, max_share={self.max_share}] and {len(picked)} of them were found "
                "disjoint; lower n_cohorts or min_share, or raise n_clusters / max_share")
        return [int(i) for i in q[sorted(picked, key=lambda i: -contrast[i])]]

    # ------------------------------------------------------------- predicting
    def _assign(self, columns: list[np.ndarray], clusters: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.full(len(columns[0]), -1, dtype=np.int64)
        # cohorts are disjoint on the training rows; on new rows the lower id wins a tie
        for k in reversed(range(len(self.cohorts_))):
            ids[self._members(self.cohorts_[k], columns, clusters)] = k
        return ids

    def predict(self, X: Any) -> np.ndarray:
        """Cohort id of each row: 0..K-1 in decreasing contrast, -1 for none.

        Args:
            X: features with the columns seen by `fit` [N, F].

        Returns:
            int64 ids [N].
        """
        check_is_fitted(self, "cohorts_")
        names, columns, kinds = _read_columns(X)
        self._check_same_columns(X, names, kinds)
        _check_finite(names, columns, kinds)
        used = sorted({c["source"] for c in self.cohorts_} & set(CLUSTERERS))
        clusters = self._cluster_labels(self._design(columns), used) if used else {}
        return self._assign(columns, clusters)

    def describe(self, X: Any, top: int = 3) -> list[dict[str, Any]]:
        """What sets each exposed cohort apart in X: its most distinctive traits.

        `describe_cohorts(X, self.predict(X), len(self.cohorts_), top)`; see there.
        """
        return describe_cohorts(X, self.predict(X), len(self.cohorts_), top)

    def fit_predict(self, X: Any, y: Any = None, scores: Any = None) -> np.ndarray:
        """Fit, then return the cohort id of each training row (see `fit` and `predict`)."""
        return self.fit(X, y, scores).labels_

    def _check_same_columns(self, X: Any, names: list[str], kinds: list[str]) -> None:
        if len(names) != self.n_features_in_:
            raise C2ALError(f"X has {len(names)} features, but CohortMiner is expecting "
                            f"{self.n_features_in_} features as input")
        if isinstance(X, pd.DataFrame) and names != self._names:
            missing = [n for n in self._names if n not in names]
            extra = [n for n in names if n not in self._names]
            if not missing and not extra:
                raise C2ALError(f"X columns are in a different order than at fit; expected {self._names}")
            raise C2ALError(f"X columns differ from fit: missing {missing}, unexpected {extra}")
        bad = [n for n, k, fk in zip(self._names, kinds, self._kinds) if k != fk]
        if bad:
            raise C2ALError(f"X columns {bad} changed between numeric and categorical since fit")

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the fitted miner as JSON plus .npz (no pickle), each file atomically.

        Args:
            path: "dir/name" or "dir/name.json"; writes dir/name.json and dir/name.npz.

        Returns:
            The JSON path.
        """
        check_is_fitted(self, "cohorts_")
        json_path, npz_path = _paths(path)
        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(self, name) for name in ARRAYS if hasattr(self, name)})
        arrays = buffer.getvalue()
        params = self.get_params()
        if not isinstance(params["random_state"], (int, type(None))):
            params["random_state"] = None  # a RandomState object has no plain form; it only seeded fit
        meta = {"format": FORMAT, "params": params, "arrays_sha256": hashlib.sha256(arrays).hexdigest(),
                "feature_names_in_": getattr(self, "feature_names_in_", None),
                "candidates_": self.candidates_.to_dict(orient="list"),
                **{name: getattr(self, name) for name in STATE + OPTIONAL_STATE if hasattr(self, name)}}
        # arrays first: the JSON names their hash, so a crash between the writes is caught at load
        atomic_write_bytes(npz_path, arrays)
        atomic_write_bytes(json_path, json.dumps(meta, indent=1, default=_plain).encode())
        return json_path

    @classmethod
    def load(cls, path: str | Path) -> CohortMiner:
        """Read a miner written by `save`; it predicts exactly as the saved one.

        Args:
            path: the path given to `save`.

        Returns:
            A fitted CohortMiner.
        """
        json_path, npz_path = _paths(path)
        try:
            meta = json.loads(json_path.read_text())
            arrays = npz_path.read_bytes()
        except (OSError, ValueError) as err:
            raise C2ALError(f"{json_path}: cannot read a saved CohortMiner ({_one_line(err)})") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise C2ALError(f"{json_path}: not a saved CohortMiner (format {FORMAT!r} expected)")
        if hashlib.sha256(arrays).hexdigest() != meta["arrays_sha256"]:
            raise C2ALError(f"{npz_path}: does not match {json_path.name} (hash differs); save again")
        try:
            miner = cls(**meta["params"])
            for name in STATE:
                setattr(miner, name, meta[name])
            for name in OPTIONAL_STATE:
                if name in meta:
                    setattr(miner, name, meta[name])
            if meta["feature_names_in_"] is not None:
                miner.feature_names_in_ = np.asarray(meta["feature_names_in_"], dtype=object)
            miner.candidates_ = pd.DataFrame(meta["candidates_"])
        except (KeyError, TypeError) as err:
            raise C2ALError(f"{json_path}: saved CohortMiner is incomplete ({_one_line(err)})") from err
        with np.load(io.BytesIO(arrays), allow_pickle=False) as npz:
            for name in npz.files:
                setattr(miner, name, npz[name])
        return miner


def _paths(path: str | Path) -> tuple[Path, Path]:
    json_path = Path(path)
    if json_path.suffix != ".json":
        json_path = json_path.with_name(json_path.name + ".json")
    return json_path, json_path.with_suffix(".npz")


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")
