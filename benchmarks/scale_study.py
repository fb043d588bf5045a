"""C2AL as data grows (issue 21 §3): the first public test of the paper's scaling claim, on streamed worlds.

    python benchmarks/scale_study.py                              # the grid below, one file per run, then the merge
    python benchmarks/scale_study.py --rows 1000000 --seeds 0 --models attention-fm   # one slice
    python benchmarks/scale_study.py --merge-only                 # re-merge the run files already written

The paper says the central pattern takes over as more data is used for training. Each world is a
`c2al.data.criteo_world.CriteoWorld` (13 dense and 26 categorical fields with power-law vocabularies,
written as Parquet and streamed one pass): two planted minority cohorts, conjunctions of the user fields
cat_0 x cat_1 at 4% of traffic each, depend on field interactions (cat_8 x cat_9, cat_10 x cat_11) the
majority never uses, while the majority's clicks follow three other pairs. World seed = training seed,
so the seeds are a family of worlds, not one.

A run is one (model, rows, seed, arm) training, written to results/scale_study/ as soon as it ends:
- baseline: the plain model; mines the cohorts on its validation scores (saved beside its file);
- c2al: two auxiliary heads on the mined cohorts (the default lambda, no gate: what the heads do);
- random_cohorts: the same heads on random cohorts of the mined shares (the (cat_0, cat_1) pairs dealt
  at random), the control that says whether the mining matters;
- cohort_feature: no heads, the mined cohort id as one more sparse input field.
Every arm starts from the baseline's seeded weights and trains the same one pass. Per run: test NE
overall, over the exposed (mined) cohorts and over the planted cohorts, as NE_diff % against the
baseline of the same world, and attention activity on a test batch (the generic scalars, plus the
attention the model puts on the minorities' own fields on the planted rows).
The merge (results/scale_study.json) has `summary[model][arm][rows]` = {"exposed", "overall",
"planted"} intervals over the seeds (harness.interval), and the activity against rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import harness
import numpy as np
import scale
import torch

from c2al.config import Config
from c2al.data.criteo_world import MINORITY_PAIRS, cohort_of
from c2al.dist.process import init_distributed
from c2al.errors import C2ALError
from c2al.eval.metrics import ne_diff_pct, summarize

RESULTS = harness.RESULTS / "scale_study"
MERGED = harness.RESULTS / "scale_study.json"
ARMS = ("baseline", "c2al", "random_cohorts", "cohort_feature")
COHORT_COLUMNS = ("cat_0", "cat_1")
# The grid the issue asks for: the AttentionFM (the paper's DHEN / Wukong block) at every size, the AFM
# (780 pairs of 40 fields) at the two smaller ones.
GRID = {"attention-fm": (1_000_000, 4_000_000, 16_000_000), "afm": (1_000_000, 4_000_000)}
# What the model sees of the same world (issue 21: "at one size, 8 fields against 39"): every field, or the 8
# categorical fields that carry a signal for the minorities (the cohort fields and both cohorts' own pairs) and one
# of the majority's three pairs, no counts: the minorities' 2 pairs among 28 instead of among 741.
FIELD_SETS = {"39": (tuple(f"cat_{j}" for j in range(scale.N_SPARSE)), tuple(f"int_{j}" for j in range(scale.N_DENSE))),
              "8": (("cat_0", "cat_1", "cat_2", "cat_3", "cat_8", "cat_9", "cat_10", "cat_11"), ())}


def study_config(folder: Path, model: str, seed: int, args: argparse.Namespace) -> Config:
    """The train.py config of every arm of one world (the arms differ in what they attach, not in these)."""
    sparse, dense = FIELD_SETS[args.fields]
    vocab = scale.CriteoWorld(rows=1).vocab_sizes
    return Config(data=str(folder), stream=True, label="label", sparse=sparse, dense=dense, cohort_features=COHORT_COLUMNS,
                  model=model, seed=seed, batch_size=args.batch_size, eval_every=args.eval_every, eval_rows=args.eval_rows,
                  split_by="file", hash_size=tuple(vocab[int(f.removeprefix("cat_"))] + 1 for f in sparse), aux_cohorts=2,
                  gate=False, quiet=True).check()


def planted(frame: Any) -> np.ndarray:
    """The planted cohort of each row (-1 majority) from its raw user fields."""
    return cohort_of(frame["cat_0"].astype(str).astype(np.int64).to_numpy(), frame["cat_1"].astype(str).astype(np.int64).to_numpy())


def random_cohorts(shares: np.ndarray, seed: int) -> Any:
    """A predict(frame) dealing every (cat_0, cat_1) pair to cohort k with probability shares[k] (-1 otherwise): random
    subsets of users' kinds with the mined cohorts' shares in expectation."""
    import pandas as pd

    edges = np.cumsum(np.asarray(shares, dtype=np.float64))
    salt = np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)

    def predict(frame: Any) -> np.ndarray:
        keys = pd.util.hash_pandas_object(frame[list(COHORT_COLUMNS)].astype(str), index=False).to_numpy(np.uint64)
        u = ((keys ^ salt) >> np.uint64(11)).astype(np.float64) / 2.0**53  # [n] uniform in [0, 1), one value per pair
        ids = np.searchsorted(edges, u, side="right")
        return np.where(ids < len(edges), ids, -1).astype(np.int64)

    return predict


def minority_attention(model: Any, splits: Any, rows: np.ndarray, batch_rows: int = 4096) -> dict[str, float]:
    """How much attention the model gives the minorities' own fields on planted rows vs the majority's rows: for the
    AFM the softmax weight of the cohorts' pairs, for the AttentionFM the share of |Y| on the cohorts' fields."""
    from c2al.data.batch import make_batch

    fields = sorted({f for pair in MINORITY_PAIRS for f in pair})
    names = splits.schema.feature_names
    take = rows[:batch_rows]
    if len(take) == 0:
        return {}
    batch = make_batch(splits.test, splits.schema, take)
    model.eval()
    weights = model.attention_weights(batch.dense, batch.sparse).float()  # AFM [B, P]; AttentionFM [B, F, K]
    if weights.dim() == 2:
        pairs = [(i, j) for i in range(model.num_fields) for j in range(i + 1, model.num_fields)]
        mine = [p for p, (i, j) in enumerate(pairs) if (names[i] if i < len(names) else "", names[j] if j < len(names) else "")
                in {(f"cat_{a}", f"cat_{b}") for a, b in MINORITY_PAIRS}]
        return {"minority_pair_weight": float(weights[:, mine].sum(dim=1).mean())}
    mass = weights.abs().sum(dim=2)  # [B, F]
    idx = [names.index(f"cat_{f}") for f in fields]
    return {"minority_field_share": float((mass[:, idx].sum(dim=1) / mass.sum(dim=1).clamp_min(1e-12)).mean())}


def run_one(model: str, rows: int, seed: int, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm on one world; the baseline also mines and saves its cohorts and test scores for the arms."""
    from c2al.cohorts import CohortMiner
    from c2al.data.stream import open_stream
    from c2al.jobs.centralized import fit_c2al, with_mined_cohorts
    from c2al.jobs.pipeline import cohort_frame, mine_cohorts, served_model
    from c2al.train.build import seeded_model
    from c2al.train.loop import fit
    from c2al.train.task import predict

    folder = scale.world_folder(args.work, rows, seed, args.chunk_rows, args.eval_rows)
    cfg = study_config(folder, model, seed, args)
    info = init_distributed("cpu")
    splits = open_stream(cfg)
    keep = args.results / f"mined-{model}-{rows}-s{seed}{fields_tag(args.fields)}"
    frame_test = cohort_frame(cfg, splits, "test")
    truth = planted(frame_test)
    if arm == "baseline":
        trained = fit(cfg, splits, seeded_model(cfg, splits.schema), info, tag="baseline")
        p_valid = predict(trained.module, splits.valid, splits.schema, cfg.batch_size, info)
        keep.mkdir(parents=True, exist_ok=True)
        miner = mine_cohorts(cfg, splits, p_valid, keep, info, null_test=False)  # the top two, as minority_ne reads its arms
        p_test = predict(trained.module, splits.test, splits.schema, cfg.batch_size, info)
        np.savez(keep / "baseline_test.npz", p=p_test)
        served, test = trained.model, splits.test
    else:
        if not (keep / "cohorts.json").exists():
            raise C2ALError(f"{arm} needs the baseline of {model} rows={rows} seed={seed} first (its mined cohorts)")
        miner = CohortMiner.load(keep / "cohorts.json")
        k = len(miner.contrast_)
        if k == 0:
            return {"skipped": "the miner exposed no cohort on this world's baseline"}
        ids = {s: miner.predict(cohort_frame(cfg, splits, s)) for s in ("valid", "test")}
        if arm == "cohort_feature":
            armed = splits.with_feature("cohort", lambda f: miner.predict(f[list(COHORT_COLUMNS)]) + 1, k + 1)
            trained = fit(cfg, armed, seeded_model(cfg, armed.schema), info, tag=arm)
        else:
            if arm == "c2al":
                armed = with_mined_cohorts(cfg, splits, miner, ids)
            else:
                shares = np.asarray([np.mean(ids["valid"] == c) for c in range(k)])
                armed = splits.with_cohorts(random_cohorts(shares, seed))
            trained = fit_c2al(cfg, armed, list(cfg.aux_weights())[:k], info, None)
        served, test = served_model(trained.model), armed.test
    schema = armed.schema if arm == "cohort_feature" else splits.schema
    p = predict(served, test, schema, cfg.batch_size, info)
    return score(p, splits, miner, truth, keep, trained, cfg, arm) | {"attention": _activity(served, splits, test, schema, truth, arm)}


