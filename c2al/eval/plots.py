"""report.png: per-cohort NE_diff bars (cohorts, the rest of the traffic, overall) and attention-weight histograms."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

COLORS = {"better": "tab:green", "worse": "tab:red"}


def bar_rows(report: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, NE_diff %) per bar: each cohort with its share and traits, the rest of the traffic, overall.

    Example:
        >>> rows = bar_rows({"cohorts": [{"id": 0, "share": 0.05, "ne_diff_pct": -2.0, "traits": ["age 61 (rest 38)"]}],
        ...                  "outside_cohorts": {"share": 0.95, "ne_diff_pct": 0.1}, "overall": {"ne_diff_pct": 0.0}})
        >>> [label.splitlines()[0] for label, _ in rows], [v for _, v in rows]
        (['cohort 0 (5.0%)', 'rest (95.0%)', 'overall'], [-2.0, 0.1, 0.0])
    """
    rows = []
    for c in report["cohorts"]:
        traits = "\n".join(textwrap.shorten(t, 30, placeholder="...") for t in (c.get("traits") or [])[:2])
        rows.append((f"cohort {c['id']} ({100 * c['share']:.1f}%)" + (f"\n{traits}" if traits else ""), c["ne_diff_pct"]))
    rest = report.get("outside_cohorts") or {}
    if rest:
        rows.append((f"rest ({100 * rest['share']:.1f}%)", rest["ne_diff_pct"]))
    rows.append(("overall", report["overall"]["ne_diff_pct"]))
    return [(label, v if v is not None else 0.0) for label, v in rows]


def title(report: dict[str, Any]) -> str:
    """'movielens-100k, afm, K=2, lambda=0.1': what made the figure."""
    cfg = report.get("config") or {}
    data = str(cfg.get("data", "?"))
    given = cfg.get("aux_weight", [])
    if given == "auto":  # --aux-weight auto: the lambda the validation search kept
        chosen = (report.get("aux_weight_search") or {}).get("chosen")
        weights = f"auto -> {chosen:g}" if isinstance(chosen, (int, float)) else "auto"
    else:
        weights = ",".join(f"{w:g}" for w in given)
    parts = [Path(data).name if "/" in data else data, str(cfg.get("model", "?")), f"K={cfg.get('aux_cohorts', len(report['cohorts']))}",
             f"lambda={weights or '?'}"]
    if cfg.get("federated"):
        parts.append("federated")
    return "C2AL vs baseline: " + ", ".join(parts)


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the figure of a C2AL report.json body to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    hists = (report.get("attention") or {}).get("histograms", {})
    rows = bar_rows(report)
    fig, axes = plt.subplots(1, 2 if hists else 1, figsize=(13 if hists else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    values = [v for _, v in rows]
    ax.bar(range(len(rows)), values, color=[COLORS["better"] if v < 0 else COLORS["worse"] for v in values])
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("NE_diff % (C2AL vs baseline; < 0 better)")
    ax.set_title("test NE change per cohort")
    ax.legend(handles=[Patch(color=c, label=f"C2AL {k}") for k, c in COLORS.items()], fontsize=8)
    if hists:
        _histograms(axes[0][1], hists)
    fig.suptitle(title(report))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histograms(ax: Any, hists: dict[str, dict[str, list[float]]]) -> None:
    """One outline per model; stairs draw each on its own edges, which the report shares between models."""
    for name, h in hists.items():
        ax.stairs(h["counts"], h["edges"], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("attention weight")
    ax.set_ylabel("count")
    ax.set_title("attention weights on a test batch (same bins)")
    ax.legend()
