"""`train.py --aux-cohorts`: the whole method, on every kind of --data, and under torchrun."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# 24k rows: enough validation rows for both planted cohorts to beat the miner's permutation null
SYNTHETIC = "synthetic:n_rows=24000,n_users=1500,n_items=200,minority_shares=0.05/0.04"
FAST = ["--epochs", "1", "--batch-size", "256", "--quiet"]


def run_c2al(out: Path, *extra: str) -> dict:
    assert train.main(["--data", SYNTHETIC, "--aux-cohorts", "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("c2al")
    return out, run_c2al(out)


def test_report_has_the_documented_schema(synthetic_run):
    _, rep = synthetic_run
    assert set(rep) >= {"config", "overall", "cohorts", "attention"}
    assert set(rep["overall"]) >= {"ne_base", "ne_c2al", "ne_diff_pct", "auc_base", "auc_c2al"}
    assert len(rep["cohorts"]) == 2
    for c in rep["cohorts"]:
        assert set(c) >= {"id", "share", "plr", "contrast", "ne_base", "ne_c2al", "ne_diff_pct"}
        assert c["ne_diff_pct"] == pytest.approx((c["ne_c2al"] - c["ne_base"]) / c["ne_base"] * 100)
        assert c["traits"] and all(isinstance(t, str) for t in c["traits"])
    assert rep["config"]["aux_cohorts"] == 2
    assert set(rep["attention"]["baseline"]) >= {"near_zero_share", "attention_entropy", "dead_relu_share"}


def test_run_writes_miner_checkpoints_and_plot(synthetic_run):
    """Each file is what its name says: the fitted miner, two checkpoints of this run's config, a PNG, the config."""
    from c2al.cohorts import CohortMiner
    from c2al.dist.checkpoint import load_checkpoint

    out, rep = synthetic_run
    assert len(CohortMiner.load(out / "cohorts.json").cohorts_) == len(rep["cohorts"]) == 2
    for name in ("baseline.pt", "c2al.pt"):
        ckpt = load_checkpoint(out / name)
        assert ckpt["config"] == rep["config"] and ckpt["model"], name
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name
    assert json.loads((out / "config.json").read_text()) == rep["config"]
    png = (out / "report.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width > 300 and height > 200


def test_served_checkpoint_is_the_plain_model(synthetic_run):
    """The C2AL checkpoint is already stripped: exactly the baseline's parameter names and shapes."""
    out, _ = synthetic_run
    served = torch.load(out / "c2al.pt", weights_only=True)["model"]
    base = torch.load(out / "baseline.pt", weights_only=True)["model"]
    base = {k.removeprefix("model."): v for k, v in base.items()}
    assert {k: tuple(v.shape) for k, v in served.items()} == {k: tuple(v.shape) for k, v in base.items()}


def test_saved_miner_is_reused_with_cohorts_flag(synthetic_run, tmp_path):
    out, rep = synthetic_run
    again = run_c2al(tmp_path, "--cohorts", str(out / "cohorts.json"))
    assert [c["share"] for c in again["cohorts"]] == [c["share"] for c in rep["cohorts"]]


def test_saved_miner_with_other_k_is_refused(synthetic_run, tmp_path, capsys):
    out, _ = synthetic_run
    rc = train.main(["--data", SYNTHETIC, "--aux-cohorts", "1", "--cohorts", str(out / "cohorts.json"), "--out", str(tmp_path), *FAST])
    assert rc == 2 and "holds 2 cohorts but --aux-cohorts is 1" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["attention-fm", "two-tower"])
def test_every_model_runs_c2al(tmp_path, model):
    rep = run_c2al(tmp_path, "--model", model, "--aux-head", "mlp" if model == "two-tower" else "clone")
    # the miner exposes at most K cohorts (those that beat its permutation null); this baseline's scores show 1 or 2
    assert 1 <= len(rep["cohorts"]) <= 2 and rep["overall"]["ne_c2al"] > 0
    if model == "two-tower":
        assert {"baseline", "c2al"} <= set(rep["retrieval"]) and 0 <= rep["retrieval"]["c2al"]["recall@10"] <= 1


def test_c2al_runs_through_torchrec_pipeline(synthetic_run, tmp_path):
    """--pipeline FX-traces the wrapper; the aux heads still train and the result matches eager training."""
    _, eager = synthetic_run
    rep = run_c2al(tmp_path, "--pipeline")
    assert rep["history"]["c2al"][-1]["aux_0"] > 0
    assert rep["overall"]["ne_c2al"] == pytest.approx(eager["overall"]["ne_c2al"], rel=1e-5)


@pytest.mark.slow
def test_c2al_runs_on_movielens(tmp_path):
    rc = train.main(["--aux-cohorts", "--out", str(tmp_path), "--epochs", "1", "--quiet"])
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and rep["config"]["data"] == "movielens-100k" and len(rep["cohorts"]) == 2


def test_c2al_runs_on_a_csv_with_role_flags(train_csv, tmp_path):
    rc = train.main(["--data", str(train_csv), "--label", "click", "--sparse", "user,item,city,hour", "--dense", "x1,x2",
                     "--user-col", "user", "--cohort-features", "age,city", "--aux-cohorts", "--max-share", "0.3",
                     "--out", str(tmp_path), *FAST])
    # one cohort is planted (users over 60): the miner exposes what beats its permutation null, at most --aux-cohorts
    assert rc == 0 and 1 <= len(json.loads((tmp_path / "report.json").read_text())["cohorts"]) <= 2


def test_unknown_cohort_feature_is_named(tmp_path, capsys):
    rc = train.main(["--data", SYNTHETIC, "--aux-cohorts", "--cohort-features", "age_z,shoe_size", "--out", str(tmp_path), *FAST])
    assert rc == 2 and "shoe_size" in capsys.readouterr().err


@pytest.mark.slow
def test_c2al_runs_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"), "--data", SYNTHETIC,
                          "--aux-cohorts", "--out", str(tmp_path), *FAST], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["world_size"] == 2 and len(rep["cohorts"]) == 2
    # Table-wise sharding: each rank's fused optimizer lists only its own tables; the checkpoint holds all of them.
    state = torch.load(tmp_path / "baseline.pt", weights_only=True)
    tables = {k.rsplit(".", 2)[-2] for k in state["model"] if "embedding_bags" in k}
    momenta = {k.rsplit(".", 2)[-2] for k in state["optimizer"]["state"] if "embedding_bags" in k}
    assert len(tables) == 12 and momenta == tables


def test_zero_aux_weight_reproduces_the_baseline_exactly(tmp_path):
    """Same seed, same start, same batches, same dropout masks: with lambda = 0 C2AL is the baseline."""
    rep = run_c2al(tmp_path, "--aux-weight", "0")
    assert rep["overall"]["ne_c2al"] == rep["overall"]["ne_base"]
    assert all(c["ne_c2al"] == c["ne_base"] for c in rep["cohorts"])


def test_clone_head_on_a_parameter_free_over_arch_falls_back_to_linear():
    """TwoTower's over arch is a plain sum: cloning it would make every aux logit equal the main logit."""
    from c2al.config import Config
    from c2al.data.sources import load_splits
    from c2al.jobs.pipeline import make_head
    from c2al.train.build import seeded_model

    cfg = Config(data=SYNTHETIC, model="two-tower", aux_head="clone")
    model = seeded_model(cfg, load_splits(cfg).schema)
    head = make_head(cfg, model)
    assert not isinstance(head, torch.nn.Module) and sum(p.numel() for p in head(8).parameters()) == 9
