"""The field setup shared by the field-interaction models (AFM, AttentionFM).

Letters: B batch, F fields (sparse fields, plus one when there are dense
features), F_s sparse fields, D embedding dim.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.errors import C2ALError
from c2al.models.common import DenseArch, SparseArch


class FieldArch(nn.Module):
    """Base of models whose interaction reads a batch as F fields of D dims.

    Builds `sparse_arch` (EBC lookup -> [B, F_s, D]) and `dense_arch` (dense
    features -> one more D-dim field appended after the sparse ones, so dense
    features take part in the interaction; None without dense features), and
    turns a batch into the [B, F, D] field tensor that a subclass's `inter_arch`
    reads. A subclass builds its own `inter_arch` (with an `attention(fields)`
    method) and `over_arch` after calling `super().__init__`.

    It is a base class rather than a submodule so the parts keep their
    top-level names: state_dict keys (`sparse_arch.*`, `dense_arch.*`), sharding
    plans and `c2al.attach(model, "sparse_arch", ...)` read the same paths as
    before, and the dense parameters are created first, as they always were,
    so seeded models start from the same numbers.

    Args:
        embedding_bag_collection: injected EBC (e.g. `make_ebc`), one D for all tables.
        dense_in_features: number of dense features; 0 for none.
        dense_device: where the dense field's parameters are created (the EBC
            may be on "meta" for sharding).

    Example:
        >>> from c2al.data.schema import Schema, SparseFeature
        >>> from c2al.models.common import make_ebc
        >>> schema = Schema(sparse=(SparseFeature("user", 10), SparseFeature("item", 20)))
        >>> arch = FieldArch(make_ebc(schema, dim=8), dense_in_features=3)
        >>> (arch.num_fields, arch.embedding_dim)
        (3, 8)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.int32))
        >>> arch.field_embeddings(torch.randn(2, 3), kjt).shape
        torch.Size([2, 3, 8])
    """

    inter_arch: nn.Module  # built by the subclass; `attention_weights` reads its `attention`

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        dense_in_features: int,
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if dense_in_features < 0:
            # Named after the concrete model, so the message says which constructor got it.
            raise C2ALError(f"{type(self).__name__}: dense_in_features must be >= 0, got {dense_in_features}")
        self.sparse_arch = SparseArch(embedding_bag_collection)
        self.embedding_dim: int = self.sparse_arch.D
        self.dense_arch: DenseArch | None = (
            DenseArch(dense_in_features, self.embedding_dim, device=dense_device) if dense_in_features > 0 else None
        )
        self.num_fields: int = self.sparse_arch.F + (1 if self.dense_arch is not None else 0)

    def field_embeddings(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, n_dense] (ignored when the model has no dense_arch).
            sparse_features: KJT with every EBC feature, passed to the EBC unmodified.

        Returns:
            X [B, F, D]: sparse fields in EBC order, then the dense field if any.
        """
        fields = self.sparse_arch(sparse_features)  # [B, F_s, D]
        if self.dense_arch is not None:
            fields = torch.cat([fields, self.dense_arch(dense_features).unsqueeze(1)], dim=1)  # [B, F, D]
        return fields

    @torch.no_grad()
    def attention_weights(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """The interaction's attention over this batch's fields, detached.

        Args:
            dense_features: [B, n_dense].
            sparse_features: KJT with every EBC feature.

        Returns:
            `inter_arch.attention(fields)`: [B, P] pair weights for AFM, Y [B, F, K] for AttentionFM.
        """
        return self.inter_arch.attention(self.field_embeddings(dense_features, sparse_features))
