"""What a run does with its output directory and its terminal: the lock, stale temporaries, the start-up
lines, progress without a terminal, resumed time, and the readable tables and figure."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from c2al.config import Config, build_parser, parse_args  # noqa: E402
from c2al.dist.outdir import LOCK_NAME, OutLock  # noqa: E402
from c2al.errors import C2ALError  # noqa: E402

CSV_ROLES = ["--label", "click", "--sparse", "user,item,city,hour", "--dense", "x1,x2", "--user-col", "user",
             "--cohort-features", "city,age"]


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_its_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    with OutLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(C2ALError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            OutLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutLock(tmp_path) as again:
        assert again.previous == {}  # released cleanly: nothing to take over


def test_lock_held_by_another_process_refuses_until_it_dies(tmp_path: Path) -> None:
    """The kernel drops a dead holder's flock; the next run takes the lock over and knows whose it was."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
        f"fcntl.flock(fd, {fcntl.LOCK_EX})\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'elsewhere', 'started': 'now', 'command': 'x'}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(C2ALError, match=f"in use by pid {holder.pid} on host elsewhere"):
            OutLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutLock(tmp_path) as lock:
        assert lock.previous["pid"] == holder.pid


@pytest.fixture(scope="module")
def dead_runs_leftovers(train_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real run (without --quiet, stderr not a terminal) on an OUT a killed run left behind."""
    out = tmp_path_factory.mktemp("leftovers")
    pid = dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier",
                                             "command": "train.py"}) + "\n")
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    return {"out": out, "pid": pid}


def test_a_run_takes_over_a_dead_runs_lock_cleans_its_temporaries_and_draws_no_bars(
        dead_runs_leftovers: dict, train_csv: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = dead_runs_leftovers["out"]
    rc = train.main(["--data", str(train_csv), *CSV_ROLES, "--epochs", "1", "--batch-size", "256", "--out", str(out)])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert f"took over the lock of pid {dead_runs_leftovers['pid']}" in captured.out
    assert "removed 1 temporary file(s)" in captured.out and ".checkpoint.pt.k1ll3d.tmp" in captured.out
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()
    assert "\r" not in captured.err and "it/s" not in captured.err  # stderr is not a terminal: no progress bars
    assert "[train] epoch 1/1  loss" in captured.out  # the loop's one line per evaluation instead
    config_line = next(line for line in captured.out.splitlines() if line.startswith("config: "))
    assert "--epochs 1" in config_line and "--batch-size 256" in config_line and "--lr" not in config_line
    assert json.loads((out / "config.json").read_text())["lr"] == Config().lr  # the file keeps every field


def test_changed_flags_are_typed_as_on_the_command_line() -> None:
    cfg = parse_args(["--aux-cohorts", "--tier-shares", "0.2,0.3,0.5", "--no-pipeline", "--pipeline", "--seed", "3"])
    assert train.changed_flags(cfg) == "--pipeline --seed 3 --aux-cohorts 2 --tier-shares 0.2,0.3,0.5"  # field order
    assert train.changed_flags(Config()) == "(all defaults)"


def test_help_names_the_real_default_out_and_every_checkpoint_resume_reads() -> None:
    flat = " ".join(build_parser().format_help().split())
    assert "runs/<data>-<model>-base-seed<seed>" in flat and "-c2al-" in flat
    resume = flat[flat.index("--resume,"):][:500]
    for name in ("checkpoint.pt", "baseline.pt", "c2al_train.pt", "fed_*.pt"):
        assert name in resume


def test_federated_resume_carries_the_training_time(tmp_path: Path) -> None:
    """train_seconds after a resume is the interrupted run's time plus the new rounds', not the last segment's."""
    import torch

    fast = ["--federated", "--data", "synthetic:n_rows=3000,n_users=80,n_items=200", "--clients-per-round", "10",
            "--quiet", "--out", str(tmp_path)]
    assert train.main([*fast, "--rounds", "2"]) == 0
    saved = json.loads(torch.load(tmp_path / "fed_checkpoint.pt", weights_only=True)["extra"])["seconds"]
    assert saved > 0
    time.sleep(0.01)
    assert train.main([*fast, "--rounds", "3", "--resume"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["federated"]["train_seconds"]["train"] > saved


def test_percent_columns_read_as_signed_percentages() -> None:
    from c2al.eval.report import format_table

    text = format_table([{"cohort": "0", "ne_diff_pct": 3.5567}, {"cohort": "1", "ne_diff_pct": -0.004}],
                        ["cohort", "ne_diff_pct"])
    assert text.splitlines()[2:] == ["     0       +3.56%", "     1       -0.00%"]


def test_report_figure_has_the_rest_bar_traits_and_a_title_naming_the_run(tmp_path: Path) -> None:
    from c2al.eval.plots import bar_rows, plot_report, title

    report = {"config": {"data": "/data/clicks.csv", "model": "afm", "aux_cohorts": 2, "aux_weight": [0.1]},
              "cohorts": [{"id": 0, "share": 0.06, "ne_diff_pct": -1.5, "traits": ["city=c1 100% (rest 20%)", "age 55"]},
                          {"id": 1, "share": 0.05, "ne_diff_pct": 0.5, "traits": []}],
              "outside_cohorts": {"share": 0.89, "ne_diff_pct": 0.1}, "overall": {"ne_diff_pct": 0.05},
              "attention": {"histograms": {m: {"counts": [1, 2], "edges": [0.0, 0.5, 1.0]} for m in ("baseline", "c2al")}}}
    labels = [label for label, _ in bar_rows(report)]
    assert labels[0] == "cohort 0 (6.0%)\ncity=c1 100% (rest 20%)\nage 55"
    assert labels[2:] == ["rest (89.0%)", "overall"]
    assert title(report) == "C2AL vs baseline: clicks.csv, afm, K=2, lambda=0.1"
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_attention_histograms_share_their_bin_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both models' weights are counted on one set of bins, so the two outlines compare bin for bin."""
    import torch
    from torch import nn

    from c2al.eval.compare import attention_report

    class Fake(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = scale

        def attention_weights(self, dense, sparse):
            return torch.linspace(0, self.scale, 50).reshape(5, 10)

    import c2al.eval.activity as activity
    from c2al.data.sources import load_source
    from c2al.dist.process import LOCAL_CPU

    monkeypatch.setattr(activity, "attention_activity", lambda m, d, s: {"near_zero_share": 0.0})
    splits = load_source("synthetic:n_rows=3000,n_users=80,n_items=200")
    out = attention_report(Fake(1.0), Fake(3.0), splits, Config(batch_size=64), LOCAL_CPU)
    assert out["histograms"]["baseline"]["edges"] == out["histograms"]["c2al"]["edges"]
    assert sum(out["histograms"]["baseline"]["counts"]) == sum(out["histograms"]["c2al"]["counts"]) == 50


# ---------------------------------------------------------------- a run never silently replaces another's files
def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def csv_run(train_csv: Path, *extra: str) -> list[str]:
    return ["--data", str(train_csv), *CSV_ROLES, "--epochs", "1", "--batch-size", "256", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished_out(train_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An explicit --out a finished baseline run wrote (config.json, report.json, checkpoint.pt)."""
    out = tmp_path_factory.mktemp("finished")
    assert train.main(csv_run(train_csv, "--out", str(out))) == 0
    return out


def test_a_second_run_into_a_finished_out_is_refused_and_changes_nothing(
        finished_out: Path, train_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = files_of(finished_out)
    assert {"config.json", "report.json", "checkpoint.pt"} <= set(before)
    capsys.readouterr()
    assert train.main(csv_run(train_csv, "--out", str(finished_out), "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert repr(str(finished_out)) in err and "--resume" in err and "--overwrite" in err
    assert files_of(finished_out) == before  # byte for byte, and no lock file left behind


def test_overwrite_replaces_a_finished_run_and_drops_its_other_files(train_csv: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(csv_run(train_csv, "--out", str(tmp_path))) == 0
    (tmp_path / "c2al_train.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes())  # a file this run will not write
    capsys.readouterr()
    assert train.main(csv_run(train_csv, "--out", str(tmp_path), "--seed", "1", "--overwrite")) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["config"]["seed"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
    assert not (tmp_path / "c2al_train.pt").exists()  # OUT holds this run's files only


def test_resume_continues_a_finished_run_in_its_out(train_csv: Path, tmp_path: Path) -> None:
    assert train.main(csv_run(train_csv, "--out", str(tmp_path), "--patience", "0")) == 0
    assert train.main(csv_run(train_csv, "--out", str(tmp_path), "--patience", "0", "--resume", "--epochs", "2")) == 0
    history = json.loads((tmp_path / "report.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_the_default_out_takes_a_fresh_name_when_it_holds_a_run(train_csv: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`make run` twice in a row: the second run writes runs/NAME-2 and says so; the first's files stay."""
    monkeypatch.chdir(tmp_path)
    assert train.main(csv_run(train_csv)) == 0
    first = tmp_path / "runs" / "clicks-afm-base-seed0"
    kept = files_of(first)
    capsys.readouterr()
    assert train.main(csv_run(train_csv)) == 0
    second = tmp_path / "runs" / "clicks-afm-base-seed0-2"
    assert f"{Path('runs') / 'clicks-afm-base-seed0'} holds a previous run; this one writes to {Path('runs') / second.name}" \
        in capsys.readouterr().out
    assert files_of(first) == kept and (second / "report.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["clicks-afm-base-seed0", "clicks-afm-base-seed0-2"]


def test_the_reuse_check_runs_under_the_lock(tmp_path: Path) -> None:
    """Two runs started together on one OUT: whichever locks second sees the first's files and is refused,
    and the refusal releases the lock without touching OUT."""
    from c2al.dist.outdir import lock_out_dir
    from c2al.dist.process import LOCAL_CPU

    (tmp_path / "report.json").write_text("{}\n")
    with pytest.raises(C2ALError, match="already holds a run \\(report.json\\)"):
        lock_out_dir(tmp_path, LOCAL_CPU, reuse=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    lock = lock_out_dir(tmp_path, LOCAL_CPU, reuse=True)  # --resume / --overwrite
    assert lock is not None and lock.held
    lock.release()


def test_typed_flags_are_what_the_command_line_names() -> None:
    assert train.typed_flags(["--federated", "--rounds=3", "--no-gate", "--aux-cohorts"]) == {"federated", "rounds", "gate", "aux_cohorts"}
    assert train.typed_flags([]) == set()
