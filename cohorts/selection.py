"""Scoring candidates by contrast and choosing the exposed, disjoint ones.

Selection rule (`CohortMiner`). Only eligible candidates compete: a share in
[min_share, max_share], a permutation p-value at most alpha and a contrast of at
least min_contrast unless the labels confirm it (`null_max_g`, miner.py). The
most contrasting eligible candidate is exposed first, then greedily the most
contrasting eligible candidate disjoint from those already chosen, up to K;
after each pick, contrast and label test are measured against the rows in no
chosen cohort (`against_rest`). Exposed ids are ordered by contrast, 0 first. (The paper's head/tail pair,
the two candidates whose own distributions diverge most from each other, is
`select_cohorts`, which the federated miner keeps: on random worlds it preferred
a large high-score cohort against a large low-score one to the planted pair:
median ARI 0.71 against 0.99 for the two most contrasting, on the tuning worlds
of benchmarks/cohort_recovery_worlds.py.)

Letters: N samples, C candidates, B histogram bins, K cohorts.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import erfc

from c2al.cohorts import divergence as dv
from c2al.errors import C2ALError

SCORE_BINS = {"js": 20, "kl": 20, "wasserstein": 200}


def target_bins(y: np.ndarray, scores: np.ndarray | None, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Histogram bin of each sample [N] and the bins' positions [B].

    Args:
        y: binary labels [N].
        scores: the baseline's predictions [N], or None to contrast labels.
        metric: the divergence, which sets the number of score bins.

    Returns:
        (bins, support).
    """
    if scores is None:  # Bernoulli labels: two bins at 0 and 1
        return y.astype(np.int64), np.array([0.0, 1.0])
    edges = dv.bin_edges(scores, SCORE_BINS[metric])
    bins = dv.bin_index(scores, edges)
    return bins, dv.bin_support(scores, bins, len(edges) + 1)


def score_candidates(families: list[np.ndarray], rules: list[list[dict[str, Any]]], bins: np.ndarray,
                     support: np.ndarray, y: np.ndarray, metric: str, shares: tuple[float, float]
                     ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, list[dict[str, Any]]]:
    """Histogram, table row and rule of every non-empty candidate.

    Args:
        families: label array [N] of each family (-1: in none of its rules).
        rules: each family's rules.
        bins, support: from `target_bins`.
        y: binary labels [N].
        metric: "js", "kl" or "wasserstein".
        shares: (min_share, max_share) a candidate needs to qualify.

    Returns:
        (counts [C, B], pooled histogram [B], table, rules [C]); the table has id, source, rule,
        size, share, plr, contrast, qualified, g (`g_statistic`), cohort (-1), family and label.
    """
    if not families:
        raise C2ALError("no candidate cohorts: the sources proposed none (e.g. a tree whose scores never split); "
                        "add candidates such as 'kmeans' or 'axes'")
    n_bins, n = len(support), len(y)
    pooled = np.bincount(bins, minlength=n_bins)  # histogram of all samples [B]
    counts, positives, family, label = [], [], [], []
    descs = [rule for family_rules in rules for rule in family_rules]
    for f, member in enumerate(families):
        n_rules, inside = len(rules[f]), member >= 0
        counts.append(family_histograms(member, n_rules, bins, n_bins))
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
        "contrast": dv.contrast(metric, counts[keep], pooled, support),
        "qualified": (share[keep] >= shares[0]) & (share[keep] <= shares[1]),
        "g": g_statistic(counts[keep], pooled), "cohort": -1, "family": np.concatenate(family)[keep], "label": np.concatenate(label)[keep]})
    return counts[keep], pooled, table, [descs[i] for i in keep]


