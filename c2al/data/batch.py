"""The one batch type used everywhere, and the iterator that cuts tables into batches.

`batch_size` is always the global batch: with W processes each rank gets
batch_size / W consecutive rows of every global batch, so a W-process run sees
the same samples per step as a single-process run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from c2al.data.schema import Schema, Table
from c2al.errors import C2ALError


@dataclass
class Batch(Pipelineable):
    """B samples.

    Attributes:
        sparse: KeyedJaggedTensor, one key per sparse field in schema order.
        dense: float32 [B, n_dense].
        labels: float32 [B].
        user_ids: int64 [B].
        cohort_ids: int64 [B], -1 outside every exposed cohort.
        weights: float32 [B], 0 for padding rows added to even out evaluation shards.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    user_ids: torch.Tensor
    cohort_ids: torch.Tensor
    weights: torch.Tensor

    def _map(self, fn) -> "Batch":  # type: ignore[no-untyped-def]
        return Batch(
            sparse=fn(self.sparse),
            dense=fn(self.dense),
            labels=fn(self.labels),
            user_ids=fn(self.user_ids),
            cohort_ids=fn(self.cohort_ids),
            weights=fn(self.weights),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.sparse, self.dense, self.labels, self.user_ids, self.cohort_ids, self.weights):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def make_batch(table: Table, schema: Schema, rows: np.ndarray, weights: np.ndarray | None = None) -> Batch:
    """Collate `rows` of `table` into a Batch."""
    lengths, values = [], []
    for f in schema.sparse:
        col = table.sparse[f.name].take(rows)
        lengths.append(col.lengths)
        values.append(col.values)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.feature_names,
        values=torch.from_numpy(np.concatenate(values)).long(),
        lengths=torch.from_numpy(np.concatenate(lengths)).int(),
    )
    w = np.ones(len(rows), dtype=np.float32) if weights is None else weights
    return Batch(
        sparse=kjt,
        dense=torch.from_numpy(np.ascontiguousarray(table.dense[rows], dtype=np.float32)),
        labels=torch.from_numpy(table.labels[rows].astype(np.float32)),
        user_ids=torch.from_numpy(table.user_ids[rows].astype(np.int64)),
        cohort_ids=torch.from_numpy(table.cohort_ids[rows].astype(np.int64)),
        weights=torch.from_numpy(w.astype(np.float32)),
    )


def local_batch_size(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise C2ALError(f"batch_size {batch_size} is not divisible by world size {world_size}")
    return batch_size // world_size


def num_batches(n_rows: int, batch_size: int, drop_last: bool) -> int:
    return n_rows // batch_size if drop_last else -(-n_rows // batch_size)


def iter_batches(
    table: Table,
    schema: Schema,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    rows: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Yield this rank's share of every global batch of `table` (or of its `rows`).

    The one batcher of c2al: the centralized loop, evaluation and the federated
    clients (over their own rows) all cut batches here. Every rank yields the
    same number of batches (collectives in sharded models need that). Without
    drop_last the last global batch is padded with repeated rows of weight 0 so
    it splits evenly.

    Args:
        rows: row indices to batch (a federated client's rows); default every row.
            Shuffling permutes them with `seed`, so a client holding every row sees
            the order the centralized loop would.
    """
    local = local_batch_size(batch_size, world_size)
    chosen = np.arange(len(table)) if rows is None else np.asarray(rows)
    for take, weights in batch_rows(chosen, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
        mine = slice(rank * local, (rank + 1) * local)
        yield make_batch(table, schema, take[mine], weights[mine])


def batch_rows(rows: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
               drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The (row indices [batch_size], weights [batch_size]) of each global batch `iter_batches` cuts
    from `rows`, without collating them: the federated vectorized runner collates many clients'
    batches at once."""
    order = rows[np.random.default_rng(seed).permutation(len(rows))] if shuffle else rows
    n = len(order)
    for b in range(num_batches(n, batch_size, drop_last)):
        take = order[b * batch_size : (b + 1) * batch_size]
        weights = np.ones(batch_size, dtype=np.float32)
        if len(take) < batch_size:  # pad the tail so every rank gets `local` rows
            pad = batch_size - len(take)
            weights[len(take):] = 0.0
            take = np.concatenate([take, np.resize(order, pad)])
        yield take, weights
