"""Two-tower retrieval evaluation: recall@K and NDCG@K on held-out items.

Every user of the evaluated split (test, or valid for choosing settings) is
scored against the whole item catalog (every item seen in any split) by the
dot product of the two towers. The relevant items are the user's positive
interactions in that split; items the user met in the splits before it (train,
and valid when scoring test) are never recommended (the usual "filter seen
items" protocol).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from c2al.data.schema import Splits, Table
from c2al.dist.process import DistInfo, gather_rows
from c2al.errors import C2ALError
from c2al.eval.metrics import ndcg_at_k, recall_at_k


def _first_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, index of each key's first row)."""
    uniq, first = np.unique(keys, return_index=True)
    return uniq, first


def tower_vectors(model: nn.Module, table: Table, splits: Splits, side: str, batch_size: int, info: DistInfo) -> np.ndarray:
    """User (side="user") or item (side="item") tower output for every row of `table`."""
    model.eval()
    pick = 0 if side == "user" else 1
    return gather_rows(lambda b: model.towers(b.dense, b.sparse)[pick], table, splits.schema, batch_size, info)


def catalog(splits: Splits) -> list[tuple[np.ndarray, Table]]:
    """One representative row per item over all splits, as (item ids, rows) per split."""
    parts = [getattr(splits, s) for s in ("train", "valid", "test")]
    if any(p.item_ids is None for p in parts) or all((p.item_ids < 0).all() for p in parts):
        raise C2ALError("retrieval metrics need item ids: give --item-col for tabular data")
    ids = np.concatenate([p.item_ids for p in parts])
    uniq, first = _first_rows(ids)
    first = first[uniq >= 0]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    out = []
    for i, p in enumerate(parts):
        mine = first[(first >= offsets[i]) & (first < offsets[i + 1])] - offsets[i]
        if len(mine):
            out.append((p.item_ids[mine], p.take(mine)))
    return out


# The splits whose items a user has met before each evaluated split: never recommended.
_BEFORE = {"valid": ("train",), "test": ("train", "valid")}


@torch.no_grad()
def retrieval_metrics(model: nn.Module, splits: Splits, info: DistInfo, *, batch_size: int = 1024,
                      ks: Sequence[int] = (10, 50), split: str = "test") -> dict[str, Any]:
    """recall@K / NDCG@K of a two-tower model over one split's users and their positive items.

    Args:
        model: anything with `towers(dense, sparse) -> (u [B, H], v [B, H])`.
        splits: the data; items of every split form the catalog.
        info: the process group (tower outputs are gathered over ranks).
        batch_size: rows per tower pass.
        ks: the cut-offs K.
        split: "test" (reported), or "valid" (for choosing settings without looking at test).

    Returns:
        recall@K, ndcg@K and popularity_recall@K (every user gets the items with the most
        positive train rows) per K, n_users (with a positive) and n_items.
    """
    if not hasattr(model, "towers"):
        raise C2ALError(f"retrieval metrics need a two-tower model with .towers(), got {type(model).__name__}")
    if split not in _BEFORE:
        raise C2ALError(f"retrieval metrics: split must be one of {sorted(_BEFORE)}, got {split!r}")
    held = getattr(splits, split)
    pieces = catalog(splits)
    item_ids = np.concatenate([ids for ids, _ in pieces])
    items = np.concatenate([tower_vectors(model, rows, splits, "item", batch_size, info) for _, rows in pieces])  # [I, H]
    users, first = _first_rows(held.user_ids)
    queries = tower_vectors(model, held.take(first), splits, "user", batch_size, info)  # [U, H]
    index = {int(i): n for n, i in enumerate(item_ids)}
    user_pos = {int(u): n for n, u in enumerate(users)}
    relevant: list[set[int]] = [set() for _ in users]
    for u, i, y in zip(held.user_ids, held.item_ids, held.labels):
        if y > 0.5 and i >= 0:
            relevant[user_pos[int(u)]].add(index[int(i)])
    seen: list[set[int]] = [set() for _ in users]
    for part in (getattr(splits, s) for s in _BEFORE[split]):
        for u, i in zip(part.user_ids, part.item_ids):
            n = user_pos.get(int(u))
            if n is not None and i >= 0:
                seen[n].add(index[int(i)])
    scores = torch.as_tensor(queries) @ torch.as_tensor(items).T
    out: dict[str, Any] = {"n_users": int(sum(1 for r in relevant if r)), "n_items": len(item_ids)}
    # Reference: every user gets the items with the most positive train interactions.
    train = splits.train
    popular = np.zeros(len(item_ids))
    np.add.at(popular, [index[int(i)] for i in train.item_ids[(train.labels > 0.5) & (train.item_ids >= 0)]], 1.0)
    pop_scores = torch.as_tensor(popular).expand(len(users), -1)
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(scores, relevant, k, exclude=seen)
        out[f"ndcg@{k}"] = ndcg_at_k(scores, relevant, k, exclude=seen)
        out[f"popularity_recall@{k}"] = recall_at_k(pop_scores, relevant, k, exclude=seen)
    return out