def score(p: np.ndarray, splits: Any, miner: Any, truth: np.ndarray, keep: Path, trained: Any, cfg: Config, arm: str) -> dict[str, Any]:
    """Test NE overall, over the exposed and the planted cohorts; NE_diff % against this world's baseline."""
    from c2al.jobs.pipeline import cohort_frame

    y = splits.test.labels
    exposed = miner.predict(cohort_frame(cfg, splits, "test")) >= 0 if len(miner.contrast_) else np.zeros(len(y), bool)
    inside = truth >= 0
    out: dict[str, Any] = {"best": trained.best, "train_seconds": trained.seconds,
                           "rows_seen": (trained.history[-1] if trained.history else {}).get("rows_seen"),
                           "progressive_ne": (trained.history[-1] if trained.history else {}).get("progressive_ne"),
                           "n_exposed": int(exposed.sum()), "n_planted": int(inside.sum()), "k": int(len(miner.contrast_))}
    base = np.load(keep / "baseline_test.npz")["p"]
    for part, rows in (("overall", np.ones(len(y), bool)), ("exposed", exposed), ("planted", inside)):
        ne = summarize(p[rows], y[rows])["ne"] if rows.any() else None
        out[f"ne_{part}"] = ne
        if arm != "baseline":
            ne_base = summarize(base[rows], y[rows])["ne"] if ne is not None else None
            out[part] = None if ne is None or ne_base is None else ne_diff_pct(ne, ne_base)
    return out


