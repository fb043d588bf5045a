"""Scoring candidates by contrast and choosing the exposed, disjoint ones.

Selection rule. For K >= 2 the first two cohorts are the paper's head/tail
pair: among disjoint qualifying pairs, the one whose two inside-distributions
diverge most from each other (a high-score cohort against a low-score one,
rather than two cohorts that are both unusual in the same direction). Further
cohorts are added greedily, each the most contrasting candidate (against the
rest) disjoint from those already chosen. For K = 1 it is the most contrasting
candidate. Exposed ids are then ordered by contrast against the rest, 0 first.

Letters: N samples, C candidates, B histogram bins, K cohorts.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

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
        size, share, plr, contrast, qualified, cohort (-1), family and label.
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
        "contrast": dv.contrast(metric, counts[keep], pooled, support),
        "qualified": (share[keep] >= shares[0]) & (share[keep] <= shares[1]),
        "cohort": -1, "family": np.concatenate(family)[keep], "label": np.concatenate(label)[keep]})
    return counts[keep], pooled, table, [descs[i] for i in keep]


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


def choose(families: list[np.ndarray], table: pd.DataFrame, counts: np.ndarray, pooled: np.ndarray,
           support: np.ndarray, metric: str, n_cohorts: int, shares: tuple[float, float]) -> list[int]:
    """Ids of the exposed candidates, most contrasting first.

    Args:
        families, table, counts, pooled: from `score_candidates` (and the families it scored).
        support: bin positions [B].
        metric: the divergence.
        n_cohorts: K.
        shares: (min_share, max_share), only for the error message.

    Returns:
        K candidate ids.
    """
    q = np.flatnonzero(table["qualified"].to_numpy())
    apart = disjoint(families, table["family"].to_numpy()[q], table["label"].to_numpy()[q])
    contrast = table["contrast"].to_numpy()[q]
    pair = dv.pairwise(metric, counts[q], support, prior=pooled)
    picked = select_cohorts(contrast, pair, apart, n_cohorts)
    if len(picked) < n_cohorts:
        raise C2ALError(
            f"n_cohorts={n_cohorts} but only {len(q)} candidates have a share in "
            f"[min_share={shares[0]}, max_share={shares[1]}] and {len(picked)} of them were found "
            "disjoint; lower n_cohorts or min_share, or raise n_clusters / max_share")
    return [int(i) for i in q[sorted(picked, key=lambda i: -contrast[i])]]
