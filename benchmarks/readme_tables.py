"""Render the READMEs' tables from the committed result files, so the two always agree.

  python benchmarks/readme_tables.py            # print every table
  python benchmarks/readme_tables.py --check    # exit 1 if README.md or benchmarks/README.md differs from the result files
  python benchmarks/readme_tables.py --write    # rewrite the tables inside both READMEs

A table lives in README.md (for users) or benchmarks/README.md (the evidence) between
`<!-- table:NAME -->` and `<!-- /table -->`; NAME is a key of TABLES below.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import harness

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
READMES = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")  # the user README, then the evidence


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def md(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def wall(res: dict[str, Any]) -> float:
    """A result file's wall seconds: `wall_s` in the harness header (benchmarks/harness.py), `wall_seconds` or
    `seconds` in files written before it."""
    return next(res[k] for k in ("wall_s", "wall_seconds", "seconds") if k in res)


def job(run: dict[str, Any]) -> tuple[str, float]:
    """A movielens_run.py file's train.py command and that job's wall seconds (`job_command` / `job_wall_s` since
    the harness header, whose `command` is the benchmark script's own; `command` / `wall_seconds` before)."""
    return run.get("job_command", run["command"]), run.get("job_wall_s", run.get("wall_seconds"))


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}%"


def machine(m: dict[str, Any] | str) -> str:
    if isinstance(m, str):
        return m
    load = f", load average {m['load_avg_1m']:.1f} while it ran" if m.get("load_avg_1m") is not None else ""
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}{load}"


def kept_epoch(report: dict[str, Any], which: str) -> str:
    best = (report.get("best") or {}).get(which)
    return f"early-stopped, epoch {best['epoch']} kept" if best else "4 epochs"


def afm_vs_linear() -> str:
    lin = load("linear_baseline_movielens-100k.json")
    run = load("c2al_movielens-100k_afm_1proc.json")
    o = run["report"]["overall"]
    rows = [
        [f"one-hot logistic regression (C={lin['C']:g}, picked on valid)", lin["test"]["ne"], lin["test"]["auc"]],
        [f"AFM baseline (c2al, TorchRec, {kept_epoch(run['report'], 'baseline')})", o["ne_base"], o["auc_base"]],
        ["AFM + C2AL, heads stripped", o["ne_c2al"], o["auc_c2al"]],
    ]
    return md(["MovieLens-100k test split", "NE", "AUC"], rows) + (
        f"\n\n`python benchmarks/linear_baseline.py` ({lin['seconds']:.0f} s) and `{job(run)[0]}` "
        f"({job(run)[1]:.0f} s wall, {machine(run['machine'])}).")


def c2al_cohorts(name: str) -> Callable[[], str]:
    def render() -> str:
        run = load(name)
        rep = run["report"]
        def auc(r: dict[str, Any]) -> list[Any]:
            return [r.get("auc_base", "n/a"), r.get("auc_c2al", "n/a")]

        rows = [[str(c["id"]), f"{c['share']:.3f}", f"{c['plr']:.3f}", f"{c['contrast']:.4f}", c["ne_base"], c["ne_c2al"], pct(c["ne_diff_pct"]), *auc(c)]
                for c in rep["cohorts"]]
        rest = rep.get("outside_cohorts") or {}
        if rest:
            rows.append(["rest", f"{rest['share']:.3f}", f"{rest['plr']:.3f}", "", rest["ne_base"], rest["ne_c2al"], pct(rest["ne_diff_pct"]), *auc(rest)])
        o = rep["overall"]
        rows.append(["overall", "1.000", f"{o['plr']:.3f}", "", o["ne_base"], o["ne_c2al"], pct(o["ne_diff_pct"]), *auc(o)])
        traits = "".join(f"\n- cohort {c['id']}: " + "; ".join(c["traits"]) for c in rep["cohorts"] if c.get("traits"))
        best, decision = rep.get("best") or {}, rep.get("decision")
        if best.get("baseline") and best.get("c2al"):
            traits += (f"\n\nEarly stopping kept the baseline's epoch {best['baseline']['epoch']} and C2AL's epoch {best['c2al']['epoch']} "
                       f"(validation NE {best['baseline']['valid_ne']:.4f} and {best['c2al']['valid_ne']:.4f}).")
        if decision:
            traits += f" The validation gate shipped **{decision['shipped']}** as `c2al.pt`: {decision['reason']}."
        return md(["cohort", "share", "PLR", "contrast (JS)", "NE baseline", "NE C2AL", "NE_diff", "AUC baseline", "AUC C2AL"], rows) + (
            f"\n\nWhat sets the mined cohorts apart (test split, mean or most over-represented value vs the rest):{traits}" if traits else "") + (
            f"\n\n`{job(run)[0]}`: {run['report']['world_size']} process(es), {job(run)[1]:.0f} s wall, {machine(run['machine'])}.")
    return render


