"""From a config and a schema to a model and its train module."""
from __future__ import annotations

import torch
from torch import nn

from c2al.config import Config
from c2al.data.schema import Schema
from c2al.errors import C2ALError


def build_model(cfg: Config, schema: Schema) -> nn.Module:
    """The model named by `cfg.model`, over a fresh EmbeddingBagCollection (seeded by the caller)."""
    from c2al.models import AFM, AttentionFM, TwoTower
    from c2al.models.common import make_ebc

    ebc = make_ebc(schema, cfg.embedding_dim, device="cpu")
    n_dense = len(schema.dense)
    if cfg.model == "afm":
        linear = make_ebc(schema, 4, device="cpu", prefix="w_")  # Xiao's per-id first-order weights
        return AFM(ebc, dense_in_features=n_dense, attention_dim=cfg.attention_dim, dropout=cfg.dropout, first_order_ebc=linear)
    if cfg.model == "attention-fm":
        return AttentionFM(ebc, dense_in_features=n_dense, rank=cfg.attention_dim)
    if cfg.model == "two-tower":
        if not schema.user_features or not schema.item_features:
            raise C2ALError(
                f"two-tower needs user-side and item-side sparse features; {schema.name!r} has "
                f"user {schema.user_features} and item {schema.item_features} (tabular data: pass --user-col and --item-col)"
            )
        return TwoTower(ebc, user_features=schema.user_features, item_features=schema.item_features, dense_in_features=n_dense)
    raise C2ALError(f"unknown --model {cfg.model!r}")


def seeded_model(cfg: Config, schema: Schema, seed: int | None = None) -> nn.Module:
    """Same seed, same initial weights: baseline and C2AL start from one point."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    return build_model(cfg, schema)
