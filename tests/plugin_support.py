"""Small models, batches and the 2-process worker for the c2al plugin tests.

Not a test module: `test_plugin.py` and `test_plugin_distributed.py` import it,
and processes spawned by the 2-rank test import `two_rank_worker` from it.
Letters: B batch, D embedding dim, K cohorts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.data.batch import Batch
from c2al.data.schema import Schema, SparseFeature

D = 4
B = 8
K = 2
N_DENSE = 3
SCHEMA = Schema(
    sparse=(SparseFeature("user", 20, side="user"), SparseFeature("item", 30, side="item")),
    dense=tuple(f"x{i}" for i in range(N_DENSE)),
)
OUR_MODELS = ("afm", "attention_fm", "two_tower")
TORCHREC_MODELS = ("dlrm", "dlrm_dcn", "deepfm")


def build(name: str, seed: int = 0, table_device: str = "cpu") -> nn.Module:
    """A small seeded model over a 2-table EBC; dense parts always on CPU."""
    from c2al.models import AFM, AttentionFM, TwoTower
    from c2al.models.common import make_ebc

    torch.manual_seed(seed)
    ebc = make_ebc(SCHEMA, D, device=table_device)
    if name == "afm":
        return AFM(ebc, N_DENSE, attention_dim=8)
    if name == "attention_fm":
        return AttentionFM(ebc, N_DENSE, rank=3, attention_hidden=8, over_sizes=(8,))
    if name == "two_tower":
        return TwoTower(ebc, SCHEMA.user_features, SCHEMA.item_features, N_DENSE, layer_sizes=(8,))
    if name == "dlrm":
        return DLRM(ebc, N_DENSE, [8, D], [8, 1])
    if name == "dlrm_dcn":
        return DLRM_DCN(ebc, N_DENSE, [8, D], [8, 1], dcn_num_layers=2, dcn_low_rank_dim=2)
    if name == "deepfm":
        return SimpleDeepFMNN(N_DENSE, ebc, hidden_layer_size=8, deep_fm_dimension=5)
    raise ValueError(name)


def make_batch(seed: int = 0, batch: int = B) -> Batch:
    """Random ids and labels; cohorts cycle 0, 1, -1 so some positives sit outside every cohort."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, f.num_embeddings, (batch,), generator=gen) for f in SCHEMA.sparse])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=SCHEMA.feature_names, values=values, lengths=torch.ones(len(SCHEMA.sparse) * batch, dtype=torch.int32)
    )
    return Batch(
        sparse=kjt,
        dense=torch.randn(batch, N_DENSE, generator=gen),
        labels=torch.randint(0, 2, (batch,), generator=gen).float(),
        user_ids=torch.arange(batch),
        cohort_ids=torch.tensor([0, 1, -1] * (batch // 3 + 1))[:batch],
        weights=torch.ones(batch),
    )


def two_rank_worker(rank: int, world_size: int, port: int, out_dir: str, steps: int, balance: str = "none") -> None:
    """One rank of a gloo run: shard AFM + c2al heads, train `steps` steps on identical batches.

    Writes {"losses", "parts", "heads_start", "heads"} to out_dir/rank{rank}.pt for the test to compare.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
    import torch.distributed as dist

    import c2al
    from c2al.dist.process import init_distributed
    from c2al.dist.sharding import dense_optimizer, shard
    from c2al.train.task import TrainModule

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    model = build("afm", seed=0, table_device="meta")
    wrapper = c2al.attach(model, "inter_arch", K, aux_weight=0.5, head=model.over_arch, balance=balance)
    dmp = shard(TrainModule(wrapper), info, table_optimizer="sgd", table_lr=0.1)
    opt = dense_optimizer(dmp, lr=0.05)
    heads_start = {k: v.detach().clone() for k, v in wrapper.heads.state_dict().items()}
    losses, parts = [], []
    for step in range(steps):
        loss, (_, _, p) = dmp(make_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        parts.append({k: float(v) for k, v in p.items()})
    heads = {k: v.detach().clone() for k, v in wrapper.heads.state_dict().items()}
    torch.save({"losses": losses, "parts": parts, "heads_start": heads_start, "heads": heads}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown of torchrec / fbgemm: seconds per process, nothing to flush
