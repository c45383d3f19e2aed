"""The one place where npbgpp_core reaches into ``kernels/`` (the CUDA rasterizer).

``cuda_rasterizer()`` returns an object with ``rasterize_keys(points, params)`` and
``gather_features(index, features, background)`` (same contracts as the torch
reference in :mod:`npbgpp_core.rasterizer`), or ``None`` when the kernel cannot be
used here; ``why_unavailable()`` says why. The kernel is loaded lazily, once.
"""

from __future__ import annotations

from typing import Any

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
