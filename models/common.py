"""Building blocks shared by the models: the EBC factory and the small `*Arch` parts.

Letters used in shape comments: B batch, F fields, D embedding dim, H hidden.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.data.schema import Schema
from c2al.errors import C2ALError


def table_name(feature: str, prefix: str = "t_") -> str:
    """The embedding table name `make_ebc` gives a feature.

    Args:
        feature: sparse feature name.
        prefix: prepended to the feature name.

    Returns:
        "<prefix><feature>", "t_<feature>" by default.
    """
    return f"{prefix}{feature}"


def make_ebc(schema: Schema, dim: int, device: str | torch.device = "cpu", prefix: str = "t_") -> EmbeddingBagCollection:
    """One embedding table per sparse feature of `schema`, all of dimension `dim`.

    Single-valued fields pool with SUM (a no-op for one id, and the cheapest
    kernel); multi-hot fields pool with MEAN so a row's embedding does not grow
    with how many ids it carries.

    Args:
        schema: the data source's fields; tables follow its sparse order.
        dim: embedding dimension D shared by every table.
        device: where the tables live; "meta" builds them without memory so a
            sharder (DistributedModelParallel) can place them later.
        prefix: table-name prefix; a second collection over the same schema (AFM's
            first-order weights) needs another one, since table names are global to a plan.

    Returns:
        An EmbeddingBagCollection whose output keys are the feature names.
    """
    if not schema.sparse:
        raise C2ALError("make_ebc: the schema has no sparse features")
    if dim < 1:
        raise C2ALError(f"make_ebc: dim must be >= 1, got {dim}")
    tables = [
        EmbeddingBagConfig(
            name=table_name(f.name, prefix),
            embedding_dim=dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=PoolingType.MEAN if f.multi_hot else PoolingType.SUM,
        )
        for f in schema.sparse
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def ebc_feature_names(ebc: EmbeddingBagCollection) -> list[str]:
    """The keys of the EBC's output KeyedTensor.

    Args:
        ebc: any EmbeddingBagCollection (a feature shared by tables is keyed "feature@table").

    Returns:
        Keys in the order the EBC emits them (table order, then feature order).
    """
    return [name for names in get_embedding_names_by_table(ebc.embedding_bag_configs()) for name in names]


def ebc_dim(ebc: EmbeddingBagCollection) -> int:
    """The embedding dimension shared by every table.

    Args:
        ebc: any EmbeddingBagCollection.

    Returns:
        D; raises C2ALError naming the tables' dims when they differ.
    """
    configs = ebc.embedding_bag_configs()
    if not configs:
        raise C2ALError("the EmbeddingBagCollection has no tables")
    dims = {c.name: c.embedding_dim for c in configs}
    if len(set(dims.values())) != 1:
        raise C2ALError(f"all embedding tables must share one embedding_dim, got {dims}")
    return configs[0].embedding_dim


class MLP(nn.Module):
    """Linear layers with an activation between them.

    Args:
        in_features: input width.
        layer_sizes: output width of each Linear layer.
        activation: factory of the activation module (called once per layer).
        activate_last: whether the last layer is followed by the activation too;
            False for layers that produce logits or embeddings that may be negative.
        device: where the parameters are created.

    Example:
        >>> mlp = MLP(8, [16, 1], activate_last=False)
        >>> mlp(torch.randn(4, 8)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        activation: Callable[[], nn.Module] = nn.ReLU,
        activate_last: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not layer_sizes:
            raise C2ALError("MLP: layer_sizes must name at least one layer")
        layers: list[nn.Module] = []
        width = in_features
        for i, size in enumerate(layer_sizes):
            layers.append(nn.Linear(width, size, device=device))
            if activate_last or i < len(layer_sizes) - 1:
                layers.append(activation())
            width = size
        self.model = nn.Sequential(*layers)
        self.out_features: int = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [..., in_features].

        Returns:
            [..., layer_sizes[-1]].
        """
        return self.model(x)


class SparseArch(nn.Module):
    """Pooled embeddings of every sparse feature, stacked as fields.

    Args:
        embedding_bag_collection: the injected EBC; every table must have the same D.

    Example:
        >>> from c2al.data.schema import Schema, SparseFeature
        >>> ebc = make_ebc(Schema(sparse=(SparseFeature("a", 5), SparseFeature("b", 7))), dim=4)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> SparseArch(ebc)(kjt).shape
        torch.Size([2, 2, 4])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.D: int = ebc_dim(embedding_bag_collection)
        self.feature_names: list[str] = ebc_feature_names(embedding_bag_collection)
        self.F: int = len(self.feature_names)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            features: KJT holding every feature of the EBC, passed through unmodified
                so TorchRec's pipelines can prefetch the sharded lookup.

        Returns:
            [B, F, D] pooled embeddings in the EBC's feature order.
        """
        pooled = self.embedding_bag_collection(features).to_dict()
        return torch.stack([pooled[name] for name in self.feature_names], dim=1)  # [B, F, D]


class DenseArch(nn.Module):
    """Maps the dense features to one extra D-dim field that interacts like a sparse one.

    Args:
        in_features: number of dense features (> 0).
        out_features: D, the embedding dimension of the sparse fields.
        hidden_sizes: hidden widths before the output layer.
        device: where the parameters are created.

    Example:
        >>> DenseArch(3, 8)(torch.randn(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_sizes: Sequence[int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise C2ALError(f"DenseArch: in_features must be >= 1, got {in_features}")
        hidden = (out_features,) if hidden_sizes is None else tuple(hidden_sizes)
        # No activation on the output: sparse embeddings take both signs, so must this field.
        self.model = MLP(in_features, [*hidden, out_features], activate_last=False, device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: [B, n_dense].

        Returns:
            [B, D].
        """
        return self.model(features)
