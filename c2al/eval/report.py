"""Readable tables on stdout and report.json files written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from c2al.dist.atomic import atomic_write_bytes


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on, written next to every number it produces."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def write_json(obj: Any, path: str | Path) -> None:
    """Atomic JSON write: a crash never leaves a half-written report."""
    text = json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null so every reader can parse the file."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, AttributeError):
            obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v: Any, column: str = "") -> str:
    """A cell: '-' for missing, 4 decimals, and a signed percentage in `*_pct` columns (+3.56%)."""
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and column.endswith("_pct"):
        return f"{v:+.2f}%" if math.isfinite(v) else "nan"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Fixed-width text table of `columns` from each row dict; `*_pct` columns read as +3.56%.

    Example:
        >>> print(format_table([{"cohort": "0", "ne_diff_pct": -3.5567}], ["cohort", "ne_diff_pct"]))
        cohort  ne_diff_pct
        -------------------
             0       -3.56%
    """
    cells = [[_fmt(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [title] if title else []
    out += [line, "-" * len(line)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
