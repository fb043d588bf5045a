"""train.py --model next-item: Ning et al.'s dual encoder as a command, centralized and federated, on a small log."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from c2al.config import NEXT_ITEM_LOSSES, Config
from c2al.data.sequences import read_timelines_table
from c2al.dist.checkpoint import load_checkpoint
from c2al.errors import C2ALError
from c2al.eval.next_item import next_item_metrics
from c2al.jobs.next_item import LOSSES, FederatedSettings
from c2al.jobs.next_item_job import LOSS_OF, MODEL_FILE, federated_settings, next_item_data
from c2al.models.sequence_two_tower import build_sequence_two_tower

USERS, ITEMS, LENGTH = 80, 40, 14


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tastes: half the users watch only items 0-19, the others only 20-39, in random order. Every item is
    about as popular as any other, so most-popular ranks the label near chance (recall@10 about 1/4), while a
    model that reads the context's taste can place the label in a top 10 of the right 20 (about 1/2)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(USERS):
        lo = 0 if u % 2 else ITEMS // 2
        for t, item in enumerate(rng.integers(lo, lo + ITEMS // 2, LENGTH)):
            rows.append({"uid": f"u{u}", "movie": f"m{item}", "when": 1_000 + 10 * t + u})
    path = tmp_path_factory.mktemp("log") / "log.csv"
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)  # file order is not time order
    return path


def flags(path: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "next-item", "--data", str(path), "--user-col", "uid", "--item-col", "movie", "--time-col", "when",
            "--out", str(out), "--quiet", *extra]


def test_the_loss_flags_name_the_library_losses() -> None:
    assert tuple(LOSS_OF) == NEXT_ITEM_LOSSES and sorted(LOSS_OF.values()) == sorted(LOSSES)


def test_a_table_log_becomes_time_ordered_timelines(log_csv: Path) -> None:
    t = read_timelines_table(log_csv, "uid", "movie", "when")
    assert t.num_items == ITEMS and len(t.users) == USERS and (t.lengths == LENGTH).all()
    frame = pd.read_csv(log_csv)
    first = frame[frame.uid == "u0"].sort_values("when")["movie"].tolist()
    catalog = sorted(frame.movie.unique())
    start = int(np.searchsorted(np.sort(frame.uid.unique()), "u0"))  # users are coded in sorted order
    got = t.items[start * LENGTH:(start + 1) * LENGTH]
    assert [catalog[i - 1] for i in got] == first


def test_centralized_run_beats_most_popular_and_its_checkpoint_serves_the_same_ranking(log_csv: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert train.main(flags(log_csv, out, "--next-item-loss", "global-softmax", "--epochs", "30", "--eval-every", "20",
                            "--patience", "5")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "centralized" and report["loss"] == "global_softmax"
    assert report["task"]["items"] == ITEMS and report["task"]["train"]["users"] == 64
    assert report["test"]["recall@10"] > report["most_popular"]["recall@10"] + 0.1, report
    assert json.loads((out / "config.json").read_text())["next_item_loss"] == "global-softmax"
    payload = load_checkpoint(out / MODEL_FILE)
    model = build_sequence_two_tower(ITEMS)
    model.load_state_dict(payload["model"])
    splits = next_item_data(Config(model="next-item", data=str(log_csv), user_col="uid", item_col="movie", time_col="when"))
    served = next_item_metrics(model, splits.test, splits.schema)
    assert served["recall@10"] == pytest.approx(report["test"]["recall@10"])


@pytest.mark.parametrize("server", ["fedadam", "fedadagrad"])
def test_federated_run_trains_one_client_per_user_with_the_server_named(log_csv: Path, tmp_path: Path, server: str) -> None:
    torch.set_num_threads(1)
    out = tmp_path / server
    assert train.main(flags(log_csv, out, "--federated", "--next-item-loss", "hinge-spreadout", "--server-optimizer", server,
                            "--rounds", "6", "--eval-rounds", "2", "--clients-per-round", "16", "--local-batch-size", "4")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "federated" and report["loss"] == "hinge_spreadout"
    assert report["settings"]["server_optimizer"] == server and report["settings"]["clients_per_round"] == 16
    evaluated = [h["round"] for h in report["history"] if "valid_recall@10" in h]
    assert len(evaluated) == 3 and np.diff(evaluated).tolist() == [2, 2]  # every --eval-rounds 2 of 6 rounds
    assert 0.0 <= report["test"]["recall@10"] <= 1.0 and report["kept"].startswith("round ")
    assert (out / MODEL_FILE).is_file()


def test_untyped_tabular_defaults_take_the_papers_values_and_typed_flags_win() -> None:
    cfg = Config(model="next-item", federated=True)
    fed = federated_settings(cfg, given={"model", "federated"})
    assert (fed.clients_per_round, fed.local_batch, fed.client_lr, fed.rounds, fed.server_lr) == (100, 16, 0.01, 200, 0.1)
    assert (fed.server_optimizer, fed.eval_every, fed.patience) == ("fedadam", 10, 5)
    typed = Config(model="next-item", federated=True, clients_per_round=7, server_lr=0.5, server_optimizer="fedadagrad")
    fed = federated_settings(typed, given={"model", "federated", "clients_per_round", "server_lr", "server_optimizer"})
    assert (fed.clients_per_round, fed.server_lr, fed.server_optimizer) == (7, 0.5, "fedadagrad")
    assert federated_settings(Config(model="next-item", federated=True, server_optimizer="fedavg"),
                              given={"server_optimizer"}).server_lr == 1.0  # fedavg's own default


def test_an_unknown_server_optimizer_is_refused() -> None:
    with pytest.raises(C2ALError, match="server_optimizer"):
        FederatedSettings(server_optimizer="sgd")


BAD = [
    ("a flag the job never reads", ["--aux-cohorts", "2"], "--aux-cohorts: --model next-item does not read it"),
    ("resume", ["--resume"], "--resume: --model next-item does not read it"),
    ("batch size of a federated run", ["--federated", "--batch-size", "32"], "--local-batch-size"),
    ("a centralized flag with --federated", ["--federated", "--epochs", "3"], "--epochs applies to centralized training only"),
]


@pytest.mark.parametrize("name, extra, message", BAD, ids=[b[0] for b in BAD])
def test_flags_the_job_cannot_honour_are_refused_before_anything_is_written(log_csv: Path, tmp_path: Path, name: str,
                                                                           extra: list[str], message: str,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert train.main(flags(log_csv, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_next_item_loss_needs_the_next_item_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert train.main(["--next-item-loss", "spreadout", "--out", str(tmp_path / "o")]) == 2
    assert "--next-item-loss trains --model next-item, not afm" in capsys.readouterr().err


@pytest.mark.parametrize("column", ["uid", "movie", "when"])
def test_a_missing_column_is_named_and_nothing_is_written(log_csv: Path, tmp_path: Path, column: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.csv"
    pd.read_csv(log_csv).drop(columns=[column]).to_csv(broken, index=False)
    out = tmp_path / "out"
    assert train.main(flags(broken, out)) == 2
    assert f"unknown column {column!r}" in capsys.readouterr().err and not out.exists()


def test_missing_values_and_non_times_are_named(log_csv: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(log_csv)
    holes = frame.copy()
    holes.loc[5, "movie"] = None
    holes.to_csv(tmp_path / "holes.csv", index=False)
    with pytest.raises(C2ALError, match="item column 'movie' has 1 missing values"):
        read_timelines_table(tmp_path / "holes.csv", "uid", "movie", "when")
    frame.assign(when="soon").to_csv(tmp_path / "times.csv", index=False)
    with pytest.raises(C2ALError, match="time column 'when'"):
        read_timelines_table(tmp_path / "times.csv", "uid", "movie", "when")
    with pytest.raises(C2ALError, match="--user-col, --item-col and --time-col"):
        read_timelines_table(log_csv, "uid", "movie", "")


def test_data_without_timelines_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--model", "next-item", "--data", "synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "needs user timelines" in capsys.readouterr().err
    assert train.main(["--model", "next-item", "--data", "movielens-100k", "--user-col", "u", "--out", str(tmp_path / "o")]) == 2
    assert "MovieLens source, whose columns are known" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
