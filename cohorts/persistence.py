"""Saving and loading a fitted CohortMiner as JSON plus .npz, never pickle.

The JSON holds the parameters, the encoding, the candidate table and every
rule (conjunctions included); the .npz holds the fitted arrays (cluster
centres, mixture parameters, contrasts). The JSON names the arrays' SHA-256,
so files from two different saves are never mixed.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from c2al.cohorts.encoding import one_line
from c2al.dist.atomic import atomic_write_bytes
from c2al.errors import C2ALError

FORMAT = "c2al.cohorts.CohortMiner/1"
ARRAYS = ("contrast_", "cluster_centers_", "gmm_weights_", "gmm_means_", "gmm_precisions_cholesky_", "null_max_")
STATE = ("n_features_in_", "_names", "_kinds", "_stats", "cohorts_")
OPTIONAL_STATE = ("rules_",)  # absent from miners saved before it existed; only `expose` needs it


def paths(path: str | Path) -> tuple[Path, Path]:
    """"dir/name" or "dir/name.json" -> (dir/name.json, dir/name.npz)."""
    json_path = Path(path)
    if json_path.suffix != ".json":
        json_path = json_path.with_name(json_path.name + ".json")
    return json_path, json_path.with_suffix(".npz")


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def save_miner(miner: Any, path: str | Path) -> Path:
    """Write a fitted miner's JSON and .npz, each atomically; returns the JSON path."""
    json_path, npz_path = paths(path)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(miner, name) for name in ARRAYS if hasattr(miner, name)})
    arrays = buffer.getvalue()
    params = miner.get_params()
    if not isinstance(params["random_state"], (int, type(None))):
        params["random_state"] = None  # a RandomState object has no plain form; it only seeded fit
    meta = {"format": FORMAT, "params": params, "arrays_sha256": hashlib.sha256(arrays).hexdigest(),
            "feature_names_in_": getattr(miner, "feature_names_in_", None),
            "candidates_": miner.candidates_.to_dict(orient="list"),
            **{name: getattr(miner, name) for name in STATE + OPTIONAL_STATE if hasattr(miner, name)}}
    # arrays first: the JSON names their hash, so a crash between the writes is caught at load
    atomic_write_bytes(npz_path, arrays)
    atomic_write_bytes(json_path, json.dumps(meta, indent=1, default=_plain).encode())
    return json_path


def _read_meta(json_path: Path) -> dict[str, Any]:
    """The JSON half, checked for its format and the arrays' hash."""
    try:
        meta = json.loads(json_path.read_bytes())
    except OSError as err:
        raise C2ALError(f"{json_path}: cannot read a saved CohortMiner ({one_line(err)})") from err
    except ValueError as err:  # not JSON, or not UTF-8
        raise C2ALError(f"{json_path}: not a saved CohortMiner, the file is not JSON ({one_line(err)})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise C2ALError(f"{json_path}: not a saved CohortMiner (format {FORMAT!r} expected)")
    if not isinstance(meta.get("arrays_sha256"), str):
        raise C2ALError(f"{json_path}: saved CohortMiner lacks 'arrays_sha256', the hash of its .npz; save it again")
    return meta


def _read_arrays(npz_path: Path, json_path: Path, sha256: str) -> dict[str, np.ndarray]:
    """The .npz half: it must be the one the JSON names, and hold only plain numeric arrays."""
    try:
        raw = npz_path.read_bytes()
    except OSError as err:
        raise C2ALError(f"{npz_path}: cannot read the arrays of {json_path.name} ({one_line(err)})") from err
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise C2ALError(f"{npz_path}: does not match {json_path.name} (hash differs); save again")
    try:  # no pickle: an object array is refused, not unpickled
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise C2ALError(f"{npz_path}: not a .npz of plain arrays ({one_line(err)})") from err
    unknown = sorted(set(arrays) - set(ARRAYS))
    if unknown:
        raise C2ALError(f"{npz_path}: unexpected arrays {unknown}; a saved CohortMiner holds only {list(ARRAYS)}")
    return arrays


def load_miner(cls: type, path: str | Path) -> Any:
    """Read a miner written by `save_miner` into a fitted instance of `cls`.

    Every unreadable, mismatched or malformed file is a one-line C2ALError naming it.
    """
    json_path, npz_path = paths(path)
    meta = _read_meta(json_path)
    arrays = _read_arrays(npz_path, json_path, meta["arrays_sha256"])
    try:
        params = dict(meta["params"])
        if isinstance(params.get("categorical"), list):  # JSON has no tuples
            params["categorical"] = tuple(params["categorical"])
        miner = cls(**params)
        for name in STATE:
            setattr(miner, name, meta[name])
        for name in OPTIONAL_STATE:
            if name in meta:
                setattr(miner, name, meta[name])
        if meta["feature_names_in_"] is not None:
            miner.feature_names_in_ = np.asarray(meta["feature_names_in_"], dtype=object)
        miner.candidates_ = pd.DataFrame(meta["candidates_"])
    except (KeyError, TypeError, ValueError) as err:
        raise C2ALError(f"{json_path}: saved CohortMiner is incomplete ({one_line(err)})") from err
    for name, value in arrays.items():
        setattr(miner, name, value)
    miner.found_ = bool(miner.cohorts_)
    return miner