def _activity(served: Any, splits: Any, test: Any, schema: Any, truth: np.ndarray, arm: str) -> dict[str, Any]:
    """attention_activity's scalars on a test batch, and the attention on the minorities' own fields (planted vs majority rows)."""
    from c2al.data.batch import make_batch
    from c2al.eval.activity import attention_activity

    rows = np.arange(min(4096, len(test)))
    batch = make_batch(test, schema, rows)
    served.eval()
    out = {"all_rows": attention_activity(served, batch.dense, batch.sparse)}
    if arm != "cohort_feature":  # its inputs carry one field more than the minorities' field indices assume
        out["planted_rows"] = minority_attention(served, dataclasses.replace(splits, test=test), np.flatnonzero(truth >= 0))
        out["majority_rows"] = minority_attention(served, dataclasses.replace(splits, test=test), np.flatnonzero(truth < 0))
    return out


def fields_tag(fields: str) -> str:
    """"" for the full 39-field world (the file names the grid has always had), "-f8" for the 8-field view."""
    return "" if fields == "39" else f"-f{fields}"


def run_file(results: Path, model: str, rows: int, seed: int, arm: str, fields: str = "39") -> Path:
    return results / f"run-{model}-{rows}-s{seed}-{arm}{fields_tag(fields)}.json"


