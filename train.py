"""Train a TorchRec recommendation model; with --aux-cohorts, run C2AL end to end.

  python train.py                                  # AFM baseline on the embedded MovieLens-100k
  python train.py --aux-cohorts                    # baseline -> mine 2 cohorts -> C2AL -> per-cohort NE
  python train.py --data synthetic --model attention-fm --aux-cohorts 3
  python train.py --data ratings.csv --label click --sparse user,item,city --user-col user
  torchrun --nproc_per_node 2 train.py --aux-cohorts   # sharded over 2 processes (gloo on CPU)

Writes OUT/report.json, OUT/config.json and checkpoints (see --out).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from c2al.config import Config, parse_args
from c2al.errors import C2ALError


def out_dir(cfg: Config) -> Path:
    if cfg.out:
        return Path(cfg.out)
    data = Path(cfg.data).stem if ("/" in cfg.data or "." in cfg.data) else cfg.data
    kind = "c2al" if cfg.aux_cohorts else "base"
    return Path("runs") / f"{data}-{cfg.model}-{kind}-seed{cfg.seed}"


def run(cfg: Config) -> dict[str, Any]:
    """The whole job; returns the report that is also written to OUT/report.json."""
    from c2al.data.sources import load_splits
    from c2al.dist.process import init_distributed
    from c2al.eval.report import write_json
    from c2al.jobs.centralized import run_baseline, run_c2al
    from c2al.logs import quiet_libraries, setup_logging

    setup_logging()
    quiet_libraries()
    info = init_distributed(cfg.device)
    out = out_dir(cfg)
    if info.is_main:
        print(f"c2al train.py on {info.world_size} process(es), {info.device}, backend {info.backend}")
        print(cfg.to_json())
        write_json(cfg.to_dict(), out / "config.json")
    splits = load_splits(cfg)
    if info.is_main:
        s = splits.schema
        print(f"data {s.name}: train {len(splits.train)}  valid {len(splits.valid)}  test {len(splits.test)} rows; "
              f"{len(s.sparse)} sparse fields, {len(s.dense)} dense")
    if cfg.federated:
        from c2al.jobs.federated import run_federated

        return run_federated(cfg, splits, out)
    if cfg.aux_cohorts:
        return run_c2al(cfg, splits, info, out)
    return run_baseline(cfg, splits, info, out)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = None
    try:
        cfg = parse_args(argv, description=__doc__)
        run(cfg)
    except C2ALError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
