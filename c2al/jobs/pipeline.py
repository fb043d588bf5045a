"""What both jobs (centralized and federated) share: the miner's input, mining, head choice."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from c2al.config import Config
from c2al.data.schema import Splits
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError


def cohort_frame(cfg: Config, splits: Splits, split: str) -> pd.DataFrame:
    """The miner's X for one split: --cohort-features, or the source's user-side features."""
    frame = getattr(splits, split).cohort_frame
    cols = list(cfg.cohort_features) or list(splits.schema.cohort_features)
    if frame is None or not cols:
        raise C2ALError(f"data {splits.schema.name!r} has no cohort features; pass --cohort-features COL,...")
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise C2ALError(f"unknown --cohort-features {missing}; available: {list(frame.columns)}")
    return frame[cols]


def mine_cohorts(cfg: Config, splits: Splits, valid_scores: np.ndarray, out: Path, info: DistInfo, null_test: bool = True) -> Any:
    """Fit the miner on validation predictions (or load --cohorts) and save it.

    Args:
        null_test: the miner's permutation test and contrast floor (train.py: expose only what contrasts, at most
            --aux-cohorts); False always exposes the --aux-cohorts most contrasting cohorts (a benchmark that asks
            what heads on the top-K cohorts do, whether or not they beat the null).
    """
    from c2al.cohorts import CohortMiner

    if cfg.cohorts:
        miner = saved_miner(cfg)
    else:
        nulls = {} if null_test else {"n_permutations": 0, "min_contrast": 0.0}
        miner = CohortMiner(
            n_cohorts=cfg.aux_cohorts, candidates=cfg.cohort_candidates, n_clusters=cfg.n_clusters,
            divergence=cfg.divergence, min_share=cfg.min_share, max_share=cfg.max_share, random_state=cfg.seed, **nulls,
        ).fit(cohort_frame(cfg, splits, "valid"), splits.valid.labels, scores=valid_scores)
    if info.is_main:
        miner.save(out / "cohorts.json")
    return miner


def saved_miner(cfg: Config) -> Any:
    """The miner --cohorts names, with --aux-cohorts cohorts (train.py checks this before training)."""
    from c2al.cohorts import CohortMiner

    path = Path(cfg.cohorts)
    miner = CohortMiner.load(path / "cohorts.json" if path.is_dir() else path)
    if len(miner.contrast_) > cfg.aux_cohorts:  # fewer is what the miner exposed when the others did not contrast
        raise C2ALError(f"--cohorts {cfg.cohorts!r} holds {len(miner.contrast_)} cohorts but --aux-cohorts is {cfg.aux_cohorts} "
                        "(a saved miner may hold at most --aux-cohorts cohorts)")
    return miner


def make_head(cfg: Config, model: nn.Module) -> Any:
    """--aux-head: the model's own output head (paper), a small MLP, or linear."""
    if cfg.aux_head == "clone":
        if not any(True for _ in model.over_arch.parameters()):
            # e.g. TwoTower's over arch is a parameter-free sum: a clone would repeat the main logit
            return lambda in_features: nn.Linear(in_features, 1)
        return model.over_arch
    if cfg.aux_head == "linear":
        return lambda in_features: nn.Linear(in_features, 1)
    return None