def merge(results: Path) -> dict[str, Any]:
    """Every run file under `results` as `summary[model][arm][rows]` intervals over seeds (the 39-field world), the
    same for each other field set under `by_fields[FIELDS]` (the attention scalars under `activity` and
    `activity_by_fields[FIELDS]`), and the runs."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("run-*.json"))]
    by_fields: dict[str, Any] = {}
    activity: dict[str, Any] = {}
    for r in runs:
        c = r["config"]
        fields = str(c.get("fields", "39"))
        cell = by_fields.setdefault(fields, {}).setdefault(c["model"], {}).setdefault(c["arm"], {}).setdefault(str(c["rows"]), {"runs": []})
        cell["runs"].append(r["result"])
        activity.setdefault(fields, {}).setdefault(c["model"], {}).setdefault(c["arm"], {}).setdefault(str(c["rows"]), []).append(
            r["result"].get("attention"))
    summary = by_fields.pop("39", {})
    for model in [*summary.values(), *(m for f in by_fields.values() for m in f.values())]:
        for arm, by_rows in model.items():
            for cell in by_rows.values():
                done = [x for x in cell.pop("runs") if "skipped" not in x]
                cell["n_seeds"] = len(done)
                keys = ("ne_overall", "ne_exposed", "ne_planted") if arm == "baseline" else ("overall", "exposed", "planted")
                for key in keys:
                    cell[key.removeprefix("ne_") if arm != "baseline" else key] = harness.interval([x.get(key) for x in done])
    return {"summary": summary, "by_fields": by_fields, "activity": activity.pop("39", {}), "activity_by_fields": activity,
            "runs": [{"config": r["config"], "result": {k: v for k, v in r["result"].items() if k != "attention"}} for r in runs]}


def plot(merged: dict[str, Any], path: Path) -> None:
    """NE_diff % against rows (log scale) per model, one line per arm with its 95% interval over the seeds, for the
    exposed cohorts, the planted ones and overall; and the attention on the minorities' fields on planted rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = merged["summary"]
    models = [m for m in summary if any(a != "baseline" for a in summary[m])]
    if not models:
        return
    panels = ("exposed", "planted", "overall", "attention")
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4.2 * len(panels), 3.4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        for ax, key in zip(row, panels):
            for i, (arm, by_rows) in enumerate(sorted(summary[model].items())):
                if key == "attention":
                    points = [(int(r), _planted_attention(merged["activity"][model][arm][r])) for r in by_rows]
                    points = [(r, v) for r, v in points if v is not None]
                    if points:
                        ax.plot(*zip(*sorted(points)), "o-", label=arm)
                    continue
                if arm == "baseline":
                    continue
                cells = sorted((int(r), c[key]) for r, c in by_rows.items() if c.get(key) and c[key]["n"])
                if not cells:
                    continue
                xs = [r * (1 + 0.04 * (i - 1.5)) for r, _ in cells]  # arms side by side at each size
                means = [c["mean"] for _, c in cells]
                err = [[m - c["ci95"][0] for m, (_, c) in zip(means, cells)], [c["ci95"][1] - m for m, (_, c) in zip(means, cells)]]
                ax.errorbar(xs, means, yerr=err, fmt="o-", capsize=3, label=arm)
            ax.set_xscale("log")
            if key != "attention":
                ax.axhline(0, color="black", lw=0.8)
            ax.set_title(f"{model}: " + ("attention on the minorities' fields (planted rows)" if key == "attention"
                                          else f"{key} NE_diff % vs baseline"), fontsize=9)
            ax.set_xlabel("training rows (one pass)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle("C2AL as data grows: mean and 95% interval over worlds (world seed = training seed; < 0 is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _planted_attention(runs: list[Any]) -> float | None:
    """The mean over seeds of the attention scalar on planted rows (AFM pair weight or AttentionFM field share)."""
    values = [v for a in runs if a for v in (a.get("planted_rows") or {}).values()]
    return float(np.mean(values)) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(GRID), help="models of the grid (each at its GRID sizes unless --rows)")
    ap.add_argument("--rows", default="", help="comma-separated sizes instead of each model's GRID sizes")
    harness.add_seeds_flag(ap, "0,1,2", what="the worlds (world seed = training seed)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)} (baseline first: the arms read its cohorts)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--eval-rows", type=int, default=100_000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--chunk-rows", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fields", default="39", choices=sorted(FIELD_SETS), help="what the model sees of each world: all 39 fields, "
                    "or the 8 that carry the minorities' signal and one majority pair (merged under by_fields)")
    ap.add_argument("--redo", action="store_true", help="train runs whose result file exists again")
    ap.add_argument("--merge-only", action="store_true")
    ap.add_argument("--work", type=Path, default=harness.ROOT / "runs" / "scale", help="generated worlds")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the run files (the merge goes to results/scale_study.json "
                    "for the default folder, else to RESULTS/merged.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        ap.error(f"unknown --arms {unknown}; choose from {', '.join(ARMS)}")
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.merge_only:
        for model in [m for m in args.models.split(",") if m]:
            sizes = [int(v) for v in args.rows.split(",")] if args.rows else GRID.get(model, ())
            for rows in sizes:
                for seed in args.seeds:
                    for arm in arms:
                        path = run_file(args.results, model, rows, seed, arm, args.fields)
                        if path.exists() and not args.redo:
                            continue
                        run = harness.start(__file__, argv, config={"model": model, "rows": rows, "seed": seed, "arm": arm,
                                                                   "batch_size": args.batch_size, "eval_rows": args.eval_rows,
                                                                   "eval_every": args.eval_every, "fields": args.fields})
                        result = run_one(model, rows, seed, arm, args)
                        harness.write_result(path, run, {"result": result})
                        print(json.dumps({"model": model, "rows": rows, "seed": seed, "arm": arm,
                                          **{k: result.get(k) for k in ("overall", "exposed", "planted", "ne_overall")}}), flush=True)
    run = harness.start(__file__, argv, config={"merged_from": str(args.results)})
    merged_path = MERGED if args.results == RESULTS else args.results / "merged.json"
    merged = merge(args.results)
    harness.write_result(merged_path, run, merged)
    plot(merged, merged_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
