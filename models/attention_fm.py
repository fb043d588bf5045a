"""Attention FM: the "optimized FM" interaction of DHEN / Wukong over a TorchRec EBC.

Letters: B batch, F fields (sparse fields, plus one when there are dense
features), D embedding dim, K rank K' (columns of Y), H attention hidden size.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.errors import C2ALError
from c2al.models.common import MLP
from c2al.models.fields import FieldArch


class AttentionFMInteractionArch(nn.Module):
    """G = X (X^T Y(X)); its flattened output is the shared representation.

    With X the [F, D] field embeddings of a sample, an attention MLP over the
    flattened X (F*D -> H with ReLU -> F*K) produces Y(X) [F, K]. Each column
    of Y is normalized with a softmax over the F fields, so column k is a
    distribution that picks and weighs shared embeddings: X^T Y [D, K] holds K
    attention-pooled embeddings and G[i, k] = <x_i, pooled_k>. Softmax (rather
    than an unnormalized Y) keeps G on the scale of the FM dot products and
    makes near-zero share / entropy of Y meaningful against the uniform 1/F.

    G is computed as X @ (X^T @ Y), O(F K D) per sample; the [F, F] matrix
    X X^T is never formed. C2AL's auxiliary heads read the [B, F*K] output
    (`at="inter_arch"`).

    Args:
        num_fields: F (>= 1).
        embedding_dim: D.
        rank: K, columns of Y.
        attention_hidden: H, hidden size of the attention MLP.
        device: where the parameters are created.

    Example:
        >>> arch = AttentionFMInteractionArch(num_fields=3, embedding_dim=4, rank=2)
        >>> arch(torch.randn(5, 3, 4)).shape
        torch.Size([5, 6])
        >>> arch.attention(torch.randn(5, 3, 4)).shape
        torch.Size([5, 3, 2])
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        rank: int = 8,
        attention_hidden: int = 64,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_fields < 1 or rank < 1 or attention_hidden < 1:
            raise C2ALError(
                f"AttentionFM: num_fields, rank and attention_hidden must be >= 1, "
                f"got {num_fields}, {rank}, {attention_hidden}"
            )
        self.attention_norm_dim: int = 1  # attention() sums to 1 over the fields
        self.F: int = num_fields
        self.K: int = rank
        self.out_features: int = num_fields * rank
        self.hidden = nn.Sequential(nn.Linear(num_fields * embedding_dim, attention_hidden, device=device), nn.ReLU())
        self.out = nn.Linear(attention_hidden, num_fields * rank, device=device)

    def attention_hidden(self, fields: torch.Tensor) -> torch.Tensor:
        """ReLU activations of the attention MLP, for dead-unit statistics.

        Args:
            fields: X [B, F, D].

        Returns:
            [B, H].
        """
        return self.hidden(fields.flatten(1))

    def attention(self, fields: torch.Tensor) -> torch.Tensor:
        """Y(X), each column a softmax over the fields.

        Args:
            fields: X [B, F, D].

        Returns:
            Y [B, F, K]; Y.sum(dim=1) is all ones.
        """
        logits = self.out(self.attention_hidden(fields)).view(-1, self.F, self.K)  # [B, F, K]
        return torch.softmax(logits, dim=1)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """
        Args:
            fields: X [B, F, D].

        Returns:
            G flattened, [B, F*K] (shared representation).
        """
        y = self.attention(fields)  # [B, F, K]
        pooled = torch.bmm(fields.transpose(1, 2), y)  # [B, D, K]
        return torch.bmm(fields, pooled).flatten(1)  # [B, F, K] -> [B, F*K]


class AttentionFM(FieldArch):
    """DHEN/Wukong-style optimized-FM ranker: logit = over_arch(inter_arch(X)).

    Parts: `sparse_arch` and `dense_arch` (from FieldArch: the batch as
    [B, F, D] fields X, the dense features as the last field so they take part
    in the interaction; no `dense_arch` without dense features), `inter_arch`
    (AttentionFMInteractionArch, the SHARED REPRESENTATION [B, F*K] that C2AL's
    auxiliary heads read) and `over_arch` (MLP F*K -> over_sizes -> 1, reading
    only `inter_arch`'s output so a head cloned from it reads the shared
    representation directly). `attention_weights` gives Y [B, F, K].

    Args:
        embedding_bag_collection: injected EBC (e.g. `make_ebc`), one D for all tables.
        dense_in_features: number of dense features; 0 for none.
        rank: K', columns of Y.
        attention_hidden: hidden size of the attention MLP.
        over_sizes: hidden sizes of `over_arch` before its 1-unit output.
        dense_device: where the non-embedding parameters are created (the EBC
            may be on "meta" for sharding).

    Example:
        >>> from c2al.data.schema import Schema, SparseFeature
        >>> from c2al.models.common import make_ebc
        >>> schema = Schema(sparse=(SparseFeature("user", 10), SparseFeature("item", 20)))
        >>> model = AttentionFM(make_ebc(schema, dim=8), dense_in_features=0, rank=4)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.int32))
        >>> model(torch.empty(2, 0), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        dense_in_features: int,
        rank: int = 8,
        attention_hidden: int = 64,
        over_sizes: Sequence[int] = (64,),
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_device)
        self.inter_arch = AttentionFMInteractionArch(
            self.num_fields, self.embedding_dim, rank, attention_hidden, device=dense_device
        )
        self.over_arch = MLP(
            self.inter_arch.out_features, [*over_sizes, 1], activate_last=False, device=dense_device
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, n_dense].
            sparse_features: KJT with every EBC feature, straight from the batch.

        Returns:
            [B] logits.
        """
        shared = self.inter_arch(self.field_embeddings(dense_features, sparse_features))  # [B, F*K]
        return self.over_arch(shared).squeeze(-1)
