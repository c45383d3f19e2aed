"""Shared pieces of the bench/ scripts: timing, peak memory, machine line, tables and
the atomic append to BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from npbgpp_core.atomic import atomic_write_bytes  # noqa: E402

BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine_line(device: torch.device) -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    parts = [f"CPU {cpu} ({cores} cores visible, torch threads {torch.get_num_threads()})"]
    if device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but no CUDA GPU is visible")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak extra memory of the block: torch.cuda.max_memory_allocated on a GPU, else
    resident-set growth over the starting RSS sampled every millisecond (torch's CPU
    allocations bypass tracemalloc, so RSS is the honest CPU measure)."""
    result = {"bytes": 0}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["bytes"] = max(0, torch.cuda.max_memory_allocated(device) - start)
        return
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["bytes"] = max(0, peak[0] - start)


@dataclass(frozen=True)
class Timing:
    """Seconds of the best and the median timed run, and the peak extra memory (bytes)."""

    best: float
    median: float
    peak_bytes: int

    def ms(self) -> str:
        """'best / median' in milliseconds (best is robust to other jobs on shared cores)."""
        return f"{self.best * 1e3:.1f} / {self.median * 1e3:.1f}"


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """Best and median over ``repeats`` runs after ``warmup`` runs, and peak extra memory."""
    times = []
    with peak_memory(device) as mem:  # the warm-up counts too: allocators keep memory afterwards
        for _ in range(warmup):
            fn()
        synchronize(device)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return Timing(min(times), statistics.median(times), mem["bytes"])


def fmt_ms(timing: Timing | float | None) -> str:
    if timing is None:
        return "n/a"
    if isinstance(timing, Timing):
        return timing.ms()
    return f"{timing * 1e3:.1f}"


def fmt_mb(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_benchmarks(title: str, device: torch.device, body: str, notes: Sequence[str] = ()) -> None:
    """Append a dated section to BENCHMARKS.md (written atomically)."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"\n### {title} ({stamp})", "", f"Machine: {machine_line(device)}", ""]
    section += [f"- {n}" for n in notes]
    if notes:
        section.append("")
    section += [body, ""]
    old = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    atomic_write_bytes(BENCHMARKS_MD, (old.rstrip("\n") + "\n" + "\n".join(section)).encode("utf-8"))
    print(f"appended to {BENCHMARKS_MD}")


def random_cloud(n: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """n points filling a 2x2x2 box around the origin (what the bench cameras look at)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g) * 2 - 1).to(device)


def bench_camera(height: int, width: int, device: torch.device | str = "cpu", angle: float = 0.0):
    """A camera 3 units away looking at the origin, so the cloud fills most of the image."""
    import math

    from npbgpp_core.camera import Camera

    eye = (3.0 * math.sin(angle), 0.4, -3.0 * math.cos(angle))
    return Camera.look_at(eye, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 50.0, (height, width)).to(device)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512,1920x1080' -> [(512, 512), (1080, 1920)] as (H, W); input is WxH."""
    sizes = []
    for item in text.split(","):
        w, h = item.lower().split("x")
        sizes.append((int(h), int(w)))
    return sizes


def parse_ints(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1
        if item.endswith("m"):
            mult, item = 1_000_000, item[:-1]
        elif item.endswith("k"):
            mult, item = 1_000, item[:-1]
        out.append(int(float(item) * mult))
    return out


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: device, threads, quick, no-write."""
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 avoids stalls on busy shared cores)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")


def device_from_args(args: argparse.Namespace) -> torch.device:
    """The benchmark's device, with torch's CPU thread count set from ``--threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def record(args: argparse.Namespace, title: str, device: torch.device, table: str, notes: Sequence[str]) -> None:
    """Append the table to BENCHMARKS.md unless this is a quick or --no-write run."""
    if args.quick or args.no_write:
        return
    if device.type != "cuda":
        notes = [*notes, "CPU numbers: the 2 cores may be shared with other jobs, expect noise"]
    append_benchmarks(title, device, table, notes)
