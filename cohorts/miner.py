"""CohortMiner: finds the cohorts whose baseline predictions contrast most.

C2AL gives each exposed cohort an auxiliary head. The paper chose cohorts by
hand along interpretable axes; the miner searches instead. It builds candidate
cohorts (`candidates`) from clustering user features (k-means or a Gaussian
mixture), from axis buckets (quantiles of a numeric column, values of a
categorical one) and from the nodes of a decision tree (conjunctions such as
`region=3 & age>54.5`), scores each by the divergence between the baseline's
predictions inside and outside it, and exposes up to K disjoint candidates
whose share of samples lies in [min_share, max_share] and whose contrast is
real (`selection`): it beats the best candidate of every shuffle of the scores
(a permutation test that rebuilds the trees each time) and is large enough to
matter (MIN_CONTRAST, unless the labels confirm it). When no candidate passes,
the miner exposes none and `found_` is False: nothing contrasts, and C2AL has
nothing to add to the baseline. Saving and loading live in `persistence`,
cohort traits in `describe`.

Letters: N samples, D encoded features, C candidates, B histogram bins, K cohorts.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils import ClassifierTags, Tags, check_random_state
from sklearn.utils.validation import check_is_fitted

from c2al.cohorts import candidates as cand
from c2al.cohorts import divergence as dv
from c2al.cohorts import persistence
from c2al.cohorts.candidates import CLUSTERERS, ONEHOT_SOURCES, SOURCES
from c2al.cohorts.describe import describe_cohorts
from c2al.cohorts.encoding import MAX_ONEHOT, Encoding, check_finite, check_informative, column_label, one_line, read_columns
from c2al.cohorts.rules import members
from c2al.cohorts.selection import against_rest, choose, null_max_g, score_candidates, target_bins
from c2al.errors import C2ALError

# smallest contrast an exposed cohort needs, per divergence: significance alone is not enough, since a
# baseline that overfits user features gives them real but small score differences (the best significant
# JS contrast on the 12 null worlds of benchmarks/cohort_recovery_worlds.py --set tune reached 0.027; of
# the grid 0.02, 0.022, 0.025, 0.028, 0.03 the smallest that exposed nothing there); kl and wasserstein untuned
MIN_CONTRAST = {"js": 0.028, "kl": 0.0, "wasserstein": 0.0}


def _check_labels(y: Any, n: int) -> np.ndarray:
    if y is None:
        raise C2ALError("CohortMiner requires y to be passed, but the target y is None: pass binary labels")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise C2ALError(f"y should be a 1d array of {n} labels (one per row of X), got shape {y.shape}")
    try:
        y = y.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise C2ALError(f"y must be binary 0/1 labels: {one_line(err)}") from err
    other = ~np.isin(y, (0.0, 1.0))
    if other.any():
        raise C2ALError(f"y must be binary 0/1 labels; found {int(other.sum())} other values, "
                        f"e.g. {y[other][0]:g} at row {int(np.flatnonzero(other)[0])}")
    return y


def _check_scores(scores: Any, n: int) -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise C2ALError(f"scores must be predicted probabilities: {one_line(err)}") from err
    if s.ndim != 1 or len(s) != n:
        raise C2ALError(f"scores should be a 1d array of {n} probabilities (one per row of X), got shape {s.shape}")
    if np.isnan(s).any():
        raise C2ALError(f"scores contain NaN (first at row {int(np.flatnonzero(np.isnan(s))[0])})")
    if s.min() < 0.0 or s.max() > 1.0:
        raise C2ALError(f"scores must be probabilities in [0, 1]; found values in [{s.min():g}, {s.max():g}]")
    return s


class CohortMiner(ClusterMixin, BaseEstimator):
    """Mine up to K disjoint cohorts whose baseline predictions contrast most with the rest.

    Args:
        n_cohorts: K, the most cohorts to expose (2: the paper's head and tail).
        candidates: where candidates come from, "+"-joined: "kmeans" (MiniBatchKMeans),
            "gmm" (GaussianMixture), "axes" (axis buckets only), "tree" (the nodes of a
            classification tree of the score bins on the features: conjunctions such as
            `region=3 & age>54.5`), e.g. "kmeans+axes" or "kmeans+tree".
        n_clusters: clusters (or mixture components) per clusterer; most leaves of the tree.
        axes: column names or positions to bucket. Numeric columns give quintiles plus
            the bottom and top 5%; categorical ones one bucket per value. None means
            no axis buckets, or every column when candidates include "axes".
        divergence: "js" (Jensen-Shannon, nats), "kl" (KL(inside || outside)) or
            "wasserstein" (W1 on a 200-bin quantile histogram).
        min_share: smallest share of samples an exposed cohort may have.
        max_share: largest share of samples an exposed cohort may have.
        categorical: columns that are categorical whatever their dtype (an integer-coded id named
            in --sparse); object, string, category and bool columns are categorical anyway.
        n_permutations: B, how many shuffles of the scores make the null distribution of the
            best candidate's evidence (`selection.g_statistic`, candidates rebuilt on every
            shuffle); 0 turns the test off (with min_contrast=0 too, n_cohorts cohorts are always exposed).
        alpha: a candidate is exposed only if its permutation p-value, the share of shuffles
            whose best candidate has at least its evidence ((1 + count) / (B + 1)), is at most
            alpha. With B = 19 and alpha = 0.05 it must beat every shuffle.
        min_contrast: smallest contrast an exposed cohort needs, unless its click rate differs
            from the rest's at level alpha (Bonferroni over the qualified candidates); None is
            MIN_CONTRAST of the divergence (js 0.028, chosen on the tuning worlds of
            benchmarks/cohort_recovery_worlds.py; kl and wasserstein 0, untuned).
        random_state: seed for the clustering, the tree, their subsamples and the shuffles.

    Attributes:
        cohorts_: one dict per exposed cohort (id order): its rule, source, share, plr, contrast,
            g and p_value. Fewer than n_cohorts, or none, when no more candidates pass the
            permutation test: then nothing contrasts with the rest (see `found_`).
        found_: whether any cohort was exposed (False: the baseline's scores show no cohort).
        contrast_: contrast of each exposed cohort against the rest [K], decreasing.
        null_max_: the best qualifying candidate's G on each shuffle [B] (absent when B = 0).
        candidates_: DataFrame of every non-empty candidate: id, source, rule, size, share,
            plr, contrast, qualified (share within bounds), g, p_value, eligible (qualified and
            p_value <= alpha), cohort (-1 if not exposed).
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
                 max_share: float = 0.2, categorical: tuple[str, ...] = (), n_permutations: int = 19, alpha: float = 0.05,
                 min_contrast: float | None = None,
                 random_state: int | np.random.RandomState | None = None) -> None:
        self.n_cohorts = n_cohorts
        self.candidates = candidates
        self.n_clusters = n_clusters
        self.axes = axes
        self.divergence = divergence
        self.min_share = min_share
        self.max_share = max_share
        self.categorical = categorical
        self.n_permutations = n_permutations
        self.alpha = alpha
        self.min_contrast = min_contrast
        self.random_state = random_state

    def __sklearn_tags__(self) -> Tags:
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
        axes = cand.axis_positions(self.axes, names, sources)
        y = _check_labels(y, len(columns[0]))
        scores = None if scores is None else _check_scores(scores, len(y))
        rng = check_random_state(self.random_state)
        clusters = self._fit_clusters(columns, sources, rng)
        n_clusters = len(self.cluster_centers_) if clusters else 0
        bins, support = target_bins(y, scores, metric)
        target = y if scores is None else scores  # what the regression tree explains
        tree = self._tree_rules(columns, bins, target, rng) if "tree" in sources else []
        families, rules = cand.families(self._encoding(), columns, clusters, n_clusters, axes, tree)
        shares = (self.min_share, self.max_share)
        counts, pooled, table, kept = score_candidates(families, rules, bins, support, y, metric, shares)
        fixed = [f for f, r in zip(families, rules) if r[0]["source"] != "tree"]  # what a shuffle leaves as it is
        significant = self._permutation_test(table, fixed, columns, (bins, target), sources, rng)
        rescore = None if significant is None else self._rescore(table, counts, pooled, support, y)
        if rescore is not None:
            table["eligible"] = significant & rescore([])[1]
        chosen = choose(families, table, self.n_cohorts, shares, significant, rescore)
        self.rules_ = kept
        self._set_cohorts(table.drop(columns=["family", "label"]), chosen)
        self.labels_ = self._assign(columns, clusters)
        return self

    def _permutation_test(self, table: pd.DataFrame, fixed: list[np.ndarray], columns: list[np.ndarray],
                          targets: tuple[np.ndarray, np.ndarray], sources: list[str],
                          rng: np.random.RandomState) -> np.ndarray | None:
        """Which candidates pass the permutation test [C] (None when it is off); adds g's p_value to `table`.

        Shuffling the scores across rows keeps X and every score but breaks their link; the
        candidates that depend on the scores (the tree) are rebuilt on each shuffle, so the null
        distribution includes the search that found them.
        """
        if self.n_permutations == 0:
            return None if self._min_contrast() == 0 else table["qualified"].to_numpy()

        bins, target = targets

        def rebuild(order: np.ndarray) -> list[np.ndarray]:
            tree = self._tree_rules(columns, bins[order], target[order], rng)
            return cand.families(self._encoding(), columns, {}, 0, [], tree)[0] if tree else []

        refit = rebuild if "tree" in sources else None
        self.null_max_ = null_max_g(fixed, bins, (self.min_share, self.max_share), self.n_permutations, rng, refit)
        g = table["g"].to_numpy()
        table["p_value"] = (1 + (self.null_max_[None, :] >= g[:, None]).sum(axis=1)) / (self.n_permutations + 1)
        table["eligible"] = table["qualified"].to_numpy() & (table["p_value"].to_numpy() <= self.alpha)
        return table["eligible"].to_numpy()

    def _rescore(self, table: pd.DataFrame, counts: np.ndarray, pooled: np.ndarray, support: np.ndarray,
                 y: np.ndarray) -> Any:
        """chosen ids -> (contrast [C], strong enough [C]) against the rows in no chosen cohort.

        Strong enough: a contrast of at least min_contrast, or a click rate that differs from
        that rest's at level alpha (Bonferroni over the qualified candidates).
        """
        positives = table["plr"].to_numpy() * table["size"].to_numpy()
        n_tests, minc = max(int(table["qualified"].sum()), 1), self._min_contrast()

        def rescore(chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
            contrast, label_p = against_rest(counts, positives, pooled, float(y.sum()), support, self.divergence, chosen)
            return contrast, (contrast >= minc) | (label_p * n_tests <= self.alpha)
        return rescore

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
        stats = [c for c in ("share", "plr", "contrast", "g", "p_value") if c in table]
        self.cohorts_ = [dict(self.rules_[i], cohort=k, candidate=i, **{c: float(table.at[i, c]) for c in stats})
                         for k, i in enumerate(ids)]
        self.found_ = bool(ids)
        self.contrast_ = table.loc[ids, "contrast"].to_numpy(dtype=np.float64).reshape(len(ids))
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
        n_perm = self.n_permutations
        if not isinstance(n_perm, (int, np.integer)) or isinstance(n_perm, bool) or n_perm < 0:
            raise C2ALError(f"n_permutations={n_perm!r}: expected a non-negative integer (0: no permutation test)")
        if not isinstance(self.alpha, (int, float, np.number)) or not 0 < self.alpha <= 1:
            raise C2ALError(f"alpha={self.alpha!r}: expected a significance level in (0, 1]")
        if n_perm and self.alpha < 1.0 / (n_perm + 1):
            raise C2ALError(f"alpha={self.alpha!r} is below 1 / {n_perm + 1}, the smallest p-value {n_perm} permutations "
                            "can give, so nothing could be exposed; raise n_permutations or alpha")
        minc = self.min_contrast
        if minc is not None and (not isinstance(minc, (int, float, np.number)) or isinstance(minc, bool) or minc < 0):
            raise C2ALError(f"min_contrast={minc!r}: expected None (the divergence's default) or a contrast >= 0")
        self._categorical()
        if self.axes is not None and "axes" not in parts:
            parts.append("axes")
        return parts, self.divergence

    def _min_contrast(self) -> float:
        """min_contrast, or the divergence's default (MIN_CONTRAST) when None."""
        if self.min_contrast is None:
            return MIN_CONTRAST[self.divergence]
        return float(self.min_contrast)

    def _categorical(self) -> tuple[str, ...]:
        """The `categorical` column names as a tuple (a bare string would read as its letters)."""
        if isinstance(self.categorical, str) or not all(isinstance(c, str) for c in self.categorical):
            raise C2ALError(f"categorical={self.categorical!r}: expected a list of column names")
        return tuple(self.categorical)

    def _read_fit_X(self, X: Any, sources: list[str]) -> tuple[list[str], list[np.ndarray], list[str]]:
        names, columns, kinds = read_columns(X, self._categorical())
        if len(columns[0]) < 2:
            raise C2ALError(f"X has n_samples={len(columns[0])}; a cohort needs other samples to contrast with")
        check_finite(names, columns, kinds)
        check_informative(names, columns)
        for name in (*persistence.ARRAYS, "feature_names_in_"):  # a refit must not keep the previous fit's state
            self.__dict__.pop(name, None)
        self.n_features_in_ = len(names)
        if isinstance(X, pd.DataFrame) and all(isinstance(c, str) for c in X.columns):
            self.feature_names_in_ = np.asarray(names, dtype=object)
        enc = Encoding.from_columns(names, columns, kinds)
        # kept as three plain lists: the saved JSON (and miners saved before Encoding existed) holds them so
        self._names, self._kinds, self._stats = enc.columns, enc.kinds, enc.stats
        wide = enc.wide_columns()
        if wide and any(s in ONEHOT_SOURCES for s in sources):
            raise C2ALError(f"{column_label(wide[0])} has more than {MAX_ONEHOT} values, too many to one-hot "
                            "encode for clustering or a tree; bucket it, or use it with candidates='axes'")
        return names, columns, kinds

    def _encoding(self) -> Encoding:
        return Encoding(self._names, self._kinds, self._stats)

    def _fit_clusters(self, columns: list[np.ndarray], sources: list[str],
                      rng: np.random.RandomState) -> dict[str, np.ndarray]:
        used = [s for s in CLUSTERERS if s in sources]
        if not used:
            return {}
        Z = self._encoding().transform(columns)  # [N, D]
        for name, value in cand.fit_clusterers(Z, used, self.n_clusters, rng).items():
            setattr(self, name, value)
        return self._cluster_labels(Z, used)

    def _cluster_labels(self, Z: np.ndarray, used: list[str]) -> dict[str, np.ndarray]:
        return cand.cluster_labels(Z, used, {n: getattr(self, n) for n in persistence.ARRAYS if hasattr(self, n)})

    def _tree_rules(self, columns: list[np.ndarray], bins: np.ndarray, target: np.ndarray,
                    rng: np.random.RandomState) -> list[list[dict[str, Any]]]:
        # the trees explain the scores, not the residuals y - p: the selection rewards cohorts whose
        # score distribution differs, which is what a split on the scores finds, while residuals are mostly
        # Bernoulli noise and near 0 wherever the baseline fits a cohort (3 seeds, ARI vs planted
        # cohorts: p 0.77 / 0.93 / 0.93 on planted clusters / conjunctions at two sizes, y - p 0.35 / 0.36 / 0.38)
        enc = self._encoding()
        return (cand.tree_rules(enc, columns, target, self.min_share, self.n_clusters, rng)
                + cand.tree_rules(enc, columns, bins, self.min_share, self.n_clusters, rng, classify=True))

    # ------------------------------------------------------------- predicting
    def _assign(self, columns: list[np.ndarray], clusters: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.full(len(columns[0]), -1, dtype=np.int64)
        # cohorts are disjoint on the training rows; on new rows the lower id wins a tie
        for k in reversed(range(len(self.cohorts_))):
            ids[members(self.cohorts_[k], self._names, columns, clusters)] = k
        return ids

    def predict(self, X: Any) -> np.ndarray:
        """Cohort id of each row: 0..K-1 in decreasing contrast, -1 for none.

        Args:
            X: features with the columns seen by `fit` [N, F].

        Returns:
            int64 ids [N].
        """
        check_is_fitted(self, "cohorts_")
        names, columns, kinds = read_columns(X, self._categorical())
        self._check_same_columns(X, names, kinds)
        check_finite(names, columns, kinds)
        used = sorted({c["source"] for c in self.cohorts_} & set(CLUSTERERS))
        clusters = self._cluster_labels(self._encoding().transform(columns), used) if used else {}
        return self._assign(columns, clusters)

    def describe(self, X: Any, top: int = 3) -> list[dict[str, Any]]:
        """What sets each exposed cohort apart in X: its rule where it reads in X's columns, and its traits.

        `describe_cohorts(X, self.predict(X), len(self.cohorts_), top)` (see there), plus
        "rule" for axis and tree cohorts (`region=3 & age_z>0.57`).

        Returns:
            One dict per cohort: {"cohort", "share", "traits"} and, unless a cluster, "rule".
        """
        out = describe_cohorts(X, self.predict(X), len(self.cohorts_), top)
        for described, cohort in zip(out, self.cohorts_):
            if "cluster" not in cohort:  # "kmeans cluster 3" names no column; the traits say what it is
                described["rule"] = cohort["rule"]
        return out

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
        return persistence.save_miner(self, path)

    @classmethod
    def load(cls, path: str | Path) -> CohortMiner:
        """Read a miner written by `save`; it predicts exactly as the saved one.

        Args:
            path: the path given to `save`.

        Returns:
            A fitted CohortMiner.
        """
        return persistence.load_miner(cls, path)
