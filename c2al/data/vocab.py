"""Vocabularies that never hold the data: how raw categorical values of a stream become embedding ids.

Every raw value arrives as a uint64 key (a Criteo hex hash parsed as an integer, an integer column as
it is, a string through a fixed hash of its bytes), with a flag for missing cells. Two kinds:

- hashing: id = 1 + mix(key) mod (H - 1) for a field of H embeddings (`--hash-size`), nothing counted;
- counted (`--min-count N`): one streaming pass counts each field's keys; keys seen at least N times get
  ids 1..V in sorted key order, every other key id 0.

Id 0 (`UNSEEN_ID`) is always a missing or unknown value. The vocabulary also keeps the dense
standardization of table streams (mean and std from a bounded sample), so `save` / `load` (JSON + npz,
no pickle) give serving and resume the same ids and the same dense inputs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from c2al.data.schema import UNSEEN_ID
from c2al.errors import C2ALError

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_MERGE_AT = 1 << 22  # pending distinct keys of one field before they are merged into the running counts
VOCAB_JSON, VOCAB_NPZ = "vocab.json", "vocab.npz"


def mix64(keys: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: spreads nearby keys (row indices, small codes) over all 64 bits.

    Args:
        keys: uint64 [N] (other integer dtypes are reinterpreted).

    Returns:
        uint64 [N].
    """
    z = np.asarray(keys).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return z


