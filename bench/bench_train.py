"""Training throughput of the headless_train NPBG++ recipe: steps/s and samples/s.

Runs the real pieces (``SceneDataModule`` samples, the NPBG++ system's ``batch_loss``,
Adam) in a plain loop, without Lightning's logging and checkpointing, so the figure is
the cost of data + forward + backward + optimiser step. Data loading is included (it is
part of every training step); ``--workers`` moves it into DataLoader workers. Besides wall
time it reports the process's CPU seconds per step, which on a shared machine measures the
work done independently of the other jobs (with ``--threads 1`` and ``--workers 0``).

    .venv/bin/python bench/bench_train.py                     # CPU, demo scene, batch 1, 128^2
    .venv/bin/python bench/bench_train.py --device cuda --batch 8 --crop 256 --amp bf16
    .venv/bin/python bench/bench_train.py --data-root corpus_env --record
    .venv/bin/python bench/bench_train.py --compare per_sample_square,batched_before,batched
    .venv/bin/python bench/bench_train.py --batch 2 --compare per_sample_square,batched,batched_k2,batched_k3

``--compare`` times several step variants in one process on the same batches, round by
round in rotating order (:data:`MODES`), so a shared machine's load hits them alike; the
ratios of CPU seconds per step are what to read there. The ``batched_kK`` variants train K
target crops per set of input views (``datasets.targets_per_sample``): their samples are the
same anchor crops and input views as the others', plus the extra targets. Each round loads
every variant's batch (in the main process) before timing the steps, so the step's seconds
are the step alone (on a GPU the recipe's workers load during the steps) and the loading is
reported apart (``load_cpu_s_per_step``, ``load_wall_s_per_step``); until 2026-11-30 14:34 UTC
each variant loaded its batch inside its timing (that definition is
``cpu_s_per_step_with_load``). Besides steps and input sets (samples) per CPU second they
report target crops per CPU second, counting the targets trained (a sample gets fewer extras
where fewer views qualify).

Any scene folder works for speed (``--data-root`` with scene subfolders, or
``--scene-names``); quality is never measured here (see bench_quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class StepVariant(NamedTuple):
    """A step variant of ``--compare`` (:data:`MODES`)."""

    batched: bool  # system.batched_step
    canvas: str  # system.input_canvas
    # the exact CPU speed paths: the extractor decoder's (npbgpp_core.models.cpu_paths),
    # aggregation of the seen points only
    fast: bool
    targets_per_sample: int  # datasets.targets_per_sample: target crops per set of input views


# Step variants for --compare.
MODES: dict[str, StepVariant] = {
    "per_sample_square": StepVariant(False, "square", False, 1),  # the step before batching ("today's rate", 06:50)
    "batched_before": StepVariant(True, "bounds", False, 1),      # the batched step before the CPU speed paths
    "batched": StepVariant(True, "bounds", True, 1),              # the batched step now
    "per_sample": StepVariant(False, "bounds", True, 1),
    "batched_k2": StepVariant(True, "bounds", True, 2),           # 2 target crops per set of input views
    "batched_k3": StepVariant(True, "bounds", True, 3),
    "batched_k4": StepVariant(True, "bounds", True, 4),
}


def apply_mode(system, mode: str) -> None:
    """Switch ``system`` to the step variant ``mode`` of :data:`MODES` (its targets per
    sample are the data's: :func:`mode_samples`)."""
    batched, canvas, fast, _ = MODES[mode]
    system.scfg["batched_step"] = batched
    system.model.config.input_canvas = canvas
    system.model.extractor.fast_decoder = fast
    system.seen_only_aggregation = fast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(ROOT / "demo"), help="folder of scene folders (default: demo/)")
    p.add_argument("--scene-names", nargs="*", default=None, help="scene folder names (default: all)")
    p.add_argument("--format", default="nerf_synthetic")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--views", type=int, default=3, help="input views per sample")
    p.add_argument("--targets-per-sample", type=int, default=1,
                   help="target crops per set of input views (datasets.targets_per_sample; --compare: per variant)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--max-points", type=int, default=100000)
    p.add_argument("--world-up", default="0,0,1", help="system.world_up (Blender corpora are Z-up)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision (GPU)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--compare", default=None,
                   help=f"comma-separated step variants timed interleaved on the same batches (the step alone; "
                        f"each batch's loading is timed apart): {', '.join(MODES)}")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    return p.parse_args(argv)


