"""Bad inputs through train.py: exit status 2, one `error:` line naming the problem, no traceback, OUT untouched.

Every case runs `train.main` in this process on a 400-row CSV (the checks come
before any training, so a case takes milliseconds); only the torchrun case
starts processes. OUT holds a previous run's files, which must come out
byte-identical: a failing command writes nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from c2al.config import parse_args  # noqa: E402
from c2al.dist.checkpoint import FORMAT, save_checkpoint  # noqa: E402
from c2al.dist.outdir import OutLock  # noqa: E402


# ---------------------------------------------------------------- the files the cases read
@dataclass
class Files:
    dir: Path
    csv: Path
    miner: Path  # a saved 2-cohort miner on (city, age)


def _frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 40, n)
    return pd.DataFrame({"user": user, "item": rng.integers(0, 10, n), "city": [f"c{u % 4}" for u in user],
                         "age": (20 + user).astype(float), "x1": rng.normal(size=n), "ts": np.arange(n),
                         "click": (rng.random(n) < 0.35).astype(int)})


def _write_variants(d: Path, df: pd.DataFrame) -> None:
    """One file per data problem, named after it."""
    df.to_csv(d / "clicks.csv", index=False)
    (d / "empty.csv").write_bytes(b"")
    df.head(0).to_csv(d / "header_only.csv", index=False)
    text = (d / "clicks.csv").read_text().splitlines()
    (d / "duplicate_header.csv").write_text("\n".join([text[0] + ",user"] + [r + ",0" for r in text[1:]]) + "\n")
    df.assign(click=np.where(df.click == 1, 2, 0)).to_csv(d / "label_two.csv", index=False)
    df.assign(click=1).to_csv(d / "all_positive.csv", index=False)
    df.assign(click=0).to_csv(d / "all_negative.csv", index=False)
    df.assign(click=df.click.astype(float).where(df.index != 5)).to_csv(d / "label_nan.csv", index=False)
    df.assign(x1=df.x1.where(df.index != 7)).to_csv(d / "dense_nan.csv", index=False)
    # each user's latest 10% of rows (the test split of a per-user time split) are all negatives
    latest = df.groupby("user").ts.rank(ascending=False) <= np.floor(0.1 * df.groupby("user").ts.transform("size") + 1e-9)
    df.assign(click=np.where(latest, 0, df.click)).to_csv(d / "test_all_negative.csv", index=False)
    # valid files with a degenerate population: one user, one item, a cohort feature with one value
    df.assign(user=7).to_csv(d / "one_user.csv", index=False)
    df.assign(item=3).to_csv(d / "one_item.csv", index=False)
    df.assign(city="c0").to_csv(d / "one_city.csv", index=False)
    (d / "corrupt.parquet").write_bytes(os.urandom(256))
    (d / "notes.txt").write_text("not data\n")
    (d / "no_movielens").mkdir()


def _write_miners(d: Path, df: pd.DataFrame) -> Path:
    """A saved miner and broken copies of it: random bytes, an object array, a JSON without its hash."""
    from c2al.cohorts import CohortMiner

    rng = np.random.default_rng(1)
    # random scores contrast with nothing: the null checks off, so the saved miner holds its 2 cohorts whatever they are
    miner = CohortMiner(2, max_share=0.4, random_state=0, n_permutations=0, min_contrast=0).fit(df[["city", "age"]], df.click, rng.random(len(df)))
    good = miner.save(d / "miner" / "cohorts.json")
    for name in ("random_json", "object_npz", "no_hash", "random_npz"):
        shutil.copytree(d / "miner", d / name)
    (d / "random_json" / "cohorts.json").write_bytes(os.urandom(300))
    (d / "random_npz" / "cohorts.npz").write_bytes(os.urandom(300))
    buffer = io.BytesIO()
    np.savez(buffer, contrast_=np.array([{"a": 1}, None], dtype=object))
    (d / "object_npz" / "cohorts.npz").write_bytes(buffer.getvalue())
    for name, drop in (("object_npz", False), ("no_hash", True)):
        meta = json.loads((d / name / "cohorts.json").read_text())
        meta["arrays_sha256"] = hashlib.sha256((d / name / "cohorts.npz").read_bytes()).hexdigest()
        if drop:
            del meta["arrays_sha256"]
        (d / name / "cohorts.json").write_text(json.dumps(meta))
    other = CohortMiner(2, max_share=0.4, random_state=0).fit(df[["x1"]], df.click, rng.random(len(df)))
    other.save(d / "other_columns" / "cohorts.json")
    return good


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("bad_inputs")
    df = _frame()
    _write_variants(d, df)
    return Files(dir=d, csv=d / "clicks.csv", miner=_write_miners(d, df))


# ---------------------------------------------------------------- argv builders
ROLES = ["--label", "click", "--sparse", "user,item,city", "--dense", "x1", "--user-col", "user",
         "--cohort-features", "city,age"]
FAST = ["--epochs", "1", "--batch-size", "64", "--quiet"]


def on(csv: Path | str, *extra: str) -> list[str]:
    fast = [a for a in FAST if a not in ("--epochs", "1")] if "--federated" in extra else FAST  # --federated reads --rounds
    return ["--data", str(csv), *ROLES, *fast, *extra]


def plain(*extra: str) -> list[str]:
    return [*FAST, *extra]


Argv = Callable[[Files, Path], list[str]]


@dataclass
class Case:
    id: str
    argv: Argv
    needle: str  # the problem the error line must name
    setup: Callable[[Files, Path, list[str]], None] | None = None  # writes into OUT what the case is about


def flag(id: str, *extra: str, needle: str) -> Case:
    return Case(id, lambda f, out: on(f.csv, "--out", str(out), *extra), needle)


def data(id: str, name: str, needle: str, *extra: str) -> Case:
    return Case(id, lambda f, out: on(f.dir / name, "--out", str(out), *extra), needle)


FLAG_CASES = [
    flag("epochs-not-int", "--epochs", "abc", needle="--epochs"),
    flag("epochs-zero", "--epochs", "0", needle="--epochs"),
    flag("batch-size-negative", "--batch-size", "-1", needle="--batch-size"),
    flag("lr-nan", "--lr", "nan", needle="--lr"),
    flag("lr-negative", "--lr", "-0.1", needle="--lr"),
    flag("table-lr-inf", "--table-lr", "inf", needle="--table-lr"),
    flag("dropout-2", "--dropout", "2", needle="--dropout"),
    flag("attention-dim-0", "--attention-dim", "0", needle="--attention-dim"),
    flag("embedding-dim-0", "--embedding-dim", "0", needle="--embedding-dim"),
    flag("checkpoint-every-negative", "--checkpoint-every", "-1", needle="--checkpoint-every"),
    flag("patience-negative", "--patience", "-1", needle="--patience"),
    flag("eval-every-negative", "--eval-every", "-5", needle="--eval-every"),
    flag("seed-negative", "--seed", "-1", needle="--seed"),
    flag("weight-decay-negative", "--weight-decay", "-1", needle="--weight-decay"),
    flag("valid-frac-zero", "--valid-frac", "0", needle="--valid-frac"),
    flag("fractions-sum-above-1", "--valid-frac", "0.6", "--test-frac", "0.5", needle="--valid-frac + --test-frac"),
    flag("unknown-model", "--model", "nope", needle="--model"),
    flag("unknown-device", "--device", "tpu", needle="--device"),
    flag("unknown-flag", "--shoe-size", "3", needle="--shoe-size"),
    flag("aux-cohorts-negative", "--aux-cohorts", "-1", needle="--aux-cohorts"),
    flag("aux-weight-count", "--aux-cohorts", "3", "--aux-weight", "0.1,0.2", needle="--aux-weight"),
    flag("aux-weight-not-number", "--aux-cohorts", "--aux-weight", "big", needle="--aux-weight"),
    flag("aux-weight-negative", "--aux-cohorts", "--aux-weight", "-0.5", needle="--aux-weight"),
    flag("n-clusters-0", "--aux-cohorts", "--n-clusters", "0", needle="--n-clusters"),
    flag("min-above-max-share", "--min-share", "0.5", "--max-share", "0.1", needle="--min-share"),
    flag("max-share-above-1", "--max-share", "1.5", needle="--max-share"),
    flag("unknown-candidates", "--cohort-candidates", "kmeans+nope", needle="--cohort-candidates"),
    flag("cohorts-without-aux", "--cohorts", "x.json", needle="--cohorts"),
    flag("rounds-0", "--federated", "--rounds", "0", needle="--rounds"),
    flag("tier-shares-sum", "--tier-shares", "0.5,0.5,0.5", needle="--tier-shares"),
    flag("tier-steps-count", "--tier-steps", "1,2", needle="--tier-steps"),
    flag("tier-availability-0", "--tier-availability", "0,1,1", needle="--tier-availability"),
    flag("trim-fraction-0.6", "--trim-fraction", "0.6", needle="--trim-fraction"),
    flag("attack-share-2", "--attack-share", "2", needle="--attack-share"),
    flag("hinge-without-two-tower", "--two-tower-hinge", needle="--two-tower-hinge"),
    flag("flower-resume", "--federated", "--engine", "flower", "--resume", needle="--resume"),
    flag("cohorts-with-federated", "--federated", "--aux-cohorts", "--cohorts", "x.json", needle="--cohorts"),
    # checked against the data or the machine, still before anything is written
    *([] if torch.cuda.is_available() else [flag("cuda-without-gpu", "--device", "cuda", needle="--device cuda")]),
    flag("table-adam-on-cpu", "--table-optimizer", "adam", needle="adam"),
    flag("row-wise-on-gloo", "--sharding", "row_wise", needle="row_wise"),
    flag("batch-above-train-rows", "--batch-size", "100000", needle="--batch-size"),
    flag("clients-above-population", "--federated", "--clients-per-round", "100000", needle="--clients-per-round"),
    flag("unknown-tier-feature", "--federated", "--clients-per-round", "10", "--tier-feature", "shoe", needle="shoe"),
    flag("two-tower-without-items", "--model", "two-tower", needle="two-tower"),
    flag("unknown-cohort-feature", "--aux-cohorts", "--cohort-features", "city,shoe", needle="shoe"),
    flag("label-as-cohort-feature", "--aux-cohorts", "--cohort-features", "click", needle="click"),
    # flags one mode reads, given in the other: refused by name, not silently ignored
    flag("rounds-without-federated", "--rounds", "5", needle="--rounds"),
    flag("clients-per-round-without-federated", "--clients-per-round", "10", needle="--clients-per-round"),
    flag("server-optimizer-without-federated", "--server-optimizer", "fedavg", needle="--server-optimizer"),
    flag("tiers-without-federated", "--tiers", "none", needle="--tiers"),
    flag("default-valued-federated-flag-typed", "--parallel-clients", "256", needle="--parallel-clients"),
    flag("several-federated-flags-named", "--local-epochs", "2", "--aggregation", "median", needle="--local-epochs, --aggregation"),
    flag("pipeline-with-federated", "--federated", "--pipeline", needle="--pipeline"),
    flag("sharding-with-federated", "--federated", "--sharding", "column_wise", needle="--sharding"),
    flag("checkpoint-every-with-federated", "--federated", "--checkpoint-every", "5", needle="--checkpoint-every"),
    flag("epochs-with-federated", "--federated", "--epochs", "3", needle="--epochs"),
    flag("resume-with-overwrite", "--resume", "--overwrite", needle="--overwrite"),
]

DATA_CASES = [
    Case("missing-file", lambda f, out: on("/no/such/clicks.csv", "--out", str(out)), "/no/such/clicks.csv"),
    data("directory-without-movielens", "no_movielens", "no_movielens"),
    Case("missing-movielens-directory", lambda f, out: plain("--data", "movielens:/no/such/dir", "--out", str(out)),
         "/no/such/dir"),
    Case("unknown-source", lambda f, out: plain("--data", "moviepedia", "--out", str(out)), "moviepedia"),
    data("unsupported-suffix", "notes.txt", "notes.txt"),
    data("empty-file", "empty.csv", "empty.csv"),
    data("header-only", "header_only.csv", "no rows"),
    data("duplicate-header", "duplicate_header.csv", "'user' appears twice"),
    data("label-not-binary", "label_two.csv", "only 0 and 1"),
    data("all-positive-labels", "all_positive.csv", "only 1s"),
    data("all-negative-labels", "all_negative.csv", "only 0s"),
    data("label-missing-values", "label_nan.csv", "missing values"),
    data("dense-nan", "dense_nan.csv", "'x1'"),
    data("test-split-one-label", "test_all_negative.csv", "test split", "--time-col", "ts"),
    data("corrupt-parquet", "corrupt.parquet", "corrupt.parquet"),
    flag("unknown-label-column", "--label", "nope", needle="nope"),
    flag("dense-not-numeric", "--dense", "city", needle="'city'"),
    flag("unknown-sparse-column", "--sparse", "user,nope", needle="nope"),
    flag("label-as-sparse", "--sparse", "click", needle="'click'"),
    flag("user-col-is-item-col", "--item-col", "user", needle="'user'"),
    flag("time-col-not-times", "--time-col", "city", needle="'city'"),
    Case("no-label", lambda f, out: plain("--data", str(f.csv), "--sparse", "user", "--out", str(out)), "--label"),
    Case("no-sparse", lambda f, out: plain("--data", str(f.csv), "--label", "click", "--out", str(out)), "--sparse"),
    Case("synthetic-shares-not-numbers", lambda f, out: plain("--data", "synthetic:n_rows=20000,minority_shares=abc",
                                                              "--out", str(out)), "minority_shares"),
    Case("synthetic-rows-not-int", lambda f, out: plain("--data", "synthetic:n_rows=2.5", "--out", str(out)), "n_rows"),
    Case("synthetic-unknown-option", lambda f, out: plain("--data", "synthetic:shoe=1", "--out", str(out)), "shoe"),
    Case("synthetic-option-not-key-value", lambda f, out: plain("--data", "synthetic:n_rows", "--out", str(out)), "n_rows"),
    # valid but degenerate files: refused before the baseline trains, where no run could work
    data("cohort-feature-with-one-value", "one_city.csv", "'city' is constant", "--aux-cohorts"),
    data("federated-cohort-feature-with-one-value", "one_city.csv", "'city' is constant", "--federated", "--aux-cohorts",
         "--clients-per-round", "5"),
    data("federated-c2al-with-one-user", "one_user.csv", "1 user(s)", "--federated", "--aux-cohorts", "--clients-per-round", "1"),
    data("federated-one-user-more-clients-per-round", "one_user.csv", "[1, 1]", "--federated", "--clients-per-round", "2"),
]


def checkpoint_file(name: str, write: Callable[[Path], None]) -> Callable[[Files, Path, list[str]], None]:
    return lambda f, out, argv: write(out / name)


def _other_config(name: str = "checkpoint.pt", **changes: object) -> Callable[[Files, Path, list[str]], None]:
    """A checkpoint in OUT whose config differs from this command's in `changes` only."""

    def setup(f: Files, out: Path, argv: list[str]) -> None:
        cfg = dataclasses.replace(parse_args(argv), **changes)
        save_checkpoint(out / name, model_state={"w": torch.zeros(2)}, config=cfg.to_dict(), step=3,
                        extra={"federated": name.startswith("fed_")})

    return setup


