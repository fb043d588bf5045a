"""report.png: per-cohort NE_diff bars and attention-weight histograms."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = (report.get("attention") or {}).get("histograms", {})
    fig, axes = plt.subplots(1, 2 if hists else 1, figsize=(11 if hists else 6, 4), squeeze=False)
    ax = axes[0][0]
    labels = [f"cohort {c['id']}\n({100 * c['share']:.1f}%)" for c in report["cohorts"]] + ["overall"]
    values = [c["ne_diff_pct"] for c in report["cohorts"]] + [report["overall"]["ne_diff_pct"]]
    values = [v if v is not None else 0.0 for v in values]
    ax.bar(labels, values, color=["tab:green" if v < 0 else "tab:red" for v in values])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("NE_diff % (C2AL vs baseline; < 0 better)")
    ax.set_title("test NE change per cohort")
    if hists:
        ax = axes[0][1]
        for name, h in hists.items():
            edges = h["edges"]
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ax.step(centers, h["counts"], where="mid", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("attention weight")
        ax.set_ylabel("count")
        ax.set_title("attention weights on a test batch")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
