"""Random click worlds with planted conjunction cohorts: the family the cohort-recovery benchmark mines.

One seed makes one world: users with numeric and categorical features, items with a category and a
quality, a binary context, and a click label. The majority's label depends on the item and on the
context x quality interaction only, never on the user features, so that the only user-feature pattern
in the label is the planted one. A planted world holds one or two cohorts, each a conjunction of
1-3 conditions on user features (`u_cat1 == 2 & u_num0 >= 1.3`) with 2-8% of the traffic, whose
rows get one effect (seed s's cohort c gets EFFECTS[(s + c) % 4]):
- "shifted_rate": the logit moves by a constant;
- "opposite_taste": the item-category taste is negated;
- "some_categories": the taste differs in 2-3 item categories only;
- "flipped_interaction": the context x quality interaction changes sign.
A null world (`planted=False`) draws the same kind of data with no cohort at all.

Letters: N rows, U users, I items.

Example:
    >>> world = make_world(3, n_rows=20_000)
    >>> world.frame.shape[0] == len(world.labels) == len(world.cohorts)
    True
    >>> all(0.01 <= c["share"] <= 0.1 for c in world.planted)
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from c2al.errors import C2ALError

EFFECTS = ("shifted_rate", "opposite_taste", "some_categories", "flipped_interaction")
SHARES = (0.02, 0.08)  # traffic share of a planted cohort
N_ITEM_CATS = 8
MAX_TRIES = 2000  # rule draws before giving up on a share in SHARES


@dataclass
class World:
    """One generated world.

    Args:
        seed: the seed that made it.
        frame: user (cohort) features per row [N, F]; categorical columns have pandas 'category' dtype
            with integer categories (an integer-coded id, as a Parquet table would hold it).
        context: item and context features per row [N, 3]: item_cat (category), item_q, ctx.
        labels: clicks [N] (0/1).
        cohorts: planted cohort of each row [N], -1 for none.
        planted: per cohort {"rule", "conditions", "effect", "share", "strength"}.
        valid: rows held out for mining [N] (bool); the rest train the baseline.
    """

    seed: int
    frame: pd.DataFrame
    context: pd.DataFrame
    labels: np.ndarray
    cohorts: np.ndarray
    planted: list[dict[str, Any]] = field(default_factory=list)
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def user_features(rng: np.random.Generator, n_users: int) -> pd.DataFrame:
    """1-3 numeric and 1-3 categorical user features [U, F], independent of each other."""
    cols: dict[str, Any] = {}
    for j in range(int(rng.integers(1, 4))):
        kind = rng.integers(3)
        cols[f"u_num{j}"] = (rng.normal(size=n_users) if kind == 0 else
                             rng.lognormal(0.0, 0.7, size=n_users) if kind == 1 else
                             rng.integers(18, 70, size=n_users).astype(np.float64))
    for j in range(int(rng.integers(1, 4))):
        levels = int(rng.integers(3, 11))
        probs = rng.dirichlet(np.ones(levels))
        cols[f"u_cat{j}"] = pd.Categorical(rng.choice(levels, size=n_users, p=probs), categories=range(levels))
    return pd.DataFrame(cols)


def holds(cond: dict[str, Any], values: np.ndarray) -> np.ndarray:
    """Rows [len(values)] where one condition holds: op ">=", "<" (numeric) or "==" (categorical)."""
    if cond["op"] == ">=":
        return values >= cond["value"]
    if cond["op"] == "<":
        return values < cond["value"]
    return values == cond["value"]


def in_rule(conditions: list[dict[str, Any]], users: pd.DataFrame) -> np.ndarray:
    """Users [U] (bool) meeting every condition."""
    mask = np.ones(len(users), dtype=bool)
    for cond in conditions:
        mask &= holds(cond, np.asarray(users[cond["column"]]))
    return mask


def draw_rule(rng: np.random.Generator, users: pd.DataFrame, weight: np.ndarray) -> list[dict[str, Any]] | None:
    """One conjunction of 1-3 conditions whose traffic share lies in SHARES, or None for this draw.

    Categorical conditions are drawn first; numeric thresholds then keep the quantile that brings
    the share to a target drawn in SHARES (features are independent, so shares multiply).

    Args:
        rng: the world's generator.
        users: user features [U, F].
        weight: each user's share of the traffic [U] (sums to 1).
    """
    depth = int(rng.integers(1, min(3, users.shape[1]) + 1))
    columns = list(rng.choice(users.columns, size=depth, replace=False))
    numeric = [c for c in columns if not isinstance(users[c].dtype, pd.CategoricalDtype)]
    conds = [{"column": c, "op": "==", "value": int(rng.choice(users[c].cat.categories))}
             for c in columns if c not in numeric]
    share = float(weight[in_rule(conds, users)].sum())
    target = rng.uniform(*SHARES)
    if not numeric:
        return conds if SHARES[0] <= share <= SHARES[1] else None
    keep = (target / share) ** (1.0 / len(numeric)) if share > 0 else 1.0
    if keep > 0.9:
        return None
    for c in numeric:
        upper = bool(rng.integers(2))
        value = float(np.quantile(users[c], 1.0 - keep if upper else keep))
        conds.append({"column": c, "op": ">=" if upper else "<", "value": round(value, 3)})
    share = float(weight[in_rule(conds, users)].sum())
    return conds if SHARES[0] <= share <= SHARES[1] else None


def plant_cohorts(rng: np.random.Generator, users: pd.DataFrame, weight: np.ndarray,
                  n_cohorts: int) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """Cohort of each user [U] (-1: none) and the rules of `n_cohorts` mostly disjoint conjunctions."""
    cohort = np.full(len(users), -1, dtype=np.int64)
    rules: list[list[dict[str, Any]]] = []
    for _ in range(MAX_TRIES):
        if len(rules) == n_cohorts:
            return cohort, rules
        conds = draw_rule(rng, users, weight)
        if conds is None:
            continue
        mask = in_rule(conds, users)
        if weight[mask & (cohort >= 0)].sum() > 0.1 * weight[mask].sum():  # a second cohort must stand apart
            continue
        cohort[mask & (cohort < 0)] = len(rules)
        rules.append(conds)
    raise C2ALError(f"world generator: no {n_cohorts} cohorts with a share in {SHARES} after {MAX_TRIES} draws")


def rule_text(conds: list[dict[str, Any]]) -> str:
    """`u_cat1 == 2 & u_num0 >= 1.3`."""
    return " & ".join(f"{c['column']} {c['op']} {c['value']:g}" for c in conds)


def base_logit(item_cat: np.ndarray, item_q: np.ndarray, ctx: np.ndarray,
               taste: np.ndarray) -> np.ndarray:
    """The majority's logit [N]: item taste, quality, the context x quality interaction."""
    return -1.0 + 0.6 * item_q + taste[item_cat] + 1.2 * ctx * item_q


