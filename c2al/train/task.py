"""The shared task: one train step and one evaluation, used by every loop.

Like the `task.py` of Flower's quickstart, this is the only place that knows
how a batch becomes a loss and a prediction; the centralized loop here and the
federated loop both call it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from c2al.data.batch import Batch, iter_batches
from c2al.data.schema import Schema, Table
from c2al.dist.process import LOCAL_CPU, DistInfo, gather_rows
from c2al.errors import C2ALError
from c2al.losses import bce_with_logits, in_batch_softmax_loss, squared_hinge_spreadout
from c2al.robust import RobustModel


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The torch seed drawn before training step `step`: dropout masks depend on (seed, step, stream) only,
    so a resumed run draws what an uninterrupted one drew.

    Args:
        seed: the run's --seed.
        step: the global step (centralized) or the client's local step (federated).
        stream: separates independent streams of steps: the rank of a process, or one (round, client) pair.

    Returns:
        A seed in [0, 2**63).

    Example:
        >>> step_seed(1, 2), step_seed(1, 2, stream=3)
        (1015841, 1015844)
    """
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63)


class StepOutput(NamedTuple):
    """What a train module gives back beside its differentiable loss: `loss, out = module(batch)`."""

    loss: torch.Tensor  # scalar, detached
    logits: torch.Tensor  # [B] main-task logits, detached
    parts: dict[str, torch.Tensor]  # named loss terms, detached, for logging


