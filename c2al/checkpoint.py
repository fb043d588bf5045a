"""Atomic, pickle-free checkpoints of sharded models.

Sharded tables (and their fused optimizer state) are gathered into plain full
tensors on rank 0, so a checkpoint holds only tensors, numbers and strings:
it loads with `torch.load(weights_only=True)` and into any world size or
sharding type. The run config travels inside as JSON and is compared on load.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.keyed import KeyedOptimizerWrapper

from c2al.errors import C2ALError

FORMAT = "c2al-checkpoint-v1"


def gather_full(obj: Any, dst: int = 0) -> Any:
    """Replace every ShardedTensor/DTensor in a nested state by its full tensor.

    Collective: every rank must call it with the same structure. Ranks other
    than `dst` get None in place of gathered tensors.
    """
    if isinstance(obj, dict):
        return {k: gather_full(obj[k], dst) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v, dst) for v in obj)
    if isinstance(obj, ShardedTensor):
        rank = dist.get_rank() if dist.is_initialized() else 0
        out = torch.empty(obj.size(), dtype=obj.dtype) if rank == dst else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            obj.gather(dst=dst, out=out)
        else:
            for shard in obj.local_shards():
                out[_slices(shard.metadata)] = shard.tensor.detach().cpu()  # type: ignore[index]
        return out
    if hasattr(obj, "full_tensor"):  # DTensor
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    return obj


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
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    Args:
        path: checkpoint file.
        expect_config: the current run's config.
        keys: config fields that must agree (those that change parameter shapes or data).

    Returns:
        dict with "config" and "extra" decoded from JSON, "step", "model", "optimizer".
    """
    path = Path(path)
    if not path.is_file():
        raise C2ALError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise C2ALError(f"checkpoint {str(path)!r} cannot be read safely: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise C2ALError(f"{str(path)!r} is not a c2al checkpoint")
    payload["config"] = json.loads(payload["config"])
    payload["extra"] = json.loads(payload["extra"])
    if expect_config is not None:
        diff = [k for k in keys if payload["config"].get(k) != expect_config.get(k)]
        if diff:
            pairs = ", ".join(f"{k}={payload['config'].get(k)!r} (now {expect_config.get(k)!r})" for k in diff)
            raise C2ALError(f"checkpoint {str(path)!r} comes from another config: {pairs}")
    return payload


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


