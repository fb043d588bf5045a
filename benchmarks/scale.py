"""Memory and speed of one pass over a streamed 39-field Criteo-shaped table, against rows (issue 19 §3).

    python benchmarks/scale.py                            # 1M, 2M, 4M, 8M rows, AttentionFM; AFM at 8M; the readers
    python benchmarks/scale.py --rows 1000000 --models attention-fm --quick-reader

The table is `c2al.data.criteo_world.CriteoWorld` written once as Parquet under --work (one file per 1M rows,
row groups of 128k rows, plus one evaluation file), so the 2M table is the 1M table and one more file. Each
run is `python train.py --data DIR --stream ...` in its own process: peak RSS is that process's
(`os.wait4`), examples/s are training rows over the whole process's wall time (reading, training and
the bounded evaluations included), and the input share is the time the training loop waited for its
next batch over its training time (what the background reader did not hide). One result file per run under results/scale/, merged into
results/scale.json, so a killed grid costs only the run it was in.

The readers alone (rows/s, Criteo text and Parquet, a 1M-row file each) are timed in this process
(`reader` in the result file): how fast `TrainStream.chunks` turns the file into Tables, no training.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

from c2al.data.criteo_world import N_DENSE, N_SPARSE, CriteoWorld
from c2al.errors import C2ALError

RESULTS = harness.RESULTS / "scale"
MERGED = harness.RESULTS / "scale.json"
EVAL_CHUNK = 10_000  # the evaluation file is chunk EVAL_CHUNK of the world: never one of the training chunks
TRAIN_FLAGS = ("--label", "label", "--sparse", ",".join(f"cat_{j}" for j in range(N_SPARSE)),
               "--dense", ",".join(f"int_{j}" for j in range(N_DENSE)), "--cohort-features", "cat_0,cat_1")


def world_folder(work: Path, rows: int, seed: int, chunk_rows: int, eval_rows: int) -> Path:
    """DIR holding the first rows // chunk_rows training files of the world and the evaluation file last
    (hard links into one pool of generated files, so growing sizes share their prefix on disk)."""
    if rows % chunk_rows:
        raise C2ALError(f"--rows {rows} is not a multiple of --chunk-rows {chunk_rows} (sizes share whole generated files)")
    world = CriteoWorld(rows=rows, seed=seed, chunk_rows=chunk_rows)
    pool = work / f"pool-seed{seed}-chunk{chunk_rows}"
    pool.mkdir(parents=True, exist_ok=True)
    folder = work / f"rows{rows}-seed{seed}-chunk{chunk_rows}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"part-{i:05d}.parquet" for i in range(world.n_chunks)] + ["zz-eval.parquet"]
    for i, name in enumerate(names):
        src = pool / name
        if not src.exists():
            frame = world.chunk(i) if name != "zz-eval.parquet" else world.chunk(EVAL_CHUNK, rows=2 * eval_rows)
            print(f"generated {src} ({len(frame)} rows)", flush=True)
            _write_parquet(frame, src)
        if not (folder / name).exists():
            os.link(src, folder / name)
    return folder


def _write_parquet(frame: Any, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, row_group_size=131_072)
    tmp.replace(path)


def train_flags(folder: Path, model: str, args: argparse.Namespace, out: Path) -> list[str]:
    return ["--data", str(folder), "--stream", *TRAIN_FLAGS, "--model", model, "--batch-size", str(args.batch_size),
            "--eval-rows", str(args.eval_rows), "--eval-every", str(args.eval_every), "--hash-size",
            ",".join(str(v + 1) for v in CriteoWorld(rows=1).vocab_sizes), "--out", str(out), "--quiet", "--overwrite"]


def one_run(folder: Path, rows: int, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """train.py in a child process; its peak RSS, wall time and throughput."""
    out = args.work / "out" / f"{model}-rows{rows}"
    cmd = [sys.executable, str(harness.ROOT / "train.py"), *train_flags(folder, model, args, out)]
    began = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=harness.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - began
    err = child.stderr.read() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise C2ALError(f"train.py failed on {folder} ({model}): {err.strip().splitlines()[-1] if err.strip() else status}")
    report = json.loads((out / "report.json").read_text())
    last = report["history"][-1] if report.get("history") else {}
    seen = last.get("rows_seen", 0)
    return {"rows": rows, "source": "parquet", "model": model, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall,
            "examples_per_s": seen / wall, "train_seconds": report.get("train_seconds"), "rows_trained": seen,
            "input_wait_s": last.get("input_wait_s"), "input_share": (last.get("input_wait_s") or 0.0) / max(report.get("train_seconds") or 1.0, 1e-9),
            "test_ne": report["overall"]["ne"], "progressive_ne": last.get("progressive_ne"),
            "command": "python train.py " + " ".join(cmd[2:])}


def reader_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Rows/s of the readers alone over a generated file of --reader-rows rows, Parquet and Criteo text."""
    from c2al.config import Config
    from c2al.data.stream import open_stream

    rows = args.reader_rows
    world = CriteoWorld(rows=rows, seed=99, chunk_rows=rows)
    folder = args.work / f"reader-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    parquet, text = folder / "table.parquet", folder / "day_0"
    if not parquet.exists():
        _write_parquet(world.chunk(0), parquet)
    if not text.exists():
        world.write_criteo_text(text)
    out = {}
    for name, cfg in (("parquet", Config(data=str(parquet), stream=True, label="label", sparse=TRAIN_FLAGS[3].split(","),
                                         dense=TRAIN_FLAGS[5].split(","), split_by="hash", eval_rows=1000)),
                      ("criteo_text", Config(data=f"criteo:{text}", split_by="hash", eval_rows=1000))):
        stream = open_stream(cfg).train
        began = time.perf_counter()
        n = sum(len(chunk) for chunk in stream.chunks())
        seconds = time.perf_counter() - began
        out[name] = {"rows": n, "seconds": seconds, "rows_per_s": n / seconds}
    return out


