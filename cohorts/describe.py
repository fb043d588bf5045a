"""What sets a cohort apart: its most distinctive traits, from any cohort ids."""
from __future__ import annotations

from typing import Any

import numpy as np

from c2al.cohorts.encoding import read_columns
from c2al.errors import C2ALError


def trait(name: str, values: np.ndarray, kind: str, inside: np.ndarray) -> dict[str, Any]:
    """One column's standardized difference between a cohort and the rest.

    Args:
        name: the column's name.
        values: the column [N].
        kind: "numeric" or "categorical".
        inside: cohort membership [N].

    Returns:
        {"column", "text", "effect"}: a numeric column's mean gap over its std, or a categorical
        column's most over-represented value with its share gap over the value's Bernoulli std.
    """
    if kind == "numeric":
        values = values.astype(np.float64)
        a, b, sd = values[inside].mean(), values[~inside].mean(), values.std()
        effect = 0.0 if sd == 0 else (a - b) / sd
        return {"column": name, "text": f"{name} {a:.3g} (rest {b:.3g})", "effect": float(effect)}
    cats, codes = np.unique(values.astype(str), return_inverse=True)
    p_in = np.bincount(codes[inside], minlength=len(cats)) / inside.sum()
    p_out = np.bincount(codes[~inside], minlength=len(cats)) / (~inside).sum()
    p_all = np.bincount(codes, minlength=len(cats)) / len(codes)
    gap = (p_in - p_out) / np.sqrt(np.clip(p_all * (1 - p_all), 1e-12, None))
    j = int(np.argmax(gap))
    return {"column": name, "text": f"{name}={cats[j]} {p_in[j]:.0%} (rest {p_out[j]:.0%})", "effect": float(gap[j])}


def describe_cohorts(X: Any, ids: Any, n_cohorts: int, top: int = 3) -> list[dict[str, Any]]:
    """What sets each cohort apart in X, for cohort ids from any miner (centralized or federated).

    A numeric column's trait is its mean inside vs outside the cohort; a
    categorical column's is the value most over-represented inside. Traits
    are ranked by standardized difference (mean gap over the column's std;
    share gap over the value's Bernoulli std).

    Args:
        X: per-row features [N, F], array or DataFrame.
        ids: cohort id of each row [N], -1 for none.
        n_cohorts: K; cohorts 0..K-1 are described (an empty one gets no traits).
        top: traits kept per cohort.

    Returns:
        One dict per cohort: {"cohort", "share", "traits": [{"column", "text", "effect"}]}.
    """
    names, columns, kinds = read_columns(X)
    ids = np.asarray(ids)
    if ids.shape != (len(columns[0]),):
        raise C2ALError(f"describe_cohorts: {ids.shape[0] if ids.ndim else 0} cohort ids for {len(columns[0])} rows of X")
    out = []
    for k in range(n_cohorts):
        inside = ids == k
        traits = []
        if inside.any() and (~inside).any():
            traits = [trait(name, values, kind, inside) for name, values, kind in zip(names, columns, kinds)]
        traits.sort(key=lambda t: -abs(t["effect"]))
        out.append({"cohort": k, "share": float(inside.mean()), "traits": traits[:top]})
    return out
