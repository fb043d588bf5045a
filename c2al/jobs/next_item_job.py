"""`train.py --model next-item`: Ning et al. 2021's next-item dual encoder, centralized or --federated.

The data are user timelines, not rows: every position of a user's time-ordered items is an
example (context: the previous up to 10 items, label: the item there), and users are split
80/10/10, so validation and test users are never trained on (`c2al.data.sequences`). The model
is `c2al.models.sequence_two_tower` (one item table for both towers, no per-user parameters) and
the training is `c2al.jobs.next_item` (the library behind `benchmarks/ning_protocol.py`).

A flag that this job does not read is refused (`READS`). A Config default that was chosen for the
tabular models and that the user did not type takes the paper's value instead (`PAPER_DEFAULTS`,
e.g. batch 16 and Adam lr 0.01 centralized, 100 clients of batch 16 federated). The server
learning rate defaults to 0.1: on MovieLens-1M their 1.0 leaves the whole-catalog losses below
most-popular (benchmarks/README, "Ning et al. on its own protocol").

Writes OUT/config.json, OUT/report.json (validation and test recall@1/5/10 and mean rank over the
whole catalog, most-popular on the same test examples, the curve) and OUT/next_item.pt (the kept
model's weights, loadable with `c2al.dist.checkpoint.load_checkpoint`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from c2al.config import Config
from c2al.data.sequences import NextItemSplits, Timelines, movielens_dir, next_item_splits, read_timelines, read_timelines_table
from c2al.dist.checkpoint import save_checkpoint
from c2al.errors import C2ALError
from c2al.eval.next_item import label_ranks, popularity, recall_metrics
from c2al.eval.report import format_table, write_json
from c2al.federated.strategy import DEFAULT_SERVER_LR
from c2al.jobs.next_item import FederatedSettings, NextItemLoss, fit_centralized, fit_federated

log = logging.getLogger("c2al.next_item")

MODEL_FILE = "next_item.pt"
# The Config fields the next-item job reads; any other typed flag would be silently ignored, so it is refused.
READS = frozenset({"data", "user_col", "item_col", "time_col", "model", "embedding_dim", "next_item_loss", "epochs", "patience",
                   "eval_every", "batch_size", "lr", "device", "seed", "overwrite", "out", "quiet", "federated", "rounds",
                   "eval_rounds", "clients_per_round", "local_epochs", "local_batch_size", "server_optimizer", "server_lr",
                   "proximal_mu", "parallel_clients"})
# Ning et al.'s values (their launchers) where a Config default serves the tabular models; a typed flag wins.
PAPER_DEFAULTS = {"batch_size": 16, "lr": 0.01, "patience": 5, "clients_per_round": 100, "local_batch_size": 16, "rounds": 200,
                  "parallel_clients": 100}
CENTRALIZED_EVAL_STEPS = 10_000  # their centralized launcher validates every 10,000 steps (fewer when an epoch is shorter)
FEDERATED_EVAL_ROUNDS = 10
SERVER_LR = 0.1  # the measured choice on MovieLens-1M for every loss that learns (ning_protocol.json, "server_lr")
# --next-item-loss -> c2al.jobs.next_item.LOSSES (tests/test_next_item_job.py checks both lists agree)
LOSS_OF = {"softmax": "batch_softmax", "global-softmax": "global_softmax", "hinge-spreadout": "hinge_spreadout", "spreadout": "spreadout"}
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq")


def check_next_item(cfg: Config, given: set[str]) -> None:
    """Flags the next-item job cannot honour: one it does not read, a device it does not run on.

    Args:
        cfg: the run's Config (cfg.model == "next-item").
        given: the fields whose flags were typed.
    """
    wrong = sorted(given - READS)
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
        raise C2ALError(f"{flags}: --model next-item does not read it (it trains on user timelines with no cohorts, resume or "
                        f"sharding); drop it")
    if cfg.federated and "batch_size" in given:
        raise C2ALError("--batch-size: a --federated next-item run trains each client with --local-batch-size; drop it")
    if cfg.device == "cuda":
        raise C2ALError("--model next-item trains on CPU only (its federated clients are vmapped in-process): drop --device cuda")


def setting(cfg: Config, given: set[str], name: str) -> Any:
    """cfg.name, or the paper's value when the flag was not typed and the paper has one."""
    return getattr(cfg, name) if name in given or name not in PAPER_DEFAULTS else PAPER_DEFAULTS[name]


def load_timelines(cfg: Config) -> Timelines:
    """--data as timelines: a MovieLens name or directory, or a CSV / Parquet log with --user-col, --item-col, --time-col."""
    if cfg.data.lower().endswith(TABLE_SUFFIXES):
        return read_timelines_table(cfg.data, cfg.user_col, cfg.item_col, cfg.time_col)
    if cfg.user_col or cfg.item_col or cfg.time_col:
        raise C2ALError(f"--user-col, --item-col and --time-col name columns of a CSV / Parquet --data; {cfg.data!r} is a "
                        "MovieLens source, whose columns are known: drop them")
    if cfg.data == "synthetic":
        raise C2ALError("--model next-item needs user timelines: --data movielens-1m, movielens-100k, a MovieLens directory, "
                        "or a CSV / Parquet log with --user-col, --item-col and --time-col (synthetic rows have no order in time)")
    return read_timelines(movielens_dir(cfg.data))


