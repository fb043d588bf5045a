"""One config dataclass per run; the command line is generated from its fields.

The config is printed at start and saved inside every checkpoint and report,
so a result file always says what made it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NamedTuple, Sequence

from c2al.errors import C2ALError

MODELS = ("afm", "attention-fm", "two-tower")  # tabular models (c2al.models.registry)
# Models over each user's time-ordered items instead of a table's rows (c2al.jobs.next_item_job).
SEQUENCE_MODELS = ("next-item",)
NEXT_ITEM_LOSSES = ("softmax", "global-softmax", "hinge-spreadout", "spreadout")  # c2al.jobs.next_item.LOSSES, spelled as flags
# Optimizer and sharding names, once: c2al.dist.sharding maps them to classes.
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")  # adam only on CUDA (FBGEMM's CPU kernels)
SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "data_parallel")
BALANCE_MODES = ("none", "agree", "project", "magnitude", "magnitude+agree", "magnitude+project")  # see c2al.balance
# Spellings earlier versions took for the agreement rule (they named it "gate", which is also the ship rule --gate).
BALANCE_ALIASES = {"gate": "agree", "magnitude+gate": "magnitude+agree"}
OBJECTIVES = ("erm", "group-dro", "cvar")  # c2al.robust.OBJECTIVES (tests/test_robust.py checks they agree)
TOWERS = ("shared-bottom", "mmoe")  # c2al.towers.TOWERS


def balance_mode(name: str) -> str:
    """An --aux-balance / `c2al.attach(balance=...)` name with its old spelling mapped: the one place aliases resolve.

    Example:
        >>> balance_mode("magnitude+gate"), balance_mode("project")
        ('magnitude+agree', 'project')
    """
    return BALANCE_ALIASES.get(name, name)


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default")
    return field(default=default, metadata={"help": help, **kw})


def _names(value: str) -> tuple[str, ...]:
    """"a, b,c" -> ("a", "b", "c"): comma-separated column names, parsed once at the command line."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _numbers(cast: type, n: int | None = None) -> Any:
    """An argparse type: comma-separated numbers -> a tuple of `cast`, exactly `n` of them when given."""

    def parse(value: str) -> tuple:
        try:
            out = tuple(cast(v) for v in _names(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__}s, got {value!r}") from None
        if not out or (n is not None and len(out) != n):
            raise argparse.ArgumentTypeError(f"expected {n or 'one or more'} comma-separated numbers, got {value!r}")
        return out

    parse.__name__ = f"{n or ''} {cast.__name__}s".strip()  # argparse names the type in its error
    return parse


def _aux_weight(value: str) -> tuple[float, ...] | str:
    """--aux-weight: "auto", or one or K comma-separated floats."""
    return "auto" if value.strip() == "auto" else _numbers(float)(value)


_aux_weight.__name__ = "floats or auto"


def _list(help: str, parse: Any, default: tuple) -> Any:
    """A tuple-valued field: `parse` turns the flag's text into the tuple once."""
    return field(default=default, metadata={"help": help, "type": parse})


@dataclass
class Config:
    """Everything that defines a run of train.py."""

    # data
    data: str = _opt("movielens-100k (embedded default), movielens-1m, synthetic, a MovieLens directory, a CSV/Parquet PATH (a folder of "
                     "Parquet files with --stream), or criteo:PATH (streamed: a Criteo text file, .gz, or folder of day_N files, or TorchRec's "
                     "day_N_{dense,sparse,labels}.npy folder; columns label, int_0..int_12, cat_0..cat_25; integers become log(1 + max(x, 0)), "
                     "missing as 0, as in the DLRM reference)", default="movielens-100k")
    label: str = _opt("tabular data: the 0/1 label column", default="")
    sparse: tuple[str, ...] = _list("tabular data: comma-separated categorical columns", _names, ())
    dense: tuple[str, ...] = _list("tabular data: comma-separated numeric columns", _names, ())
    user_col: str = _opt("tabular data: the user id column", default="")
    item_col: str = _opt("tabular data: the item id column (two-tower)", default="")
    time_col: str = _opt("tabular data: timestamp column; splits by time per user when given with --user-col", default="")
    cohort_features: tuple[str, ...] = _list("comma-separated columns the cohort miner clusters on (default: the source's user-side features)", _names, ())
    valid_frac: float = _opt("share of each user's (latest) rows held out for validation", default=0.1)
    test_frac: float = _opt("share of each user's latest rows held out for test", default=0.1)
    stream: bool = _opt("read the --data table (a .parquet file or folder, or a .csv) chunk by chunk with the role flags, never whole "
                        "in memory (always on for criteo:)", default=False)
    split_by: str = _opt("streaming sources: file (every file but the last is train, the last halved into valid and test), hash (of "
                         "--user-col, else of the row's position; shares --valid-frac / --test-frac), time (--time-col cut at the last "
                         "--test-frac and the --valid-frac before it of the time span), or auto (file with >= 2 files, else hash)",
                         default="auto", choices=("auto", "file", "hash", "time"))
    eval_rows: int = _opt("streaming sources: most rows of validation and of test (the first rows of their part), so evaluation "
                          "cost does not grow with the data", default=100_000)
    hash_size: tuple[int, ...] = _list("streaming sources: hash each sparse field to this many embeddings (one size, or one per field "
                                       "comma-separated; id 0 is missing; default 1000000 per field)", _numbers(int), ())
    min_count: int = _opt("streaming sources: instead of hashing, a vocabulary built in one pass over the training rows; values seen "
                          "fewer than N times share id 0 (0: hash)", default=0)
    # model
    model: str = _opt(f"model: {', '.join(MODELS)} (rows of a table), or next-item (Ning et al. 2021's dual encoder: the mean of a "
                      "user's previous 10 items through a dense layer against one shared item table, trained on time-ordered "
                      "timelines, split by user; reports recall@K over the whole catalog)", default="afm", choices=MODELS + SEQUENCE_MODELS)
    embedding_dim: int = _opt("embedding dimension D of every table", default=16)
    attention_dim: int = _opt("AFM attention MLP width / AttentionFM rank K'", default=16)
    dropout: float = _opt("AFM dropout on the pairwise products", default=0.2)
    two_tower_loss: str = _opt("two-tower training loss: bce (pointwise, for NE) or softmax (in-batch, for recall@K)",
                               default="bce", choices=("bce", "softmax"))
    two_tower_logq: bool = _opt("--two-tower-loss softmax: logQ correction (Yi et al. 2019), each in-batch candidate's logits minus the "
                                "log of its item's share of the training rows, so popular items are not over-penalised as negatives", default=True)
    next_item_loss: str = _opt("--model next-item: softmax (in-batch negatives), global-softmax (every catalog item a negative), "
                               "hinge-spreadout (squared hinge on the positive + spread-out over the whole catalog) or spreadout "
                               "(the spread-out terms alone); the last three do not depend on the batch, which federated clients "
                               "of one user need (Ning et al. 2021)", default="softmax", choices=NEXT_ITEM_LOSSES)
    # training
    epochs: int = _opt("most passes over the training split (early stopping usually ends sooner)", default=10)
    patience: int = _opt("early stopping: evaluations of validation NE (recall@10 with --two-tower-loss softmax) without a strictly "
                         "better one before training stops; the best evaluation's weights are kept (0: train every epoch, keep the last)", default=2)
    eval_every: int = _opt("steps between validation evaluations (0: at the end of each epoch only; a streaming source: every "
                           "1000 steps); with --federated it is read as --eval-rounds, the spelling earlier versions took", default=0)
    batch_size: int = _opt("global batch size (split evenly across processes)", default=512)
    lr: float = _opt("learning rate of the dense parameters", default=3e-3)
    dense_optimizer: str = _opt("optimizer of dense parameters", default="adam", choices=DENSE_OPTIMIZERS)
    weight_decay: float = _opt("L2 weight decay of dense parameters", default=0.0)
    table_lr: float = _opt("learning rate of the fused embedding-table optimizer", default=0.05)
    table_optimizer: str = _opt("fused table optimizer (adam only on CUDA)", default="rowwise_adagrad", choices=TABLE_OPTIMIZERS)
    sharding: str = _opt("sharding type forced on every table", default="table_wise", choices=SHARDING_TYPES)
    pipeline: bool = _opt("train through TorchRec's TrainPipelineSparseDist", default=False)
    device: str = _opt("auto, cpu or cuda", default="auto")
    seed: int = _opt("seed of initialization, shuffling and mining", default=0)
    checkpoint_every: int = _opt("steps between checkpoints (0: only at the end of each epoch)", default=0)
    resume: bool = _opt("continue the run in OUT from its checkpoints where they exist (checkpoint.pt; baseline.pt and c2al_train.pt "
                        "with --aux-cohorts; fed_*.pt with --federated); every flag that changes training must be as before "
                        "(only --epochs, --rounds, --patience and output or execution flags may change)", default=False)
    overwrite: bool = _opt("replace the run files an --out already holds (report.json, config.json, checkpoints, c2al.pt, "
                           "cohorts.json); without it train.py refuses such an --out (an auto-named one takes a fresh name, "
                           "runs/NAME-2, -3, ...)", default=False)
    out: str = _opt("output directory, locked while a run writes to it (default runs/<data>-<model>-base-seed<seed>, "
                    "or -c2al- instead of -base- with --aux-cohorts)", default="")
    quiet: bool = _opt("no progress bars (they are drawn only when stderr is a terminal)", default=False)
    # C2AL
    aux_cohorts: int = _opt("run C2AL with K auxiliary cohorts (baseline, mining, C2AL, comparison); bare flag means K=2", default=0, nargs="?", const=2)
    aux_weight: tuple[float, ...] | str = _list(
        "lambda of the auxiliary losses: one float, K comma-separated floats, or auto: train C2AL once per lambda "
        "in 0.03, 0.1, 0.3 and keep the one whose validation NE over the exposed cohorts is lowest among those whose "
        "overall validation NE is no worse than the baseline's (the lowest overall if none is)", _aux_weight, (0.1,))
    aux_head: str = _opt("auxiliary head: clone (the model's own output head, fresh weights), mlp or linear",
                         default="clone", choices=("clone", "mlp", "linear"))
    aux_balance: str = _opt("how each auxiliary head's gradient reaches the shared representation: none (plain sum, the paper), "
                            "agree (only on samples where it agrees with the main gradient, Du et al. 2018), project (its part "
                            "opposing the main gradient removed, one-way PCGrad), magnitude (rescaled toward the main gradient's "
                            "norm, MetaBalance), or magnitude+agree / magnitude+project (gate and magnitude+gate: the old "
                            "spellings of agree and magnitude+agree)", default="none", choices=BALANCE_MODES, type=balance_mode)
    aux_towers: str = _opt("how the cohort towers (the --aux-head heads) read the shared representation: shared-bottom (each reads it "
                           "directly: C2AL's heads) or mmoe (Ma et al. 2018: --mmoe-experts experts on it, mixed per task by softmax "
                           "gates; the main task's mixture feeds the model's own head, so the served model keeps the experts and the "
                           "main gate, without the cohort towers and gates)", default="shared-bottom", choices=TOWERS)
    mmoe_experts: int = _opt("--aux-towers mmoe: number of experts", default=4)
    objective: str = _opt("training loss of the plain model, heads-free: erm (mean BCE), group-dro (Sagawa et al. 2020: exponentiated-"
                          "gradient weights on the mean BCE of each mined cohort and of the rest; needs --aux-cohorts) or cvar (Levy "
                          "et al. 2020: mean of the worst --cvar-alpha share of each batch's losses). With --aux-cohorts and group-dro "
                          "or cvar, the model compared with the ERM baseline (and shipped by --gate) is the plain model trained "
                          "under that loss instead of C2AL's heads; without --aux-cohorts, cvar trains the one model", default="erm",
                          choices=OBJECTIVES)
    dro_eta: float = _opt("--objective group-dro: step size eta of the group weights' update q_g <- q_g exp(eta (loss_g + C / sqrt(n_g)))",
                          default=0.01)
    dro_adjust: float = _opt("--objective group-dro: the group adjustment C of that update (n_g: group g's training rows; 0: none)",
                             default=1.0)
    cvar_alpha: float = _opt("--objective cvar: the share alpha of each batch's largest losses that is trained on (1: ERM)", default=0.5)
    gate: bool = _opt("ship C2AL (as OUT/c2al.pt) only when, on validation, its overall NE is no worse than the baseline's "
                      "(within --gate-tolerance) and its mean NE over the exposed cohorts is lower; otherwise ship the "
                      "baseline and say why (--no-gate always ships C2AL)", default=True)
    gate_tolerance: float = _opt("relative slack on overall validation NE for --gate and --aux-weight auto (0.001 = 0.1%%)", default=0.0)
    cohort_candidates: str = _opt("miner candidates: kmeans, gmm, axes, tree (decision-tree conjunctions such as "
                                  "'region=3 & age>=55'), or several joined by + (compared in benchmarks/README.md)", default="kmeans+tree")
    n_clusters: int = _opt("clusters the miner proposes as candidates", default=16)
    divergence: str = _opt("miner contrast: js, kl or wasserstein", default="js", choices=("js", "kl", "wasserstein"))
    min_share: float = _opt("smallest traffic share of an exposed cohort", default=0.02)
    max_share: float = _opt("largest traffic share of an exposed cohort", default=0.2)
    cohorts: str = _opt("reuse a saved cohort miner (directory or .json written by a previous run)", default="")
    # federated
    federated: bool = _opt("cross-device federated training: each user is a client (with --aux-cohorts: federated C2AL)", default=False)
    engine: str = _opt("federated engine: simulation (in-process; clients side by side with --parallel-clients, one after "
                       "another, or over forked --workers) or flower (Flower ClientApp/ServerApp on Ray; pip install .[flower])",
                       default="simulation", choices=("simulation", "flower"))
    rounds: int = _opt("most federated rounds (per phase with --aux-cohorts); early stopping on validation NE, checked every "
                       "--eval-rounds rounds, usually ends sooner", default=500)
    eval_rounds: int = _opt("federated rounds between validation evaluations (0: --eval-every if given, else every 5 rounds)", default=0)
    clients_per_round: int = _opt("clients sampled per round (among the available ones)", default=200)
    local_epochs: int = _opt("local passes over a client's rows per round (capped by its tier's step budget)", default=1)
    local_batch_size: int = _opt("client batch size", default=32)
    server_optimizer: str = _opt("server strategy: fedavg, fedprox, fedadam or fedyogi (Reddi et al. 2021; the defaults' validation "
                                 "measurements are in benchmarks/README.md), or fedadagrad (RF^2's server Adagrad)",
                                 default="fedadam", choices=("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"))
    server_lr: float = _opt("server learning rate (0: 1.0 for fedavg/fedprox, 0.01 for fedadam/fedyogi, 0.1 for fedadagrad)", default=0.0)
    proximal_mu: float = _opt("FedProx proximal term mu", default=0.01)
    sam_rho: float = _opt("local sharpness-aware minimization radius (FedRecGEL); 0 disables", default=0.0)
    two_tower_hinge: bool = _opt("federated two-tower: batch-insensitive squared hinge + spread-out loss (Ning et al. 2021) "
                                 "instead of --two-tower-loss", default=False)
    tiers: str = _opt("device tiers: none, independent of the data, or correlated with --tier-feature (RF^2); or RF^2's own "
                      "rules: rf2-independent (clients by training rows, tier = rank mod 3), rf2-dirichlet (Dirichlet(0.005) over "
                      "what users click)", default="correlated",
                      choices=("none", "independent", "correlated", "rf2-independent", "rf2-dirichlet"))
    tier_feature: str = _opt("user feature tiers correlate with (default: the first numeric cohort feature, else activity)", default="")
    tier_skew: float = _opt("correlated tiers: Dirichlet concentration toward the group's own tier", default=5.0)
    tier_shares: tuple[float, float, float] = _list("low,mid,high population shares (independent tiers)", _numbers(float, 3), (0.3, 0.4, 0.3))
    tier_availability: tuple[float, float, float] = _list("low,mid,high probability of being available in a round", _numbers(float, 3), (0.5, 0.8, 0.95))
    tier_dropout: tuple[float, float, float] = _list("low,mid,high probability of dropping out mid-round", _numbers(float, 3), (0.15, 0.05, 0.02))
    tier_steps: tuple[int, int, int] = _list("low,mid,high local step budget per round (0: uncapped)", _numbers(int, 3), (2, 5, 10))
    exclude_low: bool = _opt("low-end devices never train (RF^2's --exclude-low); they are still evaluated", default=False)
    kmeans_iters: int = _opt("federated k-means (Lloyd) rounds of cohort mining", default=50)
    workers: int = _opt("simulation engine: run each round's clients over this many forked processes (0: sequential)", default=0)
    parallel_clients: int = _opt("simulation engine: train up to N of a round's clients side by side, each local step of all of them "
                                 "as one vectorized step (torch.func.vmap; the same batches and steps as one after another, dropout "
                                 "drawn once per step for all); a round of fewer than 16 clients, and 0 or 1, "
                                 "run one after another, as the Flower engine does", default=256)
    normalized_updates: bool = _opt("clients send their update per local step, weighted by their training rows (FedNova's "
                                    "normalized averaging, Wang et al. 2020), so the users of devices with larger step budgets "
                                    "do not pull the shared model harder (--no-normalized-updates: FedAvg's weighting by examples)", default=True)
    num_actors: int = _opt("flower engine: Ray actors running ClientApps side by side, one CPU each (each imports torch and reads the data once)", default=1)
    aggregation: str = _opt("how the server combines client updates, dense parameters and shared table rows alike (a row over the clients that sent it; "
                            "private user rows never leave the client): mean (FedAvg); median or trimmed-mean (per coordinate, one client one vote, "
                            "Flower's functions; table rows first clipped to the round's median row norm); norm-clip (each client's whole update "
                            "clipped to --clip-norm, then the mean); krum (Flower's "
                            "Multi-Krum keeps the updates closest to their neighbours, then their mean). Every rule weighs a client's reported "
                            "example count at most --count-cap x the round's median count and, when every tier has a step budget, at most "
                            "the largest budget's examples (max --tier-steps x --local-batch-size)",
                            default="mean", choices=("mean", "median", "trimmed-mean", "norm-clip", "krum"))
    trim_fraction: float = _opt("--aggregation trimmed-mean: share of each coordinate's values cut from each end", default=0.2)
    clip_norm: float = _opt("--aggregation norm-clip: largest L2 norm of a client's update (0: the round's median update norm)", default=0.0)
    krum_f: float = _opt("--aggregation krum: clients assumed Byzantine per round, a share of the round's updates when < 1, else a count; "
                         "the other C - f are averaged", default=0.25)
    count_cap: float = _opt("a client's reported example count weighs at most this multiple of the round's median count (0: no cap)", default=5.0)
    attack: str = _opt("simulated poisoning (simulation engine) by a seeded --attack-share of clients: nan (NaN updates), scale (update x S), "
                       "sign-flip (update x -S), label-flip (training on flipped labels)", default="none",
                       choices=("none", "nan", "scale", "sign-flip", "label-flip"))
    attack_share: float = _opt("--attack: share F of clients that attack (at least one when > 0)", default=0.1)
    attack_scale: float = _opt("--attack scale / sign-flip: S", default=10.0)

    def __post_init__(self) -> None:
        # An old --aux-balance spelling, however the Config was made (flags, code, a saved config), is held as the new one.
        self.aux_balance = balance_mode(self.aux_balance)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native values (tuples become lists), as saved in checkpoints and reports."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise C2ALError(f"unknown config fields {unknown}")
        tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})

    def aux_weights(self) -> list[float]:
        """lambda per cohort: one value broadcast to K, or exactly K values (not for "auto": the job picks)."""
        if self.aux_weight == "auto":
            raise C2ALError("--aux-weight auto has no single value: the C2AL job picks one on validation")
        w = [float(v) for v in self.aux_weight]
        k = self.aux_cohorts
        if len(w) == 1:
            return w * max(k, 1)
        if len(w) != k:
            raise C2ALError(f"--aux-weight has {len(w)} values but --aux-cohorts is {k}")
        return w

    def check(self) -> "Config":
        """Refuse, with the flag's name, any value that could not run or would be silently ignored.

        Only what the fields alone decide; files, data and the output directory are
        checked by train.py before it writes anything.
        """
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))
        if self.valid_frac + self.test_frac >= 1:
            raise C2ALError(f"--valid-frac + --test-frac must be below 1, got {self.valid_frac} + {self.test_frac}")
        if self.min_share > self.max_share:
            raise C2ALError(f"--min-share {self.min_share} is above --max-share {self.max_share}")
        parts = self.cohort_candidates.split("+")
        if any(p not in CANDIDATES for p in parts) or len(set(parts)) != len(parts):
            raise C2ALError(f"--cohort-candidates {self.cohort_candidates!r}: expected '+'-joined names from {', '.join(CANDIDATES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise C2ALError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.cohorts and not self.aux_cohorts:
            raise C2ALError("--cohorts is a saved miner for C2AL: it needs --aux-cohorts")
        if self.cohorts and self.federated:
            raise C2ALError("--cohorts cannot be used with --federated: federated clients mine their cohorts themselves")
        if self.aux_cohorts and self.aux_weight != "auto":
            self.aux_weights()
        if abs(sum(self.tier_shares) - 1) > 1e-6:
            raise C2ALError(f"--tier-shares must sum to 1, got {','.join(map(str, self.tier_shares))}")
        if self.federated and self.engine == "flower" and (self.resume or self.attack != "none"):
            raise C2ALError(f"--{'resume' if self.resume else 'attack'} needs --engine simulation (the flower engine has none)")
        if self.federated and self.engine == "flower":
            _check_flower(self)
        _check_objective_and_towers(self)
        return self


def _check_flower(cfg: Config) -> None:
    """Flags the flower engine cannot honour (it stops early by the simulation's rule: --patience, --eval-every;
    early stopping on recall@10, which depends on the model, is checked by `jobs.preflight.check_model`)."""
    for flag, name in (("--workers", "workers"), ("--parallel-clients", "parallel_clients")):
        if getattr(cfg, name) != Config.__dataclass_fields__[name].default:
            raise C2ALError(f"{flag} is an --engine simulation setting; the flower engine runs its clients on --num-actors Ray actors")


def _check_objective_and_towers(cfg: Config) -> None:
    """--objective and --aux-towers: refuse the combinations that could not run or would ignore a flag (those that
    depend on the model's loss or predictions are `jobs.preflight.check_model`'s: the config does not know the models)."""
    if cfg.objective != "erm":
        if cfg.objective == "group-dro" and not cfg.aux_cohorts:
            raise C2ALError("--objective group-dro needs groups: pass --aux-cohorts K (its groups are the K mined cohorts and the rest)")
        if cfg.federated:
            raise C2ALError(f"--objective {cfg.objective} weighs pointwise BCE losses in centralized training: not with --federated")
        if cfg.aux_towers != "shared-bottom" or cfg.aux_balance != "none" or cfg.aux_weight == "auto":
            raise C2ALError(f"--objective {cfg.objective} trains the plain model without heads: --aux-towers, --aux-balance and "
                            f"--aux-weight auto do not apply")
    if cfg.aux_towers == "mmoe":
        if not cfg.aux_cohorts or cfg.federated:
            raise C2ALError("--aux-towers mmoe needs --aux-cohorts and centralized training")
        if cfg.aux_balance != "none":
            raise C2ALError("--aux-towers mmoe with --aux-balance: the towers read the experts' mixtures, not the representation the "
                            "balance modes split; use --aux-balance none")


# The miner's candidate sources (cohorts.candidates.SOURCES; tests/test_config.py checks they agree).
CANDIDATES = ("kmeans", "gmm", "axes", "tree")


class _Range(NamedTuple):
    """Allowed values of a numeric field (each entry of a tuple field): lo <= v (lo < v when open), likewise hi."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def text(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


_AT_LEAST_1 = _Range(1)
_AT_LEAST_0 = _Range(0)
_POSITIVE = _Range(0, lo_open=True)
_PROBABILITY = _Range(0, 1)
# Every numeric field with a limit; a value outside it would crash later or run as something else
# (--checkpoint-every -1 never checkpoints, --dropout 2 flips signs). Unlisted numbers need only be finite.
RANGES: dict[str, _Range] = {
    **dict.fromkeys(("epochs", "batch_size", "embedding_dim", "attention_dim", "n_clusters", "rounds", "clients_per_round",
                     "local_epochs", "local_batch_size", "kmeans_iters", "num_actors"), _AT_LEAST_1),
    **dict.fromkeys(("patience", "eval_every", "eval_rounds", "checkpoint_every", "seed", "workers", "parallel_clients", "aux_cohorts", "weight_decay",
                     "server_lr", "proximal_mu", "sam_rho", "clip_norm", "krum_f", "count_cap", "tier_steps", "aux_weight"),
                    _AT_LEAST_0),
    **dict.fromkeys(("lr", "table_lr", "tier_skew", "dro_eta"), _POSITIVE),
    "dro_adjust": _AT_LEAST_0,
    "mmoe_experts": _AT_LEAST_1,
    "cvar_alpha": _Range(0, 1, lo_open=True),
    **dict.fromkeys(("min_share", "attack_share", "tier_shares"), _PROBABILITY),
    "max_share": _Range(0, 1, lo_open=True),
    "eval_rows": _AT_LEAST_1,
    "min_count": _AT_LEAST_0,
    "hash_size": _Range(2),
    "valid_frac": _Range(0, 1, lo_open=True, hi_open=True),
    "test_frac": _Range(0, 1, lo_open=True, hi_open=True),
    "dropout": _Range(0, 1, hi_open=True),
    "tier_dropout": _Range(0, 1, hi_open=True),
    "tier_availability": _Range(0, 1, lo_open=True),
    "trim_fraction": _Range(0, 0.5, hi_open=True),
}


def _check_field(name: str, value: Any) -> None:
    """A numeric field (or each number of a tuple field) is finite and inside RANGES[name]."""
    values = value if isinstance(value, tuple) else (value,)
    flag = "--" + name.replace("_", "-")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise C2ALError(f"{flag} must be a finite number, got {v}")
        if name in RANGES and not RANGES[name].holds(v):
            shown = ",".join(map(str, values)) if isinstance(value, tuple) else v
            raise C2ALError(f"{flag} must be {RANGES[name].text()}, got {shown}")


# Fields a resumed run may change: they do not alter the steps already taken (the epoch / round
# budget may grow, patience may change when to stop, the rest is output and execution).
RESUMABLE = ("epochs", "rounds", "patience", "resume", "overwrite", "out", "quiet", "checkpoint_every", "workers", "device", "num_actors")
# Everything else changes the trajectory, so a checkpoint must agree on every one of them.
RESUME_FIELDS = tuple(f.name for f in fields(Config) if f.name not in RESUMABLE)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep the usage examples of the description as written and show defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in ("", None, ()) or isinstance(action.default, bool):
            return action.help or ""
        if isinstance(action.default, tuple):  # shown as typed on the command line
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


# --help groups: the field that opens each group, in Config's field order.
GROUPS = {"data": "data", "model": "model", "epochs": "training", "aux_cohorts": "C2AL (--aux-cohorts)",
          "federated": "federated (--federated)"}


def _add_flag(group: Any, f: Any, suppress: bool = False) -> None:
    """One Config field as one flag; with `suppress` an absent flag leaves no attribute (Config's default stays)."""
    meta = dict(f.metadata)
    flag = "--" + f.name.replace("_", "-")
    default = argparse.SUPPRESS if suppress else (f.default if f.default is not MISSING else None)
    helptext = meta.pop("help", "")
    if f.type in ("bool", bool):
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        return
    typ = meta.pop("type", None) or {"int": int, "float": float, "str": str}.get(str(f.type), str)
    group.add_argument(flag, type=typ, default=default, help=helptext, **meta)


class _Parser(argparse.ArgumentParser):
    """Flag errors become one C2ALError line naming the flag (train.py prints `error: ...`, exit 2),
    not argparse's whole usage block."""

    def error(self, message: str) -> Any:
        raise C2ALError(f"{message} (see --help)")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=_HelpFormatter)
    group: Any = p
    for f in fields(Config):
        if f.name in GROUPS:
            group = p.add_argument_group(GROUPS[f.name])
        _add_flag(group, f)
    return p


def add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str], title: str = "train.py options") -> None:
    """Add train.py's own flags for the Config fields `names` to another tool's parser
    (benchmarks reuse them instead of re-declaring); absent flags keep Config's defaults,
    see `config_from`."""
    group = parser.add_argument_group(title)
    by_name = {f.name: f for f in fields(Config)}
    for name in names:
        _add_flag(group, by_name[name], suppress=True)


def config_from(ns: argparse.Namespace, **overrides: Any) -> Config:
    """A checked Config from the flags `add_config_flags` added (those given) and `overrides`."""
    known = {f.name for f in fields(Config)}
    given = {k: v for k, v in vars(ns).items() if k in known and v is not None}  # None: a tool's own unset flag
    return Config(**{**given, **overrides}).check()


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> Config:
    ns = build_parser(description).parse_args(argv)
    return Config(**vars(ns)).check()
