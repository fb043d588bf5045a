"""The clients' one optimizer and one SAM: used by a client trained alone and by clients trained side by side.

A client trained alone (`client.LocalTrainer`) is the case C = 1 of clients trained
side by side (`vectorized.VectorizedRunner`): both step their dense parameters with
`DenseOptimizer` (elementwise Adam / Adagrad / SGD, one independent state per client
of a stack), their table rows with `SparseTableOptimizer` (state only for the rows a
client can touch), add FedProx's pull and undo SAM's move in `LocalOptimizer`, and
move for SAM with `sam_perturbation` (each client by its own rho g_c / |g_c|).

Letters: C clients side by side (A of them still stepping), R rows, D embedding dim.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from c2al.data.batch import Batch
from c2al.errors import C2ALError
from c2al.train.task import TrainModule

DENSE_KINDS = ("adam", "adagrad", "sgd")


class DenseOptimizer:
    """adam / adagrad / sgd on dense parameters, elementwise, so every client of a stack [C, ...] steps alone.

    Each update is torch's single-tensor one (Adam betas (0.9, 0.999) and eps 1e-8, Adagrad eps
    1e-10, weight decay added to the gradient), so client c's slice moves exactly as `torch.optim`
    would move its own copy. With `stacked`, only the first `active` clients step (the vectorized
    runner orders clients by their number of steps, longest first); unstacked, the parameters are
    one client's own.

    Args:
        params: the parameters ([C, ...] each when stacked).
        kind: adam, adagrad or sgd.
        lr, weight_decay: as torch's.
        stacked: whether dim 0 counts clients.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.tensor([1.0, -1.0])
        >>> DenseOptimizer([w], "sgd", 0.5).step(); w.tolist()
        [0.5, 1.5]
    """

    def __init__(self, params: list[torch.Tensor], kind: str, lr: float, weight_decay: float = 0.0, *, stacked: bool = False) -> None:
        if kind not in DENSE_KINDS:
            raise C2ALError(f"--dense-optimizer must be one of {list(DENSE_KINDS)}, got {kind!r}")
        self.params, self.kind, self.lr, self.weight_decay = params, kind, lr, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = [0] * len(params)  # steps taken per parameter, as torch counts them
        self.active = len(params[0]) if stacked and params else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        a = slice(None) if self.active is None else slice(0, self.active)
        for i, (p, m, v) in enumerate(zip(self.params, self.m, self.v)):
            if p.grad is None:
                continue
            self.t[i] += 1
            w, g = p[a], p.grad[a]
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.kind == "sgd":
                w.add_(g, alpha=-self.lr)
            elif self.kind == "adagrad":
                v[a].addcmul_(g, g)
                w.addcdiv_(g, v[a].sqrt().add_(1e-10), value=-self.lr)
            else:  # adam, as torch's single-tensor path
                beta1, beta2, t = 0.9, 0.999, self.t[i]
                m[a].lerp_(g, 1 - beta1)
                v[a].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v[a].sqrt() / (1 - beta2**t) ** 0.5).add_(1e-8)
                w.addcdiv_(m[a], denom, value=-self.lr / (1 - beta1**t))


class SparseTableOptimizer:
    """sgd / adagrad / rowwise_adagrad on sparse table gradients, with state only for the client's rows.

    rowwise_adagrad keeps one accumulator per row (mean of the squared gradient
    over D), as FBGEMM's EXACT_ROWWISE_ADAGRAD. Rows are per client, so side by side
    (a round table holding each client's rows in its own block) every row's state is
    its client's own.

    Args:
        params: table weights [N, D] with sparse gradients.
        rows: per table, the sorted ids the client can touch [R] (its state is [R, D] or [R, 1]).
        kind: sgd, adagrad or rowwise_adagrad.
        lr: learning rate.
    """

    def __init__(self, params: list[torch.Tensor], rows: list[np.ndarray], kind: str, lr: float, eps: float = 1e-8) -> None:
        if kind not in ("sgd", "adagrad", "rowwise_adagrad"):
            raise C2ALError(f"federated clients run tables with sgd, adagrad or rowwise_adagrad, not {kind!r}")
        self.params, self.kind, self.lr, self.eps = params, kind, lr, eps
        self.rows = [torch.from_numpy(r) for r in rows]
        self.acc = [torch.zeros(len(r), p.shape[1] if kind == "adagrad" else 1) for p, r in zip(params, rows)]

    def step(self) -> None:
        for p, rows, acc in zip(self.params, self.rows, self.acc):
            if p.grad is None:
                continue
            g = p.grad.coalesce()
            idx, vals = g.indices()[0], g.values()  # [R], [R, D]
            if self.kind == "sgd":
                p.data.index_add_(0, idx, -self.lr * vals)
                continue
            pos = torch.searchsorted(rows, idx)  # [R] positions in the client's rows
            acc[pos] += vals * vals if self.kind == "adagrad" else (vals * vals).mean(1, keepdim=True)
            p.data.index_add_(0, idx, -self.lr * vals / (acc[pos].sqrt() + self.eps))


class Perturbation:
    """A SAM move of dense weights and table rows, applied when made; `restore` takes it back
    (called by `LocalOptimizer.step` before stepping: the gradient taken at w + e is applied at w)."""

    def __init__(self, moves: list[tuple[torch.Tensor, Any, torch.Tensor]]) -> None:
        self.moves = moves  # (weight, slice(None) or row indices, the move)
        self._shift(1.0)

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        for w, where, e in self.moves:
            if isinstance(where, slice):
                w.add_(e, alpha=sign)
            else:
                w.index_add_(0, where, e, alpha=sign)

    def restore(self) -> None:
        self._shift(-1.0)
        self.moves = []


@torch.no_grad()
def sam_perturbation(dense: list[tuple[torch.Tensor, torch.Tensor | None]], rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                     clients: int, rho: float) -> Perturbation:
    """SAM's move (Foret et al. 2021; FedRecGEL's local steps): each client's shared parameters by rho g_c / |g_c|.

    Args:
        dense: (weight [C, ...], its gradient [C, ...] or None) per dense parameter.
        rows: (table weight [N, D], row ids [R], their gradient rows [R, D], the client of each row [R]) per table.
        clients: C.
        rho: the radius.

    Returns:
        The applied Perturbation.

    Example:
        >>> w = torch.zeros(1, 2)
        >>> _ = sam_perturbation([(w, torch.tensor([[3.0, 4.0]]))], [], 1, rho=1.0); w.tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    sq = torch.zeros(clients, dtype=torch.float64)  # [C] squared norm of each client's g
    for _, g in dense:
        if g is not None:
            sq += g.double().pow(2).flatten(1).sum(1)
    for _, _, vals, owner in rows:
        sq.index_add_(0, owner, vals.double().pow(2).sum(1))
    scale = (rho / (sq.sqrt() + 1e-12)).float()  # [C]
    moves: list[tuple[torch.Tensor, Any, torch.Tensor]] = [
        (w, slice(None), g * scale.view(-1, *([1] * (g.dim() - 1)))) for w, g in dense if g is not None]
    moves += [(w, idx, vals * scale[owner].unsqueeze(1)) for w, idx, vals, owner in rows]
    return Perturbation(moves)


