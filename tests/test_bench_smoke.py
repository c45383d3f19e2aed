"""The bench/ scripts run end to end in --quick mode (tiny sizes) and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_rasterizer.py", "bench_render.py", "bench_prepare.py", "bench_published.py",
                                    "bench_roll_context.py"])
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


def test_bench_densify_gpu_dry_run_plans_the_h100_case_on_a_cpu() -> None:
    """The GPU case (100 views 1280x720, 20 s) is prepared: --dry-run prints it and runs the
    same code path on a tiny rendered scene on the CPU, writing nothing."""
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes() if benchmarks.exists() else None
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_densify.py"), "--gpu", "--dry-run", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plan: textured_monkey, 100 views 1280x720, device cuda, target 20 s" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and int(rows[0].split("|")[4].replace(",", "")) > 0, result.stdout  # points made
    assert (benchmarks.read_bytes() if benchmarks.exists() else None) == before


@pytest.mark.parametrize("extra", [[], ["--compare", "batched,per_sample"]], ids=["measure", "compare"])
def test_bench_train_runs_one_tiny_step_and_reports_rates(extra: list[str], tmp_path: Path) -> None:
    """bench_train's plain and --compare modes train one tiny step on the demo scene and
    write positive, consistent rates to --json (samples/s = batch x steps/s)."""
    import json

    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--steps", "1", "--warmup", "0", "--crop", "32",
         "--batch", "1", "--threads", "1", "--device", "cpu", "--json", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["modes"].values() if extra else [report]
    for row in rows:
        assert row["steps_per_s"] > 0 and row["samples_per_s"] == pytest.approx(row["steps_per_s"])
    if extra:
        assert set(report["modes"]) == {"batched", "per_sample"}