def resume(id: str, setup: Callable[[Files, Path, list[str]], None], needle: str, *extra: str) -> Case:
    return Case(id, lambda f, out: on(f.csv, "--out", str(out), "--resume", *extra), needle, setup)


CHECKPOINT_CASES = [
    resume("empty-checkpoint", checkpoint_file("checkpoint.pt", lambda p: p.write_bytes(b"")), "empty"),
    resume("random-bytes-checkpoint", checkpoint_file("checkpoint.pt", lambda p: p.write_bytes(os.urandom(512))),
           "cannot be read safely"),
    resume("pickled-code-checkpoint", checkpoint_file("checkpoint.pt", lambda p: torch.save({"f": os.system}, p)),
           "cannot be read safely"),
    resume("not-a-c2al-checkpoint", checkpoint_file("checkpoint.pt", lambda p: torch.save({"w": torch.ones(2)}, p)),
           "not a c2al checkpoint"),
    resume("checkpoint-without-keys", checkpoint_file("checkpoint.pt", lambda p: torch.save({"format": FORMAT}, p)),
           "lacks the entries"),
    resume("checkpoint-config-not-json", checkpoint_file("checkpoint.pt", lambda p: torch.save(
        {"format": FORMAT, "config": "{seed: 0", "step": 1, "model": {}, "optimizer": None, "extra": "{}"}, p)),
        "config is not JSON"),
    resume("resume-other-seed", _other_config(seed=1), "seed=1 (now 0)"),
    resume("resume-other-batch-size", _other_config(batch_size=32), "batch_size=32 (now 64)"),
    resume("resume-other-model-size", _other_config(embedding_dim=8), "embedding_dim=8"),
    resume("resume-other-c2al-weight", _other_config("c2al_train.pt", aux_weight=(0.5,)), "aux_weight", "--aux-cohorts"),
    resume("federated-resume-other-seed", _other_config("fed_checkpoint.pt", seed=1), "seed=1", "--federated"),
    resume("federated-resume-other-clients", _other_config("fed_checkpoint.pt", clients_per_round=7),
           "clients_per_round=7", "--federated"),
    resume("federated-resume-other-local-epochs", _other_config("fed_checkpoint.pt", local_epochs=3),
           "local_epochs=3", "--federated"),
    # resume across modes: one mode's checkpoints never continue in the other
    resume("federated-resume-of-a-centralized-checkpoint", _other_config("checkpoint.pt", federated=False),
           "a centralized run's checkpoint", "--federated"),
    resume("federated-c2al-resume-of-a-centralized-baseline", _other_config("baseline.pt", federated=False),
           "a centralized run's checkpoint", "--federated", "--aux-cohorts"),
    resume("centralized-resume-of-a-federated-checkpoint", _other_config("fed_checkpoint.pt", federated=True),
           "a federated run's checkpoint"),
    resume("centralized-resume-of-a-federated-c2al-model", _other_config("c2al.pt", federated=True),
           "federated=True (now False)", "--aux-cohorts"),
]


