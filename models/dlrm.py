"""DLRM (Naumov et al. 2019) as RF^2 configures it: dot interactions of pooled embeddings, a small top MLP.

TorchRec's own `DLRM` needs dense features (its dense arch output is one interaction field and
is concatenated to the over arch's input); RF^2's MovieLens task has none, so its top MLP reads
the pairwise dot products of the sparse fields alone. This one takes dense input when there is
some (bottom MLP -> one more D-dim field, as DLRM) and works without.

    sparse_arch   pooled embeddings [B, F, D] (multi-hot fields pooled by the EBC: mean)
    dense_arch    bottom MLP [n_dense -> hidden -> D] when n_dense > 0, one more field
    inter_arch    the dense field (if any) beside the F'(F'-1)/2 pairwise dot products of the fields
    over_arch     top MLP (ReLU) -> 1 logit

RF^2 (fl_libs/init.py) draws MLP weights from N(0, 1e-4) with zero biases; the tables keep
TorchRec's default U(-sqrt(1/n), sqrt(1/n)), the same rule as RF^2's embeddings.

Letters: B batch, F sparse fields, F' = F (+ 1 with dense input), D embedding dim, H hidden.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.data.schema import Schema
from c2al.models.common import MLP, DenseArch, SparseArch, make_ebc


class DotInteractions(nn.Module):
    """The dense field (if any) followed by the strictly lower triangle of T T^T over the fields T.

    Args:
        n_fields: F'.
        dense_width: D when the dense field is concatenated to the output (DLRM), else 0.

    Example:
        >>> DotInteractions(3)(None, torch.ones(2, 3, 4)).tolist()
        [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """

    def __init__(self, n_fields: int, dense_width: int = 0) -> None:
        super().__init__()
        rows, cols = torch.tril_indices(n_fields, n_fields, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_features: int = dense_width + n_fields * (n_fields - 1) // 2

    def forward(self, dense: torch.Tensor | None, fields: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense: [B, D] bottom MLP output, or None.
            fields: [B, F', D] every field (the dense one first when present).

        Returns:
            [B, out_features].
        """
        z = torch.bmm(fields, fields.transpose(1, 2))  # [B, F', F']
        pairs = z[:, self.rows, self.cols]  # [B, F'(F'-1)/2]
        return pairs if dense is None else torch.cat([dense, pairs], dim=1)


class DLRM(nn.Module):
    """DLRM over an injected EBC; `forward(dense, sparse)` returns [B] logits.

    Args:
        embedding_bag_collection: one table per sparse field, all of dimension D.
        dense_in_features: n_dense (0: no bottom MLP).
        bottom_layers: hidden widths of the bottom MLP (it ends at D).
        top_layers: hidden widths of the top MLP (it ends at one logit).
        init_std: std of the MLP weights' normal init (RF^2: 1e-4); 0 keeps torch's default.

    Example:
        >>> from c2al.data.schema import SparseFeature
        >>> schema = Schema(sparse=(SparseFeature("a", 5), SparseFeature("b", 7)))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]),
        ...                                           lengths=torch.tensor([1, 1, 1, 1]))
        >>> build_dlrm(schema)(torch.zeros(2, 0), kjt).shape
        torch.Size([2])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int = 0,
                 bottom_layers: Sequence[int] = (16,), top_layers: Sequence[int] = (256,), init_std: float = 1e-4) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(embedding_bag_collection)
        d = self.sparse_arch.D
        self.dense_arch = DenseArch(dense_in_features, d, hidden_sizes=bottom_layers) if dense_in_features > 0 else None
        fields = self.sparse_arch.F + (1 if self.dense_arch is not None else 0)
        self.inter_arch = DotInteractions(fields, d if self.dense_arch is not None else 0)
        self.over_arch = MLP(self.inter_arch.out_features, [*top_layers, 1], activate_last=False)
        if init_std > 0:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, init_std)
                    nn.init.zeros_(m.bias)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, n_dense] (n_dense may be 0).
            sparse_features: KJT of every sparse field.

        Returns:
            [B] logits.
        """
        fields = self.sparse_arch(sparse_features)  # [B, F, D]
        dense = None
        if self.dense_arch is not None:
            dense = self.dense_arch(dense_features)  # [B, D]
            fields = torch.cat([dense.unsqueeze(1), fields], dim=1)  # [B, F', D]
        return self.over_arch(self.inter_arch(dense, fields)).squeeze(-1)


def build_dlrm(schema: Schema, embedding_dim: int = 16, bottom_layers: Sequence[int] = (16,),
               top_layers: Sequence[int] = (256,), init_std: float = 1e-4) -> DLRM:
    """RF^2's DLRM for a schema: embedding 16, bottom MLP [16], top MLP [256].

    Args:
        schema: the data's fields (one table per sparse field; multi-hot fields mean-pooled).
        embedding_dim: D.
        bottom_layers, top_layers, init_std: as `DLRM`.

    Returns:
        The model.
    """
    return DLRM(make_ebc(schema, embedding_dim), len(schema.dense), bottom_layers, top_layers, init_std)
