"""Atomic, pickle-free checkpoints of sharded models.

Sharded tables (and their fused optimizer state) are gathered into plain full
tensors on rank 0, so a checkpoint holds only tensors, numbers and strings:
it loads with `torch.load(weights_only=True)` and into any world size or
sharding type. The run config travels inside as JSON and is compared on load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.keyed import KeyedOptimizerWrapper

from c2al.config import balance_mode
from c2al.dist.atomic import atomic_write
from c2al.errors import C2ALError

FORMAT = "c2al-checkpoint-v1"


class _Shards:
    """A ShardedTensor's local pieces, as plain tensors that can travel to rank 0."""

    def __init__(self, size: tuple[int, ...], dtype: torch.dtype, pieces: list[tuple[tuple[int, ...], torch.Tensor]]) -> None:
        self.size, self.dtype, self.pieces = size, dtype, pieces

    def full(self) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=self.dtype)
        for offsets, piece in self.pieces:
            out[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = piece
        return out


def _local(obj: Any) -> Any:
    """Replace ShardedTensors by their local pieces and copy tensors to CPU."""
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local(v) for v in obj)
    if isinstance(obj, ShardedTensor):
        pieces = [(tuple(sh.metadata.shard_offsets), sh.tensor.detach().cpu().clone()) for sh in obj.local_shards()]
        return _Shards(tuple(obj.size()), obj.dtype, pieces)
    if hasattr(obj, "full_tensor"):  # DTensor
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    return obj


