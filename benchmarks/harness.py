"""What every benchmark script shares: its worker pool, its seeds, its paired interval and its result-file header.

A benchmark is a script in this folder, run as `python benchmarks/NAME.py` from anywhere: Python puts
the script's folder first on sys.path, so scripts import each other and this module by plain name
(`import harness`); c2al comes from the editable install (`make install`); the repository's train.py is
loaded by path with `train_py()`. Nothing edits sys.path. Tests reach the scripts through pytest's
`pythonpath` (pytest.ini).

A result file is one JSON object: the header `header()` writes, then the script's own keys.

    run = harness.start(__file__, argv, config={"data": "movielens-100k"})
    rows = harness.run_pool(train_one, [(name, cfg) for name, cfg in todo.items()], workers=2)
    harness.write_result(out, run, {"rows": rows})

The header's keys (HEADER_KEYS): benchmark (the script's stem), command (the line that reproduces the
file), git (commit and whether the tracked files differed from it), machine (c2al.eval.report.machine_info
plus the load average at start and at end), wall_s (seconds from start() to the write), config.

`--seeds` everywhere is a comma-separated list (`--seeds 0,1,2`); a bare count N means seeds 0..N-1
(`--seeds 5`, the spelling minority_ne.py's users type). `seed_list` parses both.
"""
from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence, TypeVar

from c2al.errors import C2ALError
from c2al.eval.report import machine_info, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
HEADER_KEYS = ("benchmark", "command", "git", "machine", "wall_s", "config")
T = TypeVar("T")


# ---------------------------------------------------------------- seeds


def seed_list(text: str | int) -> list[int]:
    """The seeds a `--seeds` value names: a comma-separated list, or a bare count N for 0..N-1.

    Args:
        text: "0,1,2", "3,7" or "7," (one seed), or "5" / 5 (a count, the older spelling).

    Returns:
        The seeds in the order given.

    Example:
        >>> seed_list("0,1,2"), seed_list("3"), seed_list("7,")
        ([0, 1, 2], [0, 1, 2], [7])
    """
    text = str(text).strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise C2ALError(f"--seeds: expected a count N (seeds 0..N-1) or a comma-separated list like 0,1,2, got {text!r}") from None


def add_seeds_flag(ap: Any, default: str | None, flag: str = "--seeds", what: str = "") -> None:
    """Add a seeds flag parsed by `seed_list` (an argparse error, naming the flag, on a bad value).

    Args:
        ap: the script's argparse.ArgumentParser.
        default: the default value as a user would type it ("0,1,2" or "5"); None leaves the flag None when it is
            not given (a script whose default depends on another flag, such as --quick, fills it in).
        flag: the flag's name (e.g. "--afm-seeds" where only some runs are seeded).
        what: which runs the seeds apply to, for the help text.
    """
    import argparse

    def parse(text: str) -> list[int]:
        try:
            return seed_list(text)
        except C2ALError as err:
            raise argparse.ArgumentTypeError(str(err).replace("--seeds", flag, 1)) from None

    ap.add_argument(flag, type=parse, default=None if default is None else parse(default),
                    help=f"seeds{' of ' + what if what else ''}: a comma-separated list (0,1,2) or a count N for 0..N-1"
                         + ("" if default is None else f" (default {default})"))


# ---------------------------------------------------------------- paired interval


