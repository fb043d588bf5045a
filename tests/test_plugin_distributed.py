"""The c2al plugin under DistributedModelParallel, TrainPipelineSparseDist and 2-process gloo."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from plugin_support import B, K, build, make_batch, two_rank_worker
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.tracing import Tracer, _get_leaf_module_names

import c2al
from c2al.dist.process import init_distributed
from c2al.dist.sharding import dense_optimizer, shard
from c2al.train.task import TrainModule


def sharded(name: str, aux_weight: float = 0.5, head: str = "default", table_device: str = "cpu", seed: int = 0,
            balance: str = "none"):
    """(dmp, wrapper, model) with the model's tables sharded table-wise and fused SGD on them."""
    model = build(name, seed=seed, table_device=table_device)
    wrapper = c2al.attach(model, "inter_arch", K, aux_weight=aux_weight, head=model.over_arch if head == "clone" else None,
                          balance=balance)
    torch.manual_seed(seed)  # tables built on meta are initialized by DMP
    dmp = shard(TrainModule(wrapper), init_distributed("cpu"), table_optimizer="sgd", table_lr=0.5)
    return dmp, wrapper, model


def local_tables(dmp: nn.Module) -> list[torch.Tensor]:
    """Views of every local table (single process: whole tables), in key order."""
    return [
        value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
        for key, value in sorted(dmp.state_dict().items())
        if "embedding_bags" in key
    ]


def table_values(dmp: nn.Module) -> torch.Tensor:
    return torch.cat([t.flatten() for t in local_tables(dmp)]).clone()


def set_tables(dmp: nn.Module, seed: int) -> None:
    """Overwrite the sharded tables in place with seeded values, so two DMPs start equal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in local_tables(dmp):
            table.copy_(0.1 * torch.randn(table.shape, generator=gen))


@pytest.mark.parametrize("name", ["afm", "two_tower", "dlrm", "deepfm"])
def test_train_step_after_sharding_updates_heads(name):
    dmp, wrapper, _ = sharded(name, table_device="meta")
    opt = dense_optimizer(dmp, lr=0.05)
    heads_before = [p.detach().clone() for p in wrapper.heads.parameters()]
    loss, (_, logits, parts) = dmp(make_batch(0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and logits.shape == (B,)
    assert set(parts) == {"main", "aux", "aux_0", "aux_1"}
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, wrapper.heads.parameters()))


def test_aux_loss_changes_the_fused_table_update_after_sharding():
    def tables_after_one_step(aux_weight: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if aux_weight is None:  # no plugin at all
            torch.manual_seed(0)
            dmp = shard(TrainModule(build("afm")), init_distributed("cpu"), table_optimizer="sgd", table_lr=0.5)
        else:
            dmp, _, _ = sharded("afm", aux_weight=aux_weight)
        set_tables(dmp, seed=3)
        before = table_values(dmp)
        loss, _ = dmp(make_batch(0))
        loss.backward()  # the fused SGD steps the tables inside backward
        return before, table_values(dmp)

    start_plain, plain = tables_after_one_step(None)
    start_off, off = tables_after_one_step(0.0)
    start_on, on = tables_after_one_step(2.0)
    assert torch.equal(start_plain, start_off) and torch.equal(start_off, start_on)
    assert not torch.equal(off, start_off)
    assert torch.equal(off, plain)  # lambda = 0 moves the rows exactly as plain BCE does
    assert not torch.allclose(on, off)  # the aux heads' gradients reached the sharded tables


def test_detach_after_sharding_returns_model_with_wrapper_logits():
    dmp, wrapper, model = sharded("dlrm", table_device="meta")
    batch = make_batch(1)
    with torch.no_grad():
        logits = wrapper(batch.dense, batch.sparse).logits
        assert c2al.detach(wrapper) is model
        assert torch.equal(model(batch.dense, batch.sparse), logits)


@pytest.mark.parametrize("name, balance", [("afm", "none"), ("dlrm_dcn", "none"), ("afm", "agree"), ("dlrm_dcn", "magnitude+project")])
def test_pipeline_trains_with_aux_heads_then_detaches(name, balance):
    dmp, wrapper, model = sharded(name, head="clone", balance=balance)
    pipeline = TrainPipelineSparseDist(dmp, dense_optimizer(dmp, lr=0.05), torch.device("cpu"))
    batches = iter([make_batch(seed) for seed in range(5)])
    for _ in range(3):
        loss, logits, parts = pipeline.progress(batches)
        assert torch.isfinite(loss) and logits.shape == (B,)
        assert set(parts) == {"main", "aux", "aux_0", "aux_1"}
    assert pipeline._pipelined_modules, "the sharded EBC was not pipelined"
    pipeline.detach()
    batch = make_batch(9)
    with torch.no_grad():
        expected = wrapper(batch.dense, batch.sparse).logits
        assert c2al.detach(wrapper) is model
        assert torch.equal(model(batch.dense, batch.sparse), expected)


@pytest.mark.parametrize("balance", ["none", "project"])
def test_torchrec_traced_graph_keeps_the_aux_heads(balance):
    dmp, _, _ = sharded("afm", balance=balance)
    train_module = dmp.module
    graph = Tracer(leaf_modules=_get_leaf_module_names(train_module)).trace(train_module)
    graph_module = torch.fx.GraphModule(train_module, graph)
    targets = {n.target for n in graph.nodes if n.op == "call_module"}
    assert all(any(t.startswith(f"model.heads.{k}.") for t in targets) for k in range(K))
    assert "model.model.inter_arch" not in targets  # traced through, not a leaf
    splits = [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "split"]
    assert len(splits) == (balance != "none")  # the balance rule is one node that runs c2al.balance.split
    batch = make_batch(2)
    with torch.no_grad():
        got, want = graph_module(batch), train_module(batch)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][2][k], want[1][2][k]) for k in want[1][2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("balance", ["none", "agree"])
@pytest.mark.slow
def test_two_processes_train_with_aux_heads_and_agree_on_loss(tmp_path: Path, balance: str):
    steps = 3
    mp.spawn(two_rank_worker, args=(2, _free_port(), str(tmp_path), steps, balance), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(rank0["losses"]) == steps
    assert all(torch.isfinite(torch.tensor(rank0["losses"])))
    assert rank0["losses"] == pytest.approx(rank1["losses"], abs=1e-6)
    assert set(rank0["parts"][0]) == {"main", "aux", "aux_0", "aux_1"}
    for part0, part1 in zip(rank0["parts"], rank1["parts"]):
        assert part0 == pytest.approx(part1, abs=1e-6)
    for key, value in rank0["heads"].items():  # DDP keeps the replicated heads in sync, and they trained
        assert torch.allclose(value, rank1["heads"][key], atol=1e-6)
        assert not torch.equal(value, rank0["heads_start"][key])