def miner(id: str, path: Callable[[Files], Path], needle: str, *extra: str) -> Case:
    return Case(id, lambda f, out: on(f.csv, "--out", str(out), "--aux-cohorts", "--cohorts", str(path(f)), *extra), needle)


MINER_CASES = [
    miner("miner-missing", lambda f: f.dir / "nowhere" / "cohorts.json", "nowhere"),
    miner("miner-json-random-bytes", lambda f: f.dir / "random_json", "random_json"),
    miner("miner-npz-random-bytes", lambda f: f.dir / "random_npz", "random_npz"),
    miner("miner-npz-object-array", lambda f: f.dir / "object_npz", "object_npz"),
    miner("miner-json-without-hash", lambda f: f.dir / "no_hash", "arrays_sha256"),
    miner("miner-more-cohorts-than-k", lambda f: f.miner, "holds 2 cohorts but --aux-cohorts is 1", "--aux-cohorts", "1"),
    miner("miner-other-columns", lambda f: f.dir / "other_columns", "other_columns"),
]


def _lock(f: Files, out: Path, argv: list[str]) -> None:
    LOCKS.append(OutLock(out).acquire())  # held by this test process: another open file description


LOCKS: list[OutLock] = []


def _miner_in_out(f: Files, out: Path, argv: list[str]) -> None:
    """The previous run in OUT also saved its miner there (cohorts.json + cohorts.npz)."""
    for p in f.miner.parent.iterdir():
        shutil.copy(p, out / p.name)

