"""What train.py checks before it writes anything: a run that cannot finish fails in seconds, not after the baseline.

`Config.check` has already refused values no run could use. These checks need the
data, the output directory or the process group: the checkpoints a --resume would
read, the model the data makes, the C2AL flags (cohort features, a saved miner)
and the federated population. Each raises a one-line C2ALError.
"""
from __future__ import annotations

from pathlib import Path

import torch

from c2al.config import RESUME_FIELDS, Config
from c2al.data.batch import num_batches
from c2al.data.schema import Splits
from c2al.dist.checkpoint import load_checkpoint
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError
from c2al.jobs.common import cohort_frame, saved_miner
from c2al.train.build import build_model


def check_world_size(cfg: Config, world_size: int) -> None:
    """Every process takes an equal share of a global batch."""
    if cfg.batch_size % world_size:
        raise C2ALError(f"--batch-size {cfg.batch_size} is not divisible by world size {world_size} "
                        "(every process takes an equal share of a batch)")
    if cfg.federated and world_size > 1:
        raise C2ALError("--federated runs in one process (its clients are simulated); start it without torchrun")


def check_resume(cfg: Config, out: Path) -> None:
    """With --resume, every checkpoint in OUT must come from this run's trajectory (RESUME_FIELDS agree).

    All of them, not only the one a job reads first: a C2AL run reads baseline.pt,
    then c2al_train.pt after the baseline, and a mismatch there would come too late.
    """
    if not cfg.resume or not out.is_dir():
        return
    for path in sorted(out.glob("*.pt")):
        load_checkpoint(path, expect_config=cfg.to_dict(), keys=RESUME_FIELDS)


def check_job(cfg: Config, splits: Splits, info: DistInfo) -> None:
    """What the data decides: the model builds, batches fit, and the C2AL and federated flags apply to it."""
    with torch.device("meta"):  # shapes and names only: no memory for the tables
        build_model(cfg, splits.schema)
    if cfg.federated:
        _check_federated(cfg, splits)
    else:
        _check_centralized(cfg, splits, info)
    if cfg.aux_cohorts:
        _check_c2al(cfg, splits)


def _check_centralized(cfg: Config, splits: Splits, info: DistInfo) -> None:
    if num_batches(len(splits.train), cfg.batch_size, drop_last=True) == 0:
        raise C2ALError(f"the train split has {len(splits.train)} rows, fewer than --batch-size {cfg.batch_size}")
    if cfg.table_optimizer == "adam" and info.device.type != "cuda":
        raise C2ALError("--table-optimizer adam needs CUDA; on CPU FBGEMM fuses only sgd, adagrad, rowwise_adagrad")
    if cfg.sharding == "row_wise" and info.backend == "gloo":
        raise C2ALError("--sharding row_wise needs NCCL (CUDA); gloo offers table_wise, column_wise, data_parallel")


def _check_federated(cfg: Config, splits: Splits) -> None:
    from c2al.jobs.federated import check_federated, client_tiers, make_clients

    clients = make_clients(splits)
    check_federated(cfg, len(clients))
    client_tiers(cfg, splits, clients)  # --tier-feature names a column


def _check_c2al(cfg: Config, splits: Splits) -> None:
    """The miner's input exists; a saved miner (--cohorts) loads, has K cohorts and reads these columns."""
    frame = cohort_frame(cfg, splits, "valid")
    if cfg.cohorts:
        miner = saved_miner(cfg)
        try:
            miner.predict(frame.head(1))
        except C2ALError as e:
            raise C2ALError(f"--cohorts {cfg.cohorts!r} cannot read this data's cohort features: {e}") from None
