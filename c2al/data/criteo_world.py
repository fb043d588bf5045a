"""A Criteo-shaped generated world with planted minority cohorts, for scale tests and benchmarks.

Rows look like the Criteo click logs TorchRec users train on: a 0/1 `label`, 13 integer counts
`int_0`..`int_12` (missing cells, a few negatives) and 26 categorical fields `cat_0`..`cat_25` whose
vocabularies grow log-spaced from 10 to `max_vocab` ids, drawn log-uniformly (a power law: a few ids
are everywhere, most are rare). Two user-side fields carry the cohorts: `cat_0` (10 values, a region)
and `cat_1` (15 values, an age bucket), drawn uniformly so cohort shares are exact in expectation.

The label is a logistic model of field interactions. The majority's click depends on three pairs of
mid-sized fields (cat_2 x cat_3, cat_4 x cat_5, cat_6 x cat_7) and two counts; each minority cohort,
a conjunction of the two user fields, depends instead on a pair the majority never uses (cohort 0:
cat_8 x cat_9, cohort 1: cat_10 x cat_11) and only weakly on the majority's pairs. A model that serves
the majority well can ignore exactly the interactions the minorities need: the regime where C2AL's
paper says the central pattern takes over as data grows.

The world is a pure function of (seed, chunk index): chunk i of a world is the same whatever else is
generated, so a 16M-row world is the 1M-row world followed by 15 more chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

N_DENSE, N_SPARSE = 13, 26
MAJORITY_PAIRS = ((2, 3), (4, 5), (6, 7))
MINORITY_PAIRS = ((8, 9), (10, 11))  # cohort k's own interaction
_TRUTH_ROWS = 1 << 14  # true embeddings are looked up by id modulo this: cheap, and ids stay distinguishable
_TRUTH_DIM = 4


@dataclass(frozen=True)
class CriteoWorld:
    """The generator's settings; `chunk(i)` is a pure function of them and i.

    Args:
        rows: rows of the whole world (the last chunk may be shorter).
        seed: the world's seed (truth tables and every chunk).
        chunk_rows: rows per generated chunk (one Parquet file each in `write_parquet`).
        max_vocab: vocabulary of the largest categorical field.
        minority_strength: scale of each cohort's own interaction logits.
        minority_offset: added to every cohort row's logit (0: the cohorts' click rates differ only through
            their own interaction; > 0 makes them visible to a baseline from their rate alone, as small tests need).
        missing: share of missing cells in each integer and categorical field (not in the cohort fields).
    """

    rows: int
    seed: int = 0
    chunk_rows: int = 1_000_000
    max_vocab: int = 1_000_000
    minority_strength: float = 2.5
    minority_offset: float = 0.0
    missing: float = 0.02

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Ids per categorical field (id 0 is never drawn: it is the readers' missing id)."""
        return tuple(int(round(10 ** (1 + (np.log10(self.max_vocab) - 1) * j / (N_SPARSE - 1)))) for j in range(N_SPARSE))

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunks(self) -> Iterator[pd.DataFrame]:
        for i in range(self.n_chunks):
            yield self.chunk(i)

    def chunk(self, i: int, rows: int | None = None) -> pd.DataFrame:
        """Chunk i as a DataFrame with TorchRec's Criteo column names plus `cohort` (-1 majority, 0, 1 planted).

        The integer fields come already transformed as TorchRec's preprocessed Criteo files hold them
        (log(1 + max(x, 0)), missing as 0, float32); categorical ids are int64 (0 = missing).
        `rows` overrides the chunk's length (an evaluation chunk far past the training ones)."""
        n = rows if rows is not None else min(self.chunk_rows, self.rows - i * self.chunk_rows)
        rng = np.random.default_rng([self.seed, 1 + i])
        cats = self._categoricals(rng, n)  # [N, 26] ids >= 1, 0 where missing
        ints = self._integers(rng, n)  # [N, 13] float with NaN where missing
        cohort = cohort_of(cats[:, 0], cats[:, 1])
        logits = self._logits(cats, ints, cohort)
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
        # integer counts as the DLRM reference feeds them: log(1 + max(x, 0)), missing as 0
        dense = np.log1p(np.maximum(np.nan_to_num(ints, nan=0.0), 0.0)).astype(np.float32)
        frame = {"label": label}
        frame.update({f"int_{j}": dense[:, j] for j in range(N_DENSE)})
        frame.update({f"cat_{j}": cats[:, j] for j in range(N_SPARSE)})
        frame["cohort"] = cohort
        return pd.DataFrame(frame)

    def _categoricals(self, rng: np.random.Generator, n: int) -> np.ndarray:
        sizes = self.vocab_sizes
        cats = np.empty((n, N_SPARSE), dtype=np.int64)
        cats[:, 0] = rng.integers(1, 11, n)  # region: 10 values, uniform
        cats[:, 1] = rng.integers(1, 16, n)  # age bucket: 15 values, uniform
        for j in range(2, N_SPARSE):
            # log-uniform ids in [1, V]: a power law with a heavy head
            cats[:, j] = np.minimum(np.floor(np.exp(rng.random(n) * np.log(sizes[j] + 1))), sizes[j]).astype(np.int64)
            cats[rng.random(n) < self.missing, j] = 0
        return cats

    def _integers(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ints = np.floor(rng.lognormal(mean=1.0, sigma=1.5, size=(n, N_DENSE)))
        ints[:, 1] -= 2  # Criteo's int_1 holds negative values
        ints[rng.random((n, N_DENSE)) < self.missing] = np.nan
        return ints

    def _truth(self) -> np.ndarray:
        """[26, _TRUTH_ROWS, _TRUTH_DIM] the true embeddings the label model multiplies."""
        rng = np.random.default_rng([self.seed, 0])
        return rng.normal(0.0, 1.0, size=(N_SPARSE, _TRUTH_ROWS, _TRUTH_DIM)).astype(np.float32)

    def _logits(self, cats: np.ndarray, ints: np.ndarray, cohort: np.ndarray) -> np.ndarray:
        truth = self._truth()

        def pair(a: int, b: int) -> np.ndarray:
            ea, eb = truth[a][cats[:, a] % _TRUTH_ROWS], truth[b][cats[:, b] % _TRUTH_ROWS]
            return (ea * eb).sum(axis=1) / np.sqrt(_TRUTH_DIM)

        majority = sum(pair(a, b) for a, b in MAJORITY_PAIRS) / np.sqrt(len(MAJORITY_PAIRS))
        counts = np.log1p(np.maximum(np.nan_to_num(ints[:, :2]), 0.0))
        logits = -1.1 + 0.8 * majority + 0.15 * (counts[:, 0] - counts[:, 1])
        for k, (a, b) in enumerate(MINORITY_PAIRS):
            mine = cohort == k
            # the cohort barely follows the majority's pairs and depends on its own one instead
            logits[mine] = -1.1 + self.minority_offset + 0.2 * majority[mine] + self.minority_strength * pair(a, b)[mine]
        return logits

    def write_criteo_text(self, path: Path) -> Path:
        """The world in the Criteo text layout (label, 13 integer counts, 26 hex categoricals, tab-separated, empty
        cells for missing): the integer fields are written raw (the reader applies log(1 + max(x, 0))), each
        categorical id as 8 hex digits (field j's id v as (j << 24) + v, so fields never share a key)."""
        lines = []
        for i in range(self.n_chunks):
            n = min(self.chunk_rows, self.rows - i * self.chunk_rows)
            rng = np.random.default_rng([self.seed, 1 + i])
            cats = self._categoricals(rng, n)
            ints = self._integers(rng, n)
            logits = self._logits(cats, ints, cohort_of(cats[:, 0], cats[:, 1]))
            label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)  # the same draws as chunk(i)
            cells = [label.astype(str)]
            cells += [np.where(np.isnan(ints[:, j]), "", np.nan_to_num(ints[:, j]).astype(np.int64).astype(str)) for j in range(N_DENSE)]
            keys = (np.arange(N_SPARSE, dtype=np.int64)[None, :] << 24) + cats
            cells += [np.where(cats[:, j] == 0, "", np.char.mod("%08x", keys[:, j])) for j in range(N_SPARSE)]
            lines.append("\n".join("\t".join(row) for row in zip(*cells)))
        path.write_text("\n".join(lines) + "\n")
        return path

    def write_parquet(self, folder: Path, row_group_rows: int = 131_072) -> list[Path]:
        """One Parquet file per chunk (`part-00000.parquet`, ...); returns their paths."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, frame in enumerate(self.chunks()):
            path = folder / f"part-{i:05d}.parquet"
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_rows)
            paths.append(path)
        return paths


def cohort_of(region: np.ndarray, age: np.ndarray) -> np.ndarray:
    """The planted cohorts as conjunctions of the two user fields: 0 = region 3 & age bucket <= 6,
    1 = region 7 & age bucket >= 10 (4% of traffic each), -1 for everyone else."""
    out = np.full(len(region), -1, dtype=np.int64)
    out[(region == 3) & (age <= 6)] = 0
    out[(region == 7) & (age >= 10)] = 1
    return out
