"""Early stopping: every training keeps its best validation evaluation's weights, resumes with them, and
--patience 0 keeps training to the last epoch as before."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Large learning rates on 3,200 training rows: validation NE bottoms out after an epoch or two, then climbs.
OVERFIT = ("--lr", "0.03", "--table-lr", "0.5", "--dropout", "0")


def args(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(csv), "--label", "click", "--sparse", "user,item,city,hour", "--dense", "x1,x2",
            "--user-col", "user", "--item-col", "item", "--batch-size", "256", "--out", str(out), "--quiet", *OVERFIT, *extra]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def overfit_run(train_csv, tmp_path_factory) -> dict:
    """Up to 8 epochs with patience 2 on a run that overfits."""
    out = tmp_path_factory.mktemp("overfit")
    assert train.main(args(train_csv, out, "--epochs", "8", "--patience", "2")) == 0
    return report(out)


def test_overfitting_run_stops_two_evaluations_after_its_best(overfit_run):
    history, best = overfit_run["history"], overfit_run["best"]
    assert best["epoch"] < history[-1]["epoch"] < 8, "the run should overfit and stop before --epochs"
    assert len(history) == best["epoch"] + 2
    assert best["valid_ne"] == min(h["valid_ne"] for h in history)
    assert all(h["valid_ne"] >= best["valid_ne"] for h in history[best["epoch"]:])


def test_kept_weights_are_the_best_epochs(overfit_run, train_csv, tmp_path):
    """Training only up to the best epoch (no early stopping) ends on the same weights, so the same test NE."""
    best = overfit_run["best"]["epoch"]
    assert train.main(args(train_csv, tmp_path, "--epochs", str(best), "--patience", "0")) == 0
    assert report(tmp_path)["overall"]["ne"] == overfit_run["overall"]["ne"]


def test_patience_zero_trains_every_epoch_and_keeps_the_last(train_csv, tmp_path):
    assert train.main(args(train_csv, tmp_path, "--epochs", "4", "--patience", "0")) == 0
    rep = report(tmp_path)
    assert [h["epoch"] for h in rep["history"]] == [1, 2, 3, 4]
    assert rep["best"]["epoch"] == 4 and rep["best"]["valid_ne"] == rep["history"][-1]["valid_ne"]
    assert not (tmp_path / "checkpoint.best.pt").exists()


def test_resume_after_the_best_epoch_restores_the_best_weights(overfit_run, train_csv, tmp_path):
    """Cut after the best epoch, resume: same stop, same kept epoch, same test NE as the straight run."""
    cut = overfit_run["best"]["epoch"] + 1
    assert train.main(args(train_csv, tmp_path, "--epochs", str(cut), "--patience", "2")) == 0
    assert (tmp_path / "checkpoint.best.pt").exists()
    assert train.main(args(train_csv, tmp_path, "--epochs", "8", "--patience", "2", "--resume")) == 0
    rep = report(tmp_path)
    assert rep["best"] == overfit_run["best"]
    assert [h["valid_ne"] for h in rep["history"]] == [h["valid_ne"] for h in overfit_run["history"]]
    assert rep["overall"]["ne"] == overfit_run["overall"]["ne"]


def test_resume_mid_epoch_carries_the_loss_sums(train_csv, tmp_path, crash_training):
    """A crash mid-epoch and a resume report the same per-epoch training loss as a straight run."""
    straight = tmp_path / "straight"
    assert train.main(args(train_csv, straight, "--epochs", "2", "--patience", "0")) == 0
    undo = crash_training(7)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(train_csv, tmp_path / "cut", "--epochs", "2", "--patience", "0", "--checkpoint-every", "5"))
    undo()
    assert train.main(args(train_csv, tmp_path / "cut", "--epochs", "2", "--patience", "0", "--checkpoint-every", "5", "--resume")) == 0
    a, b = report(straight)["history"], report(tmp_path / "cut")["history"]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-9)
    assert report(tmp_path / "cut")["train_seconds"] > 0


def test_eval_every_validates_between_epoch_ends(train_csv, tmp_path):
    assert train.main(args(train_csv, tmp_path, "--epochs", "1", "--patience", "0", "--eval-every", "4")) == 0
    steps = [h["step"] for h in report(tmp_path)["history"]]
    assert steps == [4, 8, 12]  # 3,200 train rows / 256 = 12 steps per epoch
