"""Centralized training: shard, train epoch by epoch with checkpoints, predict.

Single-process and `torchrun` runs share this code; only DistInfo differs.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from c2al.config import RESUME_FIELDS, Config
from c2al.data.batch import Batch, iter_batches, local_batch_size, num_batches
from c2al.data.schema import Splits
from c2al.dist.checkpoint import (
    copy_full_into,
    load_checkpoint,
    restore,
    restore_local,
    save_checkpoint,
    snapshot_local,
)
from c2al.dist.process import DistInfo
from c2al.dist.sharding import dense_optimizer, shard
from c2al.errors import C2ALError
from c2al.eval.metrics import summarize
from c2al.eval.retrieval import retrieval_metrics
from c2al.models.registry import model_spec
from c2al.train.task import HingeTrainModule, TrainModule, predict, step_seed, train_epoch

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A trained, sharded train module and what happened while training it."""

    dmp: DistributedModelParallel
    optimizer: Any
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)  # {"epoch", "step", "valid_ne"} of the weights it holds

    @property
    def module(self) -> DistributedModelParallel:
        """What `c2al.train.task.predict` takes: the sharded train module."""
        return self.dmp

    @property
    def model(self) -> nn.Module:
        """The model inside the train module (a c2al wrapper or the user's model)."""
        return self.dmp.module.model


def shard_train_module(cfg: Config, model: nn.Module, info: DistInfo, cohort_bias: int = 0,
                       item_log_q: tuple[str, torch.Tensor] | None = None) -> tuple[DistributedModelParallel, Any]:
    """Wrap in TrainModule, shard, and copy the unsharded initial weights in.

    Sharding re-initializes the tables; copying the seeded weights back makes a
    run independent of the world size and lets baseline and C2AL start equal.
    """
    module = train_module(cfg, model, cohort_bias, item_log_q)
    init = {k: v.detach().clone() for k, v in module.state_dict().items()}  # unsharded: the same on every rank
    dmp = shard(module, info, table_optimizer=cfg.table_optimizer, table_lr=cfg.table_lr, sharding_type=cfg.sharding)
    copy_full_into(dmp.state_dict(), init)
    return dmp, dense_optimizer(dmp, cfg.dense_optimizer, cfg.lr, cfg.weight_decay)


def train_module(cfg: Config, model: nn.Module, cohort_bias: int = 0,
                 item_log_q: tuple[str, torch.Tensor] | None = None) -> TrainModule:
    """The train module of the model's training loss under `cfg` (its registry entry's `ModelSpec.loss`):
    BCE or in-batch softmax in TrainModule, or the squared hinge in HingeTrainModule."""
    loss = model_spec(cfg.model).loss(cfg)
    if loss == "hinge":
        return HingeTrainModule(model)
    return TrainModule(model, loss=loss, cohort_bias=cohort_bias, item_log_q=item_log_q)