OUT_CASES = [
    Case("out-is-a-file", lambda f, out: on(f.csv, "--out", str(out / "config.json")), "is a file"),
    Case("out-under-a-file", lambda f, out: on(f.csv, "--out", str(out / "report.json" / "run")), "is a file"),
    Case("out-locked-by-a-live-run", lambda f, out: on(f.csv, "--out", str(out)), f"in use by pid {os.getpid()}", _lock),
    # OUT holds the previous run's config.json and report.json (`previous_run`): replacing them needs a word
    Case("out-holds-a-finished-run", lambda f, out: on(f.csv, "--out", str(out)), "pass --resume to continue it or --overwrite"),
    Case("overwrite-would-remove-the-saved-miner", lambda f, out: on(f.csv, "--out", str(out), "--aux-cohorts", "--cohorts", str(out),
                                                                     "--overwrite"), "--overwrite removes", _miner_in_out),
    Case("federated-out-holds-a-finished-run", lambda f, out: on(f.csv, "--out", str(out), "--federated", "--clients-per-round", "5"),
         "already holds a run (config.json, report.json)"),
]

CASES = FLAG_CASES + DATA_CASES + CHECKPOINT_CASES + MINER_CASES + OUT_CASES


# ---------------------------------------------------------------- the contract
def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def previous_run(out: Path) -> None:
    """What a finished run left in OUT; a failing command must not touch it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"seed": 0, "note": "from the previous run"}) + "\n")
    (out / "report.json").write_text(json.dumps({"overall": {"ne": 0.9}}) + "\n")


def test_the_suite_covers_at_least_60_bad_inputs() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(case: Case, files: Files, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    previous_run(out)
    argv = case.argv(files, out)
    try:
        if case.setup is not None:
            case.setup(files, out, [a for a in argv if a != "--resume"])
        before = snapshot(out)
        capsys.readouterr()
        rc = train.main(argv)
        captured = capsys.readouterr()
        after = snapshot(out)
    finally:
        while LOCKS:
            LOCKS.pop().release()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(errors) == 1 and case.needle in errors[0], captured.err
    assert [line for line in captured.err.splitlines() if line.strip()] == errors  # nothing else on stderr
    assert after == before, "a failing command changed OUT"


def test_a_rank_other_than_0_waits_for_rank_0_before_it_reports(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank hits the same error: rank 0 prints it at once; another rank waits first (torchrun
    stops it when rank 0 exits) and prints only if it is still alive, i.e. when rank 0 did not fail."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    waits: list[float] = []
    monkeypatch.setattr(train.time, "sleep", waits.append)
    for rank, slept in (("0", []), ("1", [train._OTHER_RANK_GRACE_S])):
        monkeypatch.setenv("RANK", rank)
        waits.clear()
        assert train.main(on(files.csv, "--out", str(tmp_path))) == 2
        err = capsys.readouterr().err
        assert waits == slept
        assert len([line for line in err.splitlines() if "not divisible by world size 3" in line]) == 1, err


@pytest.mark.slow  # starts 2 torchrun processes
def test_torchrun_prints_the_error_once(files: Files, tmp_path: Path) -> None:
    """torchrun itself reports a failed worker (ChildFailedError); train.py's own message appears once,
    with no traceback from train.py or c2al."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
                          *on(files.csv, "--out", str(out), "--batch-size", "63")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0
    assert len(errors) == 1 and "--batch-size 63" in errors[0], res.stderr
    assert "train.py\", line" not in res.stderr and "c2al/" not in res.stderr
    assert snapshot(out) == before


