"""models.registry's ModelSpec: what the loops, reports and checks ask of a model instead of its name."""
from __future__ import annotations

from typing import Iterator

import pytest
from torch import nn

from c2al.config import Config
from c2al.data.schema import Schema, SparseFeature
from c2al.dist.process import LOCAL_CPU
from c2al.errors import C2ALError
from c2al.eval.compare import attention_report
from c2al.jobs.preflight import _check_stream, check_model
from c2al.models import AttentionFM, make_ebc, registry
from c2al.train.loop import candidate_log_q, train_module
from c2al.train.task import HingeTrainModule, TrainModule

SCHEMA = Schema(sparse=(SparseFeature("user", 6, "user"), SparseFeature("item", 9, "item")), name="tiny")


@pytest.fixture
def new_model() -> Iterator[str]:
    """A model registered with nothing but its factory, as a user adds one; removed again afterwards."""

    @registry.register_model("test-plain")
    def _plain(schema: Schema, embedding_dim: int = 4) -> nn.Module:
        return AttentionFM(make_ebc(schema, embedding_dim), len(schema.dense))

    try:
        yield "test-plain"
    finally:
        del registry._SPECS["test-plain"]


def test_a_newly_registered_model_gets_the_pointwise_defaults(new_model: str) -> None:
    """Registration alone decides: BCE, judged by NE, no logQ, no retrieval or attention report, every check passes."""
    spec = registry.model_spec(new_model)
    # the two-tower's loss flags are ignored by a model whose entry does not read them
    cfg = Config(model=new_model, two_tower_loss="softmax", two_tower_logq=True)
    assert (spec.loss(cfg), spec.criterion(cfg), spec.log_q(cfg), spec.retrieval, spec.attention) == ("bce", "ne", False, False, False)
    module = train_module(cfg, registry.build_model(new_model, SCHEMA))
    assert type(module) is TrainModule and module.loss_kind == "bce" and module.item_log_q is None
    assert candidate_log_q(cfg, splits=None) is None  # not even read
    assert attention_report(nn.Linear(1, 1), nn.Linear(1, 1), None, cfg, LOCAL_CPU) == {}
    for ok in (cfg, Config(model=new_model, objective="cvar"), Config(model=new_model, aux_cohorts=2, aux_towers="mmoe"),
               Config(model=new_model, federated=True, engine="flower", two_tower_loss="softmax")):
        check_model(ok)
    _check_stream(Config(model=new_model, data="criteo:x"), splits=None)  # a stream is fine for a pointwise model


@pytest.mark.parametrize("flags, loss, criterion, log_q", [
    (dict(), "bce", "ne", False),
    (dict(two_tower_loss="softmax"), "softmax", "recall@10", True),
    (dict(two_tower_loss="softmax", two_tower_logq=False), "softmax", "recall@10", False),
    (dict(two_tower_hinge=True, federated=True), "hinge", "recall@10", False),
])
def test_the_two_tower_entry_says_its_loss_and_what_validation_judges(flags: dict, loss: str, criterion: str, log_q: bool) -> None:
    spec, cfg = registry.model_spec("two-tower"), Config(model="two-tower", **flags)
    assert (spec.loss(cfg), spec.criterion(cfg), spec.log_q(cfg)) == (loss, criterion, log_q)
    module = train_module(cfg, registry.build_model("two-tower", SCHEMA))
    assert isinstance(module, HingeTrainModule) == (loss == "hinge") and module.loss_kind == ("bce" if loss == "bce" else "softmax")


def test_ranking_models_report_attention_and_the_two_tower_retrieval() -> None:
    assert [(n, registry.model_spec(n).attention, registry.model_spec(n).retrieval) for n in registry.MODEL_NAMES] == [
        ("afm", True, False), ("attention-fm", True, False), ("two-tower", False, True)]


def test_an_unknown_model_has_no_spec() -> None:
    with pytest.raises(C2ALError, match=r"unknown model 'nope'; registered: afm, attention-fm, two-tower"):
        registry.model_spec("nope")


@pytest.mark.parametrize("flags, message", [
    (dict(model="afm", federated=True, two_tower_hinge=True), r"--two-tower-hinge needs a retrieval model \(--model two-tower\), not afm"),
    (dict(model="two-tower", federated=True, engine="flower", two_tower_hinge=True),
     "--patience on validation recall@10 needs --engine simulation"),
    (dict(model="two-tower", two_tower_loss="softmax", objective="cvar"), "not with --two-tower-loss softmax"),
    (dict(model="two-tower", aux_cohorts=2, aux_towers="mmoe"), "--model two-tower's retrieval scores u . v would bypass the experts"),
])
def test_flags_the_model_cannot_honour_are_refused_naming_them(flags: dict, message: str) -> None:
    cfg = Config(**flags).check()  # the config alone does not know the models
    with pytest.raises(C2ALError, match=message):
        check_model(cfg)


def test_a_stream_is_refused_for_a_retrieval_model_naming_the_others() -> None:
    with pytest.raises(C2ALError, match=r"--model two-tower needs an in-memory source; 'criteo:x' streams \(use afm or attention-fm\)"):
        _check_stream(Config(model="two-tower", data="criteo:x"), splits=None)
