"""End to end: `train.py --federated [--aux-cohorts]` on tiny synthetic data."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import train

warnings.filterwarnings("ignore")
DATA = "synthetic:n_rows=4000,n_users=120,n_items=300"
FAST = ["--data", DATA, "--clients-per-round", "20", "--quiet", "--n-clusters", "6", "--max-share", "0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_federated_aux_cohorts_writes_the_c2al_report_with_federated_fields(tmp_path, capsys):
    assert train.main(["--federated", "--aux-cohorts", "--rounds", "3", "--out", str(tmp_path), *FAST]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    # the centralized C2AL schema (c2al.jobs.centralized.compare) ...
    assert {"config", "overall", "cohorts", "outside_cohorts", "miner", "attention", "history"} <= set(report)
    assert report["config"]["federated"] is True
    assert {"ne_base", "ne_c2al", "ne_diff_pct", "auc_base", "auc_c2al"} <= set(report["overall"])
    assert len(report["cohorts"]) == 2 and all({"share", "contrast", "ne_base", "ne_c2al", "ne_diff_pct"} <= set(c) for c in report["cohorts"])
    assert all(c["traits"] and all(isinstance(t, str) for t in c["traits"]) for c in report["cohorts"])
    # ... plus per-tier rows and the federated field
    assert [t["tier"] for t in report["tiers"]] == ["low", "mid", "high"]
    assert sum(t["n"] for t in report["tiers"]) == report["overall"]["n"]
    fed = report["federated"]
    assert fed["rounds"] == 3 and fed["clients_per_round"] == 20 and fed["population"] == 120
    assert sum(fed["tiers"]["clients"]) == 120 and fed["tiers"]["mode"] == "correlated"
    changes = [t["ne_diff_pct"] / 100 for t in report["tiers"]]
    assert fed["mdac"] == pytest.approx(max(abs(a - b) for a in changes for b in changes), rel=1e-6)
    assert -1.0 <= fed["mining"]["ari"] <= 1.0 and len(fed["mining"]["federated"]) == 2
    assert fed["mining"]["kmeans_ari"] > 0.2  # federated Lloyd finds much of the centralized miner's partition
    assert len(fed["history"]["baseline"]) == 3 and len(fed["history"]["c2al"]) == 3
    served = torch.load(tmp_path / "c2al.pt", weights_only=True)["model"]
    assert not any("heads" in k for k in served)  # stripped: serving costs the base model
    out = capsys.readouterr().out
    assert "per device tier" in out and "MDAC" in out


def test_federated_baseline_resumes_from_its_round_checkpoint(tmp_path, capsys):
    stop = ["--eval-every", "1", "--patience", "2", "--parallel-clients", "8"]  # early stopping by rounds, vectorized clients
    whole = tmp_path / "whole"
    assert train.main(["--federated", "--rounds", "4", "--out", str(whole), *stop, *FAST]) == 0
    want = json.loads((whole / "report.json").read_text())
    out = tmp_path / "resumed"
    assert train.main(["--federated", "--rounds", "2", "--out", str(out), *stop, *FAST]) == 0
    first = json.loads((out / "report.json").read_text())
    assert len(first["federated"]["history"]["train"]) == 2 and math.isfinite(first["overall"]["ne"])
    assert train.main(["--federated", "--rounds", "4", "--resume", "--out", str(out), *stop, *FAST]) == 0
    assert "resumed from" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    history = report["federated"]["history"]["train"]
    assert history[:2] == first["federated"]["history"]["train"] and history == want["federated"]["history"]["train"]
    assert all("valid_ne" in h for h in history)  # --eval-every 1: every round evaluated on validation
    # the kept round, its validation NE and the test metrics of its state: bit-identical to the uninterrupted run
    assert report["best"] == want["best"] == report["federated"]["best"]["train"] and report["best"]["rounds"] >= 1
    assert report["overall"] == want["overall"]


@pytest.mark.slow
def test_federated_c2al_goes_through_the_validation_gate(tmp_path):
    """A harmful lambda is gated on the clients' validation rows: c2al.pt holds the baseline; --no-gate ships C2AL."""
    def run(out, *extra):
        assert train.main(["--federated", "--aux-cohorts", "--rounds", "3", "--aux-weight", "30", "--out", str(out), *FAST, *extra]) == 0
        return json.loads((out / "report.json").read_text()), torch.load(out / "c2al.pt", weights_only=True)

    rep, ckpt = run(tmp_path / "gated")
    d = rep["decision"]
    assert d["shipped"] == "baseline" and d["valid_ne_c2al"] > d["valid_ne_base"]
    assert rep["overall"]["ne_shipped"] == rep["overall"]["ne_base"]
    assert '"shipped": "baseline"' in ckpt["extra"] and not any("heads" in k for k in ckpt["model"])
    rep, ckpt = run(tmp_path / "open", "--no-gate")
    assert rep["decision"]["shipped"] == "c2al" and rep["overall"]["ne_shipped"] == rep["overall"]["ne_c2al"]
    assert '"shipped": "c2al"' in ckpt["extra"]


def test_federated_aux_weight_auto_trains_each_lambda_and_keeps_the_validation_choice(tmp_path):
    """--aux-weight auto in a federated run: C2AL rounds once per lambda of AUTO_GRID, each with its own
    checkpoint, and the kept lambda is the one choose_aux_weight picks from the candidates' validation NE."""
    from c2al.eval.compare import AUTO_GRID, choose_aux_weight

    assert train.main(["--federated", "--aux-cohorts", "--aux-weight", "auto", "--rounds", "2", "--out", str(tmp_path), *FAST]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    search = report["aux_weight_search"]
    assert [c["aux_weight"] for c in search["candidates"]] == list(AUTO_GRID)
    assert all(math.isfinite(c["ne"]) and c["cohort_ne"] is not None for c in search["candidates"])
    assert search["chosen"] == choose_aux_weight(search["candidates"], search["baseline"], 0.0)["aux_weight"]
    assert report["decision"]["valid_ne_base"] == search["baseline"]["ne"]
    chosen = next(c for c in search["candidates"] if c["aux_weight"] == search["chosen"])
    assert report["decision"]["valid_ne_c2al"] == chosen["ne"]  # the gate judged the kept arm
    assert sorted(p.name for p in tmp_path.glob("fed_c2al_lambda*.pt")) == [f"fed_c2al_lambda{lam:g}.pt" for lam in sorted(AUTO_GRID)]


@pytest.mark.parametrize("flag", ["--eval-rounds", "--eval-every"])
def test_federated_validation_every_n_rounds_by_its_own_flag_or_the_old_spelling(tmp_path, flag):
    """--eval-rounds counts rounds (--eval-every, which counts steps in a centralized run, is still read as it)."""
    assert train.main(["--federated", "--rounds", "4", flag, "2", "--patience", "0", "--out", str(tmp_path), *FAST]) == 0
    history = json.loads((tmp_path / "report.json").read_text())["federated"]["history"]["train"]
    assert [i + 1 for i, h in enumerate(history) if "valid_ne" in h] == [2, 4]


def test_eval_rounds_in_a_centralized_run_is_refused(tmp_path, capsys):
    assert train.main(["--data", DATA, "--eval-rounds", "2", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--eval-rounds applies to --federated runs only" in capsys.readouterr().err