class TrainModule(nn.Module):
    """Thin train wrapper, as TorchRec's DLRMTrain: batch in, (loss, outputs) out.

    The model never owns its loss. A model wrapped by `c2al.attach` returns
    `AuxOutput` and brings its own `loss(output, labels, cohort_ids, weights)`;
    a `c2al.robust.robust_model` brings its Group DRO / CVaR loss the same way;
    any other model returns logits and is trained with BCE.

    Args:
        model: a model taking (dense_features, sparse_features), or a c2al wrapper.
        loss: "bce", or "softmax" for two-tower in-batch sampled softmax.
        cohort_bias: K > 0 adds one learned logit offset per cohort (batch.cohort_ids), a
            per-cohort baseline to compare C2AL with; 0 (default) adds nothing.
        item_log_q: for loss="softmax", (item-key feature, log sampling probability per id of
            it): the logQ correction of `in_batch_softmax_loss`; None for none.
    """

    def __init__(self, model: nn.Module, loss: str = "bce", cohort_bias: int = 0,
                 item_log_q: tuple[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_kind = loss
        # A per-cohort baseline (no heads): one learned logit offset per cohort id in 0..K-1, 0 outside.
        self.cohort_bias = nn.Parameter(torch.zeros(cohort_bias)) if cohort_bias else None
        # Not persistent: a training-data statistic, kept out of checkpoints and the served model.
        self.item_feature = item_log_q[0] if item_log_q is not None else ""
        self.register_buffer("item_log_q", item_log_q[1] if item_log_q is not None else None, persistent=False)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        from c2al.plugin import C2ALWrapper

        out = self.model(batch.dense, batch.sparse)
        # Decided on the module, not the output: under FX tracing `out` is a Proxy that has every attribute.
        if isinstance(self.model, C2ALWrapper):
            loss, parts = self.model.loss(out, batch.labels, batch.cohort_ids, weights=batch.weights)
            logits = out.logits
            aux = parts["aux"]
        elif isinstance(self.model, RobustModel):  # Group DRO / CVaR: the plain model under a robust loss
            loss, parts = self.model.loss(out, batch.labels, batch.cohort_ids, weights=batch.weights)
            logits = out
            aux = 0.0 * loss
        else:
            logits = out if self.cohort_bias is None else out.reshape(-1) + self._bias(batch.cohort_ids)
            loss = bce_with_logits(logits.reshape(-1), batch.labels, batch.weights)
            parts = {"main": loss}
            aux = 0.0 * loss
        if self.loss_kind == "softmax":
            # In-batch softmax replaces the pointwise main BCE; C2AL's auxiliary terms stay.
            loss = self._softmax_loss(batch) + aux
        parts = {k: v.detach() for k, v in parts.items()}
        return loss, StepOutput(loss.detach(), logits.detach().reshape(-1), parts)

    def _bias(self, cohort_ids: torch.Tensor) -> torch.Tensor:
        """[B] the cohort's learned offset, 0 for rows outside every cohort (id -1)."""
        padded = torch.cat([self.cohort_bias.new_zeros(1), self.cohort_bias])  # index 0: no cohort
        return padded[cohort_ids + 1]

    def _softmax_loss(self, batch: Batch) -> torch.Tensor:
        inner = getattr(self.model, "model", self.model)
        query, candidate = inner.towers(batch.dense, batch.sparse)
        log_q = None
        if self.item_log_q is not None:
            log_q = self.item_log_q[batch.sparse[self.item_feature].values()]  # [B]: the item key is single-hot
        return in_batch_softmax_loss(query, candidate, batch.labels * batch.weights, log_q=log_q)


def optimizer_step(forward: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]], optimizer: Any,
                   perturb: Callable[[torch.Tensor], Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step: the one every training loop takes (centralized, a federated client, clients side by side).

    Args:
        forward: () -> (loss, named loss parts); the loss is a scalar, or [C] for C clients side by side
            (each client's loss reaches only its own parameters, so their sum steps each alone).
        optimizer: zero_grad() / step(); with `perturb`, it has a `sam` slot whose `restore()` it calls
            before stepping (`c2al.federated.optim.LocalOptimizer`).
        perturb: SAM: (losses) -> the applied move to w + rho g / |g|; the step's gradient is then
            taken at the moved weights and applied at w.

    Returns:
        The (last) loss and its parts. Only finite losses are stepped; the caller decides what a
        non-finite one means (centralized training stops, a client of a stack fails alone).
    """
    losses, parts = forward()
    if perturb is not None:
        optimizer.sam = perturb(losses)
        losses, parts = forward()
    finite = torch.isfinite(losses)
    if bool(finite.any()):
        optimizer.zero_grad()
        (losses[finite].sum() if losses.dim() else losses).backward()
        optimizer.step()
    elif getattr(optimizer, "sam", None) is not None:
        optimizer.sam.restore()
    if perturb is not None:
        optimizer.sam = None
    return losses, parts


def _loss_parts(output: tuple[torch.Tensor, StepOutput]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, parts) of a train module's output; by position, so a module returning a plain (loss, logits, parts) tuple works too."""
    return output[0], output[1][2]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    total: int | None = None,
    desc: str = "train",
    show: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    step_seed: Callable[[int], int] | None = None,
    pipelined: bool = False,
    device: torch.device | None = None,
    carry: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One pass; returns mean loss and mean of each named loss part.

    `carry` ({"sums": {...}, "n": steps}) holds running sums that this pass adds
    to, in place, and the means are over all of them: a pass resumed from a
    checkpoint (which saves the carry) reports the whole pass's mean loss.

    `step_seed(n)` (n counts this call's steps from 0) reseeds torch's RNG before
    each step, so dropout masks depend on the global step only and a resumed
    run draws exactly what an uninterrupted one would.

    With `pipelined`, steps go through TorchRec's TrainPipelineSparseDist
    (`model` must be the DistributedModelParallel module): it FX-traces the
    model and overlaps the next batch's input distribution with this step.
    """
    model.train()
    carry = {"sums": {}, "n": 0} if carry is None else carry
    sums: dict[str, float] = carry["sums"]
    n = 0
    # disable=None: tqdm draws only into a terminal; logs get the loop's one line per evaluation instead
    bar = tqdm(total=total, desc=desc, disable=None if show else True, leave=False, dynamic_ncols=True)
    if pipelined:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(model, optimizer, device or torch.device("cpu"))
        source = iter(batches)

        def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
            try:
                loss, _, parts = pipeline.progress(source)
            except StopIteration:
                return None
            return loss, parts
    else:
        source = iter(batches)

        def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
            batch = next(source, None)
            if batch is None:
                return None
            return optimizer_step(lambda: _loss_parts(model(batch)), optimizer)

    while True:
        if step_seed is not None:
            torch.manual_seed(step_seed(n))
        done = step()
        if done is None:
            break
        loss, parts = done
        if not torch.isfinite(loss):
            raise C2ALError(f"{desc}: loss became {loss.item()} at step {n}; lower --lr / --table-lr")
        n += 1
        carry["n"] += 1
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / carry['n']:.4f}")
        if on_step is not None:
            on_step(n, loss.item())
    bar.close()
    if pipelined:
        pipeline.detach()  # give the module its own forward back for evaluation
    return {k: v / max(carry["n"], 1) for k, v in sums.items()}


@torch.no_grad()
def predict(model: nn.Module, table: Table, schema: Schema, batch_size: int, info: DistInfo = LOCAL_CPU,
            *, show: bool = False, desc: str = "eval", rows: np.ndarray | None = None) -> np.ndarray:
    """The one prediction function: probabilities for every row of `table`, in row order, on every rank.

    Args:
        model: a TrainModule, the DistributedModelParallel around one, or a bare
            (possibly stripped) model, which is wrapped in a TrainModule here.
        table: the rows to score.
        schema: the table's schema.
        batch_size: global batch size (split over ranks as in training).
        info: the process group; a single CPU process by default.
        rows: only these rows of `table`, in this order, in this process (a federated client scoring its
            own rows: no gather across ranks, and no `Table.take`, which costs more than the forward).

    Returns:
        float array [len(table)], or [len(rows)].
    """
    module = model if isinstance(model, TrainModule) or isinstance(getattr(model, "module", None), TrainModule) else TrainModule(model)
    module.eval()
    if rows is not None:
        batches = iter_batches(table, schema, min(batch_size, max(len(rows), 1)), shuffle=False, rows=rows)  # a few rows: no padding
        out = [torch.sigmoid(module(b)[1].logits)[b.weights > 0].float().numpy() for b in batches]  # padding rows dropped
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return gather_rows(lambda b: torch.sigmoid(module(b)[1].logits), table, schema, batch_size, info, show=show, desc=desc)


class HingeTrainModule(TrainModule):
    """TrainModule whose two-tower loss is `squared_hinge_spreadout` (forward and prediction unchanged)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, loss="softmax")  # routes the loss through _softmax_loss below

    def _softmax_loss(self, batch: Batch) -> torch.Tensor:
        inner = getattr(self.model, "model", self.model)
        query, candidate = inner.towers(batch.dense, batch.sparse)
        return squared_hinge_spreadout(query, candidate, batch.labels, batch.weights)
