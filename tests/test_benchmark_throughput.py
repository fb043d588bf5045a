"""benchmarks/throughput.py --quick: the result file's structure, and that the stripped model is the baseline's size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
ROWS = ("tables_only", "afm_reference", "afm_lean", "afm_lean_heads", "attention_fm", "attention_fm_heads",
        "afm_lean_embeddingbag", "deepctr_afm", "torchfm_afm")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_report_records_config_and_machine(report: dict) -> None:
    assert report["quick"] is True
    assert report["config"]["fields"] == 26 and len(report["vocabs"]) == 26
    for key in ("cpu", "cores", "torch", "load_avg_at_start", "load_avg_at_end", "torch_threads"):
        assert key in report["machine"]
    assert report["command"].startswith("python benchmarks/throughput.py --quick") and report["wall_s"] > 0
    assert report["wall_s"] >= sum(report["part_seconds"].values())


@pytest.mark.slow
def test_every_grid_row_reports_speed_memory_and_ne_or_why_not(report: dict) -> None:
    assert set(report["rows"]) == set(ROWS)
    for name, row in report["rows"].items():
        if "error" in row:  # a third-party library that cannot run says why
            assert name in ("deepctr_afm", "torchfm_afm"), row["error"]
            continue
        assert row["train_eps"] > 0 and row["infer_eps"] > 0 and row["peak_rss_mb"] > 0, name
        assert "ne" in row and "params" in row
        # the step and the input pipeline are timed apart, and together as a loop without prefetching runs them
        assert row["input_eps"] > 0 and row["train_with_input_eps"] == pytest.approx(
            1 / (1 / row["train_eps"] + 1 / row["input_eps"]), rel=1e-9), name


@pytest.mark.slow
def test_columns_say_what_they_time_and_the_tables_row_claims_no_quality(report: dict) -> None:
    assert {"train_eps", "input_eps", "train_with_input_eps", "infer_eps"} <= set(report["columns"])
    assert report["config"]["dropout"] == 0.2
    tables = report["rows"]["tables_only"]
    assert tables["ne"] is None and tables["auc"] is None  # its predict is a lookup, not a model


def test_tables_row_times_a_real_lookup() -> None:
    """Its predict goes through the sharded tables (rows differ), not a constant."""
    import throughput_variants as tv  # benchmarks/ is on the test path (pytest.ini)

    variant = tv.tables_only(tv.QUICK)
    p = variant.predict(tv.to_batch(tv.make_data(tv.QUICK, 64, seed=3), 0, 64))
    assert p.shape == (64,) and float(p.std()) > 0 and not variant.scores


@pytest.mark.slow
def test_stripped_model_serves_the_baseline_parameters(report: dict) -> None:
    rows = report["rows"]
    for heads, base in (("afm_lean_heads", "afm_lean"), ("attention_fm_heads", "attention_fm")):
        assert rows[heads]["stripped_params"] == rows[base]["params"]
        assert rows[heads]["stripped_infer_eps"] > 0
        assert rows[heads]["stripped_ne"] == pytest.approx(rows[heads]["ne"])
        # timed against a fresh baseline of the same architecture in the same process
        assert rows[heads]["stripped_params_equal_baseline"] is True
        same = rows[heads]["same_process_infer_eps"]
        assert set(same) == {"stripped", "baseline"} and min(same.values()) > 0
        assert report["ratios"][f"{heads}_stripped_vs_baseline_infer_same_process"] == pytest.approx(
            same["stripped"] / same["baseline"])


@pytest.mark.slow
def test_ratios_miner_and_scaling_are_reported(report: dict) -> None:
    assert report["ratios"]["afm_lean_vs_reference_train"] > 0
    assert {r["estimator"] for r in report["miner"]} == {"c2al_CohortMiner", "sklearn_KMeans", "sklearn_MiniBatchKMeans"}
    assert {(r["world_size"], r["sharding"]) for r in report["scaling"]} == {
        (w, s) for w in (1, 2) for s in ("table_wise", "column_wise")}
    assert all("train_eps" in r for r in report["scaling"]), report["scaling"]
    assert set(report["part_seconds"]) == {"rows", "miner", "scaling"} and all(r["seconds"] > 0 for r in report["rows"].values())


def test_quick_mode_refuses_to_overwrite_the_committed_results(capsys: pytest.CaptureFixture[str]) -> None:
    import throughput

    with pytest.raises(SystemExit) as stopped:
        throughput.main(["--quick"])
    assert stopped.value.code != 0 and "--quick must write elsewhere (--out PATH)" in capsys.readouterr().err
