"""The bench/ scripts run end to end in --quick mode (tiny sizes) and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_rasterizer.py", "bench_render.py", "bench_prepare.py", "bench_published.py"])
def test_bench_quick_mode_runs_and_prints_a_table(script: str) -> None:
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes() if benchmarks.exists() else None
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table_lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table_lines) >= 3, result.stdout  # header, rule, at least one row
    assert "n/a |" in result.stdout or script != "bench_rasterizer.py"  # no kernel on CPU
    after = benchmarks.read_bytes() if benchmarks.exists() else None
    assert after == before, "--quick must not touch BENCHMARKS.md"
