"""Data and model variants of benchmarks/throughput.py: each variant is a train step and a predict call.

Letters: B batch, F fields (26), D embedding dim, N rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.data.batch import Batch
from c2al.data.schema import Schema, SparseFeature


@dataclass(frozen=True)
class Sizes:
    """What one run measures; `--quick` shrinks every entry."""

    fields: int = 26
    vocab_min: float = 1e2
    vocab_max: float = 1e6
    dim: int = 16
    attention: int = 16
    batch: int = 4096
    train_steps: int = 100  # every AFM variant trains this many steps, then NE is read on held-out rows
    warmup_steps: int = 3  # excluded from the timings
    eval_rows: int = 65536
    dropout: float = 0.2  # every AFM row's dropout (each library puts it where its AFM does; see the rows' notes)
    seed: int = 0

    @property
    def vocabs(self) -> list[int]:
        return [int(v) for v in np.geomspace(self.vocab_min, self.vocab_max, self.fields).round()]


QUICK = Sizes(vocab_max=1e4, batch=1024, train_steps=8, warmup_steps=2, eval_rows=4096)


# ---------------------------------------------------------------- data
@dataclass
class Data:
    """Ids [N, F] (int64, per-field ids), labels [N], cohort ids [N] (-1 outside both)."""

    ids: np.ndarray
    labels: np.ndarray
    cohorts: np.ndarray


def make_data(sizes: Sizes, rows: int, seed: int) -> Data:
    """Criteo-like ids (power-law per field) with a learnable label.

    The label's logit is a sum of per-id weights (ids below 1000 of every field)
    plus planted pairwise terms between the first six fields, so both an FM's
    first-order and its pairwise part can lower NE. The planted model is fixed
    by `sizes.seed`; `seed` only draws the rows.
    """
    planted = np.random.default_rng(sizes.seed)
    hot = 1000
    w = [planted.normal(0, 0.35, min(v, hot)) for v in sizes.vocabs]  # per-id weights of the hot ids
    u = [planted.normal(0, 0.6, (min(v, hot), 4)) for v in sizes.vocabs[:6]]  # planted factors
    rng = np.random.default_rng(seed)
    u01 = rng.random((rows, sizes.fields))
    ids = np.floor(np.asarray(sizes.vocabs) * u01**3).astype(np.int64)  # heavy head, long tail
    logit = np.full(rows, -1.2)
    for f in range(sizes.fields):
        idx = ids[:, f]
        logit += np.where(idx < hot, w[f][np.minimum(idx, hot - 1)], 0.0)
    for f, g in ((0, 1), (2, 3), (4, 5), (0, 5)):
        a, b = u[f][ids[:, f] % hot], u[g][ids[:, g] % hot]
        logit += (a * b).sum(1)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    cohorts = np.where(ids[:, 0] < 2, 0, np.where(ids[:, 0] >= sizes.vocabs[0] // 2, 1, -1))
    return Data(ids=ids, labels=labels, cohorts=cohorts)


def schema_of(sizes: Sizes) -> Schema:
    return Schema(sparse=tuple(SparseFeature(f"c{i}", v) for i, v in enumerate(sizes.vocabs)))


def to_batch(data: Data, start: int, size: int) -> Batch:
    """Rows [start, start + size) as a c2al Batch (one id per field)."""
    ids = data.ids[start : start + size]  # [B, F]
    b, f = ids.shape
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"c{i}" for i in range(f)],
        values=torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1)),  # feature-major, as KJT wants
        lengths=torch.ones(b * f, dtype=torch.int32),
    )
    return Batch(sparse=kjt, dense=torch.zeros(b, 0), labels=torch.from_numpy(data.labels[start : start + size]),
                 user_ids=torch.zeros(b, dtype=torch.long),
                 cohort_ids=torch.from_numpy(data.cohorts[start : start + size]).long(), weights=torch.ones(b))


# ---------------------------------------------------------------- variants
@dataclass
class Variant:
    """How one model trains and predicts on `Data` rows.

    Attributes:
        step: (data, start, size) -> None; one forward, backward and update.
        predict: (data, start, size) -> [size] probabilities.
        prepare: (data, start, size) -> the model's own input, built outside the timer.
        params: dense parameter count and embedding rows, to show two models are the same size.
    """

    step: Callable[[Any], None]
    predict: Callable[[Any], torch.Tensor]
    prepare: Callable[[Data, int, int], Any]
    params: dict[str, int]
    module: nn.Module
    notes: str = ""
    scores: bool = True  # predict gives a model's probabilities (NE is reported); False: a timing-only stand-in


def _numel(t: Any) -> int:
    return sum(s.tensor.numel() for s in t.local_shards()) if hasattr(t, "local_shards") else t.numel()


def param_counts(module: nn.Module, is_table: Callable[[str], bool] = lambda n: "embedding" in n) -> dict[str, int]:
    """Numbers in embedding tables and in everything else (a sharded table counts this rank's shards)."""
    counts = {"embedding": 0, "dense": 0}
    for name, t in module.state_dict().items():
        if not (hasattr(t, "local_shards") or (torch.is_tensor(t) and t.is_floating_point())):
            continue
        counts["embedding" if is_table(name) else "dense"] += _numel(t)
    return counts


def _split_optimizer(model: nn.Module, is_table: Callable[[str], bool], table_lr: float, lr: float) -> Callable[[], None]:
    """Dense Adagrad on the embedding tables, Adam on the rest: the unfused stand-in for c2al's optimizers."""
    tables = [p for n, p in model.named_parameters() if is_table(n)]
    rest = [p for n, p in model.named_parameters() if not is_table(n)]
    opts = [torch.optim.Adagrad(tables, lr=table_lr), torch.optim.Adam(rest, lr=lr)]

    def step() -> None:
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    return step


def _bce_step(model: nn.Module, forward: Callable[[Any], torch.Tensor], update: Callable[[], None],
              probabilities: bool) -> Callable[[Any], None]:
    loss_fn = nn.functional.binary_cross_entropy if probabilities else nn.functional.binary_cross_entropy_with_logits

    def step(inp: tuple[Any, torch.Tensor]) -> None:
        model.train()
        x, y = inp
        loss_fn(forward(x).reshape(-1), y).backward()
        update()

    return step


def _predictor(model: nn.Module, forward: Callable[[Any], torch.Tensor], probabilities: bool) -> Callable[[Any], torch.Tensor]:
    @torch.no_grad()
    def predict(inp: tuple[Any, torch.Tensor]) -> torch.Tensor:
        model.eval()
        out = forward(inp[0]).reshape(-1)
        return out if probabilities else torch.sigmoid(out)

    return predict


def build_c2al_model(kind: str, sizes: Sizes, *, lean: bool, dropout: float, device: str) -> nn.Module:
    """c2al's AFM (with Xiao's per-id first-order tables) or AttentionFM over 26 EBC tables."""
    from c2al.models import AFM, AttentionFM, make_ebc

    schema = schema_of(sizes)
    torch.manual_seed(sizes.seed)
    ebc = make_ebc(schema, sizes.dim, device=device)
    if kind == "afm":
        linear = make_ebc(schema, 4, device=device, prefix="w_")
        return AFM(ebc, 0, attention_dim=sizes.attention, dropout=dropout, first_order_ebc=linear, lean=lean)
    return AttentionFM(ebc, 0, rank=8)


def c2al_sharded(kind: str, sizes: Sizes, *, lean: bool = True, heads: bool = False, sharding: str = "table_wise") -> Variant:
    """DMP-sharded model, fused row-wise Adagrad tables, Adam on the dense part; optionally 2 aux heads."""
    import c2al
    from c2al.dist.process import init_distributed
    from c2al.dist.sharding import dense_optimizer, shard
    from c2al.models import SHARED_AT
    from c2al.train.task import TrainModule

    model = build_c2al_model(kind, sizes, lean=lean, dropout=sizes.dropout, device="meta")
    params = None
    inner: nn.Module = model
    if heads:
        inner = c2al.attach(model, SHARED_AT, 2, head=model.over_arch)
    info = init_distributed("cpu")
    dmp = shard(TrainModule(inner), info, table_optimizer="rowwise_adagrad", table_lr=0.05, sharding_type=sharding)
    opt = dense_optimizer(dmp, "adam", 3e-3)
    served = dmp.module.model.model if heads else dmp.module.model  # the user's model inside the wrapper
    params = param_counts(served)

    def step(batch: Batch) -> None:
        dmp.train()
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(batch: Batch) -> torch.Tensor:
        dmp.eval()
        out = dmp.module.model(batch.dense, batch.sparse)
        return torch.sigmoid((out.logits if heads else out).reshape(-1))

    return Variant(step=step, predict=predict, prepare=to_batch, params=params, module=dmp)


def stripped_predictor(variant: Variant) -> tuple[Callable[[Batch], torch.Tensor], nn.Module]:
    """c2al.detach of a heads variant: the user's model, served without heads."""
    import c2al

    model = c2al.detach(variant.module.module.model)
    return (torch.no_grad()(lambda batch: torch.sigmoid(model.eval()(batch.dense, batch.sparse).reshape(-1))), model)


def tables_only(sizes: Sizes) -> Variant:
    """TorchRec's sharded tables alone: the lookup, a trivial loss, backward with the fused update.

    predict times the same lookup in eval mode, squashing each row's pooled sum;
    there is no model, so no NE is reported.
    """
    from c2al.dist.process import init_distributed
    from c2al.dist.sharding import shard
    from c2al.models import make_ebc

    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = make_ebc(schema_of(sizes), sizes.dim, device="meta")

        def forward(self, batch: Batch) -> torch.Tensor:
            return self.ebc(batch.sparse).values()  # [B, F * D] pooled embeddings

    dmp = shard(Tables(), init_distributed("cpu"), table_optimizer="rowwise_adagrad", table_lr=0.05)

    def step(batch: Batch) -> None:
        dmp.train()
        dmp(batch).square().mean().backward()

    @torch.no_grad()
    def predict(batch: Batch) -> torch.Tensor:
        dmp.eval()
        return torch.sigmoid(dmp(batch).sum(1))  # [B]: a real lookup, not a model's probability

    return Variant(step=step, predict=predict, prepare=to_batch, params=param_counts(dmp), module=dmp, scores=False,
                   notes="no dense part; predict is the eval-mode lookup plus a row sum, so no NE")


def c2al_embeddingbag(sizes: Sizes) -> Variant:
    """c2al's lean AFM on an unsharded EBC (plain torch.nn.EmbeddingBag per table), dense Adagrad/Adam."""
    model = build_c2al_model("afm", sizes, lean=True, dropout=sizes.dropout, device="cpu")
    update = _split_optimizer(model, lambda n: "embedding_bag_collection" in n, 0.05, 3e-3)
    fwd = lambda x: model(x.dense, x.sparse)  # noqa: E731
    prepare = lambda d, s, n: (to_batch(d, s, n), torch.from_numpy(d.labels[s : s + n]))  # noqa: E731
    return Variant(step=_bce_step(model, fwd, update, False), predict=_predictor(model, fwd, False),
                   prepare=prepare, params=param_counts(model), module=model)


def deepctr_afm(sizes: Sizes) -> Variant:
    """deepctr-torch's AFM, driven by our loop (its fit() adds a DataLoader and callbacks we do not time)."""
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import AFM as DeepCTRAFM

    cols = [SparseFeat(f"c{i}", v, embedding_dim=sizes.dim) for i, v in enumerate(sizes.vocabs)]
    # No L2 terms: c2al's AFM has none, and deepctr's would add a pass over every table per step.
    model = DeepCTRAFM(cols, cols, attention_factor=sizes.attention, afm_dropout=sizes.dropout, l2_reg_linear=0,
                       l2_reg_embedding=0, l2_reg_att=0, seed=sizes.seed, device="cpu")
    update = _split_optimizer(model, lambda n: "embedding_dict" in n, 0.05, 3e-3)
    prepare = lambda d, s, n: (torch.from_numpy(d.ids[s : s + n].astype(np.float32)),  # noqa: E731
                               torch.from_numpy(d.labels[s : s + n]))
    return Variant(step=_bce_step(model, model, update, True), predict=_predictor(model, model, True),
                   prepare=prepare, params=param_counts(model), module=model,
                   notes="input: float [B, F] of ids as deepctr expects; dropout on the attention output [B, D] "
                         "(c2al's AFM drops the [B, P, D] pair products, as Xiao et al.)")


def torchfm_afm(sizes: Sizes) -> Variant:
    """pytorch-fm (torchfm) AttentionalFactorizationMachineModel: one nn.Embedding over all fields."""
    from torchfm.model.afm import AttentionalFactorizationMachineModel

    torch.manual_seed(sizes.seed)
    model = AttentionalFactorizationMachineModel(sizes.vocabs, sizes.dim, sizes.attention, (sizes.dropout, sizes.dropout))
    is_table = lambda n: n.startswith(("embedding", "linear.fc"))  # noqa: E731
    update = _split_optimizer(model, is_table, 0.05, 3e-3)
    prepare = lambda d, s, n: (torch.from_numpy(d.ids[s : s + n]), torch.from_numpy(d.labels[s : s + n]))  # noqa: E731
    return Variant(step=_bce_step(model, model, update, True), predict=_predictor(model, model, True),
                   prepare=prepare, params=param_counts(model, is_table), module=model,
                   notes="dropout on the attention scores and on the pooled output")
