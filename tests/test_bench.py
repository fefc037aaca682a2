"""The benchmarks run and print their tables (smoke mode: tiny model; numbers not checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_prints_three_tables(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--work", str(tmp_path),
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for heading in ("== data path", "== training step", "== memory plan"):
        assert heading in done.stdout
    assert "ratio wdx/usual" in done.stdout and "speed-up over Seq2SeqTrainer" in done.stdout
    assert (tmp_path / "r.json").exists()