def describe(splits: NextItemSplits) -> dict[str, Any]:
    """Items and, per split, users and examples: what the report and the log say the task is."""
    out: dict[str, Any] = {"items": splits.num_items}
    for name in ("train", "valid", "test"):
        table = getattr(splits, name)
        out[name] = {"examples": len(table), "users": int(len(set(table.user_ids.tolist())))}
    return out


def federated_settings(cfg: Config, given: set[str]) -> FederatedSettings:
    """The FederatedSettings a --federated next-item run trains with (the paper's where no flag was typed)."""
    # 0 (not typed): 0.1 for Adam and Yogi (the measured choice), else the strategy's own default
    lr = cfg.server_lr or (SERVER_LR if cfg.server_optimizer in ("fedadam", "fedyogi") else DEFAULT_SERVER_LR[cfg.server_optimizer])
    return FederatedSettings(clients_per_round=setting(cfg, given, "clients_per_round"), local_batch=setting(cfg, given, "local_batch_size"),
                   local_epochs=cfg.local_epochs, client_lr=setting(cfg, given, "lr"), rounds=setting(cfg, given, "rounds"),
                   eval_every=cfg.eval_rounds or ("eval_every" in given and cfg.eval_every) or FEDERATED_EVAL_ROUNDS, patience=setting(cfg, given, "patience"),
                   parallel_clients=setting(cfg, given, "parallel_clients"), server_optimizer=cfg.server_optimizer,
                   server_lr=lr, proximal_mu=cfg.proximal_mu)


def next_item_data(cfg: Config) -> NextItemSplits:
    """--data's next-item splits (users split by --seed): read before OUT is touched, so bad data writes nothing."""
    return next_item_splits(load_timelines(cfg), cfg.seed, name=cfg.data)


def run_next_item(cfg: Config, given: set[str], out: Path, splits: NextItemSplits) -> dict[str, Any]:
    """Train, evaluate and write OUT's files; returns the report (also OUT/report.json).

    Args:
        cfg: the run's Config.
        given: the fields whose flags were typed (`train.typed_flags`).
        out: OUT, locked by the caller.
        splits: `next_item_data(cfg)`.
    """
    task = describe(splits)
    log.info(f"next-item {cfg.data}: {task['items']} items; train {task['train']['examples']} examples of {task['train']['users']} "
             f"users, valid {task['valid']['examples']} ({task['valid']['users']}), test {task['test']['examples']} ({task['test']['users']})")
    loss = NextItemLoss(LOSS_OF[cfg.next_item_loss])
    if cfg.federated:
        fed = federated_settings(cfg, given)
        log.info(f"federated: 1 client = 1 training user, {fed.clients_per_round} a round, {fed.rounds} rounds at most, "
                 f"{fed.server_optimizer} lr {fed.server_lr:g}, client SGD lr {fed.client_lr:g} batch {fed.local_batch}")
        result = fit_federated(splits, loss, cfg.seed, fed, show=not cfg.quiet, embedding_dim=cfg.embedding_dim, keep_model=True)
        kept, step = f"round {result['kept_round']}", int(result["kept_round"] or 0)
    else:
        batch, lr = setting(cfg, given, "batch_size"), setting(cfg, given, "lr")
        per_epoch = max(1, len(splits.train) // batch)
        every = cfg.eval_every if "eval_every" in given and cfg.eval_every else min(CENTRALIZED_EVAL_STEPS, per_epoch)
        max_evals = max(1, math.ceil(cfg.epochs * per_epoch / every))
        log.info(f"centralized: Adam lr {lr:g}, batch {batch}, validation every {every} steps, "
                 f"at most {max_evals * every} steps ({cfg.epochs} epochs)")
        result = fit_centralized(splits, loss, cfg.seed, lr=lr, batch_size=batch, eval_every=every,
                                 patience=setting(cfg, given, "patience"), max_evals=max_evals, embedding_dim=cfg.embedding_dim,
                                 show=not cfg.quiet, keep_model=True)
        kept, step = f"step {result['steps']}", int(result["steps"])
    model = result.pop("model")
    popular = recall_metrics(label_ranks(popularity(splits.train.item_ids, splits.num_items), splits.test.item_ids - 1))
    report = {"config": cfg.to_dict(), "task": task, "loss": loss.kind, "mode": "federated" if cfg.federated else "centralized",
              "kept": kept, **result, "most_popular": popular}
    rows = [{"model": f"next-item {cfg.next_item_loss}", **result["test"]}, {"model": "most-popular", **popular}]
    log.info(format_table(rows, ["model", "recall@1", "recall@5", "recall@10", "mean_rank"],
                          title=f"test users ({report['mode']}, {kept}; whole catalog of {splits.num_items})"))
    save_checkpoint(out / MODEL_FILE, model_state=model.state_dict(), config=cfg.to_dict(), step=step,
                    extra={"num_items": splits.num_items, "loss": loss.kind})
    write_json(report, out / "report.json")
    log.info(f"wrote {out / 'report.json'} and {out / MODEL_FILE}")
    return report
