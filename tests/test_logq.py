"""The logQ popularity correction of the two-tower in-batch softmax (Yi et al. 2019)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import c2al.train.task as task
from c2al.config import Config
from c2al.data.sources import load_splits
from c2al.errors import C2ALError
from c2al.losses import in_batch_softmax_loss
from c2al.train.loop import candidate_log_q

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

SMALL = "synthetic:n_rows=2000,n_users=100,n_items=40"


def test_logq_corrected_loss_equals_hand_computed_3x3() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    labels = torch.tensor([1.0, 0.0, 1.0])
    q_share = [0.5, 0.25, 0.25]  # candidate 0 is drawn twice as often as the others
    # Raw dot products q @ c^T: row 0 = [2, 0, 1], row 2 = [2, 1, 0]; column j loses log Q_j.
    row0 = [2 - math.log(0.5), 0 - math.log(0.25), 1 - math.log(0.25)]
    row2 = [2 - math.log(0.5), 1 - math.log(0.25), 0 - math.log(0.25)]
    expected = (-row0[0] + math.log(sum(map(math.exp, row0))) - row2[2] + math.log(sum(map(math.exp, row2)))) / 2
    loss = in_batch_softmax_loss(q, c, labels, temperature=1.0, normalize=False, log_q=torch.log(torch.tensor(q_share)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_uniform_logq_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    q, c = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(in_batch_softmax_loss(q, c, labels, log_q=torch.full((5,), math.log(0.2))),
                               in_batch_softmax_loss(q, c, labels))


def test_logq_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(C2ALError, match=r"log_q has shape \(2,\), expected \(3,\)"):
        in_batch_softmax_loss(torch.randn(3, 2), torch.randn(3, 2), torch.ones(3), log_q=torch.zeros(2))


def test_candidate_log_q_is_each_item_ids_share_of_the_training_rows() -> None:
    cfg = Config(data=SMALL, model="two-tower", two_tower_loss="softmax", two_tower_logq=True)
    splits = load_splits(cfg)
    name, log_q = candidate_log_q(cfg, splits)
    ids = splits.train.sparse[name].first()
    assert name == "item_id" and log_q.shape == (splits.schema.feature(name).num_embeddings,)
    some = int(ids[0])
    assert float(log_q[some]) == pytest.approx(math.log((ids == some).sum() / len(ids)), rel=1e-6)
    assert candidate_log_q(Config(data=SMALL, model="two-tower", two_tower_loss="bce", two_tower_logq=True), splits) is None


@pytest.mark.parametrize("flag", ["--two-tower-logq", "--no-two-tower-logq"])
def test_the_flag_reaches_the_loss(tmp_path, monkeypatch, flag) -> None:
    seen: list[torch.Tensor | None] = []

    def spy(*args, log_q=None, **kw):
        seen.append(log_q)
        return in_batch_softmax_loss(*args, log_q=log_q, **kw)

    monkeypatch.setattr(task, "in_batch_softmax_loss", spy)
    assert train.main(["--data", SMALL, "--model", "two-tower", "--two-tower-loss", "softmax", flag, "--epochs", "1",
                       "--batch-size", "256", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen
    if flag == "--no-two-tower-logq":
        assert all(v is None for v in seen)
    else:
        assert all(v is not None and v.shape == (256,) and bool((v < 0).all()) for v in seen)
        assert len(np.unique(seen[0].numpy())) > 1  # per item, not one constant


def test_softmax_two_tower_keeps_the_epoch_of_best_validation_recall(tmp_path) -> None:
    assert train.main(["--data", SMALL, "--model", "two-tower", "--two-tower-loss", "softmax", "--epochs", "3", "--patience", "5",
                       "--batch-size", "256", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    recalls = [h["valid_recall@10"] for h in report["history"]]
    assert len(recalls) == 3
    assert report["best"]["epoch"] == report["history"][int(np.argmax(recalls))]["epoch"]
    assert report["best"]["valid_recall@10"] == max(recalls)
