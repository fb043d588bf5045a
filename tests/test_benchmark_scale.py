"""benchmarks/scale.py and benchmarks/scale_study.py: worlds that share their prefix on disk, random cohorts dealt
by pair, the merge of per-run files into intervals, and a tiny end-to-end grid of every arm."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scale
import scale_study

from c2al.errors import C2ALError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_world_sizes_share_their_generated_files(tmp_path: Path) -> None:
    small = scale.world_folder(tmp_path, 20_000, 0, 10_000, 1_000)
    large = scale.world_folder(tmp_path, 30_000, 0, 10_000, 1_000)
    assert sorted(p.name for p in small.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "zz-eval.parquet"]
    assert (small / "part-00001.parquet").stat().st_ino == (large / "part-00001.parquet").stat().st_ino  # one file, two links
    assert len(pd.read_parquet(large / "part-00002.parquet")) == 10_000
    assert len(pd.read_parquet(large / "zz-eval.parquet")) == 2_000
    with pytest.raises(C2ALError, match="not a multiple of --chunk-rows"):
        scale.world_folder(tmp_path, 25_000, 0, 10_000, 1_000)


def test_random_cohorts_deal_each_user_pair_to_one_cohort_with_the_given_shares() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"cat_0": rng.integers(0, 300, 60_000).astype(str), "cat_1": rng.integers(0, 300, 60_000).astype(str)})
    ids = scale_study.random_cohorts(np.array([0.05, 0.03]), seed=1)(frame)
    per_pair = pd.Series(ids).groupby([frame["cat_0"], frame["cat_1"]]).nunique()
    assert (per_pair == 1).all()  # a pair's rows always land together
    assert np.mean(ids == 0) == pytest.approx(0.05, abs=0.01) and np.mean(ids == 1) == pytest.approx(0.03, abs=0.01)
    assert set(np.unique(ids)) == {-1, 0, 1}
    other = scale_study.random_cohorts(np.array([0.05, 0.03]), seed=2)(frame)
    assert np.mean(other == ids) < 0.95  # another seed deals other pairs


def test_merge_gives_intervals_over_seeds_per_model_arm_and_rows(tmp_path: Path) -> None:
    for seed, diff in enumerate([-1.0, -3.0]):
        for arm, result in (("baseline", {"ne_overall": 0.9, "ne_exposed": 0.95, "ne_planted": 1.0}),
                            ("c2al", {"overall": diff, "exposed": 2 * diff, "planted": 0.5, "attention": {"all_rows": {}}})):
            (tmp_path / f"run-afm-1000-s{seed}-{arm}.json").write_text(json.dumps(
                {"config": {"model": "afm", "rows": 1000, "seed": seed, "arm": arm}, "result": result}))
    merged = scale_study.merge(tmp_path)
    cell = merged["summary"]["afm"]["c2al"]["1000"]
    assert cell["n_seeds"] == 2 and cell["overall"]["mean"] == -2.0 and cell["exposed"]["mean"] == -4.0
    lo, hi = cell["overall"]["ci95"]
    assert lo < -2.0 < hi
    assert merged["summary"]["afm"]["baseline"]["1000"]["ne_overall"]["mean"] == 0.9
    assert len(merged["activity"]["afm"]["c2al"]["1000"]) == 2


def test_merge_keeps_another_field_set_apart_with_its_attention(tmp_path: Path) -> None:
    for fields, diff in (("39", -1.0), ("8", -5.0)):
        (tmp_path / f"run-afm-1000-s0-c2al{scale_study.fields_tag(fields)}.json").write_text(json.dumps(
            {"config": {"model": "afm", "rows": 1000, "seed": 0, "arm": "c2al", "fields": fields},
             "result": {"overall": diff, "exposed": diff, "planted": diff, "attention": {"planted_rows": {"share": float(fields)}}}}))
    merged = scale_study.merge(tmp_path)
    assert merged["summary"]["afm"]["c2al"]["1000"]["overall"]["mean"] == -1.0
    assert merged["by_fields"]["8"]["afm"]["c2al"]["1000"]["overall"]["mean"] == -5.0
    assert merged["activity"]["afm"]["c2al"]["1000"] == [{"planted_rows": {"share": 39.0}}]
    assert merged["activity_by_fields"]["8"]["afm"]["c2al"]["1000"] == [{"planted_rows": {"share": 8.0}}]


@pytest.mark.slow
def test_a_tiny_grid_runs_every_arm_and_merges(tmp_path: Path) -> None:
    args = ["--rows", "20000", "--chunk-rows", "10000", "--seeds", "0,", "--models", "attention-fm", "--eval-rows", "2000",
            "--eval-every", "10", "--batch-size", "512", "--threads", "1", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "results")]
    assert scale_study.main(args) == 0
    merged = json.loads((tmp_path / "results" / "merged.json").read_text())
    arms = merged["summary"]["attention-fm"]
    assert set(arms) == set(scale_study.ARMS)
    baseline = json.loads((tmp_path / "results" / "run-attention-fm-20000-s0-baseline.json").read_text())["result"]
    assert baseline["n_planted"] > 0 and 0 < baseline["ne_overall"] < 1.5
    for arm in ("c2al", "random_cohorts", "cohort_feature"):
        result = json.loads((tmp_path / "results" / f"run-attention-fm-20000-s0-{arm}.json").read_text())["result"]
        assert "skipped" in result or np.isfinite(result["overall"]), arm
    assert scale_study.main([*args, "--merge-only"]) == 0  # the files already there are not trained again
    assert (tmp_path / "results" / "merged.png").stat().st_size > 10_000  # NE_diff against rows, per arm


@pytest.mark.slow
def test_the_8_field_view_of_a_world_trains_on_its_own_files_and_merges_apart(tmp_path: Path) -> None:
    args = ["--rows", "20000", "--chunk-rows", "10000", "--seeds", "0,", "--models", "afm", "--eval-rows", "2000",
            "--eval-every", "10", "--batch-size", "512", "--threads", "1", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--arms", "baseline,c2al"]
    assert scale_study.main([*args, "--fields", "8"]) == 0
    run = json.loads((tmp_path / "results" / "run-afm-20000-s0-baseline-f8.json").read_text())
    assert run["config"]["fields"] == "8" and (tmp_path / "results" / "mined-afm-20000-s0-f8" / "cohorts.json").exists()
    cfg = scale_study.study_config(tmp_path, "afm", 0, scale_study.argparse.Namespace(fields="8", batch_size=512, eval_every=10,
                                                                                      eval_rows=2000))
    assert len(cfg.sparse) == 8 and cfg.dense == () and len(cfg.hash_size) == 8
    merged = json.loads((tmp_path / "results" / "merged.json").read_text())
    assert merged["summary"] == {} and set(merged["by_fields"]["8"]["afm"]) == {"baseline", "c2al"}
    assert not (tmp_path / "results" / "run-afm-20000-s0-baseline.json").exists()  # the 39-field grid's file is untouched


def test_study_refuses_an_unknown_arm() -> None:
    with pytest.raises(SystemExit):
        scale_study.main(["--arms", "c2al,magic", "--merge-only"])


def test_scale_runs_merge_into_one_list(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(scale, "RESULTS", tmp_path)
    run = {"result": {"rows": 1000, "model": "afm", "peak_rss_mb": 900.0, "examples_per_s": 5000.0, "wall_s": 1.0},
           "machine": {"cpu": "x", "load_avg_at_end": [1.0, 1.0, 1.0]}}
    (tmp_path / "run-afm-1000.json").write_text(json.dumps(run))
    merged = scale.merge()
    assert merged["runs"][0]["peak_rss_mb"] == 900.0 and merged["runs"][0]["load_avg"] == [1.0, 1.0, 1.0]
    assert merged["reader"] is None
