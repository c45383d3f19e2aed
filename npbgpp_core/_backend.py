"""The one place where npbgpp_core reaches into ``kernels/`` (the CUDA rasterizer).

The rasterizer contract both backends share (``RasterParams``, ``EMPTY_KEY``,
``DEFAULT_CHUNK_POINTS``, ``scale_sizes``, ``min_side``, ``pyramid_plan``) comes from
``kernels/contract.py``, plain Python that needs no GPU. ``cuda_rasterizer()`` returns
an object with ``rasterize_keys(points, params)`` and ``gather_features(index, features,
background)`` (the fast twins of ``rasterize_keys_torch`` and ``gather_features`` in
:mod:`npbgpp_core.rasterizer`), or ``None`` when the kernel cannot be used here;
``why_unavailable()`` says why. The kernel is loaded lazily, once.
"""

from __future__ import annotations

from typing import Any

from kernels.contract import DEFAULT_CHUNK_POINTS, EMPTY_KEY, RasterParams, min_side, pyramid_plan, scale_sizes

__all__ = ["DEFAULT_CHUNK_POINTS", "EMPTY_KEY", "RasterParams", "cuda_rasterizer", "min_side", "pyramid_plan",
           "scale_sizes", "why_unavailable"]

_state: dict[str, Any] = {}


def cuda_rasterizer() -> Any | None:
    if "op" not in _state:
        try:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            from kernels import load_rasterizer  # type: ignore[import-not-found]

            _state["op"] = load_rasterizer()
            _state["why"] = ""
        except Exception as exc:  # noqa: BLE001 - any failure means "use the reference"
            _state["op"] = None
            _state["why"] = f"{type(exc).__name__}: {exc}"
    return _state["op"]


def why_unavailable() -> str:
    cuda_rasterizer()
    return _state.get("why", "")
