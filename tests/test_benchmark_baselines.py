"""benchmarks/baselines.py: the early-stopped baselines next to the logistic-regression floor."""
from __future__ import annotations

import argparse
import json

import baselines  # benchmarks/ is on the test path (pytest.ini)
import pytest

TINY = "synthetic:n_rows=1500,n_users=80,n_items=30"


def row(seed: int, ne: float, auc: float) -> dict:
    return {"seed": seed, "test": {"ne": ne, "auc": auc}, "best_epoch": 2, "epoch_seconds": 10.0 + seed}


def test_afm_summary_is_mean_and_range_over_seeds_and_the_margin_to_the_floor() -> None:
    floor = {"test_ne": 0.79}
    got = baselines.afm_summary([row(0, 0.78, 0.80), row(1, 0.77, 0.81), row(2, 0.76, 0.79)], floor)
    assert got["test_ne"] == pytest.approx({"mean": 0.77, "min": 0.76, "max": 0.78})
    assert got["test_auc"] == pytest.approx({"mean": 0.80, "min": 0.79, "max": 0.81})
    assert got["ne_below_floor"] == pytest.approx({"mean": 0.02, "worst_seed": 0.01})
    assert got["ne_below_floor_pct"] == pytest.approx(100 * 0.02 / 0.79)
    assert got["epoch_seconds_mean"] == pytest.approx(11.0)


@pytest.mark.slow
def test_a_run_writes_every_row_and_a_rerun_reuses_them(tmp_path, capsys) -> None:
    argv = ["--data", TINY, "--epochs", "1", "--afm-seeds", "0,1", "--batch-size", "256", "--processes", "1",
            "--afm-grid", "", "--two-tower-grid", "", "--out", str(tmp_path / "b.json"), "--cache", str(tmp_path / "cache")]
    result = baselines.main(argv)
    assert list(result["runs"]) == ["afm:0", "afm:1", "attention-fm", "two-tower", "two-tower-no-logq"]
    assert result["afm"]["seeds"] == [0, 1] and result["linear_floor"] is None
    for r in result["runs"].values():
        assert set(r) >= {"test", "best_epoch", "history", "epoch_seconds", "seconds", "config", "command"}
        assert r["command"].startswith("python train.py") and r["config"]["quiet"] and "workers" not in r["command"]
    two_tower = result["runs"]["two-tower"]
    assert two_tower["config"]["two_tower_logq"] and not result["runs"]["two-tower-no-logq"]["config"]["two_tower_logq"]
    assert 0 <= two_tower["retrieval"]["recall@10"] <= 1 and "popularity_recall@10" in two_tower["retrieval"]
    assert json.loads((tmp_path / "b.json").read_text())["runs"].keys() == result["runs"].keys()
    assert result["command"].startswith("python benchmarks/baselines.py --data synthetic") and result["wall_s"] > 0
    assert result["machine"]["processes"] == 1 and result["config"]["afm_seeds"] == [0, 1]
    capsys.readouterr()
    again = baselines.main(argv + ["--runs", "afm:1"])
    assert "afm:1: reused" in capsys.readouterr().out
    assert again["runs"]["afm:1"] == result["runs"]["afm:1"] and list(again["runs"]) == list(result["runs"])


def test_afm_grid_adds_one_run_per_setting_ranked_on_validation() -> None:
    runs = baselines.plan([3, 4], [("table_lr", 0.15), ("dropout", 0.0)])
    assert runs["afm:3 table_lr=0.15"] == {"model": "afm", "seed": 3, "table_lr": 0.15}
    assert runs["afm:3 dropout=0.0"] == {"model": "afm", "seed": 3, "dropout": 0.0}
    rows = {n: {"model": "afm", "best": {"valid_ne": ne}, "best_epoch": 1, "epochs_run": 3}
            for n, ne in (("afm:3", 0.78), ("afm:4", 0.70), ("afm:3 table_lr=0.15", 0.77))}
    grid = baselines.afm_grid(rows, 3)
    assert [(g["setting"], g["valid_ne"]) for g in grid] == [("table_lr=0.15", 0.77), ("train.py defaults", 0.78)]


def test_grid_settings_are_typed_training_flags() -> None:
    assert baselines.grid_setting("table-lr=0.15") == ("table_lr", 0.15)
    assert baselines.grid_setting("embedding_dim=32") == ("embedding_dim", 32)
    with pytest.raises(argparse.ArgumentTypeError, match="FIELD=VALUE"):
        baselines.grid_setting("aux_weight=1")


def test_the_grid_setting_best_on_validation_is_trained_on_every_seed(tmp_path, monkeypatch) -> None:
    def fake(name: str, cfg: dict) -> dict:
        valid = {0.05: 0.80, 0.3: 0.70, 0.6: 0.75}[cfg["table_lr"]]
        test = valid + 0.01 * cfg["seed"]
        return {"name": name, "model": cfg["model"], "seed": cfg["seed"], "config": cfg, "test": {"ne": test, "auc": 0.8},
                "best": {"valid_ne": valid}, "best_epoch": 1, "epochs_run": 2, "epoch_seconds": 1.0, "seconds": 2.0}

    monkeypatch.setattr(baselines, "train_one", fake)
    result = baselines.main(["--data", TINY, "--afm-grid", "table_lr=0.3,table_lr=0.6", "--two-tower-grid", "", "--processes", "1",
                             "--out", str(tmp_path / "b.json"), "--cache", str(tmp_path / "cache")])
    assert [g["setting"] for g in result["afm_grid"]] == ["table_lr=0.3", "table_lr=0.6", "train.py defaults"]
    assert result["afm_picked"]["setting"] == "table_lr=0.3" and result["afm_picked"]["seeds"] == [0, 1, 2]
    assert result["afm_picked"]["test_ne"]["mean"] == pytest.approx(0.71)
    assert result["afm"]["seeds"] == [0, 1, 2] and result["afm"]["test_ne"]["mean"] == pytest.approx(0.81)


def test_two_tower_grid_is_ranked_on_validation_recall() -> None:
    runs = baselines.plan([0], two_tower_grid=[("batch_size", 2048)])
    assert runs["two-tower batch_size=2048"] == {"model": "two-tower", "seed": 0, "two_tower_loss": "softmax", "batch_size": 2048}
    rows = {n: {"model": "two-tower", "best": {"valid_recall@10": rec}, "best_epoch": 2, "epochs_run": 4}
            for n, rec in (("two-tower", 0.10), ("two-tower-no-logq", 0.20), ("two-tower batch_size=2048", 0.12))}
    assert [(g["setting"], g["valid_recall@10"]) for g in baselines.two_tower_grid(rows)] == [
        ("batch_size=2048", 0.12), ("train.py defaults", 0.10)]
