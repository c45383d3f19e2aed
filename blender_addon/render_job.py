"""One frame request, shared by F12 renders and the viewport thread (no bpy here: the
caller snapshots the scene settings on Blender's main thread)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .camera_bridge import CameraGeometry, object_local_geometry
from .worker_client import HUB


@dataclass
class SceneSnapshot:
    """What a render needs, read from bpy on the main thread."""

    output: str = "POINTS"
    bundle_path: str = ""
    device: str = "AUTO"
    precision: str = "FP32"
    mode: str = "PROCESS"
    env_path: str = ""
    points: np.ndarray | None = None  # world space
    colors: np.ndarray | None = None
    points_key: str = ""
    object_matrix: np.ndarray | None = None  # the bundle's object transform
    extra_paths: list[str] = field(default_factory=list)


def render_frame(
    snap: SceneSnapshot, geo: CameraGeometry, should_cancel: Callable[[], bool] | None = None
) -> tuple[np.ndarray, float]:
    """(H, W, 8) frame from the worker and the depth scale to bring depth to scene units."""
    worker = HUB.get(snap.mode, snap.env_path, snap.extra_paths)
    neural = snap.output == "NEURAL"
    depth_scale = 1.0
    if neural or snap.points is None:
        if not snap.bundle_path:
            if neural:
                raise ValueError("Neural output needs a NeuralScene bundle: set Bundle in Render Properties > NPBG++")
            raise ValueError("Nothing to render: set a Point Object or a Bundle in Render Properties > NPBG++")
        worker.request(
            {"op": "load_bundle", "path": snap.bundle_path, "device": snap.device, "precision": snap.precision},
            should_cancel,
        )
        source = "bundle"
        if snap.object_matrix is not None:
            geo, depth_scale = object_local_geometry(geo, snap.object_matrix)
    else:
        with worker.lock:
            if not worker.alive():
                worker.start()
            if worker.loaded_key != snap.points_key:
                worker.request({"op": "set_points", "points": snap.points, "colors": snap.colors}, should_cancel)
                worker.loaded_key = snap.points_key
        source = "points"
    reply: dict[str, Any] = worker.request(
        {"op": "render", "camera": geo.state_dict(), "source": source, "neural": neural}, should_cancel
    )
    return reply["frame"], depth_scale
