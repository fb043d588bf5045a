"""Attentional Factorization Machine (Xiao et al., IJCAI 2017) over a TorchRec EBC.

Letters: B batch, F fields (sparse fields, plus one when there are dense
features), D embedding dim, A attention hidden size, P = F(F-1)/2 pairs.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.errors import C2ALError
from c2al.models.common import ebc_dim
from c2al.models.fields import FieldArch


def _pair_blocks(num_fields: int) -> list[tuple[int, int, int]]:
    """(i, offset, n) per field i: its pairs (i, i+1..F-1) sit at [offset, offset + n) in pair order."""
    blocks, offset = [], 0
    for i in range(num_fields - 1):
        n = num_fields - 1 - i
        blocks.append((i, offset, n))
        offset += n
    return blocks


def _chunk_pairs(x: torch.Tensor, blocks: list[tuple[int, int, int]], num_pairs: int) -> torch.Tensor:
    """[C, F, D] -> [C, P, D] products, written block by block (no gather, so no scatter backward)."""
    q = x.new_empty(x.shape[0], num_pairs, x.shape[2])
    for i, offset, n in blocks:
        torch.mul(x[:, i : i + 1], x[:, i + 1 :], out=q[:, offset : offset + n])
    return q


def _dropout_lanes(shape: tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, int, float]:
    """Uniform 15-bit draws for a dropout mask at rate p rounded to 1/32768.

    Four draws come from each 64-bit random word: about 3x faster than
    torch.rand on CPU, where drawing the [B, P, D] mask was a fifth of a step.
    Kept as int16 (half the bytes of a float mask) for the backward pass.

    Returns:
        (lanes [*shape] int16 in [0, 32768), cut, scale): a position is kept
        when its lane >= cut, and kept values are scaled by 1 / (1 - cut / 32768).
    """
    n, cut = math.prod(shape), round(p * 32768)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = words.view(torch.int16)[:n].bitwise_and_(0x7FFF)
    return lanes.view(shape), cut, 32768 / (32768 - cut)


def _keep(lanes: torch.Tensor, cut: int, dtype: torch.dtype) -> torch.Tensor:
    """1.0 where lanes >= cut, else 0.0 (a subtraction and a clamp beat a compare and a cast on CPU)."""
    return torch.sub(lanes, cut - 1, out=torch.empty(lanes.shape, dtype=dtype, device=lanes.device)).clamp_(0, 1)


class _AttentionPool(torch.autograd.Function):
    """Fused AFM pooling: pair products, attention MLP, softmax and weighted sum, chunk by chunk.

    Only the [B, F, D] input (and, with dropout, the [B, P, D] int16 mask draws) is
    saved; each chunk's [C, P, D] products and [C, P, A] activations are
    recomputed in backward, so they stay in cache and
    peak memory does not grow with P. Gradients are hand-derived:
    c_p = g . q_p, ds = w (c - sum w c), dz = (ds h) 1[z > 0],
    dq = dz W + w g, and dq_ij flows to v_i as dq_ij * v_j (and to v_j as dq_ij * v_i).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, score: torch.Tensor,
                p: float, chunk: int) -> torch.Tensor:
        B, F, D = x.shape
        blocks, P, h = _pair_blocks(F), F * (F - 1) // 2, score.reshape(-1)
        out = x.new_empty(B, D)
        lanes, cut, scale = _dropout_lanes((B if p > 0 else 0, P, D), p, x.device)  # [B, P, D] int16
        for r0 in range(0, B, chunk):
            xc = x[r0 : r0 + chunk]  # [C, F, D]
            q = _chunk_pairs(xc, blocks, P)  # [C, P, D]
            r = torch.addmm(bias, q.view(-1, D), weight.t()).relu_()  # [C*P, A]
            w = torch.softmax(torch.mv(r, h).view(-1, P), dim=-1)  # [C, P]
            if p > 0:
                q.mul_(_keep(lanes[r0 : r0 + chunk], cut, q.dtype))
            torch.sum(q.mul_(w.mul_(scale).unsqueeze(-1)), dim=1, out=out[r0 : r0 + chunk])  # [C, D]
        ctx.save_for_backward(x, weight, bias, score, lanes)
        ctx.p, ctx.chunk, ctx.cut, ctx.scale = p, chunk, cut, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, score, lanes = ctx.saved_tensors
        p, chunk, cut, scale = ctx.p, ctx.chunk, ctx.cut, ctx.scale
        B, F, D = x.shape
        blocks, P, h = _pair_blocks(F), F * (F - 1) // 2, score.reshape(-1)
        dx = torch.zeros_like(x)
        dweight, dbias, dh = torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros_like(h)
        for r0 in range(0, B, chunk):
            xc, g = x[r0 : r0 + chunk], grad_out[r0 : r0 + chunk]  # [C, F, D], [C, D]
            q = _chunk_pairs(xc, blocks, P)  # [C, P, D]
            qf = q.view(-1, D)
            r = torch.addmm(bias, qf, weight.t()).relu_()  # [C*P, A]
            w = torch.softmax(torch.mv(r, h).view(-1, P), dim=-1)  # [C, P]
            gq = g.unsqueeze(1)  # d out / d (scale w_p q_p): [C, 1, D], or [C, P, D] through the mask
            if p > 0:
                gq = _keep(lanes[r0 : r0 + chunk], cut, q.dtype).mul_(gq)
            c = (q * gq).sum(-1).mul_(scale)  # [C, P] = dL/dw
            ds = (w * (c - (w * c).sum(-1, keepdim=True))).view(-1)  # [C*P] through the softmax
            dh.addmv_(r.t(), ds)
            dz = r.gt_(0).mul_(ds.unsqueeze(1)).mul_(h)  # [C*P, A]
            dweight.addmm_(dz.t(), qf)
            dbias.add_(dz.sum(0))
            dq = torch.mm(dz, weight).view(-1, P, D).addcmul_(w.unsqueeze(-1), gq, value=scale)  # [C, P, D]
            dxc = dx[r0 : r0 + chunk]
            for i, offset, n in blocks:
                dqi = dq[:, offset : offset + n]  # pairs (i, j > i)
                dxc[:, i].add_((dqi * xc[:, i + 1 :]).sum(1))
                dxc[:, i + 1 :].addcmul_(dqi, xc[:, i : i + 1])
        return dx, dweight, dbias, dh.view_as(score), None, None


