"""Sharding plans and optimizers for TorchRec models.

Every run, also a single-process one, goes through `DistributedModelParallel`:
fused embedding-table updates only exist after sharding, and keeping one code
path means a 1-process run and a `torchrun --nproc_per_node N` run differ only
in the world size. CPU uses gloo (table-wise, column-wise or data-parallel
sharding; gloo has no row-wise), CUDA uses NCCL.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from c2al.config import DENSE_OPTIMIZERS, SHARDING_TYPES, TABLE_OPTIMIZERS
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError

# The classes behind c2al.config's DENSE_OPTIMIZERS (also the federated clients' dense optimizer).
DENSE_OPTIMIZER_CLASSES: dict[str, type] = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def _table_optimizer_cls(name: str, device: torch.device) -> type:
    import torchrec.optim as trec_optim

    if name == "sgd":
        return torch.optim.SGD
    if name == "adagrad":
        return torch.optim.Adagrad
    if name == "rowwise_adagrad":
        return trec_optim.RowWiseAdagrad
    if name == "adam":
        if device.type != "cuda":
            raise C2ALError("--table-optimizer adam needs CUDA; on CPU FBGEMM fuses only sgd, adagrad, rowwise_adagrad")
        return torch.optim.Adam
    raise C2ALError(f"unknown --table-optimizer {name!r}; choose from {TABLE_OPTIMIZERS}")


def embedding_collections(module: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, EmbeddingBagCollection)]


def shard(
    module: nn.Module,
    info: DistInfo,
    *,
    table_optimizer: str = "rowwise_adagrad",
    table_lr: float = 0.05,
    sharding_type: str = "table_wise",
) -> DistributedModelParallel:
    """Shard every EmbeddingBagCollection in `module` with fused optimizers.

    Args:
        module: a model (or train wrapper) holding unsharded EBCs, on CPU or meta.
        info: from `init_distributed`.
        table_optimizer: fused optimizer of the tables (sgd, adagrad, rowwise_adagrad; adam on CUDA).
        table_lr: its learning rate.
        sharding_type: forced on every table so small tables are not placed data-parallel
            (which would turn their updates dense).

    Returns:
        The DMP-wrapped module; its dense parameters still need an optimizer (`dense_optimizer`).
    """
    if sharding_type not in SHARDING_TYPES:
        raise C2ALError(f"unknown --sharding {sharding_type!r}; choose from {SHARDING_TYPES}")
    if sharding_type == "row_wise" and info.backend == "gloo":
        raise C2ALError("row_wise sharding needs NCCL (CUDA); gloo offers table_wise, column_wise, data_parallel")
    ebcs = embedding_collections(module)
    if not ebcs:
        raise C2ALError("the model holds no torchrec EmbeddingBagCollection to shard")
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_in_backward

    opt_cls = _table_optimizer_cls(table_optimizer, info.device)
    constraints: dict[str, ParameterConstraints] = {}
    for _, ebc in ebcs:
        if sharding_type != "data_parallel":
            apply_in_backward(opt_cls, ebc.parameters(), {"lr": table_lr})
        for cfg in ebc.embedding_bag_configs():
            constraints[cfg.name] = ParameterConstraints(sharding_types=[sharding_type])
    pg = dist.GroupMember.WORLD
    topology = Topology(world_size=info.world_size, compute_device=info.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(module, pg=pg)
    return DistributedModelParallel(
        module=module, device=info.device, plan=plan, env=ShardingEnv.from_process_group(pg)
    )


def dense_optimizer(model: DistributedModelParallel, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0) -> CombinedOptimizer:
    """One optimizer stepping the dense parameters; the fused table optimizers step in backward.

    The returned CombinedOptimizer also carries the fused optimizers' state, so
    one `state_dict()` checkpoints both.
    """
    opts = DENSE_OPTIMIZER_CLASSES
    if name not in opts:
        raise C2ALError(f"unknown --dense-optimizer {name!r}; choose from {DENSE_OPTIMIZERS}")
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = KeyedOptimizerWrapper(params, lambda ps: opts[name](ps, lr=lr, weight_decay=weight_decay))
    return CombinedOptimizer([model.fused_optimizer, dense])
