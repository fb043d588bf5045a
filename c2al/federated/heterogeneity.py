"""Device heterogeneity after RF^2 (Maeng et al., RecSys 2022).

Every client gets a device tier (low, mid, high). A tier sets how often the
device is available for a round, how often it drops out mid-round, and how many
local steps it can afford. RF^2's point is that tiers are not independent of
the data: users of low-end devices behave differently, and ignoring that
correlation understates an optimization's fairness impact. So tiers are drawn
either independently of the data or correlated with a user feature: users are
split into T equal groups by that feature, and group g draws its tier from a
Dirichlet-distributed mix skewed toward tier g.

Letters: T tiers, N clients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from c2al.errors import C2ALError

TIERS = ("low", "mid", "high")
MODES = ("none", "independent", "correlated", "rf2-independent", "rf2-dirichlet")
RF2_ALPHA = 0.005  # RF^2's Dirichlet concentration (--tier-selection dirichlet-s1-0.005)


@dataclass(frozen=True)
class TierSpec:
    """Per-tier behaviour, each a length-T tuple in TIERS order.

    Attributes:
        shares: population share of each tier (independent mode; the marginal target otherwise).
        availability: probability that a device of the tier can take part in a round.
        dropout: probability that a sampled device drops out mid-round (its update is lost).
        steps: local step budget per round (0: no cap beyond the local epochs).
        exclude_low: low-end devices never take part (RF^2's --exclude-low); they are still evaluated.
    """

    shares: tuple[float, ...] = (0.3, 0.4, 0.3)
    availability: tuple[float, ...] = (0.5, 0.8, 0.95)
    dropout: tuple[float, ...] = (0.15, 0.05, 0.02)
    steps: tuple[int, ...] = (2, 5, 10)
    exclude_low: bool = False

    def __post_init__(self) -> None:
        for name in ("shares", "availability", "dropout", "steps"):
            value = getattr(self, name)
            if len(value) != len(TIERS):
                raise C2ALError(f"--tier-{name}: expected {len(TIERS)} values ({'/'.join(TIERS)}), got {len(value)}")
        if any(not 0 <= v <= 1 for v in (*self.shares, *self.availability, *self.dropout)):
            raise C2ALError("--tier-shares, --tier-availability and --tier-dropout must lie in [0, 1]")
        if abs(sum(self.shares) - 1) > 1e-6:
            raise C2ALError(f"--tier-shares must sum to 1, got {sum(self.shares):g}")
        if any(s < 0 for s in self.steps):
            raise C2ALError("--tier-steps must be >= 0")

    @classmethod
    def uniform(cls) -> "TierSpec":
        """No heterogeneity: every device always available, never drops, no step cap."""
        return cls(shares=(0.0, 0.0, 1.0), availability=(1.0,) * 3, dropout=(0.0,) * 3, steps=(0,) * 3)


def assign_tiers(n: int, mode: str, spec: TierSpec, seed: int, feature: np.ndarray | None = None,
                 skew: float = 5.0, *, counts: np.ndarray | None = None, clicked: list[np.ndarray] | None = None) -> np.ndarray:
    """A tier id (0 low .. T-1 high) per client.

    Args:
        n: clients.
        mode: "none" (all high), "independent" (drawn by `spec.shares`), "correlated"
            (users ranked by `feature` into T groups; group g draws from Dirichlet(1 + skew * e_g)),
            or RF^2's own rules: "rf2-independent" (`rf2_independent_tiers` of `counts`) and
            "rf2-dirichlet" (`rf2_dirichlet_tiers` of `clicked`, alpha RF2_ALPHA).
        spec: the tier spec.
        seed: RNG seed.
        feature: one value per client (correlated mode), e.g. age or activity.
        skew: how strongly the group leans to its own tier; 0 makes the mix uniform at random.
        counts: training rows per client (rf2-independent).
        clicked: per client, the items it clicked (rf2-dirichlet).

    Returns:
        int64 [N].

    Example:
        >>> assign_tiers(4, "none", TierSpec(), 0).tolist()
        [2, 2, 2, 2]
    """
    rng = np.random.default_rng(seed)
    t = len(TIERS)
    if mode == "none":
        return np.full(n, t - 1, dtype=np.int64)
    if mode == "independent":
        return rng.choice(t, size=n, p=np.asarray(spec.shares) / sum(spec.shares)).astype(np.int64)
    if mode in ("rf2-independent", "rf2-dirichlet"):
        given = counts if mode == "rf2-independent" else clicked
        if given is None or len(given) != n:
            raise C2ALError(f"--tiers {mode} needs one {'training-row count' if mode == 'rf2-independent' else 'clicked-item list'} per client")
        return rf2_independent_tiers(np.asarray(counts)) if mode == "rf2-independent" else rf2_dirichlet_tiers(list(clicked), RF2_ALPHA, seed)
    if mode != "correlated":
        raise C2ALError(f"--tiers must be one of {MODES}, got {mode!r}")
    if feature is None or len(feature) != n:
        raise C2ALError("--tiers correlated needs one feature value per client (--tier-feature)")
    rank = np.argsort(np.argsort(np.asarray(feature, dtype=np.float64), kind="stable"), kind="stable")
    group = rank * t // n  # [N], T equal-size groups, low feature values first
    out = np.empty(n, dtype=np.int64)
    for g in range(t):
        mix = rng.dirichlet(1.0 + skew * np.eye(t)[g])
        members = np.flatnonzero(group == g)
        out[members] = rng.choice(t, size=len(members), p=mix)
    return out


def round_rng(seed: int, rnd: int, salt: int = 0) -> np.random.Generator:
    """The RNG of one round: a resumed run draws what an uninterrupted one drew."""
    return np.random.default_rng([seed, rnd, salt])


def available(tiers: np.ndarray, spec: TierSpec, rng: np.random.Generator) -> np.ndarray:
    """Indices of the clients whose device is available this round."""
    p = np.where((tiers == 0) & spec.exclude_low, 0.0, np.asarray(spec.availability)[tiers])
    return np.flatnonzero(rng.random(len(tiers)) < p)


def drops_out(tier: int, spec: TierSpec, rng: np.random.Generator) -> bool:
    """Whether a sampled device of `tier` vanishes before reporting back."""
    return bool(rng.random() < spec.dropout[tier])


@dataclass(frozen=True)
class RoundDevices:
    """The devices of one round as a strategy sees them, as Flower's Grid lists its connected nodes.

    Attributes:
        online: the clients whose device is available this round, ascending.
        population: every client (seeds are per (round, client) pair over it).
        rng: the round's generator; a strategy samples from it (after availability, before dropout).
    """

    online: np.ndarray
    population: int
    rng: np.random.Generator

    def get_node_ids(self) -> list[int]:
        """The online clients (Flower's `Grid.get_node_ids`)."""
        return self.online.tolist()


@dataclass(frozen=True)
class Devices:
    """The simulated devices: which are online each round, which vanish mid-round, how many steps each affords.

    Availability, dropout and step budgets are the devices' doing, not the server's: both engines
    ask this object, and a strategy (c2al's or Flower's) only samples among the online clients.

    Args:
        tiers: device tier per client [N].
        spec: the tiers' behaviour.

    Example:
        >>> d = Devices(np.array([0, 2]), TierSpec())
        >>> d.online(np.random.default_rng(0)).population, d.steps(0), d.steps(1)
        (2, 2, 10)
    """

    tiers: np.ndarray
    spec: TierSpec

    def online(self, rng: np.random.Generator) -> RoundDevices:
        """This round's online clients (the first draw of the round's generator)."""
        return RoundDevices(available(self.tiers, self.spec, rng), len(self.tiers), rng)

    def drops_out(self, cid: int, rng: np.random.Generator) -> bool:
        """Whether client `cid`'s device vanishes before reporting back."""
        return drops_out(int(self.tiers[cid]), self.spec, rng)

    def steps(self, cid: int) -> int:
        """The local step budget of client `cid`'s device (0: no cap beyond the local epochs)."""
        return int(self.spec.steps[int(self.tiers[cid])])


# ---------------------------------------------------------------- RF^2's own tier rules


def rf2_independent_tiers(train_counts: np.ndarray, tiers: int = len(TIERS)) -> np.ndarray:
    """RF^2's data-independent tiers: clients ranked by training rows (most first, ties in client order), tier = rank mod T.

    Args:
        train_counts: training rows per client [N].
        tiers: T.

    Returns:
        int64 [N], 0 the low end.

    Example:
        >>> rf2_independent_tiers(np.array([5, 9, 7, 9])).tolist()
        [0, 0, 2, 1]
    """
    order = np.argsort(-np.asarray(train_counts), kind="stable")  # as Python's sorted(reverse=True): stable
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(len(order)) % tiers
    return out


def rf2_dirichlet_tiers(clicked: list[np.ndarray], alpha: float, seed: int, tiers: int = len(TIERS),
                        draw: Callable[[np.random.Generator], np.ndarray] | None = None) -> np.ndarray:
    """RF^2's data-correlated tiers (`--tier-selection dirichlet-s1-ALPHA`): tiers follow what users click.

    Items are walked from the most clicked to the least (ties: the larger id first; users
    without a click form one more group, placed by its size). Each item's users not yet given
    a tier are shuffled and split by Dirichlet(alpha, ..., alpha) proportions sorted largest
    first: the largest share goes to the tier that is smallest so far (fewest users; ties the
    lower tier), the next to the next smallest, the largest tier takes the rest (shares are
    cut with int() as RF^2 cuts them). A small alpha sends nearly all of an item's new users
    to one tier, so a tier is a set of users with shared tastes.

    Args:
        clicked: per client, the item ids it clicked (train and test) [N lists].
        alpha: the Dirichlet concentration (RF^2: 0.005).
        seed: seed of the proportions and shuffles.
        tiers: T.
        draw: the proportions of one item [T] from the generator (default: Dirichlet(alpha); tests fix them).

    Returns:
        int64 [N], 0 the low end.

    Example:
        >>> rf2_dirichlet_tiers([np.array([1]), np.array([1, 2]), np.array([2]), np.array([])], 0.005, 0).tolist()
        [1, 0, 0, 1]
    """
    if alpha <= 0:
        raise C2ALError(f"RF^2 Dirichlet tiers need alpha > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    holders: dict[int, list[int]] = {}
    for cid, items in enumerate(clicked):
        for item in (np.asarray(items, dtype=np.int64).tolist() if len(items) else [-1]):  # -1: the users without a click
            holders.setdefault(item, []).append(cid)
    out = np.full(len(clicked), -1, dtype=np.int64)
    size = np.zeros(tiers, dtype=np.int64)
    for item in sorted(holders, key=lambda i: (len(holders[i]), i), reverse=True):
        new = np.unique([c for c in holders[item] if out[c] < 0])
        if len(new) == 0:
            continue
        new = new[rng.permutation(len(new))]
        share = np.full(tiers, np.nan)
        while np.isnan(share).any():  # RF^2 redraws a NaN draw (tiny alpha)
            share = rng.dirichlet([alpha] * tiers) if draw is None else np.asarray(draw(rng), dtype=np.float64)
        # int() as RF^2 cuts, after 1e-9 so that float noise (a share of 1 - 1e-14) does not move a user
        cuts = [int(c + 1e-9) for c in np.cumsum(np.sort(share)[::-1] * len(new))[:-1]] + [len(new)]
        smallest_first = sorted(range(tiers), key=lambda t: (size[t], t))
        lo = 0
        for t, hi in zip(smallest_first, cuts):
            out[new[lo:hi]] = t
            size[t] += max(hi - lo, 0)
            lo = max(lo, hi)
    return out


def overselect_round(selected: np.ndarray, tiers: np.ndarray, per_round: int, overselect: float) -> np.ndarray:
    """RF^2's over-selection: of the `per_round * (1 + overselect)` clients selected, drop the slowest.

    The int(per_round * overselect) clients dropped are taken from the low tier first (the last
    selected of it), then the middle, then the high one: low-end devices are the stragglers.

    Args:
        selected: the round's selected clients in selection order.
        tiers: tier per client [N] (0 the low end).
        per_round: the clients a round wants.
        overselect: the extra share selected (RF^2's --overselect; 0: none).

    Returns:
        The clients that report back, tier by tier from the low end, each tier in selection order.

    Example:
        >>> overselect_round(np.array([4, 1, 0, 3, 2]), np.array([0, 1, 0, 2, 0]), per_round=4, overselect=0.25).tolist()
        [4, 0, 1, 3]
    """
    selected = np.asarray(selected, dtype=np.int64)
    drop = min(len(selected), int(per_round * overselect)) if overselect > 0 else 0
    kept = []
    for t in range(int(tiers.max()) + 1 if len(tiers) else 0):
        members = selected[tiers[selected] == t]
        cut = min(drop, len(members))
        drop -= cut
        kept.append(members[: len(members) - cut])
    return np.concatenate(kept) if kept else selected