def effect_logit(rng: np.random.Generator, effect: str, item_cat: np.ndarray, item_q: np.ndarray, ctx: np.ndarray,
                 taste: np.ndarray) -> tuple[np.ndarray, float]:
    """What a cohort's effect adds to the majority's logit on its rows [n], and its strength."""
    sign = float(rng.choice([-1.0, 1.0]))
    if effect == "shifted_rate":
        strength = sign * rng.uniform(0.8, 1.5)
        return np.full(len(item_cat), strength), float(strength)
    if effect == "opposite_taste":
        return -2.0 * taste[item_cat], 1.0
    if effect == "some_categories":
        cats = rng.choice(N_ITEM_CATS, size=int(rng.integers(2, 4)), replace=False)
        strength = sign * rng.uniform(1.5, 2.5)
        return strength * np.isin(item_cat, cats), float(strength)
    if effect == "flipped_interaction":
        return -2.4 * ctx * item_q, -1.0
    raise C2ALError(f"world generator: unknown effect {effect!r}; expected one of {EFFECTS}")


def make_world(seed: int, planted: bool = True, n_rows: int = 100_000, n_users: int = 5_000,
               n_items: int = 300, valid_share: float = 0.2) -> World:
    """One random world (module docstring), the same for the same arguments.

    Args:
        seed: seeds every draw.
        planted: False for a null world (no cohort).
        n_rows: impressions.
        n_users: users (activity log-normal, so shares are of traffic, not of users).
        n_items: items (popularity Zipf-like).
        valid_share: share of rows held out for mining.

    Returns:
        The World.
    """
    if n_rows < 1000 or n_users < 100:
        raise C2ALError(f"world generator: n_rows={n_rows}, n_users={n_users}; need at least 1000 rows and 100 users")
    rng = np.random.default_rng(seed)
    users = user_features(rng, n_users)
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    weight = activity / activity.sum()
    k = int(rng.integers(1, 3)) if planted else 0
    user_cohort, rules = plant_cohorts(rng, users, weight, k) if k else (np.full(n_users, -1), [])
    item_cat, item_q = rng.integers(N_ITEM_CATS, size=n_items), rng.normal(size=n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    user = rng.choice(n_users, size=n_rows, p=weight)
    item = rng.choice(n_items, size=n_rows, p=popularity / popularity.sum())
    ctx = rng.integers(2, size=n_rows).astype(np.float64)
    taste = rng.normal(0.0, 0.8, size=N_ITEM_CATS)
    logit = base_logit(item_cat[item], item_q[item], ctx, taste)
    cohorts = user_cohort[user]
    planted_info = []
    for c, conds in enumerate(rules):
        rows = cohorts == c
        effect = EFFECTS[(seed + c) % len(EFFECTS)]  # every effect type equally often over consecutive seeds
        shift, strength = effect_logit(rng, effect, item_cat[item][rows], item_q[item][rows], ctx[rows], taste)
        logit[rows] += shift
        planted_info.append({"rule": rule_text(conds), "conditions": conds, "effect": effect,
                             "share": float(rows.mean()), "strength": strength})
    labels = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    frame = users.iloc[user].reset_index(drop=True)
    context = pd.DataFrame({"item_cat": pd.Categorical(item_cat[item], categories=range(N_ITEM_CATS)),
                            "item_q": item_q[item], "ctx": ctx})
    return World(seed, frame, context, labels, cohorts, planted_info, rng.random(n_rows) < valid_share)
