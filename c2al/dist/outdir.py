"""The output directory of a run: checked before anything is written, locked while a run writes to it,
and never silently taken over from a previous run.

Two runs writing one directory would mix their files (a config.json of one seed
next to the report of another), so a run holds an exclusive lock on
OUT/.c2al.lock for as long as it writes. The lock is an `flock`, which the kernel
drops when its holder dies however it dies, so a lock left by a killed run is
taken over; the file also names the holder (pid, host, start, command) for the
message a second run prints.

A run does not replace another run's files: an OUT that holds them (`RUN_FILES`)
is refused unless the run continues it (--resume) or replaces it (--overwrite);
train.py gives an auto-named OUT a fresh name instead (`fresh_out`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from c2al.dist.process import DistInfo
from c2al.errors import C2ALError

LOCK_NAME = ".c2al.lock"
# What a run leaves in OUT (reports, the config, checkpoints, the miner, a streaming source's vocabulary):
# an OUT holding any of them is another run's, which a new run would silently replace.
RUN_FILES = ("config.json", "report.json", "report.png", "cohorts.json", "cohorts.npz", "*.pt", "vocab")
log = logging.getLogger(__name__)


def check_out_dir(out: Path) -> None:
    """Refuse an OUT that is a file, lies under a file, or cannot be created or written, without creating it."""
    if out.exists() and not out.is_dir():
        raise C2ALError(f"--out {str(out)!r} is a file, not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise C2ALError(f"cannot create --out {str(out)!r}: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == out:
            raise C2ALError(f"cannot write to --out {str(out)!r}: no write permission")
        raise C2ALError(f"cannot create --out {str(out)!r}: no write permission in {str(existing)!r}")


def run_files(out: Path) -> list[Path]:
    """The files (and the vocabulary folder) a previous run left in OUT, sorted; [] for a missing OUT."""
    if not out.is_dir():
        return []
    return sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})


def reuse_error(out: Path) -> str | None:
    """Why a run without --resume or --overwrite may not write into OUT, or None when it may.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> reuse_error(d) is None
        True
        >>> _ = (d / "report.json").write_text("{}")
        >>> print(reuse_error(d))  # doctest: +ELLIPSIS
        --out '...' already holds a run (report.json); pass --resume to continue it or --overwrite to replace it
    """
    found = run_files(out)
    if not found:
        return None
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return f"--out {str(out)!r} already holds a run ({names}); pass --resume to continue it or --overwrite to replace it"


def fresh_out(base: Path, limit: int = 1000) -> Path:
    """`base`, or the first of base-2, base-3, ... that holds no run: where an auto-named run writes.

    Args:
        base: the default OUT (runs/<data>-<model>-<kind>-seed<seed>).
        limit: most names tried.

    Returns:
        A directory that does not exist yet or holds no run files.
    """
    for n in range(1, limit + 1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not run_files(out):
            return out
    raise C2ALError(f"{str(base)!r} and {limit - 1} numbered copies all hold runs; pass --out, --resume or --overwrite")


def remove_run_files(out: Path) -> list[Path]:
    """--overwrite: delete what a previous run left, so OUT holds only this run's files (call with the lock held)."""
    import shutil

    found = run_files(out)
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return found


def stale_temporaries(out: Path) -> list[Path]:
    """Temporary files atomic_write leaves when its process is killed mid-write (`.NAME.XXXX.tmp`)."""
    return sorted(p for p in out.glob(".*.tmp") if p.is_file()) if out.is_dir() else []


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete them; call with the lock held, so no live run can be writing one."""
    found = stale_temporaries(out)
    for p in found:
        p.unlink(missing_ok=True)
    return found


class OutLock:
    """An exclusive lock on a run's output directory.

    Example:
        >>> import tempfile
        >>> with OutLock(Path(tempfile.mkdtemp())) as lock:
        ...     lock.held
        True
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict[str, Any] = {}  # the holder of a stale lock this one took over

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "OutLock":
        """Take the lock or raise C2ALError naming the run that holds it."""
        self.out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise C2ALError(f"--out {str(self.out)!r} is in use by {describe(holder)}; wait for it, or choose another --out") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder released (and removed) the file between our open and flock: open the new one
        self.fd = fd
        self.previous = _read(fd)  # a lock file left behind: its holder died, the kernel dropped its flock
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv)})
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then opens a fresh file
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host h (since 2026-01-01 10:00:00: train.py --seed 1)' from a lock file's content."""
    if not holder:
        return "another run (its lock file names no holder)"
    since = f" (since {holder.get('started', '?')}: {holder.get('command', '?')})"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


def lock_out_dir(out: Path, info: DistInfo, reuse: bool = True) -> OutLock | None:
    """The main rank takes the lock; every rank raises the same C2ALError when it cannot (collective).

    With `reuse` False (neither --resume nor --overwrite), an OUT holding a run is refused too: checked
    with the lock held, so of two runs started together on one OUT the second sees the first's files.
    The lock is then released, which leaves OUT as it was.
    """
    lock, error = None, None
    if info.is_main:
        try:
            lock = OutLock(out).acquire()
            error = None if reuse else reuse_error(out)
        except C2ALError as e:
            error = str(e)
        if error and lock is not None:
            lock.release()
            lock = None
    if info.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise C2ALError(error)
    if lock is not None and lock.previous:
        log.info(f"took over the lock of {describe(lock.previous)}, which is no longer running")
    return lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?", "command": raw[:80].decode(errors="replace")}
    return holder if isinstance(holder, dict) else {}


def _write(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)
