"""Centralized training: shard, train epoch by epoch with checkpoints, predict.

Single-process and `torchrun` runs share this code; only DistInfo differs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from c2al.config import SHAPE_FIELDS, Config
from c2al.data.batch import iter_batches, local_batch_size, num_batches
from c2al.data.schema import Splits
from c2al.dist.checkpoint import (
    copy_full_into,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from c2al.dist.process import DistInfo
from c2al.dist.sharding import dense_optimizer, shard
from c2al.errors import C2ALError
from c2al.eval.metrics import summarize
from c2al.train.task import TrainModule, predict, train_epoch

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A trained, sharded train module and what happened while training it."""

    dmp: DistributedModelParallel
    optimizer: Any
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def module(self) -> DistributedModelParallel:
        """What `c2al.train.task.predict` takes: the sharded train module."""
        return self.dmp

    @property
    def model(self) -> nn.Module:
        """The model inside the train module (a c2al wrapper or the user's model)."""
        return self.dmp.module.model


def shard_train_module(cfg: Config, model: nn.Module, info: DistInfo) -> tuple[DistributedModelParallel, Any]:
    """Wrap in TrainModule, shard, and copy the unsharded initial weights in.

    Sharding re-initializes the tables; copying the seeded weights back makes a
    run independent of the world size and lets baseline and C2AL start equal.
    """
    loss = "softmax" if cfg.model == "two-tower" and cfg.two_tower_loss == "softmax" else "bce"
    module = TrainModule(model, loss=loss)
    init = {k: v.detach().clone() for k, v in module.state_dict().items()}  # unsharded: the same on every rank
    dmp = shard(module, info, table_optimizer=cfg.table_optimizer, table_lr=cfg.table_lr, sharding_type=cfg.sharding)
    copy_full_into(dmp.state_dict(), init)
    return dmp, dense_optimizer(dmp, cfg.dense_optimizer, cfg.lr, cfg.weight_decay)


def fit(
    cfg: Config,
    splits: Splits,
    model: nn.Module,
    info: DistInfo,
    *,
    checkpoint: Path | None = None,
    tag: str = "train",
) -> Trained:
    """Train `model` on splits.train for cfg.epochs, validating after each epoch.

    With cfg.resume and an existing `checkpoint`, training continues from the
    saved step (mid-epoch too: the epoch's batch order is seeded by (seed, epoch)).
    """
    local_batch_size(cfg.batch_size, info.world_size)
    steps_per_epoch = num_batches(len(splits.train), cfg.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise C2ALError(f"the train split has {len(splits.train)} rows, fewer than --batch-size {cfg.batch_size}")
    dmp, optimizer = shard_train_module(cfg, model, info)
    trained = Trained(dmp=dmp, optimizer=optimizer)
    step = 0
    if checkpoint is not None and cfg.resume and checkpoint.exists():
        payload = load_checkpoint(checkpoint, expect_config=cfg.to_dict(), keys=SHAPE_FIELDS)
        restore(dmp, optimizer, payload)
        step = payload["step"]
        trained.history = payload["extra"].get("history", [])
        if info.is_main:
            log.info(f"[{tag}] resumed from {checkpoint} at step {step}")

    def save(at_step: int) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, model_state=dmp.state_dict(), optimizer_state=optimizer.state_dict(),
                            config=cfg.to_dict(), step=at_step, extra={"history": trained.history, "tag": tag},
                            is_main=info.is_main)

    start = time.perf_counter()
    total_steps = steps_per_epoch * cfg.epochs
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = iter_batches(splits.train, splits.schema, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                               rank=info.rank, world_size=info.world_size, drop_last=True)
        batches = (b.to(info.device) for i, b in enumerate(batches) if i >= skip)

        def on_step(n: int, _loss: float, base: int = step) -> None:
            if cfg.checkpoint_every and (base + n) % cfg.checkpoint_every == 0 and (base + n) % steps_per_epoch:
                save(base + n)

        def step_seed(n: int, base: int = step) -> int:
            return (cfg.seed * 1_000_003 + (base + n) * 7919 + info.rank) % (2**63)

        stats = train_epoch(dmp, optimizer, batches, total=steps_per_epoch - skip,
                            desc=f"[{tag}] epoch {epoch + 1}/{cfg.epochs}", show=info.is_main and not cfg.quiet,
                            on_step=on_step, step_seed=step_seed, pipelined=cfg.pipeline, device=info.device)
        step = (epoch + 1) * steps_per_epoch
        valid = summarize(predict(dmp, splits.valid, splits.schema, cfg.batch_size, info), splits.valid.labels)
        trained.history.append({"epoch": epoch + 1, **stats, "valid_ne": valid["ne"], "valid_auc": valid["auc"]})
        if info.is_main:
            log.info(f"[{tag}] epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  valid NE {valid['ne']:.4f}  AUC {valid['auc']:.4f}")
        save(step)
    trained.seconds = time.perf_counter() - start
    return trained
