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


@pytest.mark.parametrize("extra", [[], ["--compare", "batched,per_sample,batched_k2"]], ids=["measure", "compare"])
def test_bench_train_runs_one_tiny_step_and_reports_rates(extra: list[str], tmp_path: Path) -> None:
    """bench_train's plain and --compare modes train one tiny step on the demo scene and
    write positive, consistent rates to --json (samples/s = batch x steps/s; target crops:
    one per sample, up to two with batched_k2)."""
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
        assert row["targets_per_cpu_s"] > 0
    if extra:
        modes = report["modes"]
        assert set(modes) == {"batched", "per_sample", "batched_k2"}
        assert modes["batched"]["targets_per_step"] == modes["per_sample"]["targets_per_step"] == 1
        assert 1 <= modes["batched_k2"]["targets_per_step"] <= 2
        assert modes["batched_k2"]["targets_per_s"] == pytest.approx(
            modes["batched_k2"]["targets_per_step"] * modes["batched_k2"]["steps_per_s"])
        for row in modes.values():  # the loading is reported apart, and the old definition is the sum
            assert row["load_cpu_s_per_step"] > 0 and row["load_wall_s_per_step"] > 0
            assert row["cpu_s_per_step_with_load"] == pytest.approx(
                row["cpu_s_per_step"] + row["load_cpu_s_per_step"])


def test_bench_train_compare_times_the_step_without_its_loading() -> None:
    """--compare's timing (time_rounds) holds the step alone: with stand-in clocks that the
    stand-in loader moves by 100 s and the step by 1 s (7 s of CPU), every timed step reads
    1 s / 7 CPU s and every load 100 s; each round loads all variants' batches of the same
    indices before any step, steps rotate by round, and the warm-up round is not recorded."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_train import time_rounds

    now = {"wall": 0.0, "cpu": 0.0}
    events: list[tuple] = []
    draws = iter([[0, 1], [2, 3], [4, 5]])

    def load(mode: str, indices: list[int]) -> tuple:
        events.append(("load", mode, tuple(indices)))
        now["wall"] += 100.0
        now["cpu"] += 100.0
        return (mode, tuple(indices))

    def prepare(mode: str) -> None:  # untimed: the clocks must not see this
        now["wall"] += 1000.0

    def step(mode: str, batch: tuple) -> None:
        assert batch[0] == mode
        events.append(("step", mode, batch[1]))
        now["wall"] += 1.0
        now["cpu"] += 7.0

    record = time_rounds(["a", "b"], 2, 1, lambda: next(draws), load, prepare, step,
                         clock=lambda: now["wall"], cpu_clock=lambda: now["cpu"])
    for mode in ("a", "b"):
        assert record[mode]["wall"] == [1.0, 1.0] and record[mode]["cpu"] == [7.0, 7.0]
        assert record[mode]["load_wall"] == [100.0, 100.0] and record[mode]["load_cpu"] == [100.0, 100.0]
        assert record[mode]["batches"] == [(mode, (2, 3)), (mode, (4, 5))]
    assert events == [
        ("load", "a", (0, 1)), ("load", "b", (0, 1)), ("step", "a", (0, 1)), ("step", "b", (0, 1)),
        ("load", "a", (2, 3)), ("load", "b", (2, 3)), ("step", "b", (2, 3)), ("step", "a", (2, 3)),
        ("load", "a", (4, 5)), ("load", "b", (4, 5)), ("step", "a", (4, 5)), ("step", "b", (4, 5)),
    ]


@pytest.fixture(scope="module")
def tiny_densify_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-view 64x48 Cycles scene (under a second), standing in for every bench_densify scene."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_densify

    return bench_densify.render_scene("textured_monkey", 12, (48, 64), tmp_path_factory.mktemp("densify") / "tiny",
                                      samples=2, points=20_000)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in ``text``, each as its lines split into cells (header, rule, rows)."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
        previous = line
    return tables


@pytest.mark.parametrize("flags", [["--gpu", "--fill"], ["--gpu"], ["--fill"], [],
                                   ["--gpu", "--fill", "--dry-run"], ["--fill", "--dry-run"]],
                         ids=lambda f: " ".join(f) or "cpu")
def test_bench_densify_table_headers_match_their_rows(flags: list[str], tiny_densify_scene: Path, monkeypatch,
                                                      capsys) -> None:
    """Every table bench_densify prints has as many header cells as cells in each row, with
    and without --gpu and --fill. The GPU case runs here on the CPU: the device is reported
    as CUDA and every densify runs on the CPU, every scene is the tiny one."""
    import bench_densify
    import torch

    real_measure = bench_densify.measure
    devices: list[str] = []

    def measure_on_cpu(scene: Path, device: str, views: int | None = None, **options) -> dict:
        devices.append(device)
        return real_measure(scene, "cpu", views=views, **options)

    monkeypatch.setattr(bench_densify, "render_scene", lambda *a, **k: tiny_densify_scene)
    monkeypatch.setattr(bench_densify, "measure", measure_on_cpu)
    recorded: list[list[str]] = []
    monkeypatch.setattr(bench_densify, "record", lambda args, title, device, table, notes: recorded.append(notes))
    if "--gpu" in flags and "--dry-run" not in flags:
        monkeypatch.setattr(bench_densify, "device_from_args", lambda args: torch.device("cuda"))
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    args = [*flags, "--scenes", "textured_monkey", "--device", "cpu", "--threads", "1", "--no-write"]
    assert bench_densify.main(args) == 0
    tables = markdown_tables(capsys.readouterr().out)
    assert tables and devices
    if "--gpu" in flags and "--dry-run" not in flags:
        assert set(devices) == {"cuda"}
    for table in tables:
        header, rule, *rows = table
        assert rows and len(rule) == len(header), table
        assert all(len(r) == len(header) for r in rows), table
        assert ("fill points" in header) == ("--fill" in flags), header
    # the recorded notes state the targets of the cases that ran
    if "--dry-run" in flags:
        assert recorded == []
    else:
        targets = ([bench_densify.GPU_NOTE] if "--gpu" in flags
                   else [bench_densify.ACCURACY_NOTE, bench_densify.SPEED_NOTE])
        assert len(recorded) == 1 and recorded[0][-len(targets):] == targets
        assert len(recorded[0]) == len(targets) + ("--fill" in flags)
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before


def test_densify_vs_sparse_nearest_distance_is_the_brute_force_one() -> None:
    """densify_vs_sparse's blocked nearest distances equal numpy's all-pairs minimum, across
    block edges (blocks of 7 and 224 over 50 x 300 points)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from densify_vs_sparse import nearest_distance

    rng = np.random.default_rng(0)
    query, ref = rng.normal(size=(50, 3)), rng.normal(size=(300, 3))
    brute = np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest_distance(query, ref, block=7), brute, rtol=1e-12)
