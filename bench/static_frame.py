"""A whole NPBG++ frame with static shapes, for capture as one CUDA graph.

``model.render`` picks the winning points with ``torch.unique`` (data-dependent size, a
host sync), so it cannot be captured. :class:`StaticFrame` trades that for descriptors
of every valid point (a fixed count) and takes the camera pose as the only per-frame
input (image size and intrinsics fixed at construction, as in a viewport): rasterize
(CUDA kernel, or the torch reference on the CPU) -> descriptors -> gather -> refiner.
Without alignment (roll 0) it renders what ``model.render`` renders
(tests/test_gpu_speed.py compares them on the CPU; on a GPU the graph replay too).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from npbgpp_core import _backend
from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBGPlusPlus
from npbgpp_core.models.aggregator import AggregatedScene, descriptors_from_coefficients
from npbgpp_core.rasterizer import gather, keys_to_index, nan_beyond_far, raster_params, rasterize_keys_torch


class StaticFrame:
    """Fixed-size frames of one scene; ``set_pose(camera)`` then ``__call__()``."""

    def __init__(self, model: NPBGPlusPlus, scene: AggregatedScene, camera: Camera,
                 dtype: torch.dtype | None = None) -> None:
        dev = model.device
        self.model, self.dtype, self.device = model, dtype, dev
        valid = scene.valid.to(dev)
        self.points = scene.points.to(dev)[valid].contiguous()
        self.coefficients = scene.coefficients.to(dev)[valid].contiguous()
        params = raster_params(camera, model.config.scales, model.config.near, dev)
        self.R, self.t = params.R.clone(), params.t.clone()  # the graph reads these buffers
        self.params = dataclasses.replace(params, R=self.R, t=self.t)
        self.image_size = tuple(camera.image_size)
        self.K = camera.to_opencv()[0]
        self.clip = (camera.near, camera.far)
        self.cuda_op = _backend.cuda_rasterizer() if dev.type == "cuda" else None
        if dev.type == "cuda" and self.cuda_op is None:
            raise RuntimeError(f"StaticFrame on CUDA needs the CUDA rasterizer: {_backend.why_unavailable()}")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: torch.Tensor | None = None

    def set_pose(self, camera: Camera) -> None:
        """Copy a camera's rotation and translation into the frame's input buffers (same
        image size and intrinsics as at construction)."""
        if (tuple(camera.image_size) != self.image_size or abs(camera.to_opencv()[0] - self.K).max() > 1e-6
                or (camera.near, camera.far) != self.clip):
            raise ValueError("StaticFrame: the camera must keep the image size, intrinsics and clip range it was "
                             "built with")
        self.R.copy_(camera.R.to(self.R))
        self.t.copy_(camera.t.to(self.t))

    def _autocast(self):
        if self.dtype is None or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def forward(self) -> torch.Tensor:
        """One frame (C_out, H, W), unclamped, from the current pose."""
        if self.cuda_op is not None:
            keys = self.cuda_op.rasterize_keys(nan_beyond_far(self.points, self.params), self.params)
        else:
            keys = rasterize_keys_torch(self.points, self.params)
        index = [keys_to_index(k) for k in keys]
        center = -(self.t @ self.R)
        d = self.points - center
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x = None
        if self.model.basis is not None and self.coefficients.shape[1] > 1:
            x = self.model.basis(d)
        desc = descriptors_from_coefficients(self.coefficients, x)
        rasters = [gather(i, desc).unsqueeze(0) for i in index]
        with self._autocast():
            return self.model.refiner(rasters)[0]

    def capture(self, warmup: int = 3) -> None:
        """Record :meth:`forward` as a CUDA graph (CUDA only)."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self.forward()
        self.graph = graph

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.static_out  # type: ignore[return-value]
        return self.forward()