def fit(
    cfg: Config,
    splits: Splits,
    model: nn.Module,
    info: DistInfo,
    *,
    checkpoint: Path | None = None,
    tag: str = "train",
    cohort_bias: int = 0,
) -> Trained:
    """Train `model` on splits.train for at most cfg.epochs, early-stopped on validation NE.

    splits.train is an in-memory Table (shuffled every epoch) or a streaming source (one pass in stream
    order, validation every cfg.eval_every steps or STREAM_EVAL_EVERY, progressive validation beside it;
    a resumed run's reader skips the rows already trained on).

    Validation NE is computed at the end of every epoch and, with
    cfg.eval_every = N, every N steps. The best weights so far are kept (in
    memory on every rank, and atomically in `<checkpoint>.best.pt` when a
    checkpoint path is given, while `<checkpoint>` holds the last state for
    resuming); after cfg.patience evaluations without a strictly lower NE
    training stops, and the best weights are put back before returning.
    cfg.patience = 0 trains every epoch and keeps the last weights.

    With cfg.resume and an existing `checkpoint`, training continues from the
    saved step (mid-epoch too: the epoch's batch order is seeded by (seed, epoch)),
    with the best-so-far weights, the patience count, the running loss sums and the
    elapsed time of the interrupted run. `cohort_bias` = K trains one logit offset per cohort
    next to the model (see TrainModule), a per-cohort baseline for C2AL.
    """
    local_batch_size(cfg.batch_size, info.world_size)
    source = TrainBatches(cfg, splits, info)
    steps_per_epoch = source.steps_per_epoch
    dmp, optimizer = shard_train_module(cfg, model, info, cohort_bias, candidate_log_q(cfg, splits))
    trained = Trained(dmp=dmp, optimizer=optimizer)
    run = _RunState()
    best_path = checkpoint.with_suffix(".best.pt") if checkpoint is not None else None
    if checkpoint is not None and cfg.resume and checkpoint.exists():
        run = _resume(cfg, dmp, optimizer, checkpoint, best_path, info, source.streaming)
        if info.is_main:
            log.info(f"[{tag}] resumed from {checkpoint} at step {run.step}")
    trained.history = run.history

    def save(path: Path) -> None:
        extra = {**run.extra(), "tag": tag, "progressive": run.progressive.saved(info), "world_size": info.world_size}
        save_checkpoint(path, model_state=dmp.state_dict(), optimizer_state=optimizer.state_dict(), config=cfg.to_dict(),
                        step=run.step, extra=extra, is_main=info.is_main)

    start = time.perf_counter() - run.seconds
    while run.step < source.total_steps and not run.stopped(cfg.patience) and not run.exhausted:
        end = _next_evaluation(run.step, steps_per_epoch, source.eval_every)
        segment = (b.to(info.device) for b in source.segment(run, end))
        epoch = run.step // steps_per_epoch if steps_per_epoch else 0

        def on_step(n: int, _loss: float, base: int = run.step) -> None:
            run.step = base + n
            if checkpoint is not None and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < end:
                run.seconds = time.perf_counter() - start
                save(checkpoint)

        def seed_of(n: int, base: int = run.step) -> int:
            return step_seed(cfg.seed, base + n, info.rank)

        began = run.step
        stats = train_epoch(dmp, optimizer, segment, total=end - run.step, desc=source.describe(tag, epoch),
                            show=info.is_main and not cfg.quiet, on_step=on_step, step_seed=seed_of, pipelined=cfg.pipeline,
                            device=info.device, carry=run.carry)
        if run.step < end and source.streaming:  # the stream ran out inside this segment: the pass is over
            run.exhausted = True
            if run.step == 0:
                raise C2ALError(f"the train stream of {splits.schema.name!r} holds fewer rows than one --batch-size {cfg.batch_size} "
                                f"batch per process")
            if run.step == began:
                break  # nothing trained since the last evaluation
        else:
            run.step = end
        if source.streaming:  # the segment's mean main loss was taken before each update: progressive validation
            run.progressive.add_losses(stats.get("main", stats.get("loss", 0.0)), run.carry["n"], cfg.batch_size // info.world_size)
        run.carry = {"sums": {}, "n": 0}
        _evaluate(cfg, splits, dmp, info, run, stats, steps_per_epoch, tag)
        if run.bad == 0 and cfg.patience:
            run.best_weights = snapshot_local(dmp.state_dict())
            if best_path is not None:
                save(best_path)
        run.seconds = time.perf_counter() - start
        if checkpoint is not None:
            save(checkpoint)  # the last state: a resume (with more --epochs or --patience) goes on from here
    if cfg.patience and run.best_weights is not None:
        restore_local(dmp.state_dict(), run.best_weights)
    trained.best = run.kept(cfg.patience)
    trained.seconds = time.perf_counter() - start
    if info.is_main and trained.best:
        why = "patience ran out" if run.stopped(cfg.patience) else "the stream ended" if source.streaming else "last epoch reached"
        log.info(f"[{tag}] kept epoch {trained.best['epoch']} (step {trained.best['step']}, valid NE {trained.best['valid_ne']:.4f}); {why}")
    return trained


def candidate_log_q(cfg: Config, splits: Splits) -> tuple[str, torch.Tensor] | None:
    """The logQ correction of in-batch softmax (--two-tower-logq): the item key (the schema's first
    item-side feature) and the log of each of its ids' share of the training rows, the rate at which a
    shuffled batch draws it as a candidate; ids absent from train get the rate of one row. None when
    the run trains no in-batch softmax or the flag is off."""
    if not model_spec(cfg.model).log_q(cfg):
        return None
    name = splits.schema.item_features[0]
    counts = np.bincount(splits.train.sparse[name].first(), minlength=splits.schema.feature(name).num_embeddings)
    return name, torch.from_numpy(np.log(np.maximum(counts, 1) / len(splits.train))).float()


# Steps between validations of a streaming source when --eval-every is 0 (a stream has no epoch end to wait for).
STREAM_EVAL_EVERY = 1000


class TrainBatches:
    """Where the loop's training batches come from: an in-memory train Table (shuffled per epoch, `cfg.epochs`
    epochs) or a streaming source (`c2al.data.stream.TrainStream`: one pass in stream order, this rank reading
    its own units). The loop asks the same two questions of either: the batches from its step to the next
    evaluation, and how many steps there are (math.inf for a stream: it trains until the stream ends)."""

    def __init__(self, cfg: Config, splits: Any, info: DistInfo) -> None:
        self.cfg, self.splits, self.info = cfg, splits, info
        self.streaming = is_streaming(splits.train)
        self._stream: Iterator[Batch] | None = None
        if self.streaming:
            self.steps_per_epoch: int | None = None
            self.total_steps: float = math.inf
            self.eval_every = cfg.eval_every or STREAM_EVAL_EVERY
            return
        self.steps_per_epoch = num_batches(len(splits.train), cfg.batch_size, drop_last=True)
        if self.steps_per_epoch == 0:
            raise C2ALError(f"the train split has {len(splits.train)} rows, fewer than --batch-size {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.eval_every = cfg.eval_every

    def segment(self, run: "_RunState", end: int) -> Iterator[Batch]:
        """This rank's batches of global steps run.step .. end-1 (fewer when a stream ends first)."""
        cfg, info = self.cfg, self.info
        if not self.streaming:
            epoch, skip = divmod(run.step, self.steps_per_epoch)
            batches = iter_batches(self.splits.train, self.splits.schema, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                   rank=info.rank, world_size=info.world_size, drop_last=True)
            return itertools.islice(batches, skip, skip + end - run.step)
        if self._stream is None:  # opened once, at the step a resumed run stopped at: the reader skips what was trained
            from c2al.data.stream import iter_stream_batches

            lane = iter_stream_batches(self.splits.train, cfg.batch_size, rank=info.rank, world_size=info.world_size,
                                       skip_steps=run.step)
            self._stream = lane if info.world_size == 1 else _in_lockstep(lane, info.device)
        return run.progressive.watch(itertools.islice(self._stream, end - run.step))

    def describe(self, tag: str, epoch: int) -> str:
        return f"[{tag}] one pass" if self.streaming else f"[{tag}] epoch {epoch + 1}/{self.cfg.epochs}"


def _in_lockstep(lane: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """This rank's batches until every rank's lane has ended: ranks read lanes of different lengths, and a
    sharded step is a collective every rank must take (one small all-reduce a step, on the group's device).
    A rank whose lane ended steps on its last batch with weights 0 (no loss, no rows counted) while the
    others still have rows, so no rank's rows are dropped; a rank whose reader fails tells the others,
    and every rank raises that one-line error."""
    last: Batch | None = None
    while True:
        error = ""
        try:
            batch = next(lane, None)
        except C2ALError as e:
            batch, error = None, str(e)
        state = torch.tensor([-1 if error else 0 if batch is None else 1], device=device)
        low, high = state.clone(), state.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if int(low) < 0:  # some rank's reader failed: the same message everywhere
            messages: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(messages, error)
            raise C2ALError(next(m for m in messages if m))
        if int(high) == 0:
            return
        if batch is None:
            if last is None:
                raise C2ALError("a process's share of the stream holds no full batch; use fewer processes or a smaller --batch-size")
            batch = dataclasses.replace(last, weights=torch.zeros_like(last.weights))
        last = batch
        yield batch


def is_streaming(train: Any) -> bool:
    """A train split that is a stream (has `chunks`), not an in-memory Table."""
    return hasattr(train, "chunks")


@dataclass
class Progressive:
    """Progressive validation (as production pipelines report it): every training batch is scored by the model
    before it trains on that batch, so the training loss of a one-pass stream is an honest held-out loss.
    Sums over this rank's rows; `report` adds the ranks up."""

    loss_sum: float = 0.0  # sum over rows of the main task's log loss, taken in the forward before the update
    rows: float = 0.0
    positives: float = 0.0
    input_wait_s: float = 0.0  # time the loop waited for its next batch (reading, parsing, collation not hidden by prefetch)

    def watch(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Pass batches through, counting their rows and positives (weights: padding counts nothing) and the
        time spent waiting for each one."""
        source = iter(batches)
        while True:
            began = time.perf_counter()
            b = next(source, None)
            self.input_wait_s += time.perf_counter() - began
            if b is None:
                return
            self.rows += float(b.weights.sum())
            self.positives += float((b.labels * b.weights).sum())
            yield b

    def add_losses(self, mean_main: float, steps: int, local_rows: int) -> None:
        self.loss_sum += mean_main * steps * local_rows

    def state(self) -> dict[str, float]:
        return {"loss_sum": self.loss_sum, "rows": self.rows, "positives": self.positives, "input_wait_s": self.input_wait_s}

    def totals(self, info: DistInfo) -> tuple[float, float, float]:
        """(loss sum, rows, positives) over every rank (a collective when there are several)."""
        sums = torch.tensor([self.loss_sum, self.rows, self.positives], dtype=torch.float64, device=info.device)
        if info.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return tuple(float(v) for v in sums.cpu())  # type: ignore[return-value]

    def saved(self, info: DistInfo) -> dict[str, float]:
        """What a checkpoint keeps: every rank's sums added up (only the main rank's extra is written), restored
        onto the main rank alone (`restored`) so the resumed sums add up to the same totals."""
        loss, rows, pos = self.totals(info)
        return {"loss_sum": loss, "rows": rows, "positives": pos, "input_wait_s": self.input_wait_s}

    @classmethod
    def restored(cls, state: dict[str, float], info: DistInfo) -> "Progressive":
        return cls(**state) if info.is_main else cls(input_wait_s=float(state.get("input_wait_s", 0.0)))

    def report(self, info: DistInfo) -> dict[str, float]:
        """{"progressive_ne", "progressive_logloss", "rows_seen"} over every rank's rows."""
        loss, rows, pos = self.totals(info)
        p = min(max(pos / max(rows, 1.0), 1e-12), 1 - 1e-12)
        entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        return {"progressive_ne": loss / rows / entropy, "progressive_logloss": loss / rows, "rows_seen": int(rows),
                "input_wait_s": self.input_wait_s}


@dataclass
class _RunState:
    """Where a training stands; all of it (but the weights) travels in the checkpoint's extra."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch", "step", "valid_ne"} of the best evaluation so far
    bad: int = 0  # evaluations since the best one
    carry: dict[str, Any] = field(default_factory=lambda: {"sums": {}, "n": 0})  # running loss sums of the open segment
    seconds: float = 0.0
    best_weights: list[torch.Tensor] | None = None
    exhausted: bool = False  # a streaming source's one pass is over
    progressive: "Progressive" = field(default_factory=lambda: Progressive())

    def stopped(self, patience: int) -> bool:
        return patience > 0 and self.bad >= patience

    def extra(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "bad": self.bad, "carry": self.carry, "seconds": self.seconds,
                "progressive": self.progressive.state()}

    def kept(self, patience: int) -> dict[str, Any]:
        """The evaluation whose weights the model holds now: the best one, or with patience 0 the last."""
        if patience and self.best is not None:
            return dict(self.best)
        last = self.history[-1] if self.history else None
        return {"epoch": last["epoch"], "step": last["step"], "valid_ne": last["valid_ne"]} if last else {}


def _next_evaluation(step: int, steps_per_epoch: int | None, eval_every: int) -> int:
    """The global step of the next validation after `step`: the epoch's end, or the next multiple of eval_every
    (a stream of unknown length has no epoch end: eval_every alone)."""
    end = (step // steps_per_epoch + 1) * steps_per_epoch if steps_per_epoch else math.inf
    if eval_every:
        end = min(end, (step // eval_every + 1) * eval_every)
    return int(end)


def _evaluate(cfg: Config, splits: Splits, dmp: DistributedModelParallel, info: DistInfo, run: _RunState,
              stats: dict[str, float], steps_per_epoch: int, tag: str) -> None:
    """Validation NE at run.step: append to the history, update the best and the patience count.

    A model trained with a ranking loss (`ModelSpec.criterion`: a two-tower under in-batch softmax) is
    judged by validation recall@10 instead (higher is better): its dot products rank items but are no
    calibrated logits, so their NE says nothing (on MovieLens-1M it rose from epoch 1 while recall@10 still rose)."""
    valid = summarize(predict(dmp, splits.valid, splits.schema, cfg.batch_size, info), splits.valid.labels)
    if valid["ne"] is None or not math.isfinite(valid["ne"]):
        raise C2ALError(f"[{tag}] validation NE is {valid['ne']} at step {run.step}: the validation split needs both labels")
    epoch = run.step / steps_per_epoch if steps_per_epoch else 1.0 if run.exhausted else 0.0
    entry = {"epoch": int(epoch) if epoch == int(epoch) else round(epoch, 3), "step": run.step, **stats,
             "valid_ne": valid["ne"], "valid_auc": valid["auc"]}
    if run.progressive.rows:
        entry.update(run.progressive.report(info))
    key, sign = "valid_ne", 1.0
    criterion = model_spec(cfg.model).criterion(cfg)
    if criterion == "recall@10":
        towers = getattr(dmp.module.model, "model", dmp.module.model)  # the two-tower inside a C2AL wrapper
        key, sign = "valid_recall@10", -1.0
        entry[key] = retrieval_metrics(towers, splits, info, batch_size=max(cfg.batch_size, 1024), ks=(10,), split="valid")[criterion]
    run.history.append(entry)
    improved = run.best is None or sign * entry[key] < sign * run.best[key]
    if improved:
        run.best, run.bad = {"epoch": entry["epoch"], "step": run.step, "valid_ne": valid["ne"], key: entry[key]}, 0
    else:
        run.bad += 1
    if info.is_main:
        mark = "  (best)" if improved else f"  (no gain {run.bad}/{cfg.patience})" if cfg.patience else ""
        where = f"step {run.step}" if steps_per_epoch is None else f"epoch {entry['epoch']}/{cfg.epochs}"
        seen = f"  progressive NE {entry['progressive_ne']:.4f}" if "progressive_ne" in entry else ""
        log.info(f"[{tag}] {where}  loss {stats.get('loss', float('nan')):.4f}{seen}  "
                 f"valid NE {valid['ne']:.4f}  AUC {valid['auc']:.4f}{f'  recall@10 {entry[key]:.4f}' if key != 'valid_ne' else ''}{mark}")


def _resume(cfg: Config, dmp: DistributedModelParallel, optimizer: Any, checkpoint: Path, best_path: Path | None,
            info: DistInfo, streaming: bool) -> _RunState:
    """The run state of a checkpoint, its weights in `dmp` and the best-so-far weights in memory.

    A stream is resumed on the number of processes that wrote the checkpoint: each rank's reader skips
    step x local batch rows of its own lane, and lanes are dealt by the number of processes."""
    payload = load_checkpoint(checkpoint, expect_config=cfg.to_dict(), keys=RESUME_FIELDS)
    extra = payload["extra"]
    if streaming and int(extra.get("world_size", info.world_size)) != info.world_size:
        raise C2ALError(f"{checkpoint} was written by {extra['world_size']} process(es) reading a stream; resume it on "
                        f"{extra['world_size']} (each process skips the rows of its own share), not {info.world_size}")
    run = _RunState(step=int(payload["step"]), history=list(extra.get("history", [])), best=extra.get("best"),
                    bad=int(extra.get("bad", 0)), carry=extra.get("carry") or {"sums": {}, "n": 0},
                    seconds=float(extra.get("seconds", 0.0)), progressive=Progressive.restored(extra.get("progressive", {}), info))
    if cfg.patience and run.best is not None:
        if best_path is None or not best_path.exists():
            raise C2ALError(f"{checkpoint} records a best step {run.best['step']} but {best_path} is missing; "
                            "resume needs both files (or start again without --resume)")
        restore(dmp, None, load_checkpoint(best_path, expect_config=cfg.to_dict(), keys=RESUME_FIELDS))
        run.best_weights = snapshot_local(dmp.state_dict())
    restore(dmp, optimizer, payload)
    return run
