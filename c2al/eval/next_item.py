"""Next-item retrieval metrics over the FULL catalog (Ning et al. 2021's evaluation).

For every example the label's rank among all V items is computed from the scores; items
the user has already seen are NOT filtered out (the paper's protocol). Ties count against
the model: the rank is the number of items scoring at least the label's score, so a model
(or a popularity list) that scores many items equally gains nothing from the tie.

Letters: N examples, V catalog size, H embedding size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from c2al.data.batch import iter_batches
from c2al.data.schema import Schema, Table
from c2al.errors import C2ALError

KS = (1, 5, 10)


def label_ranks(scores_of: "torch.Tensor | np.ndarray", targets: np.ndarray, catalog: "torch.Tensor | None" = None,
                chunk: int = 4096) -> np.ndarray:
    """1-based rank of each target among all V items, ties counted against it.

    Args:
        scores_of: either query vectors [N, H] (with `catalog` [V, H]: scores are their dot
            products) or one score per item [V] shared by every example (a popularity list).
        targets: [N] catalog row (0..V-1) of each example's label.
        catalog: [V, H] item vectors, or None for a shared score list.
        chunk: examples scored at once (memory is chunk x V).

    Returns:
        int64 [N] ranks in 1..V.

    Example:
        >>> label_ranks(np.array([0.5, 0.9, 0.5]), np.array([1, 0, 2]))  # item 0 ties item 2: both rank 3
        array([1, 3, 3])
    """
    targets = np.asarray(targets, dtype=np.int64)
    if catalog is None:
        s = np.asarray(scores_of, dtype=np.float64)
        if targets.size and (targets.min() < 0 or targets.max() >= len(s)):
            raise C2ALError(f"label_ranks: targets outside [0, {len(s)})")
        ordered = np.sort(s)
        return (len(s) - np.searchsorted(ordered, s[targets], side="left")).astype(np.int64)
    query = torch.as_tensor(scores_of, dtype=torch.float32)
    items = torch.as_tensor(catalog, dtype=torch.float32)
    if query.shape[0] != len(targets) or query.shape[1:] != items.shape[1:]:
        raise C2ALError(f"label_ranks: query {tuple(query.shape)}, catalog {tuple(items.shape)}, {len(targets)} targets")
    out = np.empty(len(targets), dtype=np.int64)
    tgt = torch.from_numpy(targets)
    for a in range(0, len(targets), chunk):
        s = query[a:a + chunk] @ items.T  # [chunk, V]
        own = s.gather(1, tgt[a:a + chunk, None])  # [chunk, 1]
        out[a:a + chunk] = (s >= own).sum(1).numpy()
    return out


def recall_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k (the share of examples whose label ranks within k) for each k, and the mean rank.

    Args:
        ranks: [N] 1-based ranks.
        ks: cut-offs.

    Returns:
        {"recall@1": ..., "recall@5": ..., "recall@10": ..., "mean_rank": ...}.

    Example:
        >>> recall_metrics(np.array([1, 4, 12, 2]), ks=(1, 5))
        {'recall@1': 0.25, 'recall@5': 0.75, 'mean_rank': 4.75}
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise C2ALError("recall_metrics: no examples to evaluate")
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
    out["mean_rank"] = float(ranks.mean())
    return out


def popularity(train_labels: np.ndarray, num_items: int) -> np.ndarray:
    """How often each item 1..V is a training label: the most-popular baseline's scores [V]."""
    return np.bincount(np.asarray(train_labels, dtype=np.int64) - 1, minlength=num_items).astype(np.float64)


@torch.no_grad()
def query_vectors(model: nn.Module, table: Table, schema: Schema, batch_size: int = 4096) -> torch.Tensor:
    """The context tower's vectors of every row of `table`, in row order ([N, H]).

    Args:
        model: a model with `towers(dense, kjt) -> (query, candidate)` (SequenceTwoTower).
        table: next-item examples.
        schema: their schema.
        batch_size: rows per forward.
    """
    model.eval()
    parts = []
    for batch in iter_batches(table, schema, batch_size, shuffle=False):
        query, _ = model.towers(batch.dense, batch.sparse)
        parts.append(query[batch.weights > 0])  # the last batch's padding rows out
    return torch.cat(parts)


@torch.no_grad()
def next_item_metrics(model: nn.Module, table: Table, schema: Schema, ks: Sequence[int] = KS,
                      batch_size: int = 4096) -> dict[str, float]:
    """recall@k and mean rank of `model` on `table` over the whole catalog.

    Args:
        model: a model with `towers` and `catalog() -> [V, H]` (SequenceTwoTower).
        table: next-item examples (labels in `item_ids`, 1..V).
        schema: their schema.
        ks: recall cut-offs.
        batch_size: rows per forward.

    Returns:
        recall_metrics of the label ranks.
    """
    query = query_vectors(model, table, schema, batch_size)
    return recall_metrics(label_ranks(query, table.item_ids - 1, model.catalog()), ks)