def merge() -> dict[str, Any]:
    """Every per-run file under results/scale/ as one list."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("run-*.json"))]
    reader = json.loads((RESULTS / "reader.json").read_text()) if (RESULTS / "reader.json").exists() else None
    return {"runs": [r["result"] | {"machine": r["machine"], "load_avg": r["machine"].get("load_avg_at_end")} for r in runs],
            "reader": reader["reader"] if reader else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,2000000,4000000,8000000", help="comma-separated table sizes (rows)")
    ap.add_argument("--models", default="attention-fm", help="models run at every size")
    ap.add_argument("--largest-models", default="afm", help="models also run at the largest size only")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--eval-rows", type=int, default=100_000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each train.py run")
    ap.add_argument("--reader-rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per generated Parquet file (sizes are multiples of it)")
    ap.add_argument("--skip-reader", action="store_true")
    ap.add_argument("--work", type=Path, default=harness.ROOT / "runs" / "scale", help="generated tables and run outputs")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.rows.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    todo = [(rows, model) for rows in sizes for model in args.models.split(",") if model]
    todo += [(max(sizes), model) for model in args.largest_models.split(",") if model]
    for rows, model in todo:
        run = harness.start(__file__, argv, config={"rows": rows, "model": model, **{k: str(v) for k, v in vars(args).items()}})
        result = one_run(world_folder(args.work, rows, 0, args.chunk_rows, args.eval_rows), rows, model, args)
        harness.write_result(RESULTS / f"run-{model}-{rows}.json", run, {"result": result})
        print(json.dumps({k: result[k] for k in ("rows", "model", "peak_rss_mb", "examples_per_s", "wall_s")}), flush=True)
    if not args.skip_reader:
        run = harness.start(__file__, argv, config={"reader_rows": args.reader_rows})
        harness.write_result(RESULTS / "reader.json", run, {"reader": reader_speed(args)})
    run = harness.start(__file__, argv, config={"merged_from": str(RESULTS.relative_to(harness.ROOT))})
    harness.write_result(MERGED, run, merge())
    return 0


if __name__ == "__main__":
    sys.exit(main())