def paired_ci(diffs: Sequence[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t-interval.

    Args:
        diffs: one difference per seed (arm minus baseline); None and nan entries are dropped.
        level: confidence level.

    Returns:
        (mean, low, high); low = high = mean for one value, all nan for none.

    Example:
        >>> [round(v, 4) for v in paired_ci([1.0, 2.0, 3.0, 4.0, 5.0])]
        [3.0, 1.0368, 4.9632]
    """
    import numpy as np
    from scipy import stats

    x = np.asarray([d for d in diffs if d is not None and math.isfinite(d)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def interval(values: Sequence[float | None]) -> dict[str, Any]:
    """`paired_ci` as a result-file cell.

    Returns:
        {"mean", "ci95": [low, high], "n": finite values counted, "values": as given}.

    Example:
        >>> cell = interval([1.0, None, 3.0])
        >>> cell["mean"], cell["n"]
        (2.0, 2)
    """
    mean, lo, hi = paired_ci(values)
    n = sum(1 for v in values if v is not None and math.isfinite(v))
    return {"mean": mean, "ci95": [lo, hi], "n": n, "values": list(values)}


# ---------------------------------------------------------------- worker pool


def run_pool(fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]], workers: int, threads: int = 1,
             initializer: Callable[[], None] | None = None,
             on_result: Callable[[int, T], None] | None = None) -> list[T]:
    """`fn(*task)` for every task, in `workers` spawned processes of `threads` torch threads each.

    One worker (or one task) runs in this process, with the same torch threads for the duration,
    so a row does not depend on the number of workers. Spawn, not fork: a fork would copy this
    process's torch threads and process group. The first task that raises cancels the rest and
    its exception is raised here.

    Args:
        fn: a module-level function (spawned workers import it by name).
        tasks: the positional arguments of each call.
        workers: processes side by side (>= 1).
        threads: torch intra-op threads per process (1 is fastest on a busy 2-core machine).
        initializer: a module-level function each process calls once before its first task.
        on_result: called in this process as (task index, result) as each task finishes.

    Returns:
        The results in task order.
    """
    if workers < 1 or threads < 1:
        raise C2ALError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
    if workers == 1 or len(tasks) <= 1:
        return _in_process(fn, tasks, threads, initializer, on_result)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, initializer)) as pool:
        futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
        return _collect(futures, pool, on_result)


def _in_process(fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]], threads: int,
                initializer: Callable[[], None] | None, on_result: Callable[[int, T], None] | None) -> list[T]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if initializer is not None:
            initializer()
        results = []
        for i, task in enumerate(tasks):
            results.append(fn(*task))
            if on_result is not None:
                on_result(i, results[-1])
        return results
    finally:
        torch.set_num_threads(before)  # a caller (a test) keeps its own setting


def _init_worker(threads: int, initializer: Callable[[], None] | None) -> None:
    import torch

    torch.set_num_threads(threads)
    if initializer is not None:
        initializer()


def _collect(futures: dict[Future, int], pool: ProcessPoolExecutor, on_result: Callable[[int, Any], None] | None) -> list[Any]:
    """Results by task index as they finish; the first failure cancels what has not started."""
    results: list[Any] = [None] * len(futures)
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                results[futures[future]] = future.result()  # raises the worker's exception
                if on_result is not None:
                    on_result(futures[future], results[futures[future]])
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return results


def split_finished(grid: Sequence[tuple[Any, ...]], settings: dict[str, Any] | None = None
                   ) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """(results already written, tasks still to run) of a grid whose tasks end with their run file's path.

    A run file counts as finished when it exists and was written with the same `settings` (its
    "settings" key), so a rerun of a grid skips what is done and redoes what changed. Without
    `settings`, each task's own settings are its second-to-last item (tasks whose settings differ).
    """
    done, todo = [], []
    for task in grid:
        path = Path(task[-1])
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None and old.get("settings") == (task[-2] if settings is None else settings):
            done.append(old)
        else:
            todo.append(task)
    return done, todo


def format_interval(c: dict[str, Any] | None, fmt: str = "{:.4f}") -> str:
    """An `interval()` cell as "mean [lo, hi]" ("mean" alone for one value, "-" for none).

    Example:
        >>> format_interval({"mean": 0.5, "ci95": [0.4, 0.6], "n": 3}), format_interval(None)
        ('0.5000 [0.4000, 0.6000]', '-')
    """
    if not c or c.get("n", 0) == 0:
        return "-"
    lo, hi = c["ci95"]
    return fmt.format(c["mean"]) + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if c["n"] > 1 else "")


# ---------------------------------------------------------------- result-file header


@dataclass
class Run:
    """One benchmark invocation, from `start()` to `write_result()`."""

    benchmark: str
    command: str
    config: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)  # the script's own additions (torch threads, workers)
    started: float = field(default_factory=time.perf_counter)
    load_at_start: list[float] = field(default_factory=lambda: load_average())
    git: dict[str, Any] = field(default_factory=lambda: git_state())


def start(script: str | Path, argv: Sequence[str] | None, config: dict[str, Any], **machine: Any) -> Run:
    """Begin a run: its command line, commit, load average and clock are taken now.

    Args:
        script: the benchmark's `__file__`.
        argv: the arguments it was given (None: sys.argv[1:]).
        config: what made the numbers (written under "config").
        **machine: extra facts about how it ran, merged into "machine" (torch_threads=1, workers=2).

    Returns:
        The Run to hand to `write_result`.
    """
    path = Path(script).resolve()
    return Run(benchmark=path.stem, command=command_line(path, sys.argv[1:] if argv is None else argv),
               config=config, machine=machine)


def command_line(script: Path, argv: Sequence[str]) -> str:
    """`python benchmarks/NAME.py ARGS`, the script named relative to the repository when it is inside it."""
    try:
        shown = str(script.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(script)
    return shlex.join(["python", shown, *argv])


def header(run: Run) -> dict[str, Any]:
    """The keys every result file starts with (HEADER_KEYS), timed and loaded as of now."""
    machine = {**machine_info(), **run.machine, "load_avg_at_start": run.load_at_start, "load_avg_at_end": load_average()}
    return {"benchmark": run.benchmark, "command": run.command, "git": run.git, "machine": machine,
            "wall_s": time.perf_counter() - run.started, "config": run.config}


def write_result(path: str | Path, run: Run, body: dict[str, Any]) -> dict[str, Any]:
    """Write header + body as one JSON file, atomically (a reader never sees half of it).

    Args:
        path: the result file.
        run: from `start()`.
        body: the script's own keys; none of them may be a header key.

    Returns:
        The object written.
    """
    clash = sorted(set(body) & set(HEADER_KEYS))
    if clash:
        raise C2ALError(f"{path}: result keys {clash} belong to the header; pass config to harness.start()")
    result = {**header(run), **body}
    write_json(result, path)
    return result


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def git_state() -> dict[str, Any]:
    """The commit the numbers came from and whether tracked files differed from it (None outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


# ---------------------------------------------------------------- the repository's train.py


def train_py() -> ModuleType:
    """The repository's train.py as a module (its `main`, `changed_flags`), loaded by path once per process."""
    if "train" in sys.modules and Path(getattr(sys.modules["train"], "__file__", "")).resolve() == ROOT / "train.py":
        return sys.modules["train"]
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    if spec is None or spec.loader is None:
        raise C2ALError(f"{ROOT / 'train.py'}: cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)
    return module


def train_command(cfg: Any) -> str:
    """The `python train.py ...` line that trains `cfg` (its flags that differ from the defaults; never --quiet).

    Args:
        cfg: a c2al.config.Config.

    Returns:
        "python train.py --flag value ..." ("python train.py" for all defaults).
    """
    import dataclasses

    flags = train_py().changed_flags(dataclasses.replace(cfg, quiet=False))
    return "python train.py" + ("" if flags == "(all defaults)" else " " + flags)