def build(args: argparse.Namespace, run_dir: str):
    """The datamodule and NPBG++ system of the training recipe for ``args``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system

    overrides = [
        "system=npbgpp_sphere", "datasets=nerf_blender_pretrain", f"datasets.data_root={args.data_root}",
        f"datasets.format={args.format}", f"datasets.train_image_size={args.crop}",
        f"datasets.selection_count={args.views}", "datasets.train_num_samples=100000",
        f"datasets.targets_per_sample={args.targets_per_sample}",
        f"system.max_points={args.max_points}", "system.visibility_scale=1.0", "system.lr=2e-4",
        f"system.world_up=[{args.world_up}]",
        f"system.descriptors_save_dir={run_dir}/d", f"dataloader.batch_size={args.batch}",
        f"dataloader.num_workers={args.workers}", *args.override,
    ]
    if args.amp != "none":
        overrides.append(f"system.amp={args.amp}")
    if args.scene_names:
        overrides.append("datasets.scene_names=[" + ",".join(args.scene_names) + "]")
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    dm = SceneDataModule(cfg, seed=3407)
    system = build_system(OmegaConf.to_container(cfg, resolve=True), dm.scenes)
    return dm, system, overrides


def training_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, list[str], Any, Any]:
    """Threads set, then (device, datamodule, system in train mode on the device, the
    Hydra overrides, its optimiser, the training DataLoader)."""
    import torch

    from bench.bench_common import pick_device

    torch.set_num_threads(max(1, args.threads))
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        dm, system, overrides = build(args, tmp)
    system.to(device)
    system.train()
    return device, dm, system, overrides, system.configure_optimizers(), dm.train_dataloader()


def measure(args: argparse.Namespace) -> dict:

    from bench.bench_common import machine_line, synchronize
    from headless_train.data import sample_targets

    device, dm, system, overrides, opt, loader = training_setup(args)
    batches = iter(loader)
    times: list[float] = []
    cpu_times: list[float] = []
    data_s = 0.0
    targets = 0
    for step in range(args.warmup + args.steps):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        batch = next(batches)
        t1 = time.perf_counter()
        loss, _ = system.batch_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        t2 = time.perf_counter()
        if step >= args.warmup:
            times.append(t2 - t0)
            cpu_times.append(time.process_time() - c0)
            data_s += t1 - t0
            targets += sum(len(sample_targets(s)) for s in batch)
    total = sum(times)
    load = os.getloadavg()
    return {
        "device": str(device), "machine": machine_line(device), "batch": args.batch, "crop": args.crop,
        "views": args.views, "amp": args.amp, "steps": args.steps, "workers": args.workers,
        "scenes": dm.scene_names, "steps_per_s": args.steps / total, "samples_per_s": args.steps * args.batch / total,
        "data_fraction": data_s / total, "targets_per_sample": args.targets_per_sample,
        "targets_per_s": targets / total, "targets_per_cpu_s": targets / sum(cpu_times),
        "cpu_s_per_step": sum(cpu_times) / args.steps, "loadavg_1min": load[0], "overrides": overrides,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def mode_samples(dataset, modes: list[str]) -> dict[str, Any]:
    """Per variant, the training samples it trains on: ``dataset`` (a TrainSamples) or its
    twin with the variant's targets per sample. Same seed and options otherwise, so sample i
    is the same anchor crop and input views in every variant (the extra targets draw from a
    generator of their own)."""
    import dataclasses

    from headless_train.data import TrainSamples

    twins: dict[int, Any] = {dataset.opts.targets_per_sample: dataset}
    for m in modes:
        k = MODES[m].targets_per_sample
        if k not in twins:
            opts = dataclasses.replace(dataset.opts, targets_per_sample=k)
            twins[k] = TrainSamples(dataset.scenes, dataset.active, dataset.num_samples, opts, seed=dataset.base_seed)
    return {m: twins[MODES[m].targets_per_sample] for m in modes}


def time_rounds(modes: list[str], rounds: int, warmup: int, draw: Callable[[], list[int]],
                load: Callable[[str, list[int]], Any], prepare: Callable[[str], None],
                step: Callable[[str, Any], None], clock: Callable[[], float] = time.perf_counter,
                cpu_clock: Callable[[], float] = time.process_time) -> dict[str, dict[str, list]]:
    """Per variant, the wall and CPU seconds of its steps and of its loads, and its batches,
    over ``rounds`` rounds after ``warmup`` untimed ones. Every round draws one set of sample
    indices, loads every variant's batch of them (timed apart: loading is not the step's
    cost on a GPU, where workers load during the steps), then runs ``prepare`` (untimed:
    switching variant, synchronising) and ``step`` of each variant, order rotating by round.
    The clocks are parameters so a test can count what each timing holds."""
    record: dict[str, dict[str, list]] = {
        m: {"wall": [], "cpu": [], "load_wall": [], "load_cpu": [], "batches": []} for m in modes}
    for r in range(warmup + rounds):
        indices = draw()
        timed = r >= warmup
        batches = {}
        for mode in modes:
            t0, c0 = clock(), cpu_clock()
            batches[mode] = load(mode, indices)
            if timed:
                record[mode]["load_wall"].append(clock() - t0)
                record[mode]["load_cpu"].append(cpu_clock() - c0)
        for k in range(len(modes)):
            mode = modes[(r + k) % len(modes)]
            prepare(mode)
            t0, c0 = clock(), cpu_clock()
            step(mode, batches[mode])
            if timed:
                record[mode]["wall"].append(clock() - t0)
                record[mode]["cpu"].append(cpu_clock() - c0)
                record[mode]["batches"].append(batches[mode])
    return record


def compare(args: argparse.Namespace) -> dict:
    """CPU and wall seconds per step of each variant in ``args.compare``, interleaved: every
    round draws one batch of sample indices, loads every variant's batch of those samples
    (its targets per sample) and then runs one optimiser step of every variant (order
    rotating by round). The step's seconds exclude the loading, which is reported apart
    (``load_*``; ``cpu_s_per_step_with_load`` is the definition of the CPU figures before
    2026-11-30 14:34 UTC, when each variant loaded its batch inside its timing)."""

    from bench.bench_common import machine_line, synchronize
    from headless_train.data import sample_targets

    modes = [m.strip() for m in args.compare.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"error: --compare takes variants from {', '.join(MODES)}; got {args.compare!r}")
    device, dm, system, overrides, opt, loader = training_setup(args)
    samples = mode_samples(loader.dataset, modes)
    order = iter(loader.sampler)  # the epoch's shuffled sample indices

    def prepare(mode: str) -> None:
        apply_mode(system, mode)
        synchronize(device)

    def step(mode: str, batch: Any) -> None:
        loss, _ = system.batch_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)

    record = time_rounds(modes, args.steps, args.warmup, lambda: [next(order) for _ in range(args.batch)],
                         lambda mode, indices: [samples[mode][i] for i in indices], prepare, step)
    load = os.getloadavg()
    rows = {}
    for m in modes:
        rec = record[m]
        n = len(rec["cpu"])
        c, w = sum(rec["cpu"]) / n, sum(rec["wall"]) / n
        load_c, load_w = sum(rec["load_cpu"]) / n, sum(rec["load_wall"]) / n
        per_step = sum(len(sample_targets(s)) for b in rec["batches"] for s in b) / n
        rows[m] = {"cpu_s_per_step": c, "wall_s_per_step": w, "steps_per_cpu_s": 1 / c,
                   "samples_per_cpu_s": args.batch / c, "steps_per_s": 1 / w, "samples_per_s": args.batch / w,
                   "targets_per_sample": MODES[m].targets_per_sample, "targets_per_step": per_step,
                   "targets_per_cpu_s": per_step / c, "targets_per_s": per_step / w,
                   "load_cpu_s_per_step": load_c, "load_wall_s_per_step": load_w,
                   "cpu_s_per_step_with_load": c + load_c}
    return {"device": str(device), "machine": machine_line(device), "batch": args.batch, "crop": args.crop,
            "views": args.views, "steps": args.steps, "modes": rows, "scenes": dm.scene_names,
            "timing": "step alone; load_* is the main-process loading of its batch, timed apart",
            "loadavg": list(load), "overrides": overrides,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        r = compare(args)
        first = next(iter(r["modes"].values()))
        print(f"bench_train --compare: {r['device']}, batch {r['batch']}, {r['crop']}^2 crops, {r['views']} input "
              f"views, {r['steps']} interleaved rounds; load average {r['loadavg'][0]:.2f}")
        for m, v in r["modes"].items():
            print(f"  {m:18s} {v['cpu_s_per_step']:.3f} CPU s/step = {v['steps_per_cpu_s']:.3f} steps, "
                  f"{v['samples_per_cpu_s']:.3f} input sets per CPU s "
                  f"({first['cpu_s_per_step'] / v['cpu_s_per_step']:.2f}x the first), "
                  f"{v['targets_per_step']:.2f} targets/step = {v['targets_per_cpu_s']:.3f} target crops per CPU s "
                  f"({v['targets_per_cpu_s'] / first['targets_per_cpu_s']:.2f}x the first); "
                  f"wall {v['wall_s_per_step']:.2f} s/step; loading its batch apart: "
                  f"{v['load_cpu_s_per_step']:.3f} CPU s, wall {v['load_wall_s_per_step']:.3f} s")
        print(r["machine"])
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(r, f, indent=2)
        return 0
    r = measure(args)
    line = (f"bench_train: {r['device']}, batch {r['batch']}, {r['crop']}^2 crops, {r['views']} input views, "
            f"amp {r['amp']}, {r['targets_per_sample']} target(s) per sample: {r['steps_per_s']:.3f} steps/s, "
            f"{r['samples_per_s']:.3f} samples/s, {r['targets_per_s']:.3f} target crops/s "
            f"(data {100 * r['data_fraction']:.0f}% of the time); {r['cpu_s_per_step']:.2f} CPU s per step "
            f"(process time: the work, whatever the load; load average {r['loadavg_1min']:.2f})")
    print(line)
    print(r["machine"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)
    if args.record:
        import torch

        from bench.bench_common import append_benchmarks

        append_benchmarks("bench_train: NPBG++ training throughput", torch.device(r["device"]), line,
                          [f"scenes {', '.join(r['scenes'])}", f"load average at the end {r['loadavg_1min']:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
