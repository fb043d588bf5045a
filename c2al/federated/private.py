"""Federated rounds with private user rows and one gradient step per client: FedRecGEL's protocol (Yu et al., WWW 2026).

As in anonymifish/FedRecGEL: a round samples `fraction` of the users; each sampled client
takes its own user rows (GMF and MLP; they never leave it) and a copy of the shared NCF part,
builds BCE pairs from every training positive and `negatives` fresh negatives, computes one
gradient, steps its private rows with its own Adam (lr `client_lr`, state kept across rounds),
and sends the gradient of the shared parameters (not a model delta). The server averages the
gradients over the sampled clients and applies Adam (lr `server_lr`) to the shared parameters.
The loss is the sum of the pairs' BCE over `chunk` (their code sums the BCE means of chunks of
128 pairs: the same but for the last partial chunk).

With `sam`, the step is sharpness-aware (Foret et al. 2021) in two separate moves, each from the
base gradient g: the shared parameters move by rho_shared g_sh / |g_sh| and the gradient of the
shared parameters is taken there (user rows unmoved); then the user rows move by
rho_private g_u / |g_u| and their gradient is taken there (shared parameters unmoved). The moves
are `c2al.federated.optim.sam_perturbation`; the Adams are `optim.DenseOptimizer`.

A client copies only the item rows its pairs touch, so its upload is those rows' gradients and
the tower's (`ClientUpdate`); the server adds them into dense gradients, as the paper's dense
item tables receive them.

Letters: U users, I items, P a client's pairs, R the item rows they touch, F factor, M MLP width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from c2al.data.implicit import LeaveLastOut, sample_training_pairs
from c2al.errors import C2ALError
from c2al.federated.optim import DenseOptimizer, sam_perturbation
from c2al.models.ncf import NCF


@dataclass(frozen=True)
class PrivateRoundSettings:
    """The protocol's knobs (defaults: FedRecGEL's config and code).

    Attributes:
        rounds: federated rounds (global epochs).
        fraction: share of users sampled a round.
        negatives: sampled negatives per training positive.
        client_lr: the private rows' Adam learning rate (their local_lr).
        server_lr: the server Adam's learning rate (their code builds it with 0.001).
        sam: one SAM step instead of one plain step.
        rho_shared, rho_private: SAM radii of the shared parameters and of the user rows.
        chunk: the loss is sum BCE / chunk.
    """

    rounds: int = 100
    fraction: float = 0.1
    negatives: int = 4
    client_lr: float = 0.1
    server_lr: float = 0.001
    sam: bool = False
    rho_shared: float = 0.02
    rho_private: float = 0.02
    chunk: int = 128

    def check(self) -> None:
        if self.rounds < 1 or not 0 < self.fraction <= 1 or self.negatives < 1 or self.chunk < 1:
            raise C2ALError(f"private-round settings need rounds >= 1, 0 < fraction <= 1, negatives >= 1, chunk >= 1: {self}")
        if min(self.client_lr, self.server_lr) <= 0 or min(self.rho_shared, self.rho_private) < 0:
            raise C2ALError(f"private-round settings need positive learning rates and rho >= 0: {self}")


class PrivateUsers:
    """Every client's own user rows and Adam state: in a deployment each lives on its device.

    Args:
        num_users: U.
        factor, width: F and M (the NCF's).
        generator: for the N(0, 0.01^2) initialisation.
    """

    def __init__(self, num_users: int, factor: int, width: int, generator: torch.Generator) -> None:
        self.gmf = [(0.01 * torch.randn(1, factor, generator=generator)).requires_grad_() for _ in range(num_users)]
        self.mlp = [(0.01 * torch.randn(1, width, generator=generator)).requires_grad_() for _ in range(num_users)]
        self._opt: dict[int, DenseOptimizer] = {}

    def rows(self, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        """User u's rows ([1, F], [1, M], leaves)."""
        return self.gmf[u], self.mlp[u]

    def step(self, u: int, grads: tuple[torch.Tensor, torch.Tensor], lr: float) -> None:
        """One Adam step of user u's rows with its own state (created at its first step)."""
        opt = self._opt.setdefault(u, DenseOptimizer([self.gmf[u], self.mlp[u]], "adam", lr))
        for p, g in zip(opt.params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All users' rows stacked ([U, F], [U, M]): for the evaluation, which every client could run on its own."""
        with torch.no_grad():
            return torch.cat(self.gmf), torch.cat(self.mlp)


@dataclass
class ClientUpdate:
    """What one client sends: gradients of the item rows it touched and of the tower, and its loss (for logging)."""

    rows: torch.Tensor  # [R] item ids
    item_gmf: torch.Tensor  # [R, F]
    item_mlp: torch.Tensor  # [R, M]
    tower: list[torch.Tensor]  # as NCF.tower_parameters()
    loss: float


def client_update(model: NCF, users: PrivateUsers, u: int, items: np.ndarray, labels: np.ndarray,
                  s: PrivateRoundSettings) -> ClientUpdate:
    """One client's step: the (SAM) gradient, its private rows stepped, the shared gradient returned.

    Args:
        model: the shared part as the server sent it (not changed: SAM's moves are undone).
        users: the private rows; only row u is read and stepped.
        u: the client.
        items, labels: its pairs ([P] each, `sample_training_pairs`).
        s: the settings.

    Returns:
        ClientUpdate.
    """
    uniq, inv = np.unique(items, return_inverse=True)
    rows = torch.from_numpy(uniq)
    where = torch.from_numpy(inv.reshape(-1))
    item_gmf = model.item_gmf.weight.detach()[rows].clone().requires_grad_()  # [R, F] the client's copy
    item_mlp = model.item_mlp.weight.detach()[rows].clone().requires_grad_()  # [R, M]
    user_gmf, user_mlp = users.rows(u)
    y = torch.from_numpy(labels)
    shared = [item_gmf, item_mlp, *model.tower_parameters()]
    private = [user_gmf, user_mlp]

    def loss_fn() -> torch.Tensor:
        logits = model.score(user_gmf, user_mlp, item_gmf[where], item_mlp[where])  # [P]: the user's [1, F], [1, M] rows broadcast
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / s.chunk

    loss = loss_fn()
    grads = torch.autograd.grad(loss, shared + private)
    g_shared, g_private = list(grads[: len(shared)]), list(grads[len(shared):])
    if s.sam:
        move = sam_perturbation([(p.data.unsqueeze(0), g.unsqueeze(0)) for p, g in zip(shared, g_shared)], [], 1, s.rho_shared)
        g_shared = list(torch.autograd.grad(loss_fn(), shared))
        move.restore()
        move = sam_perturbation([(p.data.unsqueeze(0), g.unsqueeze(0)) for p, g in zip(private, g_private)], [], 1, s.rho_private)
        g_private = list(torch.autograd.grad(loss_fn(), private))
        move.restore()
    users.step(u, (g_private[0], g_private[1]), s.client_lr)
    return ClientUpdate(rows=rows, item_gmf=g_shared[0], item_mlp=g_shared[1], tower=g_shared[2:], loss=float(loss.detach()))


class SharedServer:
    """The server: holds the shared NCF part only; averages the clients' gradients and steps Adam.

    Args:
        model: the shared part.
        lr: Adam's learning rate.
    """

    def __init__(self, model: NCF, lr: float) -> None:
        self.model = model
        self.params = [model.item_gmf.weight, model.item_mlp.weight, *model.tower_parameters()]
        self.opt = DenseOptimizer(self.params, "adam", lr)
        self._sum: list[torch.Tensor] = []
        self._n = 0

    def begin(self) -> None:
        self._sum = [torch.zeros_like(p) for p in self.params]
        self._n = 0

    def add(self, up: ClientUpdate) -> None:
        self._sum[0].index_add_(0, up.rows, up.item_gmf)
        self._sum[1].index_add_(0, up.rows, up.item_mlp)
        for acc, g in zip(self._sum[2:], up.tower):
            acc.add_(g)
        self._n += 1

    def finish(self) -> None:
        """Average over the round's clients and step (a round without clients is an error)."""
        if self._n == 0:
            raise C2ALError("a federated round ended without a client update")
        for p, acc in zip(self.params, self._sum):
            p.grad = acc / self._n
        self.opt.step()
        self.opt.zero_grad()


def sample_clients(num_users: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """int(fraction U) distinct users (at least one), as the paper's server draws them."""
    return rng.choice(num_users, size=max(1, int(fraction * num_users)), replace=False)


def train_rounds(server: SharedServer, users: PrivateUsers, split: LeaveLastOut, s: PrivateRoundSettings, seed: int,
                 on_round: Callable[[int, float], None] | None = None) -> list[float]:
    """Run s.rounds rounds; `on_round(r, mean client loss)` after each (1-based r), e.g. to evaluate.

    Client sampling and negative sampling have their own generators from `seed`, so two arms of
    one seed sample the same clients each round.

    Returns:
        The mean client loss of each round.
    """
    s.check()
    pick = np.random.default_rng([seed, 1])
    negatives = np.random.default_rng([seed, 2])
    losses = []
    for r in range(1, s.rounds + 1):
        server.begin()
        total = 0.0
        chosen = sample_clients(split.num_users, s.fraction, pick)
        for u in chosen:
            items, labels = sample_training_pairs(split.train_items(int(u)), split.num_items, s.negatives, negatives)
            up = client_update(server.model, users, int(u), items, labels, s)
            server.add(up)
            total += up.loss
        server.finish()
        losses.append(total / len(chosen))
        if on_round is not None:
            on_round(r, losses[-1])
    return losses
