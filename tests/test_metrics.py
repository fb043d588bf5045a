"""Tests for c2al.eval.metrics: hand-computed values and agreement with torchrec.metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.segmented_ne import SegmentedNEMetric

from c2al.errors import C2ALError
from c2al.eval.metrics import (
    auc,
    calibration,
    logloss,
    ndcg_at_k,
    ne,
    ne_diff_pct,
    per_segment,
    positive_label_ratio,
    recall_at_k,
    segmented_ne,
    summarize,
)

TASK = RecTaskInfo(name="t")
LOG2_3 = math.log2(3.0)


def _random_set(seed: int, n: int = 500, rate: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < rate).astype(np.float64)
    # Predictions loosely follow the labels so NE lands below 1, like a trained model.
    preds = np.clip(0.6 * labels + 0.4 * rng.random(n), 0.01, 0.99)
    weights = rng.uniform(0.1, 2.0, n)
    return preds, labels, weights


def _torchrec_ne(preds: np.ndarray, labels: np.ndarray, weights: np.ndarray | None) -> float:
    """TorchRec's NEMetric fed in batches of 100, as a training loop would."""
    metric = NEMetric(world_size=1, my_rank=0, batch_size=100, tasks=[TASK], window_size=len(preds))
    for b in range(0, len(preds), 100):
        metric.update(
            predictions={"t": torch.tensor(preds[b : b + 100])},
            labels={"t": torch.tensor(labels[b : b + 100])},
            weights=None if weights is None else {"t": torch.tensor(weights[b : b + 100])},
        )
    return float(metric.compute()["ne-t|lifetime_ne"])


# ---------------------------------------------------------------- NE


def test_ne_hand_computed_four_samples() -> None:
    # Base rate 1/4: entropy H = -(1/4)log2(1/4) - (3/4)log2(3/4) = 2 - (3/4)log2(3) bits.
    # Predicting 0.5 costs exactly 1 bit per sample, so NE = 1 / H.
    value = ne([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0])
    assert value == pytest.approx(1.0 / (2.0 - 0.75 * LOG2_3), rel=1e-12)


def test_ne_hand_computed_weighted() -> None:
    # Weights 3,1,1,1 make the weighted base rate 1/2 (entropy 1 bit).
    # Loss: 3 * log2(1/0.5) + 3 * log2(1/0.75) over total weight 6.
    value = ne([0.5, 0.25, 0.25, 0.25], [1, 0, 0, 0], weights=[3, 1, 1, 1])
    assert value == pytest.approx(0.5 + 0.5 * math.log2(4.0 / 3.0), rel=1e-12)


def test_ne_equals_torchrec_nemetric_unweighted() -> None:
    preds, labels, _ = _random_set(seed=0)
    assert ne(preds, labels) == pytest.approx(_torchrec_ne(preds, labels, None), rel=1e-12)


def test_ne_equals_torchrec_nemetric_weighted() -> None:
    preds, labels, weights = _random_set(seed=1)
    assert ne(preds, labels, weights) == pytest.approx(_torchrec_ne(preds, labels, weights), rel=1e-12)


def test_ne_of_perfect_predictions_is_near_zero() -> None:
    labels = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    assert 0.0 <= ne(labels, labels) < 1e-9


def test_ne_of_predicting_base_rate_is_one() -> None:
    _, labels, _ = _random_set(seed=2)
    preds = np.full_like(labels, labels.mean())
    assert ne(preds, labels) == pytest.approx(1.0, rel=1e-12)


def test_ne_of_one_class_set_is_nan() -> None:
    assert math.isnan(ne([0.2, 0.3], [0, 0]))
    assert math.isnan(ne([0.2, 0.3], [1, 1]))


def test_ne_does_not_modify_caller_tensor() -> None:
    preds = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    ne(preds, [0, 1, 1])
    assert preds.tolist() == [0.0, 1.0, 0.5]


