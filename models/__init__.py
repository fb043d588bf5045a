"""Models over injected TorchRec EmbeddingBagCollections (installed as c2al.models).

Every model is split into named `*Arch` parts (TorchRec `models/dlrm.py` style),
takes `forward(dense_features, sparse_features)` and returns [B] logits. The
shared representation that C2AL's auxiliary heads read is the output of the
submodule named by `SHARED_AT` ("inter_arch"); its width is
`model.inter_arch.out_features`. AFM and AttentionFM share their field setup
(`FieldArch`); `build_model(name, schema, **hparams)` builds any registered model by name and
`model_spec(name)` says what the code around it asks of it (its loss, what validation judges it by).
"""
from c2al.models.afm import AFM, AFMInteractionArch
from c2al.models.attention_fm import AttentionFM, AttentionFMInteractionArch
from c2al.models.common import MLP, DenseArch, SparseArch, make_ebc, table_name
from c2al.models.fields import FieldArch
from c2al.models.registry import MODEL_NAMES, ModelSpec, build_model, model_names, model_spec, register_model
from c2al.models.two_tower import DotInteractionArch, SumOverArch, TowerArch, TwoTower

SHARED_AT = "inter_arch"

__all__ = [
    "AFM",
    "AFMInteractionArch",
    "AttentionFM",
    "AttentionFMInteractionArch",
    "DenseArch",
    "DotInteractionArch",
    "FieldArch",
    "MLP",
    "MODEL_NAMES",
    "ModelSpec",
    "SHARED_AT",
    "SparseArch",
    "SumOverArch",
    "TowerArch",
    "TwoTower",
    "build_model",
    "make_ebc",
    "model_names",
    "model_spec",
    "register_model",
    "table_name",
]
