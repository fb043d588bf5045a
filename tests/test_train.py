"""train.py end to end on a small tabular file: reports, resume, torchrun, errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def args(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(csv), "--label", "click", "--sparse", "user,item,city,hour", "--dense", "x1,x2",
            "--user-col", "user", "--item-col", "item", "--cohort-features", "city,age", "--epochs", "2",
            "--batch-size", "256", "--out", str(out), "--quiet", *extra]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_baseline_writes_report_with_config(train_csv, tmp_path):
    assert train.main(args(train_csv, tmp_path)) == 0
    rep = report(tmp_path)
    assert rep["config"]["model"] == "afm" and rep["config"]["epochs"] == 2
    assert 0 < rep["overall"]["ne"] < 1 and rep["overall"]["auc"] > 0.6
    from c2al.dist.checkpoint import load_checkpoint

    assert json.loads((tmp_path / "config.json").read_text()) == rep["config"]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # the last step's, of this config, with the optimizer to resume
    assert ckpt["config"] == rep["config"] and ckpt["step"] > 0 and ckpt["model"] and ckpt["optimizer"]


@pytest.mark.parametrize("model", ["attention-fm", "two-tower"])
def test_each_model_trains_from_the_cli(train_csv, tmp_path, model):
    assert train.main(args(train_csv, tmp_path, "--model", model)) == 0
    assert report(tmp_path)["overall"]["ne"] < 1.0


def test_two_tower_trains_with_in_batch_softmax(train_csv, tmp_path):
    assert train.main(args(train_csv, tmp_path, "--model", "two-tower", "--two-tower-loss", "softmax")) == 0
    assert np.isfinite(report(tmp_path)["history"][-1]["loss"])


def test_same_seed_same_result(train_csv, tmp_path):
    train.main(args(train_csv, tmp_path / "a"))
    train.main(args(train_csv, tmp_path / "b"))
    assert report(tmp_path / "a")["overall"] == report(tmp_path / "b")["overall"]


def test_pipeline_flag_trains_through_torchrec_pipeline_with_the_same_result(train_csv, tmp_path, monkeypatch):
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    used = []
    real = TrainPipelineSparseDist.progress
    monkeypatch.setattr(TrainPipelineSparseDist, "progress", lambda self, it: used.append(1) or real(self, it))
    train.main(args(train_csv, tmp_path / "eager"))
    assert not used
    train.main(args(train_csv, tmp_path / "pipelined", "--pipeline"))
    assert used, "--pipeline did not go through TrainPipelineSparseDist"
    a, b = report(tmp_path / "eager"), report(tmp_path / "pipelined")
    assert a["overall"]["ne"] == pytest.approx(b["overall"]["ne"], rel=1e-5)


def test_resume_continues_where_it_stopped(train_csv, tmp_path):
    train.main(args(train_csv, tmp_path / "straight"))
    train.main(args(train_csv, tmp_path / "split", "--epochs", "1"))
    train.main(args(train_csv, tmp_path / "split", "--epochs", "2", "--resume"))
    a, b = report(tmp_path / "straight"), report(tmp_path / "split")
    assert b["history"][0]["epoch"] == 1 and len(b["history"]) == 2
    assert a["overall"]["ne"] == pytest.approx(b["overall"]["ne"], rel=1e-5)


def test_resume_mid_epoch_from_step_checkpoint(train_csv, tmp_path, monkeypatch):
    import c2al.train.loop as centralized

    train.main(args(train_csv, tmp_path / "straight"))
    original = centralized.train_epoch

    def crash_at_step_7(*a, on_step=None, **kw):
        def hook(n, loss):
            on_step(n, loss)
            if n == 7:
                raise KeyboardInterrupt("simulated crash")
        return original(*a, on_step=hook, **kw)

    monkeypatch.setattr(centralized, "train_epoch", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(train_csv, tmp_path / "cut", "--checkpoint-every", "5"))
    monkeypatch.setattr(centralized, "train_epoch", original)
    assert not (tmp_path / "cut" / "report.json").exists()
    train.main(args(train_csv, tmp_path / "cut", "--checkpoint-every", "5", "--resume"))
    assert report(tmp_path / "straight")["overall"]["ne"] == pytest.approx(report(tmp_path / "cut")["overall"]["ne"], rel=1e-5)


def test_resume_refuses_checkpoint_of_other_config(train_csv, tmp_path, capsys):
    train.main(args(train_csv, tmp_path, "--epochs", "1"))
    rc = train.main(args(train_csv, tmp_path, "--embedding-dim", "8", "--resume"))
    assert rc == 2 and "embedding_dim" in capsys.readouterr().err


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--label", "nope"], "nope"),
        (["--dense", "x1,missing"], "missing"),
        (["--batch-size", "100000"], "batch-size"),
        (["--data", "/no/such/file.csv"], "/no/such/file.csv"),
        (["--table-optimizer", "adam"], "adam"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_error(train_csv, tmp_path, extra, needle):
    res = run_cli(*args(train_csv, tmp_path), *extra)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0]


@pytest.mark.slow
def test_two_processes_match_one(train_csv, tmp_path):
    """torchrun with 2 gloo processes sees the same global batches as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(args(train_csv, one)) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"), *args(train_csv, two)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = report(one), report(two)
    assert b["world_size"] == 2
    assert a["overall"]["ne"] == pytest.approx(b["overall"]["ne"], rel=2e-3)
    assert a["overall"]["auc"] == pytest.approx(b["overall"]["auc"], abs=2e-3)
