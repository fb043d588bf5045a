"""Every number the README quotes comes from a committed result file."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_agree_with_committed_results():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_readme_gives_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make run" in text and "make test" in text
    assert "<!-- table:c2al_movielens -->" in text and "<!-- table:afm_vs_linear -->" in text
