"""NCF (He et al. 2017: GMF + MLP) split as federated recommendation splits it: shared item side, private user side.

`NCF` holds what a server may hold: the item tables of both branches, the MLP tower and the
prediction layer. The user rows are not in it: the caller passes each example's user vectors
(a client's own rows, which never leave the client), so the module's state_dict has no user
row by construction. Shapes follow FedRecGEL's code: factor F = 32, 3 MLP layers on the
concatenated user and item MLP embeddings of width M = F * 2^(layers - 1), halving each layer
down to F, and a linear prediction over [GMF product, MLP output] (2F). Initialisation as NCF's:
embeddings N(0, 0.01^2), MLP Xavier-uniform, the prediction layer Kaiming-uniform for a
sigmoid, biases zero.

Not registered with `--model`: its user rows are per client, not an EmbeddingBagCollection
feature, so it serves the FedRecGEL protocol benchmark only.

Letters: B examples, F factor, M MLP embedding width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c2al.errors import C2ALError


def mlp_width(factor: int, layers: int) -> int:
    """M: the width of the user and item MLP embeddings (the tower's input is 2M)."""
    return factor * 2 ** (layers - 1)


class NCF(nn.Module):
    """The shared part of NCF: item tables, MLP tower and prediction layer.

    Args:
        num_items: I.
        factor: F (the paper: 32).
        layers: MLP layers (the paper: 3).
        dropout: before each MLP layer (the paper: 0).

    Example:
        >>> m = NCF(num_items=5, factor=4, layers=3)
        >>> m(torch.zeros(2, 4), torch.zeros(2, 16), torch.tensor([0, 4])).shape
        torch.Size([2])
        >>> any("user" in name for name in m.state_dict())
        False
    """

    def __init__(self, num_items: int, factor: int = 32, layers: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if num_items < 1 or factor < 1 or layers < 1:
            raise C2ALError(f"NCF needs num_items, factor and layers >= 1, got {num_items}, {factor}, {layers}")
        self.factor, self.width = factor, mlp_width(factor, layers)
        self.item_gmf = nn.Embedding(num_items, factor)
        self.item_mlp = nn.Embedding(num_items, self.width)
        tower: list[nn.Module] = []
        for i in range(layers):
            size = factor * 2 ** (layers - i)  # 2M, M, ..., 2F in; halved out
            tower += [nn.Dropout(dropout), nn.Linear(size, size // 2), nn.ReLU()]
        self.mlp = nn.Sequential(*tower)
        self.predict = nn.Linear(2 * factor, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.item_gmf.weight, std=0.01)
        nn.init.normal_(self.item_mlp.weight, std=0.01)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.predict.bias)

    def forward(self, user_gmf: torch.Tensor, user_mlp: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits [B] of the users (their vectors [B, F], [B, M]) for the items [B]."""
        return self.score(user_gmf, user_mlp, self.item_gmf(items), self.item_mlp(items))

    def score(self, user_gmf: torch.Tensor, user_mlp: torch.Tensor, item_gmf: torch.Tensor, item_mlp: torch.Tensor) -> torch.Tensor:
        """Logits [B] from the four embeddings ([B or 1, F], [B or 1, M], [B, F], [B, M]): a client that holds copies of its item rows calls this."""
        gmf = user_gmf * item_gmf  # [B, F]
        return self.predict(torch.cat([gmf, self.tower(user_mlp, item_mlp)], dim=-1)).squeeze(-1)

    def tower(self, user_mlp: torch.Tensor, item_mlp: torch.Tensor) -> torch.Tensor:
        """The MLP on [user | item] ([B or 1, M], [B, M]) -> [B, F].

        The first layer is applied to the two halves apart (W [u | i] = W_u u + W_i i, the same
        sum), so one user's row [1, M] is multiplied once and broadcast over its B pairs: a
        client's step costs about half the first layer's products.
        """
        drop, first, rest = self.mlp[0], self.mlp[1], self.mlp[2:]
        m = user_mlp.shape[-1]
        h = F.linear(drop(user_mlp), first.weight[:, :m]) + F.linear(drop(item_mlp), first.weight[:, m:], first.bias)  # [B, M]
        return rest(h)

    def tower_parameters(self) -> list[nn.Parameter]:
        """The shared dense parameters (MLP and prediction layer), in a fixed order."""
        return [*self.mlp.parameters(), *self.predict.parameters()]
