"""Process groups and cross-rank gathers; the sharding plans are in `c2al.dist.sharding`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from c2al.data.batch import Batch, iter_batches
from c2al.data.schema import Schema, Table
from c2al.errors import C2ALError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LOCAL_CPU = DistInfo(rank=0, world_size=1, device=torch.device("cpu"), backend="none")  # one process, no group


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create) the default process group.

    Under torchrun the env:// rendezvous is used; otherwise a one-member group
    is created in memory so DMP can shard even for a single process.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise C2ALError("--device cuda asked for, but CUDA is not available on this machine")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, device=dev, backend=backend)


def all_gather_arrays(parts: Iterable[Any], info: DistInfo) -> list[Any]:
    """Gather one picklable object per rank on every rank (evaluation outputs)."""
    parts = list(parts)
    if info.world_size == 1:
        return [parts]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, parts)
    return out


@torch.no_grad()
def gather_rows(fn: Callable[[Batch], torch.Tensor], table: Table, schema: Schema, batch_size: int, info: DistInfo,
                *, show: bool = False, desc: str = "eval") -> np.ndarray:
    """`fn(batch)` ([B, ...] per batch) for every row of `table`, in row order, on every rank.

    Ranks read interleaved shards of each global batch (padding rows of weight
    0 keep the collectives even); the pieces are gathered and put back in order.
    """
    mine: list[np.ndarray] = []
    batches = iter_batches(table, schema, batch_size, shuffle=False, rank=info.rank, world_size=info.world_size)
    for batch in tqdm(batches, desc=desc, disable=None if show else True, leave=False, dynamic_ncols=True):  # None: off unless a terminal
        keep = batch.weights.cpu().numpy() > 0
        mine.append(fn(batch.to(info.device)).float().cpu().numpy()[keep])
    per_rank = all_gather_arrays(mine, info)
    # Global batch b is rank 0's part of b, then rank 1's part of b, ...
    ordered = [part for b in range(len(mine)) for rank_parts in per_rank for part in [rank_parts[b]]]
    rows = np.concatenate(ordered) if ordered else np.zeros(0)
    if len(rows) != len(table):
        raise RuntimeError(f"gathered {len(rows)} rows for a table of {len(table)}")
    return rows
