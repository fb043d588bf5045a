"""benchmarks/stream_reader.py on a small generated file: every source and mode counted, the same rows each time."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reader_benchmark_counts_every_training_row_of_both_sources(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("stream_reader", None)
    import stream_reader

    out = tmp_path / "r.json"
    assert stream_reader.main(["--rows", "3000", "--hash-size", "1000", "--batch-size", "512", "--work", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    text, table = result["reader"]["criteo_text"], result["reader"]["parquet"]
    assert text["chunks"]["rows"] == table["chunks"]["rows"]  # the same rows in both layouts, the same hash split
    assert 2000 < text["chunks"]["rows"] < 2800 and text["batches"]["rows"] == text["chunks"]["rows"] // 512 * 512
    assert text["chunks"]["rows_per_s"] > 0 and "cores" in result["machine"] and result["rows"] == 3000
