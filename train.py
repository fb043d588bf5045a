"""Train a TorchRec recommendation model; with --aux-cohorts, run C2AL end to end.

  python train.py                                  # AFM baseline on the embedded MovieLens-100k
  python train.py --aux-cohorts                    # baseline -> mine 2 cohorts -> C2AL -> per-cohort NE
  python train.py --data synthetic --model attention-fm --aux-cohorts 3
  python train.py --data ratings.csv --label click --sparse user,item,city --user-col user
  torchrun --nproc_per_node 2 train.py --aux-cohorts   # sharded over 2 processes (gloo on CPU)
  python train.py --model next-item --data movielens-1m --next-item-loss global-softmax --federated   # Ning et al. 2021

Writes OUT/config.json, OUT/report.json and checkpoints (see --out); OUT is locked while a run writes.
An OUT that holds another run's files is refused unless --resume continues it or --overwrite replaces
it (an auto-named OUT takes a fresh name, runs/NAME-2, instead).
Every flag, the data, OUT and any checkpoint to resume are checked before anything is written;
a problem is one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from c2al.config import SEQUENCE_MODELS, Config, add_config_flags, parse_args
from c2al.errors import C2ALError

_OTHER_RANK_GRACE_S = 5.0  # how long a non-main rank waits for the main rank to report the same error

log = logging.getLogger("c2al")


def default_out(cfg: Config) -> Path:
    """runs/<data>-<model>-<base|c2al>-seed<seed>: where a run without --out writes (before `out_dir`'s renaming)."""
    data = Path(cfg.data).stem if ("/" in cfg.data or "." in cfg.data) else cfg.data
    kind = "c2al" if cfg.aux_cohorts else "base"
    return Path("runs") / f"{data}-{cfg.model}-{kind}-seed{cfg.seed}"


def out_dir(cfg: Config) -> Path:
    """--out as given; without it the default name, or its first free numbered copy (runs/NAME-2, ...) when
    the default holds a previous run and neither --resume nor --overwrite says what to do with it."""
    from c2al.dist.outdir import fresh_out

    if cfg.out:
        return Path(cfg.out)
    base = default_out(cfg)
    return base if cfg.resume or cfg.overwrite else fresh_out(base)


def typed_flags(argv: Sequence[str]) -> set[str]:
    """The Config fields whose flags `argv` names (`--no-pipeline` too), whatever their values.

    Example:
        >>> sorted(typed_flags(["--rounds", "3", "--no-pipeline", "--seed=1"]))
        ['pipeline', 'rounds', 'seed']
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_config_flags(parser, [f.name for f in fields(Config)])  # absent flags leave no attribute
    ns, _ = parser.parse_known_args(list(argv))
    return set(vars(ns))


def changed_flags(cfg: Config) -> str:
    """The flags that differ from the defaults, as they would be typed: what makes this run this run."""
    default = Config()
    out = []
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            out.append(f"{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return " ".join(out) or "(all defaults)"


def run(cfg: Config, given: set[str] | None = None) -> dict[str, Any]:
    """Validate everything, lock OUT, then run the job; returns the report also written to OUT/report.json.

    Args:
        cfg: the checked Config.
        given: the fields whose flags were typed (`typed_flags`); None (a Config built in code): those
            that differ from Config's defaults.
    """
    from c2al.data.sources import load_splits
    from c2al.dist.outdir import check_out_dir, lock_out_dir
    from c2al.dist.process import init_distributed
    from c2al.jobs.preflight import check_command_line, check_job, check_model, check_overwrite, check_resume, check_world_size
    from c2al.logs import quiet_libraries, setup_logging

    setup_logging()
    quiet_libraries()
    # 1. validate: nothing is written until the flags, OUT, the checkpoints and the data have passed
    check_command_line(cfg, given)
    if cfg.model in SEQUENCE_MODELS:
        return run_sequence(cfg, given)
    check_model(cfg)
    out = out_dir(cfg)
    if not cfg.out and out != default_out(cfg):
        log.info(f"{default_out(cfg)} holds a previous run; this one writes to {out} (--overwrite replaces it, --resume continues it)")
    check_out_dir(out)
    check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_resume(cfg, out, int(os.environ.get("WORLD_SIZE", "1")))
    check_overwrite(cfg, out)
    info = init_distributed(cfg.device)
    splits = load_splits(cfg, saved_vocab=out / "vocab" if cfg.resume else None)
    check_job(cfg, splits, info)
    # 2. lock OUT: a second run on the same OUT stops here, naming this one; so does a run that
    # would replace a finished one's files (checked under the lock: two runs started together see each other)
    lock = lock_out_dir(out, info, reuse=cfg.resume or cfg.overwrite)
    try:
        if info.is_main:
            start(cfg, out, info, splits)
        return run_job(cfg, splits, info, out)
    finally:
        if lock is not None:
            lock.release()


def run_sequence(cfg: Config, given: set[str] | None) -> dict[str, Any]:
    """--model next-item: user timelines instead of table rows, one process (c2al.jobs.next_item_job)."""
    from c2al.dist.outdir import check_out_dir, lock_out_dir
    from c2al.dist.process import init_distributed
    from c2al.jobs.next_item_job import check_next_item, next_item_data, run_next_item
    from c2al.jobs.preflight import given_flags

    given = given_flags(cfg) if given is None else given
    check_next_item(cfg, given)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise C2ALError(f"--model {cfg.model} runs in one process (its federated clients are simulated): start it without torchrun")
    out = out_dir(cfg)
    check_out_dir(out)
    splits = next_item_data(cfg)
    info = init_distributed("cpu")
    lock = lock_out_dir(out, info, reuse=cfg.overwrite)
    try:
        prepare_out(cfg, out)
        log.info(f"config: {changed_flags(cfg)}  (every field: {out / 'config.json'})")
        return run_next_item(cfg, given, out, splits)
    finally:
        if lock is not None:
            lock.release()


def prepare_out(cfg: Config, out: Path) -> None:
    """Tidy OUT (a killed run's temporaries; with --overwrite the previous run's files) and save the config."""
    from c2al.dist.outdir import remove_run_files, remove_stale_temporaries
    from c2al.eval.report import write_json

    stale = remove_stale_temporaries(out)
    if stale:
        log.info(f"removed {len(stale)} temporary file(s) a killed run left in {out}: {', '.join(p.name for p in stale)}")
    if cfg.overwrite:
        replaced = remove_run_files(out)
        if replaced:
            log.info(f"--overwrite: removed the previous run's {', '.join(p.name for p in replaced)} from {out}")
    write_json(cfg.to_dict(), out / "config.json")


def start(cfg: Config, out: Path, info: Any, splits: Any) -> None:
    """What the main process does once OUT is its own: tidy it, save the config, say what runs."""
    prepare_out(cfg, out)
    log.info(f"c2al train.py on {info.world_size} process(es), {info.device}, backend {info.backend}")
    log.info(f"config: {changed_flags(cfg)}  (every field: {out / 'config.json'})")
    s = splits.schema
    from c2al.train.loop import is_streaming

    streamed = is_streaming(splits.train)
    train_rows = splits.train.rows if streamed else len(splits.train)
    train_text = "streamed" if train_rows is None else f"{train_rows}{' streamed' if streamed else ''}"
    if streamed:  # serving and a resumed run map raw values to ids with the vocabulary the stream was read with
        splits.vocab.save(out / "vocab")
    log.info(f"data {s.name}: train {train_text}  valid {len(splits.valid)}  test {len(splits.test)} rows; "
             f"{len(s.sparse)} sparse fields, {len(s.dense)} dense")


def run_job(cfg: Config, splits: Any, info: Any, out: Path) -> dict[str, Any]:
    if cfg.federated:
        from c2al.jobs.federated_job import run_federated

        return run_federated(cfg, splits, out)
    from c2al.jobs.centralized import run_baseline, run_c2al

    if cfg.aux_cohorts:
        return run_c2al(cfg, splits, info, out)
    return run_baseline(cfg, splits, info, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run train.py; a C2ALError is one `error:` line on stderr (from the main process only) and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(parse_args(argv, description=__doc__), given=typed_flags(argv))
    except C2ALError as e:
        if os.environ.get("RANK", "0") != "0":
            # Under torchrun every rank usually fails alike and the main one says so. Another rank waits first:
            # torchrun stops it as soon as the main rank exits, so its line is printed only when the main rank
            # did not fail (without the wait a fast rank exiting 2 got the main rank killed before it printed).
            time.sleep(_OTHER_RANK_GRACE_S)
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
