"""Speed of c2al's models against the AFMs users would otherwise pick, measured side by side.

One grid, one row per (model, setting); every row runs in its own process
(`--row NAME` reproduces it alone), so peak RSS is that row's and no row
warms caches for the next. All AFM rows train the same steps on the same
synthetic Criteo-like data (26 categorical fields, vocabularies 1e2..1e6,
a learnable label) and report held-out NE next to examples/s.

  python benchmarks/throughput.py                     # default size, < 30 min on 2 cores
  python benchmarks/throughput.py --quick --out /tmp/t.json
  python benchmarks/throughput.py --row afm_lean      # one row, printed as JSON

Writes benchmarks/results/throughput.json (the harness header, rows, ratios, miner, scaling).
Third-party AFMs come from benchmarks/requirements.txt
(`pip install --no-deps -r benchmarks/requirements.txt`, which keeps torch as it is).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import harness
import numpy as np
import throughput_variants as tv
import torch

from c2al.eval.metrics import summarize
from c2al.eval.report import format_table, write_json

RESULTS = harness.RESULTS
HERE = Path(__file__).resolve()

# name -> (builder, what it stands for); one process each
GRID: dict[str, tuple[Callable[[tv.Sizes], tv.Variant], str]] = {
    "tables_only": (tv.tables_only, "TorchRec sharded tables alone (lookup + fused row-wise Adagrad)"),
    "afm_reference": (lambda s: tv.c2al_sharded("afm", s, lean=False), "c2al AFM, straightforward [B,P,D] interaction, DMP"),
    "afm_lean": (lambda s: tv.c2al_sharded("afm", s), "c2al AFM, lean interaction, DMP"),
    "afm_lean_heads": (lambda s: tv.c2al_sharded("afm", s, heads=True), "c2al AFM lean + 2 aux heads (c2al.attach)"),
    "attention_fm": (lambda s: tv.c2al_sharded("attention_fm", s), "c2al AttentionFM (O(FKD) block), DMP"),
    "attention_fm_heads": (lambda s: tv.c2al_sharded("attention_fm", s, heads=True), "c2al AttentionFM + 2 aux heads"),
    "afm_lean_embeddingbag": (tv.c2al_embeddingbag, "c2al AFM lean on plain nn.EmbeddingBag, dense Adagrad"),
    "deepctr_afm": (tv.deepctr_afm, "deepctr-torch AFM (nn.Embedding, dense Adagrad)"),
    "torchfm_afm": (tv.torchfm_afm, "pytorch-fm AFM (one nn.Embedding, dense Adagrad)"),
}
HEADS = {"afm_lean_heads": "afm_lean", "attention_fm_heads": "attention_fm"}
COLUMNS = ["row", "train_eps", "input_eps", "train_with_input_eps", "infer_eps", "stripped_infer_eps", "ne", "peak_rss_mb"]
# What each column times (also written into the result file): the step and the input pipeline apart,
# so a fast step is not hidden behind slow batch building and neither is credited with the other.
COLUMN_NOTES = {
    "train_eps": "examples/s of the train step alone: forward, loss, backward and optimizer update (for c2al rows "
                 "TorchRec's input distribution inside DMP and the fused table update in backward); the batch is built "
                 "before the clock starts",
    "input_eps": "examples/s of the input pipeline alone: the rows' ids (a numpy array) made into the model's input "
                 "(a KeyedJaggedTensor Batch as c2al's batcher builds it; deepctr-torch: a float tensor of ids; "
                 "pytorch-fm: a long tensor)",
    "train_with_input_eps": "examples/s of input pipeline then step, one after the other as a loop without "
                            "prefetching runs them: 1 / (1 / input_eps + 1 / train_eps)",
    "infer_eps": "examples/s of predict alone (eval forward and sigmoid) on held-out batches built beforehand",
    "stripped_infer_eps": "infer_eps of the model c2al.detach returns (heads rows only)",
    "ne": "normalized entropy of the held-out predictions after the timed training (none for tables_only, "
          "which has no model)",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_row(name: str, sizes: tv.Sizes) -> dict[str, Any]:
    """Train `sizes.train_steps` steps, then predict the held-out rows; time only the model calls."""
    builder, what = GRID[name]
    train = tv.make_data(sizes, sizes.train_steps * sizes.batch, seed=sizes.seed + 1)
    held = tv.make_data(sizes, sizes.eval_rows, seed=sizes.seed + 2)
    variant = builder(sizes)
    row: dict[str, Any] = {"row": name, "what": what, "params": variant.params, "notes": variant.notes}
    row.update(_train(variant, train, sizes))
    row.update(_infer(variant.predict, variant.prepare, held, sizes, "", quality=variant.scores))
    if name in HEADS:
        predict, model = tv.stripped_predictor(variant)
        row["stripped_params"] = tv.param_counts(model)
        row.update(_infer(predict, variant.prepare, held, sizes, "stripped_"))
        # the baseline row ran in another process; for a like-for-like cost, time the stripped model
        # against a fresh baseline of the same architecture here, alternating passes
        baseline = GRID[HEADS[name]][0](sizes)
        same = _interleaved({"stripped": predict, "baseline": baseline.predict},
                            variant.prepare, held, sizes)
        row["same_process_infer_eps"] = same
        row["stripped_vs_baseline_infer_same_process"] = same["stripped"] / same["baseline"]
        row["stripped_params_equal_baseline"] = row["stripped_params"] == baseline.params
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def _train(variant: tv.Variant, data: tv.Data, sizes: tv.Sizes) -> dict[str, float]:
    """Train sizes.train_steps steps, timing the input pipeline (prepare) and the step apart (see COLUMN_NOTES)."""
    prepare_s = step_s = 0.0
    for i in range(sizes.train_steps):
        t0 = time.perf_counter()
        inp = variant.prepare(data, i * sizes.batch, sizes.batch)
        t1 = time.perf_counter()
        variant.step(inp)
        t2 = time.perf_counter()
        if i >= sizes.warmup_steps:
            prepare_s, step_s = prepare_s + t1 - t0, step_s + t2 - t1
    n = (sizes.train_steps - sizes.warmup_steps) * sizes.batch
    return {"train_eps": n / step_s, "input_eps": n / prepare_s, "train_with_input_eps": n / (prepare_s + step_s),
            "train_step_s": step_s, "train_input_s": prepare_s}


def _interleaved(predictors: dict[str, Callable[[Any], torch.Tensor]], prepare: Callable[..., Any], held: tv.Data,
                 sizes: tv.Sizes, rounds: int = 5) -> dict[str, float]:
    """Median examples/s of each predictor over `rounds` passes on the held-out rows, passes alternating."""
    inputs = [prepare(held, start, sizes.batch) for start in range(0, sizes.eval_rows - sizes.batch + 1, sizes.batch)]
    rates: dict[str, list[float]] = {k: [] for k in predictors}
    for fn in predictors.values():
        fn(inputs[0])  # warm-up
    for _ in range(rounds):
        for key, fn in predictors.items():
            t0 = time.perf_counter()
            for inp in inputs:
                fn(inp)
            rates[key].append(len(inputs) * sizes.batch / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in rates.items()}


def _infer(predict: Callable[[Any], torch.Tensor], prepare: Callable[..., Any], held: tv.Data, sizes: tv.Sizes,
           prefix: str, quality: bool = True) -> dict[str, Any]:
    """Predict the held-out rows (batches built outside the clock); NE and AUC unless the variant has no model."""
    probs, timed = [], 0.0
    predict(prepare(held, 0, sizes.batch))  # warm-up
    for start in range(0, sizes.eval_rows - sizes.batch + 1, sizes.batch):
        inp = prepare(held, start, sizes.batch)
        t0 = time.perf_counter()
        probs.append(predict(inp).float().numpy())
        timed += time.perf_counter() - t0
    p = np.concatenate(probs)
    if not quality:
        return {f"{prefix}infer_eps": len(p) / timed, f"{prefix}ne": None, f"{prefix}auc": None}
    scored = summarize(np.clip(p, 1e-7, 1 - 1e-7), held.labels[: len(p)])
    return {f"{prefix}infer_eps": len(p) / timed, f"{prefix}ne": scored["ne"], f"{prefix}auc": scored["auc"]}


def spawn(args: list[str], timeout: float) -> dict[str, Any]:
    """Run this script in a fresh process and read the JSON row it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.run([*args, "--row-out", str(out)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def in_process(name: str, sizes: tv.Sizes) -> dict[str, Any]:
    """--quick runs rows in this process to skip ~10 s of imports each; peak RSS is then cumulative."""
    try:
        return {**run_row(name, sizes), "rss_note": "in-process (quick): peak RSS of the whole run so far"}
    except Exception as err:  # noqa: BLE001 - a library that cannot run is reported, not fatal
        return {"error": f"{type(err).__name__}: {err}"}


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def r(a: str, b: str, key: str = "train_eps", key_b: str | None = None) -> float | None:
        va, vb = rows.get(a, {}).get(key), rows.get(b, {}).get(key_b or key)
        return None if va is None or vb is None else va / vb

    out = {
        "afm_lean_vs_reference_train": r("afm_lean", "afm_reference"),
        "afm_lean_vs_reference_infer": r("afm_lean", "afm_reference", "infer_eps"),
        "afm_lean_vs_deepctr_train": r("afm_lean", "deepctr_afm"),
        "afm_lean_vs_deepctr_infer": r("afm_lean", "deepctr_afm", "infer_eps"),
        "afm_lean_vs_torchfm_train": r("afm_lean", "torchfm_afm"),
        "afm_lean_vs_torchfm_infer": r("afm_lean", "torchfm_afm", "infer_eps"),
        "afm_sharded_vs_embeddingbag_train": r("afm_lean", "afm_lean_embeddingbag"),
        "attention_fm_vs_afm_lean_train": r("attention_fm", "afm_lean"),
    }
    for heads, base in HEADS.items():
        t = r(heads, base)
        out[f"{heads}_train_overhead_pct"] = None if t is None else (1 / t - 1) * 100
        out[f"{heads}_stripped_vs_baseline_infer"] = r(heads, base, "stripped_infer_eps", "infer_eps")
        out[f"{heads}_stripped_vs_baseline_infer_same_process"] = rows.get(heads, {}).get("stripped_vs_baseline_infer_same_process")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small vocabularies and few steps (CI); needs --out")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    ap.add_argument("--rows", default=",".join(GRID), help="comma-separated subset of the grid")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: miner, scaling")
    ap.add_argument("--steps", type=int, default=None, help="override train steps per row")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--dropout", type=float, default=None,
                    help=f"dropout of every AFM row (default {tv.Sizes().dropout}; 0 times the steps without the mask draws)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--sharding", default="table_wise", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = tv.QUICK if args.quick else tv.Sizes()
    if args.steps:
        sizes = replace(sizes, train_steps=args.steps)
    if args.dropout is not None:
        sizes = replace(sizes, dropout=args.dropout)
    if args.part == "scaling-worker":
        from throughput_parts import scaling_worker

        return scaling_worker(sizes, args.sharding.split(","), args.row_out)
    if args.row or args.part:
        from throughput_parts import miner_rows

        row = run_row(args.row, sizes) if args.row else {"rows": miner_rows(args.quick)}
        if args.row_out:
            write_json(row, args.row_out)
        else:
            print(json.dumps(row, indent=2))
        return
    if args.quick and args.out == RESULTS / "throughput.json":
        ap.error("--quick must write elsewhere (--out PATH): the committed results are default-size")
    run_all(args, sizes, harness.start(__file__, argv, asdict(sizes), torch_threads=torch.get_num_threads(), platform=platform.platform()))


def run_all(args: argparse.Namespace, sizes: tv.Sizes, run: harness.Run) -> None:
    from throughput_parts import scaling_rows

    base = [sys.executable, str(HERE), *(["--quick"] if args.quick else []),
            *(["--steps", str(args.steps)] if args.steps else []), *(["--threads", str(args.threads)] if args.threads else []),
            *(["--dropout", str(args.dropout)] if args.dropout is not None else [])]
    report: dict[str, Any] = {"vocabs": sizes.vocabs, "quick": args.quick, "columns": COLUMN_NOTES, "rows": {}}
    started = time.perf_counter()
    for name in [r for r in args.rows.split(",") if r]:
        row_started = time.perf_counter()
        row = in_process(name, sizes) if args.quick else spawn([*base, "--row", name], timeout=1800)
        row["seconds"] = time.perf_counter() - row_started
        row["load_avg_1m_after"] = os.getloadavg()[0]
        report["rows"][name] = {"row": name, **row}
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                      if k in COLUMNS or k == "error"), flush=True)
    report["ratios"] = ratios(report["rows"])
    skip = set(args.skip.split(","))
    report["part_seconds"] = {"rows": time.perf_counter() - started}
    if "miner" not in skip:
        from throughput_parts import miner_rows

        part_started = time.perf_counter()
        report["miner"] = miner_rows(True) if args.quick else spawn([*base, "--part", "miner"], timeout=1800).get("rows")
        report["part_seconds"]["miner"] = time.perf_counter() - part_started
    if "scaling" not in skip:
        part_started = time.perf_counter()
        report["scaling"] = scaling_rows(HERE, base[2:], args.quick)
        report["part_seconds"]["scaling"] = time.perf_counter() - part_started
    report = harness.write_result(args.out, run, report)
    print(format_table(list(report["rows"].values()), COLUMNS, title=f"throughput (examples/s), batch {sizes.batch}"))
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
