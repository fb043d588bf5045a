"""Models by name: `build_model("afm", schema, embedding_dim=16)` instead of branching on a name.

A factory takes the data source's schema and keyword hyperparameters, builds
the EmbeddingBagCollection(s) the model needs and returns the model. One set of
hyperparameters can build any model: each factory receives only the keywords
its signature names, so `dropout` reaches AFM and is not offered to TwoTower.

Each registered model also has a `ModelSpec`: what the code around it asks of it
(its training loss under a Config, what validation judges it by, what it predicts
beside click probabilities, whether it has attention weights to report), so the
loops, the reports and the checks ask `model_spec(cfg.model)` instead of comparing
names. A model registered with no spec arguments gets the defaults: pointwise BCE,
judged by validation NE, no retrieval or attention report.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, TypeVar

from torch import nn

from c2al.config import Config
from c2al.data.schema import Schema
from c2al.errors import C2ALError
from c2al.models.afm import AFM
from c2al.models.attention_fm import AttentionFM
from c2al.models.common import make_ebc
from c2al.models.two_tower import TwoTower

ModelFactory = Callable[..., nn.Module]  # (schema, **hparams) -> model
FactoryT = TypeVar("FactoryT", bound=ModelFactory)
LossRule = Callable[[Config], str]  # Config -> the training loss's name

# Losses whose scores rank items but are no calibrated logits: validation judges them by recall@10, not NE.
RANKING_LOSSES = ("softmax", "hinge")


def pointwise(cfg: Config) -> str:
    """The default training loss: BCE on the model's logits, whatever the config."""
    return "bce"


@dataclass(frozen=True)
class ModelSpec:
    """What the code around a registered model asks of it (see the module docstring).

    Attributes:
        factory: (schema, **hparams) -> the model.
        loss: Config -> its training loss: "bce" (pointwise), "softmax" (in-batch sampled softmax over
            `towers()`) or "hinge" (the batch-insensitive squared hinge + spread-out, federated).
        retrieval: it predicts, beside click probabilities, user and item vectors whose dot product ranks the
            catalog (`towers(dense, sparse)` -> (query, candidate)): its reports add recall@K / NDCG@K, it trains
            in memory only (the logQ correction and the retrieval metrics read the whole train split) and its
            served score bypasses any experts mixed into the shared representation (no --aux-towers mmoe).
        attention: it has `attention_weights(dense, sparse)`, which the attention-activity report reads.
    """

    factory: ModelFactory
    loss: LossRule = pointwise
    retrieval: bool = False
    attention: bool = False

    def criterion(self, cfg: Config) -> str:
        """What validation judges it by under `cfg`: "ne", or "recall@10" for a ranking loss (RANKING_LOSSES)."""
        return "recall@10" if self.loss(cfg) in RANKING_LOSSES else "ne"

    def log_q(self, cfg: Config) -> bool:
        """Whether its in-batch softmax takes the logQ correction (--two-tower-logq)."""
        return self.loss(cfg) == "softmax" and bool(cfg.two_tower_logq)


_SPECS: dict[str, ModelSpec] = {}


def register_model(name: str, *, loss: LossRule = pointwise, retrieval: bool = False,
                   attention: bool = False) -> Callable[[FactoryT], FactoryT]:
    """Decorator: registers a factory `(schema, **hparams) -> nn.Module` under `name`, with its ModelSpec.

    Args:
        name: the model's name, as `--model` spells it.
        loss, retrieval, attention: the ModelSpec's fields; the defaults suit a pointwise ranking model.

    Returns:
        A decorator that records the factory and returns it unchanged.

    Example:
        >>> @register_model("example-fm")
        ... def _example(schema: Schema, embedding_dim: int = 8) -> nn.Module:
        ...     return AttentionFM(make_ebc(schema, embedding_dim), len(schema.dense))
        >>> "example-fm" in model_names(), model_spec("example-fm").loss(None)
        (True, 'bce')
        >>> _ = _SPECS.pop("example-fm")  # keep the registry to the built-ins
    """

    def add(factory: FactoryT) -> FactoryT:
        if name in _SPECS:
            raise C2ALError(f"register_model: a model named {name!r} is already registered")
        _SPECS[name] = ModelSpec(factory, loss=loss, retrieval=retrieval, attention=attention)
        return factory

    return add


