"""Atomic writes: readable by others, and a failed write keeps the old file."""
import os
import stat

import pytest

from c2al.dist.atomic import atomic_write, atomic_write_bytes
from c2al.eval.report import write_json


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_bytes(tmp_path / "ckpt.pt", b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