def afm_attention_pool(fields: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, score: torch.Tensor,
                       dropout: float = 0.0, chunk: int = 256) -> torch.Tensor:
    """Attention-weighted sum of all pair products, without materializing [B, P, *] tensors.

    Args:
        fields: [B, F, D].
        weight: [A, D], bias: [A]: the attention MLP's hidden layer.
        score: [1, A], Xiao's h.
        dropout: inverted-dropout rate on the products entering the sum (0 in eval).
        chunk: rows processed at once; [chunk, P, D] is the largest temporary.

    Returns:
        [B, D], equal to the straightforward AFMInteractionArch forward.
    """
    return _AttentionPool.apply(fields, weight, bias, score, float(dropout), int(chunk))


# FX tracers (TorchRec's pipelines, c2al's tap) record the fused call as one node.
torch.fx.wrap("afm_attention_pool")



class AFMInteractionArch(nn.Module):
    """Attention-pooled pairwise interactions; its output is the shared representation.

    Every pair of fields (i < j) gives the element-wise product v_i * v_j. An
    attention MLP (D -> A with ReLU -> 1) scores each pair, a softmax over the P
    pairs turns scores into weights, and the weighted sum of the products is the
    [B, D] output. C2AL's auxiliary heads read this output (`at="inter_arch"`).

    Args:
        num_fields: F, the number of fields stacked by the model (>= 2).
        embedding_dim: D.
        attention_dim: A, the attention MLP's hidden size.
        dropout: dropout on the pairwise products entering the weighted sum
            (Xiao's dropout on the pair-wise interaction layer); the attention
            weights themselves are computed from the undropped products.
        device: where the parameters are created.
        lean: forward through `afm_attention_pool` (fused, chunked, hand-written
            backward); False runs the straightforward [B, P, D] autograd graph,
            kept as the reference and for benchmarks. Both give the same numbers
            (the dropout masks are drawn differently).
        chunk: rows per chunk of the lean path.

    Example:
        >>> arch = AFMInteractionArch(num_fields=3, embedding_dim=4, attention_dim=8)
        >>> arch(torch.randn(2, 3, 4)).shape
        torch.Size([2, 4])
        >>> arch.attention(torch.randn(2, 3, 4)).shape  # P = 3 pairs
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        attention_dim: int = 16,
        dropout: float = 0.0,
        device: torch.device | None = None,
        lean: bool = True,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        if chunk < 1:
            raise C2ALError(f"AFM: chunk must be >= 1, got {chunk}")
        self.lean = lean
        self.chunk = chunk
        self.attention_norm_dim: int = -1  # attention() sums to 1 over the pairs
        if num_fields < 2:
            raise C2ALError(f"AFM needs at least 2 fields to form pairs, got {num_fields}")
        self.F: int = num_fields
        self.out_features: int = embedding_dim
        left, right = torch.triu_indices(num_fields, num_fields, offset=1, device=device)
        # Not persistent: derived from F, so checkpoints stay free of it.
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)
        self.P: int = int(left.numel())
        self.hidden = nn.Sequential(nn.Linear(embedding_dim, attention_dim, device=device), nn.ReLU())
        self.score = nn.Linear(attention_dim, 1, bias=False, device=device)  # Xiao's h
        self.dropout = nn.Dropout(dropout)

    def pairs(self, fields: torch.Tensor) -> torch.Tensor:
        """Element-wise products of all field pairs i < j.

        Args:
            fields: [B, F, D].

        Returns:
            [B, P, D], pairs in row-major upper-triangle order (0,1), (0,2), ...
        """
        return fields.index_select(1, self.left) * fields.index_select(1, self.right)

    def attention_hidden(self, fields: torch.Tensor) -> torch.Tensor:
        """ReLU activations of the attention MLP, for dead-unit statistics.

        Args:
            fields: [B, F, D].

        Returns:
            [B, P, A].
        """
        return self.hidden(self.pairs(fields))

    def attention(self, fields: torch.Tensor) -> torch.Tensor:
        """Attention weight of every pair; each row sums to 1.

        Args:
            fields: [B, F, D].

        Returns:
            [B, P].
        """
        return self._attention_from_pairs(self.pairs(fields))

    def _attention_from_pairs(self, pairs: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.hidden(pairs)).squeeze(-1)  # [B, P]
        return torch.softmax(scores, dim=-1)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """
        Args:
            fields: [B, F, D].

        Returns:
            [B, D] attention-weighted sum of pairwise products (shared representation).
        """
        if self.lean:
            p = self.dropout.p if self.training else 0.0
            return afm_attention_pool(fields, self.hidden[0].weight, self.hidden[0].bias, self.score.weight, p, self.chunk)
        pairs = self.pairs(fields)  # [B, P, D]
        weights = self._attention_from_pairs(pairs)  # [B, P]
        return torch.bmm(weights.unsqueeze(1), self.dropout(pairs)).squeeze(1)  # [B, D]


class FirstOrderArch(nn.Module):
    """Per-id linear weights: the sum over fields of each pooled row's mean, plus w . dense.

    Args:
        embedding_bag_collection: small tables (any dimension), one per sparse feature.
        dense_in_features: number of dense features; 0 for none.
        device: where the dense weight is created.
    """

    def __init__(
        self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.row_width: int = ebc_dim(embedding_bag_collection)
        self.dense = nn.Linear(dense_in_features, 1, bias=False, device=device) if dense_in_features > 0 else None

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns [B, 1]."""
        # Row means: every entry of a row gets the same gradient, so with Adagrad-family table optimizers a
        # row sum would move 4x (the row width) faster than one scalar weight and overshoot early on.
        out = self.embedding_bag_collection(sparse_features).values().sum(dim=1, keepdim=True) / self.row_width  # [B, 1]
        if self.dense is not None:
            out = out + self.dense(dense_features)
        return out


