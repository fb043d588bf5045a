"""Two-tower retrieval evaluation: recall@K / NDCG@K over the whole catalog."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from c2al.config import Config
from c2al.data.sources import load_splits
from c2al.dist.process import DistInfo
from c2al.errors import C2ALError
from c2al.eval.retrieval import retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

SMALL = "synthetic:n_rows=4000,n_users=300,n_items=60"
INFO = DistInfo(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


@pytest.fixture(scope="module")
def splits():
    return load_splits(Config(data=SMALL))


class Oracle(nn.Module):
    """Towers that score every item by a fixed per-item value: user [1], item [value of its item_id]."""

    def __init__(self, value_by_feature_id: np.ndarray) -> None:
        super().__init__()
        self.values = torch.as_tensor(value_by_feature_id, dtype=torch.float32)

    def towers(self, dense, sparse):
        ids = sparse["item_id"].values()
        return torch.ones(len(dense), 1), self.values[ids].unsqueeze(1)


def popularity_by_feature_id(splits) -> np.ndarray:
    col = splits.train.sparse["item_id"]
    counts = np.zeros(splits.schema.feature("item_id").num_embeddings)
    np.add.at(counts, col.first()[splits.train.labels > 0.5], 1.0)
    return counts


def test_popularity_towers_reproduce_the_popularity_reference(splits):
    got = retrieval_metrics(Oracle(popularity_by_feature_id(splits)), splits, INFO, ks=(5, 20))
    assert got["n_users"] > 20 and got["n_items"] >= 50
    assert got["recall@5"] == pytest.approx(got["popularity_recall@5"])
    assert got["recall@20"] == pytest.approx(got["popularity_recall@20"])
    assert 0 < got["recall@5"] <= got["recall@20"] <= 1


def test_anti_popularity_scores_worse(splits):
    pop = popularity_by_feature_id(splits)
    good = retrieval_metrics(Oracle(pop), splits, INFO, ks=(10,))
    bad = retrieval_metrics(Oracle(-pop), splits, INFO, ks=(10,))
    assert bad["recall@10"] < good["recall@10"] and bad["ndcg@10"] < good["ndcg@10"]


def test_model_without_towers_is_refused(splits):
    with pytest.raises(C2ALError, match="two-tower"):
        retrieval_metrics(nn.Linear(2, 1), splits, INFO)


def test_two_tower_report_has_retrieval_metrics(tmp_path):
    assert train.main(["--data", SMALL, "--model", "two-tower", "--two-tower-loss", "softmax", "--epochs", "1",
                       "--out", str(tmp_path), "--quiet"]) == 0
    ret = json.loads((tmp_path / "report.json").read_text())["retrieval"]
    assert set(ret) >= {"recall@10", "ndcg@10", "recall@50", "ndcg@50", "n_users", "n_items"}
    assert 0 <= ret["recall@10"] <= ret["recall@50"] <= 1


def test_valid_split_scores_valid_positives_and_filters_only_train_items(splits):
    pop = popularity_by_feature_id(splits)
    valid = retrieval_metrics(Oracle(pop), splits, INFO, ks=(10,), split="valid")
    users_with_positives = len(np.unique(splits.valid.user_ids[splits.valid.labels > 0.5]))
    assert valid["n_users"] == users_with_positives
    assert valid["recall@10"] == pytest.approx(valid["popularity_recall@10"])


def test_unknown_split_is_refused(splits):
    with pytest.raises(C2ALError, match="split must be one of"):
        retrieval_metrics(Oracle(popularity_by_feature_id(splits)), splits, INFO, split="train")