class LocalOptimizer:
    """The client's optimizer as a step loop sees it: dense parameters + sparse tables.

    `step` first undoes a SAM perturbation (`sam`, set by whoever perturbed), then adds
    FedProx's proximal gradient mu (w - w_global), then steps.
    """

    def __init__(self, dense: DenseOptimizer, tables: SparseTableOptimizer, *,
                 prox: list[tuple[torch.Tensor, torch.Tensor]] = (), mu: float = 0.0, sam: Any = None) -> None:
        self.dense, self.tables, self.prox, self.mu, self.sam = dense, tables, list(prox), mu, sam

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        for p in self.tables.params:
            p.grad = None

    def step(self) -> None:
        if self.sam is not None:
            self.sam.restore()
        if self.mu > 0:
            for p, ref in self.prox:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:  # lazy: only the rows of this batch feel the proximal pull
                    g = p.grad.coalesce()
                    idx = g.indices()[0]
                    p.grad = torch.sparse_coo_tensor(g.indices(), g.values() + self.mu * (p.data[idx] - ref[idx]), g.shape,
                                                     check_invariants=False)  # the indices are the coalesced gradient's
                else:
                    p.grad = p.grad + self.mu * (p.data - ref)
        self.dense.step()
        self.tables.step()


class SAMModule(nn.Module):
    """Sharpness-aware local steps of one client, for a step loop that calls `module(batch)`: the loss is taken at w + rho g / |g|.

    Wraps a TrainModule: forward computes g on the batch, moves the shared parameters by
    `sam_perturbation` (the client alone: C = 1), and returns the moved forward, whose backward
    gives SAM's gradient; `LocalOptimizer.step` calls `restore` before stepping.
    """

    def __init__(self, inner: TrainModule, params: list[nn.Parameter], rho: float) -> None:
        super().__init__()
        self.inner, self.rho = inner, rho
        self._params = params  # a plain list: not registered twice
        self._move: Perturbation | None = None

    def forward(self, batch: Batch) -> Any:
        if not self.training:
            return self.inner(batch)
        loss, _ = self.inner(batch)
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        dense, rows = [], []
        for p, g in zip(self._params, grads):
            if g is not None and g.is_sparse:
                g = g.coalesce()
                rows.append((p.data, g.indices()[0], g.values(), torch.zeros(g.indices().shape[1], dtype=torch.long)))
            elif g is not None:
                dense.append((p.data.unsqueeze(0), g.unsqueeze(0)))  # a stack of one client
        self._move = sam_perturbation(dense, rows, 1, self.rho)
        return self.inner(batch)

    def restore(self) -> None:
        if self._move is not None:
            self._move.restore()
            self._move = None
