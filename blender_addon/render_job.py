"""One frame request, shared by F12 renders and the viewport thread (no bpy here: the
caller snapshots the scene on Blender's main thread, see ``scene_snapshot``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from npbgpp_core import protocol as P

from .camera_bridge import CameraGeometry, object_local_geometry
from .worker_client import HUB

if TYPE_CHECKING:
    from .scene_snapshot import SceneSnapshot

WINDOW_MARGIN = 128  # npbgpp_core.scene.WINDOW_MARGIN (that module imports torch)
MIN_TILE_SIZE = 2 * WINDOW_MARGIN + 16


class RenderedFrame(NamedTuple):
    """What :func:`render_frame` returns."""

    pixels: np.ndarray  # (H, W, FRAME_CHANNELS), see npbgpp_core.protocol
    depth_scale: float  # brings the frame's depths to scene units
    status: str  # for neural frames: which refiner ran, and why ("" otherwise)
    compiling: bool  # the fused kernels asked for are still compiling: a later frame would use them


def render_frame(
    snap: SceneSnapshot, geo: CameraGeometry, should_cancel: Callable[[], bool] | None = None,
    roll_context: str = "exact", wait_for_kernels: bool = True,
) -> RenderedFrame:
    """A frame from the worker (see :class:`RenderedFrame`).
    ``roll_context``: how the network renders rolled views ('exact' for F12 renders; the
    viewport may ask for 'bounded', see ``RenderFrame.roll_context``). ``wait_for_kernels``:
    F12 waits for fused refiner kernels to compile; the viewport renders with torch meanwhile."""
    if snap.hidden:
        return RenderedFrame(empty_frame(geo.image_size), 1.0, snap.hidden, False)
    neural = snap.output == "NEURAL"
    if neural and 0 < snap.tile_size < MIN_TILE_SIZE:  # a file saved before Tile Size snapped such values
        raise ValueError(f"Tile Size (Render Properties > NPBG++ > Performance) must be 0 (whole frame) or at least "
                         f"{MIN_TILE_SIZE} pixels, not {snap.tile_size}: each tile renders a margin of "
                         f"{WINDOW_MARGIN} pixels on every side")
    worker = HUB.get(snap.mode, snap.env_path, snap.extra_paths)
    depth_scale = 1.0
    if neural or snap.points is None:
        if not snap.bundle_path:
            if snap.no_points:
                raise ValueError(f"Nothing to render: {snap.no_points}")
            if neural:
                raise ValueError("Neural output needs a NeuralScene bundle: set Bundle in Render Properties > NPBG++")
            raise ValueError("Nothing to render: set a Point Object or a Bundle in Render Properties > NPBG++")
        with worker.lock:
            worker.request(P.LoadBundle(snap.bundle_path, snap.device, snap.precision), should_cancel, snap.timeout)
            if worker.selection_key != snap.ids_key:
                worker.request(P.SelectBundlePoints(snap.point_ids), should_cancel, snap.timeout)
                worker.selection_key = snap.ids_key
        source = "bundle"
        if snap.object_matrix is not None:
            geo, depth_scale = object_local_geometry(geo, snap.object_matrix)
    else:
        with worker.lock:
            if not worker.alive():
                worker.start()
            if worker.loaded_key != snap.points_key:
                worker.request(P.SetPoints(snap.points, snap.colors), should_cancel, snap.timeout)
                worker.loaded_key = snap.points_key
        source = "points"
    request = P.RenderFrame(geo.to_spec(), source, neural, snap.tile_size * snap.tile_size, snap.point_size,
                            roll_context, snap.refiner_impl, wait_for_kernels)
    reply = worker.request(request, should_cancel, snap.timeout)
    return RenderedFrame(reply.pixels, depth_scale, refiner_status(reply), reply.compiling)


def empty_frame(size: tuple[int, int]) -> np.ndarray:
    """A frame no point lands on (coverage and alpha 0, depth +inf): what a hidden point
    object renders, without asking the worker (no bundle is loaded for it)."""
    frame = np.zeros((*size, P.FRAME_CHANNELS), dtype=np.float32)
    frame[..., P.DEPTH] = np.inf
    frame[..., P.NEURAL_DEPTH] = np.inf
    return frame


def refiner_status(frame: P.Frame) -> str:
    """'refiner: <implementation that ran> (<note>)', or "" for a frame without the network."""
    if not frame.refiner:
        return ""
    return f"refiner: {frame.refiner}" + (f" ({frame.note})" if frame.note else "")