class AFM(FieldArch):
    """Attentional FM: logit = p . inter_arch(fields) + first_order(fields) + bias.

    Parts: `sparse_arch` and `dense_arch` (from FieldArch: the batch as
    [B, F, D] fields, the dense features as the last field; no `dense_arch`
    without dense features), `inter_arch` (AFMInteractionArch, the SHARED
    REPRESENTATION [B, D] that C2AL's auxiliary heads read), `first_order`
    and `over_arch`. `attention_weights` gives the [B, P] pair weights.

    `first_order` is Xiao's per-id linear term when `first_order_ebc` (small
    tables over the same features, e.g. `make_ebc(schema, 4, prefix="w_")`)
    is injected: each id's weight is the mean of its row (FBGEMM's fused kernels
    need dimensions divisible by 4, so a row of 4 stands in for one scalar),
    plus a Linear over the dense field. Without it, `first_order` is a bias-free Linear over the flattened field embeddings
    [B, F*D] -> 1. Xiao's linear term is a learned scalar per id; here the
    per-id weight is w_f . v_id, i.e. constrained to the span of that id's
    embedding, which saves a second lookup per feature (and a second set of
    sharded tables). For MEAN-pooled multi-hot fields it equals the mean of
    those per-id weights, because the Linear commutes with pooling.

    `over_arch` is the projection p: Linear(D, 1) whose bias is the global
    bias w_0; it reads only `inter_arch`'s output, so a head cloned from it
    can read the shared representation directly.

    Args:
        embedding_bag_collection: injected EBC (e.g. `make_ebc`), one D for all tables.
        dense_in_features: number of dense features; 0 for none.
        attention_dim: A, hidden size of the attention MLP.
        dropout: dropout on the pairwise products (see AFMInteractionArch).
        dense_device: where the non-embedding parameters are created (the EBC
            may be on "meta" for sharding).
        first_order_ebc: optional small tables giving each id its own linear weight (row mean).
        lean: fused interaction (default) or the straightforward reference (see AFMInteractionArch).

    Example:
        >>> from c2al.data.schema import Schema, SparseFeature
        >>> from c2al.models.common import make_ebc
        >>> schema = Schema(sparse=(SparseFeature("user", 10), SparseFeature("item", 20)))
        >>> model = AFM(make_ebc(schema, dim=8), dense_in_features=3)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.int32))
        >>> model(torch.randn(2, 3), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        dense_in_features: int,
        attention_dim: int = 16,
        dropout: float = 0.0,
        dense_device: torch.device | None = None,
        first_order_ebc: EmbeddingBagCollection | None = None,
        lean: bool = True,
    ) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_device)
        D, num_fields = self.embedding_dim, self.num_fields
        self.inter_arch = AFMInteractionArch(num_fields, D, attention_dim, dropout, device=dense_device, lean=lean)
        self.first_order: nn.Module = (
            nn.Linear(num_fields * D, 1, bias=False, device=dense_device)
            if first_order_ebc is None
            else FirstOrderArch(first_order_ebc, dense_in_features, device=dense_device)
        )
        self.over_arch = nn.Linear(D, 1, device=dense_device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, n_dense].
            sparse_features: KJT with every EBC feature, straight from the batch.

        Returns:
            [B] logits.
        """
        fields = self.field_embeddings(dense_features, sparse_features)  # [B, F, D]
        shared = self.inter_arch(fields)  # [B, D]
        if isinstance(self.first_order, FirstOrderArch):
            linear = self.first_order(dense_features, sparse_features)  # [B, 1]
        else:
            linear = self.first_order(fields.flatten(1))  # [B, 1]
        return (self.over_arch(shared) + linear).squeeze(-1)