def family_histograms(member: np.ndarray, n_rules: int, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """Score histogram of each rule of one family [n_rules, B]; member [N] is -1 outside all of them."""
    inside = member >= 0
    hist = np.bincount(member[inside] * n_bins + bins[inside], minlength=n_rules * n_bins)
    return hist.reshape(n_rules, n_bins)


def g_statistic(counts: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """G-test statistic of independence between membership and score bin, per candidate [C].

    G = 2 sum O ln(O / E) over the inside and outside cells of each bin, E the counts that
    independence predicts: 2 N times the mutual information between membership and bin. Under
    no difference it is about chi-square with B - 1 degrees of freedom whatever the cohort's size,
    so unlike the contrast it compares a 3% and a 15% cohort on one scale of evidence.

    Args:
        counts: per-candidate histograms [C, B].
        pooled: histogram of all samples [B].

    Returns:
        G [C] (0 for a candidate holding no sample or every sample).
    """
    n = pooled.sum()
    size = counts.sum(axis=1, keepdims=True)  # [C, 1]
    cells = np.stack([counts, pooled[None, :] - counts])  # [2, C, B]: inside, outside
    expected = np.stack([size, n - size]) * pooled[None, None, :] / n  # [2, C, B]
    terms = cells * np.log(np.where(cells > 0, cells, 1.0) / np.where(cells > 0, expected, 1.0))
    return 2.0 * terms.sum(axis=(0, 2))


def label_p_values(size: np.ndarray, positives: np.ndarray, n: float, n_positive: float) -> np.ndarray:
    """Two-sided p-value of each candidate's click rate against the rest's (two-proportion z-test) [C].

    Args:
        size: rows in each candidate [C].
        positives: positive labels in each candidate [C].
        n: rows in the pool the candidates are part of (the candidate plus its rest).
        n_positive: positive labels in that pool.

    Returns:
        p-values [C] (1 for a candidate holding no row or every row).
    """
    rate = n_positive / max(n, 1.0)
    outside = np.maximum(n - size, 1.0)
    inside_rate = positives / np.maximum(size, 1.0)
    rest_rate = (n_positive - positives) / outside
    se = np.sqrt(max(rate * (1.0 - rate), 1e-12) * (1.0 / np.maximum(size, 1.0) + 1.0 / outside))
    z = np.where((size > 0) & (size < n), np.abs(inside_rate - rest_rate) / se, 0.0)
    return erfc(z / np.sqrt(2.0))


def against_rest(counts: np.ndarray, positives: np.ndarray, pooled: np.ndarray, n_positive: float,
                 support: np.ndarray, metric: str, chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Contrast and label p-value of each candidate against the rows in no chosen cohort [C], [C].

    Once a strong cohort is chosen, "the rest" without it is what a further cohort must differ
    from: against a rest that still holds the strong cohort, any neutral group would look
    contrasting (and its click rate different) in the opposite direction.

    Args:
        counts: per-candidate score histograms [C, B].
        positives: positive labels per candidate [C].
        pooled: histogram of all samples [B].
        n_positive: positive labels over all samples.
        support: bin positions [B].
        metric: the divergence.
        chosen: candidates already exposed (disjoint from each other).

    Returns:
        (contrast, label p-value) per candidate; meaningful for candidates disjoint from the chosen.
    """
    rest = pooled - counts[chosen].sum(axis=0)  # [B]
    inside = np.minimum(counts, rest[None, :])  # an overlapping candidate is out of the running anyway
    n_rest, positives_rest = float(rest.sum()), n_positive - float(positives[chosen].sum())
    return dv.contrast(metric, inside, rest, support), label_p_values(inside.sum(axis=1), positives, n_rest, positives_rest)


def disjoint(families: list[np.ndarray], family: np.ndarray, label: np.ndarray) -> np.ndarray:
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
    """Pick up to k mutually disjoint candidates: the most divergent pair, then by contrast.

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


def select_greedy(score: Callable[[list[int]], tuple[np.ndarray, np.ndarray]], disjoint: np.ndarray, k: int) -> list[int]:
    """Pick up to k mutually disjoint candidates, each the most contrasting still allowed.

    Args:
        score: chosen so far -> (contrast [C], allowed [C]) of every candidate given those.
        disjoint: whether two candidates share no sample [C, C].
        k: how many to pick.

    Returns:
        Indices into the candidates in the order picked, fewer than k when none is left.
    """
    chosen: list[int] = []
    free = np.ones(len(disjoint), dtype=bool)
    while len(chosen) < k:
        contrast, allowed = score(chosen)
        pick = free & allowed
        if not pick.any():
            break
        best = int(np.argmax(np.where(pick, contrast, -np.inf)))
        chosen.append(best)
        free &= disjoint[best]
    return chosen


def choose(families: list[np.ndarray], table: pd.DataFrame, n_cohorts: int, shares: tuple[float, float],
           eligible: np.ndarray | None = None,
           rescore: Callable[[list[int]], tuple[np.ndarray, np.ndarray]] | None = None) -> list[int]:
    """Ids of the exposed candidates, most contrasting first.

    Args:
        families, table: from `score_candidates` (and the families it scored).
        n_cohorts: K.
        shares: (min_share, max_share), only for the error message.
        eligible: candidates that passed the permutation test [C]; None (no test) means every
            qualified candidate, and fewer than K disjoint ones is then an error.
        rescore: chosen candidate ids -> (contrast [C], strong enough [C]) of every candidate
            against the rows in no chosen cohort; None ranks by the table's contrast throughout.

    Returns:
        K candidate ids, or fewer (none) when fewer are eligible.
    """
    q = np.flatnonzero(table["qualified"].to_numpy() if eligible is None else eligible)
    apart = disjoint(families, table["family"].to_numpy()[q], table["label"].to_numpy()[q])
    contrast = table["contrast"].to_numpy()[q]

    def score(chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if rescore is None:
            return contrast, np.ones(len(q), dtype=bool)
        step, strong = rescore([int(q[i]) for i in chosen])
        return step[q], strong[q]

    picked = select_greedy(score, apart, n_cohorts)
    if len(picked) < n_cohorts and eligible is None:
        raise C2ALError(
            f"n_cohorts={n_cohorts} but only {len(q)} candidates have a share in "
            f"[min_share={shares[0]}, max_share={shares[1]}] and {len(picked)} of them were found "
            "disjoint; lower n_cohorts or min_share, or raise n_clusters / max_share")
    return [int(i) for i in q[sorted(picked, key=lambda i: -contrast[i])]]


def null_max_g(fixed: list[np.ndarray], bins: np.ndarray, shares: tuple[float, float], n_permutations: int,
               rng: np.random.RandomState, refit: Callable[[np.ndarray], list[np.ndarray]] | None = None) -> np.ndarray:
    """The best qualifying candidate's G under each of n_permutations shuffles of the score bins [B].

    Args:
        fixed: label arrays [N] of the families that do not depend on the scores (clusters, axes).
        bins: each sample's score bin [N].
        shares: (min_share, max_share) a candidate needs to qualify.
        n_permutations: B.
        rng: draws the shuffles.
        refit: rebuilds the score-dependent families (the trees) from a shuffle's row order [N], or None.

    Returns:
        max G per shuffle [B] (0 where no candidate qualifies).
    """
    n, n_bins = len(bins), int(bins.max()) + 1
    pooled = np.bincount(bins, minlength=n_bins)  # a shuffle keeps the pooled histogram
    out = np.zeros(n_permutations)
    for b in range(n_permutations):
        order = rng.permutation(n)
        shuffled = bins[order]
        hists = [family_histograms(m, int(m.max()) + 1, shuffled, n_bins)
                 for m in fixed + (refit(order) if refit else []) if m.max() >= 0]
        if not hists:
            continue
        counts = np.concatenate(hists)  # [C, B]
        share = counts.sum(axis=1) / n
        ok = (share >= shares[0]) & (share <= shares[1])
        out[b] = g_statistic(counts[ok], pooled).max() if ok.any() else 0.0
    return out
