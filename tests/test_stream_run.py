"""`train.py` on streaming sources end to end: Criteo text and a Parquet folder train in one pass, mine,
gate and report per cohort; a resumed run continues mid-stream with the saved vocabulary; two torchrun
processes read disjoint units and match one process; what a stream cannot do is refused up front."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
from c2al.data.criteo import write_criteo_text
from c2al.data.criteo_world import CriteoWorld
from c2al.data.parquet import write_parquet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ("--hash-size", "500", "--batch-size", "256", "--eval-rows", "1500", "--eval-every", "10", "--quiet")
PARQUET_ROLES = ("--stream", "--label", "label", "--sparse", ",".join(f"cat_{j}" for j in range(26)),
                 "--dense", ",".join(f"int_{j}" for j in range(13)))


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def criteo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("criteo") / "day_0"
    write_criteo_text(path, 9000, seed=4)
    return path


@pytest.fixture(scope="module")
def world_file(tmp_path_factory) -> Path:
    """A Criteo text file with two planted cohorts (region 3 / region 7 conjunctions) whose click rate a baseline sees."""
    path = tmp_path_factory.mktemp("world") / "day_0"
    return CriteoWorld(rows=30_000, chunk_rows=30_000, seed=2, max_vocab=10_000, minority_offset=2.0).write_criteo_text(path)


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    """Two files: every file but the last is train, the last one halves into valid and test (--split-by auto)."""
    folder = tmp_path_factory.mktemp("parquet")
    write_parquet(folder / "part-0.parquet", 8192, seed=5, row_group_rows=128)
    write_parquet(folder / "part-1.parquet", 3000, seed=6, row_group_rows=1000)
    return folder


def test_criteo_text_runs_c2al_in_one_pass(world_file: Path, tmp_path: Path) -> None:
    """Baseline in one pass -> cohorts mined on the bounded validation rows -> C2AL in one pass -> per-cohort test NE."""
    out = tmp_path / "run"
    assert train.main(["--data", f"criteo:{world_file}", "--aux-cohorts", "--cohort-features", "cat_0,cat_1", *SMALL,
                       "--hash-size", "2000", "--eval-rows", "3000", "--out", str(out)]) == 0
    rep = report(out)
    base = rep["history"]["baseline"]
    assert base[-1]["epoch"] == 1 and base[-1]["rows_seen"] == base[-1]["step"] * 256
    assert all(0 < h["progressive_ne"] < 2 for h in base)
    assert [c["id"] for c in rep["cohorts"]] == [0, 1]
    assert all(c["n"] > 0 and c["ne_base"] > 0 and c["ne_c2al"] > 0 for c in rep["cohorts"])
    # region is cat_0, written as (0 << 24) + id: at least one exposed cohort is a planted region (3 or 7)
    traits = [t for c in rep["cohorts"] for t in c["traits"]]
    assert any(t.startswith(("cat_0=00000003 ", "cat_0=00000007 ")) for t in traits), traits
    assert rep["decision"]["shipped"] in ("baseline", "c2al")
    assert (out / "vocab" / "vocab.json").exists() and (out / "c2al.pt").exists()


def test_parquet_folder_streams_with_the_role_flags(parquet_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train.main(["--data", str(parquet_folder), *PARQUET_ROLES, "--aux-cohorts", "--cohort-features", "cat_0,cat_1",
                       *SMALL, "--out", str(out)]) == 0
    rep = report(out)
    assert rep["history"]["baseline"][-1]["step"] == 8192 // 256  # the first file is the whole train split
    assert rep["overall"]["n"] == 1500  # the last file's second half, bounded by --eval-rows


def test_resume_mid_stream_reports_what_a_straight_run_reports(criteo_file: Path, tmp_path: Path, crash_training) -> None:
    flags = ["--data", f"criteo:{criteo_file}", *SMALL, "--checkpoint-every", "5", "--patience", "0"]
    assert train.main([*flags, "--out", str(tmp_path / "straight")]) == 0
    undo = crash_training(13)
    with pytest.raises(KeyboardInterrupt):
        train.main([*flags, "--out", str(tmp_path / "cut")])
    undo()
    assert (tmp_path / "cut" / "vocab" / "vocab.json").exists()
    assert train.main([*flags, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = report(tmp_path / "straight"), report(tmp_path / "cut")
    assert [h["valid_ne"] for h in a["history"]] == [h["valid_ne"] for h in b["history"]]
    assert a["overall"]["ne"] == b["overall"]["ne"]


@pytest.mark.slow
def test_two_processes_read_disjoint_units_and_match_one(parquet_folder: Path, tmp_path: Path) -> None:
    """Row groups of 128 rows = one process's half of a 256-row batch: rank r reads row groups r, r+2, ... and every
    global batch holds the same rows as in a one-process run."""
    flags = ["--data", str(parquet_folder), *PARQUET_ROLES, *SMALL, "--patience", "0"]
    assert train.main([*flags, "--out", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"), *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = report(tmp_path / "one"), report(tmp_path / "two")
    assert b["world_size"] == 2
    assert a["history"][-1]["step"] == b["history"][-1]["step"] == 8192 // 256
    assert a["overall"]["ne"] == pytest.approx(b["overall"]["ne"], rel=2e-3)
    assert a["overall"]["auc"] == pytest.approx(b["overall"]["auc"], abs=2e-3)


@pytest.mark.parametrize("flags, needle", [
    (("--federated",), "--federated needs an in-memory source"),
    (("--model", "two-tower"), "--model two-tower needs an in-memory source"),
])
def test_what_a_stream_cannot_do_is_refused_before_writing(criteo_file: Path, tmp_path: Path, capsys, flags, needle) -> None:
    out = tmp_path / "run"
    assert train.main(["--data", f"criteo:{criteo_file}", *SMALL, *flags, "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not (out / "report.json").exists()


@pytest.mark.slow
def test_two_processes_with_lanes_of_different_lengths_train_every_row(tmp_path: Path) -> None:
    """Three row groups over two ranks: rank 0 reads 512 rows, rank 1 256; rank 1 steps on zero-weight batches
    until rank 0's lane ends, so every full local batch of both lanes is trained (rows_seen adds the ranks up)."""
    folder = tmp_path / "uneven"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", 768, seed=7, row_group_rows=256)
    write_parquet(folder / "part-1.parquet", 3000, seed=8, row_group_rows=1000)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"), "--data", str(folder), *PARQUET_ROLES,
                          *SMALL, "--patience", "0", "--out", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    last = report(tmp_path / "two")["history"][-1]
    assert last["step"] == 4 and last["rows_seen"] == 768


def test_epochs_on_a_stream_is_refused(criteo_file: Path, tmp_path: Path, capsys) -> None:
    assert train.main(["--data", f"criteo:{criteo_file}", *SMALL, "--epochs", "3", "--out", str(tmp_path / "run")]) == 2
    assert "--epochs: a streamed source trains one pass" in capsys.readouterr().err


def test_a_stream_resumes_only_on_the_processes_that_wrote_it(criteo_file: Path, tmp_path: Path) -> None:
    from c2al.config import parse_args
    from c2al.errors import C2ALError
    from c2al.jobs.preflight import check_resume

    flags = ["--data", f"criteo:{criteo_file}", *SMALL, "--checkpoint-every", "5", "--patience", "0", "--out", str(tmp_path)]
    assert train.main(flags) == 0
    cfg = parse_args([*flags, "--resume"])
    check_resume(cfg, tmp_path, 1)  # the same single process: fine
    with pytest.raises(C2ALError, match="written by 1 process.*not 2"):
        check_resume(cfg, tmp_path, 2)
