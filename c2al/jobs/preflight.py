"""What train.py checks before it writes anything: a run that cannot finish fails in seconds, not after the baseline.

`Config.check` has already refused values no run could use. `check_command_line`
refuses what only the command line makes wrong (a typed flag the run's mode never
reads); `check_model` the flags the model's registry entry (`ModelSpec`: its loss,
what validation judges it by, what it predicts) cannot honour. The other checks need the data, the output directory or the process group:
the checkpoints a --resume would read (from this mode), the model the data makes,
the C2AL flags (cohort features that vary, a saved miner) and the federated
population. Each raises a one-line C2ALError.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from c2al.config import GROUPS, RESUME_FIELDS, SEQUENCE_MODELS, Config
from c2al.data.batch import num_batches
from c2al.data.schema import Splits
from c2al.data.stream import is_stream
from c2al.dist.checkpoint import load_checkpoint
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError
from c2al.jobs.pipeline import cohort_frame, saved_miner
from c2al.models.registry import model_names, model_spec
from c2al.train.build import build_model
from c2al.train.loop import is_streaming


def _federated_fields() -> tuple[str, ...]:
    """The fields of --help's federated group (after --federated itself, up to the next group)."""
    names = [f.name for f in fields(Config)]
    start = names.index("federated") + 1
    end = next((i for i in range(start, len(names)) if names[i] in GROUPS), len(names))
    return tuple(names[start:end])


# Flags only one mode reads: given in the other, they would be silently ignored (tests/test_bad_inputs.py
# checks that the centralized code reads no federated field and the federated code no centralized one).
FEDERATED_ONLY = _federated_fields()
CENTRALIZED_ONLY = ("epochs", "sharding", "pipeline", "checkpoint_every")


def given_flags(cfg: Config) -> set[str]:
    """A Config built in code, whose typed flags are unknown: the fields that differ from the defaults stand for them."""
    default = Config()
    return {f.name for f in fields(Config) if getattr(cfg, f.name) != getattr(default, f.name)}


def check_command_line(cfg: Config, given: set[str] | None) -> None:
    """Flags that mean nothing in this run's mode, and --resume with --overwrite, are refused.

    Args:
        cfg: the run's Config.
        given: the fields whose flags were typed; None: those that differ from Config's defaults
            (a Config built in code, whose typed flags are unknown).
    """
    given = given_flags(cfg) if given is None else given
    if cfg.federated:
        wrong = [n for n in CENTRALIZED_ONLY if n in given]
        if wrong:
            hint = " (rounds are --rounds)" if "epochs" in wrong else ""
            raise C2ALError(f"{_flags(wrong)} applies to centralized training only; --federated does not read it{hint}: drop it")
    else:
        wrong = [n for n in FEDERATED_ONLY if n in given]
        if wrong:
            raise C2ALError(f"{_flags(wrong)} applies to --federated runs only; this centralized run would ignore it: "
                            "drop it or add --federated")
    if "next_item_loss" in given and cfg.model not in SEQUENCE_MODELS:
        raise C2ALError(f"--next-item-loss trains --model next-item, not {cfg.model} (its loss is --two-tower-loss or BCE): drop it")
    if is_stream(cfg) and "epochs" in given:
        raise C2ALError("--epochs: a streamed source trains one pass in stream order; drop it (validation every --eval-every "
                        "steps and --patience decide where the pass stops early)")
    if cfg.resume and cfg.overwrite:
        raise C2ALError("--resume continues the run in OUT and --overwrite replaces it: pass one of them")


def check_model(cfg: Config) -> None:
    """Flags that cfg.model cannot honour, asked of its registry entry rather than of its name.

    Args:
        cfg: the run's Config; an unregistered --model is refused here too.
    """
    spec = model_spec(cfg.model)
    if cfg.two_tower_hinge and not spec.retrieval:
        raise C2ALError(f"--two-tower-hinge needs a retrieval model (--model {' or '.join(_models(retrieval=True))}), not {cfg.model}")
    if cfg.federated and cfg.engine == "flower" and cfg.patience and spec.criterion(cfg) != "ne":
        raise C2ALError(f"--patience on validation {spec.criterion(cfg)} needs --engine simulation (it reads every client's private "
                        "rows); give --patience 0 to run every round")
    if cfg.objective != "erm" and not cfg.federated and spec.loss(cfg) != "bce":
        raise C2ALError(f"--objective {cfg.objective} weighs pointwise BCE losses in centralized training: not with "
                        f"--two-tower-loss {spec.loss(cfg)}")
    if cfg.aux_towers == "mmoe" and spec.retrieval:
        raise C2ALError(f"--aux-towers mmoe needs a ranking model: --model {cfg.model}'s retrieval scores u . v would bypass the experts")


def _models(retrieval: bool) -> list[str]:
    """The registered models that are (or are not) retrieval models, for the messages."""
    return [n for n in model_names() if model_spec(n).retrieval == retrieval]