# ---------------------------------------------------------------- degenerate files that can run, do
WORKS = [
    ("one-user", "one_user.csv", []),
    ("one-item", "one_item.csv", []),
    ("one-item-two-tower", "one_item.csv", ["--model", "two-tower", "--item-col", "item"]),
    ("one-item-federated-c2al", "one_item.csv", ["--federated", "--aux-cohorts", "--rounds", "2", "--clients-per-round", "5",
                                                 "--max-share", "0.5"]),
]


@pytest.mark.parametrize("name, extra", [(n, (f, e)) for n, f, e in WORKS], ids=[n for n, _, _ in WORKS])
def test_a_degenerate_file_that_can_run_runs(name: str, extra: tuple[str, list[str]], files: Files, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """One user or one item is a small population, not a broken file: train.py runs it to the end."""
    torch.set_num_threads(1)
    file, flags = extra
    assert train.main(on(files.dir / file, "--out", str(tmp_path), *flags)) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    ne = report["overall"]["ne_c2al"] if "--aux-cohorts" in flags else report["overall"]["ne"]
    assert np.isfinite(ne) and ne > 0


# ---------------------------------------------------------------- the mode-only flags are the ones each mode reads
def _reads(paths: list[Path]) -> set[str]:
    """The Config fields `cfg.<name>` read anywhere in `paths`."""
    import re

    text = "\n".join(p.read_text() for p in paths)
    return set(re.findall(r"\bcfg\.([a-z_0-9]+)\b", text))


def test_each_mode_only_flag_is_read_by_its_mode_and_never_by_the_other() -> None:
    """check_command_line refuses FEDERATED_ONLY flags without --federated and CENTRALIZED_ONLY ones with it:
    that is only right while the other mode's code never reads them (a new field in --help's federated group
    that the centralized loop reads would need to move to another group)."""
    from c2al.jobs.preflight import CENTRALIZED_ONLY, FEDERATED_ONLY

    federated = _reads([*(ROOT / "c2al" / "federated").glob("*.py"), ROOT / "c2al" / "jobs" / "federated_job.py"])
    centralized = _reads([*(ROOT / "c2al" / "train").glob("*.py"), ROOT / "c2al" / "jobs" / "centralized.py",
                          ROOT / "c2al" / "jobs" / "pipeline.py", *(ROOT / "c2al" / "data").glob("*.py")])
    assert {"rounds", "tiers", "server_optimizer", "num_actors"} <= set(FEDERATED_ONLY) and "federated" not in FEDERATED_ONLY
    assert not set(FEDERATED_ONLY) & centralized, "the centralized code reads a federated-only field"
    assert not set(CENTRALIZED_ONLY) & federated, "the federated code reads a centralized-only field"
    assert set(FEDERATED_ONLY) <= federated
    assert set(CENTRALIZED_ONLY) <= centralized
