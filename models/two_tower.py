"""Two-tower retrieval model over a TorchRec EBC.

Letters: B batch, D embedding dim, H tower output size.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.errors import C2ALError
from c2al.models.common import MLP, ebc_dim, ebc_feature_names


class TowerArch(nn.Module):
    """One tower: its own features' pooled embeddings (and optional dense features) -> MLP.

    Args:
        feature_names: the EBC output keys this tower reads, in the order concatenated.
        embedding_dim: D.
        dense_in_features: dense features appended to the input; 0 for none.
        layer_sizes: MLP widths; the last is H. No activation after the last
            layer, so dot products between towers can take both signs.
        device: where the parameters are created.

    Example:
        >>> tower = TowerArch(["user"], embedding_dim=4, layer_sizes=(8, 2))
        >>> tower({"user": torch.randn(3, 4)}).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        embedding_dim: int,
        dense_in_features: int = 0,
        layer_sizes: Sequence[int] = (64, 32),
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.feature_names: list[str] = list(feature_names)
        self.dense_in_features: int = dense_in_features
        in_features = len(self.feature_names) * embedding_dim + dense_in_features
        self.mlp = MLP(in_features, layer_sizes, activate_last=False, device=device)
        self.out_features: int = self.mlp.out_features

    def forward(self, pooled: dict[str, torch.Tensor], dense_features: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pooled: EBC output as a dict, feature name -> [B, D].
            dense_features: [B, n_dense]; read only when dense_in_features > 0.

        Returns:
            [B, H].
        """
        parts = [pooled[name] for name in self.feature_names]
        if self.dense_in_features > 0:
            parts.append(dense_features)
        return self.mlp(torch.cat(parts, dim=1))


class DotInteractionArch(nn.Module):
    """u * v element-wise: the dot product before its sum; the shared representation.

    Args:
        out_features: H, recorded so auxiliary heads can be sized from it.

    Example:
        >>> DotInteractionArch(3)(torch.ones(2, 3), torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features: int = out_features

    def forward(self, query: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query: u [B, H].
            candidate: v [B, H].

        Returns:
            [B, H].
        """
        return query * candidate


class SumOverArch(nn.Module):
    """Sums the interaction over H, completing the dot product. Has no parameters.

    Example:
        >>> SumOverArch()(torch.ones(2, 3))
        tensor([[3.],
                [3.]])
    """

    def forward(self, interaction: torch.Tensor) -> torch.Tensor:
        """
        Args:
            interaction: [B, H].

        Returns:
            [B, 1].
        """
        return interaction.sum(dim=-1, keepdim=True)


class TwoTower(nn.Module):
    """Query (user) and candidate (item) towers scored by a dot product.

    Parts: `embedding_bag_collection` (one lookup of every feature per call),
    `user_arch` and `item_arch` (TowerArch each), `inter_arch` (u * v, the
    SHARED REPRESENTATION [B, H] that C2AL's auxiliary heads read) and
    `over_arch` (sum over H: forward = (u * v).sum(-1) = u . v).

    The KJT argument goes straight into the EBC, unmodified: TorchRec's
    TrainPipelineSparseDist pipelines a sharded EBC only when its input comes
    from the batch untouched. Features of the EBC read by neither tower (e.g.
    context features) are looked up but unused; leave them out of the EBC or
    add them to `user_features` for a context-aware query tower.

    Args:
        embedding_bag_collection: injected EBC, one D for all tables.
        user_features: features read by the query tower.
        item_features: features read by the candidate tower.
        dense_in_features: dense features, fed to the query tower; 0 for none.
        layer_sizes: MLP widths of each tower; the last is H.
        dense_device: where the tower parameters are created.

    Example:
        >>> from c2al.data.schema import Schema, SparseFeature
        >>> from c2al.models.common import make_ebc
        >>> schema = Schema(sparse=(SparseFeature("user", 10, "user"), SparseFeature("item", 20, "item")))
        >>> model = TwoTower(make_ebc(schema, dim=8), schema.user_features, schema.item_features)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.int32))
        >>> model(torch.empty(2, 0), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        user_features: Sequence[str],
        item_features: Sequence[str],
        dense_in_features: int = 0,
        layer_sizes: Sequence[int] = (64, 32),
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        known = ebc_feature_names(embedding_bag_collection)
        for arg, names in (("user_features", user_features), ("item_features", item_features)):
            if not names:
                raise C2ALError(f"TwoTower: {arg} is empty")
            unknown = [n for n in names if n not in known]
            if unknown:
                raise C2ALError(f"TwoTower: {arg} names {unknown}, not in the EBC's features {known}")
        if dense_in_features < 0:
            raise C2ALError(f"TwoTower: dense_in_features must be >= 0, got {dense_in_features}")
        D = ebc_dim(embedding_bag_collection)
        self.embedding_bag_collection = embedding_bag_collection
        self.user_arch = TowerArch(user_features, D, dense_in_features, layer_sizes, device=dense_device)
        self.item_arch = TowerArch(item_features, D, 0, layer_sizes, device=dense_device)
        self.inter_arch = DotInteractionArch(self.user_arch.out_features)
        self.over_arch = SumOverArch()

    def query(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, n_dense].
            sparse_features: KJT with every EBC feature.

        Returns:
            u [B, H].
        """
        return self.user_arch(self.embedding_bag_collection(sparse_features).to_dict(), dense_features)

    def candidate(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            sparse_features: KJT with every EBC feature (user features may be empty bags).

        Returns:
            v [B, H].
        """
        return self.item_arch(self.embedding_bag_collection(sparse_features).to_dict())

    def towers(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers from one EBC lookup (for in-batch softmax training).

        Args:
            dense_features: [B, n_dense].
            sparse_features: KJT with every EBC feature, straight from the batch.

        Returns:
            (u [B, H], v [B, H]).
        """
        pooled = self.embedding_bag_collection(sparse_features).to_dict()
        return self.user_arch(pooled, dense_features), self.item_arch(pooled)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, n_dense].
            sparse_features: KJT with every EBC feature, straight from the batch.

        Returns:
            [B] logits u . v.
        """
        query, candidate = self.towers(dense_features, sparse_features)  # [B, H] each
        return self.over_arch(self.inter_arch(query, candidate)).squeeze(-1)
