"""Models by name: `build_model("afm", schema, embedding_dim=16)` instead of branching on a name.

A factory takes the data source's schema and keyword hyperparameters, builds
the EmbeddingBagCollection(s) the model needs and returns the model. One set of
hyperparameters can build any model: each factory receives only the keywords
its signature names, so `dropout` reaches AFM and is not offered to TwoTower.
"""
from __future__ import annotations

import inspect
from typing import Callable, TypeVar

from torch import nn

from c2al.data.schema import Schema
from c2al.errors import C2ALError
from c2al.models.afm import AFM
from c2al.models.attention_fm import AttentionFM
from c2al.models.common import make_ebc
from c2al.models.two_tower import TwoTower

ModelFactory = Callable[..., nn.Module]  # (schema, **hparams) -> model
FactoryT = TypeVar("FactoryT", bound=ModelFactory)

_FACTORIES: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator: registers a factory `(schema, **hparams) -> nn.Module` under `name`.

    Args:
        name: the model's name, as `--model` spells it.

    Returns:
        A decorator that records the factory and returns it unchanged.

    Example:
        >>> @register_model("example-fm")
        ... def _example(schema: Schema, embedding_dim: int = 8) -> nn.Module:
        ...     return AttentionFM(make_ebc(schema, embedding_dim), len(schema.dense))
        >>> "example-fm" in model_names()
        True
        >>> _ = _FACTORIES.pop("example-fm")  # keep the registry to the built-ins
    """

    def add(factory: FactoryT) -> FactoryT:
        if name in _FACTORIES:
            raise C2ALError(f"register_model: a model named {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return add


def model_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_FACTORIES)


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
    if name not in _FACTORIES:
        raise C2ALError(f"build_model: unknown model {name!r}; registered: {', '.join(_FACTORIES)}")
    known = set().union(*(_keywords(f) for f in _FACTORIES.values()))
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise C2ALError(f"build_model: no registered model takes {unknown}; they take {sorted(known)}")
    factory = _FACTORIES[name]
    return factory(schema, **{k: v for k, v in hparams.items() if k in _keywords(factory)})


# Built-ins. Each builds its main EBC before anything else, so a seeded build
# draws the same initial weights in the same order whichever way it is called.


@register_model("afm")
def _afm(schema: Schema, embedding_dim: int = 16, attention_dim: int = 16, dropout: float = 0.0) -> AFM:
    ebc = make_ebc(schema, embedding_dim)
    linear = make_ebc(schema, 4, prefix="w_")  # Xiao's per-id first-order weights (rows of 4 for FBGEMM)
    return AFM(ebc, len(schema.dense), attention_dim=attention_dim, dropout=dropout, first_order_ebc=linear)


@register_model("attention-fm")
def _attention_fm(schema: Schema, embedding_dim: int = 16, attention_dim: int = 16) -> AttentionFM:
    # One knob for "attention size" across models: AFM's MLP width is AttentionFM's rank K'.
    return AttentionFM(make_ebc(schema, embedding_dim), len(schema.dense), rank=attention_dim)


@register_model("two-tower")
def _two_tower(schema: Schema, embedding_dim: int = 16) -> TwoTower:
    if not schema.user_features or not schema.item_features:
        raise C2ALError(
            f"two-tower needs user-side and item-side sparse features; {schema.name!r} has "
            f"user {schema.user_features} and item {schema.item_features} (tabular data: pass --user-col and --item-col)"
        )
    ebc = make_ebc(schema, embedding_dim)
    return TwoTower(ebc, schema.user_features, schema.item_features, dense_in_features=len(schema.dense))


MODEL_NAMES: tuple[str, ...] = model_names()  # the built-ins; `Config.MODELS` lists the same
