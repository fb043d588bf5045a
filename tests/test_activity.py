"""Attention-activity scalars on hand-made tensors, and on the two attention models."""
from __future__ import annotations

import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.data.schema import Schema, SparseFeature
from c2al.errors import C2ALError
from c2al.eval.activity import attention_activity, attention_entropy, dead_relu_share, effective_rank, near_zero_share
from c2al.models import AFM, AttentionFM, TwoTower, make_ebc


def test_uniform_attention_has_entropy_one() -> None:
    assert attention_entropy(torch.full((5, 8), 1 / 8)) == pytest.approx(1.0, abs=1e-12)


def test_one_hot_attention_has_entropy_zero() -> None:
    assert attention_entropy(torch.eye(6)) == 0.0


def test_entropy_averages_rows_along_the_given_dim() -> None:
    # Y [B=1, F=2, K=2]: column 0 uniform over the fields (1), column 1 one-hot (0).
    y = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    assert attention_entropy(y, dim=1) == pytest.approx(0.5, abs=1e-12)


def test_entropy_of_a_single_option_is_zero() -> None:
    assert attention_entropy(torch.ones(3, 1)) == 0.0


def test_near_zero_share_counts_weights_under_one_percent_of_uniform() -> None:
    # n = 4 options, default threshold 0.0025: 0.001 and 0.0 are below, 0.0025 is not.
    w = torch.tensor([[0.001, 0.0, 0.0025, 0.9965], [0.25, 0.25, 0.25, 0.25]])
    assert near_zero_share(w) == 2 / 8


def test_near_zero_share_uses_the_given_threshold_and_dim() -> None:
    y = torch.tensor([[[0.1, 0.6], [0.9, 0.4]]])  # columns sum to 1 over dim 1
    assert near_zero_share(y, threshold=0.5, dim=1) == 2 / 4


def test_effective_rank_of_rank_one_matrix_is_one() -> None:
    y = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 2.0, 1.0])).unsqueeze(0)
    assert effective_rank(y) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_of_identity_is_k() -> None:
    assert effective_rank(torch.eye(5).expand(3, 5, 5)) == pytest.approx(5.0, abs=1e-9)


def test_effective_rank_averages_over_samples() -> None:
    y = torch.stack([torch.eye(4), torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0]))])
    assert effective_rank(y) == pytest.approx((4.0 + 1.0) / 2, abs=1e-9)


def test_effective_rank_of_equal_singular_values_is_exp_of_log_count() -> None:
    y = torch.diag(torch.tensor([2.0, 2.0, 0.0]))  # two equal singular values: p = (1/2, 1/2, 0)
    assert effective_rank(y) == pytest.approx(math.exp(math.log(2)), abs=1e-9)


def test_dead_relu_share_counts_units_zero_for_every_sample() -> None:
    h = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert dead_relu_share(h) == 2 / 4  # units 0 and 3 never fire


def test_dead_relu_share_pools_leading_dims() -> None:
    h = torch.zeros(2, 3, 5)  # [B, P, A]
    h[1, 2, 4] = 0.5
    assert dead_relu_share(h) == 4 / 5


def small_inputs() -> tuple[Schema, torch.Tensor, KeyedJaggedTensor]:
    schema = Schema(
        sparse=(SparseFeature("a", 6, "user"), SparseFeature("b", 6, "item"), SparseFeature("c", 4)), dense=("x",)
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.feature_names,
        values=torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]),
        lengths=torch.ones(12, dtype=torch.int32),
    )
    return schema, torch.randn(4, 1), kjt


def test_attention_activity_of_afm_reports_pair_attention_scalars() -> None:
    torch.manual_seed(0)
    schema, dense, kjt = small_inputs()
    model = AFM(make_ebc(schema, 4), dense_in_features=1, attention_dim=8)
    out = attention_activity(model, dense, kjt)
    assert set(out) == {"near_zero_share", "attention_entropy", "dead_relu_share"}
    w = model.attention_weights(dense, kjt)  # [B, P]
    assert out["attention_entropy"] == pytest.approx(attention_entropy(w, dim=-1))
    assert out["near_zero_share"] == near_zero_share(w, dim=-1)
    assert 0.0 <= out["dead_relu_share"] <= 1.0


def test_attention_activity_of_attention_fm_adds_effective_rank_of_y() -> None:
    torch.manual_seed(0)
    schema, dense, kjt = small_inputs()
    model = AttentionFM(make_ebc(schema, 4), dense_in_features=1, rank=3, attention_hidden=8)
    out = attention_activity(model, dense, kjt)
    y = model.attention_weights(dense, kjt)  # [B, F, K]
    assert out["attention_entropy"] == pytest.approx(attention_entropy(y, dim=1))
    assert out["effective_rank"] == pytest.approx(effective_rank(y))
    assert 1.0 <= out["effective_rank"] <= 3.0


def test_attention_activity_sees_a_dead_attention_mlp() -> None:
    torch.manual_seed(0)
    schema, dense, kjt = small_inputs()
    model = AttentionFM(make_ebc(schema, 4), dense_in_features=1, rank=3, attention_hidden=8)
    with torch.no_grad():
        model.inter_arch.hidden[0].bias.fill_(-1e3)  # every pre-activation negative
    out = attention_activity(model, dense, kjt)
    assert out["dead_relu_share"] == 1.0


def test_attention_activity_rejects_a_model_without_attention() -> None:
    schema, dense, kjt = small_inputs()
    model = TwoTower(make_ebc(schema, 4), ["a"], ["b"], dense_in_features=1)
    with pytest.raises(C2ALError, match="TwoTower has no readable attention"):
        attention_activity(model, dense, kjt)
