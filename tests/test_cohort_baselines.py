"""The per-cohort baselines C2AL is compared with: a learned logit offset per cohort, the cohort id as a feature."""
import numpy as np
import pytest
import torch

from c2al.data.sources import load_source
from c2al.errors import C2ALError
from c2al.train.task import TrainModule

pytestmark = pytest.mark.usefixtures("one_thread")


class Zero(torch.nn.Module):
    def forward(self, dense: torch.Tensor, sparse: object) -> torch.Tensor:
        return torch.zeros(dense.shape[0], 1) + 0.0 * dense.sum()


def test_cohort_bias_adds_one_offset_per_cohort_and_none_outside():
    from c2al.data.batch import make_batch

    splits = load_source("synthetic", n_rows=2000)
    table = splits.train.with_cohorts(np.array([0, 1, -1] * (len(splits.train) // 3) + [-1] * (len(splits.train) % 3)))
    module = TrainModule(Zero(), cohort_bias=2)
    with torch.no_grad():
        module.cohort_bias.copy_(torch.tensor([0.5, -2.0]))
    _, (_, logits, _) = module(make_batch(table, splits.schema, np.arange(6)))
    assert logits.tolist() == [0.5, -2.0, 0.0, 0.5, -2.0, 0.0]


def test_cohort_bias_learns_each_cohorts_rate():
    """With a constant model, the offsets converge to each cohort's log-odds."""
    from c2al.data.batch import make_batch

    splits = load_source("synthetic", n_rows=2000)
    n = len(splits.train)
    ids = np.arange(n) % 3 - 1  # -1, 0, 1
    labels = np.where(ids == 0, np.arange(n) % 4 == 0, np.where(ids == 1, np.arange(n) % 4 != 0, np.arange(n) % 2 == 0))
    table = splits.train.with_cohorts(ids)
    table.labels = labels.astype(np.float32)
    module = TrainModule(Zero(), cohort_bias=2)
    opt = torch.optim.SGD(module.parameters(), lr=2.0)
    batch = make_batch(table, splits.schema, np.arange(n))
    for _ in range(300):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rates = torch.sigmoid(module.cohort_bias).tolist()
    assert rates == pytest.approx([labels[ids == 0].mean(), labels[ids == 1].mean()], abs=0.02)


def test_with_feature_appends_a_validated_sparse_field():
    splits = load_source("synthetic", n_rows=2000)
    ids = {s: np.arange(len(getattr(splits, s))) % 3 for s in ("train", "valid", "test")}
    more = splits.with_feature("cohort", ids, 3)
    assert more.schema.feature_names[-1] == "cohort" and len(more.schema.sparse) == len(splits.schema.sparse) + 1
    assert more.train.sparse["cohort"].first().tolist()[:4] == [0, 1, 2, 0]
    with pytest.raises(C2ALError, match="cohort"):
        splits.with_feature("cohort", ids, 2)  # id 2 is out of range
