"""Next-item dual encoder over ONE item table shared by both towers (Ning et al. 2021).

The context tower is the mean of the context items' embeddings through a dense layer (ReLU);
the label tower is the item's embedding itself. Both are L2-normalised, so a score is a
cosine. There are no per-user parameters: a federated client sends updates of shared
parameters only, and an unseen (test) user is served from its history alone.

Letters: B batch, D embedding dim, H tower output size (= D: the label tower has no layer),
V catalog size (items 1..V; row 0 of the table is never an item).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.errors import C2ALError

ITEM_TABLE = "item"
KERAS_EMBEDDING_INIT = 0.05  # Keras' Embedding init, U(-0.05, 0.05), as the paper's code (TorchRec's is +-sqrt(1 / rows))


def make_item_ebc(num_items: int, dim: int = 16, features: Sequence[str] = ("context", "label"),
                  device: str | torch.device = "cpu") -> EmbeddingBagCollection:
    """One table of V + 1 rows serving every feature named (MEAN pooling: a context bag is averaged).

    Args:
        num_items: V.
        dim: D.
        features: the KeyedJaggedTensor keys the table serves.
        device: where the table lives.

    Returns:
        The EmbeddingBagCollection.
    """
    if num_items < 1 or dim < 1:
        raise C2ALError(f"make_item_ebc: num_items and dim must be >= 1, got {num_items}, {dim}")
    config = EmbeddingBagConfig(name=ITEM_TABLE, embedding_dim=dim, num_embeddings=num_items + 1,
                                feature_names=list(features), pooling=PoolingType.MEAN,
                                init_fn=lambda w: nn.init.uniform_(w, -KERAS_EMBEDDING_INIT, KERAS_EMBEDDING_INIT))
    return EmbeddingBagCollection(tables=[config], device=torch.device(device))


class BagOfItemsArch(nn.Module):
    """The context tower after pooling: dense layers with their activations (Ning et al.: one of 16, ReLU).

    Args:
        in_features: D.
        layer_sizes: widths; the last is H.
        device: where the parameters are created.

    Example:
        >>> BagOfItemsArch(4, (3,))(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int] = (16,), device: torch.device | None = None) -> None:
        super().__init__()
        if not layer_sizes:
            raise C2ALError("BagOfItemsArch: layer_sizes is empty")
        layers: list[nn.Module] = []
        for width in layer_sizes:
            linear = nn.Linear(in_features, width, device=device)
            # Keras' Dense defaults (the paper's code): Glorot weights and ZERO bias. torch's bias init
            # (+-1/sqrt(D)) outweighs W x while the item rows are small, so every context would start
            # at nearly the same vector (one ranking for all users).
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.out_features: int = in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pooled: mean context embedding [B, D].

        Returns:
            [B, H].
        """
        return self.layers(pooled)


class SequenceTwoTower(nn.Module):
    """Context (history bag) and label (item) towers over one shared item table, scored by cosine.

    Parts: `embedding_bag_collection` (one table serving `context_feature` and `label_feature`)
    and `context_arch` (BagOfItemsArch). The KJT goes straight into the EBC, as in TwoTower.

    Args:
        embedding_bag_collection: injected EBC with one table serving both features (`make_item_ebc`).
        context_feature: the multi-hot key of the context items.
        label_feature: the single-id key of the label item.
        layer_sizes: context tower widths; the last must equal D (the label tower is the embedding).
        dense_device: where the tower parameters are created.

    Example:
        >>> model = SequenceTwoTower(make_item_ebc(num_items=5, dim=4), layer_sizes=(4,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["context", "label"],
        ...     values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 1, 1, 1], dtype=torch.int32))
        >>> model(torch.empty(2, 0), kjt).shape
        torch.Size([2])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, context_feature: str = "context",
                 label_feature: str = "label", layer_sizes: Sequence[int] = (16,), dense_device: torch.device | None = None) -> None:
        super().__init__()
        configs = embedding_bag_collection.embedding_bag_configs()
        served = [c for c in configs if context_feature in c.feature_names and label_feature in c.feature_names]
        if len(configs) != 1 or not served:
            names = [list(c.feature_names) for c in configs]
            raise C2ALError(f"SequenceTwoTower: needs one table serving {context_feature!r} and {label_feature!r}; the EBC has {names}")
        dim = served[0].embedding_dim
        self.embedding_bag_collection = embedding_bag_collection
        self.context_feature, self.label_feature, self.table = context_feature, label_feature, served[0].name
        self.num_items: int = served[0].num_embeddings - 1
        self.context_arch = BagOfItemsArch(dim, layer_sizes, device=dense_device)
        if self.context_arch.out_features != dim:
            raise C2ALError(f"SequenceTwoTower: the context tower ends at {self.context_arch.out_features}, the item embedding has {dim}")

    def towers(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit context and label vectors from one EBC lookup.

        Args:
            dense_features: [B, 0] (unused: the task has no dense features).
            sparse_features: KJT with the context and label keys.

        Returns:
            (u [B, H], v [B, H]), unit rows.
        """
        pooled = self.embedding_bag_collection(sparse_features).to_dict()
        query = self.context_arch(pooled[self.context_feature])  # [B, H]
        return F.normalize(query, dim=-1), F.normalize(pooled[self.label_feature], dim=-1)

    def catalog(self) -> torch.Tensor:
        """Unit label vectors of every item 1..V, [V, H] (row i - 1 is item i).

        Looked up with the table's own `sparse` setting, so with sparse gradients on (federated
        clients) a whole-catalog loss term yields a sparse gradient like every other lookup.
        """
        bag = self.embedding_bag_collection.embedding_bags[self.table]
        ids = torch.arange(1, self.num_items + 1, device=bag.weight.device)
        return F.normalize(F.embedding(ids, bag.weight, sparse=bag.sparse), dim=-1)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: [B, 0].
            sparse_features: KJT with the context and label keys.

        Returns:
            [B] cosine of each context with its label.
        """
        query, candidate = self.towers(dense_features, sparse_features)
        return (query * candidate).sum(-1)


def build_sequence_two_tower(num_items: int, embedding_dim: int = 16, context_layers: Sequence[int] = (16,)) -> SequenceTwoTower:
    """The paper's model over a fresh table (seed the global RNG first for fixed weights).

    Args:
        num_items: V.
        embedding_dim: D (16 in the paper).
        context_layers: the context tower's widths; the last must be D.

    Returns:
        The model, on CPU.
    """
    return SequenceTwoTower(make_item_ebc(num_items, embedding_dim), layer_sizes=context_layers)
