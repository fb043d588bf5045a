"""The one cohort encoding, shared by CohortMiner and FederatedCohortMiner."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from c2al.cohorts import CohortMiner
from c2al.cohorts.encoding import Encoding, read_columns
from c2al.errors import C2ALError
from c2al.federated.mining import FederatedCohortMiner, client_column_stats, server_encoding


def user_frame(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(40, 10, n), "region": rng.choice(["a", "b", "c"], n), "paid": rng.random(n) < 0.3})


def test_server_encoding_from_client_sums_equals_the_encoding_of_the_pooled_rows() -> None:
    frame = user_frame()
    pooled = Encoding.from_columns(*read_columns(frame))
    clients = np.array_split(np.arange(len(frame)), 37)
    federated = server_encoding(list(frame.columns), [client_column_stats(frame.iloc[r]) for r in clients])
    assert federated.kinds == pooled.kinds == ["numeric", "categorical", "categorical"]
    np.testing.assert_allclose(federated.encode(frame), pooled.encode(frame), atol=1e-9)


def test_transform_unscaled_keeps_units_and_names_each_encoded_column() -> None:
    frame = user_frame(n=50)
    enc = Encoding.from_columns(*read_columns(frame))
    design = enc.transform(read_columns(frame)[1], scaled=False)
    np.testing.assert_array_equal(design[:, 0], frame["age"].to_numpy())
    assert [enc.source_of(j) for j in range(design.shape[1])] == [
        ("age", None), ("region", "a"), ("region", "b"), ("region", "c"), ("paid", "False"), ("paid", "True")]


def test_federated_miner_has_the_fitted_attributes_reports_read() -> None:
    frame = user_frame(n=2000)
    scores = np.where(frame["age"] > 55, 0.8, 0.2)
    labels = (np.random.default_rng(1).random(len(frame)) < scores).astype(int)
    clients = np.array_split(np.arange(len(frame)), 400)  # 5 rows per client
    fed = FederatedCohortMiner(2, n_clusters=8, max_share=0.5, random_state=0).fit(
        [frame.iloc[r] for r in clients], [labels[r] for r in clients], [scores[r] for r in clients])
    central = CohortMiner(2, n_clusters=8, max_share=0.5, random_state=0).fit(frame, labels, scores)
    for name in ("cohorts_", "contrast_", "candidates_", "rules_", "cluster_centers_", "n_features_in_"):
        assert hasattr(fed, name) and hasattr(central, name), name
    assert {"rule", "share", "plr", "contrast", "cohort", "candidate"} <= set(fed.cohorts_[0])
    reported = {"id", "source", "rule", "size", "share", "plr", "contrast", "qualified", "cohort"}
    assert reported <= set(central.candidates_.columns) and reported <= set(fed.candidates_.columns)
    assert np.all(np.diff(fed.contrast_) <= 0) and fed.predict(frame).shape == (len(frame),)
    assert len(fed.describe(frame)) == 2


def test_federated_miner_predict_names_missing_columns() -> None:
    frame = user_frame(n=400)
    fed = FederatedCohortMiner(1, n_clusters=4, max_share=1.0, random_state=0).fit(
        [frame.iloc[i:i + 4] for i in range(0, 400, 4)], [np.zeros(4)] * 100, [np.full(4, 0.5)] * 100)
    with pytest.raises(C2ALError, match=r"lacks the cohort feature columns \['region'\]"):
        fed.predict(frame.drop(columns="region"))


def test_named_categorical_columns_are_categorical_whatever_their_dtype() -> None:
    frame = pd.DataFrame({"device": [3, 1, 3, 2], "code": [1.0, 2.0, 2.0, 1.0], "age": [20.0, 30.0, 40.0, 50.0]})
    names, columns, kinds = read_columns(frame, categorical=("device", "code"))
    assert kinds == ["categorical", "categorical", "numeric"]
    assert columns[0].tolist() == ["3", "1", "3", "2"] and columns[1].tolist() == ["1", "2", "2", "1"]  # 2.0 reads as "2"
    assert read_columns(frame)[2] == ["numeric", "numeric", "numeric"]


def test_unknown_categorical_column_is_named() -> None:
    with pytest.raises(C2ALError, match="categorical: unknown column 'device'"):
        read_columns(pd.DataFrame({"age": [1.0, 2.0]}), categorical=("device",))


def test_named_categorical_column_on_an_array_uses_its_position_name() -> None:
    _, columns, kinds = read_columns(np.array([[1.0, 5.0], [2.0, 6.0]]), categorical=("x1",))
    assert kinds == ["numeric", "categorical"] and columns[1].tolist() == ["5", "6"]
