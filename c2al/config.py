"""One config dataclass per run; the command line is generated from its fields.

The config is printed at start and saved inside every checkpoint and report,
so a result file always says what made it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Sequence

from c2al.errors import C2ALError

MODELS = ("afm", "attention-fm", "two-tower")
# Optimizer and sharding names, once: c2al.dist.sharding maps them to classes.
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")  # adam only on CUDA (FBGEMM's CPU kernels)
SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "data_parallel")


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


def _list(help: str, parse: Any, default: tuple) -> Any:
    """A tuple-valued field: `parse` turns the flag's text into the tuple once."""
    return field(default=default, metadata={"help": help, "type": parse})


@dataclass
class Config:
    """Everything that defines a run of train.py."""

    # data
    data: str = _opt("movielens-100k (embedded default), movielens-1m, synthetic, a MovieLens directory, or a CSV/Parquet PATH", default="movielens-100k")
    label: str = _opt("tabular data: the 0/1 label column", default="")
    sparse: tuple[str, ...] = _list("tabular data: comma-separated categorical columns", _names, ())
    dense: tuple[str, ...] = _list("tabular data: comma-separated numeric columns", _names, ())
    user_col: str = _opt("tabular data: the user id column", default="")
    item_col: str = _opt("tabular data: the item id column (two-tower)", default="")
    time_col: str = _opt("tabular data: timestamp column; splits by time per user when given with --user-col", default="")
    cohort_features: tuple[str, ...] = _list("comma-separated columns the cohort miner clusters on (default: the source's user-side features)", _names, ())
    valid_frac: float = _opt("share of each user's (latest) rows held out for validation", default=0.1)
    test_frac: float = _opt("share of each user's latest rows held out for test", default=0.1)
    # model
    model: str = _opt(f"model: {', '.join(MODELS)}", default="afm", choices=MODELS)
    embedding_dim: int = _opt("embedding dimension D of every table", default=16)
    attention_dim: int = _opt("AFM attention MLP width / AttentionFM rank K'", default=16)
    dropout: float = _opt("AFM dropout on the pairwise products", default=0.2)
    two_tower_loss: str = _opt("two-tower training loss: bce (pointwise, for NE) or softmax (in-batch, for recall@K)", default="bce", choices=("bce", "softmax"))
    # training
    epochs: int = _opt("passes over the training split", default=4)
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
    resume: bool = _opt("resume from OUT/checkpoint.pt if it exists", default=False)
    out: str = _opt("output directory (default runs/<data>-<model>-seed<seed>)", default="")
    quiet: bool = _opt("no progress bars", default=False)
    # C2AL
    aux_cohorts: int = _opt("run C2AL with K auxiliary cohorts (baseline, mining, C2AL, comparison); bare flag means K=2", default=0, nargs="?", const=2)
    aux_weight: tuple[float, ...] = _list("lambda of the auxiliary losses: one float or K comma-separated floats", _numbers(float), (0.1,))
    aux_head: str = _opt("auxiliary head: clone (the model's own output head, fresh weights), mlp or linear", default="clone", choices=("clone", "mlp", "linear"))
    cohort_candidates: str = _opt("miner candidates: kmeans, gmm, axes, kmeans+axes", default="kmeans")
    n_clusters: int = _opt("clusters the miner proposes as candidates", default=16)
    divergence: str = _opt("miner contrast: js, kl or wasserstein", default="js", choices=("js", "kl", "wasserstein"))
    min_share: float = _opt("smallest traffic share of an exposed cohort", default=0.02)
    max_share: float = _opt("largest traffic share of an exposed cohort", default=0.2)
    cohorts: str = _opt("reuse a saved cohort miner (directory or .json written by a previous run)", default="")
    # federated
    federated: bool = _opt("cross-device federated training: each user is a client (with --aux-cohorts: federated C2AL)", default=False)
    engine: str = _opt("federated engine: simulation (in-process; sequential, or forked --workers) or flower (Flower ClientApp/ServerApp on Ray; pip install .[flower])", default="simulation", choices=("simulation", "flower"))
    rounds: int = _opt("federated rounds (per phase with --aux-cohorts)", default=30)
    clients_per_round: int = _opt("clients sampled per round (among the available ones)", default=50)
    local_epochs: int = _opt("local passes over a client's rows per round (capped by its tier's step budget)", default=1)
    local_batch_size: int = _opt("client batch size", default=32)
    server_optimizer: str = _opt("server strategy: fedavg, fedprox or fedadam", default="fedavg", choices=("fedavg", "fedprox", "fedadam"))
    server_lr: float = _opt("server learning rate (0: 1.0 for fedavg/fedprox, 0.01 for fedadam)", default=0.0)
    proximal_mu: float = _opt("FedProx proximal term mu", default=0.01)
    sam_rho: float = _opt("local sharpness-aware minimization radius (FedRecGEL); 0 disables", default=0.0)
    two_tower_hinge: bool = _opt("federated two-tower: batch-insensitive squared hinge + spread-out loss (Ning et al. 2021) instead of --two-tower-loss", default=False)
    tiers: str = _opt("device tiers: none, independent of the data, or correlated with --tier-feature (RF^2)", default="correlated", choices=("none", "independent", "correlated"))
    tier_feature: str = _opt("user feature tiers correlate with (default: the first numeric cohort feature, else activity)", default="")
    tier_skew: float = _opt("correlated tiers: Dirichlet concentration toward the group's own tier", default=5.0)
    tier_shares: tuple[float, float, float] = _list("low,mid,high population shares (independent tiers)", _numbers(float, 3), (0.3, 0.4, 0.3))
    tier_availability: tuple[float, float, float] = _list("low,mid,high probability of being available in a round", _numbers(float, 3), (0.5, 0.8, 0.95))
    tier_dropout: tuple[float, float, float] = _list("low,mid,high probability of dropping out mid-round", _numbers(float, 3), (0.15, 0.05, 0.02))
    tier_steps: tuple[int, int, int] = _list("low,mid,high local step budget per round (0: uncapped)", _numbers(int, 3), (2, 5, 10))
    kmeans_iters: int = _opt("federated k-means (Lloyd) rounds of cohort mining", default=50)
    workers: int = _opt("simulation engine: run each round's clients over this many forked processes (0: sequential)", default=0)
    aggregation: str = _opt("how the server combines client updates, dense parameters and shared table rows alike (a row over the clients that sent it; "
                            "private user rows never leave the client): mean (FedAvg); median or trimmed-mean (per coordinate, one client one vote, "
                            "Flower's functions); norm-clip (each client's whole update clipped to --clip-norm, then the mean); krum (Flower's "
                            "Multi-Krum keeps the updates closest to their neighbours, then their mean). Every rule weighs a client's reported "
                            "example count at most --count-cap x the round's median count and, when every tier has a step budget, at most "
                            "the largest budget's examples (max --tier-steps x --local-batch-size)", default="mean", choices=("mean", "median", "trimmed-mean", "norm-clip", "krum"))
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
        """lambda per cohort: one value broadcast to K, or exactly K values."""
        w = [float(v) for v in self.aux_weight]
        k = self.aux_cohorts
        if len(w) == 1:
            return w * max(k, 1)
        if len(w) != k:
            raise C2ALError(f"--aux-weight has {len(w)} values but --aux-cohorts is {k}")
        return w

    def check(self) -> "Config":
        if self.batch_size <= 0 or self.epochs <= 0 or self.embedding_dim <= 0:
            raise C2ALError("--batch-size, --epochs and --embedding-dim must be positive")
        if not 0 < self.valid_frac + self.test_frac < 1:
            raise C2ALError("--valid-frac + --test-frac must lie in (0, 1)")
        if self.aux_cohorts < 0:
            raise C2ALError("--aux-cohorts must be >= 1 (or absent)")
        if self.aux_cohorts:
            self.aux_weights()
        return self


# Fields that change parameter shapes or data: a checkpoint must agree on them.
SHAPE_FIELDS = ("data", "label", "sparse", "dense", "user_col", "item_col", "model", "embedding_dim", "attention_dim")


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
    given = {k: v for k, v in vars(ns).items() if k in known}
    return Config(**{**given, **overrides}).check()


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> Config:
    ns = build_parser(description).parse_args(argv)
    return Config(**vars(ns)).check()