def value_keys(values: np.ndarray | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Raw values of one column -> (uint64 keys [N], missing bool [N]).

    Integers keep their value (two's complement for negatives), floats must hold integers (NaN is
    missing), anything else is hashed as text (`text_keys`, no seed), so the same value gets the same
    key in every run, on every rank, and from a pandas column or an Arrow one.
    """
    s = pd.Series(values)
    missing = s.isna().to_numpy()
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_integer_dtype(s):
        return s.fillna(0).to_numpy(dtype=np.int64).view(np.uint64), missing
    if pd.api.types.is_float_dtype(s):
        return np.nan_to_num(s.to_numpy(dtype=np.float64)).astype(np.int64).view(np.uint64), missing
    text = pa.array(s.where(~missing, "").astype(str).to_numpy(dtype=object), type=pa.large_binary())
    return text_keys(text), missing


def text_keys(arr: pa.Array) -> np.ndarray:
    """uint64 [n] hash of each cell's bytes (FNV-1a over the digits, then mix64), vectorized over Arrow's buffers.

    One pass per character position, each over every cell: cheap for the short codes and ids of
    categorical columns (a chunk's distinct values only, when called on a dictionary). Nulls hash as "".
    """
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    n = len(arr)
    bufs = arr.buffers()
    wide = pa.types.is_large_binary(arr.type)
    offsets = np.frombuffer(bufs[1], dtype=np.int64 if wide else np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    last = len(data) - 1
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max()) if n else 0):
            byte = data[np.minimum(offsets[:-1] + j, last)].astype(np.uint64)
            h = np.where(j < lengths, (h ^ byte) * _FNV_PRIME, h)
    return mix64(h ^ lengths.astype(np.uint64))


@dataclass
class KeyCounter:
    """Counts of each field's keys over a stream, merged in bounded steps (one streaming pass)."""

    fields: tuple[str, ...]
    keys: dict[str, np.ndarray] = field(default_factory=dict)  # uint64 [V] sorted
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # int64 [V]
    _pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def add(self, name: str, keys: np.ndarray, missing: np.ndarray) -> None:
        """Count the non-missing `keys` [N] of field `name`."""
        uniq, cnt = np.unique(keys[~missing], return_counts=True)
        pending = self._pending.setdefault(name, [])
        pending.append((uniq, cnt.astype(np.int64)))
        if sum(len(u) for u, _ in pending) > _MERGE_AT:
            self._merge(name)

    def _merge(self, name: str) -> None:
        parts = self._pending.pop(name, [])
        if name in self.keys:
            parts.append((self.keys[name], self.counts[name]))
        if not parts:
            return
        uniq, inverse = np.unique(np.concatenate([u for u, _ in parts]), return_inverse=True)
        self.keys[name] = uniq
        self.counts[name] = np.bincount(inverse, weights=np.concatenate([c for _, c in parts]), minlength=len(uniq)).astype(np.int64)

    def kept(self, min_count: int) -> dict[str, np.ndarray]:
        """Per field, the sorted keys seen at least `min_count` times."""
        out = {}
        for name in self.fields:
            self._merge(name)
            keys, counts = self.keys.get(name, np.zeros(0, np.uint64)), self.counts.get(name, np.zeros(0, np.int64))
            out[name] = keys[counts >= min_count]
        return out


@dataclass
class Vocabulary:
    """How each sparse field's raw keys map to ids, and the dense standardization.

    Args:
        fields: sparse field names, in schema order.
        hash_sizes: hashing: embeddings per field (ids 1..H-1); empty for a counted vocabulary.
        kept: counted: per field the sorted uint64 keys that have ids (key kept[f][p] is id p + 1).
        min_count: the count threshold of a counted vocabulary (0 for hashing).
        dense: dense column names that are standardized with `mean` / `std` (empty: dense used as read).
        mean: float64 [n_dense].
        std: float64 [n_dense], never 0.

    Example:
        >>> v = Vocabulary.hashing(("a",), (11,))
        >>> v.encode("a", np.array([5, 5], np.uint64), np.array([False, True])).tolist()[1]
        0
    """

    fields: tuple[str, ...]
    hash_sizes: dict[str, int] = field(default_factory=dict)
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    min_count: int = 0
    dense: tuple[str, ...] = ()
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.ones(0))

    @classmethod
    def hashing(cls, fields: tuple[str, ...], sizes: tuple[int, ...], where: str = "--hash-size") -> "Vocabulary":
        """Hash every field to one size (`sizes` of length 1) or to its own (one size per field)."""
        if len(sizes) not in (1, len(fields)):
            raise C2ALError(f"{where}: {len(sizes)} sizes for {len(fields)} sparse fields; give one size or one per field")
        full = sizes * len(fields) if len(sizes) == 1 else sizes
        if any(h < 2 for h in full):
            raise C2ALError(f"{where}: every hash size must be >= 2 (id 0 is reserved for missing values), got {min(full)}")
        return cls(fields=tuple(fields), hash_sizes=dict(zip(fields, map(int, full))))

    @classmethod
    def counted(cls, counter: KeyCounter, min_count: int) -> "Vocabulary":
        """The keys of each field seen at least `min_count` times in the counted pass."""
        return cls(fields=counter.fields, kept=counter.kept(min_count), min_count=min_count)

    def num_embeddings(self, name: str) -> int:
        """Table rows of field `name`: its ids plus the reserved id 0 (at least 2)."""
        if name in self.hash_sizes:
            return self.hash_sizes[name]
        return max(len(self.kept[name]) + 1, 2)

    def encode(self, name: str, keys: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Ids int64 [N] of field `name` for uint64 `keys` [N]; missing and unknown keys are 0."""
        if name in self.hash_sizes:
            ids = (mix64(keys) % np.uint64(self.hash_sizes[name] - 1)).astype(np.int64) + 1
        else:
            kept = self.kept[name]
            pos = np.searchsorted(kept, keys)
            found = pos < len(kept)
            found[found] = kept[pos[found]] == keys[found]
            ids = np.where(found, pos + 1, UNSEEN_ID).astype(np.int64)
        ids[missing] = UNSEEN_ID
        return ids

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, n_dense]: (x - mean) / std where a standardization was fitted, else x."""
        if not len(self.dense):
            return np.asarray(x, dtype=np.float32)
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def with_dense(self, names: tuple[str, ...], sample: np.ndarray) -> "Vocabulary":
        """The same vocabulary standardizing dense columns `names` with the mean and std of `sample` [n, d]."""
        mean = sample.mean(axis=0) if len(sample) else np.zeros(len(names))
        std = sample.std(axis=0) if len(sample) else np.ones(len(names))
        return Vocabulary(self.fields, self.hash_sizes, self.kept, self.min_count, tuple(names),
                          np.asarray(mean, np.float64), np.where(std > 0, std, 1.0).astype(np.float64))

    def save(self, directory: str | Path) -> Path:
        """Write `vocab.json` (kinds, sizes, dense names) and `vocab.npz` (kept keys, mean, std) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"fields": list(self.fields), "hash_sizes": self.hash_sizes, "min_count": self.min_count, "dense": list(self.dense)}
        arrays = {f"kept/{k}": v for k, v in self.kept.items()} | {"mean": self.mean, "std": self.std}
        tmp = d / (VOCAB_NPZ + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, d / VOCAB_NPZ)
        (d / (VOCAB_JSON + ".tmp")).write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(d / (VOCAB_JSON + ".tmp"), d / VOCAB_JSON)
        return d / VOCAB_JSON

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabulary":
        """The vocabulary `save` wrote into `directory`; a C2ALError names a missing or broken file."""
        d = Path(directory)
        try:
            meta = json.loads((d / VOCAB_JSON).read_text())
            with np.load(d / VOCAB_NPZ, allow_pickle=False) as z:
                kept = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("kept/")}
                mean, std = z["mean"], z["std"]
        except (OSError, ValueError, KeyError) as e:
            raise C2ALError(f"{d}: cannot read the saved vocabulary ({VOCAB_JSON} + {VOCAB_NPZ}): {e}") from e
        return cls(tuple(meta["fields"]), {k: int(v) for k, v in meta["hash_sizes"].items()}, kept, int(meta["min_count"]),
                   tuple(meta["dense"]), mean, std)
