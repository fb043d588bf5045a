"""The CLI is generated from Config; its contract flags must parse as documented."""
import subprocess
import sys
from pathlib import Path

import pytest

from c2al.config import Config, build_parser, parse_args
from c2al.errors import C2ALError

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_flag():
    flags = {a.dest for a in build_parser()._actions}
    assert {f for f in Config.__dataclass_fields__} <= flags


def test_tabular_role_flags_are_the_public_contract():
    cfg = parse_args(["--data", "x.csv", "--label", "click", "--sparse", "a,b", "--dense", "c,d",
                      "--user-col", "u", "--cohort-features", "e,f"])
    assert (cfg.label, cfg.sparse, cfg.dense, cfg.user_col, cfg.cohort_features) == (
        "click", ("a", "b"), ("c", "d"), "u", ("e", "f"))


def test_bare_aux_cohorts_means_two():
    assert parse_args(["--aux-cohorts"]).aux_cohorts == 2
    assert parse_args(["--aux-cohorts", "3"]).aux_cohorts == 3
    assert parse_args([]).aux_cohorts == 0


def test_aux_weight_broadcasts_or_must_match_k():
    assert parse_args(["--aux-cohorts", "3", "--aux-weight", "0.3"]).aux_weights() == [0.3, 0.3, 0.3]
    with pytest.raises(C2ALError, match="--aux-weight has 2 values"):
        parse_args(["--aux-cohorts", "3", "--aux-weight", "0.1,0.2"])


def test_non_numeric_aux_weight_is_named():
    with pytest.raises(C2ALError, match="--aux-weight"):
        parse_args(["--aux-cohorts", "--aux-weight", "big"])


def test_config_roundtrips_through_dict():
    cfg = parse_args(["--model", "two-tower", "--seed", "7"])
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_unknown_config_field_is_rejected():
    with pytest.raises(C2ALError, match="unknown config fields"):
        Config.from_dict({"modle": "afm"})


@pytest.mark.slow
def test_help_explains_the_method_and_flags():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--aux-cohorts" in out and "--cohort-features" in out and "torchrun" in out


def test_help_is_grouped_and_shows_only_meaningful_defaults():
    from c2al.config import build_parser

    text = build_parser().format_help()
    for title in ("data:", "model:", "training:", "C2AL (--aux-cohorts):"):
        assert f"\n{title}\n" in text
    flat = " ".join(text.split())  # the help is wrapped to the terminal width
    assert "(default: )" not in flat and "(default: movielens-100k)" in flat


def test_cohort_candidate_names_agree_with_the_miner():
    """Config checks --cohort-candidates without importing the miner (a lower layer); the names must match."""
    from c2al.cohorts.candidates import SOURCES
    from c2al.config import CANDIDATES

    assert CANDIDATES == SOURCES


@pytest.mark.parametrize("argv, needle", [
    (["--dropout", "2"], "--dropout must be in [0, 1), got 2.0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--tier-steps", "1,-2,3"], "--tier-steps must be >= 0, got 1,-2,3"),
    (["--valid-frac", "0.5", "--test-frac", "0.5"], "--valid-frac + --test-frac must be below 1"),
])
def test_out_of_range_values_name_the_flag_and_the_range(argv, needle):
    with pytest.raises(C2ALError) as err:
        parse_args(argv)
    assert needle in str(err.value)
