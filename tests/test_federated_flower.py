"""`--engine flower`: the same strategy and client logic as a Flower ServerApp / ClientApp on Ray (flwr 1.41)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import train

warnings.filterwarnings("ignore")
ARGS = ["--federated", "--data", "synthetic:n_rows=600,n_users=6,n_items=40,n_clusters=3", "--rounds", "2",
        "--clients-per-round", "3", "--tiers", "none", "--quiet"]


def test_flower_simulation_runs_two_rounds_like_the_in_process_engine(tmp_path):
    assert train.main([*ARGS, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    report = json.loads((tmp_path / "flower" / "report.json").read_text())
    fed = report["federated"]
    assert fed["engine"] == "flower" and len(fed["history"]["train"]) == 2
    assert all(h["sampled"] == h["aggregated"] == 3 and not h["failures"] for h in fed["history"]["train"])
    assert np.isfinite(report["overall"]["ne"])
    # same seeds, same hooks, same client code: the in-process engine lands on the same model
    assert train.main([*ARGS, "--out", str(tmp_path / "sim")]) == 0
    sim = json.loads((tmp_path / "sim" / "report.json").read_text())
    assert report["overall"]["ne"] == pytest.approx(sim["overall"]["ne"], rel=1e-6)
    assert [h["loss"] for h in fed["history"]["train"]] == pytest.approx([h["loss"] for h in sim["federated"]["history"]["train"]], rel=1e-6)
