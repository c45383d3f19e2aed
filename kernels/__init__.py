"""CUDA point rasterizer for npbgpp_core, built on first use.

The contract it shares with the torch reference (parameters, float order, keys, empty
key, pyramid plan, chunk size) is :mod:`kernels.contract`; this package never imports
``npbgpp_core``. ``load_rasterizer()`` compiles ``kernels/csrc`` with
``torch.utils.cpp_extension.load`` (ninja, JIT) the first time and returns a
:class:`CudaRasterizer` with

- ``rasterize_keys(points, params) -> list[int64 (h, w)]``: the packed
  ``depth_bits << 32 | index`` key images, bit-identical to its reference twin
  ``npbgpp_core.rasterizer.rasterize_keys_torch`` (EMPTY_KEY = INT64_MAX where empty);
- ``gather_features(index, features, background) -> (C+1, h, w)``: equal to its
  reference twin ``npbgpp_core.rasterizer.gather_features``; differentiable w.r.t.
  ``features`` and ``background`` (backward is a scatter-add to the winners).

Build cache: ``<root>/npbgpp_rasterizer`` with root ``$TORCH_EXTENSIONS_DIR`` when set,
else ``$NPBGPP_KERNELS_DIR`` when set, else ``~/.cache/npbgpp_kernels``. torch rebuilds
when a file in csrc/ changes. Ahead of time: ``python -m kernels.build`` (see kernels/build.py).

Memory: the kernel needs no per-point scratch; besides the points it allocates only the
key images (8 bytes per pixel per scale). Points already on the GPU go in one
grid-stride launch (any N below 2**31). Points on the CPU are streamed to the GPU in
chunks of ``chunk_points`` (default 4M points, 48 MB), so clouds that do not fit beside
the key images on the GPU still rasterize.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from .contract import DEFAULT_CHUNK_POINTS, EMPTY_KEY, pyramid_plan

EXTENSION_NAME = "npbgpp_rasterizer"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = (SOURCE_DIR / "rasterizer_binding.cpp", SOURCE_DIR / "rasterizer_kernels.cu")
HEADERS = ("rasterizer_kernels.h", "rasterizer_math.h", "rasterizer_types.h")
# -fmad=false: no FMA contraction anywhere (the kernel also uses explicitly rounded ops).
# The C++ standard is torch's choice (it adds -std=c++20 itself).
CUDA_FLAGS = ("-O3", "-fmad=false")
CXX_FLAGS = ("-O3",)

_log = logging.getLogger("kernels")
_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def build_directory() -> Path:
    """Where the compiled extension is cached (created on demand)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.environ.get("NPBGPP_KERNELS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "npbgpp_kernels"
    return base / EXTENSION_NAME


def toolchain_problem(need_gpu: bool = True) -> str | None:
    """Why the extension cannot be built/used here, or None when it can."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if need_gpu and not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc not found: install the CUDA toolkit and set CUDA_HOME (e.g. /usr/local/cuda)"
    for src in (*SOURCES, *(SOURCE_DIR / h for h in HEADERS)):
        if not src.exists():
            return f"kernel source missing: {src}"
    return None


def build_extension(verbose: bool = False, need_gpu: bool = True) -> Any:
    """Compile (or reuse the cached build of) the extension module and import it."""
    problem = toolchain_problem(need_gpu)
    if problem:
        raise RuntimeError(f"CUDA rasterizer unavailable: {problem}")
    from torch.utils.cpp_extension import load

    # torch rebuilds when the sources or the flags change; the digest of every file in
    # csrc/ (headers included) as a define makes a header edit trigger a rebuild too.
    digest = hashlib.sha256()
    for name in sorted(p.name for p in SOURCE_DIR.iterdir() if p.is_file()):
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    stamp = f"-DNPBGPP_SOURCES_SHA256={digest.hexdigest()[:16]}"
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    _log.info("loading the CUDA rasterizer from %s (compiled there on first use, about a minute)", directory)
    try:
        return load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in SOURCES],
            extra_cflags=[*CXX_FLAGS, stamp],
            extra_cuda_cflags=[*CUDA_FLAGS, stamp],
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(directory),
            verbose=verbose,
        )
    except Exception as exc:
        raise RuntimeError(
            f"building the CUDA rasterizer in {directory} failed ({type(exc).__name__}: {exc}); "
            "rerun `python -m kernels.build` to see the compiler output"
        ) from exc


def load_rasterizer(verbose: bool = False) -> CudaRasterizer:
    """The CUDA rasterizer, compiled on first use; RuntimeError says why when impossible."""
    with _lock:
        if "op" not in _loaded:
            _loaded["op"] = CudaRasterizer(build_extension(verbose=verbose))
        return _loaded["op"]


class _GatherFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ext: Any, index: torch.Tensor, features: torch.Tensor, background: torch.Tensor | None):
        ctx.ext = ext
        ctx.num_points = features.shape[0]
        ctx.channels = features.shape[1]
        ctx.has_background = background is not None
        ctx.save_for_backward(index)
        out = ext.gather_forward(index, features, background)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_features = grad_background = None
        if ctx.needs_input_grad[2]:
            grad_features = ctx.ext.gather_backward(index, grad_out, ctx.num_points)
        if ctx.has_background and ctx.needs_input_grad[3]:
            empty = (index < 0) | (index >= ctx.num_points)
            grad_background = torch.where(empty[None], grad_out[: ctx.channels], 0).sum(dim=(1, 2))
        return None, None, grad_features, grad_background


class CudaRasterizer:
    """The loaded extension behind the npbgpp_core backend contract."""

    def __init__(self, ext: Any) -> None:
        self.ext = ext

    def rasterize_keys(
        self, points: torch.Tensor, params: Any, chunk_points: int | None = None, device: torch.device | None = None
    ) -> list[torch.Tensor]:
        """Key images per scale of ``params.sizes`` (a ``kernels.contract.RasterParams``) on
        ``device`` (default: the points' GPU, else ``params.R``'s GPU, else the current
        one). Fast twin of ``npbgpp_core.rasterizer.rasterize_keys_torch`` (same keys).
        Points elsewhere than ``device``, or any points when ``chunk_points`` is given, go
        in chunks of ``chunk_points``."""
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
        n = points.shape[0]
        if n >= 2**31:
            raise ValueError("at most 2**31 - 1 points per rasterization")
        if device is None:
            device = points.device if points.is_cuda else (params.R.device if params.R.is_cuda else None)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        rotation = params.R.to(device=device, dtype=torch.float32).contiguous()
        translation = params.t.to(device=device, dtype=torch.float32).contiguous()
        keys: list[torch.Tensor | None] = [None] * len(params.sizes)
        plan = pyramid_plan(params.sizes)
        for i, source in plan:
            if source is None:
                keys[i] = torch.full(params.sizes[i], EMPTY_KEY, dtype=torch.int64, device=device)
        direct = [keys[i] for i, source in plan if source is None]

        def run(chunk: torch.Tensor, offset: int) -> None:
            self.ext.rasterize_points(
                chunk, rotation, translation, params.fx, params.fy, params.cx, params.cy,
                params.width, params.height, params.near, direct, offset,
            )

        if points.device == device and chunk_points is None:
            run(points.to(torch.float32).contiguous(), 0)
        else:
            step = max(1, int(chunk_points or DEFAULT_CHUNK_POINTS))
            for start in range(0, n, step):
                chunk = points[start : start + step].to(torch.float32).contiguous()
                run(chunk.to(device), start)
        for i, source in plan:
            if source is not None:
                out = torch.empty(params.sizes[i], dtype=torch.int64, device=device)
                self.ext.min_pool_keys(keys[source], out)
                keys[i] = out
        return [k for k in keys if k is not None]

    def gather_features(
        self, index: torch.Tensor, features: torch.Tensor, background: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(C+1, h, w) winner features (background where empty) and a 0/1 mask channel.
        Fast twin of ``npbgpp_core.rasterizer.gather_features``. Index values outside
        [0, N) count as empty (the reference raises for values >= N instead)."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, C), got {tuple(features.shape)}")
        if index.ndim != 2:
            raise ValueError(f"index must be (h, w), got {tuple(index.shape)}")
        if not features.is_cuda:
            raise ValueError("the CUDA gather needs features on a CUDA device")
        index = index.to(device=features.device, dtype=torch.int64).contiguous()
        features = features.contiguous()
        if background is not None:
            if background.numel() != features.shape[1]:
                raise ValueError(f"background must have C={features.shape[1]} values, got {background.numel()}")
            background = background.to(device=features.device, dtype=features.dtype).reshape(-1).contiguous()
        return _GatherFeatures.apply(self.ext, index, features, background)


__all__ = ["CudaRasterizer", "DEFAULT_CHUNK_POINTS", "EMPTY_KEY", "build_directory", "build_extension",
           "load_rasterizer", "pyramid_plan"]
