"""benchmarks/harness.py: seeds, the paired interval, the worker pool and the result-file header."""
from __future__ import annotations

import json
import math

import harness
import pytest

from c2al.errors import C2ALError


def square_plus(x: int, y: int) -> int:
    """A task for the pool (module level: spawned workers import it by name)."""
    return x * x + y


def fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("task two fails")
    return x


def test_seeds_are_a_list_or_a_count_from_zero() -> None:
    assert harness.seed_list("0,1,2") == [0, 1, 2]
    assert harness.seed_list("3,7") == [3, 7]
    assert harness.seed_list("7,") == [7]
    assert harness.seed_list("5") == [0, 1, 2, 3, 4]  # minority_ne.py's older spelling
    assert harness.seed_list(2) == [0, 1]


@pytest.mark.parametrize("bad", ["0", "-1", "a,b", "two"])
def test_a_bad_seeds_value_is_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(C2ALError, match="--seeds"):
        harness.seed_list(bad)


def test_the_seeds_flag_names_itself_in_argparse_errors(capsys) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    harness.add_seeds_flag(ap, "0,1,2", flag="--afm-seeds")
    assert ap.parse_args([]).afm_seeds == [0, 1, 2]
    assert ap.parse_args(["--afm-seeds", "4"]).afm_seeds == [0, 1, 2, 3]
    with pytest.raises(SystemExit):
        ap.parse_args(["--afm-seeds", "x"])
    assert "--afm-seeds: expected a count" in capsys.readouterr().err


def test_a_seeds_flag_without_default_is_none_until_given() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    harness.add_seeds_flag(ap, None)
    assert ap.parse_args([]).seeds is None
    assert ap.parse_args(["--seeds", "3"]).seeds == [0, 1, 2] and ap.parse_args(["--seeds", "5,9"]).seeds == [5, 9]


def test_paired_ci_of_one_to_five_is_the_hand_computed_t_interval() -> None:
    # mean 3, sd sqrt(2.5), se sqrt(2.5 / 5); t(0.975, 4) = 2.776445105...
    mean, lo, hi = harness.paired_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5 / 5)
    assert mean == pytest.approx(3.0, abs=1e-12)
    assert (lo, hi) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-9)


def test_paired_ci_drops_missing_values_and_collapses_for_one() -> None:
    assert harness.paired_ci([float("nan"), None, 0.7]) == (0.7, 0.7, 0.7)
    assert all(math.isnan(v) for v in harness.paired_ci([float("nan")]))
    cell = harness.interval([2.0, None, 4.0])
    assert cell["mean"] == 3.0 and cell["n"] == 2 and cell["values"] == [2.0, None, 4.0]
    assert cell["ci95"][0] < 3.0 < cell["ci95"][1]


def test_the_pool_in_process_returns_results_in_task_order_and_reports_each() -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[tuple[int, int]] = []
    got = harness.run_pool(square_plus, [(3, 1), (1, 0), (2, 5)], workers=1, on_result=lambda i, r: seen.append((i, r)))
    assert got == [10, 1, 9] and seen == [(0, 10), (1, 1), (2, 9)]
    assert torch.get_num_threads() == before  # the caller's setting is restored


@pytest.mark.slow
def test_spawned_workers_give_the_in_process_results_and_raise_the_first_failure() -> None:
    tasks = [(x, x) for x in range(5)]
    assert harness.run_pool(square_plus, tasks, workers=2) == harness.run_pool(square_plus, tasks, workers=1)
    with pytest.raises(ValueError, match="task two fails"):
        harness.run_pool(fail_on_two, [(x,) for x in range(4)], workers=2)


def test_zero_workers_are_refused() -> None:
    with pytest.raises(C2ALError, match="--workers"):
        harness.run_pool(square_plus, [(1, 1)], workers=0)


def test_the_result_file_starts_with_the_header_and_keeps_the_body(tmp_path) -> None:
    run = harness.start(harness.ROOT / "benchmarks" / "demo.py", ["--quick", "--out", "a b.json"], {"data": "tiny"}, workers=2)
    written = harness.write_result(tmp_path / "r.json", run, {"rows": [1, 2]})
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert list(on_disk)[: len(harness.HEADER_KEYS)] == list(harness.HEADER_KEYS) and on_disk["rows"] == [1, 2]
    assert on_disk["benchmark"] == "demo" and on_disk["command"] == "python benchmarks/demo.py --quick --out 'a b.json'"
    assert on_disk["config"] == {"data": "tiny"} and on_disk["wall_s"] >= 0
    assert on_disk["machine"]["workers"] == 2 and {"cpu", "cores", "torch"} <= set(on_disk["machine"])
    assert len(on_disk["machine"]["load_avg_at_start"]) == 3 and len(on_disk["machine"]["load_avg_at_end"]) == 3
    if (harness.ROOT / ".git").exists():  # a checkout (a source tarball has no commit to name: None)
        assert len(on_disk["git"]["commit"]) == 40 and isinstance(on_disk["git"]["dirty"], bool)
    else:
        assert on_disk["git"] == {"commit": None, "dirty": None}
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, renamed over


def test_a_body_key_of_the_header_is_refused_naming_the_file(tmp_path) -> None:
    run = harness.start(__file__, [], {})
    with pytest.raises(C2ALError, match="r.json.*wall_s"):
        harness.write_result(tmp_path / "r.json", run, {"wall_s": 1.0})
    assert not (tmp_path / "r.json").exists()


def test_train_command_lists_only_the_flags_that_differ_from_the_defaults() -> None:
    from c2al.config import Config

    assert harness.train_command(Config()) == "python train.py"
    assert harness.train_command(Config(seed=3, quiet=True)) == "python train.py --seed 3"
    assert harness.train_py().__file__ == str(harness.ROOT / "train.py")
