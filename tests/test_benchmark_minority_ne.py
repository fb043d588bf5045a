"""benchmarks/minority_ne.py: its statistics on hand-computed numbers, its cohorts, and one --quick run's JSON."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "minority_ne.py"


def _load():
    spec = importlib.util.spec_from_file_location("minority_ne", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["minority_ne"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --- statistics (paired_ci is the harness's: tests/test_benchmark_harness.py) ---------------------


def test_paired_t_test_matches_the_closed_form_t_cdf_with_four_degrees_of_freedom():
    # t = 3 / sqrt(0.5) = sqrt(18); for nu = 4, F(t) = 1/2 + 3/8 * u * (1 - t^2 / (12 (1 + t^2 / 4))), u = t / sqrt(1 + t^2 / 4)
    t2 = 18.0
    u = math.sqrt(t2) / math.sqrt(1 + t2 / 4)
    cdf = 0.5 + 3 / 8 * u * (1 - t2 / (12 * (1 + t2 / 4)))
    assert bench.paired_tests([1.0, 2.0, 3.0, 4.0, 5.0])["t_p"] == pytest.approx(2 * (1 - cdf), rel=1e-9)


def test_wilcoxon_of_five_positive_differences_is_two_of_thirty_two_sign_patterns():
    assert bench.paired_tests([0.3, 1.0, 2.0, 4.0, 8.0])["wilcoxon_p"] == pytest.approx(2 / 32, abs=1e-12)


def test_all_zero_differences_are_not_significant():
    assert bench.paired_tests([0.0, 0.0, 0.0]) == {"t_p": 1.0, "wilcoxon_p": 1.0}


def test_describe_counts_only_finite_values():
    d = bench.describe([1.0, float("nan"), 3.0])
    assert d["n"] == 2 and d["mean"] == pytest.approx(2.0)


# --- cohorts of the control arms ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_splits():
    from c2al.config import Config
    from c2al.data.sources import load_splits

    return load_splits(Config(data=bench.QUICK_DATA))


def test_random_cohorts_are_disjoint_user_sets_matching_the_mined_train_shares(tiny_splits):
    train = tiny_splits.train
    mined = np.full(len(train), -1)
    mined[: len(train) // 10] = 0
    mined[len(train) // 10: len(train) // 10 + len(train) // 20] = 1
    ids = bench.random_cohorts(tiny_splits, mined, 2, seed=3)
    biggest = np.unique(train.user_ids, return_counts=True)[1].max()
    for c in (0, 1):
        got, want = int((ids["train"] == c).sum()), int((mined == c).sum())
        assert want <= got < want + biggest  # the last user added crosses the target
        users = set(train.user_ids[ids["train"] == c].tolist())
        assert all((ids["train"][np.isin(train.user_ids, list(users))] == c))  # every row of a chosen user
    assert not np.array_equal(ids["train"], bench.random_cohorts(tiny_splits, mined, 2, seed=4)["train"])


# --- one --quick run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("minority_ne") / "quick.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_json_and_png_where_out_says(quick):
    path, result = quick
    assert min(png_size(path.with_suffix(".png"))) > 100
    assert {"config", "machine", "rows", "summary", "seconds", "seeds"} <= set(result)
    assert result["quick"] is True and result["seeds"] == [0, 1] and result["config"]["args"]["workers"] == 2


@pytest.mark.slow
def test_quick_run_has_one_baseline_and_every_arm_per_seed_and_model(quick):
    _, result = quick
    for model, arms in (("afm", ["baseline", *bench.QUICK_ARMS]), ("two-tower", ["baseline", "c2al"])):
        for seed in (0, 1):
            got = [r["arm"] for r in result["rows"] if r["model"] == model and r["seed"] == seed]
            assert sorted(got) == sorted(arms)


@pytest.mark.slow
def test_every_arm_is_scored_on_the_same_mined_cohorts_of_its_seed(quick):
    _, result = quick
    for seed in (0, 1):
        arms = [r for r in result["rows"] if r["model"] == "afm" and r["seed"] == seed and r["arm"] != "baseline"]
        base_ne = {(c["id"], c["n"], c["ne_base"]) for r in arms for c in r["cohorts"]}
        assert len(base_ne) == 2  # cohort 0 and 1: one size and one baseline NE across all arms
        assert all(len(r["own_cohorts"]) == 2 for r in arms if r["arm"] in ("random_cohorts", "least_contrast"))


@pytest.mark.slow
def test_summary_mean_and_interval_recompute_from_the_per_seed_rows(quick):
    _, result = quick
    for arm in bench.QUICK_ARMS:
        rows = [r for r in result["rows"] if r["model"] == "afm" and r["arm"] == arm]
        diffs = [r["overall"]["ne_diff_pct"] for r in rows]
        for r in rows:
            o = r["overall"]
            assert o["ne_diff_pct"] == pytest.approx((o["ne_c2al"] - o["ne_base"]) / o["ne_base"] * 100)
        s = result["summary"]["afm"][arm]["overall"]
        half = 12.706204736174698 * np.std(diffs, ddof=1) / math.sqrt(2)  # t(0.975, 1)
        assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(diffs))
        assert s["ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half])
        assert {"t_p", "wilcoxon_p", "values"} <= set(s)


@pytest.mark.slow
def test_gate_decision_recomputes_from_validation_and_shipped_ne_follows_it(quick):
    from c2al.eval.compare import judge_on_validation

    _, result = quick
    base = {r["seed"]: r["valid"] for r in result["rows"] if r["model"] == "afm" and r["arm"] == "baseline"}
    for r in result["rows"]:
        if r["model"] != "afm" or r["arm"] == "baseline":
            continue
        assert r["decision"]["shipped"] == judge_on_validation(base[r["seed"]], r["valid"], 0.0)["shipped"]
    for arm in bench.QUICK_ARMS:
        s = result["summary"]["afm"][arm]
        rows = sorted((r for r in result["rows"] if r["model"] == "afm" and r["arm"] == arm), key=lambda r: r["seed"])
        want = [r["overall"]["ne_diff_pct"] if r["decision"]["shipped"] == "c2al" else 0.0 for r in rows]
        assert s["shipped_overall"]["values"] == pytest.approx(want)
        assert s["gate_kept"] == f"{sum(r['decision']['shipped'] == 'baseline' for r in rows)}/{len(rows)}"


@pytest.mark.slow
def test_every_training_is_early_stopped_and_keeps_its_best_epoch(quick):
    _, result = quick
    for r in result["rows"]:
        if r.get("history"):
            assert r["best"]["valid_ne"] == min(h["valid_ne"] for h in r["history"])


@pytest.mark.slow
def test_controls_are_compared_with_c2al_and_heads_were_trained(quick):
    _, result = quick
    assert "minus_c2al" in result["summary"]["afm"]["random_cohorts"]
    assert all(r["head_update_norm"] > 0 for r in result["rows"] if "head_update_norm" in r)
    assert {r["arm"] for r in result["rows"] if "head_update_norm" not in r} == {"baseline", "cohort_feature", "cohort_bias"}
    tt = result["summary"]["two-tower"]["c2al"]
    assert {"recall@10_diff", "ndcg@10_diff"} <= set(tt)
    assert set(result["summary"]["afm"]["c2al"]["attention"]) >= {"near_zero_share", "attention_entropy", "dead_relu_share"}


@pytest.mark.slow
def test_rows_from_the_spawned_workers_equal_an_in_process_run(quick, tmp_path):
    """--quick trains in 2 spawned workers; one task again in this process gives the same numbers."""
    _, result = quick
    cfg = bench.base_config(bench.parse(["--quick", "--out", str(tmp_path / "x.json")]))
    rows = bench.run_task(cfg, 1, "afm", list(bench.QUICK_ARMS))
    want = {r["arm"]: r for r in result["rows"] if r["model"] == "afm" and r["seed"] == 1}
    assert sorted(r["arm"] for r in rows) == sorted(want)
    for r in rows:  # to 1e-8: the workers and this process may sum in another thread order
        assert (r["ne"] if r["arm"] == "baseline" else r["overall"]["ne_c2al"]) == pytest.approx(
            want[r["arm"]]["ne"] if r["arm"] == "baseline" else want[r["arm"]]["overall"]["ne_c2al"], abs=1e-8)


def test_unknown_model_or_arm_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.parse(["--control-models", "dlrm", "--arms", "c2al,nope"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "'dlrm'" in err and "'nope'" in err


@pytest.mark.slow
def test_a_csv_with_role_flags_runs_in_process_and_names_its_result_after_the_file(train_csv, tmp_path, capsys):
    flags = ["--data", str(train_csv), "--label", "click", "--sparse", "user,item,city,hour", "--dense", "x1,x2",
             "--user-col", "user", "--cohort-features", "age,city", "--max-share", "0.3"]
    run = [*flags, "--seeds", "2", "--models", "afm", "--arms", "least_contrast", "--epochs", "1",
           "--workers", "1", "--out", str(tmp_path / "csv.json"), "--parts", str(tmp_path / "parts")]
    result = bench.main(run)
    # each (seed, model) task was kept as it ended; the next run reads them instead of training, --redo trains again
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "parts").glob("*.json")) == ["seed0", "seed1"]
    capsys.readouterr()
    again = bench.main(run)
    assert "2 of 2 (seed, model) tasks read from" in capsys.readouterr().out and again["rows"] == result["rows"]
    redone = bench.main([*run, "--redo"])
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert "tasks read from" not in capsys.readouterr().out and untimed(redone["rows"]) == untimed(result["rows"])  # seeded
    assert result["data"] == str(train_csv) and result["config"]["args"]["workers"] == 1
    assert sorted((r["seed"], r["arm"]) for r in result["rows"]) == [
        (s, a) for s in (0, 1) for a in ("baseline", "c2al", "least_contrast")]
    least = [r for r in result["rows"] if r["arm"] == "least_contrast"]
    assert all(len(r["own_cohorts"]) == 2 and r["own_cohorts"] != r["cohorts"] for r in least)
    assert min(png_size(tmp_path / "csv.png")) > 100
    assert bench.result_path(bench.parse(flags)) == bench.RESULTS / "minority_ne_clicks.json"


def test_quick_without_out_is_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.parse(["--quick"])
    assert stopped.value.code == 2 and "--quick needs --out" in capsys.readouterr().err


# --- the reviewers' baselines: Holm adjustment and the group-robust / multi-task arms -------------------------------


def test_holm_adjustment_of_hand_made_p_values_steps_down_and_stays_monotone():
    # sorted: 0.002 x 4, 0.01 x 3, 0.03 x 2, then 0.04 x 1 = 0.04 < 0.06 keeps the running maximum
    assert bench.holm([0.01, 0.04, 0.03, 0.002]) == pytest.approx([0.03, 0.06, 0.06, 0.008])
    assert bench.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    got = bench.holm([0.2, float("nan")])
    assert got[0] == pytest.approx(0.2) and math.isnan(got[1])  # nan is no test of the family


def test_add_holm_adjusts_each_metric_and_test_over_the_arms_of_one_model():
    summary = {"afm": {"a": {"overall": {"t_p": 0.01, "wilcoxon_p": 0.5}, "exposed": {"t_p": 0.04, "wilcoxon_p": 0.5}},
                       "b": {"overall": {"t_p": 0.03, "wilcoxon_p": 0.25}, "exposed": {"t_p": 0.2, "wilcoxon_p": 0.5}},
                       "c": {"overall": {"t_p": 0.02, "wilcoxon_p": 0.5}, "gate_kept": "0/2"}},
               "two-tower": {"c2al": {"overall": {"t_p": 0.01, "wilcoxon_p": 0.5}}}}
    bench.add_holm(summary)
    afm = summary["afm"]
    assert [afm[a]["overall"]["t_p_holm"] for a in "abc"] == pytest.approx([0.03, 0.04, 0.04])
    assert [afm[a]["exposed"]["t_p_holm"] for a in "ab"] == pytest.approx([0.08, 0.2])  # a family of the two arms that have it
    assert [afm[a]["overall"]["wilcoxon_p_holm"] for a in "abc"] == pytest.approx([1.0, 0.75, 1.0])
    assert summary["two-tower"]["c2al"]["overall"]["t_p_holm"] == pytest.approx(0.01)  # its own family of one


NEW_ARMS = ("group_dro", "cvar_dro", "shared_bottom", "mmoe")


@pytest.fixture(scope="module")
def new_arms(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("minority_ne_new") / "new.json"
    return bench.main(["--data", bench.QUICK_DATA, "--seeds", "2", "--models", "afm", "--arms", ",".join(NEW_ARMS), "--epochs", "1",
                       "--workers", "1", "--dro-eta", "0.1", "--out", str(out)])


@pytest.mark.slow
def test_the_new_arms_are_in_the_summary_with_overall_exposed_and_cohort_entries(new_arms):
    summary = new_arms["summary"]["afm"]
    assert set(NEW_ARMS) | {"c2al"} == set(summary)
    k = len(new_arms["rows"][0]["mined"])
    for arm in NEW_ARMS:
        assert {"overall", "exposed", *(f"cohort_{c}" for c in range(k))} <= set(summary[arm])
        assert summary[arm]["overall"]["n"] == 2


@pytest.mark.slow
def test_holm_keys_recompute_from_the_raw_p_values_of_the_family(new_arms):
    summary = new_arms["summary"]["afm"]
    for metric in ("overall", "exposed"):
        family = [a for a in summary if metric in summary[a]]
        want = bench.holm([summary[a][metric]["t_p"] for a in family])
        for arm, p in zip(family, want):
            got = summary[arm][metric]["t_p_holm"]
            assert (math.isnan(got) and math.isnan(p)) or got == pytest.approx(p)
            assert math.isnan(got) or got >= summary[arm][metric]["t_p"]


@pytest.mark.slow
def test_robust_arms_train_no_heads_and_group_dro_keeps_normalised_group_weights(new_arms):
    rows = {r["arm"]: r for r in new_arms["rows"] if r["seed"] == 0}
    assert "head_update_norm" not in rows["group_dro"] and "head_update_norm" not in rows["cvar_dro"]
    q = rows["group_dro"]["group_weights"]
    assert len(q) == len(rows["baseline"]["mined"]) + 1 and sum(q) == pytest.approx(1.0)
    assert rows["shared_bottom"]["head_update_norm"] > 0 and rows["mmoe"]["head_update_norm"] > 0
    assert rows["shared_bottom"]["aux_weight"] == 1.0 and rows["mmoe"]["spec"]["towers"] == "mmoe"
    assert set(rows["mmoe"]["attention"]["c2al"]) >= {"near_zero_share", "attention_entropy"}  # the served MMoE still reads


@pytest.mark.slow
def test_the_result_file_starts_with_the_harness_header(new_arms):
    import harness

    assert set(harness.HEADER_KEYS) <= set(new_arms) and new_arms["benchmark"] == "minority_ne"
    assert "--arms" in new_arms["command"] and new_arms["config"]["base"]["dro_eta"] == 0.1


def test_mmoe_is_left_out_on_the_two_tower_and_run_elsewhere(tmp_path, capsys):
    args = bench.parse(["--models", "afm,two-tower", "--arms", "mmoe,cvar_dro", "--out", str(tmp_path / "x.json")])
    per_seed = dict(bench.plan(args, 1000, 1))
    assert [a.name for a in per_seed["afm"]] == ["c2al", "mmoe", "cvar_dro"]
    assert [a.name for a in per_seed["two-tower"]] == ["c2al", "cvar_dro"]
    assert "mmoe on two-tower" in capsys.readouterr().out