def _merge(a: Any, b: Any) -> Any:
    """Union of two ranks' local states: dict keys united, shard pieces pooled."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(out[k], v) if k in out else v
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(_merge(x, y) for x, y in zip(a, b))
    if isinstance(a, _Shards) and isinstance(b, _Shards):
        return _Shards(a.size, a.dtype, a.pieces + b.pieces)
    return a  # replicated values: every rank holds the same


def _finish(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finish(obj[k]) for k in obj}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finish(v) for v in obj)
    if isinstance(obj, _Shards):
        return obj.full()
    return obj


def gather_full(obj: Any, dst: int = 0) -> Any:
    """Replace every ShardedTensor/DTensor in a nested state by its full tensor.

    Collective: every rank must call it. Ranks may hold different keys (a
    fused optimizer lists only the tables its rank owns); rank `dst` gets the
    union, the other ranks get None.
    """
    local = _local(obj)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return _finish(local)
    rank = dist.get_rank()
    states: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(local, states, dst=dst)
    if rank != dst:
        return None
    merged = states[0]
    for other in states[1:]:
        merged = _merge(merged, other)
    return _finish(merged)


def _slices(meta: Any) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes))


def copy_full_into(local: Any, full: Any, path: str = "") -> None:
    """Copy full tensors into the (possibly sharded) tensors of a live state, in place."""
    if isinstance(local, dict):
        for k, v in local.items():
            if k not in full:
                raise C2ALError(f"checkpoint has no entry {path + str(k)!r}: it comes from another model or config")
            copy_full_into(v, full[k], f"{path}{k}/")
        return
    if isinstance(local, ShardedTensor):
        if tuple(full.shape) != tuple(local.size()):
            raise C2ALError(f"checkpoint entry {path.rstrip('/')!r} has shape {tuple(full.shape)}, the model {tuple(local.size())}")
        for shard in local.local_shards():
            shard.tensor.detach().copy_(full[_slices(shard.metadata)])
        return
    if isinstance(local, torch.Tensor):
        if local.shape != full.shape:
            raise C2ALError(f"checkpoint entry {path.rstrip('/')!r} has shape {tuple(full.shape)}, the model {tuple(local.shape)}")
        local.detach().copy_(full.to(local.device))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through an atomic write (temp file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, Any],
    config: dict[str, Any],
    step: int,
    optimizer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    is_main: bool = True,
) -> None:
    """Gather (collective) and write a checkpoint on the main rank."""
    payload = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "step": int(step),
        "model": gather_full(model_state),
        "optimizer": gather_full(optimizer_state) if optimizer_state is not None else None,
        "extra": json.dumps(extra or {}),
    }
    if is_main:
        atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path, *, expect_config: dict[str, Any] | None = None, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load without executing pickled code; check it came from a compatible config.

    Every way a file can be unusable (missing, empty, truncated, not a c2al
    checkpoint, entries missing or of the wrong kind, config not JSON, another
    config) is one C2ALError naming the file.

    Args:
        path: checkpoint file.
        expect_config: the current run's config.
        keys: config fields that must agree (those that change parameter shapes, data or the trajectory).

    Returns:
        dict with "config" and "extra" decoded from JSON, "step", "model", "optimizer".
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise C2ALError(f"{where} does not exist")
    if path.stat().st_size == 0:
        raise C2ALError(f"{where} is empty (0 bytes): it was never written completely; delete it or start without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise C2ALError(f"{where} cannot be read safely: {_one_line(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise C2ALError(f"{str(path)!r} is not a c2al checkpoint")
    _check_entries(payload, where)
    if expect_config is not None:
        saved = payload["config"]
        if "aux_balance" in saved:  # a run from before the agree modes' rename reads "gate" as "agree"
            saved = {**saved, "aux_balance": balance_mode(saved["aux_balance"])}
        diff = [k for k in keys if saved.get(k) != expect_config.get(k)]
        if diff:
            pairs = ", ".join(f"{k}={payload['config'].get(k)!r} (now {expect_config.get(k)!r})" for k in diff)
            raise C2ALError(f"{where} comes from another config: {pairs}")
    return payload


def _one_line(e: BaseException) -> str:
    """'Type: first line of the message' (some errors, e.g. EOFError, have an empty message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _check_entries(payload: dict[str, Any], where: str) -> None:
    """Decode "config" and "extra" from JSON in place, and check every entry has its kind."""
    missing = [k for k in ("config", "step", "model", "optimizer", "extra") if k not in payload]
    if missing:
        raise C2ALError(f"{where} lacks the entries {missing}: it was not written by this version of c2al")
    for key in ("config", "extra"):
        try:
            payload[key] = json.loads(payload[key])
        except (TypeError, ValueError) as e:
            raise C2ALError(f"{where}: its {key} is not JSON ({_one_line(e)})") from None
        if not isinstance(payload[key], dict):
            raise C2ALError(f"{where}: its {key} is a JSON {type(payload[key]).__name__}, not an object")
    if not isinstance(payload["step"], int) or isinstance(payload["step"], bool):
        raise C2ALError(f"{where}: its step is {payload['step']!r}, not an integer")
    if not isinstance(payload["model"], dict) or not (payload["optimizer"] is None or isinstance(payload["optimizer"], dict)):
        raise C2ALError(f"{where}: its model and optimizer entries are not state dicts")


def restore(model: torch.nn.Module, optimizer: Any | None, payload: dict[str, Any]) -> None:
    """Copy a loaded checkpoint into a live (sharded) model and optimizer."""
    copy_full_into(model.state_dict(), payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        # Dense optimizer state is lazy; a zero step creates it so it can be copied into.
        for _, opt in getattr(optimizer, "optimizers", []):
            if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
                opt.init_state()
                opt.zero_grad(set_to_none=True)
        state = optimizer.state_dict()
        copy_full_into(state["state"], payload["optimizer"]["state"], "optimizer/")
        optimizer.load_state_dict(state)




def _leaves(obj: Any) -> list[torch.Tensor]:
    """This rank's tensors of a (sharded) state, in a fixed order: local shards of a ShardedTensor, plain tensors."""
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _leaves(obj[k])]
    if isinstance(obj, ShardedTensor):
        return [sh.tensor for sh in obj.local_shards()]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return []


def snapshot_local(state: dict[str, Any]) -> list[torch.Tensor]:
    """Copies of this rank's part of a live state, e.g. the best weights so far.

    No collective: each rank keeps its own shards, so restoring needs no gather.
    """
    return [t.detach().clone() for t in _leaves(state)]


def restore_local(state: dict[str, Any], snap: list[torch.Tensor]) -> None:
    """Copy a `snapshot_local` of the same live state back in place."""
    leaves = _leaves(state)
    if len(leaves) != len(snap):
        raise C2ALError(f"snapshot holds {len(snap)} tensors, the model {len(leaves)}: it comes from another model")
    with torch.no_grad():
        for live, saved in zip(leaves, snap):
            live.copy_(saved)
