"""Training on a stream: one pass, validation every N steps, progressive validation, early stopping and
best-weight restore inside the pass, resume mid-stream at the same row, lanes in lockstep."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from c2al.config import Config
from c2al.data.schema import Splits
from c2al.data.stream import TableStream
from c2al.data.synthetic import SyntheticConfig, make_synthetic_splits
from c2al.dist.process import init_distributed
from c2al.eval.metrics import summarize
from c2al.train.build import seeded_model
from c2al.train.loop import fit
from c2al.train.task import predict

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 128


@pytest.fixture
def info():
    """A one-member process group (DMP shards and fuses table updates as in train.py); train.main tears its group
    down, so each test joins or creates one again."""
    return init_distributed("cpu")


@pytest.fixture(scope="module")
def streamed() -> Splits:
    """6,000 synthetic rows: the train split read as a stream of 700-row units (chunks do not align with batches)."""
    s = make_synthetic_splits(SyntheticConfig(n_rows=7500, seed=3))
    return dataclasses.replace(s, train=TableStream(s.train, s.schema, unit_rows=700))


def config(**kw) -> Config:
    return Config(**{"data": "synthetic", "batch_size": BATCH, "quiet": True, "eval_every": 10, "patience": 0, **kw})


def test_one_pass_trains_every_full_batch_once(info, streamed: Splits) -> None:
    cfg = config()
    trained = fit(cfg, streamed, seeded_model(cfg, streamed.schema), info)
    steps = streamed.train.rows // BATCH
    assert [h["step"] for h in trained.history] == [*range(10, steps, 10), steps]
    assert trained.history[-1]["epoch"] == 1
    assert trained.history[-1]["rows_seen"] == steps * BATCH


def test_progressive_ne_is_the_loss_before_each_update(info, streamed: Splits) -> None:
    """Progressive NE over the pass = mean BCE of each batch under the weights before its update / the rows' entropy."""
    cfg = config(dropout=0.0, eval_every=1000)
    trained = fit(cfg, streamed, seeded_model(cfg, streamed.schema), info)
    h = trained.history[-1]
    steps = streamed.train.rows // BATCH
    labels = streamed.train.table.labels[: steps * BATCH]
    p = labels.mean()
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert h["progressive_ne"] == pytest.approx(h["loss"] / entropy, rel=1e-6)
    assert 0.5 < h["progressive_ne"] < 1.2


def test_early_stopping_inside_the_pass_keeps_the_best_evaluation(info, streamed: Splits) -> None:
    """Large learning rates overfit within the pass; the kept weights score the best evaluation's NE."""
    cfg = config(patience=2, eval_every=5, lr=0.05, table_lr=0.8, dropout=0.0)
    trained = fit(cfg, streamed, seeded_model(cfg, streamed.schema), info)
    best = trained.best
    assert best["valid_ne"] == min(h["valid_ne"] for h in trained.history)
    if trained.history[-1]["step"] < streamed.train.rows // BATCH:  # stopped inside the pass
        assert len(trained.history) - 1 - [h["step"] for h in trained.history].index(best["step"]) == 2
    now = summarize(predict(trained.module, streamed.valid, streamed.schema, BATCH), streamed.valid.labels)["ne"]
    assert now == pytest.approx(best["valid_ne"], rel=1e-9)


def test_resume_mid_stream_continues_at_the_same_row(info, streamed: Splits, tmp_path, crash_training) -> None:
    """A crash after step 17 (checkpoint at 15) and a resume: the same evaluations and final weights as a straight pass."""
    cfg = config(checkpoint_every=5)
    straight = fit(cfg, streamed, seeded_model(cfg, streamed.schema), info, checkpoint=tmp_path / "a.pt")
    undo = crash_training(17)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, streamed, seeded_model(cfg, streamed.schema), info, checkpoint=tmp_path / "b.pt")
    undo()
    resumed = fit(dataclasses.replace(cfg, resume=True), streamed, seeded_model(cfg, streamed.schema), info,
                  checkpoint=tmp_path / "b.pt")
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    for key in ("valid_ne", "loss", "progressive_ne", "rows_seen"):
        assert [h[key] for h in resumed.history] == pytest.approx([h[key] for h in straight.history], rel=1e-9), key
    scores = [predict(t.module, streamed.test, streamed.schema, BATCH) for t in (straight, resumed)]
    np.testing.assert_array_equal(scores[0], scores[1])


def test_a_stream_shorter_than_one_batch_is_refused(info, streamed: Splits) -> None:
    from c2al.errors import C2ALError

    tiny = dataclasses.replace(streamed, train=TableStream(streamed.train.table.take(np.arange(50)), streamed.schema))
    cfg = config()
    with pytest.raises(C2ALError, match="fewer rows than one --batch-size"):
        fit(cfg, tiny, seeded_model(cfg, tiny.schema), info)
