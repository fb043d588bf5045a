"""From a config and a schema to a model and its train module."""
from __future__ import annotations

import torch
from torch import nn

from c2al.config import Config
from c2al.data.schema import Schema
from c2al.errors import C2ALError


def build_model(cfg: Config, schema: Schema) -> nn.Module:
    """The model named by `cfg.model`, over a fresh EmbeddingBagCollection (seeded by the caller).

    Args:
        cfg: the run's config; `model`, `embedding_dim`, `attention_dim` and `dropout` are read.
        schema: the data source's fields.

    Returns:
        The model from `c2al.models.registry`, on CPU.
    """
    from c2al.models import registry

    if cfg.model not in registry.model_names():
        raise C2ALError(f"unknown --model {cfg.model!r}")
    return registry.build_model(
        cfg.model, schema, embedding_dim=cfg.embedding_dim, attention_dim=cfg.attention_dim, dropout=cfg.dropout
    )


def seeded_model(cfg: Config, schema: Schema, seed: int | None = None) -> nn.Module:
    """Same seed, same initial weights: baseline and C2AL start from one point."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    return build_model(cfg, schema)
