"""benchmarks/federated_tune.py: candidates parsed and checked, chosen on validation only, one file per run reused."""
from __future__ import annotations

import json
from pathlib import Path

import federated_tune as tune
import pytest


def test_a_candidate_is_train_py_flags_and_a_typo_or_a_fixed_flag_is_refused():
    assert tune.parse_candidate("server-lr=0.03,clients_per_round=500") == {"server_lr": "0.03", "clients_per_round": "500"}
    assert tune.parse_candidate(" ") == {}
    for bad, why in (("server_lrr=0.1", "not a train.py flag"), ("seed=3", "not a train.py flag"), ("server_lr", "not flag=value"),
                     ("patience=2,patience=3", "given twice")):
        with pytest.raises(SystemExit, match=why):
            tune.parse_candidate(bad)
    with pytest.raises(SystemExit):
        tune.parse(["--candidates", "server_lr=0.1;server-lr=0.1"])  # the same candidate twice


def _fake_quality(scores: dict[str, tuple[float, float]], calls: list):
    """federated.quality's stand-in: the candidate's (valid NE, test NE), shifted by 0.01 per seed (--rounds ignored)."""
    def quality(data, extra, time_rounds=True):
        assert time_rounds is False
        calls.append(list(extra))
        seed = int(extra[extra.index("--seed") + 1])
        flags = extra[:extra.index("--seed")]
        if "--rounds" in flags:
            del flags[flags.index("--rounds"):flags.index("--rounds") + 2]
        valid, test = scores[" ".join(flags)]
        doc = {"kept": {"valid_ne": valid + 0.01 * seed, "rounds": 10}, "test": {"ne": test + 0.01 * seed, "auc": 0.7},
               "rounds_run": 12, "wall_seconds": 1.0, "centralized_test_ne": 0.8, "curve": [], "tiers": []}
        return doc, ""
    return quality


def test_the_lowest_validation_ne_is_chosen_whatever_its_test_ne_and_runs_are_reused(tmp_path: Path, monkeypatch):
    calls: list = []
    scores = {"": (0.90, 0.85), "--server-lr 0.03": (0.88, 0.95), "--patience 6": (0.89, 0.80)}
    monkeypatch.setattr(tune.federated, "quality", _fake_quality(scores, calls))
    argv = ["--data", "synthetic", "--base", "rounds=3", "--candidates", ";server_lr=0.03;patience=6", "--seeds", "0,1",
            "--out", str(tmp_path / "tune.json")]
    result = tune.main(argv)
    s = result["summary"]
    assert s["chosen"]["flags"] == {"server_lr": "0.03"}  # the best validation NE, although its test NE is the worst
    assert s["chosen"]["test_ne"]["values"] == pytest.approx([0.95, 0.96])
    assert s["chosen"]["ne_over_centralized_pct"]["mean"] == pytest.approx(100 * (0.955 / 0.8 - 1))
    assert s["default"]["seeds"] == [0, 1] and s["default"]["test_ne"]["mean"] == pytest.approx(0.855)
    assert [c["valid_ne"] for c in s["candidates"]] == [0.90, 0.88, 0.89]
    assert len(calls) == 5  # 3 candidates on seed 0, then seed 1 of the chosen and of the defaults
    assert len(list((tmp_path / "tune").glob("*.json"))) == 5
    assert json.loads((tmp_path / "tune.json").read_text())["summary"] == json.loads(json.dumps(s))
    again = tune.main(argv)  # every run file is reused: nothing runs
    assert len(calls) == 5 and again["summary"]["chosen"] == s["chosen"]
    tune.main([*argv[:3], "rounds=4", *argv[4:]])  # another base: every run is redone
    assert len(calls) == 10


def test_merge_only_reads_what_is_there_and_says_so_when_nothing_is(tmp_path: Path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tune.federated, "quality", _fake_quality({"": (0.9, 0.9), "--server-lr 0.03": (0.8, 0.8)}, calls))
    argv = ["--data", "synthetic", "--candidates", ";server_lr=0.03", "--seeds", "0,1", "--out", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit, match="no candidate has a run file"):
        tune.main([*argv, "--merge-only"])
    tune.main([*argv[:-4], "--seeds", "0,", *argv[-2:]])  # seed 0 only
    merged = tune.main([*argv, "--merge-only"])["summary"]
    assert len(calls) == 2 and merged["chosen"]["seeds"] == [0]  # seed 1 not run: left out, not trained
    assert json.loads((tmp_path / "t.json").read_text())["missing_runs"] == ["server-lr-0.03_seed1", "defaults_seed1"]


@pytest.mark.slow
def test_a_real_train_py_run_of_two_candidates(tmp_path: Path):
    argv = ["--data", "synthetic:n_rows=3000", "--base", "rounds=2,clients_per_round=8", "--candidates", ";server_lr=0.03",
            "--seeds", "0,", "--out", str(tmp_path / "t.json")]
    s = tune.main(argv)["summary"]
    assert len(s["candidates"]) == 2 and all(c["rounds_run"] == 2 and 0 < c["valid_ne"] for c in s["candidates"])
    assert s["chosen"]["valid_ne"] == min(c["valid_ne"] for c in s["candidates"])