def test_ne_rejects_logits() -> None:
    with pytest.raises(C2ALError, match="preds"):
        ne([-2.0, 3.0], [0, 1])


def test_ne_rejects_length_mismatch() -> None:
    with pytest.raises(C2ALError, match="preds"):
        ne([0.1, 0.2, 0.3], [0, 1])


# ---------------------------------------------------------------- segmented NE


def test_segmented_ne_equals_ne_on_each_segment() -> None:
    preds, labels, weights = _random_set(seed=3, n=600)
    segments = np.random.default_rng(3).integers(-1, 3, len(preds))  # -1 is ignored
    values = segmented_ne(preds, labels, segments, 3, weights)
    for s in range(3):
        m = segments == s
        assert values[s] == pytest.approx(ne(preds[m], labels[m], weights[m]), rel=1e-12)


@pytest.mark.parametrize(
    "mode", [RecComputeMode.UNFUSED_TASKS_COMPUTATION, RecComputeMode.FUSED_TASKS_COMPUTATION]
)
def test_segmented_ne_equals_torchrec_segmented_nemetric(mode: RecComputeMode) -> None:
    preds, labels, weights = _random_set(seed=4, n=600)
    segments = np.random.default_rng(4).integers(0, 3, len(preds))
    metric = SegmentedNEMetric(
        world_size=1,
        my_rank=0,
        batch_size=len(preds),
        tasks=[TASK],
        compute_mode=mode,
        window_size=len(preds),
        num_groups=3,
    )
    metric.update(
        predictions={"t": torch.tensor(preds)},
        labels={"t": torch.tensor(labels)},
        weights={"t": torch.tensor(weights)},
        required_inputs={"grouping_keys": torch.tensor(segments)},
    )
    out = metric.compute()
    expected = [float(out[f"segmented_ne-t|lifetime_segmented_ne_{s}"]) for s in range(3)]
    # TorchRec keeps per-group NE in float32 buffers, hence the looser tolerance.
    np.testing.assert_allclose(segmented_ne(preds, labels, segments, 3, weights), expected, rtol=1e-6)


def test_segmented_ne_is_nan_for_one_class_and_empty_segments() -> None:
    preds = [0.75, 0.25, 0.5, 0.5]
    labels = [1, 0, 1, 1]
    values = segmented_ne(preds, labels, [0, 0, 1, 1], n_segments=3)
    assert values[0] == pytest.approx(math.log2(4.0 / 3.0), rel=1e-12)
    assert math.isnan(values[1]) and math.isnan(values[2])


def test_per_segment_reports_one_class_segment_without_crashing() -> None:
    rows = per_segment([0.75, 0.25, 0.5, 0.5, 0.1], [1, 0, 1, 1, 0], [0, 0, 1, 1, -1], n_segments=2)
    assert [r["id"] for r in rows] == [0, 1]
    assert [r["n"] for r in rows] == [2, 2]
    assert [r["share"] for r in rows] == [0.4, 0.4]
    assert rows[0]["auc"] == 1.0 and rows[0]["plr"] == 0.5
    assert rows[1]["plr"] == 1.0
    assert math.isnan(rows[1]["ne"]) and math.isnan(rows[1]["auc"])


def test_segmented_ne_rejects_float_segment_ids() -> None:
    with pytest.raises(C2ALError, match="segments"):
        segmented_ne([0.5, 0.5], [0, 1], [0.0, 1.0], 2)


# ---------------------------------------------------------------- other ranking metrics


def test_auc_hand_computed() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right.
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_auc_of_one_class_set_is_nan() -> None:
    assert math.isnan(auc([0.1, 0.4], [1, 1]))


def test_logloss_equals_sklearn_in_nats() -> None:
    preds, labels, weights = _random_set(seed=5)
    expected = sk_log_loss(labels, preds, sample_weight=weights)
    assert logloss(preds, labels, weights) == pytest.approx(expected, rel=1e-12)