def ci(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci95"]
    return f"{cell['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def minority_ne(name: str) -> Callable[[], str]:
    def render() -> str:
        res = load(name)
        cells_all = [c for arms in res["summary"].values() for c in arms.values()]
        planted = any("planted_0" in c for c in cells_all)
        holm = any("t_p_holm" in c.get("overall", {}) for c in cells_all)  # Holm-adjusted over each model's family of arms
        recall = any("recall@10_diff" in c for c in cells_all)
        gated = any("shipped_overall" in c for c in cells_all)  # early-stopped protocol with the validation gate
        rows = []
        for model, arms in res["summary"].items():
            for arm, cells in arms.items():
                att = cells.get("attention", {}).get("attention_entropy")
                row = [model, arm, ci(cells["overall"]), f"{cells['overall']['t_p']:.3f}"]
                row += [f"{cells['overall']['t_p_holm']:.3f}"] if holm else []
                row += [ci(cells[k]) if k in cells else "" for k in (("exposed",) if gated else ()) + ("cohort_0", "cohort_1")]
                if gated:
                    row += [f"{cells['exposed']['t_p']:.3f}"] + ([f"{cells['exposed']['t_p_holm']:.3f}"] if holm else [])
                    row += [ci(cells["shipped_overall"]), cells.get("gate_kept", "")]
                if planted:
                    row += [ci(cells[k]) if k in cells else "" for k in ("planted_0", "planted_1")]
                if not gated:
                    row.append(ci(cells["best_epoch_valid"]) if "best_epoch_valid" in cells else "")
                row.append(f"{att['baseline']:.2f} -> {att['arm']:.2f}" if att else "")
                if recall:
                    r = cells.get("recall@10_diff")
                    row.append(f"{r['mean']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if r else "")
                rows.append(row)
        header = ["model", "arm", "overall NE_diff % [95% CI]", "paired t p"] + (["p holm"] if holm else [])
        header += ["exposed cohorts", "mined cohort 0", "mined cohort 1", "exposed p"] + (["exposed p holm"] if holm else []) + \
            ["shipped by the gate", "gate kept baseline"] if gated else ["mined cohort 0", "mined cohort 1"]
        header += ["planted cohort 0", "planted cohort 1"] if planted else []
        header += ([] if gated else ["best-epoch valid NE_diff %"]) + ["attention entropy"] + (["recall@10 change"] if recall else [])
        args = res["config"]["args"]
        return md(header, rows) + (
            f"\n\n{len(res['seeds'])} seeds, {wall(res) / 60:.0f} min wall with {args.get('workers', 1)} worker process(es) "
            f"on {machine(res['machine'])}.")
    return render


def throughput_models() -> str:
    res = load("throughput.json")
    # result files since the step and the input pipeline are timed apart (throughput.py COLUMN_NOTES)
    split_columns = all("input_eps" in r for r in res["rows"].values() if "train_eps" in r)
    names = {"tables_only": "TorchRec tables alone (lookup, backward, fused update" + ("; no model, so no NE)" if split_columns else ")"),
             "afm_reference": "c2al AFM, straightforward interaction",
             "afm_lean": "c2al AFM (lean interaction, default)", "afm_lean_heads": "c2al AFM + 2 aux heads (infer: stripped)",
             "afm_lean_embeddingbag": "same AFM on plain nn.EmbeddingBag + dense Adagrad", "attention_fm": "c2al AttentionFM",
             "attention_fm_heads": "c2al AttentionFM + 2 aux heads (infer: stripped)", "deepctr_afm": "deepctr-torch AFM",
             "torchfm_afm": "torchfm (pytorch-fm) AFM"}
    rows = []
    for name, r in res["rows"].items():
        if "train_eps" not in r:
            rows.append([names.get(name, name), "error", "", "", ""])
            continue
        infer = r.get("stripped_infer_eps", r["infer_eps"])
        ne = "" if r.get("ne") is None else f"{r['ne']:.4f}"  # tables_only has no model to score
        if name == "tables_only" and not split_columns:  # runs before issue 13 timed a constant predict here
            infer, ne = None, ""
        split = [f"{r['input_eps']:,.0f}", f"{r['train_with_input_eps']:,.0f}"] if split_columns else []
        rows.append([names.get(name, name), f"{r['train_eps']:,.0f}", *split, "n/a" if infer is None else f"{infer:,.0f}", ne, f"{r['peak_rss_mb']:,.0f}"])
    ra = res["ratios"]
    m = res["machine"]
    header = ["model (26 fields, D=16, batch 4096)", "train ex/s", "infer ex/s"]
    if split_columns:
        header = [header[0], "train step ex/s", "input ex/s", "step + input ex/s", "infer ex/s"]
    return md([*header, "held-out NE", "peak RSS MB"], rows) + (
        f"\n\nc2al AFM vs deepctr-torch: {ra['afm_lean_vs_deepctr_train']:.2f}x train, {ra['afm_lean_vs_deepctr_infer']:.2f}x inference; "
        f"vs torchfm {ra['afm_lean_vs_torchfm_train']:.2f}x / {ra['afm_lean_vs_torchfm_infer']:.2f}x; lean vs straightforward interaction "
        f"{ra['afm_lean_vs_reference_train']:.2f}x / {ra['afm_lean_vs_reference_infer']:.2f}x. Aux-head training overhead "
        f"{ra['afm_lean_heads_train_overhead_pct']:+.1f}% (AFM), {ra['attention_fm_heads_train_overhead_pct']:+.1f}% (AttentionFM). "
        f"Stripped model's inference vs a baseline of the same architecture, same process, alternating passes: "
        f"{same(ra, 'afm_lean_heads')} (AFM), {same(ra, 'attention_fm_heads')} (AttentionFM). "
        f"`python benchmarks/throughput.py`, {machine(m)}, {wall(res) / 60:.0f} min, "
        f"load average {m['load_avg_at_end'][0]:.1f} at the end.")


def same(ratios: dict[str, Any], heads: str) -> str:
    value = ratios.get(f"{heads}_stripped_vs_baseline_infer_same_process")
    return "not measured" if value is None else f"{value:.2f}x"


def throughput_miner() -> str:
    res = load("throughput.json")
    rows = [[r["estimator"], f"{r['n']:,}", f"{r['fit_sps']:,.0f}", f"{r['predict_sps']:,.0f}"] for r in res.get("miner") or []]
    scaling = [[r["world_size"], r["sharding"], f"{r['train_eps']:,.0f}" if "train_eps" in r else "error",
                f"{r['load_avg_1m_after']:.1f}" if r.get("load_avg_1m_after") is not None else ""] for r in res.get("scaling") or []]
    return md(["estimator", "samples", "fit samples/s", "predict samples/s"], rows) + "\n\n" + md(
        ["torchrun processes", "sharding", "lean AFM train ex/s (global batch 4096)", "load average after"], scaling)


def federated_tiers(name: str) -> Callable[[], str]:
    def render() -> str:
        run = load(name)
        rep = run["report"]
        fed = rep["federated"]
        rows = [[t["tier"], t["n"], f"{t['share']:.3f}", f"{t['plr']:.3f}", t["ne_base"], t["ne_c2al"], pct(t["ne_diff_pct"])] for t in rep["tiers"]]
        mining = fed.get("mining", {})
        return md(["device tier", "rows", "share", "PLR", "NE baseline", "NE C2AL", "NE_diff"], rows) + (
            f"\n\n{fed['population']} clients (one per user), {fed['clients_per_round']} per round, {fed['rounds']} rounds, "
            f"tiers {fed['tiers']['mode']}; MDAC (largest pairwise gap of the tiers' relative NE change) {fed['mdac']:.4f}. "
            f"Federated vs centralized mining on the same validation rows: ARI {mining.get('ari', float('nan')):.3f} of the exposed "
            f"cohorts, {mining.get('kmeans_ari', float('nan')):.3f} of the k-means partitions.")
    return render


def baselines(name: str) -> Callable[[], str]:
    """benchmarks/baselines.py: the early-stopped AFM per seed (train.py's defaults, and the AFM what-if that
    validation picked), AttentionFM and TwoTower (recall@10 next to most popular) against the LR floor."""
    def render() -> str:
        res = load(name)
        lin, runs = res["linear_floor"], res["runs"]
        picked = (res.get("afm_picked") or {}).get("setting")

        def row(label: str, r: dict[str, Any]) -> list[Any]:
            ret = r.get("retrieval")
            rec = f"{ret['recall@10']:.4f} (most popular {ret['popularity_recall@10']:.4f})" if ret else ""
            return [label, r["seed"], r["test"]["ne"], r["test"]["auc"], f"{r['best_epoch']} of {r['epochs_run']}", f"{r['epoch_seconds']:.0f}", rec]

        def mean(label: str, summary: dict[str, Any]) -> list[Any]:
            ne, auc = summary["test_ne"], summary["test_auc"]
            return [f"{label}, mean over {len(summary['seeds'])} seeds [min, max]", "", f"{ne['mean']:.4f} [{ne['min']:.4f}, {ne['max']:.4f}]",
                    f"{auc['mean']:.4f} [{auc['min']:.4f}, {auc['max']:.4f}]", "", "", ""]

        rows = [[f"one-hot logistic regression (C={lin['C']:g}, picked on valid)", "", lin["test_ne"], lin["test_auc"], "", "", ""]] if lin else []
        rows += [row("AFM, train.py defaults", r) for n, r in runs.items() if r["model"] == "afm" and " " not in n]
        rows += [mean("AFM, train.py defaults", res["afm"])] if res.get("afm") else []
        if picked:
            rows += [row(f"AFM, --{picked.replace('_', '-').replace('=', ' ')}", runs[f"afm:{s} {picked}"]) for s in res["afm_picked"]["seeds"]]
            rows.append(mean(f"AFM, --{picked.replace('_', '-').replace('=', ' ')}", res["afm_picked"]))
        for n, r in runs.items():
            if r["model"] == "attention-fm":
                rows.append(row("AttentionFM, train.py defaults", r))
            elif r["model"] == "two-tower" and " " not in n:
                rows.append(row("TwoTower, in-batch softmax" + (" + logQ" if r["config"].get("two_tower_logq") else " without logQ"), r))
        text = md([f"{res['data']} test split", "seed", "NE", "AUC", "best epoch", "s / epoch", "recall@10"], rows)
        for label, summary in (("train.py defaults", res.get("afm")), (picked, res.get("afm_picked"))):
            if lin and summary:
                below = summary["ne_below_floor"]
                text += (f"\n\nAFM ({label}) minus the floor, test NE: {-below['mean']:+.4f} on average "
                         f"({-summary['ne_below_floor_pct']:+.1f}%), {-below['worst_seed']:+.4f} for the worst seed (NE {summary['test_ne']['max']:.4f}).")
        if res.get("afm_grid"):
            grid = [[g["setting"], g["valid_ne"], f"{g['best_epoch']} of {g['epochs_run']}"] for g in res["afm_grid"]]
            text += ("\n\nWhat holds the AFM back, on validation only (seed 0, one flag changed at a time; the best is then "
                     "trained on every seed above):\n\n" + md(["AFM setting", "best valid NE", "best epoch"], grid))
        if res.get("two_tower_grid"):
            grid = [[g["setting"], g["valid_recall@10"], f"{g['best_epoch']} of {g['epochs_run']}"] for g in res["two_tower_grid"]]
            text += "\n\nThe TwoTower on validation:\n\n" + md(["TwoTower setting", "best valid recall@10", "best epoch"], grid)
        minutes = sum(r["seconds"] for r in runs.values()) / 60
        return text + (f"\n\n`python benchmarks/baselines.py --data {res['data']}` ({minutes:.0f} min of training summed over the runs, "
                       f"in {res['machine'].get('processes', res['machine'].get('workers'))} processes of one torch thread, "
                       f"{machine(res['machine'])}); the floor: `{lin['command'] if lin else 'python benchmarks/linear_baseline.py'}`. "
                       "Seconds per epoch include the validation pass. The TwoTower's recall@10 is over the full catalog with seen "
                       "items filtered; its NE/AUC score dot products that the softmax trains to rank, not to be probabilities.")
    return render


def cohort_recovery() -> str:
    res = load("cohort_recovery.json")
    by = {}
    for r in res["table"]:
        by.setdefault(r["candidates"], {})[r["data"]] = r
    rows = [[c, f"{d['minority']['ari_mean']:.3f}", f"{d['conjunction']['ari_mean']:.3f}",
             " / ".join(f"{d['conjunction'][f'ari_seed{s}']:.2f}" for s in res["seeds"])] for c, d in by.items()]
    return md(["--cohort-candidates", "planted clusters: ARI (mean)", "planted conjunctions: ARI (mean)", "conjunctions per seed"], rows) + (
        f"\n\n`{res['command'].strip()}`: {len(res['seeds'])} seeds of {res['rows_per_seed']:,} rows, baseline {res['baseline']}, "
        f"ARI of the exposed cohorts against the planted ones on the validation rows; {wall(res) / 60:.0f} min on {machine(res['machine'])}.")


def federated_quality() -> str:
    """`python train.py --federated` as a user runs it, per data set: quality, cost, and the curve."""
    rows, curves = [], []
    for path in sorted(RESULTS.glob("federated_quality_*.json")):  # each data set's default run, then its what-ifs
        r = load(path.name)
        data = r["config"]["data"] + "".join(f" {f}" for f in r.get("flags", []))
        cost = r["round_cost"]
        rows.append([data, f"{r['test']['ne']:.4f}", f"{r['test']['auc']:.4f}", f"{r['centralized_test_ne']:.4f}",
                     pct(r["ne_over_centralized_pct"]), f"{r['kept']['rounds']} of {r['rounds_run']}", f"{r['wall_seconds']:.0f}",
                     f"{r['rounds_per_second']:.2f}", f"{cost['sequential_cpu_s_per_round']:.2f} / {cost['vectorized_cpu_s_per_round']:.2f}",
                     f"{r['machine'].get('load_avg_1m', float('nan')):.1f}"])
        step = max(1, len(r["curve"]) // 12)  # about a dozen points of the validation curve
        points = r["curve"][::step] + ([r["curve"][-1]] if (len(r["curve"]) - 1) % step else [])
        curves.append(f"- {data}, validation NE after N rounds: " + ", ".join(f"{c['rounds']}: {c['valid_ne']:.3f}" for c in points))
    return md(["data (and flags other than the defaults)", "test NE", "test AUC", "centralized AFM test NE", "vs centralized", "round kept of run", "wall s",
               "rounds / s", "CPU s per round: one by one / side by side", "load average"], rows) + "\n\n" + "\n".join(curves) + (
        "\n\n`python benchmarks/federated.py --parts quality [--data movielens-1m]` (`benchmarks/results/federated_quality_<data>.json`): "
        "`python train.py --federated --data <data>` with every default, timed; the centralized reference is the early-stopped AFM at "
        "train.py's defaults (3 seeds, `baselines_<data>.json`); rounds / s counts rounds over the training loop's seconds (validation every 5 rounds "
        "included); the round cost is CPU seconds of 5 rounds of 200 clients.")


def federated_part(part: str) -> Callable[[], str]:
    def render() -> str:
        r = load(f"federated_{part}.json")
        cfg = r["config"]
        over = r.get("afm_arms_override") or {}
        setting = (f"{cfg['data']}, seeds {', '.join(map(str, r['seeds']))}, up to {cfg['rounds']} rounds of {cfg['clients_per_round']} clients "
                   f"(early-stopped every {cfg['eval_every']}, patience {cfg['patience']}), server "
                   f"{over.get('server_optimizer', cfg['server_optimizer'])}")
        return r["table"] + (f"\n\n`{r['command'].strip()}` ({setting}); 95% t-intervals over seeds in brackets; all three parts "
                             f"{r['wall_seconds_all_parts'] / 60:.0f} min with {r['machine']['workers']} workers on {machine(r['machine'])}.")
    return render


def rf2_protocol(name: str) -> Callable[[], str]:
    """benchmarks/rf2_protocol.py: MDAC of each tier-aware optimization against the base arm, per tier rule, and the ratio."""
    def render() -> str:
        r = load(name)
        s, cfg = r["summary"], r["config"]

        def cell(c: dict[str, Any] | None, scale: float = 1.0, fmt: str = "{:.4f}") -> str:
            if not c or not c.get("n") or c["mean"] is None:
                return "-"
            lo, hi = c["ci95"]
            return fmt.format(c["mean"] * scale) + (f" [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]" if c["n"] > 1 else "")

        rows = []
        for opt in ("exclude_low", "over_selection", "fedprox"):
            for mode in ("independent", "correlated"):
                c = s.get(opt, {}).get(mode)
                if not c:
                    continue
                ratio = cell(s[opt].get("ratio"), fmt="{:.1f}x") if mode == "correlated" and s[opt].get("ratio", {}).get("n") else ""
                rows.append([opt, mode, cell(c["mdac"]), cell(c["mdac_ne"]),
                             *(cell(c["delta_auc"][t], 100, "{:+.2f}") for t in ("low", "mid", "high")), ratio])
        epochs = (f"up to {cfg['epochs']} global epochs, early-stopped on a {cfg['valid_frac']:.0%} validation slice (patience "
                  f"{cfg['patience']})" if cfg["valid_frac"] else f"{cfg['epochs']} global epoch{'s' if cfg['epochs'] > 1 else ''}")
        base = s["base_auc"]
        return md(["optimization", "device tiers", "MDAC (AUC)", "MDAC (NE)", "AUC change low %", "mid %", "high %",
                   "MDAC correlated / independent"], rows) + (
            f"\n\nBase arm test AUC {base['independent']['mean']:.4f} (independent tiers), {base['correlated']['mean']:.4f} (correlated). "
            f"Paper (exclude low-end devices): 15.8x on MovieLens-20M, 41x on Taobao.\n\n`{r['command'].strip()}` ({cfg['data']}, seeds "
            f"{', '.join(map(str, cfg['seeds']))}, {epochs}, {cfg['clients_per_round']} clients a round, server Adagrad {cfg['server_lr']}); "
            f"95% t-intervals over seeds in brackets; {wall(r) / 60:.0f} min on {machine(r['machine'])}.")
    return render


HEADLINE_ARMS = {"c2al": "C2AL", "random_cohorts": "heads on random cohorts (control)", "cohort_feature": "cohort id as a feature, no heads (control)"}


def headline() -> str:
    """The user README's answer to "does C2AL help?": C2AL and its two telling controls on every data set.

    Returns:
        a markdown table of test NE_diff % with 95% intervals over seeds, one row per (data, model, arm), and its source line.
    """
    rows, sources = [], []
    for name in ("minority_ne_movielens-100k.json", "minority_ne_movielens-1m.json", "minority_ne_synthetic.json"):
        res = load(name)
        data = res["data"].split(":")[0]
        for model, arms in res["summary"].items():
            rows += [[data, model, label, ci(arms[arm]["overall"]), ci(arms[arm]["exposed"]), arms[arm]["gate_kept"]]
                     for arm, label in HEADLINE_ARMS.items() if arm in arms]
        sources.append(f"`{name}` ({len(res['seeds'])} seeds)")
    return md(["data", "model", "arm", "overall NE_diff % [95% CI]", "exposed cohorts NE_diff %", "validation gate kept the baseline"], rows) + (
        "\n\nNegative is better; every training early-stopped on validation NE. From `benchmarks/minority_ne.py`: "
        + ", ".join(sources) + "; the other arms and the discussion are in [benchmarks/README.md](benchmarks/README.md).")


def federated_headline() -> str:
    """One line per data set of `python train.py --federated` with every default against the centralized AFM.

    Returns:
        a markdown list naming each run's test NE, the centralized reference, the gap and the wall time.
    """
    lines = []
    for path in sorted(RESULTS.glob("federated_quality_*.json")):
        r = load(path.name)
        if r.get("flags"):  # what-if runs stay in benchmarks/README.md
            continue
        lines.append(f"- {r['config']['data']}: federated test NE {r['test']['ne']:.4f} against the centralized AFM's "
                     f"{r['centralized_test_ne']:.4f} ({pct(r['ne_over_centralized_pct'])}), {r['kept']['rounds']} rounds kept, "
                     f"{r['wall_seconds']:.0f} s wall on {machine(r['machine'])} (`{path.name}`)")
    for path in sorted(RESULTS.glob("federated_tune_*.json")):  # the settings chosen on that data set's validation
        chosen = load(path.name)["summary"]["chosen"]
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen["flags"].items()) or "the defaults"
        over = chosen["ne_over_centralized_pct"]
        lines.append(f"- {path.stem.removeprefix('federated_tune_')} with `{flags}` (chosen on validation by `benchmarks/federated_tune.py`): "
                     f"test NE {harness.format_interval(chosen['test_ne'])}, {harness.format_interval(over, '{:+.2f}')}% over centralized, "
                     f"{len(chosen['seeds'])} seeds (`{path.name}`)")
    return "\n".join(lines)



def federated_robust() -> str:
    """benchmarks/federated_robust.py: test NE of each --aggregation rule under each attack, against its own clean run.

    Returns:
        the rules x attacks table, the clean runs against plain mean, the rejected NaN updates and the run's setting.
    """
    res = load("federated_robust.json")
    attacks, rules = list(res["grid"]["attacks"]), res["grid"]["rules"]
    cell = {(r["aggregation"], r["setting"]): r for r in res["rows"]}

    def text(r: dict[str, Any]) -> str:
        return f"{r['ne']:.4f}" if r["setting"] == "none" else f"{r['ne']:.4f} ({r['vs_clean_rule_pct']:+.1f}%)"

    rows = [[rule, *(text(cell[rule, a]) for a in attacks)] for rule in rules]
    clean = "; ".join(f"{rule} {cell[rule, 'none']['vs_clean_mean_pct']:+.1f}%" for rule in rules if rule != "mean")
    within = ", ".join(rule for rule in rules if all(cell[rule, a]["within_target"] for a in attacks))
    nan = [r for r in res["rows"] if r["attack"] == "nan"]
    cfg, cmd = res["config"], res["rows"][0]["command"]
    return md(["--aggregation", *attacks], rows) + (
        f"\n\nIn brackets the change against the same rule's clean run. Clean runs against plain mean: {clean}. "
        f"Within {res['target_pct']:g}% of their clean run under every attack: {within or 'none'}. "
        f"The NaN attack: {nan[0]['rejected_updates']} of {nan[0]['rejected_updates'] + nan[0]['aggregated_updates']} updates "
        f"rejected by the server's update check, in every rule.\n\n`python benchmarks/federated_robust.py`: each cell "
        f"`{cmd} --aggregation RULE [--attack ...]` under the federated defaults of its day, which the result file's config records "
        f"({cfg['data']}, {cfg['rounds']} rounds of {cfg['clients_per_round']} clients, server {cfg['server_optimizer']}, tiers {cfg['tiers']}, "
        f"seed {cfg['seed']}); {wall(res) / 60:.0f} min on {machine(res['machine'])}.")


FLOWER_ROWS = {"simulation": "in-process", "flower_1_actor": "Flower, 1 actor", "flower_2_actors": "Flower, 2 actors"}


def flower_engine() -> str:
    """benchmarks/flower_engine.py: both engines on `train.py --federated --rounds 5`, per data set.

    Returns:
        a table of wall time, Flower's start-up, seconds per round, evaluation time and test NE, and a line per data set.
    """
    rows, notes = [], []
    for path in sorted(RESULTS.glob("flower_engine_*.json")):
        res = load(path.name)
        for r in res["rows"]:
            phases = r.get("phases") or {}
            rows.append([res["config"]["data"], FLOWER_ROWS.get(r["row"], r["row"]), f"{r['wall_s']:.1f}",
                         f"{phases['startup_s']:.1f}" if phases else "-", f"{r['per_round_s']:.1f}",
                         f"{phases['eval_s']:.1f}" if phases else "(in the wall time)", r["ne"]])
        first, loads = res["rows"][0], [r["load_avg_1m"]["during_mean"] for r in res["rows"]]
        cpu = machine({k: v for k, v in res["machine"].items() if k != "load_avg_1m"})  # the rows' own loads say more
        ratios = " / ".join(f"{s['ratio_to_simulation']:.1f}x" for s in res["summary"].values())
        evals = " / ".join(f"{r['phases']['eval_s']:.0f} s" for r in res["rows"] if r.get("phases"))
        notes.append(f"- {res['config']['data']} ({first['population']:,} clients, {first['clients_per_round']} a round): Flower's wall time "
                     f"{ratios} the in-process one; Flower evaluating every client {evals}; "
                     f"{cpu}, load average {min(loads):.1f}-{max(loads):.1f} during the runs")
    return md(["data", "engine", "wall s", "start-up s", "s / round", "evaluation s", "test NE"], rows) + (
        "\n\n" + "\n".join(notes) + "\n\n`python benchmarks/flower_engine.py [--data movielens-1m]` "
        "(`benchmarks/results/flower_engine_<data>.json`), each row `python train.py --federated --data <data> --rounds 5` on one engine; "
        "start-up runs from the engine's start to the first ClientApp's reply; s / round is the median of rounds 2-5 for Flower "
        "(its first round waits for Ray and the actors), the mean for the in-process engine.")

def cohort_recovery_worlds() -> str:
    """benchmarks/cohort_recovery_worlds.py: ARI per candidate source over a family of planted worlds, and null worlds exposed."""
    res = load("cohort_recovery_worlds.json")
    seeds, rows = res["seeds"], []
    for source, cell in res["summary"].items():
        pl, nl = cell["planted"], cell["null"]
        rows.append([source, pl["n_worlds"], f"{pl['median_ari']:.2f}", f"{pl['q1']:.2f} / {pl['q3']:.2f}", f"{pl['min']:.2f}",
                     f"{100 * pl['share_ari_ge_0.8']:.0f}%", f"{nl['exposed_worlds']} of {nl['n_worlds']}"])
    return md(["candidates", "planted worlds", "median ARI", "q1 / q3", "min", "worlds with ARI >= 0.8", "null worlds exposing a cohort"], rows) + (
        f"\n\n`{res['command'].strip()}` (`benchmarks/results/cohort_recovery_worlds.json`, {wall(res) / 60:.0f} min, "
        f"{machine(res['machine'])}); `default` is what `train.py --aux-cohorts` fits. Worlds of {res['rows_per_world']:,} rows, "
        f"planted seeds {seeds['planted'][0]}..{seeds['planted'][-1]}, null seeds {seeds['null'][0]}..{seeds['null'][-1]}, "
        "thresholds chosen on separate tuning seeds (`--set tune`).")


def scale() -> str:
    """benchmarks/scale.py: one streamed pass per (rows, model), peak RSS, throughput and the input share, plus the readers."""
    res = load("scale.json")
    rows = []
    for r in sorted(res["runs"], key=lambda r: (r["model"], r["rows"])):
        load_avg = r.get("load_avg") or []
        rows.append([f"{r['rows']:,}", r["model"], f"{r['peak_rss_mb']:,.0f}", f"{r['examples_per_s']:,.0f}", f"{r['wall_s']:.0f}",
                     "n/a" if r.get("input_share") is None else f"{100 * r['input_share']:.1f}%", r["test_ne"],
                     f"{load_avg[0]:.1f}" if load_avg else "n/a"])
    text = md(["rows", "model", "peak RSS MB", "examples/s", "wall s", "input wait", "test NE", "load avg (1 min, end)"], rows)
    reader = res.get("reader")
    if reader:
        text += "\n\nReaders alone (`TrainStream.chunks`, no training): " + ", ".join(
            f"{name.replace('_', ' ')} {v['rows_per_s']:,.0f} rows/s over {v['rows']:,} rows" for name, v in reader.items()) + "."
    first = res["runs"][0]["machine"] if res["runs"] else {}
    return text + (f"\n\n`python benchmarks/scale.py` (`benchmarks/results/scale.json`, one file per run in `benchmarks/results/scale/`), "
                   f"{machine({k: v for k, v in first.items() if k in ('cpu', 'cores', 'torch')})}: each row is "
                   "`python train.py --data DIR --stream ...` in its own process over the Criteo-shaped world (39 fields), "
                   "examples/s = rows trained over the process's whole wall time (start-up, reading, training, the bounded evaluations).")


def scale_study() -> str:
    """benchmarks/scale_study.py: NE_diff % of each arm against its world's baseline as the rows grow (and 8 fields vs 39)."""
    res = load("scale_study.json")

    def cell(c: dict[str, Any], key: str) -> str:
        return ci(c[key]) if c.get(key) and c[key].get("n") else "n/a"

    def attention(model: str, arm: str, n_rows: str, fields: str) -> str:
        activity = res["activity"] if fields == "39" else res.get("activity_by_fields", {}).get(fields, {})
        runs = [a for a in activity.get(model, {}).get(arm, {}).get(n_rows, []) if a]
        values = [v for a in runs for v in (a.get("planted_rows") or {}).values()]
        return f"{sum(values) / len(values):.3f}" if values else "n/a"

    rows = []
    for fields, summary in (("39", res["summary"]), *sorted(res.get("by_fields", {}).items())):
        for model, arms in summary.items():
            sizes = sorted({r for by_rows in arms.values() for r in by_rows}, key=int)
            for n_rows in sizes:
                base = arms.get("baseline", {}).get(n_rows, {})
                rows.append([model, fields, f"{int(n_rows):,}", "baseline", base.get("n_seeds", 0),
                             "NE " + (f"{base['ne_exposed']['mean']:.4f}" if base.get("ne_exposed", {}).get("n") else "n/a"),
                             "NE " + (f"{base['ne_planted']['mean']:.4f}" if base.get("ne_planted", {}).get("n") else "n/a"),
                             "NE " + (f"{base['ne_overall']['mean']:.4f}" if base.get("ne_overall", {}).get("n") else "n/a"),
                             attention(model, "baseline", n_rows, fields)])
                for arm, by_rows in arms.items():
                    c = by_rows.get(n_rows)
                    if arm == "baseline" or c is None:
                        continue
                    rows.append([model, fields, f"{int(n_rows):,}", arm, c.get("n_seeds", 0), cell(c, "exposed"), cell(c, "planted"),
                                 cell(c, "overall"), attention(model, arm, n_rows, fields)])
    return md(["model", "fields", "rows (one pass)", "arm", "worlds", "exposed cohorts NE_diff % [95% CI]", "planted cohorts",
               "overall", "attention on the minorities' fields (planted rows)"], rows) + (
        "\n\n`python benchmarks/scale_study.py` (`benchmarks/results/scale_study.json` merged from one file per run in "
        "`benchmarks/results/scale_study/`; figure `scale_study.png`): each world a `CriteoWorld` (world seed = training seed), one "
        "streamed pass, every arm from the baseline's seeded start; baseline rows give its NE, arm rows the NE_diff % against it "
        "(negative is better). The attention column is the AFM's softmax weight on the minorities' pairs or the AttentionFM's share "
        "of |Y| on their fields, mean over worlds.")


def fedrecgel_protocol(name: str) -> Callable[[], str]:
    """benchmarks/fedrecgel_protocol.py: NCF with private user rows on FedRecGEL's own protocol, one plain or one SAM step per client."""
    def render() -> str:
        r = load(name)
        cfg, runs = r["config"], r["runs"]
        minutes = sum(x["seconds"] for x in runs) / 60
        text = r["table"] + (
            f"\n\n`{r['command'].strip()}` (`benchmarks/results/{name}`; {cfg['rounds']} rounds of {cfg['fraction']:.0%} of the users, "
            f"server Adam {cfg['server_lr']}, test positive among {cfg['eval_negatives']} sampled unrated items, seeds "
            f"{', '.join(map(str, cfg['seeds']))}, evaluations every {cfg['eval_every']} rounds); 95% t-intervals over seeds in brackets; "
            f"sharpness over {cfg['draws']} random directions per radius; the runs took {minutes:.0f} min together, niced, on {machine(r['machine'])}.")
        missing = r.get("missing_runs") or []
        return text + (f" Not run: {', '.join(missing)}." if missing else "")
    return render


def ning_protocol(name: str) -> Callable[[], str]:
    """benchmarks/ning_protocol.py: Ning et al.'s dual encoder on their own next-item protocol, four losses."""
    def render() -> str:
        r = load(name)
        cfg, runs = r["config"], r["runs"]
        fed, cen = cfg["federated"], cfg["centralized"]
        minutes = sum(x.get("seconds", 0) for x in runs) / 60
        missing = r.get("missing_runs") or []
        return r["table"] + (
            f"\n\n`{r['command'].strip()}` (`benchmarks/results/{name}`, one file per run in `benchmarks/results/{Path(name).stem}/`; "
            f"{cfg['data']}, seeds {', '.join(map(str, cfg['seeds']))}, each seed its own 80/10/10 user split; federated: up to "
            f"{fed['rounds']} rounds of {fed['clients_per_round']} clients, validation every {fed['eval_every']} rounds, patience "
            f"{fed['patience']}, the server learning rate per loss from {', '.join(f'{x:g}' for x in cfg['server_lrs'])} on the first "
            f"seed's validation (bold); centralized: validation every {cen['centralized_eval_every']:,} steps, patience {cen['patience']}); "
            f"95% t-intervals over seeds in brackets; gain and gap are relative, per seed; the runs took {minutes:.0f} min together "
            f"on {machine(r['machine'])}.") + (f" Not run yet ({len(missing)} runs): {', '.join(missing)}." if missing else "")
    return render


def federated_tune(name: str) -> Callable[[], str]:
    """benchmarks/federated_tune.py: the federated AFM's settings chosen on validation, against centralized."""
    def render() -> str:
        r = load(name)
        minutes = sum(c["wall_seconds"] for c in r["summary"]["candidates"]) / 60
        return r["table"] + (
            f"\n\n`{r['command'].strip()}` (`benchmarks/results/{name}`, one file per run in `benchmarks/results/{Path(name).stem}/`): "
            f"each candidate one `python train.py --federated` run with train.py's defaults otherwise (device tiers on), chosen by the "
            f"kept validation NE of seed {r['config']['seeds'][0]}; the first seed's runs took {minutes:.0f} min on {machine(r['machine'])}."
            + (f" Not run yet: {', '.join(r['missing_runs'])}." if r.get("missing_runs") else ""))
    return render


TABLES: dict[str, Callable[[], str]] = {
    "cohort_recovery": cohort_recovery,
    "afm_vs_linear": afm_vs_linear,
    "c2al_movielens": c2al_cohorts("c2al_movielens-100k_afm_1proc.json"),
    "c2al_movielens_2proc": c2al_cohorts("c2al_movielens-100k_afm_2proc.json"),
    "throughput_models": throughput_models,
    "throughput_miner": throughput_miner,
    "minority_ne_movielens": minority_ne("minority_ne_movielens-100k.json"),
    "minority_ne_synthetic": minority_ne("minority_ne_synthetic.json"),
    "minority_ne_synthetic_baselines": minority_ne("minority_ne_synthetic_baselines.json"),
    "federated_cohorts": c2al_cohorts("c2al_movielens-100k_afm_federated.json"),
    "federated_tiers": federated_tiers("c2al_movielens-100k_afm_federated.json"),
    "baselines_movielens-1m": baselines("baselines_movielens-1m.json"),
    "baselines_movielens-100k": baselines("baselines_movielens-100k.json"),
    "federated_quality": federated_quality,
    "federated_ning": federated_part("ning"),
    "federated_fedrecgel": federated_part("fedrecgel"),
    "federated_rf2": federated_part("rf2"),
    "rf2_protocol": rf2_protocol("rf2_protocol.json"),
    "rf2_protocol_epochs": rf2_protocol("rf2_protocol_epochs.json"),
    "minority_ne_movielens-1m": minority_ne("minority_ne_movielens-1m.json"),
    "headline": headline,
    "federated_headline": federated_headline,
    "federated_robust": federated_robust,
    "flower_engine": flower_engine,
    "scale": scale,
    "scale_study": scale_study,
    "cohort_recovery_worlds": cohort_recovery_worlds,
    "fedrecgel_protocol": fedrecgel_protocol("fedrecgel_protocol.json"),
    "fedrecgel_protocol_server-lr": fedrecgel_protocol("fedrecgel_protocol_server-lr-0.01.json"),
    "ning_protocol": ning_protocol("ning_protocol.json"),
    "ning_protocol_rounds-600": ning_protocol("ning_protocol_rounds-600.json"),
    "federated_tune": federated_tune("federated_tune_movielens-1m.json"),
}

BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def table_names(text: str) -> list[str]:
    """The names of the table blocks in a README's text, in order.

    Args:
        text: a README's markdown.

    Returns:
        each `<!-- table:NAME -->` block's NAME.
    """
    return [m.group("name") for m in BLOCK.finditer(text)]


def rendered_readme(text: str) -> str:
    """A README's text with every table block re-rendered from the result files.

    Args:
        text: a README's markdown.

    Returns:
        the same text, each block's body replaced by TABLES[NAME]().
    """
    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"a README has a table {name!r} that benchmarks/readme_tables.py does not know")
        return m.group(1) + TABLES[name]() + "\n" + m.group(4)

    return BLOCK.sub(sub, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not (args.check or args.write):
        for name, fn in TABLES.items():
            print(f"## {name}\n{fn()}\n")
        return 0
    stale = []
    for readme in READMES:
        text = readme.read_text()
        new = rendered_readme(text)
        if new != text and args.write:
            readme.write_text(new)
        stale += [readme.relative_to(ROOT)] if new != text else []
    if args.write:
        print(f"rewrote the tables of {', '.join(map(str, stale)) or 'nothing (all agree)'} from benchmarks/results")
    elif stale:
        print(f"{', '.join(map(str, stale))}: tables differ from benchmarks/results; run python benchmarks/readme_tables.py --write", file=sys.stderr)
        return 1
    else:
        print("README.md and benchmarks/README.md tables agree with benchmarks/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
