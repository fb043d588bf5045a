"""Implicit feedback with leave-last-out splits and sampled candidates: FedRecGEL's (and NCF's) protocol.

Every rating is a positive. Users with fewer than `min_interactions` ratings are dropped, and
items are renumbered 0..I-1 over the ratings that remain. Each user's latest rating is its test
positive, the one before it its validation positive (`holdout=2`; `holdout=1` keeps no
validation, as the paper's own split), the rest its training positives. A held-out positive is
ranked among `n_negatives` items the user never rated, drawn once per seed, so every arm of a
seed faces the same candidates.

Letters: U users, I items, P training positives, Q = 1 + n_negatives candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from c2al.data.sequences import Timelines
from c2al.errors import C2ALError


@dataclass
class LeaveLastOut:
    """Training positives per user (CSR) and the held-out positives.

    Attributes:
        indptr: [U + 1]; user u's training items are items[indptr[u]:indptr[u + 1]], in time order.
        items: [P] item ids 0..I-1.
        valid: [U] each user's second-to-last item, or None with holdout=1.
        test: [U] each user's last item.
        num_items: I.
        users: [U] the raw user keys.
    """

    indptr: np.ndarray
    items: np.ndarray
    valid: np.ndarray | None
    test: np.ndarray
    num_items: int
    users: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.test)

    def train_items(self, u: int) -> np.ndarray:
        """User u's training positives [n_u]."""
        return self.items[self.indptr[u]: self.indptr[u + 1]]

    def rated(self, u: int) -> np.ndarray:
        """Every item user u rated: training and held-out [n_u + holdout]."""
        held = [self.test[u]] if self.valid is None else [self.valid[u], self.test[u]]
        return np.concatenate([self.train_items(u), held])


def leave_last_out(t: Timelines, min_interactions: int = 5, holdout: int = 2) -> LeaveLastOut:
    """Filter users by their number of ratings, renumber the remaining items and hold out each user's latest.

    Args:
        t: time-ordered timelines (`c2al.data.sequences.read_timelines`).
        min_interactions: users with fewer ratings are dropped (the paper: 5).
        holdout: 2 (test = last, valid = second-to-last) or 1 (test only).

    Returns:
        LeaveLastOut.

    Example:
        >>> t = Timelines(users=np.array([7, 8]), items=np.array([3, 1, 2, 5, 4, 3, 1]), lengths=np.array([5, 2]), num_items=5)
        >>> s = leave_last_out(t, min_interactions=5)
        >>> s.train_items(0).tolist(), int(s.valid[0]), int(s.test[0]), s.num_items
        ([2, 0, 1], 4, 3, 5)
    """
    if holdout not in (1, 2):
        raise C2ALError(f"leave-last-out holds out 1 (test) or 2 (valid + test) items per user, got holdout={holdout}")
    if min_interactions < holdout + 1:
        raise C2ALError(f"min_interactions must leave a training item after the hold-out: need >= {holdout + 1}, got {min_interactions}")
    starts = np.concatenate([[0], np.cumsum(t.lengths)[:-1]])
    keep = np.flatnonzero(t.lengths >= min_interactions)
    if len(keep) == 0:
        raise C2ALError(f"no user has >= {min_interactions} interactions (longest timeline: {int(t.lengths.max(initial=0))})")
    rows = np.concatenate([np.arange(starts[u], starts[u] + t.lengths[u]) for u in keep])
    catalog, items = np.unique(t.items[rows], return_inverse=True)  # items still rated after the user filter
    lengths = t.lengths[keep]
    ends = np.cumsum(lengths)  # [U] one past each kept user's last rating in `items`
    test = items[ends - 1]
    valid = items[ends - 2] if holdout == 2 else None
    train_len = lengths - holdout
    train_mask = np.ones(len(items), bool)
    for k in range(1, holdout + 1):
        train_mask[ends - k] = False
    indptr = np.concatenate([[0], np.cumsum(train_len)])
    return LeaveLastOut(indptr=indptr, items=items[train_mask].astype(np.int64), valid=valid, test=test.astype(np.int64),
                        num_items=len(catalog), users=t.users[keep])


def sample_candidates(split: LeaveLastOut, positives: np.ndarray, n_negatives: int, seed: int) -> np.ndarray:
    """Each user's held-out positive followed by `n_negatives` distinct items the user never rated.

    Args:
        split: the split (what each user rated).
        positives: [U] the held-out item of each user (split.valid or split.test).
        n_negatives: negatives per user (the paper: 99).
        seed: the draw's seed (one draw serves every arm of a seed).

    Returns:
        [U, 1 + n_negatives] item ids, column 0 the positive.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((split.num_users, 1 + n_negatives), np.int64)
    for u in range(split.num_users):
        pool = np.setdiff1d(np.arange(split.num_items), split.rated(u), assume_unique=False)
        if len(pool) < n_negatives:
            raise C2ALError(f"user {split.users[u]} rated all but {len(pool)} of {split.num_items} items: "
                            f"cannot draw {n_negatives} unrated candidates (lower n_negatives)")
        out[u, 0] = positives[u]
        out[u, 1:] = rng.choice(pool, size=n_negatives, replace=False)
    return out


def sample_training_pairs(positives: np.ndarray, num_items: int, n_negatives: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One client's BCE pairs: every training positive followed by `n_negatives` items outside its positives.

    Negatives are drawn uniformly and redrawn while they hit a positive (NCF's sampler), afresh
    at every call, so each round a client sees new negatives.

    Args:
        positives: [n] the client's training items.
        num_items: I.
        n_negatives: negatives per positive (the paper: 4).
        rng: the round's generator.

    Returns:
        (items [n (1 + n_negatives)], labels [same] in {0, 1}); positive j's negatives follow it.
    """
    if len(np.unique(positives)) >= num_items:
        raise C2ALError(f"a client rated all {num_items} items: no negative to sample")
    neg = rng.integers(0, num_items, size=(len(positives), n_negatives))
    bad = np.isin(neg, positives)
    while bad.any():
        neg[bad] = rng.integers(0, num_items, size=int(bad.sum()))
        bad = np.isin(neg, positives)
    items = np.concatenate([positives[:, None], neg], axis=1).reshape(-1)
    labels = np.zeros((len(positives), 1 + n_negatives), np.float32)
    labels[:, 0] = 1.0
    return items, labels.reshape(-1)
