"""The rule of a candidate cohort: its text and which rows it holds.

A rule is a plain dict (JSON as saved), one of:
- a cluster: {"source": "kmeans" | "gmm", "cluster": j};
- an axis value: {"source": "axis:COL", "column": COL, "value": v};
- an axis range: {"source": "axis:COL", "column": COL, "low": a | None, "high": b | None}, a <= x < b;
- a conjunction: {"source": "tree", "conditions": [{"column", "op", "value"}, ...]}, all of them
  holding, with op one of "<=", ">" (numeric columns) and "==", "!=" (categorical ones).
Fit and predict decide membership through `members` alone, so a rule keeps meaning the same rows
in a loaded miner, with no pickled estimator.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def condition_text(cond: dict[str, Any]) -> str:
    """`region=3`, `region!=3`, `age<=54.5`, `age>54.5`."""
    value = cond["value"]
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{cond['column']}{'=' if cond['op'] == '==' else cond['op']}{shown}"


def rule_text(rule: dict[str, Any]) -> str:
    """How a rule reads in tables and reports."""
    if "conditions" in rule:
        return " & ".join(condition_text(c) for c in rule["conditions"])
    if "cluster" in rule:
        return f"{rule['source']} cluster {rule['cluster']}"
    if "value" in rule:
        return f"{rule['column']} == {rule['value']!r}"
    low, high, col = rule["low"], rule["high"], rule["column"]
    if low is None:
        return f"{col} < {high:g}"
    return f"{col} >= {low:g}" if high is None else f"{low:g} <= {col} < {high:g}"


def _holds(cond: dict[str, Any], values: np.ndarray) -> np.ndarray:
    op, value = cond["op"], cond["value"]
    if op == "<=":
        return values <= value
    if op == ">":
        return values > value
    return (values == value) if op == "==" else (values != value)


def members(rule: dict[str, Any], names: list[str], columns: list[np.ndarray],
            clusters: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows a rule holds [N] (bool).

    Args:
        rule: a rule (module docstring).
        names: column names of X.
        columns: per-column arrays as `encoding.read_columns` gives them.
        clusters: cluster (or component) of each row per clustering source, for cluster rules.

    Returns:
        Membership mask [N].
    """
    if "cluster" in rule:
        return clusters[rule["source"]] == rule["cluster"]
    if "conditions" in rule:
        mask = np.ones(len(columns[0]), dtype=bool)
        for cond in rule["conditions"]:
            mask &= _holds(cond, columns[names.index(cond["column"])])
        return mask
    values = columns[names.index(rule["column"])]
    if "value" in rule:
        return values == rule["value"]
    mask = np.ones(len(values), dtype=bool)
    if rule["low"] is not None:
        mask &= values >= rule["low"]
    if rule["high"] is not None:
        mask &= values < rule["high"]
    return mask
