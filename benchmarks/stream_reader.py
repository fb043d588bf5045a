"""The streaming readers alone: rows/s of Criteo text and Parquet over a generated file (issue 19 §3).

Writes (once, cached in --work) a Criteo-layout text file and a Parquet file of --rows rows each with
c2al.data.criteo's generator (39 fields: 13 integers, 26 hex hashes with power-law values), then times
one pass of `open_stream(cfg).train.chunks()` (parsing, hex decoding, hashing to --hash-size, the
DLRM dense transform) and of `iter_stream_batches` on top (make_batch's collation included, no
prefetch, so the number is the reader's own cost). Rows per CPU-second are reported beside rows/s:
on a shared machine the wall rate moves with the load, the CPU cost much less.

    python benchmarks/stream_reader.py --rows 1000000 --out benchmarks/results/stream_reader.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from c2al.config import Config
from c2al.data.criteo import CAT_NAMES, INT_NAMES, criteo_rows, write_criteo_text
from c2al.data.stream import iter_stream_batches, open_stream
from c2al.eval.report import machine_info

PIECE = 100_000  # rows generated at a time, so writing never holds the whole file


def write_files(work: Path, rows: int) -> tuple[Path, Path]:
    """day_0 (Criteo text) and table.parquet of `rows` rows under work/, written once."""
    folder = work / f"reader-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    text, table = folder / "day_0", folder / "table.parquet"
    if not text.exists():
        with open(text.with_suffix(".tmp"), "wb") as out:
            for b, start in enumerate(range(0, rows, PIECE)):
                write_criteo_text(folder / "piece", min(PIECE, rows - start), seed=b)
                out.write((folder / "piece").read_bytes())
        (folder / "piece").unlink()
        text.with_suffix(".tmp").rename(text)
    if not table.exists():
        writer = None
        for b, start in enumerate(range(0, rows, PIECE)):
            df = criteo_rows(min(PIECE, rows - start), seed=b)
            for c in INT_NAMES:
                df[c] = df[c].fillna(0).astype("int64")
            t = pa.Table.from_pandas(df, preserve_index=False)
            writer = writer or pq.ParquetWriter(str(table.with_suffix(".tmp")), t.schema)
            writer.write_table(t, row_group_size=131_072)
        writer.close()
        table.with_suffix(".tmp").rename(table)
    return text, table


def timed(count: Callable[[], int]) -> dict[str, float]:
    """Rows, wall seconds, rows/s and rows per CPU-second (every thread of the process) of one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = count()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rows": n, "seconds": round(wall, 2), "rows_per_s": round(n / wall), "cpu_seconds": round(cpu, 2), "rows_per_cpu_s": round(n / cpu)}


def measure(text: Path, table: Path, hash_size: int, batch_size: int) -> dict[str, Any]:
    """Per source: the chunks alone and the chunks cut into collated batches."""
    configs = {
        "criteo_text": Config(data=f"criteo:{text}", split_by="hash", eval_rows=1000, hash_size=(hash_size,)),
        "parquet": Config(data=str(table), stream=True, label="label", sparse=CAT_NAMES, dense=INT_NAMES, split_by="hash",
                          eval_rows=1000, hash_size=(hash_size,)),
    }
    out = {}
    for name, cfg in configs.items():
        train = open_stream(cfg).train
        out[name] = {"chunks": timed(lambda: sum(len(c) for c in train.chunks())),
                     "batches": timed(lambda: sum(len(b) for b in iter_stream_batches(train, batch_size, prefetch=0)))}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of each generated file")
    ap.add_argument("--hash-size", type=int, default=1_000_000, help="embeddings per field the ids are hashed to")
    ap.add_argument("--batch-size", type=int, default=4096, help="rows per collated batch")
    ap.add_argument("--work", type=Path, default=Path("/tmp/c2al-stream-reader"), help="where the generated files are cached")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    args = ap.parse_args(argv)
    text, table = write_files(args.work, args.rows)
    load_before = os.getloadavg()[0]
    result = {"reader": measure(text, table, args.hash_size, args.batch_size), "rows": args.rows, "hash_size": args.hash_size,
              "batch_size": args.batch_size, "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
              "machine": machine_info(), "command": "python benchmarks/stream_reader.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    text_out = json.dumps(result, indent=1)
    print(text_out)
    if args.out:
        args.out.write_text(text_out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