def _flags(names: list[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def check_world_size(cfg: Config, world_size: int) -> None:
    """Every process takes an equal share of a global batch."""
    if cfg.batch_size % world_size:
        raise C2ALError(f"--batch-size {cfg.batch_size} is not divisible by world size {world_size} "
                        "(every process takes an equal share of a batch)")
    if cfg.federated and world_size > 1:
        raise C2ALError("--federated runs in one process (its clients are simulated); start it without torchrun")


def check_resume(cfg: Config, out: Path, world_size: int = 1) -> None:
    """With --resume, every checkpoint in OUT must come from this run's trajectory (RESUME_FIELDS agree).

    All of them, not only the one a job reads first: a C2AL run reads baseline.pt,
    then c2al_train.pt after the baseline, and a mismatch there would come too late.
    A streamed source also resumes on the number of processes that wrote it (each skips its own lane's rows).
    """
    if not cfg.resume or not out.is_dir():
        return
    streamed = is_stream(cfg)
    for path in sorted(out.glob("*.pt")):
        _check_mode(cfg, path)
        payload = load_checkpoint(path, expect_config=cfg.to_dict(), keys=RESUME_FIELDS)
        wrote = (payload.get("extra") or {}).get("world_size")
        if streamed and wrote is not None and int(wrote) != world_size:
            raise C2ALError(f"{path} was written by {wrote} process(es) reading a stream; resume it on {wrote} (each process "
                            f"skips the rows of its own share), not {world_size}")


def check_overwrite(cfg: Config, out: Path) -> None:
    """--overwrite removes OUT's run files once the run starts: a saved miner it still reads may not be one of them."""
    if not (cfg.overwrite and cfg.cohorts):
        return
    miner, where = Path(cfg.cohorts).resolve(), out.resolve()
    if miner == where or where in miner.parents:
        raise C2ALError(f"--cohorts {cfg.cohorts!r} lies in --out {str(out)!r}, whose run files --overwrite removes before "
                        "the miner is read: copy it elsewhere or choose another --out")


def _check_mode(cfg: Config, path: Path) -> None:
    """A federated run resumes only fed_*.pt and a centralized one never does (c2al.pt, written by both
    modes, is left to the config comparison, which names `federated`)."""
    if path.name == "c2al.pt" or path.name.startswith("fed_") == cfg.federated:
        return
    wrote, now = ("a federated", "this centralized run") if not cfg.federated else ("a centralized", "--federated")
    raise C2ALError(f"--resume: {str(path)!r} is {wrote} run's checkpoint, which {now} cannot continue; "
                    f"choose another --out, or resume it {'with' if not cfg.federated else 'without'} --federated")


def check_job(cfg: Config, splits: Splits, info: DistInfo) -> None:
    """What the data decides: the model builds, batches fit, and the C2AL and federated flags apply to it."""
    if is_streaming(splits.train):  # a streamed train split: what it cannot do is said before any other check
        _check_stream(cfg, splits)
    with torch.device("meta"):  # shapes and names only: no memory for the tables
        build_model(cfg, splits.schema)
    if cfg.federated:
        _check_federated(cfg, splits)
    else:
        _check_centralized(cfg, splits, info)
    if cfg.aux_cohorts:
        _check_c2al(cfg, splits)


def _check_stream(cfg: Config, splits: Splits) -> None:
    """What a streamed train split cannot do: federated clients need every user's rows, a retrieval model's
    (the two-tower's) logQ correction counts the train split's items ahead of training."""
    if cfg.federated:
        raise C2ALError(f"--federated needs an in-memory source; {cfg.data!r} streams (drop --stream, or train centrally)")
    if model_spec(cfg.model).retrieval:
        raise C2ALError(f"--model {cfg.model} needs an in-memory source; {cfg.data!r} streams "
                        f"(use {' or '.join(_models(retrieval=False))})")


def _check_centralized(cfg: Config, splits: Splits, info: DistInfo) -> None:
    if not is_streaming(splits.train) and num_batches(len(splits.train), cfg.batch_size, drop_last=True) == 0:
        raise C2ALError(f"the train split has {len(splits.train)} rows, fewer than --batch-size {cfg.batch_size}")
    if cfg.table_optimizer == "adam" and info.device.type != "cuda":
        raise C2ALError("--table-optimizer adam needs CUDA; on CPU FBGEMM fuses only sgd, adagrad, rowwise_adagrad")
    if cfg.sharding == "row_wise" and info.backend == "gloo":
        raise C2ALError("--sharding row_wise needs NCCL (CUDA); gloo offers table_wise, column_wise, data_parallel")


def _check_federated(cfg: Config, splits: Splits) -> None:
    from c2al.jobs.federated_job import check_federated, client_tiers, make_clients

    clients = make_clients(splits)
    check_federated(cfg, len(clients))
    client_tiers(cfg, splits, clients)  # --tier-feature names a column
    if cfg.aux_cohorts and len(clients) <= cfg.aux_cohorts:
        # a client is one user, and its rows all fall in one cohort: K cohorts and the rest need K + 1 users
        raise C2ALError(f"--federated --aux-cohorts {cfg.aux_cohorts} mines cohorts of whole clients (users), but only "
                        f"{len(clients)} user(s) hold training rows; federated C2AL needs at least {cfg.aux_cohorts + 1}")


def _check_c2al(cfg: Config, splits: Splits) -> None:
    """The miner's input exists and each of its columns varies; a saved miner (--cohorts) loads, has K cohorts and reads them."""
    frame = cohort_frame(cfg, splits, "valid")
    if not cfg.cohorts:
        _check_informative(frame)
    else:
        miner = saved_miner(cfg)
        try:
            miner.predict(frame.head(1))
        except C2ALError as e:
            raise C2ALError(f"--cohorts {cfg.cohorts!r} cannot read this data's cohort features: {e}") from None


def _check_informative(frame: Any) -> None:
    """Every cohort feature takes two values or more on the validation rows the miner fits on (both miners'
    input rule, checked here before the baseline trains rather than after)."""
    from c2al.cohorts.encoding import check_informative, read_columns

    names, columns, _ = read_columns(frame)
    try:
        check_informative(names, columns)
    except C2ALError as e:
        raise C2ALError(f"--cohort-features: {e} (on the validation split)") from None