def test_calibration_is_mean_prediction_over_base_rate() -> None:
    assert calibration([0.25, 0.5, 0.25, 0.0], [0, 1, 0, 0]) == 1.0


def test_positive_label_ratio_is_weighted() -> None:
    assert positive_label_ratio([1, 0, 0, 0]) == 0.25
    assert positive_label_ratio([1, 0, 0, 0], weights=[3, 1, 1, 1]) == 0.5


def test_summarize_returns_all_keys() -> None:
    out = summarize([0.75, 0.75, 0.25, 0.25], [1, 1, 0, 0])
    assert set(out) == {"ne", "auc", "logloss", "calibration", "plr", "n"}
    assert out["n"] == 4 and out["auc"] == 1.0 and out["plr"] == 0.5 and out["calibration"] == 1.0
    assert out["ne"] == pytest.approx(math.log2(4.0 / 3.0), rel=1e-12)


def test_ne_diff_pct_is_relative_change_in_percent() -> None:
    assert ne_diff_pct(0.75, 0.8) == pytest.approx(-6.25, rel=1e-12)
    assert math.isnan(ne_diff_pct(0.5, 0.0))


# ---------------------------------------------------------------- retrieval

# User 0 ranks items 0,1,2,3,4; user 1 ranks items 2,4,1,3,0.
SCORES = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.5, 0.9, 0.3, 0.7]])
RELEVANT = [{1, 3}, {0, 2, 4}]
D3 = 1.0 / LOG2_3  # discount at rank 2


def test_recall_at_k_hand_computed() -> None:
    # User 0: top 3 = {0,1,2}, 1 of 2 relevant. User 1: top 3 = {2,4,1}, 2 of 3.
    assert recall_at_k(SCORES, RELEVANT, k=3) == pytest.approx((1 / 2 + 2 / 3) / 2, rel=1e-12)


def test_ndcg_at_k_hand_computed() -> None:
    user0 = D3 / (1.0 + D3)  # hit at rank 2; ideal has 2 hits
    user1 = (1.0 + D3) / (1.0 + D3 + 0.5)  # hits at ranks 1, 2; ideal has 3 hits
    assert ndcg_at_k(SCORES, RELEVANT, k=3) == pytest.approx((user0 + user1) / 2, rel=1e-12)


def test_retrieval_accepts_boolean_relevance_matrix() -> None:
    mask = np.zeros((2, 5), dtype=bool)
    mask[0, [1, 3]] = True
    mask[1, [0, 2, 4]] = True
    assert recall_at_k(SCORES, mask, k=3) == recall_at_k(SCORES, RELEVANT, k=3)
    assert ndcg_at_k(torch.tensor(SCORES), torch.tensor(mask), k=3) == ndcg_at_k(SCORES, RELEVANT, k=3)


def test_exclude_masks_seen_items() -> None:
    # Excluding item 0 for user 0 lifts items 1,2,3 into its top 3 (both relevant hit).
    # Excluding item 2 for user 1 also drops it from its relevant set: {0, 4}, top 3 = 4,1,3.
    exclude = [{0}, {2}]
    assert recall_at_k(SCORES, RELEVANT, k=3, exclude=exclude) == pytest.approx((1.0 + 0.5) / 2, rel=1e-12)
    user0 = (1.0 + 0.5) / (1.0 + D3)  # hits at ranks 1 and 3
    user1 = 1.0 / (1.0 + D3)  # hit at rank 1
    assert ndcg_at_k(SCORES, RELEVANT, k=3, exclude=exclude) == pytest.approx((user0 + user1) / 2, rel=1e-12)


def test_retrieval_skips_users_without_relevant_items() -> None:
    assert recall_at_k(SCORES, [{1, 3}, set()], k=3) == 0.5
    assert math.isnan(recall_at_k(SCORES, [set(), set()], k=3))


def test_retrieval_rejects_out_of_range_item_ids() -> None:
    with pytest.raises(C2ALError, match="relevant"):
        recall_at_k(SCORES, [{5}, {0}], k=3)