def model_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_SPECS)


def model_spec(name: str) -> ModelSpec:
    """The ModelSpec registered as `name` (a C2ALError naming the registered ones otherwise).

    Example:
        >>> model_spec("afm").retrieval, model_spec("two-tower").retrieval
        (False, True)
    """
    if name not in _SPECS:
        raise C2ALError(f"unknown model {name!r}; registered: {', '.join(_SPECS)}")
    return _SPECS[name]


def _keywords(factory: ModelFactory) -> set[str]:
    """The hyperparameters a factory names (everything after the schema)."""
    return set(list(inspect.signature(factory).parameters)[1:])


def build_model(name: str, schema: Schema, **hparams: object) -> nn.Module:
    """The model registered as `name`, over fresh tables (seed the global RNG first for fixed weights).

    Args:
        name: a registered name (see `model_names()`).
        schema: the data source's fields.
        **hparams: hyperparameters; each factory receives those its signature names.
            A keyword that no registered model takes is an error (a typo, not an option).

    Returns:
        The model, on CPU.

    Example:
        >>> from c2al.data.schema import Schema, SparseFeature
        >>> schema = Schema(sparse=(SparseFeature("user", 10, "user"), SparseFeature("item", 20, "item")))
        >>> type(build_model("two-tower", schema, embedding_dim=8, dropout=0.1)).__name__
        'TwoTower'
    """
    if name not in _SPECS:
        raise C2ALError(f"build_model: unknown model {name!r}; registered: {', '.join(_SPECS)}")
    known = set().union(*(_keywords(s.factory) for s in _SPECS.values()))
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise C2ALError(f"build_model: no registered model takes {unknown}; they take {sorted(known)}")
    factory = _SPECS[name].factory
    return factory(schema, **{k: v for k, v in hparams.items() if k in _keywords(factory)})


# Built-ins. Each builds its main EBC before anything else, so a seeded build
# draws the same initial weights in the same order whichever way it is called.


@register_model("afm", attention=True)
def _afm(schema: Schema, embedding_dim: int = 16, attention_dim: int = 16, dropout: float = 0.0) -> AFM:
    ebc = make_ebc(schema, embedding_dim)
    linear = make_ebc(schema, 4, prefix="w_")  # Xiao's per-id first-order weights (rows of 4 for FBGEMM)
    return AFM(ebc, len(schema.dense), attention_dim=attention_dim, dropout=dropout, first_order_ebc=linear)


@register_model("attention-fm", attention=True)
def _attention_fm(schema: Schema, embedding_dim: int = 16, attention_dim: int = 16) -> AttentionFM:
    # One knob for "attention size" across models: AFM's MLP width is AttentionFM's rank K'.
    return AttentionFM(make_ebc(schema, embedding_dim), len(schema.dense), rank=attention_dim)


def _two_tower_loss(cfg: Config) -> str:
    """--two-tower-hinge (federated), else --two-tower-loss: bce (pointwise, judged by NE) or softmax (in-batch)."""
    return "hinge" if cfg.two_tower_hinge else cfg.two_tower_loss


@register_model("two-tower", loss=_two_tower_loss, retrieval=True)
def _two_tower(schema: Schema, embedding_dim: int = 16) -> TwoTower:
    if not schema.user_features or not schema.item_features:
        raise C2ALError(
            f"two-tower needs user-side and item-side sparse features; {schema.name!r} has "
            f"user {schema.user_features} and item {schema.item_features} (tabular data: pass --user-col and --item-col)"
        )
    ebc = make_ebc(schema, embedding_dim)
    return TwoTower(ebc, schema.user_features, schema.item_features, dense_in_features=len(schema.dense))


MODEL_NAMES: tuple[str, ...] = model_names()  # the built-ins; `Config.MODELS` lists the same
